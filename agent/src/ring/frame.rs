//! The ring's wire format: length-prefixed frames with a magic number, a protocol version and a
//! size cap, read the way mini-redis reads its frames (a growing buffer, `Ok(None)` on a clean
//! end of stream, an error on a frame cut short).
//!
//! ```text
//! preamble (12 bytes): magic "CLRG" | version u16 | kind u8 | flags u8 | body length u32
//! body: generation u64 | seq u64 | position u32 | dtype u8 | ndims u8 | dims u32 × ndims
//!       | pipeline len u16 + UTF-8 | meta len u32 + bytes | payload (the rest)
//! ```
//! All integers are little-endian. The payload is a tensor's raw bytes (its dtype and shape in
//! the header), token ids as u32, or nothing; `meta` carries small JSON (sampling parameters,
//! handshake fields, error messages).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use cluster_engine::candle_core::{DType, Device, Tensor};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"CLRG";
/// Version of this wire format; a peer speaking another is refused. Version 2 added heartbeats
/// on each link's return direction.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest body accepted: a 256-token prefill chunk of an 8192-wide f32 model is 8 MiB, so
/// 64 MiB leaves room while refusing absurd lengths before allocating for them.
pub const MAX_BODY_BYTES: u32 = 64 << 20;

/// Largest body of a handshake frame (hello, challenge, proof, accept, refusal): names, nonces
/// and a MAC. Before a peer has proved it holds the cluster token, a stage makes room for no
/// more than this (it made room for [`MAX_BODY_BYTES`]: eight unauthenticated connections
/// took an agent from 55 to 579 MB).
pub const MAX_HANDSHAKE_BODY_BYTES: u32 = 64 << 10;
const PREAMBLE: usize = 12;

/// Flag: this prefill chunk is the prompt's last, so the last stage samples after it.
pub const FLAG_LAST_CHUNK: u8 = 1;
/// Flag: another decode step of the same batched pass follows this frame at once, so the
/// receiver waits for it and keeps the batch together. Older agents ignore it.
pub const FLAG_MORE_FOLLOWS: u8 = 2;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Handshake: the connecting stage names the pipeline, generation and its index, with a nonce.
    Hello = 1,
    /// Handshake: the listening stage's nonce.
    Challenge = 2,
    /// Handshake: the connecting stage's HMAC over both nonces.
    Proof = 3,
    /// Handshake: accepted, with the listener's own HMAC so the connector knows it too.
    Accept = 4,
    /// Handshake: refused, with the reason in `meta`.
    Refuse = 5,
    /// Hidden states (or, into stage 0, token ids) of a prompt chunk.
    Prefill = 10,
    /// Hidden states of one generated token.
    Decode = 11,
    /// A sampled token id, from the last stage back to stage 0.
    Token = 12,
    /// The sequence ended: free its cache.
    Release = 13,
    /// The caller went away: free the sequence's cache.
    Cancel = 14,
    /// A stage failed a sequence (seq set) or lost a link (seq 0); the message is in `meta`.
    Error = 15,
    /// Travels around the ring so stage 0 can time the network's share of a step.
    Probe = 16,
    /// Goes back over a link, from a stage to its predecessor, every few hundred milliseconds:
    /// the stage and those after it are alive, with their passes and links (JSON in `meta`).
    Heartbeat = 17,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<Self> {
        use FrameKind::*;
        Some(match v {
            1 => Hello,
            2 => Challenge,
            3 => Proof,
            4 => Accept,
            5 => Refuse,
            10 => Prefill,
            11 => Decode,
            12 => Token,
            13 => Release,
            14 => Cancel,
            15 => Error,
            16 => Probe,
            17 => Heartbeat,
            _ => return None,
        })
    }
}

/// Element type of a frame's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WireDType {
    /// No tensor.
    None = 0,
    /// f32 hidden states.
    F32 = 1,
    /// f16 hidden states.
    F16 = 2,
    /// bf16 hidden states.
    Bf16 = 3,
    /// Token ids.
    U32 = 4,
}

