//! The compute thread's work: the jobs the head and the predecessor's frames give it, the
//! bounded queue that holds them, and how a prompt is cut into chunks.

use super::*;

/// Jobs for the compute thread; the queue holding them is bounded (see [`QUEUE_CAPACITY`]).
#[derive(Debug)]
pub enum Job {
    /// A prefill chunk or decode step from the predecessor (stages after the first).
    Frame(Frame),
    /// A prompt from the head (stage 0 only), run chunk by chunk from `next`.
    Prompt {
        /// The sequence.
        seq: SeqId,
        /// The whole prompt.
        tokens: Vec<u32>,
        /// Where the next chunk starts.
        next: usize,
        /// How the last stage should sample; sent with the first chunk.
        start: Bytes,
    },
    /// A decode step's token id from the head's generation loop (stage 0 only).
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
    /// A new connection from the predecessor, handshake done: the compute thread reads it.
    Inbound(Box<InboundConn>),
}

/// How many jobs may wait at a stage whose ring admits `max_sequences` at once. Every sequence
/// has at most one prompt or decode step and one release queued at a time, so a queue of a few
/// per sequence is never full while admission holds; beyond it senders wait.
pub fn queue_capacity(max_sequences: usize) -> usize {
    max_sequences.saturating_mul(4).max(1024)
}

/// What the last stage needs to sample a sequence, sent with its first chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SequenceStart {
    /// Sampling parameters.
    pub sampling: SamplingParams,
    /// Ids at and past this have no text and are never sampled.
    pub vocab_limit: usize,
    /// The prompt's tail, for the repetition penalty.
    pub context: Vec<u32>,
    /// Draws the sampler makes before its first token: those of a resumed sequence's tokens
    /// generated before it failed over.
    #[serde(default)]
    pub draws: usize,
}

/// While other sequences decode, the prompt chunks between two turns of their decode passes
/// take about this many of those passes' time: their next token waits for one pass and the
/// chunks, so the gap between their tokens is about twice the one without a prompt (with 8
/// streams beside a 2,000-token prompt, `scripts/bench-serving.sh`, their p99 gap came to
/// about 4 times their quiet median with the floor below; two passes gave 3 times at p50).
pub(super) const CHUNK_BUDGET_PASSES: f64 = 1.0;

/// The fewest prompt tokens in a chunk under load. A chunk reads every weight of the stage
/// however few its rows: on the 12-layer hidden-768 f32 model an 8-token chunk took 57-88 ms
/// (7-11 ms a token, against 2.4 in chunks of 128) where a decode pass of 8 sequences took 50.
/// With 8 at least, the streams beside a 2,000-token prompt saw a p99 gap of 3.4x their quiet
/// median and the prompt its first token after 37 s; with 16, 3.9x and 21 s (19 s when it
/// stopped the others instead).
pub(super) const MIN_CHUNK: usize = 16;

/// Most decode steps run as one batched forward pass: enough to keep a stage busy with many
/// sequences, few enough that one pass stays short.
pub const MAX_BATCH: usize = 16;

/// Why a job was not queued (the job itself is dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotQueued {
    /// The queue holds [`QUEUE_CAPACITY`] jobs.
    Full,
    /// The compute thread has ended.
    Stopped,
}

/// The compute thread's queue, and the wake-up for when the thread sleeps: every sender goes
/// through here so that no job waits for a sleeping thread.
#[derive(Clone)]
pub struct JobQueue {
    tx: mpsc::Sender<Job>,
    pub(super) wake: Arc<Wake>,
}

impl JobQueue {
    /// A queue over a bounded channel whose receiver the compute thread owns.
    pub fn new(tx: mpsc::Sender<Job>, wake: Wake) -> Self {
        Self {
            tx,
            wake: Arc::new(wake),
        }
    }

    /// Queues a job, waiting while the queue is full.
    pub async fn send(&self, job: Job) -> Result<(), NotQueued> {
        self.tx.send(job).await.map_err(|_| NotQueued::Stopped)?;
        self.wake.wake();
        Ok(())
    }

    /// Queues a job now, or fails when the queue is full or the thread has ended.
    pub fn try_send(&self, job: Job) -> Result<(), NotQueued> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NotQueued::Full,
            mpsc::error::TrySendError::Closed(_) => NotQueued::Stopped,
        })?;
        self.wake.wake();
        Ok(())
    }

    /// How many jobs the queue holds at most.
    pub fn max_capacity(&self) -> usize {
        self.tx.max_capacity()
    }

    /// How many more jobs fit now.
    pub fn capacity(&self) -> usize {
        self.tx.capacity()
    }
}

/// Whether the predecessor's pass sent another decode step right behind this one.
pub(super) fn more_follows(job: &Job) -> bool {
    matches!(job, Job::Frame(f) if f.kind == FrameKind::Decode && f.flags & FLAG_MORE_FOLLOWS != 0)
}

/// A job's sequence, when it is a decode step (which may join a batch).
pub(super) fn decode_seq(job: &Job) -> Option<SeqId> {
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

/// Where a prompt chunk from `next` ends, for a prompt of `len` tokens, a chunk of `chunk`
/// tokens wanted and the pipeline's `prefill_chunk`: a chunk smaller than that never leaves a
/// last token alone unless chunks of `prefill_chunk` would (a one-row chunk goes through another
/// product than a longer one), and always does when they would.
pub(super) fn chunk_end(next: usize, len: usize, chunk: usize, prefill_chunk: usize) -> usize {
    let end = (next + chunk.max(1)).min(len);
    if chunk >= prefill_chunk || len < 2 {
        return end;
    }
    let last_alone = (len - 1).is_multiple_of(prefill_chunk.max(1));
    // Ending one short of that last token would leave a chunk of one before it.
    if last_alone && next < len - 1 && end + 2 >= len {
        len - 1
    } else if !last_alone && end == len - 1 {
        len
    } else {
        end
    }
}
