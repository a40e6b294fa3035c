//! One forward pass of the compute thread: a chunk of one sequence, or a decode step of several
//! as a batch, and where each result goes.

use super::*;

/// Where a chunk's result goes.
pub(super) struct Step {
    pub(super) seq: SeqId,
    pub(super) position: usize,
    pub(super) kind: FrameKind,
    pub(super) last_chunk: bool,
    pub(super) meta: Bytes,
}

/// Makes a pass take at least `pace` (a test hook standing in for a slow machine).
fn pace_pass(started: Instant, pace: Option<Duration>) {
    if let Some(floor) = pace {
        let left = floor.saturating_sub(started.elapsed());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
    }
}

fn input_tokens(input: &StageInput) -> usize {
    match input {
        StageInput::Tokens(t) => t.len(),
        StageInput::Hidden(h) => h.dims().get(1).copied().unwrap_or(1),
    }
}

pub(super) fn single(
    shared: &Shared,
    stage: &Stage,
    samplers: &mut HashMap<SeqId, Sampler>,
    step: Step,
    input: StageInput,
    pace: Option<Duration>,
) {
    if step.position == 0
        && shared.head.is_none()
        && shared.stopping.load(std::sync::atomic::Ordering::Relaxed)
    {
        shared.fail_sequence(
            step.seq,
            "its agent is stopping and takes no new sequence (those in flight finish first)",
        );
        return;
    }
    if step.position == 0 && stage.is_last() {
        let sampler = serde_json::from_slice::<SequenceStart>(&step.meta)
            .map_err(|e| e.to_string())
            .and_then(|s| {
                let mut sampler = Sampler::new(&s.sampling, s.vocab_limit, &s.context)
                    .map_err(|e| e.to_string())?;
                sampler.skip(s.draws).map_err(|e| e.to_string())?;
                Ok(sampler)
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
    let timer = shared.metrics.pass(1, input_tokens(&input));
    let output = stage.forward(step.seq, step.position, input);
    pace_pass(timer.started(), pace);
    drop(timer);
    finish(shared, samplers, step, output, false);
}

pub(super) fn decode_batch(
    shared: &Shared,
    stage: &Stage,
    samplers: &mut HashMap<SeqId, Sampler>,
    jobs: Vec<Job>,
    pace: Option<Duration>,
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
    let timer = shared.metrics.pass(steps.len(), steps.len());
    let outputs = stage.forward_batch(items);
    pace_pass(timer.started(), pace);
    drop(timer);
    let count = steps.len();
    for (i, (step, output)) in steps.into_iter().zip(outputs).enumerate() {
        finish(shared, samplers, step, output, i + 1 < count);
    }
}

/// Sends a chunk's result on: hidden states to the successor, a sampled token toward stage 0,
/// or the error that ends the sequence.
fn finish(
    shared: &Shared,
    samplers: &mut HashMap<SeqId, Sampler>,
    step: Step,
    output: cluster_engine::Result<StageOutput>,
    more_follows: bool,
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
            if more_follows {
                frame.flags |= FLAG_MORE_FOLLOWS;
            }
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
