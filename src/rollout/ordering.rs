//! Status ordering on one base: the order, in waves, in which pending pod status writes are
//! applied. The safety invariant (every NotReady write before any Ready write on a base) is
//! enforced here, whatever a rule returns.

use thiserror::Error;

/// One pending status write on a base, as numbers (compact across the plugin boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatusChange {
    /// Index of the pod in this batch (0..n).
    pub pod_index: u32,
    /// Pod creation time, epoch seconds.
    pub creation_ts: i64,
    /// Rollout revision of the pod's owner (`deployment.kubernetes.io/revision`), 0 if unknown.
    pub revision: i64,
    /// Pod readiness before the write.
    pub from_ready: bool,
    /// Pod readiness after the write.
    pub to_ready: bool,
    /// Pod is being deleted.
    pub deleting: bool,
}

impl StatusChange {
    /// The write makes a pod Ready.
    pub fn becomes_ready(&self) -> bool {
        !self.from_ready && self.to_ready
    }
}

/// Waves of indices into the changes slice; each wave is written and acknowledged before the next.
pub type Waves = Vec<Vec<usize>>;

/// Why a rule's output was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum OrderingError {
    /// An index is out of range.
    #[error("index {0} is out of range for {1} changes")]
    OutOfRange(usize, usize),
    /// An index appears more than once.
    #[error("index {0} appears more than once")]
    Duplicate(usize),
    /// An index is missing.
    #[error("{0} of {1} changes are missing from the ordering")]
    Missing(usize, usize),
    /// The rule itself failed (plugin trap, timeout, ...).
    #[error("ordering rule failed: {0}")]
    RuleFailed(String),
}

/// A status-ordering rule (built-in or plugin).
pub trait OrderingRule: Send + Sync {
    /// Name for logs, metrics and Events.
    fn name(&self) -> &str;
    /// Proposes waves for the changes of one base.
    fn order(&self, changes: &[StatusChange]) -> Result<Waves, OrderingError>;
}

/// Built-in rule: everything that is not a Ready write first (oldest revision first), then the
/// Ready writes (oldest pod first).
#[derive(Debug, Default, Clone, Copy)]
pub struct DefaultOrdering;

impl OrderingRule for DefaultOrdering {
    fn name(&self) -> &str {
        "builtin-default"
    }

    fn order(&self, changes: &[StatusChange]) -> Result<Waves, OrderingError> {
        Ok(default_waves(changes))
    }
}

/// The built-in decision, as a plain function (also the fallback when a plugin fails).
pub fn default_waves(changes: &[StatusChange]) -> Waves {
    let mut first: Vec<usize> = (0..changes.len())
        .filter(|&i| !changes[i].becomes_ready())
        .collect();
    let mut second: Vec<usize> = (0..changes.len())
        .filter(|&i| changes[i].becomes_ready())
        .collect();
    first.sort_by_key(|&i| (changes[i].revision, changes[i].creation_ts, i));
    second.sort_by_key(|&i| (changes[i].creation_ts, changes[i].revision, i));
    [first, second]
        .into_iter()
        .filter(|w| !w.is_empty())
        .collect()
}

/// Checks that `waves` is a permutation of `0..n`.
pub fn validate_permutation(n: usize, waves: &Waves) -> Result<(), OrderingError> {
    let mut seen = vec![false; n];
    let mut count = 0usize;
    for &i in waves.iter().flatten() {
        if i >= n {
            return Err(OrderingError::OutOfRange(i, n));
        }
        if seen[i] {
            return Err(OrderingError::Duplicate(i));
        }
        seen[i] = true;
        count += 1;
    }
    if count != n {
        return Err(OrderingError::Missing(n - count, n));
    }
    Ok(())
}

/// Enforces the safety invariant on a valid permutation: every write that does not make a pod
/// Ready keeps its place relative to the others but moves before all Ready writes, which keep
/// their own relative waves.
pub fn enforce_invariant(changes: &[StatusChange], waves: Waves) -> Waves {
    let mut before: Waves = Vec::new();
    let mut after: Waves = Vec::new();
    for wave in waves {
        let (ready, other): (Vec<usize>, Vec<usize>) =
            wave.into_iter().partition(|&i| changes[i].becomes_ready());
        if !other.is_empty() {
            before.push(other);
        }
        if !ready.is_empty() {
            after.push(ready);
        }
    }
    before.extend(after);
    before
}

/// Orders with `rule`; falls back to the default when the rule fails or returns a non-permutation.
/// Returns the waves and the rule's error when it was overruled.
pub fn order_with(
    rule: &dyn OrderingRule,
    changes: &[StatusChange],
) -> (Waves, Option<OrderingError>) {
    if changes.is_empty() {
        return (Vec::new(), None);
    }
    match rule
        .order(changes)
        .and_then(|w| validate_permutation(changes.len(), &w).map(|_| w))
    {
        Ok(w) => (enforce_invariant(changes, w), None),
        Err(e) => (default_waves(changes), Some(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(i: u32, from: bool, to: bool) -> StatusChange {
        StatusChange {
            pod_index: i,
            creation_ts: i as i64,
            from_ready: from,
            to_ready: to,
            ..Default::default()
        }
    }

    struct Fixed(Waves);
    impl OrderingRule for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn order(&self, _: &[StatusChange]) -> Result<Waves, OrderingError> {
            Ok(self.0.clone())
        }
    }

    #[test]
    fn default_puts_not_ready_first() {
        let c = [ch(0, false, true), ch(1, true, false), ch(2, false, false)];
        assert_eq!(default_waves(&c), vec![vec![1, 2], vec![0]]);
    }

    #[test]
    fn reversed_rule_is_overruled_by_invariant() {
        let c = [ch(0, false, true), ch(1, true, false)];
        let (w, err) = order_with(&Fixed(vec![vec![0], vec![1]]), &c);
        assert!(err.is_none());
        assert_eq!(w, vec![vec![1], vec![0]]);
        let (w, _) = order_with(&Fixed(vec![vec![0, 1]]), &c);
        assert_eq!(w, vec![vec![1], vec![0]]);
    }

    #[test]
    fn non_permutations_fall_back() {
        let c = [ch(0, false, true), ch(1, true, false)];
        for bad in [vec![vec![0]], vec![vec![0, 0, 1]], vec![vec![0, 1, 2]]] {
            let (w, err) = order_with(&Fixed(bad), &c);
            assert!(err.is_some());
            assert_eq!(w, default_waves(&c));
        }
    }
}