impl WireDType {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::None,
            1 => Self::F32,
            2 => Self::F16,
            3 => Self::Bf16,
            4 => Self::U32,
            _ => return None,
        })
    }

    fn size(&self) -> usize {
        match self {
            Self::None => 0,
            Self::F16 | Self::Bf16 => 2,
            Self::F32 | Self::U32 => 4,
        }
    }

    fn candle(&self) -> Option<DType> {
        match self {
            Self::F32 => Some(DType::F32),
            Self::F16 => Some(DType::F16),
            Self::Bf16 => Some(DType::BF16),
            Self::U32 => Some(DType::U32),
            Self::None => None,
        }
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// What it carries.
    pub kind: FrameKind,
    /// Bit flags ([`FLAG_LAST_CHUNK`], [`FLAG_MORE_FOLLOWS`]).
    pub flags: u8,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline's placement generation.
    pub generation: u64,
    /// The sequence (0 for frames about the whole ring).
    pub seq: u64,
    /// Position of the first token of the chunk in its sequence.
    pub position: u32,
    /// Element type of the payload.
    pub dtype: WireDType,
    /// Shape of the payload.
    pub shape: Vec<u32>,
    /// Small JSON or text.
    pub meta: Bytes,
    /// Raw bytes of the tensor or token ids.
    pub payload: Bytes,
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic {0:02x?}: not a clusteragent ring connection")]
    BadMagic([u8; 4]),
    /// The peer speaks another version of the protocol.
    #[error("protocol version {0} is not supported (this agent speaks {PROTOCOL_VERSION})")]
    Version(u16),
    /// The body would exceed the cap: [`MAX_BODY_BYTES`], or [`MAX_HANDSHAKE_BODY_BYTES`] before
    /// the peer has proved it holds the token.
    #[error("frame body of {len} bytes exceeds the cap of {cap} bytes{}", if *.cap < MAX_BODY_BYTES { " for a handshake frame" } else { "" })]
    TooLarge {
        /// What the frame's header announced.
        len: u32,
        /// The cap it was read under.
        cap: u32,
    },
    /// The stream ended in the middle of a frame.
    #[error("connection closed in the middle of a frame ({0} bytes buffered)")]
    Truncated(usize),
    /// The body does not parse.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The socket failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// A short name of the error's kind (for counting refusals by kind).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadMagic(_) => "magic",
            Self::Version(_) => "version",
            Self::TooLarge { .. } => "too large",
            Self::Truncated(_) => "truncated",
            Self::Malformed(_) => "malformed",
            Self::Io(_) => "io",
        }
    }
}

impl Frame {
    /// A frame of `kind` with no tensor.
    pub fn new(kind: FrameKind, pipeline: &str, generation: u64, seq: u64) -> Self {
        Self {
            kind,
            flags: 0,
            pipeline: pipeline.to_string(),
            generation,
            seq,
            position: 0,
            dtype: WireDType::None,
            shape: Vec::new(),
            meta: Bytes::new(),
            payload: Bytes::new(),
        }
    }

    /// Sets the JSON or text metadata.
    pub fn with_meta(mut self, meta: impl Into<Bytes>) -> Self {
        self.meta = meta.into();
        self
    }

    /// Puts token ids in the payload.
    pub fn with_tokens(mut self, ids: &[u32]) -> Self {
        let mut b = BytesMut::with_capacity(ids.len() * 4);
        for id in ids {
            b.put_u32_le(*id);
        }
        self.dtype = WireDType::U32;
        self.shape = vec![ids.len() as u32];
        self.payload = b.freeze();
        self
    }

    /// Puts a tensor's raw little-endian bytes in the payload.
    pub fn with_tensor(mut self, t: &Tensor) -> Result<Self, FrameError> {
        let err = |e: cluster_engine::candle_core::Error| {
            FrameError::Malformed(format!("tensor: {}", cluster_engine::error::plain(e)))
        };
        let flat = t
            .flatten_all()
            .map_err(err)?
            .to_device(&Device::Cpu)
            .map_err(err)?;
        let mut b = BytesMut::with_capacity(flat.elem_count() * t.dtype().size_in_bytes());
        let dtype = match t.dtype() {
            DType::F32 => {
                for v in flat.to_vec1::<f32>().map_err(err)? {
                    b.put_f32_le(v);
                }
                WireDType::F32
            }
            DType::F16 => {
                for v in flat.to_vec1::<half::f16>().map_err(err)? {
                    b.put_slice(&v.to_le_bytes());
                }
                WireDType::F16
            }
            DType::BF16 => {
                for v in flat.to_vec1::<half::bf16>().map_err(err)? {
                    b.put_slice(&v.to_le_bytes());
                }
                WireDType::Bf16
            }
            other => return Err(FrameError::Malformed(format!("no wire type for {other:?}"))),
        };
        self.dtype = dtype;
        self.shape = t.dims().iter().map(|d| *d as u32).collect();
        self.payload = b.freeze();
        Ok(self)
    }

