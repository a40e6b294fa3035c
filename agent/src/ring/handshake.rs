//! Opening a ring connection: both ends prove they know the cluster token by HMAC over fresh
//! nonces (the token never crosses the wire), and agree on protocol version, pipeline,
//! placement generation and which stage is connecting.
//!
//! ```text
//! connector                                   listener
//!   Hello {from, nonce_c}  ─────────────────▶
//!                          ◀─────────────────  Challenge {nonce_s}
//!   Proof {mac_c}          ─────────────────▶  checks mac_c against what the hello claims,
//!                                              then pipeline, generation, from
//!                          ◀─────────────────  Accept {mac_s}        (or Refuse {reason})
//!   checks mac_s
//! ```
//!
//! A peer without the token is refused before it learns whether the pipeline runs here or its
//! generation.

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncWrite};

use super::frame::{Frame, FrameKind, FrameReader, write_frame};

type HmacSha256 = Hmac<Sha256>;

/// What both ends must agree on.
#[derive(Debug, Clone)]
pub struct RingIdentity {
    /// Pipeline name.
    pub pipeline: String,
    /// Placement generation.
    pub generation: u64,
    /// The cluster token (kept here, never sent).
    pub token: String,
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The other end refused, saying why.
    #[error("refused by the peer: {0}")]
    Refused(String),
    /// The peer broke the protocol or failed to prove the token.
    #[error("{0}")]
    Protocol(String),
    /// Reading or writing frames failed.
    #[error(transparent)]
    Frame(#[from] super::frame::FrameError),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl HandshakeError {
    /// A short name of the error's kind (for counting refusals by kind).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Refused(_) => "refused",
            Self::Protocol(_) => "protocol",
            Self::Frame(f) => f.kind(),
            Self::Io(_) => "io",
        }
    }
}

fn nonce() -> String {
    let mut b = [0u8; 16];
    rand::rng().fill_bytes(&mut b);
    hex(&b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// HMAC over everything the connection is about, with a role label so that a listener's answer
/// cannot be replayed as a connector's proof.
fn mac(id: &RingIdentity, role: &str, from: usize, nonce_c: &str, nonce_s: &str) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut m = HmacSha256::new_from_slice(id.token.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for part in [
        role,
        &id.pipeline,
        &id.generation.to_string(),
        &from.to_string(),
        nonce_c,
        nonce_s,
    ] {
        m.update(&(part.len() as u32).to_le_bytes());
        m.update(part.as_bytes());
    }
    m
}

fn meta(frame: &Frame) -> Value {
    serde_json::from_slice(&frame.meta).unwrap_or(Value::Null)
}

fn field<'a>(v: &'a Value, key: &str, kind: FrameKind) -> Result<&'a str, HandshakeError> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| HandshakeError::Protocol(format!("{kind:?} frame lacks `{key}`")))
}

async fn expect<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    kind: FrameKind,
) -> Result<Frame, HandshakeError> {
    let frame = reader
        .read_frame_within(super::frame::MAX_HANDSHAKE_BODY_BYTES)
        .await?
        .ok_or_else(|| {
            HandshakeError::Protocol(format!("connection closed while waiting for {kind:?}"))
        })?;
    if frame.kind == FrameKind::Refuse {
        return Err(HandshakeError::Refused(frame.meta_text()));
    }
    if frame.kind != kind {
        return Err(HandshakeError::Protocol(format!(
            "expected {kind:?}, got {:?}",
            frame.kind
        )));
    }
    Ok(frame)
}

/// The connecting side: stage `from` opening its link to its successor.
pub async fn connect<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    id: &RingIdentity,
    from: usize,
) -> Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let nonce_c = nonce();
    let hello = Frame::new(FrameKind::Hello, &id.pipeline, id.generation, 0)
        .with_meta(json!({"from": from, "nonce": nonce_c}).to_string());
    write_frame(writer, &hello).await?;
    let challenge = expect(reader, FrameKind::Challenge).await?;
    let nonce_s = field(&meta(&challenge), "nonce", FrameKind::Challenge)?.to_string();
    let proof = mac(id, "connector", from, &nonce_c, &nonce_s)
        .finalize()
        .into_bytes();
    let proof = Frame::new(FrameKind::Proof, &id.pipeline, id.generation, 0)
        .with_meta(json!({"mac": hex(&proof)}).to_string());
    write_frame(writer, &proof).await?;
    let accept = expect(reader, FrameKind::Accept).await?;
    let theirs = unhex(field(&meta(&accept), "mac", FrameKind::Accept)?)
        .ok_or_else(|| HandshakeError::Protocol("Accept mac is not hex".into()))?;
    mac(id, "listener", from, &nonce_c, &nonce_s)
        .verify_slice(&theirs)
        .map_err(|_| {
            HandshakeError::Protocol(
                "the listener could not prove it knows the cluster token".into(),
            )
        })
}

/// The listening side: accepts only stage `expected_from` of the same pipeline and generation.
/// On refusal it tells the peer why before returning the error.
pub async fn accept<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    id: &RingIdentity,
    expected_from: usize,
) -> Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let hello = read_hello(reader).await?;
    accept_hello(reader, writer, id, expected_from, hello).await
}

