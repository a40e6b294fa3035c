//! The reading end of the link from the predecessor, read by the compute thread itself.
//!
//! Once the handshake is done the connection leaves the async runtime: the compute thread
//! reads the socket between jobs and, when it has had nothing to do for a while, sleeps in its
//! own poller on the socket and on a waker that the job queue's senders trigger.
//!
//! Why not an async reader task feeding the queue: on the 2-core VM this project is measured on,
//! every frame then woke a runtime thread (an interrupt to the other virtual CPU, then a switch
//! away from the compute thread on a pinned core) and crossed threads once more through the
//! queue; timestamps on both sides put that at 85 µs per hop, twice per token, against a decode
//! step of about 10 ms. A compute thread that reads the socket itself sees the bytes as soon as
//! the kernel has them, and nobody has to be woken.

use std::io::{ErrorKind, Read};
use std::sync::atomic::{AtomicBool, Ordering, fence};
use std::time::Duration;

use bytes::BytesMut;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};

use super::frame::{Frame, FrameError};

/// Bytes asked of the socket per read: a prefill chunk of hidden states is a few hundred KiB,
/// so a few reads take it whole.
const READ_SIZE: usize = 64 * 1024;
const WAKE: Token = Token(0);
const SOCKET: Token = Token(1);

/// A connection from the predecessor whose handshake is done.
pub struct InboundConn {
    stream: TcpStream,
    buf: BytesMut,
    scratch: Box<[u8]>,
    /// An error met after frames that were still delivered; the next read reports it (a
    /// malformed body has already left the buffer, so parsing again would not find it).
    pending: Option<FrameError>,
    /// The predecessor, as errors name it.
    pub predecessor: String,
}

impl std::fmt::Debug for InboundConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundConn")
            .field("peer", &self.stream.peer_addr().ok())
            .field("buffered", &self.buf.len())
            .field("predecessor", &self.predecessor)
            .finish()
    }
}

impl InboundConn {
    /// Takes over a connection and whatever the handshake read past its end.
    pub fn new(
        stream: std::net::TcpStream,
        buffered: BytesMut,
        predecessor: String,
    ) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream: TcpStream::from_std(stream),
            buf: buffered,
            scratch: vec![0; READ_SIZE].into_boxed_slice(),
            pending: None,
            predecessor,
        })
    }

    /// Appends to `out` the whole frames available now, without waiting. An error (the peer
    /// closed, a frame broke the protocol) means the connection is finished; frames parsed
    /// before the error are still delivered, and the error comes with the next call.
    pub fn read_frames(&mut self, out: &mut Vec<Frame>) -> Result<(), FrameError> {
        if let Some(e) = self.pending.take() {
            return Err(e);
        }
        let before = out.len();
        loop {
            loop {
                match Frame::parse(&mut self.buf) {
                    Ok(Some(frame)) => out.push(frame),
                    Ok(None) => break,
                    Err(e) if out.len() == before => return Err(e),
                    Err(e) => {
                        self.pending = Some(e);
                        return Ok(());
                    }
                }
            }
            if out.len() > before {
                return Ok(());
            }
            match self.stream.read(&mut self.scratch) {
                Ok(0) if self.buf.is_empty() => {
                    return Err(FrameError::Io(std::io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "closed the connection",
                    )));
                }
                Ok(0) => return Err(FrameError::Truncated(self.buf.len())),
                Ok(n) => self.buf.extend_from_slice(&self.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(FrameError::Io(e)),
            }
        }
    }
}

impl Drop for InboundConn {
    /// Shuts the socket down, not only this handle: the link thread writes heartbeats on
    /// another handle of the same socket, which would otherwise keep the connection open.
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Wakes the compute thread when it sleeps: whoever queues a job calls [`Wake::wake`], which
/// costs one atomic load unless the thread is asleep.
#[derive(Debug)]
pub struct Wake {
    sleeping: AtomicBool,
    waker: Waker,
}

impl Wake {
    /// Call after queueing a job.
    pub fn wake(&self) {
        // Pairs with the fence in `Sleeper::sleep`: either the sleeper sees the job when it
        // looks once more after marking itself asleep, or this sees it asleep and wakes it.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::SeqCst)
            && let Err(e) = self.waker.wake()
        {
            tracing::error!(error = %e, "waking the compute thread failed");
        }
    }
}

/// The compute thread's poller: its inbound socket and the waker.
pub struct Sleeper {
    poll: Poll,
    events: Events,
}

/// A sleeper and the waker that interrupts it.
pub fn wake_pair() -> std::io::Result<(Wake, Sleeper)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKE)?;
    Ok((
        Wake {
            sleeping: AtomicBool::new(false),
            waker,
        },
        Sleeper {
            poll,
            events: Events::with_capacity(4),
        },
    ))
}

