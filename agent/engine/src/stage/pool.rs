//! The threads a stage's passes run on, and how they are kept awake during a pass.

use std::sync::atomic::Ordering;

use crate::error::Result;

/// The threads a stage's passes run on, as many as rayon's global pool has
/// (`RAYON_NUM_THREADS`, else one per CPU). Each stage has its own: the threads that
/// [`on_pool_awake`] keeps waiting take whatever work their pool has, and in a pool shared
/// with another stage of the same process they could take that stage's whole pass, and hold
/// this pass's end until the other's.
pub(super) fn pass_pool() -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("stage-pass-{i}"))
        .build()
        .map_err(|e| candle_core::Error::Msg(format!("starting a stage's threads: {e}")).into())
}

/// Runs `pass` on a thread of rayon's pool while the pool's other threads stay awake for it.
///
/// A decode pass hands the pool a parallel product about seven times a layer, with serial
/// work (norms, attention, quantizing inputs) between them. Left alone, a pool thread with no
/// work yields a few dozen times and then sleeps, and waking it again costs more than a small
/// product: with two threads, 28% of a GGUF decode step went to `futex` and `sched_yield`, and
/// two threads decoded no faster than one. Here each other thread runs a job that takes
/// whatever work the pool has (`rayon::yield_now`) and otherwise waits on its core without
/// sleeping, until the pass ends.
pub(super) fn on_pool_awake<R: Send>(pass: impl FnOnce() -> R + Send) -> R {
    let done = std::sync::atomic::AtomicBool::new(false);
    let done = &done;
    rayon::scope(|scope| {
        let home = rayon::current_thread_index();
        for _ in 1..rayon::current_num_threads() {
            scope.spawn(move |_| keep_awake(done, home));
        }
        /// Ends the waiting however `pass` ends, a panic included: the scope waits for it.
        struct Finished<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Finished<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Release);
            }
        }
        let _finished = Finished(done);
        pass()
    })
}

/// A pool thread's wait for work until `done`; the pass's own thread (`home`), which may run
/// this job while it waits for its products, returns at once instead, or the pass would never
/// end.
fn keep_awake(done: &std::sync::atomic::AtomicBool, home: Option<usize>) {
    if rayon::current_thread_index() == home {
        return;
    }
    let mut idle = 0u32;
    while !done.load(Ordering::Acquire) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => idle = 0,
            _ => {
                idle = idle.wrapping_add(1);
                // Now and then the core goes to whatever else is runnable (another stage's
                // process on the same machine); otherwise a pause, which keeps the wake-up
                // to the next product under a microsecond.
                if idle.is_multiple_of(64) {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// `work` run on its own thread, which must end within ten seconds.
    fn within_seconds<R: Send + 'static>(work: impl FnOnce() -> R + Send + 'static) -> R {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(work()).unwrap());
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pool was not let go")
    }

    #[test]
    fn a_pass_kept_awake_gives_its_result_and_lets_the_pool_go() {
        use rayon::prelude::*;
        // Which threads take which products is the scheduler's business (the benchmark shows
        // the gain); what must hold is the result, and that the waiting jobs end with the pass.
        for threads in [1, 2, 3] {
            let sum = within_seconds(move || {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let sum = pool.install(|| {
                    super::on_pool_awake(|| {
                        // Many small products with serial work between them, as in a pass.
                        (0..100u64)
                            .map(|step| {
                                std::thread::sleep(std::time::Duration::from_micros(50));
                                (0..64u32)
                                    .into_par_iter()
                                    .with_max_len(1)
                                    .map(|i| std::hint::black_box(step * u64::from(i)))
                                    .sum::<u64>()
                            })
                            .sum::<u64>()
                    })
                });
                // The pool's threads are free again: later jobs run, a pass from outside too.
                assert_eq!(pool.install(|| 7), 7);
                sum
            });
            assert_eq!(sum, (0..100u64).sum::<u64>() * (0..64u64).sum::<u64>());
        }
        // Called from outside any pool, the pass goes to the global one and comes back.
        assert_eq!(within_seconds(|| super::on_pool_awake(|| 5)), 5);
    }

    #[test]
    fn a_pass_that_panics_still_lets_the_pool_go() {
        within_seconds(|| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(2)
                .build()
                .unwrap();
            let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| super::on_pool_awake(|| panic!("a pass fails")))
            }));
            assert!(failed.is_err());
            assert_eq!(pool.install(|| 7), 7);
        });
    }
}
