//! The Node object of a VNode: apply, status, delete, and listing a controller's VNodes.

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use kube::api::{Api as KubeApi, DeleteParams, ListParams, Patch, PatchParams};
use tracing::debug;

use super::{Api, MANAGER};

impl Api {
    /// Creates or updates the Node's metadata and spec (server-side apply); returns its uid.
    pub async fn apply_node(&self, node: &Node) -> Result<Option<String>, kube::Error> {
        let api: KubeApi<Node> = KubeApi::all(self.client.clone());
        let name = node.metadata.name.clone().unwrap_or_default();
        let mut body = node.clone();
        body.status = None;
        let _permit = self.node_permit().await;
        let n = self.counted(
            "node",
            self.timed(api.patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&body),
            ))
            .await,
        )?;
        debug!(node = %name, "node applied");
        Ok(n.metadata.uid)
    }

    /// Replaces the Node's status (merge patch of the status subresource).
    pub async fn patch_node_status(
        &self,
        name: &str,
        status: &NodeStatus,
    ) -> Result<(), kube::Error> {
        let api: KubeApi<Node> = KubeApi::all(self.client.clone());
        let body = serde_json::json!({ "status": status });
        let _permit = self.node_permit().await;
        self.counted(
            "node_status",
            self.timed(api.patch_status(name, &PatchParams::default(), &Patch::Merge(&body)))
                .await,
        )?;
        Ok(())
    }

    /// Marks the Node unschedulable, so nothing new binds to it while it is drained.
    pub async fn cordon_node(&self, name: &str) -> Result<(), kube::Error> {
        let api: KubeApi<Node> = KubeApi::all(self.client.clone());
        let body = serde_json::json!({ "spec": { "unschedulable": true } });
        let _permit = self.node_permit().await;
        let r = self
            .timed(api.patch(name, &PatchParams::default(), &Patch::Merge(&body)))
            .await;
        self.counted_gone_ok("node", r)
    }

    /// Deletes the Node and its Lease; absent objects are fine.
    pub async fn delete_node(&self, node: &str) -> Result<(), kube::Error> {
        self.delete_node_lease(node).await?;
        let nodes: KubeApi<Node> = KubeApi::all(self.client.clone());
        let _permit = self.node_permit().await;
        let r = self
            .timed(nodes.delete(node, &DeleteParams::default()))
            .await;
        self.counted_gone_ok("node_delete", r)
    }

    /// Nodes matching a label selector.
    pub async fn list_nodes(&self, selector: &str) -> Result<Vec<Node>, kube::Error> {
        let api: KubeApi<Node> = KubeApi::all(self.client.clone());
        Ok(api
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }
}
