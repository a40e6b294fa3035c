//! The compute thread of a stage: it owns the stage's work, takes jobs from a bounded queue in
//! arrival order (whichever sequence's frame came first), and hands results to the link toward
//! the successor. Compute never runs on the async runtime's threads.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use cluster_api::SamplingParams;
use cluster_engine::sampling::Sampler;
use cluster_engine::{SeqId, Stage, StageInput, StageOutput};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::frame::{FLAG_LAST_CHUNK, Frame, FrameKind};
use super::node::Shared;

/// Jobs for the compute thread; the queue holding them is bounded (see [`QUEUE_CAPACITY`]).
#[derive(Debug)]
pub enum Job {
    /// A prefill chunk or decode step from the predecessor (stages after the first).
    Frame(Frame),
    /// A chunk of token ids from the head's generation loop (stage 0 only).
    Tokens {
        /// The sequence.
        seq: SeqId,
        /// Position of the first token.
        position: usize,
        /// The ids.
        tokens: Vec<u32>,
        /// Prefill, or a decode step.
        kind: FrameKind,
        /// Whether the last stage samples after this chunk.
        last_chunk: bool,
        /// How the last stage should sample; sent with the first chunk.
        start: Option<Bytes>,
    },
    /// Free a sequence here and, unless this is the last stage, tell the successor.
    Release {
        /// The sequence.
        seq: SeqId,
        /// `Release` or `Cancel`, passed along.
        kind: FrameKind,
    },
    /// A link went down: every sequence in flight is lost, free them all.
    DropAll,
}

/// How many jobs may wait: every sequence has at most one decode step queued at a time, so this
/// bounds the prefill chunks of many long prompts arriving at once; beyond it senders wait.
pub const QUEUE_CAPACITY: usize = 1024;

/// What the last stage needs to sample a sequence, sent with its first chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SequenceStart {
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Ids at and past this have no text and are never sampled.
    pub vocab_limit: usize,
    /// The prompt's tail, for the repetition penalty.
    pub context: Vec<u32>,
}

/// Runs the compute loop until the queue closes.
pub fn run(shared: Arc<Shared>, stage: Arc<Stage>, mut jobs: mpsc::Receiver<Job>) {
    let mut samplers: HashMap<SeqId, Sampler> = HashMap::new();
    while let Some(job) = jobs.blocking_recv() {
        match job {
            Job::Frame(frame) => {
                let input = match frame.tensor() {
                    Ok(t) => StageInput::Hidden(t),
                    Err(e) => {
                        shared.fail_sequence(frame.seq, &format!("bad hidden states: {e}"));
                        continue;
                    }
                };
                let last_chunk =
                    frame.kind == FrameKind::Decode || frame.flags & FLAG_LAST_CHUNK != 0;
                step(
                    &shared,
                    &stage,
                    &mut samplers,
                    frame.seq,
                    frame.position as usize,
                    input,
                    frame.kind,
                    last_chunk,
                    frame.meta,
                );
            }
            Job::Tokens {
                seq,
                position,
                tokens,
                kind,
                last_chunk,
                start,
            } => {
                let meta = start.unwrap_or_default();
                step(
                    &shared,
                    &stage,
                    &mut samplers,
                    seq,
                    position,
                    StageInput::Tokens(tokens),
                    kind,
                    last_chunk,
                    meta,
                );
            }
            Job::Release { seq, kind } => {
                stage.release(seq);
                samplers.remove(&seq);
                if !stage.is_last() {
                    shared.send(Frame::new(
                        kind,
                        &shared.config.pipeline,
                        shared.config.generation,
                        seq,
                    ));
                }
            }
            Job::DropAll => {
                let n = stage.release_all();
                samplers.clear();
                if n > 0 {
                    tracing::warn!(
                        stage = shared.index,
                        sequences = n,
                        "freed every sequence's cache after a link went down"
                    );
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn step(
    shared: &Shared,
    stage: &Stage,
    samplers: &mut HashMap<SeqId, Sampler>,
    seq: SeqId,
    position: usize,
    input: StageInput,
    kind: FrameKind,
    last_chunk: bool,
    meta: Bytes,
) {
    if position == 0 && stage.is_last() {
        match serde_json::from_slice::<SequenceStart>(&meta)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                Sampler::new(&s.sampling, s.vocab_limit, &s.context).map_err(|e| e.to_string())
            }) {
            Ok(sampler) => {
                samplers.insert(seq, sampler);
            }
            Err(e) => {
                shared.fail_sequence(
                    seq,
                    &format!("the first chunk carries no usable sampling parameters: {e}"),
                );
                return;
            }
        }
    }
    let started = std::time::Instant::now();
    let output = stage.forward(seq, position, input);
    shared.metrics.record_compute(started.elapsed());
    match output {
        Ok(StageOutput::Hidden(h)) => {
            let mut frame =
                Frame::new(kind, &shared.config.pipeline, shared.config.generation, seq);
            frame.position = position as u32;
            frame.flags = if last_chunk { FLAG_LAST_CHUNK } else { 0 };
            frame.meta = meta;
            match frame.with_tensor(&h) {
                Ok(frame) => shared.send(frame),
                Err(e) => shared.fail_sequence(seq, &format!("encoding hidden states: {e}")),
            }
        }
        Ok(StageOutput::Logits(logits)) => {
            if !last_chunk {
                return;
            }
            let Some(sampler) = samplers.get_mut(&seq) else {
                shared.fail_sequence(
                    seq,
                    "no sampler for this sequence (its first chunk never reached the last stage)",
                );
                return;
            };
            match sampler.sample(&logits) {
                Ok(id) => shared.deliver_token(seq, id),
                Err(e) => shared.fail_sequence(seq, &format!("sampling: {e}")),
            }
        }
        Err(e) => {
            samplers.remove(&seq);
            shared.fail_sequence(seq, &e.to_string());
        }
    }
}
