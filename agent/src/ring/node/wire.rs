//! A stage's connections: accepting its predecessor's link (on its own listener or through the
//! agent's shared ring port), connecting to its successor with backoff, the TCP settings that
//! notice a vanished host, and stage 0's probes around the ring.

use super::*;
use crate::ring::hush::Hush;

/// Longest wait for a TCP connect or a handshake to finish.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often stage 0 sends a probe around the ring (to time its hops) and checks its sequences.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A ring link whose peer's host stops answering at the TCP level (it lost power, its cable was
/// pulled) is closed after about this long: keepalive probes start after 5 s of quiet, 1 s
/// apart, and unacknowledged data waits at most 20 s. A stopped process's kernel still answers,
/// so a SIGSTOP'ed stage stays connected (and is reported stalled by its heartbeats).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const KEEPALIVE_PROBES: u32 = 5;
#[cfg(any(target_os = "linux", target_os = "android"))]
const USER_TIMEOUT: Duration = Duration::from_secs(20);

/// Refused ring connections, logged at most once per kind every 10 s (see [`Hush`]): anyone who
/// can reach a ring port can cause them.
static REFUSALS: std::sync::LazyLock<Hush> =
    std::sync::LazyLock::new(|| Hush::new(Duration::from_secs(10)));

/// Logs a refused ring connection, unless one of its kind was logged in the last 10 s.
fn log_refusal(peer: SocketAddr, kind: &'static str, why: &dyn std::fmt::Display) {
    match REFUSALS.allow(kind) {
        Some(0) => tracing::warn!(%peer, "refused a ring connection: {why}"),
        Some(held) => tracing::warn!(
            %peer,
            "refused a ring connection: {why} ({held} more of this kind in the last 10 s not logged)"
        ),
        None => tracing::debug!(%peer, "refused a ring connection: {why}"),
    }
}

/// Keepalive and a bound on unacknowledged data, so that a vanished host ends its links.
fn tune_link_socket(stream: &std::net::TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL);
    #[cfg(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "android",
        target_os = "ios"
    ))]
    let keepalive = keepalive.with_retries(KEEPALIVE_PROBES);
    #[cfg(not(any(
        target_os = "linux",
        target_os = "macos",
        target_os = "android",
        target_os = "ios"
    )))]
    let _ = KEEPALIVE_PROBES;
    if let Err(e) = sock.set_tcp_keepalive(&keepalive) {
        tracing::warn!(error = %e, "cannot set TCP keepalive on a ring link");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(USER_TIMEOUT)) {
        tracing::warn!(error = %e, "cannot set TCP_USER_TIMEOUT on a ring link");
    }
}

pub(super) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = BACKOFF_MIN;
                let _ = stream.set_nodelay(true);
                let (read, write) = stream.into_split();
                tokio::spawn(serve_inbound(
                    shared.clone(),
                    FrameReader::new(read),
                    write,
                    peer,
                    None,
                ));
            }
            Err(e) => {
                // Running out of descriptors is transient: wait and keep accepting.
                tracing::error!(error = %e, "accepting a ring connection failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// One connection from the predecessor: handshake (its hello already read when the agent's
/// shared ring port picked this stage by it), then hand it to the compute thread, which reads
/// its frames from then on and notices when it ends.
async fn serve_inbound(
    shared: Arc<Shared>,
    mut reader: FrameReader<tokio::net::tcp::OwnedReadHalf>,
    mut write: tokio::net::tcp::OwnedWriteHalf,
    peer: SocketAddr,
    hello: Option<Frame>,
) {
    let n = shared.config.stages.len();
    let predecessor = (shared.index + n - 1) % n;
    let shook = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let hello = match hello {
            Some(h) => h,
            None => handshake::read_hello(&mut reader).await?,
        };
        handshake::accept_hello(
            &mut reader,
            &mut write,
            &shared.identity,
            predecessor,
            hello,
        )
        .await
    })
    .await;
    match shook {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            log_refusal(peer, e.kind(), &e);
            return;
        }
        Err(_) => {
            let why = format!("no handshake within {} s", HANDSHAKE_TIMEOUT.as_secs());
            log_refusal(peer, "timeout", &why);
            return;
        }
    }
    // From here the compute thread reads the connection itself, and the link thread writes
    // heartbeats back on it.
    let (read, buffered) = reader.into_parts();
    let conn = read
        .reunite(write)
        .map_err(|e| e.to_string())
        .and_then(|stream| stream.into_std().map_err(|e| e.to_string()))
        .and_then(|stream| {
            tune_link_socket(&stream);
            let back = stream.try_clone().map_err(|e| e.to_string())?;
            let conn =
                InboundConn::new(stream, buffered, shared.config.describe_stage(predecessor))
                    .map_err(|e| e.to_string())?;
            Ok((conn, back))
        });
    match conn {
        Ok((conn, back)) => {
            tracing::info!(%peer, from = predecessor, "predecessor connected");
            shared.link_thread.send(LinkCmd::Inbound { stream: back });
            if shared
                .jobs
                .send(Job::Inbound(Box::new(conn)))
                .await
                .is_err()
            {
                tracing::warn!(%peer, "the stage stopped before it could take the connection");
            }
        }
        Err(e) => tracing::warn!(%peer, error = %e, "cannot take over a ring connection"),
    }
}

