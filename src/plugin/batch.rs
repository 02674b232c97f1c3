//! A batch-policy plugin version as a [`BatchPolicy`].

use std::sync::Arc;

use crate::rollout::batch::{
    BatchDecision, BatchError, BatchPolicy, PendingInstall, RolloutView, validate_decision,
};

use super::bindings::wit_batch;
use super::faults::{FaultSink, PluginFault, reasons};
use super::loader::{Hook, PluginVersion};
use super::{PluginKind, telemetry};

/// Calls one plugin version; failures are reported and returned so the caller's
/// `decide_with` lets the built-in policy decide.
pub(crate) struct WasmBatch {
    version: Arc<PluginVersion>,
    faults: Arc<FaultSink>,
}

impl WasmBatch {
    /// Wraps a loaded batch-policy version.
    pub(crate) fn new(version: Arc<PluginVersion>, faults: Arc<FaultSink>) -> Self {
        WasmBatch { version, faults }
    }

    /// The loaded version this wrapper calls.
    pub(crate) fn version(&self) -> &Arc<PluginVersion> {
        &self.version
    }

    fn fail(&self, subject: &str, reason: &str, message: String) -> String {
        telemetry::failure(&self.version.name, PluginKind::BatchPolicy, reason);
        self.faults.emit(PluginFault {
            plugin: self.version.name.to_string(),
            kind: PluginKind::BatchPolicy,
            reason: reason.to_string(),
            message: message.clone(),
            subject: Some(subject.to_string()),
        });
        format!("{reason}: {message}")
    }
}

fn view_to_wire(v: &RolloutView) -> wit_batch::RolloutView {
    wit_batch::RolloutView {
        owner: v.owner.clone(),
        module: v.module.clone(),
        new_version: v.new_version.clone(),
        old_version: v.old_version.clone(),
        desired: v.desired,
        updated_ready: v.updated_ready,
        updated_installing: v.updated_installing,
        old_ready: v.old_ready,
        elapsed_ms: v.elapsed_ms,
        since_last_ready_ms: v.since_last_ready_ms,
    }
}

fn pending_to_wire(p: &PendingInstall) -> wit_batch::PendingInstall {
    wit_batch::PendingInstall {
        base_id: p.base_id.clone(),
        pod: p.pod.clone(),
        creation_ts: p.creation_ts,
    }
}

impl BatchPolicy for WasmBatch {
    fn name(&self) -> &str {
        &self.version.name
    }

    fn decide(
        &self,
        view: &RolloutView,
        pending: &[PendingInstall],
    ) -> Result<BatchDecision, BatchError> {
        let Hook::Batch(indices) = &self.version.hook else {
            return Err(BatchError::PolicyFailed("not a batch-policy plugin".into()));
        };
        let wire_view = view_to_wire(view);
        let wire_pending: Vec<wit_batch::PendingInstall> =
            pending.iter().map(pending_to_wire).collect();
        let annotations = Some(Arc::new(view.annotations.clone()));
        let (result, stats) = self.version.call(annotations, |s, i| {
            indices
                .load(&mut *s, i)?
                .call_decide(&mut *s, &wire_view, &wire_pending)
        });
        telemetry::call(&self.version.name, PluginKind::BatchPolicy, stats.elapsed);
        let d = match result {
            Ok(Ok(d)) => d,
            Ok(Err(msg)) => {
                return Err(BatchError::PolicyFailed(self.fail(
                    &view.owner,
                    reasons::RETURNED_ERROR,
                    msg,
                )));
            }
            Err(f) => {
                return Err(BatchError::PolicyFailed(self.fail(
                    &view.owner,
                    f.reason,
                    f.message,
                )));
            }
        };
        let decision = BatchDecision {
            admit: d.admit.into_iter().map(|i| i as usize).collect(),
            hold_reason: d.hold_reason,
            recheck_after_ms: d.recheck_after_ms,
        };
        validate_decision(pending.len(), decision).inspect_err(|e| {
            self.fail(&view.owner, reasons::INVALID_OUTPUT, e.to_string());
        })
    }
}
