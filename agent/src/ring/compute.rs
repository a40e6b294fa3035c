//! The compute thread of a stage: it owns the stage's work, reads its predecessor's frames
//! itself (see [`super::inbound`]), takes the head's jobs from a bounded queue, serves them in
//! arrival order (whichever sequence's frame came first), and writes results to the link toward
//! the successor. Compute never runs on the async runtime's threads.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use cluster_api::SamplingParams;
use cluster_engine::sampling::Sampler;
use cluster_engine::{SeqId, Stage, StageInput, StageOutput};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::frame::{FLAG_LAST_CHUNK, FLAG_MORE_FOLLOWS, Frame, FrameKind};
use super::inbound::{InboundConn, Sleeper, Wake};
use super::node::{PassFloor, Shared};

mod pass;
mod queue;

use self::pass::{Step, decode_batch, single};
use self::queue::{CHUNK_BUDGET_PASSES, MAX_BATCH, MIN_CHUNK, chunk_end, decode_seq, more_follows};
pub use self::queue::{Job, JobQueue, SequenceStart, queue_capacity};

/// How long a stage waits for a decode step announced by [`FLAG_MORE_FOLLOWS`]: the frames of
/// one pass are written back to back, so it comes within microseconds unless its link broke.
const MORE_FOLLOWS_LIMIT: Duration = Duration::from_millis(2);

/// The longest single sleep of an idle compute thread; it looks around and sleeps again.
const SLEEP_LIMIT: Duration = Duration::from_secs(1);

/// Runs the compute loop until the queue closes or a [`Job::Stop`]. Decode steps waiting
/// together (of different sequences, with nothing else queued between them) run as one batch.
///
/// Between two steps of a sequence a stage waits for the other stages, a few milliseconds. The
/// thread keeps looking for work (its queue, then its inbound socket) for `spin` before it
/// sleeps, yielding the core between looks: a thread that sleeps for that long lets a virtual
/// CPU halt, and waking it costs more than the network hop (on this project's 2-core VM,
/// polling raised one sequence through a 2-stage ring from 0.83 to 0.89-0.93 of one process,
/// `clusteragent bench-ring`). After `spin` without work it sleeps, so an idle stage costs no
/// CPU.
///
/// `pace`, a test hook, makes forward passes take at least the times it gives.
pub fn run(
    shared: Arc<Shared>,
    stage: Arc<Stage>,
    jobs: mpsc::Receiver<Job>,
    sleeper: Sleeper,
    spin: Duration,
    pace: Option<PassFloor>,
) {
    Worker {
        shared,
        stage,
        jobs,
        sleeper,
        spin,
        pace,
        inbound: None,
        prompts: VecDeque::new(),
        prefill_since_decode: Duration::ZERO,
        decode_turns: 0,
        turn_until: Instant::now(),
        prompt_token_time: Duration::ZERO,
        inbox: VecDeque::new(),
        frames: Vec::new(),
        samplers: HashMap::new(),
        pass_time: Duration::ZERO,
    }
    .run();
}

struct Worker {
    shared: Arc<Shared>,
    stage: Arc<Stage>,
    jobs: mpsc::Receiver<Job>,
    sleeper: Sleeper,
    spin: Duration,
    pace: Option<PassFloor>,
    /// The current connection from the predecessor.
    inbound: Option<InboundConn>,
    /// Prompts waiting for their next chunk (stage 0 only), in turn: a prompt whose chunk ran
    /// goes to the back, so a short prompt that comes while a long one is under way waits for
    /// one of its chunks, not for all of them (see [`Worker::pick`]).
    prompts: VecDeque<Job>,
    /// Time spent on prompt chunks since the last decode pass.
    prefill_since_decode: Duration,
    /// Decode passes that go before the next prompt chunk when their steps wait: one for each
    /// group of sequences in the ring (see [`Worker::groups`]).
    decode_turns: usize,
    /// Until when stage 0 waits for the groups on their way round the ring to take their
    /// decode turns (see [`Worker::turn_wait_left`]).
    turn_until: Instant,
    /// Moving average of a prompt token's share of a prefill chunk's time at this stage.
    prompt_token_time: Duration,
    /// Jobs other than prompts: made from inbound frames, in the order the frames came, then
    /// taken from the queue.
    inbox: VecDeque<Job>,
    /// Reused buffer for frames just read.
    frames: Vec<Frame>,
    samplers: HashMap<SeqId, Sampler>,
    /// Moving average of this stage's decode passes.
    pass_time: Duration,
}

