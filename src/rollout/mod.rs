//! Rollout decisions: in which order status changes on one base are written, and which
//! installs of a rollout may proceed. Pure logic with built-in defaults; plugins refine them.
//! (Peer replica sync is not a rollout decision: see [`crate::peer`].)

pub mod batch;
pub mod gate;
pub mod ordering;

use std::collections::BTreeMap;
use std::sync::Arc;

use batch::{AdmitAll, BatchPolicy};

/// Name of the built-in admit-all policy (a plugin host answering with it means "no gating").
pub fn is_admit_all(p: &dyn BatchPolicy) -> bool {
    p.name() == AdmitAll.name()
}
use ordering::{DefaultOrdering, OrderingRule};

/// Where the controller gets its current rules from (built-ins, or the plugin host).
pub trait PolicySource: Send + Sync {
    /// The status-ordering rule to use now.
    fn ordering(&self) -> Arc<dyn OrderingRule>;
    /// The batch policy for a Deployment with these annotations; `None` admits every install
    /// at once (the Deployment's own maxSurge/maxUnavailable pace the rollout).
    fn batch_policy(&self, annotations: &BTreeMap<String, String>) -> Option<Arc<dyn BatchPolicy>>;
}

/// The built-in rules only.
#[derive(Debug, Default, Clone, Copy)]
pub struct BuiltinPolicies;

impl PolicySource for BuiltinPolicies {
    fn ordering(&self) -> Arc<dyn OrderingRule> {
        Arc::new(DefaultOrdering)
    }

    fn batch_policy(
        &self,
        _annotations: &BTreeMap<String, String>,
    ) -> Option<Arc<dyn BatchPolicy>> {
        None
    }
}