/// Reads the connector's first frame, which names the pipeline it wants: an agent that serves
/// several pipelines on one port picks the stage by it.
pub async fn read_hello<R: AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
) -> Result<Frame, HandshakeError> {
    expect(reader, FrameKind::Hello).await
}

/// The listening side after [`read_hello`].
///
/// The connector proves the token before it learns anything of this stage: its proof is checked
/// against the pipeline, generation and stage its own hello names, and only then are those
/// compared with this stage's, so a peer without the token learns neither whether the pipeline
/// runs here nor its generation.
pub async fn accept_hello<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    id: &RingIdentity,
    expected_from: usize,
    hello: Frame,
) -> Result<(), HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let proven = prove(reader, writer, &id.token, &hello).await?;
    let refusal = if hello.pipeline != id.pipeline {
        Some(format!(
            "pipeline {:?} is not served here (this is {:?})",
            hello.pipeline, id.pipeline
        ))
    } else if hello.generation != id.generation {
        Some(format!(
            "pipeline {} generation {} does not match this stage's generation {}",
            id.pipeline, hello.generation, id.generation
        ))
    } else if proven.from != expected_from {
        Some(format!(
            "only stage {expected_from} may connect here, not {}",
            proven.from
        ))
    } else {
        None
    };
    if let Some(reason) = refusal {
        refuse(writer, id, &reason).await;
        return Err(HandshakeError::Refused(reason));
    }
    let ours = mac(
        id,
        "listener",
        expected_from,
        &proven.nonce_c,
        &proven.nonce_s,
    )
    .finalize()
    .into_bytes();
    let accept = Frame::new(FrameKind::Accept, &id.pipeline, id.generation, 0)
        .with_meta(json!({"mac": hex(&ours)}).to_string());
    write_frame(writer, &accept).await?;
    Ok(())
}

/// A connector that proved the token for what its hello claims.
struct Proven {
    /// What its hello claims, with the token it proved.
    claimed: RingIdentity,
    from: usize,
    nonce_c: String,
    nonce_s: String,
}

/// Challenges the connector of `hello` and checks its proof against what the hello claims
/// (its pipeline, generation and stage) under `token`. A connector that cannot prove it is
/// refused with nothing about this node but that.
async fn prove<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    token: &str,
    hello: &Frame,
) -> Result<Proven, HandshakeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let claimed = RingIdentity {
        pipeline: hello.pipeline.clone(),
        generation: hello.generation,
        token: token.to_string(),
    };
    let m = meta(hello);
    let nonce_c = field(&m, "nonce", FrameKind::Hello)?.to_string();
    let from = m
        .get("from")
        .and_then(Value::as_u64)
        .and_then(|f| usize::try_from(f).ok())
        .ok_or_else(|| HandshakeError::Protocol("Hello frame lacks `from`".into()))?;
    let nonce_s = nonce();
    let challenge = Frame::new(
        FrameKind::Challenge,
        &claimed.pipeline,
        claimed.generation,
        0,
    )
    .with_meta(json!({"nonce": nonce_s}).to_string());
    write_frame(writer, &challenge).await?;
    let proof = expect(reader, FrameKind::Proof).await?;
    let theirs = unhex(field(&meta(&proof), "mac", FrameKind::Proof)?).unwrap_or_default();
    if mac(&claimed, "connector", from, &nonce_c, &nonce_s)
        .verify_slice(&theirs)
        .is_err()
    {
        let reason = "the connecting stage could not prove it knows the cluster token".to_string();
        refuse(writer, &claimed, &reason).await;
        return Err(HandshakeError::Refused(reason));
    }
    Ok(Proven {
        claimed,
        from,
        nonce_c,
        nonce_s,
    })
}

/// Refuses the connector of `hello` (read by [`read_hello`]) for `reason`, told only once it has
/// proved it holds `token`: the agent's ring port answers so for a pipeline it runs no stage of.
pub async fn refuse_after_proof<R, W>(
    reader: &mut FrameReader<R>,
    writer: &mut W,
    token: &str,
    hello: &Frame,
    reason: &str,
) -> HandshakeError
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    match prove(reader, writer, token, hello).await {
        Ok(proven) => {
            refuse(writer, &proven.claimed, reason).await;
            HandshakeError::Refused(reason.to_string())
        }
        Err(e) => e,
    }
}

