//! Deployment writes: the `scale` subresource of peer Deployments.

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api as KubeApi, Patch, PatchParams};

use super::Api;

impl Api {
    /// Sets a Deployment's replicas through its `scale` subresource.
    pub async fn scale_deployment(
        &self,
        namespace: &str,
        name: &str,
        replicas: i32,
    ) -> Result<(), kube::Error> {
        let api: KubeApi<Deployment> = KubeApi::namespaced(self.client.clone(), namespace);
        let patch = serde_json::json!({"spec": {"replicas": replicas}});
        let _permit = self.module_permit().await;
        self.counted(
            "deployment_scale",
            self.timed(api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&patch)))
                .await,
        )
        .map(|_| ())
    }
}