impl Worker {
    fn run(&mut self) {
        let mut held: Option<Job> = None;
        loop {
            let job = match held.take() {
                Some(j) => j,
                None => match self.next_job() {
                    Some(j) => j,
                    None => return,
                },
            };
            if decode_seq(&job).is_some() {
                let batch = self.gather(job, &mut held);
                self.publish_backlog(held.is_some());
                let started = Instant::now();
                let floor = self.floor();
                decode_batch(&self.shared, &self.stage, &mut self.samplers, batch, floor);
                self.note_pass(started.elapsed());
                self.prefill_since_decode = Duration::ZERO;
                self.flush_events();
                continue;
            }
            self.publish_backlog(held.is_some());
            if !self.one(job) {
                return;
            }
            self.flush_events();
        }
    }

    /// Runs one chunk (or one lone step) as a pass of its own.
    fn single(&mut self, step: Step, input: StageInput) {
        let floor = self.floor();
        single(
            &self.shared,
            &self.stage,
            &mut self.samplers,
            step,
            input,
            floor,
        );
    }

    /// The test hook's floor for the next pass.
    fn floor(&mut self) -> Option<Duration> {
        self.pace.as_mut().map(PassFloor::next_floor)
    }

    /// Tells the link thread how many frames wait here beyond the queue (for heartbeats).
    fn publish_backlog(&self, holding: bool) {
        let n = self.inbox.len() + self.prompts.len() + usize::from(holding);
        self.shared
            .backlog
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The decode steps to run with `first` as one pass: those ready now, and on stage 0 those
    /// worth a short wait (see [`Worker::batch_goal`]). A job that cannot join goes to `held`;
    /// prompts met on the way wait in `prompts` and do not end the batch (a prompt that cut a
    /// batch short would leave the other sequences a pass of their own each).
    fn gather(&mut self, first: Job, held: &mut Option<Job>) -> Vec<Job> {
        let (want, cap) = self.batch_goal();
        let want_limit = self.gather_limit();
        let started = Instant::now();
        let mut more = more_follows(&first);
        let mut batch = vec![first];
        while batch.len() < cap {
            match self.ready_job() {
                Some(next) => match decode_seq(&next) {
                    Some(seq) if !batch.iter().any(|b| decode_seq(b) == Some(seq)) => {
                        more = more_follows(&next);
                        batch.push(next);
                    }
                    _ => {
                        *held = Some(next);
                        break;
                    }
                },
                None => {
                    let waited = started.elapsed();
                    let wait = (more && waited < MORE_FOLLOWS_LIMIT)
                        || (batch.len() < want && waited < want_limit);
                    if !wait {
                        break;
                    }
                    std::thread::yield_now();
                }
            }
        }
        batch
    }

    /// How many decode steps a pass should take: `(wait for, at most)`.
    ///
    /// Batching costs little (a weight row is read once for the whole batch), so stage 0 groups
    /// the sequences: as many groups as stages, so that every stage has one to work on, each of
    /// about `decoding / stages` sequences. Once formed, a group stays together around the ring
    /// ([`FLAG_MORE_FOLLOWS`]), so the wait for it to gather happens rarely: when sequences come
    /// and go. Later stages take what comes.
    fn batch_goal(&self) -> (usize, usize) {
        match &self.shared.head {
            Some(head) => {
                let stages = self.stages();
                let decoding = head.decoding().max(1);
                (
                    (decoding / stages).clamp(1, MAX_BATCH),
                    decoding.div_ceil(stages).clamp(1, MAX_BATCH),
                )
            }
            None => (1, MAX_BATCH),
        }
    }

    /// How long stage 0 waits for a group to gather: about the time of a pass elsewhere in the
    /// ring (stages of a balanced split take about as long as this one), never long.
    fn gather_limit(&self) -> Duration {
        self.pass_time
            .mul_f64(1.5)
            .clamp(Duration::from_millis(1), Duration::from_millis(50))
    }

    /// Keeps a moving average of decode passes' time.
    fn note_pass(&mut self, took: Duration) {
        self.pass_time = if self.pass_time.is_zero() {
            took
        } else {
            self.pass_time.mul_f64(0.8) + took.mul_f64(0.2)
        };
    }

    /// Stage 0: sends the token events the head held back while this thread started the next
    /// steps (see [`super::head::Head::flush_events`]).
    fn flush_events(&self) {
        if let Some(head) = &self.shared.head {
            head.flush_events();
        }
    }

    /// Runs one job that is not a decode step; false when the thread must end.
    fn one(&mut self, job: Job) -> bool {
        let (shared, stage) = (&self.shared, &self.stage);
        match job {
            Job::Frame(frame) => {
                let input = match frame.tensor() {
                    Ok(t) => StageInput::Hidden(t),
                    Err(e) => {
                        shared.fail_sequence(frame.seq, &format!("bad hidden states: {e}"));
                        return true;
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
                self.single(step, input);
            }
            Job::Prompt {
                seq,
                tokens,
                next,
                start,
            } => {
                let Some(head) = shared.head.clone() else {
                    return true;
                };
                // A sequence failed or cancelled while its prompt waited: the rest is not run.
                if !head.is_live(seq) {
                    return true;
                }
                // A prompt of one chunk runs whole: cut under load, each piece would read every
                // weight of the stage again (a 33-token prompt cut in four cost twice its whole
                // pass, and a fifth of the throughput at 4 to 16 streams).
                let chunk = if tokens.len() <= shared.config.prefill_chunk {
                    tokens.len()
                } else {
                    self.prompt_chunk()
                };
                let end = chunk_end(next, tokens.len(), chunk, shared.config.prefill_chunk);
                let step = Step {
                    seq,
                    position: next,
                    kind: FrameKind::Prefill,
                    last_chunk: end == tokens.len(),
                    meta: if next == 0 {
                        start.clone()
                    } else {
                        Bytes::new()
                    },
                };
                let chunk = StageInput::Tokens(tokens[next..end].to_vec());
                let started = Instant::now();
                self.single(step, chunk);
                self.note_chunk(end - next, started.elapsed());
                head.prefilled(seq, end);
                self.prefill_since_decode += started.elapsed();
                // A prompt cut short has used its chunk's budget; whole short prompts run back
                // to back (each bringing a sequence into the next decode batch) while they fit
                // in that budget.
                if end < tokens.len() || self.prefill_since_decode >= self.chunk_budget() {
                    self.begin_turns();
                }
                if end < tokens.len() {
                    self.prompts.push_back(Job::Prompt {
                        seq,
                        tokens,
                        next: end,
                        start,
                    });
                }
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
                self.single(step, StageInput::Tokens(tokens));
            }
            Job::Release { seq, kind } => {
                stage.release(seq);
                self.samplers.remove(&seq);
                if !stage.is_last() {
                    shared.send(Frame::new(
                        kind,
                        &shared.config.pipeline,
                        shared.config.generation,
                        seq,
                    ));
                }
            }
            Job::Inbound(conn) => self.install(*conn),
            Job::Stop => {
                stage.release_all();
                return false;
            }
            Job::DropAll => {
                let n = stage.release_all();
                self.samplers.clear();
                if n > 0 {
                    tracing::warn!(
                        stage = shared.index,
                        sequences = n,
                        "freed every sequence's cache after a link went down"
                    );
                }
            }
        }
        true
    }

    /// What runs next, of the jobs already taken: the decode steps and quick jobs (releases, a
    /// new connection) in the order they came, and the prompts' chunks in turn. A long prompt
    /// must not stop the other sequences for the seconds its prefill takes, so after a chunk's
    /// worth of prompt tokens each group's decode steps go first (as one batch), those on their
    /// way round the ring waited for a little (see [`Worker::turn_wait_left`]); the quick jobs
    /// never wait for a chunk to be their turn, but a chunk does not wait for them either.
    fn pick(&mut self) -> Option<Job> {
        if self.prompts.is_empty() {
            return self.inbox.pop_front();
        }
        if self.decode_turns > 0 {
            if !self.inbox.iter().any(|j| decode_seq(j).is_some()) {
                // Tokens sampled by the last stage come in on the predecessor's connection;
                // routed, they queue the next decode steps.
                self.read_inbound();
                self.drain_queue();
            }
            if let Some(j) = self.inbox.pop_front() {
                if decode_seq(&j).is_some() {
                    self.decode_turns -= 1;
                }
                return Some(j);
            }
            if self.turn_wait_left().is_some() {
                return None;
            }
        }
        // No decode step waits, nor is one on its way: the chunk goes now.
        self.decode_turns = 0;
        self.prompts.pop_front()
    }

    /// After a prompt chunk: a decode turn for each group, and the time until which stage 0
    /// waits for the groups still on their way round the ring. A chunk run while they come
    /// back would keep them waiting on their return, and the later stages would then run two
    /// chunks back to back: the gaps that made the 99th percentile of a ring's streams beside a
    /// long prompt. The wait is a round of the ring at most (a pass of this stage's per stage),
    /// none when nothing decodes; it is fixed here, so that the looks for work while it lasts
    /// do not count the sequences again.
    fn begin_turns(&mut self) {
        let decoding = self.shared.head.as_ref().map_or(0, |h| h.decoding());
        self.decode_turns = self.stages().min(decoding).max(1);
        let round = if decoding == 0 {
            Duration::ZERO
        } else {
            (self.pass_time * self.stages() as u32).min(Duration::from_millis(100))
        };
        self.turn_until = Instant::now() + round;
    }

    /// How much longer stage 0 waits for the groups to take their decode turns; `None` when it
    /// does not (see [`Worker::begin_turns`]).
    fn turn_wait_left(&self) -> Option<Duration> {
        if self.decode_turns == 0 {
            return None;
        }
        self.turn_until
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
    }

    /// The ring's stages.
    fn stages(&self) -> usize {
        self.shared.config.stages.len().max(1)
    }

    /// The groups the decoding sequences form at stage 0: one per stage while there are enough
    /// of them (see [`Worker::batch_goal`]), each coming round once in a ring's turn.
    fn groups(&self) -> usize {
        match &self.shared.head {
            Some(head) => self.stages().min(head.decoding()).max(1),
            None => 1,
        }
    }

    /// Moves the jobs queued now to `inbox` and `prompts`; false when the queue has closed.
    fn drain_queue(&mut self) -> bool {
        loop {
            match self.jobs.try_recv() {
                Ok(j) => self.take(j),
                Err(mpsc::error::TryRecvError::Empty) => return true,
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Files a job taken from the queue: a prompt waits its turn among the prompts.
    fn take(&mut self, job: Job) {
        match job {
            Job::Prompt { .. } => self.prompts.push_back(job),
            j => self.inbox.push_back(j),
        }
    }

    /// The time prompt chunks may take between two turns of decode passes: the
    /// [`CHUNK_BUDGET_PASSES`] of each group's.
    fn chunk_budget(&self) -> Duration {
        self.pass_time
            .mul_f64(CHUNK_BUDGET_PASSES * self.groups() as f64)
    }

    /// Prompt tokens in stage 0's next prefill chunk: the pipeline's `prefillChunk`, or, while
    /// other sequences decode, as many as take about [`CHUNK_BUDGET_PASSES`] of a turn of their
    /// groups' decode passes, so that each chunk delays their next token by that much at most
    /// (and never fewer than [`MIN_CHUNK`]). Only where the stage's rows come out the same in
    /// any chunk ([`Stage::chunks_are_row_exact`]), so that a prompt's logits do not depend on
    /// the load it was admitted under; elsewhere chunks keep their size and only the
    /// interleaving helps.
    fn prompt_chunk(&self) -> usize {
        let most = self.shared.config.prefill_chunk.max(1);
        let decoding = self.shared.head.as_ref().map_or(0, |h| h.decoding());
        if decoding == 0
            || self.pass_time.is_zero()
            || self.prompt_token_time.is_zero()
            || !self.stage.chunks_are_row_exact()
        {
            return most;
        }
        let budget = self.chunk_budget().as_secs_f64();
        let fits = (budget / self.prompt_token_time.as_secs_f64()) as usize;
        fits.clamp(MIN_CHUNK.min(most), most)
    }

    /// Keeps the moving average of a prompt token's time from a chunk of `tokens` that took
    /// `took`.
    fn note_chunk(&mut self, tokens: usize, took: Duration) {
        let per = took / tokens.max(1) as u32;
        self.prompt_token_time = if self.prompt_token_time.is_zero() {
            per
        } else {
            self.prompt_token_time.mul_f64(0.5) + per.mul_f64(0.5)
        };
    }

    /// A job available now, without waiting, that may join a decode batch: from the inbound
    /// frames first, then the queue, then whatever the socket has (never a prompt: those go to
    /// `prompts`).
    fn ready_job(&mut self) -> Option<Job> {
        if let Some(j) = self.inbox.pop_front() {
            return Some(j);
        }
        while let Ok(j) = self.jobs.try_recv() {
            self.take(j);
            if let Some(j) = self.inbox.pop_front() {
                return Some(j);
            }
        }
        self.read_inbound();
        self.inbox.pop_front()
    }

    /// Waits for the next job: looks for `spin`, then sleeps. `None` when the queue closed.
    fn next_job(&mut self) -> Option<Job> {
        let since = Instant::now();
        // Spinning is for the few milliseconds between a sequence's steps, so only right after
        // a job: a wake-up for something handled on the way (a probe passing through every
        // 200 ms) sleeps again at once, or an idle stage would spin a tenth of its time.
        let mut spinning = true;
        loop {
            let open = self.drain_queue();
            if let Some(j) = self.pick() {
                return Some(j);
            }
            if !open {
                return None;
            }
            if self.read_inbound() {
                continue;
            }
            if !spinning || since.elapsed() >= self.spin {
                self.flush_events();
                let limit = self
                    .turn_wait_left()
                    .map_or(SLEEP_LIMIT, |d| d.min(SLEEP_LIMIT));
                let jobs = &self.jobs;
                // The socket needs no look here: its poller reports bytes that came after the
                // last read.
                self.sleeper
                    .sleep(&self.shared.jobs.wake, limit, || jobs.is_empty());
                spinning = false;
                continue;
            }
            std::thread::yield_now();
        }
    }

    /// Takes a new connection from the predecessor; one it replaces (the predecessor restarted
    /// while the old one still looked open) is closed.
    fn install(&mut self, mut conn: InboundConn) {
        if let Some(mut old) = self.inbound.take() {
            self.sleeper.forget(&mut old);
        }
        match self.sleeper.watch(&mut conn) {
            Ok(()) => self.inbound = Some(conn),
            // Dropping it closes it; the predecessor reconnects.
            Err(e) => tracing::error!(error = %e, "cannot watch the predecessor's connection"),
        }
    }

    /// Reads and routes the frames the predecessor has sent; true when anything happened.
    fn read_inbound(&mut self) -> bool {
        let Some(conn) = self.inbound.as_mut() else {
            return false;
        };
        let mut frames = std::mem::take(&mut self.frames);
        let read = conn.read_frames(&mut frames);
        let happened = !frames.is_empty() || read.is_err();
        let mut broken = read.err().map(|e| e.to_string());
        for frame in frames.drain(..) {
            if let Err(why) = self.route(frame) {
                broken = Some(why);
                break;
            }
        }
        frames.clear();
        self.frames = frames;
        if let Some(why) = broken {
            self.inbound_lost(why);
        }
        happened
    }

    /// What a frame from the predecessor asks; an error ends the connection.
    fn route(&mut self, frame: Frame) -> Result<(), String> {
        let shared = &self.shared;
        if frame.pipeline != shared.config.pipeline || frame.generation != shared.config.generation
        {
            return Err(format!(
                "sent a frame for pipeline {:?} generation {}",
                frame.pipeline, frame.generation
            ));
        }
        match (&shared.head, frame.kind) {
            (None, FrameKind::Prefill | FrameKind::Decode) => {
                self.inbox.push_back(Job::Frame(frame))
            }
            (None, FrameKind::Release | FrameKind::Cancel) => self.inbox.push_back(Job::Release {
                seq: frame.seq,
                kind: frame.kind,
            }),
            (None, FrameKind::Error | FrameKind::Probe) => shared.forward(&frame),
            (Some(head), FrameKind::Token) => {
                let ids = frame.tokens().map_err(|e| e.to_string())?;
                let &[id] = ids.as_slice() else {
                    return Err(format!("a token frame carries {} ids", ids.len()));
                };
                head.on_token(shared, frame.seq, id);
            }
            (Some(head), FrameKind::Probe) => {
                head.probe_back(frame.seq, shared.config.stages.len())
            }
            (Some(head), FrameKind::Error) => {
                let message = frame.meta_text();
                if frame.seq == 0 {
                    head.fail_all(shared, message, true);
                } else {
                    head.fail(shared, frame.seq, message);
                }
            }
            (_, kind) => return Err(format!("sent an unexpected {kind:?} frame")),
        }
        Ok(())
    }

    /// The predecessor's connection ended: every sequence in flight is lost.
    fn inbound_lost(&mut self, why: String) {
        let Some(mut conn) = self.inbound.take() else {
            return;
        };
        self.sleeper.forget(&mut conn);
        let shared = &self.shared;
        let message = format!("{} went away: {why}", conn.predecessor);
        tracing::warn!(stage = shared.index, "{message}");
        match &shared.head {
            Some(head) => head.fail_all(shared, message, true),
            None => {
                // After the frames already taken from that connection, which came first.
                self.inbox.push_back(Job::DropAll);
                let frame = Frame::new(
                    FrameKind::Error,
                    &shared.config.pipeline,
                    shared.config.generation,
                    0,
                )
                .with_meta(message);
                shared.forward(&frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::chunk_end;

    #[test]
    fn a_smaller_chunk_leaves_the_last_token_alone_exactly_when_full_chunks_would() {
        let sizes = |len: usize, chunk: usize, most: usize| {
            let (mut next, mut sizes) = (0, Vec::new());
            while next < len {
                let end = chunk_end(next, len, chunk, most);
                sizes.push(end - next);
                next = end;
            }
            sizes
        };
        // Full chunks: as before.
        assert_eq!(sizes(300, 128, 128), [128, 128, 44]);
        assert_eq!(sizes(257, 128, 128), [128, 128, 1]);
        for len in 1..600 {
            for chunk in [16, 17, 43, 100, 127] {
                let got = sizes(len, chunk, 128);
                assert_eq!(got.iter().sum::<usize>(), len);
                let alone = got.len() > 1 && got[got.len() - 1] == 1;
                let full_alone = len > 1 && (len - 1) % 128 == 0;
                assert_eq!(alone, full_alone, "len {len}, chunk {chunk}: {got:?}");
                assert!(
                    got[..got.len() - 1].iter().all(|&s| s >= 2),
                    "len {len}, chunk {chunk}: {got:?}"
                );
            }
        }
    }
}
