//! The writing end of a link to the successor, usable from any thread.
//!
//! The compute thread writes its frames straight into the socket with a non-blocking write:
//! handing each frame to an async task first cost a task wake-up per hop (about 120 µs measured
//! on this project's 2-core VM, more than the network itself). Only when the socket's buffer is
//! full do bytes wait in `pending`, which a flusher task drains as the socket becomes writable;
//! frames never interleave because every writer appends under one lock.

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
/// A successor that takes nothing for this long while bytes wait is treated as gone, so that a
/// stalled peer (stopped, not closed) cannot hold this stage's compute thread forever.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// A link's writing end.
pub struct LinkWriter {
    half: OwnedWriteHalf,
    pending: Mutex<BytesMut>,
    wake_flusher: Notify,
    closed: AtomicBool,
}

impl LinkWriter {
    /// Wraps the write half of a link whose handshake is done.
    pub fn new(half: OwnedWriteHalf) -> Self {
        Self {
            half,
            pending: Mutex::new(BytesMut::new()),
            wake_flusher: Notify::new(),
            closed: AtomicBool::new(false),
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
    /// bytes are waiting; closes the link when the successor takes nothing for [`STALL_LIMIT`].
    pub fn send_blocking(&self, frame: &Frame) -> bool {
        if !self.send(frame) {
            return false;
        }
        let mut last_len = usize::MAX;
        let mut since = std::time::Instant::now();
        loop {
            let len = self.pending().len();
            if len <= PENDING_CAP || self.is_closed() {
                break;
            }
            if len < last_len {
                last_len = len;
                since = std::time::Instant::now();
            } else if since.elapsed() > STALL_LIMIT {
                tracing::warn!(
                    "the successor took no data for {} s; closing the link",
                    STALL_LIMIT.as_secs()
                );
                self.close();
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        !self.is_closed()
    }

    /// Drains waiting bytes as the socket becomes writable; returns when the link fails.
    pub async fn flush_forever(&self) -> String {
        loop {
            if self.is_closed() {
                return "writing failed".into();
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
