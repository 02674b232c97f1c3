//! Liveness of a base from its heartbeats. Pure: the caller passes the clock.

use std::time::{Duration, Instant};

/// What the VNode of a base should look like now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Heartbeats are on time: Ready, renew the Lease.
    Alive,
    /// Missed heartbeats: NotReady, stop renewing the Lease.
    Silent,
    /// Silent for longer than the TTL: delete the VNode.
    Expired,
}

/// Liveness thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessPolicy {
    /// Silence after which a base is NotReady.
    pub timeout: Duration,
    /// Silence after which its VNode is deleted.
    pub ttl: Duration,
}

impl LivenessPolicy {
    /// Liveness given the last sign of life.
    pub fn assess(&self, last_seen: Instant, now: Instant) -> Liveness {
        let silence = now.saturating_duration_since(last_seen);
        if silence >= self.ttl.max(self.timeout) {
            Liveness::Expired
        } else if silence >= self.timeout {
            Liveness::Silent
        } else {
            Liveness::Alive
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let p = LivenessPolicy {
            timeout: Duration::from_secs(30),
            ttl: Duration::from_secs(600),
        };
        let t0 = Instant::now();
        assert_eq!(p.assess(t0, t0 + Duration::from_secs(29)), Liveness::Alive);
        assert_eq!(p.assess(t0, t0 + Duration::from_secs(30)), Liveness::Silent);
        assert_eq!(
            p.assess(t0, t0 + Duration::from_secs(600)),
            Liveness::Expired
        );
    }
}
