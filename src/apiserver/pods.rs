//! Module pods: status writes and the final removal of a pod whose modules are gone.

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{Api as KubeApi, DeleteParams, Patch, PatchParams, Preconditions};

use super::Api;

impl Api {
    /// Writes a pod's status (merge patch of the status subresource); a vanished pod is not an
    /// error.
    pub async fn patch_pod_status(
        &self,
        namespace: &str,
        name: &str,
        status: &PodStatus,
    ) -> Result<(), kube::Error> {
        let api: KubeApi<Pod> = KubeApi::namespaced(self.client.clone(), namespace);
        let body = serde_json::json!({ "status": status });
        let _permit = self.module_permit().await;
        let r = self
            .timed(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body)))
            .await;
        self.counted_gone_ok("pod_status", r)
    }

    /// Removes a pod from the apiserver at once (grace 0), preconditioned on its uid so that a
    /// new pod of the same name is never removed by mistake.
    pub async fn delete_pod_now(
        &self,
        namespace: &str,
        name: &str,
        uid: &str,
    ) -> Result<(), kube::Error> {
        let api: KubeApi<Pod> = KubeApi::namespaced(self.client.clone(), namespace);
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..Default::default()
        };
        let _permit = self.module_permit().await;
        let r = self.timed(api.delete(name, &dp)).await;
        self.counted_gone_ok("pod_delete", r)
    }
}
