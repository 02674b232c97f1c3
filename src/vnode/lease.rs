//! Node I/O: the Node object, its status and its Lease in `kube-node-lease`.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use tracing::debug;

use crate::kube_util::{KubeCtx, count_write, now_micro};

/// Namespace of node Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Lease duration in seconds (as the kubelet's default).
pub const LEASE_DURATION_SECS: i32 = 40;
const MANAGER: &str = "module-controller";

fn counted<T>(kind: &str, r: Result<T, kube::Error>) -> Result<T, kube::Error> {
    count_write(kind, r.is_ok());
    r
}

/// Whether an error is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Creates or updates the Node's metadata and spec (server-side apply); returns its uid.
pub async fn apply_node(ctx: &KubeCtx, node: &Node) -> Result<Option<String>, kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut body = node.clone();
    body.status = None;
    let _permit = ctx.writes.acquire().await;
    let n = counted(
        "node",
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await,
    )?;
    debug!(node = %name, "node applied");
    Ok(n.metadata.uid)
}

/// Replaces the Node's status (merge patch of the status subresource).
pub async fn patch_node_status(
    ctx: &KubeCtx,
    name: &str,
    status: &NodeStatus,
) -> Result<(), kube::Error> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let body = serde_json::json!({ "status": status });
    let _permit = ctx.writes.acquire().await;
    counted(
        "node_status",
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body))
            .await,
    )?;
    Ok(())
}

/// Creates or renews the Node's Lease, owned by the Node so it goes with it.
pub async fn renew_lease(
    ctx: &KubeCtx,
    node: &str,
    node_uid: Option<&str>,
) -> Result<(), kube::Error> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let spec = LeaseSpec {
        holder_identity: Some(node.to_string()),
        lease_duration_seconds: Some(LEASE_DURATION_SECS),
        renew_time: Some(now_micro()),
        ..Default::default()
    };
    let _permit = ctx.writes.acquire().await;
    let patch = serde_json::json!({ "spec": spec });
    match api
        .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {
            count_write("lease", true);
            Ok(())
        }
        Err(e) if is_not_found(&e) => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(node.to_string()),
                    namespace: Some(LEASE_NAMESPACE.to_string()),
                    owner_references: node_uid.map(|uid| {
                        vec![OwnerReference {
                            api_version: "v1".into(),
                            kind: "Node".into(),
                            name: node.to_string(),
                            uid: uid.to_string(),
                            ..Default::default()
                        }]
                    }),
                    ..Default::default()
                },
                spec: Some(spec),
            };
            counted("lease", api.create(&PostParams::default(), &lease).await).map(|_| ())
        }
        Err(e) => {
            count_write("lease", false);
            Err(e)
        }
    }
}

/// Deletes the Node and its Lease; absent objects are fine.
pub async fn delete_node(ctx: &KubeCtx, node: &str) -> Result<(), kube::Error> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let leases: Api<Lease> = Api::namespaced(ctx.client.clone(), LEASE_NAMESPACE);
    let _permit = ctx.writes.acquire().await;
    for r in [
        leases
            .delete(node, &DeleteParams::default())
            .await
            .map(|_| ()),
        nodes
            .delete(node, &DeleteParams::default())
            .await
            .map(|_| ()),
    ] {
        match r {
            Ok(()) => count_write("node_delete", true),
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                count_write("node_delete", false);
                return Err(e);
            }
        }
    }
    Ok(())
}
