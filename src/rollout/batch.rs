//! Batch gating: which pending installs of a rollout may proceed now.

use std::collections::BTreeMap;

use thiserror::Error;

/// Per-base state of the module in a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseRolloutState {
    /// Runs only the old version.
    Old,
    /// New version install admitted and in progress.
    Installing,
    /// Runs the new version, Ready.
    Updated,
    /// The install of the new version failed.
    Failed,
}

/// What a batch policy sees of one rollout (one Deployment's new version of one module).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutView {
    /// `namespace/name` of the owning Deployment (or the pod's owner when there is none).
    pub owner: String,
    /// Module (bizName).
    pub module: String,
    /// Version being rolled out.
    pub new_version: String,
    /// Version being replaced, when known.
    pub old_version: Option<String>,
    /// Desired replicas of the owner.
    pub desired: u32,
    /// Pods of the new version that are Ready.
    pub updated_ready: u32,
    /// Pods of the new version whose install was admitted but is not Ready yet.
    pub updated_installing: u32,
    /// Pods of older versions still Ready.
    pub old_ready: u32,
    /// Milliseconds since the first install of this version was admitted (0 if none yet).
    pub elapsed_ms: u64,
    /// Milliseconds since the most recent admitted install became Ready (None if none yet).
    pub since_last_ready_ms: Option<u64>,
    /// Annotations of the owning Deployment.
    pub annotations: BTreeMap<String, String>,
}

/// An install waiting for admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingInstall {
    /// Base identity.
    pub base_id: String,
    /// `namespace/name` of the pod.
    pub pod: String,
    /// Pod creation time, epoch seconds.
    pub creation_ts: i64,
}

/// A policy's answer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BatchDecision {
    /// Indices into the pending list that may install now.
    pub admit: Vec<usize>,
    /// Why the others wait (shown as the container's waiting message).
    pub hold_reason: Option<String>,
    /// Ask again after this many milliseconds even if nothing changes.
    pub recheck_after_ms: Option<u64>,
}

/// Why a policy's output was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BatchError {
    /// An admitted index is out of range.
    #[error("admitted index {0} is out of range for {1} pending installs")]
    OutOfRange(usize, usize),
    /// The policy itself failed (plugin trap, timeout, ...).
    #[error("batch policy failed: {0}")]
    PolicyFailed(String),
}

/// What happens to the pending installs when a batch policy fails (traps, times out, runs out
/// of memory, answers nonsense, is not loaded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnFailure {
    /// Admit nothing until the policy works again: a broken canary must not release a rollout.
    #[default]
    Hold,
    /// Admit every pending install, as if no policy were bound.
    Admit,
}

/// A batch-update policy (built-in or plugin).
pub trait BatchPolicy: Send + Sync {
    /// Name for logs, metrics and Events.
    fn name(&self) -> &str;
    /// Decides which pending installs proceed now.
    fn decide(
        &self,
        view: &RolloutView,
        pending: &[PendingInstall],
    ) -> Result<BatchDecision, BatchError>;
    /// What [`decide_with`] does when this policy fails.
    fn on_failure(&self) -> OnFailure {
        OnFailure::Hold
    }
}

/// Built-in policy: admit everything (the Deployment's own maxSurge/maxUnavailable paces it).
#[derive(Debug, Default, Clone, Copy)]
pub struct AdmitAll;

impl BatchPolicy for AdmitAll {
    fn name(&self) -> &str {
        "builtin-admit-all"
    }

    fn decide(
        &self,
        _view: &RolloutView,
        pending: &[PendingInstall],
    ) -> Result<BatchDecision, BatchError> {
        Ok(BatchDecision {
            admit: (0..pending.len()).collect(),
            hold_reason: None,
            recheck_after_ms: None,
        })
    }
}

/// Validates a decision; deduplicates and sorts the admitted indices.
pub fn validate_decision(n: usize, mut d: BatchDecision) -> Result<BatchDecision, BatchError> {
    if let Some(&bad) = d.admit.iter().find(|&&i| i >= n) {
        return Err(BatchError::OutOfRange(bad, n));
    }
    d.admit.sort_unstable();
    d.admit.dedup();
    Ok(d)
}

/// Longest policy error quoted in a hold reason (the pod's waiting message).
const MAX_QUOTED_ERROR: usize = 200;

/// Decides with `policy`; when it fails, its [`OnFailure`] decides instead: hold every pending
/// install (with a hold reason saying the policy is broken) or admit them all. Returns the
/// policy's error when it was overruled.
pub fn decide_with(
    policy: &dyn BatchPolicy,
    view: &RolloutView,
    pending: &[PendingInstall],
) -> (BatchDecision, Option<BatchError>) {
    match policy
        .decide(view, pending)
        .and_then(|d| validate_decision(pending.len(), d))
    {
        Ok(d) => (d, None),
        Err(e) => {
            let d = match policy.on_failure() {
                OnFailure::Admit => AdmitAll.decide(view, pending).unwrap_or_default(),
                OnFailure::Hold => {
                    let text = e.to_string();
                    let first_line = text.lines().next().unwrap_or_default();
                    let quoted: String = first_line.chars().take(MAX_QUOTED_ERROR).collect();
                    BatchDecision {
                        admit: Vec::new(),
                        hold_reason: Some(format!(
                            "batch policy {} is broken, installs held until it works again: {quoted}",
                            policy.name()
                        )),
                        recheck_after_ms: None,
                    }
                }
            };
            (d, Some(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> RolloutView {
        RolloutView {
            owner: "default/d".into(),
            module: "m".into(),
            new_version: "2".into(),
            old_version: Some("1".into()),
            desired: 4,
            updated_ready: 0,
            updated_installing: 0,
            old_ready: 4,
            elapsed_ms: 0,
            since_last_ready_ms: None,
            annotations: BTreeMap::new(),
        }
    }

    /// Answers out of range; fails with the failure policy it is given.
    struct Bad(OnFailure);
    impl BatchPolicy for Bad {
        fn name(&self) -> &str {
            "bad"
        }
        fn decide(
            &self,
            _: &RolloutView,
            _: &[PendingInstall],
        ) -> Result<BatchDecision, BatchError> {
            Ok(BatchDecision {
                admit: vec![7],
                ..Default::default()
            })
        }
        fn on_failure(&self) -> OnFailure {
            self.0
        }
    }

    fn two_pending() -> Vec<PendingInstall> {
        vec![
            PendingInstall {
                base_id: "a".into(),
                pod: "ns/p".into(),
                creation_ts: 0,
            };
            2
        ]
    }

    #[test]
    fn a_failing_policy_holds_by_default() {
        let (d, err) = decide_with(&Bad(OnFailure::default()), &view(), &two_pending());
        assert_eq!(err, Some(BatchError::OutOfRange(7, 2)));
        assert!(d.admit.is_empty(), "nothing admitted: {d:?}");
        let reason = d.hold_reason.unwrap_or_default();
        assert!(reason.starts_with("batch policy bad is broken"), "{reason}");
        assert!(reason.contains("out of range"), "{reason}");
    }

    #[test]
    fn a_failing_policy_bound_to_admit_admits_all() {
        // Control of the test above: the failure policy alone makes the difference.
        let (d, err) = decide_with(&Bad(OnFailure::Admit), &view(), &two_pending());
        assert_eq!(err, Some(BatchError::OutOfRange(7, 2)));
        assert_eq!(d.admit, vec![0, 1]);
    }
}
