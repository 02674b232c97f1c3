//! Node Leases in `kube-node-lease`: the heartbeat the node lifecycle controller reads.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api as KubeApi, DeleteParams, Patch, PatchParams, PostParams};

use super::{Api, is_not_found};
use crate::time::now_micro;

/// Namespace of node Leases.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";
/// Lease duration in seconds (as the kubelet's default).
pub const LEASE_DURATION_SECS: i32 = 40;

impl Api {
    /// Creates or renews the Node's Lease, owned by the Node so it goes with it.
    pub async fn renew_node_lease(
        &self,
        node: &str,
        node_uid: Option<&str>,
    ) -> Result<(), kube::Error> {
        let api: KubeApi<Lease> = KubeApi::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let spec = LeaseSpec {
            holder_identity: Some(node.to_string()),
            lease_duration_seconds: Some(LEASE_DURATION_SECS),
            renew_time: Some(now_micro()),
            ..Default::default()
        };
        let _permit = self.node_permit().await;
        let patch = serde_json::json!({ "spec": spec });
        match api
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                self.metrics.count("lease", true);
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
                self.counted("lease", api.create(&PostParams::default(), &lease).await)
                    .map(|_| ())
            }
            Err(e) => {
                self.metrics.count("lease", false);
                Err(e)
            }
        }
    }

    /// Deletes a Node's Lease; an absent one is fine.
    pub(super) async fn delete_node_lease(&self, node: &str) -> Result<(), kube::Error> {
        let leases: KubeApi<Lease> = KubeApi::namespaced(self.client.clone(), LEASE_NAMESPACE);
        let _permit = self.node_permit().await;
        let r = leases.delete(node, &DeleteParams::default()).await;
        self.counted_gone_ok("node_delete", r)
    }
}