/// Keeps the link to the successor up: connect, handshake, write frames, reconnect with
/// backoff when it drops. The link thread reads what comes back on it (heartbeats) and closes
/// the writer when the connection ends.
pub(super) async fn connect_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let successor = shared.config.successor(shared.index);
    let address = shared.config.stages[successor].address.clone();
    let who = shared.config.describe_stage(successor);
    let mut backoff = BACKOFF_MIN;
    let mut logged_down = false;
    loop {
        if *stop.borrow() {
            return;
        }
        match open_link(&shared, &address).await {
            Ok(link) => {
                backoff = BACKOFF_MIN;
                logged_down = false;
                tracing::info!(stage = shared.index, "connected to {who}");
                let reason = run_link(&shared, link, &mut stop).await;
                shared.set_outbound(None);
                shared.link_thread.send(LinkCmd::Connecting {
                    why: format!("it went away ({reason})"),
                });
                let message = format!("{who} went away: {reason}");
                tracing::warn!(stage = shared.index, "{message}");
                match &shared.head {
                    Some(head) => head.fail_all(&shared, message, true),
                    None => {
                        let _ = shared.jobs.send(Job::DropAll).await;
                    }
                }
            }
            Err(e) => {
                shared.link_thread.send(LinkCmd::Connecting {
                    why: format!("{e:#}"),
                });
                if !logged_down {
                    tracing::info!(
                        stage = shared.index,
                        "cannot reach {who} yet: {e:#}; retrying"
                    );
                    logged_down = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// A link to the successor whose handshake is done: its writing half, and the same socket
/// with the bytes read past the handshake, for the link thread.
struct OpenLink {
    writer: tokio::net::tcp::OwnedWriteHalf,
    stream: std::net::TcpStream,
    buffered: bytes::BytesMut,
}

async fn open_link(shared: &Shared, address: &str) -> Result<OpenLink> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(address))
        .await
        .context("connect timed out")??;
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut reader = FrameReader::new(read);
    tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        handshake::connect(&mut reader, &mut write, &shared.identity, shared.index),
    )
    .await
    .context("handshake timed out")??;
    let (read, buffered) = reader.into_parts();
    let stream = read.reunite(write)?.into_std()?;
    tune_link_socket(&stream);
    let back = stream.try_clone()?;
    let (_, writer) = TcpStream::from_std(stream)?.into_split();
    Ok(OpenLink {
        writer,
        stream: back,
        buffered,
    })
}

/// Writes frames to the successor until the link breaks; returns why it ended.
async fn run_link(shared: &Shared, open: OpenLink, stop: &mut watch::Receiver<bool>) -> String {
    let link = Arc::new(LinkWriter::new(open.writer));
    shared.set_outbound(Some(link.clone()));
    shared.link_thread.send(LinkCmd::Outbound {
        link: link.clone(),
        stream: open.stream,
        buffered: open.buffered,
        id: rand::random::<u64>() | 1,
    });
    tokio::select! {
        why = link.flush_forever() => why,
        _ = stop.changed() => "this stage is stopping".into(),
    }
}

/// Stage 0: sends a probe around the ring, which times its hops (the ring's state comes from
/// heartbeats, not from probes), and sweeps sequences whose caller left or that wait in vain.
pub(super) async fn probe_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let Some(head) = shared.head.clone() else {
        return;
    };
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    let mut probe_seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        probe_seq += 1;
        if shared.config.stages.len() > 1 {
            head.probe_sent(probe_seq);
            shared.forward(&Frame::new(
                FrameKind::Probe,
                &shared.config.pipeline,
                shared.config.generation,
                probe_seq,
            ));
        }
        head.sweep(&shared);
    }
}

