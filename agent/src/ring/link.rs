//! The writing end of a link to the successor, usable from any thread.
//!
//! The compute thread writes its frames straight into the socket with a non-blocking write:
//! handing each frame to an async task first cost a task wake-up per hop (about 120 µs measured
//! on this project's 2-core VM, more than the network itself). Only when the socket's buffer is
//! full do bytes wait in `pending`, which a flusher task drains as the socket becomes writable;
//! frames never interleave because every writer appends under one lock.
//!
//! A successor that reads nothing for a while is not a fault: its compute thread reads between
//! passes, and a pass may take seconds. Whether it is alive is for the link thread to say,
//! from its heartbeats ([`super::links`]); this writer only ends when the connection does.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use super::frame::Frame;

/// Past this many bytes waiting, writers on plain threads wait for the flusher: the compute
/// thread slows to the network's pace instead of buffering without bound.
const PENDING_CAP: usize = 16 << 20;

/// A link's writing end.
pub struct LinkWriter {
    half: OwnedWriteHalf,
    pending: Mutex<BytesMut>,
    wake_flusher: Notify,
    closed: AtomicBool,
    /// Why it closed, when someone said.
    reason: Mutex<Option<String>>,
}

impl LinkWriter {
    /// Wraps the write half of a link whose handshake is done.
    pub fn new(half: OwnedWriteHalf) -> Self {
        Self {
            half,
            pending: Mutex::new(BytesMut::new()),
            wake_flusher: Notify::new(),
            closed: AtomicBool::new(false),
            reason: Mutex::new(None),
        }
    }

    fn pending(&self) -> MutexGuard<'_, BytesMut> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a write failed: the link is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.wake_flusher.notify_one();
    }

    /// Ends the link for `reason` (the successor closed it, or stopped answering the way the
    /// protocol says): writers fail from now on and the flusher returns the reason.
    pub fn close_with(&self, reason: String) {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert(reason);
        self.close();
    }

    /// Why the link closed: the reason given to [`LinkWriter::close_with`], or that a write
    /// failed.
    pub fn close_reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "writing failed".into())
    }

    /// Writes a frame now, or queues it behind bytes already waiting. Returns false when the
    /// link is closed. Never blocks; see [`LinkWriter::send_blocking`] for backpressure.
    pub fn send(&self, frame: &Frame) -> bool {
        let bytes = frame.encode();
        let mut pending = self.pending();
        if self.is_closed() {
            return false;
        }
        let mut written = 0;
        if pending.is_empty() {
            while written < bytes.len() {
                match self.half.try_write(&bytes[written..]) {
                    Ok(0) => {
                        drop(pending);
                        self.close();
                        return false;
                    }
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        drop(pending);
                        self.close();
                        return false;
                    }
                }
            }
            if written == bytes.len() {
                return true;
            }
        }
        pending.extend_from_slice(&bytes[written..]);
        drop(pending);
        self.wake_flusher.notify_one();
        true
    }

    /// [`LinkWriter::send`], then waits (on a plain thread, never an async one) while too many
    /// bytes are waiting, for as long as the link lasts: a successor in a long pass reads
    /// nothing until it ends, and one that is gone closes the link.
    pub fn send_blocking(&self, frame: &Frame) -> bool {
        if !self.send(frame) {
            return false;
        }
        while self.pending().len() > PENDING_CAP && !self.is_closed() {
            std::thread::sleep(Duration::from_millis(1));
        }
        !self.is_closed()
    }

    /// Drains waiting bytes as the socket becomes writable; returns when the link fails.
    pub async fn flush_forever(&self) -> String {
        loop {
            if self.is_closed() {
                return self.close_reason();
            }
            if self.pending().is_empty() {
                self.wake_flusher.notified().await;
                continue;
            }
            if let Err(e) = self.half.writable().await {
                self.close();
                return format!("writing failed: {e}");
            }
            let mut pending = self.pending();
            while !pending.is_empty() {
                match self.half.try_write(&pending) {
                    Ok(0) => {
                        drop(pending);
                        self.close();
                        return "writing failed: the peer closed".into();
                    }
                    Ok(n) => pending.advance(n),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) => {
                        drop(pending);
                        self.close();
                        return format!("writing failed: {e}");
                    }
                }
            }
        }
    }
}