/// Tells the connector why it is refused (best effort: it may be gone already).
pub async fn refuse<W: AsyncWrite + Unpin>(writer: &mut W, id: &RingIdentity, reason: &str) {
    let frame =
        Frame::new(FrameKind::Refuse, &id.pipeline, id.generation, 0).with_meta(reason.to_string());
    // The peer may already be gone; the refusal is logged by the caller either way.
    let _ = write_frame(writer, &frame).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ident(token: &str, generation: u64) -> RingIdentity {
        RingIdentity {
            pipeline: "qwen".into(),
            generation,
            token: token.into(),
        }
    }

    async fn pair(
        client: RingIdentity,
        server: RingIdentity,
        from: usize,
    ) -> (Result<(), HandshakeError>, Result<(), HandshakeError>) {
        let (a, b) = tokio::io::duplex(4096);
        let (ar, mut aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let c = async move { connect(&mut FrameReader::new(ar), &mut aw, &client, from).await };
        let s = async move { accept(&mut FrameReader::new(br), &mut bw, &server, 1).await };
        tokio::join!(c, s)
    }

    /// Runs one side of a handshake (the listener's, or the connector's) against `peer`'s
    /// bytes, then the end of the stream, writing into nothing; `None` if it has not ended
    /// within five seconds.
    fn against(listener: bool, peer: Vec<u8>) -> Option<Result<(), HandshakeError>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let id = ident("secret", 2);
        rt.block_on(async {
            let mut reader = FrameReader::new(&peer[..]);
            let mut sink = tokio::io::sink();
            let bound = std::time::Duration::from_secs(5);
            if listener {
                tokio::time::timeout(bound, accept(&mut reader, &mut sink, &id, 1))
                    .await
                    .ok()
            } else {
                tokio::time::timeout(bound, connect(&mut reader, &mut sink, &id, 1))
                    .await
                    .ok()
            }
        })
    }

    /// What a peer that does not know the token can send at each turn, encoded.
    fn frames(kinds: &[(FrameKind, Value)]) -> Vec<u8> {
        kinds
            .iter()
            .flat_map(|(kind, meta)| {
                Frame::new(*kind, "qwen", 2, 0)
                    .with_meta(meta.to_string())
                    .encode()
                    .to_vec()
            })
            .collect()
    }

    proptest::proptest! {
        #![proptest_config(cluster_fixtures::damage::config())]

        /// Fuzzing as a test: a listener fed a connector's frames, damaged, and a connector fed
        /// a listener's, neither knowing the token, must each end (within five seconds, the
        /// stream ending after them) with an error, never a panic and never a link.
        #[test]
        fn damaged_handshakes_end_refused(
            listener in proptest::prelude::any::<bool>(),
            damage in cluster_fixtures::damage::damages(96, 6),
        ) {
            let mac = "ab".repeat(32);
            let peer = if listener {
                frames(&[
                    (FrameKind::Hello, json!({"from": 1, "nonce": "00ff"})),
                    (FrameKind::Proof, json!({"mac": mac})),
                ])
            } else {
                frames(&[
                    (FrameKind::Challenge, json!({"nonce": "ff00"})),
                    (FrameKind::Accept, json!({"mac": mac})),
                ])
            };
            let outcome = against(listener, cluster_fixtures::damage::apply(&peer, &damage));
            proptest::prop_assert!(
                matches!(outcome, Some(Err(_))),
                "{} ended {outcome:?} after {damage:?}",
                if listener { "listener" } else { "connector" }
            );
        }
    }

    #[tokio::test]
    async fn the_same_token_connects() {
        let (c, s) = pair(ident("secret", 2), ident("secret", 2), 1).await;
        assert!(c.is_ok() && s.is_ok(), "{c:?} {s:?}");
    }

    #[tokio::test]
    async fn a_wrong_token_generation_or_stage_is_refused() {
        let (c, s) = pair(ident("guess", 2), ident("secret", 2), 1).await;
        assert!(c.unwrap_err().to_string().contains("could not prove"));
        assert!(s.is_err());
        let (c, _) = pair(ident("secret", 1), ident("secret", 2), 1).await;
        assert!(
            c.unwrap_err()
                .to_string()
                .contains("generation 1 does not match")
        );
        let (c, _) = pair(ident("secret", 2), ident("secret", 2), 0).await;
        assert!(
            c.unwrap_err()
                .to_string()
                .contains("only stage 1 may connect")
        );
    }

    #[tokio::test]
    async fn a_peer_without_the_token_learns_nothing_of_the_stage() {
        // A wrong token and a wrong generation: told only that the proof failed.
        let (c, _) = pair(ident("guess", 7), ident("secret", 2), 1).await;
        let err = c.unwrap_err().to_string();
        assert!(
            err.contains("could not prove") && !err.contains("generation") && !err.contains('2'),
            "{err}"
        );
        // The ring port's answer for a pipeline it runs no stage of, after a proof or without.
        for (token, told) in [("secret", true), ("guess", false)] {
            let (a, b) = tokio::io::duplex(4096);
            let (ar, mut aw) = tokio::io::split(a);
            let (br, mut bw) = tokio::io::split(b);
            let client = ident(token, 3);
            let c = async move { connect(&mut FrameReader::new(ar), &mut aw, &client, 0).await };
            let s = async move {
                let mut reader = FrameReader::new(br);
                let hello = read_hello(&mut reader).await.unwrap();
                refuse_after_proof(&mut reader, &mut bw, "secret", &hello, "no stage here").await
            };
            let (c, s) = tokio::join!(c, s);
            let err = c.unwrap_err().to_string();
            assert_eq!(err.contains("no stage here"), told, "{token}: {err}");
            assert!(matches!(s, HandshakeError::Refused(_)), "{s:?}");
        }
    }
}
