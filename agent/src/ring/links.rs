//! A stage's link thread: the side of its links that never waits for a forward pass.
//!
//! Frames of work flow forward around the ring and are read by each stage's compute thread
//! between passes (see [`super::inbound`]), so nothing read there can say in time that a busy
//! stage is alive. The link thread owns the other direction of each connection, which carries
//! nothing else:
//!
//! - on the connection from its predecessor, it writes a heartbeat every
//!   [`HEARTBEAT_INTERVAL`]: this stage's passes and link, and what its successor last said of
//!   the stages after it (see [`super::health`]);
//! - on the connection to its successor, it reads the successor's heartbeats, notices when the
//!   connection closes (and closes the writer, which ends the link at once) and when the
//!   heartbeats stop while it stays open (the successor is stalled, not gone);
//! - on stage 0 it judges the ring from all that after every heartbeat and tick, fails the
//!   sequences of a ring that broke or stalled, and runs the warm-up (see [`super::head`]).
//!
//! It is a plain thread with its own poller rather than a task on the agent's runtime, so that
//! no blocking work elsewhere in the agent (a store flush, a file read) can delay a heartbeat
//! into a false alarm.

use std::io::{ErrorKind, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use mio::{Events, Interest, Poll, Token, Waker};

use super::frame::{Frame, FrameKind};
use super::health::{HEARTBEAT_INTERVAL, Heartbeat, LinkBeat, SILENCE_LIMIT, StageBeat};
use super::link::LinkWriter;
use super::node::Shared;

const WAKE: Token = Token(0);
const SUCCESSOR: Token = Token(1);
/// Heartbeat bytes that may wait for a predecessor that reads nothing (it is stopped) before
/// new heartbeats are dropped rather than queued.
const REVERSE_PENDING_CAP: usize = 64 << 10;

/// What the rest of the stage tells its link thread.
pub enum LinkCmd {
    /// A new connection to the successor, handshake done: `stream` is the same socket as the
    /// writer's, to read heartbeats from; `buffered` is what the handshake read past its end.
    Outbound {
        /// The writing end, closed here when the connection ends.
        link: Arc<LinkWriter>,
        /// The socket, for reading.
        stream: std::net::TcpStream,
        /// Bytes read with the handshake that belong to what follows.
        buffered: BytesMut,
        /// This connection's identity.
        id: u64,
    },
    /// The successor cannot be reached (yet): why, for reports.
    Connecting {
        /// The error of the last attempt, or why the last connection ended.
        why: String,
    },
    /// A new connection from the predecessor: heartbeats go back on `stream`.
    Inbound {
        /// The same socket the compute thread reads.
        stream: std::net::TcpStream,
    },
    /// The stage is stopping.
    Stop,
}

/// Where to send [`LinkCmd`]s.
pub struct LinkHandle {
    tx: mpsc::Sender<LinkCmd>,
    waker: Waker,
}

impl LinkHandle {
    /// Hands a command to the link thread and wakes it.
    pub fn send(&self, cmd: LinkCmd) {
        if self.tx.send(cmd).is_ok()
            && let Err(e) = self.waker.wake()
        {
            tracing::error!(error = %e, "waking the link thread failed");
        }
    }
}

/// The link thread's side of the channel, before it starts.
pub struct LinkThread {
    rx: mpsc::Receiver<LinkCmd>,
    poll: Poll,
}

/// A link thread's handle and its state, which [`LinkThread::spawn`] starts.
pub fn channel() -> std::io::Result<(LinkHandle, LinkThread)> {
    let poll = Poll::new()?;
    let waker = Waker::new(poll.registry(), WAKE)?;
    let (tx, rx) = mpsc::channel();
    Ok((LinkHandle { tx, waker }, LinkThread { rx, poll }))
}

struct Outbound {
    link: Arc<LinkWriter>,
    stream: mio::net::TcpStream,
    buf: BytesMut,
    scratch: Box<[u8]>,
    id: u64,
    /// When the last heartbeat came (or the link opened).
    heard: Instant,
}

struct Reverse {
    stream: std::net::TcpStream,
    pending: Vec<u8>,
}

impl LinkThread {
    /// Starts the thread for `shared`'s stage; it ends on [`LinkCmd::Stop`] or when the stage
    /// is dropped.
    pub fn spawn(self, shared: &Arc<Shared>) -> std::io::Result<()> {
        let weak = Arc::downgrade(shared);
        let index = shared.index;
        std::thread::Builder::new()
            .name(format!("stage-{index}-links"))
            .spawn(move || {
                Worker {
                    shared: weak,
                    rx: self.rx,
                    poll: self.poll,
                    events: Events::with_capacity(8),
                    outbound: None,
                    reverse: None,
                    last_state: None,
                }
                .run()
            })?;
        Ok(())
    }
}

struct Worker {
    shared: Weak<Shared>,
    rx: mpsc::Receiver<LinkCmd>,
    poll: Poll,
    events: Events,
    outbound: Option<Outbound>,
    reverse: Option<Reverse>,
    /// The link state last reported, to relay a change at once instead of at the next tick.
    last_state: Option<(u8, u64)>,
}

impl Worker {
    fn run(mut self) {
        let mut next_beat = Instant::now();
        loop {
            let timeout = next_beat.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut self.events, Some(timeout))
                && e.kind() != ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "the link thread's poll failed");
                std::thread::sleep(Duration::from_millis(10));
            }
            let Some(shared) = self.shared.upgrade() else {
                return;
            };
            let mut urgent = false;
            loop {
                match self.rx.try_recv() {
                    Ok(LinkCmd::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        self.drop_outbound(&shared, "this stage is stopping".into());
                        return;
                    }
                    Ok(cmd) => urgent |= self.take(&shared, cmd),
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            let (heard, changed) = self.read_successor(&shared);
            if let Some(out) = &self.outbound
                && out.link.is_closed()
            {
                let why = out.link.close_reason();
                self.drop_outbound(&shared, why);
            }
            let state = self.link_state(&shared);
            if self.last_state != Some(link_kind(&state)) {
                // A link that changes state is news for stage 0 now, not at the next tick.
                urgent = urgent || self.last_state.is_some();
                self.last_state = Some(link_kind(&state));
            }
            // So is a change further down, but a heartbeat that brings nothing new is not
            // passed on at once: relaying every one would multiply them along the ring.
            urgent |= changed;
            let now = Instant::now();
            if urgent || now >= next_beat {
                self.beat(&shared, state);
                if now >= next_beat {
                    next_beat = now + HEARTBEAT_INTERVAL;
                }
            } else if heard && let Some(head) = &shared.head {
                head.watch(&shared, &shared.own_beat(state));
            }
        }
    }

    /// Handles one command; true when it changed a link.
    fn take(&mut self, shared: &Shared, cmd: LinkCmd) -> bool {
        match cmd {
            LinkCmd::Outbound {
                link,
                stream,
                buffered,
                id,
            } => {
                if let Some(mut old) = self.outbound.take() {
                    let _ = self.poll.registry().deregister(&mut old.stream);
                }
                let mut stream = mio::net::TcpStream::from_std(stream);
                if let Err(e) =
                    self.poll
                        .registry()
                        .register(&mut stream, SUCCESSOR, Interest::READABLE)
                {
                    link.close_with(format!("cannot watch the connection: {e}"));
                    return true;
                }
                self.outbound = Some(Outbound {
                    link,
                    stream,
                    buf: buffered,
                    scratch: vec![0; 16 << 10].into_boxed_slice(),
                    id,
                    heard: Instant::now(),
                });
                shared.links.with(|d| {
                    d.heard = None;
                    d.link = Some(LinkBeat::Up { id });
                });
                true
            }
            LinkCmd::Connecting { why } => {
                if self.outbound.is_none() {
                    shared
                        .links
                        .with(|d| d.link = Some(LinkBeat::Connecting { why }));
                }
                false
            }
            LinkCmd::Inbound { stream } => {
                self.reverse = Some(Reverse {
                    stream,
                    pending: Vec::new(),
                });
                true
            }
            LinkCmd::Stop => false,
        }
    }

    fn drop_outbound(&mut self, shared: &Shared, why: String) {
        if let Some(mut out) = self.outbound.take() {
            let _ = self.poll.registry().deregister(&mut out.stream);
            out.link.close_with(why.clone());
            shared.links.with(|d| {
                d.heard = None;
                d.link = Some(LinkBeat::Connecting {
                    why: format!("it went away ({why})"),
                });
            });
        }
    }

    /// Reads what the successor sent back: whether a heartbeat came, and whether one said that
    /// a link further down changed state. A closed connection or a frame that is not a
    /// heartbeat ends the link.
    fn read_successor(&mut self, shared: &Shared) -> (bool, bool) {
        let Some(out) = self.outbound.as_mut() else {
            return (false, false);
        };
        let mut ended: Option<String> = None;
        loop {
            match out.stream.read(&mut out.scratch) {
                Ok(0) => {
                    ended = Some("closed the connection".into());
                    break;
                }
                Ok(n) => out.buf.extend_from_slice(&out.scratch[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                    ended = Some("the connection was reset".into());
                    break;
                }
                Err(e) => {
                    ended = Some(format!("the connection failed: {e}"));
                    break;
                }
            }
        }
        let mut heard = false;
        let mut changed = false;
        loop {
            match Frame::parse(&mut out.buf) {
                Ok(Some(frame)) if frame.kind == FrameKind::Heartbeat => {
                    match serde_json::from_slice::<Heartbeat>(&frame.meta) {
                        Ok(beat) => {
                            out.heard = Instant::now();
                            heard = true;
                            let me = shared.index;
                            // The last stage hears from stage 0, which it does not relay.
                            let after: Vec<StageBeat> =
                                beat.stages.into_iter().filter(|b| b.index > me).collect();
                            shared.links.with(|d| {
                                let before = d.heard.as_ref().map(|(_, s)| link_kinds(s));
                                changed |= before.is_some_and(|b| b != link_kinds(&after));
                                for b in &after {
                                    d.known.insert(b.index, b.clone());
                                }
                                d.heard = Some((out.heard, after));
                            });
                        }
                        Err(e) => {
                            ended = Some(format!("sent a malformed heartbeat: {e}"));
                            break;
                        }
                    }
                }
                Ok(Some(frame)) => {
                    ended = Some(format!("sent an unexpected {:?} frame", frame.kind));
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    ended = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(why) = ended {
            self.drop_outbound(shared, why);
        }
        (heard, changed)
    }

    /// This stage's link to its successor as it stands now.
    fn link_state(&self, shared: &Shared) -> LinkBeat {
        match &self.outbound {
            Some(out) => {
                let silent = out.heard.elapsed();
                let state = if silent > SILENCE_LIMIT {
                    LinkBeat::Silent {
                        ms: silent.as_millis() as u64,
                    }
                } else {
                    LinkBeat::Up { id: out.id }
                };
                shared.links.with(|d| d.link = Some(state.clone()));
                state
            }
            None => shared.links.with(|d| {
                d.link.clone().unwrap_or_else(|| LinkBeat::Connecting {
                    why: "not connected yet".into(),
                })
            }),
        }
    }

    /// Sends this stage's heartbeat back to its predecessor and, on stage 0, judges the ring.
    fn beat(&mut self, shared: &Shared, link: LinkBeat) {
        let own = shared.own_beat(link);
        if let Some(head) = &shared.head {
            head.watch(shared, &own);
        }
        let Some(rev) = self.reverse.as_mut() else {
            return;
        };
        let mut stages = vec![own];
        stages.extend(shared.links.with(|d| d.relayed()));
        let body = match serde_json::to_vec(&Heartbeat { stages }) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "encoding a heartbeat failed");
                return;
            }
        };
        if rev.pending.len() < REVERSE_PENDING_CAP {
            let frame = Frame::new(
                FrameKind::Heartbeat,
                &shared.config.pipeline,
                shared.config.generation,
                0,
            )
            .with_meta(body);
            rev.pending.extend_from_slice(&frame.encode());
        }
        // Whole frames only ever go in, and what a full socket does not take waits here, so a
        // heartbeat is never cut in the middle.
        while !rev.pending.is_empty() {
            match rev.stream.write(&rev.pending) {
                Ok(0) => {
                    self.reverse = None;
                    return;
                }
                Ok(n) => {
                    rev.pending.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    // The predecessor's connection ended; the compute thread deals with that.
                    self.reverse = None;
                    return;
                }
            }
        }
    }
}

/// A link's state without the figures that change with every heartbeat: up on which
/// connection, connecting, or silent.
fn link_kind(link: &LinkBeat) -> (u8, u64) {
    match link {
        LinkBeat::Up { id } => (0, *id),
        LinkBeat::Connecting { .. } => (1, 0),
        LinkBeat::Silent { .. } => (2, 0),
    }
}

/// [`link_kind`] of every stage a heartbeat speaks of.
fn link_kinds(stages: &[StageBeat]) -> Vec<(usize, (u8, u64))> {
    stages
        .iter()
        .map(|b| (b.index, link_kind(&b.link)))
        .collect()
}
