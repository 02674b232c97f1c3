//! A status-ordering plugin version as an [`OrderingRule`].

use std::sync::Arc;

use crate::rollout::ordering::{
    OrderingError, OrderingRule, StatusChange, Waves, validate_permutation,
};

use super::bindings::wit_ordering;
use super::faults::{Reporter, reasons};
use super::kind::PluginKind;
use super::loader::{Hook, PluginVersion};

/// Calls one plugin version; failures are reported and returned so the caller's
/// `order_with` lets the built-in default decide.
pub(crate) struct WasmOrdering {
    version: Arc<PluginVersion>,
    reporter: Reporter,
}

impl WasmOrdering {
    /// Wraps a loaded status-ordering version.
    pub(crate) fn new(version: Arc<PluginVersion>, reporter: Reporter) -> Self {
        WasmOrdering { version, reporter }
    }

    /// The loaded version this wrapper calls.
    pub(crate) fn version(&self) -> &Arc<PluginVersion> {
        &self.version
    }

    fn fail(&self, reason: &str, message: String) -> String {
        let name = &self.version.name;
        self.reporter
            .fail(name, PluginKind::StatusOrdering, None, reason, message)
    }
}

fn to_wire(c: &StatusChange) -> wit_ordering::StatusChange {
    wit_ordering::StatusChange {
        pod_index: c.pod_index,
        creation_ts: c.creation_ts,
        revision: c.revision,
        from_ready: c.from_ready,
        to_ready: c.to_ready,
        deleting: c.deleting,
    }
}

impl OrderingRule for WasmOrdering {
    fn name(&self) -> &str {
        &self.version.name
    }

    fn order(&self, changes: &[StatusChange]) -> Result<Waves, OrderingError> {
        let Hook::Ordering(indices) = &self.version.hook else {
            return Err(OrderingError::RuleFailed(
                "not a status-ordering plugin".into(),
            ));
        };
        let wire: Vec<wit_ordering::StatusChange> = changes.iter().map(to_wire).collect();
        let (result, stats) = self.version.call(None, |s, i| {
            indices.load(&mut *s, i)?.call_order(&mut *s, &wire)
        });
        self.reporter.metrics.call(
            &self.version.name,
            PluginKind::StatusOrdering,
            stats.elapsed,
        );
        let waves = match result {
            Ok(Ok(w)) => w,
            Ok(Err(msg)) => {
                return Err(OrderingError::RuleFailed(
                    self.fail(reasons::RETURNED_ERROR, msg),
                ));
            }
            Err(f) => return Err(OrderingError::RuleFailed(self.fail(f.reason, f.message))),
        };
        let waves: Waves = waves
            .into_iter()
            .map(|w| w.into_iter().map(|i| i as usize).collect())
            .collect();
        if let Err(e) = validate_permutation(changes.len(), &waves) {
            self.fail(
                reasons::INVALID_OUTPUT,
                format!(
                    "ordering of {} changes is not a permutation: {e}",
                    changes.len()
                ),
            );
            return Err(e);
        }
        Ok(waves)
    }
}
