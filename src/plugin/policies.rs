//! Rules from the WASM plugin host, as the controller's [`PolicySource`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::rollout::batch::BatchPolicy;
use crate::rollout::ordering::OrderingRule;
use crate::rollout::{PolicySource, is_admit_all};

use super::host::PluginHost;

/// The plugin host's current bindings (hot-reloaded underneath).
pub struct PluginPolicies(pub PluginHost);

impl PolicySource for PluginPolicies {
    fn ordering(&self) -> Arc<dyn OrderingRule> {
        self.0.ordering_rule()
    }

    fn batch_policy(&self, annotations: &BTreeMap<String, String>) -> Option<Arc<dyn BatchPolicy>> {
        let p = self.0.batch_policy_for(annotations);
        (!is_admit_all(p.as_ref())).then_some(p)
    }
}