/// The agent's ring port: one listener for every pipeline stage the agent runs, each connection
/// handed to the stage its hello names.
pub struct RingMux {
    addr: SocketAddr,
    stages: Mutex<std::collections::HashMap<String, Arc<Shared>>>,
    /// The cluster token, which a peer must prove before it is told a pipeline runs no stage
    /// here.
    token: String,
    /// Connections not yet past their hello: a connection beyond these is closed at once, so
    /// peers that never say who they are cannot hold an unbounded number of tasks and buffers.
    greeting: Arc<tokio::sync::Semaphore>,
}

/// Connections to the ring port at most at once between their accept and their hello.
const MAX_GREETING: usize = 64;

impl RingMux {
    /// Binds `addr` and starts accepting for as long as the runtime runs; peers prove `token`.
    pub async fn bind(addr: &str, token: &str) -> Result<Arc<Self>> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the ring port on {addr}"))?;
        let mux = Arc::new(Self {
            addr: listener.local_addr()?,
            stages: Mutex::new(std::collections::HashMap::new()),
            token: token.to_string(),
            greeting: Arc::new(tokio::sync::Semaphore::new(MAX_GREETING)),
        });
        tokio::spawn(mux.clone().accept_loop(listener));
        Ok(mux)
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub(super) fn register(&self, shared: Arc<Shared>) {
        self.stages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(shared.config.pipeline.clone(), shared);
    }

    pub(super) fn unregister(&self, shared: &Arc<Shared>) {
        let mut stages = self.stages.lock().unwrap_or_else(PoisonError::into_inner);
        if stages
            .get(&shared.config.pipeline)
            .is_some_and(|s| Arc::ptr_eq(s, shared))
        {
            stages.remove(&shared.config.pipeline);
        }
    }

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let mut backoff = BACKOFF_MIN;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    backoff = BACKOFF_MIN;
                    match self.greeting.clone().try_acquire_owned() {
                        Ok(permit) => {
                            tokio::spawn(self.clone().dispatch(stream, peer, permit));
                        }
                        Err(_) => tracing::debug!(
                            %peer,
                            "closed a ring connection: {MAX_GREETING} others are still to say hello"
                        ),
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "accepting a ring connection failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn dispatch(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        greeting: tokio::sync::OwnedSemaphorePermit,
    ) {
        let _ = stream.set_nodelay(true);
        let (read, mut write) = stream.into_split();
        let mut reader = FrameReader::new(read);
        let hello =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::read_hello(&mut reader)).await
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    log_refusal(peer, e.kind(), &e);
                    return;
                }
                Err(_) => {
                    log_refusal(peer, "timeout", &"no hello in time");
                    return;
                }
            };
        drop(greeting);
        let shared = self
            .stages
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hello.pipeline)
            .cloned();
        match shared {
            Some(shared) => serve_inbound(shared, reader, write, peer, Some(hello)).await,
            None => {
                let reason = format!(
                    "pipeline {:?} has no stage on this node (yet)",
                    hello.pipeline
                );
                // Said only to a peer that proves the token: others learn nothing of what runs here.
                let refused = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    handshake::refuse_after_proof(
                        &mut reader,
                        &mut write,
                        &self.token,
                        &hello,
                        &reason,
                    ),
                )
                .await;
                match refused {
                    Ok(e) => log_refusal(peer, e.kind(), &e),
                    Err(_) => log_refusal(peer, "timeout", &"no proof in time"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connections_past_those_still_to_say_hello_are_closed_at_once() {
        use tokio::io::AsyncReadExt;
        let mux = RingMux::bind("127.0.0.1:0", "a token")
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let addr = mux.local_addr();
        let mut silent = Vec::new();
        for _ in 0..MAX_GREETING {
            silent.push(
                TcpStream::connect(addr)
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        // Let the mux take them all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut one_more = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), one_more.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the connection past the cap was not closed: {read:?}"
        );
        // One of them goes away: a new connection is waited for again (until its hello).
        drop(silent.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut next = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let read = tokio::time::timeout(Duration::from_millis(500), next.read(&mut buf)).await;
        assert!(
            read.is_err(),
            "a connection within the cap was closed: {read:?}"
        );
    }
}