impl Sleeper {
    /// Watches a new connection (the caller drops the one it replaces via [`Sleeper::forget`]).
    pub fn watch(&self, conn: &mut InboundConn) -> std::io::Result<()> {
        self.poll
            .registry()
            .register(&mut conn.stream, SOCKET, Interest::READABLE)
    }

    /// Stops watching a connection before it is dropped.
    pub fn forget(&self, conn: &mut InboundConn) {
        let _ = self.poll.registry().deregister(&mut conn.stream);
    }

    /// Sleeps until the watched socket may have bytes, a job is queued, or `limit` passes.
    /// `nothing_waiting` runs after the thread is marked asleep and says whether there is still
    /// no work: checking only before marking would lose a job queued in between.
    pub fn sleep(&mut self, wake: &Wake, limit: Duration, nothing_waiting: impl FnOnce() -> bool) {
        wake.sleeping.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        if nothing_waiting()
            && let Err(e) = self.poll.poll(&mut self.events, Some(limit))
            && e.kind() != ErrorKind::Interrupted
        {
            tracing::error!(error = %e, "the compute thread's poll failed");
            std::thread::sleep(Duration::from_millis(1));
        }
        wake.sleeping.store(false, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::Instant;

    use super::super::frame::FrameKind;

    #[test]
    fn a_sleeper_wakes_for_a_job_or_for_bytes_and_otherwise_waits_its_limit() {
        let (wake, mut sleeper) = wake_pair().unwrap();
        let started = Instant::now();
        sleeper.sleep(&wake, Duration::from_millis(150), || true);
        assert!(started.elapsed() >= Duration::from_millis(140));

        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                wake.wake();
            });
            let started = Instant::now();
            sleeper.sleep(&wake, Duration::from_secs(10), || true);
            assert!(started.elapsed() < Duration::from_secs(5));
        });

        // Work found after marking itself asleep: no sleep at all.
        let started = Instant::now();
        sleeper.sleep(&wake, Duration::from_secs(10), || false);
        assert!(started.elapsed() < Duration::from_secs(1));

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut conn = InboundConn::new(server, BytesMut::new(), "stage 0".into()).unwrap();
        sleeper.watch(&mut conn).unwrap();
        let mut frames = Vec::new();
        conn.read_frames(&mut frames).unwrap();
        assert!(frames.is_empty());
        let bytes = Frame::new(FrameKind::Probe, "p", 1, 9).encode();
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(50));
                // Half a frame, then the rest: the reader waits for the whole.
                client.write_all(&bytes[..10]).unwrap();
                std::thread::sleep(Duration::from_millis(20));
                client.write_all(&bytes[10..]).unwrap();
            });
            let started = Instant::now();
            while frames.is_empty() && started.elapsed() < Duration::from_secs(5) {
                sleeper.sleep(&wake, Duration::from_secs(5), || true);
                conn.read_frames(&mut frames).unwrap();
            }
            // Woken by the bytes, not by the limit.
            assert!(started.elapsed() < Duration::from_secs(4));
        });
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].seq, 9);
        // A good frame and a malformed one in one read: the good one comes first, then the
        // error, although the malformed body has already left the buffer.
        let mut bad = Frame::new(FrameKind::Decode, "p", 1, 2).with_tokens(&[1, 2]);
        bad.shape = vec![3];
        let mut two = bytes.to_vec();
        two.extend_from_slice(&bad.encode());
        client.write_all(&two).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        let mut got = Vec::new();
        conn.read_frames(&mut got).unwrap();
        assert_eq!(got.len(), 1);
        let err = conn.read_frames(&mut got).unwrap_err();
        assert!(matches!(err, FrameError::Malformed(_)), "{err}");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let mut conn = InboundConn::new(server, BytesMut::new(), "stage 0".into()).unwrap();
        client.write_all(&bytes[..7]).unwrap();
        drop(client);
        std::thread::sleep(Duration::from_millis(50));
        let mut more = Vec::new();
        let err = conn.read_frames(&mut more).unwrap_err();
        assert!(matches!(err, FrameError::Truncated(7)), "{err}");
        sleeper.forget(&mut conn);
    }
}
