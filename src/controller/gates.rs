//! Batch gates: for each module Deployment with a batch policy, which of its pods may install
//! now. Pure memory across evaluations; the index feeds it the Deployment's pods.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tracing::{info, warn};

use crate::rollout::batch::BatchPolicy;
use crate::rollout::gate::{self, GatePod, GateState};
use crate::vpod::status::Note;

/// The gates of every gated Deployment.
#[derive(Default)]
pub struct BatchGates {
    gates: HashMap<String, GateState>,
    recheck: HashMap<String, Instant>,
}

impl BatchGates {
    /// Evaluates `owner`'s rollout; returns the hold of each of its pods (`None` = may
    /// install). Without a policy nothing is held and the owner's gate is forgotten.
    pub fn evaluate(
        &mut self,
        owner: &str,
        policy: Option<Arc<dyn BatchPolicy>>,
        pods: &[GatePod],
        desired: u32,
        annotations: &BTreeMap<String, String>,
        now: Instant,
    ) -> Vec<(String, Option<Note>)> {
        let Some(policy) = policy else {
            self.gates.remove(owner);
            self.recheck.remove(owner);
            return pods.iter().map(|p| (p.uid.clone(), None)).collect();
        };
        let state = self.gates.entry(owner.to_string()).or_default();
        let (out, err) = gate::evaluate(
            policy.as_ref(),
            state,
            owner,
            pods,
            desired,
            annotations,
            now,
        );
        if let Some(e) = err {
            warn!(owner, policy = policy.name(), error = %e, "batch policy overruled; all pending installs admitted");
        }
        if !out.newly_admitted.is_empty() {
            info!(
                owner,
                policy = policy.name(),
                admitted = out.newly_admitted.len(),
                "batch admitted"
            );
        }
        match out.recheck_at {
            Some(t) => self.recheck.insert(owner.to_string(), t),
            None => self.recheck.remove(owner),
        };
        out.holds
    }

    /// Owners whose policy asked to be evaluated again by `now`.
    pub fn due(&self, now: Instant) -> Vec<String> {
        let mut v: Vec<String> = self
            .recheck
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(o, _)| o.clone())
            .collect();
        v.sort();
        v
    }

    /// Number of gated owners (for tests and metrics).
    pub fn len(&self) -> usize {
        self.gates.len()
    }

    /// Whether no owner is gated.
    pub fn is_empty(&self) -> bool {
        self.gates.is_empty()
    }
}
