//! Rollout decisions: in which order status changes on one base are written, and which
//! installs of a rollout may proceed. Pure logic with built-in defaults; plugins refine them.

pub mod batch;
pub mod ordering;

use std::collections::BTreeMap;
use std::sync::Arc;

use batch::{AdmitAll, BatchPolicy};
use ordering::{DefaultOrdering, OrderingRule};

/// Where the controller gets its current rules from (built-ins, or the plugin host).
pub trait PolicySource: Send + Sync {
    /// The status-ordering rule to use now.
    fn ordering(&self) -> Arc<dyn OrderingRule>;
    /// The batch policy for a Deployment with these annotations.
    fn batch_policy(&self, annotations: &BTreeMap<String, String>) -> Arc<dyn BatchPolicy>;
}

/// The built-in rules only.
#[derive(Debug, Default, Clone, Copy)]
pub struct BuiltinPolicies;

impl PolicySource for BuiltinPolicies {
    fn ordering(&self) -> Arc<dyn OrderingRule> {
        Arc::new(DefaultOrdering)
    }

    fn batch_policy(&self, _annotations: &BTreeMap<String, String>) -> Arc<dyn BatchPolicy> {
        Arc::new(AdmitAll)
    }
}
