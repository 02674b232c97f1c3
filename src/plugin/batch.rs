//! Batch-policy bindings as [`BatchPolicy`]: a loaded plugin version, or a binding whose plugin
//! is not loaded (it fails every decision, so its failure policy decides — hold by default).

use std::sync::Arc;

use crate::rollout::batch::{
    BatchDecision, BatchError, BatchPolicy, OnFailure, PendingInstall, RolloutView,
    validate_decision,
};

use super::bindings::wit_batch;
use super::faults::{Reporter, reasons};
use super::kind::PluginKind;
use super::loader::{Hook, PluginVersion};

/// Calls one plugin version; failures are reported and returned so the caller's
/// `decide_with` applies the binding's failure policy.
pub(crate) struct WasmBatch {
    version: Arc<PluginVersion>,
    on_failure: OnFailure,
    reporter: Reporter,
}

impl WasmBatch {
    /// Wraps a loaded batch-policy version bound with `on_failure`.
    pub(crate) fn new(
        version: Arc<PluginVersion>,
        on_failure: OnFailure,
        reporter: Reporter,
    ) -> Self {
        WasmBatch {
            version,
            on_failure,
            reporter,
        }
    }

    fn fail(&self, owner: &str, reason: &str, message: String) -> String {
        let name = &self.version.name;
        self.reporter
            .fail(name, PluginKind::BatchPolicy, Some(owner), reason, message)
    }
}

/// The one conversion of a [`RolloutView`] to the plugin interface's record.
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

    fn on_failure(&self) -> OnFailure {
        self.on_failure
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
        self.reporter
            .metrics
            .call(&self.version.name, PluginKind::BatchPolicy, stats.elapsed);
        let d = match result {
            Ok(Ok(d)) => d,
            Ok(Err(msg)) => {
                let text = self.fail(&view.owner, reasons::RETURNED_ERROR, msg);
                return Err(BatchError::PolicyFailed(text));
            }
            Err(f) => {
                let text = self.fail(&view.owner, f.reason, f.message);
                return Err(BatchError::PolicyFailed(text));
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

/// A batch policy bound in the manifest whose plugin has no loaded version (file missing,
/// refused, or of another kind). It fails every decision so that its failure policy decides:
/// resolving it as admit-all would let a broken canary release the rollout.
pub(crate) struct UnloadedBatch {
    name: String,
    why: String,
    on_failure: OnFailure,
    reporter: Reporter,
}

impl UnloadedBatch {
    /// Binding `name`, not loaded because of `why`.
    pub(crate) fn new(name: &str, why: String, on_failure: OnFailure, reporter: Reporter) -> Self {
        UnloadedBatch {
            name: name.to_string(),
            why,
            on_failure,
            reporter,
        }
    }
}

impl BatchPolicy for UnloadedBatch {
    fn name(&self) -> &str {
        &self.name
    }

    fn on_failure(&self) -> OnFailure {
        self.on_failure
    }

    fn decide(
        &self,
        view: &RolloutView,
        _pending: &[PendingInstall],
    ) -> Result<BatchDecision, BatchError> {
        // Reported against the Deployment, so its Events say why its rollout waits.
        let text = self.reporter.fail(
            &self.name,
            PluginKind::BatchPolicy,
            Some(&view.owner),
            reasons::LOAD_FAILED,
            format!("batch policy {} is not loaded: {}", self.name, self.why),
        );
        Err(BatchError::PolicyFailed(text))
    }
}
