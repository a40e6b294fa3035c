//! Warnings that anyone able to reach a port can cause, such as refused ring connections, logged
//! at most once per interval for each kind, with the count of those held back since: otherwise
//! one line per connection lets a stranger fill the log.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A limit on one family of warnings, by kind.
pub(crate) struct Hush {
    every: Duration,
    /// For each kind: when it was last let through, and how many were held back since.
    kinds: Mutex<HashMap<&'static str, (Instant, u64)>>,
}

impl Hush {
    /// At most one warning of each kind per `every`.
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            kinds: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(held)` when a warning of `kind` may be logged now (`held` were held back since the
    /// last one); `None` when it is to be held back.
    pub(crate) fn allow(&self, kind: &'static str) -> Option<u64> {
        self.allow_at(kind, Instant::now())
    }

    fn allow_at(&self, kind: &'static str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        match kinds.get_mut(kind) {
            Some((last, held)) if now.duration_since(*last) < self.every => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                let was = *held;
                *last = now;
                *held = 0;
                Some(was)
            }
            None => {
                kinds.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_passes_once_per_interval_and_counts_what_it_held() {
        let hush = Hush::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(hush.allow_at("proof", t0), Some(0));
        for s in 1..5 {
            assert_eq!(hush.allow_at("proof", t0 + Duration::from_secs(s)), None);
        }
        // Another kind is not held back by the first.
        assert_eq!(hush.allow_at("frame", t0 + Duration::from_secs(1)), Some(0));
        assert_eq!(
            hush.allow_at("proof", t0 + Duration::from_secs(10)),
            Some(4)
        );
        assert_eq!(hush.allow_at("proof", t0 + Duration::from_secs(11)), None);
    }
}