    /// The payload as token ids.
    pub fn tokens(&self) -> Result<Vec<u32>, FrameError> {
        if self.dtype != WireDType::U32 {
            return Err(FrameError::Malformed(format!(
                "expected token ids, got {:?}",
                self.dtype
            )));
        }
        Ok(self
            .payload
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }

    /// The payload as a tensor on the CPU (copied: the bytes need not be aligned for it).
    pub fn tensor(&self) -> Result<Tensor, FrameError> {
        let dtype = self
            .dtype
            .candle()
            .ok_or_else(|| FrameError::Malformed("frame carries no tensor".into()))?;
        let shape: Vec<usize> = self.shape.iter().map(|d| *d as usize).collect();
        Tensor::from_raw_buffer(&self.payload, dtype, &shape, &Device::Cpu).map_err(|e| {
            FrameError::Malformed(format!("tensor: {}", cluster_engine::error::plain(e)))
        })
    }

    /// The metadata as text.
    pub fn meta_text(&self) -> String {
        String::from_utf8_lossy(&self.meta).into_owned()
    }

    /// The whole frame as bytes.
    pub fn encode(&self) -> Bytes {
        let body_len = 8
            + 8
            + 4
            + 1
            + 1
            + 4 * self.shape.len()
            + 2
            + self.pipeline.len()
            + 4
            + self.meta.len()
            + self.payload.len();
        let mut b = BytesMut::with_capacity(PREAMBLE + body_len);
        b.put_slice(&MAGIC);
        b.put_u16_le(PROTOCOL_VERSION);
        b.put_u8(self.kind as u8);
        b.put_u8(self.flags);
        b.put_u32_le(body_len as u32);
        b.put_u64_le(self.generation);
        b.put_u64_le(self.seq);
        b.put_u32_le(self.position);
        b.put_u8(self.dtype as u8);
        b.put_u8(self.shape.len() as u8);
        for d in &self.shape {
            b.put_u32_le(*d);
        }
        b.put_u16_le(self.pipeline.len() as u16);
        b.put_slice(self.pipeline.as_bytes());
        b.put_u32_le(self.meta.len() as u32);
        b.put_slice(&self.meta);
        b.put_slice(&self.payload);
        b.freeze()
    }

    /// Parses one frame from the front of `buf`, if a whole one is there.
    pub fn parse(buf: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        Self::parse_within(buf, MAX_BODY_BYTES)
    }

    /// [`Frame::parse`] for a frame whose body may hold at most `cap` bytes: a longer one is
    /// refused from its header, before any room is made for its body.
    pub fn parse_within(buf: &mut BytesMut, cap: u32) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        if buf[..4] != MAGIC {
            return Err(FrameError::BadMagic([buf[0], buf[1], buf[2], buf[3]]));
        }
        if buf.len() < PREAMBLE {
            return Ok(None);
        }
        let version = u16::from_le_bytes([buf[4], buf[5]]);
        if version != PROTOCOL_VERSION {
            return Err(FrameError::Version(version));
        }
        let body_len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
        if body_len > cap {
            return Err(FrameError::TooLarge { len: body_len, cap });
        }
        if buf.len() < PREAMBLE + body_len as usize {
            buf.reserve(PREAMBLE + body_len as usize - buf.len());
            return Ok(None);
        }
        let kind_byte = buf[6];
        let flags = buf[7];
        buf.advance(PREAMBLE);
        let mut body = buf.split_to(body_len as usize).freeze();
        let kind = FrameKind::from_u8(kind_byte)
            .ok_or_else(|| FrameError::Malformed(format!("unknown frame kind {kind_byte}")))?;
        let short = || FrameError::Malformed("body shorter than its fields".into());
        let need = |b: &Bytes, n: usize| {
            if b.remaining() < n {
                Err(short())
            } else {
                Ok(())
            }
        };
        need(&body, 22)?;
        let generation = body.get_u64_le();
        let seq = body.get_u64_le();
        let position = body.get_u32_le();
        let dtype_byte = body.get_u8();
        let dtype = WireDType::from_u8(dtype_byte)
            .ok_or_else(|| FrameError::Malformed(format!("unknown dtype {dtype_byte}")))?;
        let ndims = body.get_u8() as usize;
        need(&body, 4 * ndims + 2)?;
        let shape: Vec<u32> = (0..ndims).map(|_| body.get_u32_le()).collect();
        let name_len = body.get_u16_le() as usize;
        need(&body, name_len + 4)?;
        let pipeline = String::from_utf8(body.split_to(name_len).to_vec())
            .map_err(|_| FrameError::Malformed("pipeline name is not UTF-8".into()))?;
        let meta_len = body.get_u32_le() as usize;
        need(&body, meta_len)?;
        let meta = body.split_to(meta_len);
        let payload = body;
        let elements = shape
            .iter()
            .try_fold(1usize, |acc, d| acc.checked_mul(*d as usize));
        let expected = elements
            .and_then(|n| n.checked_mul(dtype.size()))
            .unwrap_or(usize::MAX);
        if (dtype != WireDType::None || !payload.is_empty()) && expected != payload.len() {
            return Err(FrameError::Malformed(format!(
                "payload of {} bytes does not match shape {shape:?} of {dtype:?}",
                payload.len()
            )));
        }
        Ok(Some(Frame {
            kind,
            flags,
            pipeline,
            generation,
            seq,
            position,
            dtype,
            shape,
            meta,
            payload,
        }))
    }
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    stream: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a stream.
    pub fn new(stream: R) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// The stream and the bytes already read from it but not yet parsed.
    pub fn into_parts(self) -> (R, BytesMut) {
        (self.stream, self.buf)
    }

