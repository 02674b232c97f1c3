//! Pod I/O: status writes and final deletion.

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use kube::api::{Api, DeleteParams, Patch, PatchParams};

use crate::kube_util::{KubeCtx, count_write};
use crate::vnode::lease::is_not_found;

/// Writes a pod's status (merge patch of the status subresource); a vanished pod is not an error.
pub async fn patch_status(
    ctx: &KubeCtx,
    namespace: &str,
    name: &str,
    status: &PodStatus,
) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let body = serde_json::json!({ "status": status });
    let _permit = ctx.writes.acquire().await;
    match api
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
        .await
    {
        Ok(_) => {
            count_write("pod_status", true);
            Ok(())
        }
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => {
            count_write("pod_status", false);
            Err(e)
        }
    }
}

/// Removes a pod from the apiserver at once (grace 0), preconditioned on its uid.
pub async fn delete_now(
    ctx: &KubeCtx,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(kube::api::Preconditions {
            uid: Some(uid.to_string()),
            resource_version: None,
        }),
        ..Default::default()
    };
    let _permit = ctx.writes.acquire().await;
    match api.delete(name, &dp).await {
        Ok(_) => {
            count_write("pod_delete", true);
            Ok(())
        }
        Err(e) if is_not_found(&e) || matches!(&e, kube::Error::Api(s) if s.code == 409) => Ok(()),
        Err(e) => {
            count_write("pod_delete", false);
            Err(e)
        }
    }
}
