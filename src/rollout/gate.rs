//! Batch gating of one Deployment's rollout: which new-version pods may install now. Pure; the
//! controller feeds it the Deployment's pods and sends the resulting holds to the base actors.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use crate::rollout::batch::{BatchError, BatchPolicy, PendingInstall, RolloutView, decide_with};
use crate::vpod::status::Note;

/// Waiting reason of a held install (not an error: no Event).
pub const HOLD_REASON: &str = "WaitingForBatch";

/// One pod of the Deployment, as gating needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatePod {
    /// uid.
    pub uid: String,
    /// `namespace/name`.
    pub name: String,
    /// Bound VNode, if scheduled.
    pub node: Option<String>,
    /// Base identity of that VNode, if it is one of ours.
    pub base_id: Option<String>,
    /// Template revision.
    pub template_hash: Option<String>,
    /// Creation time, epoch seconds.
    pub creation_ts: i64,
    /// Ready.
    pub ready: bool,
    /// First container's module (name, version), if valid.
    pub module: Option<(String, String)>,
}

/// Memory of one rollout across evaluations.
#[derive(Debug, Clone, Default)]
pub struct GateState {
    hash: Option<String>,
    admitted: HashSet<String>,
    ready_seen: HashSet<String>,
    first_admit: Option<Instant>,
    last_ready: Option<Instant>,
}

/// The result of one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GateOutcome {
    /// For every live pod: its hold (`None` = may install).
    pub holds: Vec<(String, Option<Note>)>,
    /// Evaluate again at this time even if nothing changes.
    pub recheck_at: Option<Instant>,
    /// Pods admitted by this evaluation.
    pub newly_admitted: Vec<String>,
}