    /// The next frame; `Ok(None)` when the peer closed cleanly between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        self.read_frame_within(MAX_BODY_BYTES).await
    }

    /// [`FrameReader::read_frame`] for a frame whose body may hold at most `cap` bytes.
    pub async fn read_frame_within(&mut self, cap: u32) -> Result<Option<Frame>, FrameError> {
        loop {
            if let Some(frame) = Frame::parse_within(&mut self.buf, cap)? {
                return Ok(Some(frame));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::Truncated(self.buf.len()))
                };
            }
        }
    }
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> std::io::Result<()> {
    w.write_all(&frame.encode()).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frames of every payload kind, as the ring sends them, to damage.
    fn seeds() -> Vec<Vec<u8>> {
        let t = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 1.0, 2.0]], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let half = t.to_dtype(DType::BF16).unwrap();
        [
            Frame::new(FrameKind::Prefill, "qwen", 3, 42)
                .with_tensor(&t)
                .unwrap()
                .with_meta("{\"a\":1}"),
            Frame::new(FrameKind::Decode, "p", 1, 2)
                .with_tensor(&half)
                .unwrap(),
            Frame::new(FrameKind::Token, "qwen", 3, 42).with_tokens(&[5, 70000]),
            Frame::new(FrameKind::Hello, "pipeline-name", 9, 0).with_meta("{\"nonce\":\"00ff\"}"),
            Frame::new(FrameKind::Release, "", 0, 7),
        ]
        .iter()
        .map(|f| f.encode().to_vec())
        .collect()
    }

    proptest::proptest! {
        #![proptest_config(cluster_fixtures::damage::config())]

        /// Fuzzing as a test: whatever bytes a peer sends, parsing ends in frames, a wait for
        /// more bytes or an error, never a panic; a frame that parses gives its tokens or
        /// tensor (or an error) and encodes back to what was parsed; and nothing is held for
        /// a body past the cap. Failures shrink and are kept in
        /// `frame.regressions` beside this file.
        #[test]
        fn damaged_frames_parse_or_are_refused(
            which in 0usize..5,
            damage in cluster_fixtures::damage::damages(48, 6),
            split in 0usize..64,
        ) {
            let bytes = cluster_fixtures::damage::apply(&seeds()[which], &damage);
            // Two frames back to back, arriving in two reads, as a stream delivers them.
            let stream = [bytes.clone(), bytes].concat();
            let cut = split.min(stream.len());
            let mut buf = BytesMut::from(&stream[..cut]);
            let mut rest = &stream[cut..];
            loop {
                match Frame::parse(&mut buf) {
                    Ok(Some(frame)) => {
                        let _ = frame.tokens();
                        let _ = frame.tensor();
                        let mut again = BytesMut::from(&frame.encode()[..]);
                        let back = Frame::parse(&mut again);
                        proptest::prop_assert!(
                            matches!(&back, Ok(Some(f)) if *f == frame) && again.is_empty(),
                            "{frame:?} encoded back as {back:?}"
                        );
                    }
                    Ok(None) if !rest.is_empty() => {
                        buf.extend_from_slice(rest);
                        rest = &[];
                    }
                    Ok(None) | Err(_) => break,
                }
                proptest::prop_assert!(
                    buf.capacity() <= stream.len() + PREAMBLE + MAX_BODY_BYTES as usize,
                    "{} bytes held for a stream of {}",
                    buf.capacity(),
                    stream.len()
                );
            }
        }
    }

    #[test]
    fn frames_round_trip_with_tensors_and_tokens() {
        let t = Tensor::new(&[[1.5f32, -2.0, 3.25], [0.0, 1.0, 2.0]], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut f = Frame::new(FrameKind::Prefill, "qwen", 3, 42)
            .with_tensor(&t)
            .unwrap()
            .with_meta("{\"a\":1}");
        f.position = 7;
        f.flags = FLAG_LAST_CHUNK;
        let mut buf = BytesMut::from(&f.encode()[..]);
        let back = Frame::parse(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        assert_eq!(back, f);
        assert_eq!(
            back.tensor().unwrap().to_vec3::<f32>().unwrap(),
            t.to_vec3::<f32>().unwrap()
        );
        let tok = Frame::new(FrameKind::Token, "qwen", 3, 42).with_tokens(&[5, 70000]);
        let mut buf = BytesMut::from(&tok.encode()[..]);
        assert_eq!(
            Frame::parse(&mut buf).unwrap().unwrap().tokens().unwrap(),
            vec![5, 70000]
        );
    }

    #[test]
    fn partial_frames_wait_and_bad_ones_fail() {
        let bytes = Frame::new(FrameKind::Probe, "p", 0, 0).encode();
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert!(Frame::parse(&mut buf).unwrap().is_none());
        let mut bad = BytesMut::from(&b"HTTP/1.1 200 OK\r\n"[..]);
        assert!(matches!(
            Frame::parse(&mut bad),
            Err(FrameError::BadMagic(_))
        ));
        let mut v = bytes.to_vec();
        v[4] = 9;
        assert!(matches!(
            Frame::parse(&mut BytesMut::from(&v[..])),
            Err(FrameError::Version(9))
        ));
        let mut v = bytes.to_vec();
        v[8..12].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
        assert!(matches!(
            Frame::parse(&mut BytesMut::from(&v[..])),
            Err(FrameError::TooLarge { .. })
        ));
        // Within the cap of frames in general, over that of a handshake's.
        let mut v = bytes.to_vec();
        v[8..12].copy_from_slice(&MAX_BODY_BYTES.to_le_bytes());
        let err = Frame::parse_within(&mut BytesMut::from(&v[..12]), MAX_HANDSHAKE_BODY_BYTES)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("exceeds the cap of 65536 bytes for a handshake frame"),
            "{err}"
        );
        // A shape that promises more bytes than the payload holds.
        let mut f = Frame::new(FrameKind::Decode, "p", 0, 1).with_tokens(&[1, 2]);
        f.shape = vec![3];
        assert!(matches!(
            Frame::parse(&mut BytesMut::from(&f.encode()[..])),
            Err(FrameError::Malformed(_))
        ));
    }
}
