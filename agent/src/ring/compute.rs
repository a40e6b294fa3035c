//! The compute thread of a stage: it owns the stage's work, takes jobs from a bounded queue in
//! arrival order (whichever sequence's frame came first), and hands results to the link toward
//! the successor. Compute never runs on the async runtime's threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// The stage is being unloaded: free everything and end the thread, which drops its
    /// hold on the weights.
    Stop,
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

/// Most decode steps run as one batched forward pass: enough to keep a stage busy with many
/// sequences, few enough that one pass stays short.
pub const MAX_BATCH: usize = 16;

/// Waits for the next job, first polling for up to `spin` (yielding the core to the threads
/// that deliver jobs), then sleeping.
///
/// Between two steps of a sequence a stage waits for the other stages, a few milliseconds. A
/// thread that sleeps for that long lets a virtual CPU halt, and waking it costs more than the
/// network hop: on this project's 2-core VM, polling raised one sequence through a 2-stage ring
/// from 0.83 to 0.89-0.93 of one process and four sequences from 1.5-1.65x to 2.05-2.15x
/// (`clusteragent bench-ring`, two runs each). After `spin` without work the thread sleeps, so
/// an idle stage costs no CPU.
fn next_job(jobs: &mut mpsc::Receiver<Job>, spin: Duration) -> Option<Job> {
    let start = Instant::now();
    loop {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) => {
                if start.elapsed() >= spin {
                    return jobs.blocking_recv();
                }
                std::thread::yield_now();
            }
        }
    }
}

/// A job's sequence, when it is a decode step (which may join a batch).
fn decode_seq(job: &Job) -> Option<SeqId> {
    match job {
        Job::Frame(f) if f.kind == FrameKind::Decode => Some(f.seq),
        Job::Tokens {
            seq,
            kind: FrameKind::Decode,
            ..
        } => Some(*seq),
        _ => None,
    }
}

/// Runs the compute loop until the queue closes. Decode steps waiting together (of different
/// sequences, with nothing else queued between them) run as one batch.
pub fn run(shared: Arc<Shared>, stage: Arc<Stage>, mut jobs: mpsc::Receiver<Job>, spin: Duration) {
    let mut samplers: HashMap<SeqId, Sampler> = HashMap::new();
    let mut held: Option<Job> = None;
    loop {
        let job = match held.take() {
            Some(j) => j,
            None => match next_job(&mut jobs, spin) {
                Some(j) => j,
                None => return,
            },
        };
        if decode_seq(&job).is_some() {
            let mut batch = vec![job];
            while batch.len() < MAX_BATCH {
                let Ok(next) = jobs.try_recv() else { break };
                match decode_seq(&next) {
                    Some(seq) if !batch.iter().any(|b| decode_seq(b) == Some(seq)) => {
                        batch.push(next)
                    }
                    _ => {
                        held = Some(next);
                        break;
                    }
                }
            }
            decode_batch(&shared, &stage, &mut samplers, batch);
            continue;
        }
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
                let step = Step {
                    seq: frame.seq,
                    position: frame.position as usize,
                    kind: frame.kind,
                    last_chunk,
                    meta: frame.meta,
                };
                single(&shared, &stage, &mut samplers, step, input);
            }
            Job::Tokens {
                seq,
                position,
                tokens,
                kind,
                last_chunk,
                start,
            } => {
                let step = Step {
                    seq,
                    position,
                    kind,
                    last_chunk,
                    meta: start.unwrap_or_default(),
                };
                single(
                    &shared,
                    &stage,
                    &mut samplers,
                    step,
                    StageInput::Tokens(tokens),
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
            Job::Stop => {
                stage.release_all();
                return;
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

/// Where a chunk's result goes.
struct Step {
    seq: SeqId,
    position: usize,
    kind: FrameKind,
    last_chunk: bool,
    meta: Bytes,
}

fn single(
    shared: &Shared,
    stage: &Stage,
    samplers: &mut HashMap<SeqId, Sampler>,
    step: Step,
    input: StageInput,
) {
    if step.position == 0 && stage.is_last() {
        let sampler = serde_json::from_slice::<SequenceStart>(&step.meta)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                Sampler::new(&s.sampling, s.vocab_limit, &s.context).map_err(|e| e.to_string())
            });
        match sampler {
            Ok(sampler) => {
                samplers.insert(step.seq, sampler);
            }
            Err(e) => {
                shared.fail_sequence(
                    step.seq,
                    &format!("the first chunk carries no usable sampling parameters: {e}"),
                );
                return;
            }
        }
    }
    let started = Instant::now();
    let output = stage.forward(step.seq, step.position, input);
    shared.metrics.record_compute(started.elapsed(), 1);
    finish(shared, samplers, step, output);
}

fn decode_batch(
    shared: &Shared,
    stage: &Stage,
    samplers: &mut HashMap<SeqId, Sampler>,
    jobs: Vec<Job>,
) {
    let mut steps = Vec::with_capacity(jobs.len());
    let mut items = Vec::with_capacity(jobs.len());
    for job in jobs {
        let (step, input) = match job {
            Job::Frame(frame) => match frame.tensor() {
                Ok(t) => (
                    Step {
                        seq: frame.seq,
                        position: frame.position as usize,
                        kind: FrameKind::Decode,
                        last_chunk: true,
                        meta: Bytes::new(),
                    },
                    StageInput::Hidden(t),
                ),
                Err(e) => {
                    shared.fail_sequence(frame.seq, &format!("bad hidden states: {e}"));
                    continue;
                }
            },
            Job::Tokens {
                seq,
                position,
                tokens,
                ..
            } => (
                Step {
                    seq,
                    position,
                    kind: FrameKind::Decode,
                    last_chunk: true,
                    meta: Bytes::new(),
                },
                StageInput::Tokens(tokens),
            ),
            _ => continue,
        };
        items.push((step.seq, step.position, input));
        steps.push(step);
    }
    let started = Instant::now();
    let outputs = stage.forward_batch(items);
    shared
        .metrics
        .record_compute(started.elapsed(), steps.len());
    for (step, output) in steps.into_iter().zip(outputs) {
        finish(shared, samplers, step, output);
    }
}

/// Sends a chunk's result on: hidden states to the successor, a sampled token toward stage 0,
/// or the error that ends the sequence.
fn finish(
    shared: &Shared,
    samplers: &mut HashMap<SeqId, Sampler>,
    step: Step,
    output: cluster_engine::Result<StageOutput>,
) {
    let seq = step.seq;
    match output {
        Ok(StageOutput::Hidden(h)) => {
            let mut frame = Frame::new(
                step.kind,
                &shared.config.pipeline,
                shared.config.generation,
                seq,
            );
            frame.position = step.position as u32;
            frame.flags = if step.last_chunk { FLAG_LAST_CHUNK } else { 0 };
            frame.meta = step.meta;
            match frame.with_tensor(&h) {
                Ok(frame) => shared.send(frame),
                Err(e) => shared.fail_sequence(seq, &format!("encoding hidden states: {e}")),
            }
        }
        Ok(StageOutput::Logits(logits)) => {
            if !step.last_chunk {
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