/// Evaluates the rollout of one Deployment (`owner`) with `policy`.
pub fn evaluate(
    policy: &dyn BatchPolicy,
    state: &mut GateState,
    owner: &str,
    pods: &[GatePod],
    desired: u32,
    annotations: &BTreeMap<String, String>,
    now: Instant,
) -> (GateOutcome, Option<BatchError>) {
    let mut out = GateOutcome::default();
    let Some(newest) = pods.iter().max_by_key(|p| (p.creation_ts, p.uid.clone())) else {
        *state = GateState::default();
        return (out, None);
    };
    if state.hash != newest.template_hash {
        // A new revision: a new rollout (also a rollback).
        *state = GateState {
            hash: newest.template_hash.clone(),
            ..Default::default()
        };
    }
    let is_new = |p: &GatePod| p.template_hash == state.hash;
    for p in pods.iter().filter(|p| is_new(p) && p.ready) {
        state.admitted.insert(p.uid.clone());
        if state.ready_seen.insert(p.uid.clone()) {
            state.last_ready = Some(now);
        }
    }
    let mut pending: Vec<&GatePod> = pods
        .iter()
        .filter(|p| is_new(p) && p.node.is_some() && !p.ready && !state.admitted.contains(&p.uid))
        .collect();
    pending.sort_by_key(|p| (p.creation_ts, p.uid.clone()));
    let mut err = None;
    let mut hold_message = None;
    if !pending.is_empty() {
        let version_of = |new: bool| {
            pods.iter()
                .find(|p| is_new(p) == new && p.module.is_some())
                .and_then(|p| p.module.clone())
        };
        let (module, new_version) = version_of(true).unwrap_or_default();
        let view = RolloutView {
            owner: owner.to_string(),
            module,
            new_version,
            old_version: version_of(false).map(|(_, v)| v),
            desired,
            updated_ready: pods.iter().filter(|p| is_new(p) && p.ready).count() as u32,
            updated_installing: pods
                .iter()
                .filter(|p| is_new(p) && !p.ready && state.admitted.contains(&p.uid))
                .count() as u32,
            old_ready: pods.iter().filter(|p| !is_new(p) && p.ready).count() as u32,
            elapsed_ms: state
                .first_admit
                .map(|t| now.saturating_duration_since(t).as_millis() as u64)
                .unwrap_or(0),
            since_last_ready_ms: state
                .last_ready
                .map(|t| now.saturating_duration_since(t).as_millis() as u64),
            annotations: annotations.clone(),
        };
        let list: Vec<PendingInstall> = pending
            .iter()
            .map(|p| PendingInstall {
                base_id: p.base_id.clone().unwrap_or_default(),
                pod: p.name.clone(),
                creation_ts: p.creation_ts,
            })
            .collect();
        let (decision, e) = decide_with(policy, &view, &list);
        err = e;
        for &i in &decision.admit {
            state.admitted.insert(pending[i].uid.clone());
            out.newly_admitted.push(pending[i].uid.clone());
        }
        if !decision.admit.is_empty() && state.first_admit.is_none() {
            state.first_admit = Some(now);
        }
        hold_message = decision.hold_reason;
        let still_held = pending.len() > decision.admit.len();
        if still_held {
            let after = Duration::from_millis(
                decision
                    .recheck_after_ms
                    .unwrap_or(5_000)
                    .clamp(200, 600_000),
            );
            out.recheck_at = Some(now + after);
        }
    }
    for p in pods {
        let held = is_new(p) && !p.ready && !state.admitted.contains(&p.uid);
        let note = held.then(|| Note {
            reason: HOLD_REASON.into(),
            message: hold_message
                .clone()
                .unwrap_or_else(|| "waiting for the batch policy to admit this install".into()),
        });
        out.holds.push((p.uid.clone(), note));
    }
    (out, err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::batch::{AdmitAll, BatchDecision};

    fn pod(uid: &str, hash: &str, created: i64, ready: bool) -> GatePod {
        GatePod {
            uid: uid.into(),
            name: format!("ns/{uid}"),
            node: Some(format!("vnode.{uid}.dev")),
            base_id: Some(uid.into()),
            template_hash: Some(hash.into()),
            creation_ts: created,
            ready,
            module: Some(("m".into(), hash.into())),
        }
    }

    /// Admits one install at a time, holding the rest with a reason.
    struct OneAtATime;
    impl BatchPolicy for OneAtATime {
        fn name(&self) -> &str {
            "one"
        }
        fn decide(
            &self,
            v: &RolloutView,
            _p: &[PendingInstall],
        ) -> Result<BatchDecision, BatchError> {
            if v.updated_installing > 0 {
                return Ok(BatchDecision {
                    admit: vec![],
                    hold_reason: Some("previous batch still installing".into()),
                    recheck_after_ms: Some(1000),
                });
            }
            Ok(BatchDecision {
                admit: vec![0],
                hold_reason: Some(format!("batch {} opens later", v.updated_ready + 2)),
                recheck_after_ms: Some(1000),
            })
        }
    }

    fn held(o: &GateOutcome) -> Vec<String> {
        o.holds
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(u, _)| u.clone())
            .collect()
    }

    #[test]
    fn admit_all_holds_nothing() {
        let mut st = GateState::default();
        let pods = vec![
            pod("a", "old", 1, true),
            pod("b", "new", 2, false),
            pod("c", "new", 3, false),
        ];
        let (o, e) = evaluate(
            &AdmitAll,
            &mut st,
            "ns/Deployment/d",
            &pods,
            3,
            &BTreeMap::new(),
            Instant::now(),
        );
        assert!(e.is_none());
        assert!(held(&o).is_empty());
        assert_eq!(o.newly_admitted.len(), 2);
    }

    #[test]
    fn one_at_a_time_holds_the_rest_with_the_policy_reason() {
        let mut st = GateState::default();
        let now = Instant::now();
        let mut pods = vec![
            pod("a", "old", 1, true),
            pod("b", "new", 2, false),
            pod("c", "new", 3, false),
        ];
        let (o, _) = evaluate(&OneAtATime, &mut st, "d", &pods, 3, &BTreeMap::new(), now);
        assert_eq!(o.newly_admitted, vec!["b".to_string()]);
        assert_eq!(held(&o), vec!["c".to_string()]);
        let note = o
            .holds
            .iter()
            .find(|(u, _)| u == "c")
            .and_then(|(_, n)| n.clone())
            .expect("held");
        assert_eq!(note.reason, HOLD_REASON);
        assert!(o.recheck_at.is_some());
        // b still installing: c stays held.
        let (o, _) = evaluate(&OneAtATime, &mut st, "d", &pods, 3, &BTreeMap::new(), now);
        assert_eq!(held(&o), vec!["c".to_string()]);
        assert_eq!(
            o.holds
                .iter()
                .find(|(u, _)| u == "c")
                .and_then(|(_, n)| n.clone())
                .map(|n| n.message),
            Some("previous batch still installing".to_string())
        );
        // b Ready: c admitted.
        pods[1].ready = true;
        let (o, _) = evaluate(&OneAtATime, &mut st, "d", &pods, 3, &BTreeMap::new(), now);
        assert_eq!(o.newly_admitted, vec!["c".to_string()]);
        assert!(held(&o).is_empty());
    }

    #[test]
    fn a_new_revision_starts_a_new_rollout() {
        let mut st = GateState::default();
        let now = Instant::now();
        let pods = vec![pod("b", "v2", 2, false)];
        evaluate(&OneAtATime, &mut st, "d", &pods, 1, &BTreeMap::new(), now);
        assert!(st.admitted.contains("b"));
        let pods = vec![pod("b", "v2", 2, false), pod("c", "v3", 3, false)];
        let (o, _) = evaluate(&OneAtATime, &mut st, "d", &pods, 1, &BTreeMap::new(), now);
        assert_eq!(o.newly_admitted, vec!["c".to_string()]);
        assert!(!st.admitted.contains("b"));
    }
}
