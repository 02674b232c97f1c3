//! Per-object backoff of failed apiserver writes: a write that fails waits before it is tried
//! again (doubling, capped, with jitter), and its cause is logged once per failure streak,
//! not on every tick.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// First wait after a failure.
const FIRST: Duration = Duration::from_millis(500);
/// Longest wait between attempts.
const CAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Streak {
    failures: u32,
    next_at: Instant,
}

/// The failing objects of one base task, by key (`pod/<uid>`, `node`, …).
#[derive(Debug, Default)]
pub struct WriteBackoff {
    streaks: HashMap<String, Streak>,
    seed: u64,
}

impl WriteBackoff {
    /// Whether `key` may be written at `now`.
    pub fn ready(&self, key: &str, now: Instant) -> bool {
        self.streaks.get(key).is_none_or(|s| now >= s.next_at)
    }

    /// A write of `key` failed; the cause is logged on the first failure of a streak only.
    pub fn failed(&mut self, key: &str, what: &str, error: &dyn std::fmt::Display, now: Instant) {
        let failures = self.streaks.get(key).map_or(0, |s| s.failures) + 1;
        let delay = self.delay(failures);
        if failures == 1 {
            warn!(object = key, %error, retry_in_ms = delay.as_millis() as u64, "{what} failed; retrying with backoff");
        }
        self.streaks.insert(
            key.to_string(),
            Streak {
                failures,
                next_at: now + delay,
            },
        );
    }

    /// A write of `key` succeeded: its streak (if any) ends.
    pub fn succeeded(&mut self, key: &str, what: &str) {
        if let Some(s) = self.streaks.remove(key) {
            info!(object = key, failures = s.failures, "{what} recovered");
        }
    }

    /// Forgets an object that is gone.
    pub fn forget(&mut self, key: &str) {
        self.streaks.remove(key);
    }

    /// Objects currently failing.
    pub fn len(&self) -> usize {
        self.streaks.len()
    }

    /// FIRST × 2^(n-1), capped, minus up to 25 % jitter so that many failing objects do not
    /// retry in lockstep.
    fn delay(&mut self, failures: u32) -> Duration {
        let base = FIRST
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
            .min(CAP);
        // xorshift: cheap, deterministic per task, good enough to spread retries.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        if self.seed == 0 {
            self.seed = 0x9E37_79B9_7F4A_7C15;
        }
        let jitter = (self.seed % 1000) as f64 / 4000.0;
        base.mul_f64(1.0 - jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_up_to_the_cap_and_success_resets() {
        let mut b = WriteBackoff::default();
        let t0 = Instant::now();
        assert!(b.ready("pod/a", t0));
        b.failed("pod/a", "status write", &"boom", t0);
        assert!(!b.ready("pod/a", t0));
        assert!(b.ready("pod/a", t0 + FIRST));
        assert!(b.ready("pod/b", t0), "per object");
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            b.failed("pod/a", "status write", &"boom", t0);
            let next = b.streaks["pod/a"].next_at - t0;
            assert!(next <= CAP);
            last = next;
        }
        assert!(last >= CAP.mul_f64(0.75), "{last:?}");
        b.succeeded("pod/a", "status write");
        assert!(b.ready("pod/a", t0));
        assert_eq!(b.len(), 0);
    }
}
