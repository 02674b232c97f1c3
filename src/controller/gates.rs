//! Batch gates: for each module Deployment with a batch policy, which of its pods may install
//! now. A policy may be a plugin, and plugin calls never run on the controller loop: an
//! evaluation is a [`GateJob`] run elsewhere (the plugin pool), whose [`GateDone`] comes back.
//! Until an owner's first evaluation is back, its pods are held: a broken or slow policy never
//! releases a rollout.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::rollout::batch::BatchPolicy;
use crate::rollout::gate::{self, GateOutcome, GatePod, GateState, HOLD_REASON};
use crate::vpod::status::Note;

/// Re-evaluate this soon when an evaluation could not run (pool overloaded).
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// One evaluation of an owner's rollout, to run off the controller loop.
pub struct GateJob {
    /// The owner (`namespace/Deployment/name`).
    pub owner: String,
    policy: Arc<dyn BatchPolicy>,
    state: GateState,
    pods: Vec<GatePod>,
    desired: u32,
    annotations: BTreeMap<String, String>,
    now: Instant,
}

impl std::fmt::Debug for GateJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateJob")
            .field("owner", &self.owner)
            .field("policy", &self.policy.name())
            .field("pods", &self.pods.len())
            .finish()
    }
}

impl GateJob {
    /// Runs the policy (this is the plugin call).
    pub fn run(mut self) -> GateDone {
        let bound = self.bound();
        let (outcome, error) = gate::evaluate(
            self.policy.as_ref(),
            &mut self.state,
            &self.owner,
            &self.pods,
            self.desired,
            &self.annotations,
            self.now,
        );
        GateDone {
            owner: self.owner,
            policy: self.policy.name().to_string(),
            failure: error.map(|e| (e.to_string(), self.policy.on_failure())),
            state: Some(self.state),
            outcome,
            bound,
        }
    }

    /// The pods that were bound when the evaluation was asked for: only for them does its
    /// answer decide anything (an unbound pod is not pending yet).
    fn bound(&self) -> HashSet<String> {
        self.pods
            .iter()
            .filter(|p| p.node.is_some())
            .map(|p| p.uid.clone())
            .collect()
    }

    /// The evaluation could not run: nothing changes, try again soon.
    pub fn not_run(self, why: &str, now: Instant) -> GateDone {
        GateDone {
            owner: self.owner,
            policy: self.policy.name().to_string(),
            failure: Some((why.to_string(), crate::rollout::batch::OnFailure::Hold)),
            state: Some(self.state),
            outcome: GateOutcome {
                holds: Vec::new(),
                recheck_at: Some(now + RETRY_AFTER),
                newly_admitted: Vec::new(),
            },
            bound: HashSet::new(),
        }
    }
}

impl GateDone {
    /// An evaluation that was lost (its job panicked): the owner starts over soon.
    pub fn lost(owner: String, why: &str, now: Instant) -> GateDone {
        GateDone {
            owner,
            policy: String::new(),
            failure: Some((why.to_string(), crate::rollout::batch::OnFailure::Hold)),
            state: None,
            outcome: GateOutcome {
                holds: Vec::new(),
                recheck_at: Some(now + RETRY_AFTER),
                newly_admitted: Vec::new(),
            },
            bound: HashSet::new(),
        }
    }
}

/// The result of a [`GateJob`].
pub struct GateDone {
    /// The owner.
    pub owner: String,
    policy: String,
    failure: Option<(String, crate::rollout::batch::OnFailure)>,
    state: Option<GateState>,
    outcome: GateOutcome,
    bound: HashSet<String>,
}

/// What [`BatchGates::complete`] returns: the holds, the pods decided on, evaluate again.
pub type Completed = (Vec<(String, Option<Note>)>, HashSet<String>, bool);

/// What a request to evaluate an owner leads to.
pub enum Request {
    /// No policy: every pod of the owner may install.
    Release,
    /// An evaluation is running; another one follows it.
    Queued,
    /// Run this evaluation.
    Run(Box<GateJob>),
}

/// The gates of every gated Deployment.
#[derive(Default)]
pub struct BatchGates {
    gates: HashMap<String, GateState>,
    running: HashSet<String>,
    dirty: HashSet<String>,
    decided: HashSet<String>,
    recheck: HashMap<String, Instant>,
}

/// The hold of a pod whose owner's policy has not decided yet.
pub fn pending_note(policy: &str) -> Note {
    Note {
        reason: HOLD_REASON.into(),
        message: format!("waiting for batch policy {policy} to decide"),
    }
}

impl BatchGates {
    /// Asks for an evaluation of `owner`'s rollout.
    pub fn request(
        &mut self,
        owner: &str,
        policy: Option<Arc<dyn BatchPolicy>>,
        pods: Vec<GatePod>,
        desired: u32,
        annotations: &BTreeMap<String, String>,
        now: Instant,
    ) -> Request {
        let Some(policy) = policy else {
            self.gates.remove(owner);
            self.recheck.remove(owner);
            self.dirty.remove(owner);
            self.decided.remove(owner);
            return Request::Release;
        };
        if self.running.contains(owner) {
            self.dirty.insert(owner.to_string());
            return Request::Queued;
        }
        self.running.insert(owner.to_string());
        self.recheck.remove(owner);
        let state = self.gates.remove(owner).unwrap_or_default();
        Request::Run(Box::new(GateJob {
            owner: owner.to_string(),
            policy,
            state,
            pods,
            desired,
            annotations: annotations.clone(),
            now,
        }))
    }

    /// Takes an evaluation's result back: its holds, the pods it decided on (those bound when
    /// it was asked for), and whether to evaluate again at once (something changed meanwhile).
    pub fn complete(&mut self, done: GateDone) -> Completed {
        let owner = done.owner;
        self.running.remove(&owner);
        if let Some(state) = done.state {
            self.gates.insert(owner.clone(), state);
        }
        self.decided.insert(owner.clone());
        if let Some((error, on_failure)) = &done.failure {
            warn!(%owner, policy = %done.policy, ?on_failure, %error, "batch policy failed; its failure policy decided");
        }
        if !done.outcome.newly_admitted.is_empty() {
            info!(
                %owner,
                policy = %done.policy,
                admitted = done.outcome.newly_admitted.len(),
                "batch admitted"
            );
        }
        match done.outcome.recheck_at {
            Some(t) => self.recheck.insert(owner.clone(), t),
            None => self.recheck.remove(&owner),
        };
        (done.outcome.holds, done.bound, self.dirty.remove(&owner))
    }

    /// Owners whose policy asked to be evaluated again by `now`.
    pub fn due(&self, now: Instant) -> Vec<String> {
        let mut v: Vec<String> = self
            .recheck
            .iter()
            .filter(|(o, t)| **t <= now && !self.running.contains(*o))
            .map(|(o, _)| o.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether `owner` has been evaluated at least once (its pods have real decisions).
    pub fn decided(&self, owner: &str) -> bool {
        self.decided.contains(owner)
    }

    /// Number of gated owners.
    pub fn len(&self) -> usize {
        self.gates.len() + self.running.len()
    }

    /// Whether no owner is gated.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
