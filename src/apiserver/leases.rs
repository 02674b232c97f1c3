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
        match self
            .timed(api.patch(node, &PatchParams::default(), &Patch::Merge(&patch)))
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
                self.counted(
                    "lease",
                    self.timed(api.create(&PostParams::default(), &lease)).await,
                )
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
        let r = self
            .timed(leases.delete(node, &DeleteParams::default()))
            .await;
        self.counted_gone_ok("node_delete", r)
    }
}

/// An ownership Lease as the shard logic sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerLease {
    /// Lease name (the VNode name, or a replica's membership name).
    pub name: String,
    /// Current holder, if any.
    pub holder: Option<String>,
    /// Lease duration in seconds.
    pub duration_secs: i32,
    /// The object's resourceVersion (optimistic concurrency).
    pub resource_version: Option<String>,
    /// Where the holder's HTTP tunnel listens (for forwarded heartbeats).
    pub endpoint: Option<String>,
    /// Holder transitions so far.
    pub transitions: i32,
}

/// Annotation of an ownership Lease: the holder's HTTP tunnel URL.
pub const ENDPOINT_ANNOTATION: &str = "module-controller.koupleless.io/http-endpoint";

impl OwnerLease {
    /// Reads the fields the shard logic needs.
    pub fn from_lease(l: &Lease) -> Option<Self> {
        let spec = l.spec.clone().unwrap_or_default();
        Some(OwnerLease {
            name: l.metadata.name.clone()?,
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration_secs: spec.lease_duration_seconds.unwrap_or(15),
            resource_version: l.metadata.resource_version.clone(),
            endpoint: l
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ENDPOINT_ANNOTATION))
                .cloned(),
            transitions: spec.lease_transitions.unwrap_or(0),
        })
    }
}

/// What to write into an ownership Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerClaim {
    /// Lease name.
    pub name: String,
    /// New holder (`None` releases it).
    pub holder: Option<String>,
    /// Duration in seconds.
    pub duration_secs: i32,
    /// The version this write is based on (`None`: create).
    pub resource_version: Option<String>,
    /// The holder's HTTP tunnel URL.
    pub endpoint: Option<String>,
    /// Labels (the env, the kind of lease).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Holder transitions after this write.
    pub transitions: i32,
}

impl Api {
    /// Creates (no version) or replaces (at `resource_version`, failing with 409 when someone
    /// else wrote first) an ownership Lease in `namespace`; returns the new version.
    pub async fn write_owner_lease(
        &self,
        namespace: &str,
        claim: &OwnerClaim,
    ) -> Result<Option<String>, kube::Error> {
        let api: KubeApi<Lease> = KubeApi::namespaced(self.client.clone(), namespace);
        let now = now_micro();
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(claim.name.clone()),
                namespace: Some(namespace.to_string()),
                resource_version: claim.resource_version.clone(),
                labels: Some(claim.labels.clone()),
                annotations: claim.endpoint.clone().map(|e| {
                    std::collections::BTreeMap::from([(ENDPOINT_ANNOTATION.to_string(), e)])
                }),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: claim.holder.clone(),
                lease_duration_seconds: Some(claim.duration_secs),
                acquire_time: claim.holder.as_ref().map(|_| now.clone()),
                renew_time: claim.holder.as_ref().map(|_| now.clone()),
                lease_transitions: Some(claim.transitions),
                ..Default::default()
            }),
        };
        let _permit = self.node_permit().await;
        let written = match &claim.resource_version {
            None => self.counted(
                "owner_lease",
                self.timed(api.create(&PostParams::default(), &lease)).await,
            ),
            Some(_) => self.counted(
                "owner_lease",
                self.timed(api.replace(&claim.name, &PostParams::default(), &lease))
                    .await,
            ),
        }?;
        Ok(written.metadata.resource_version)
    }

    /// Deletes an ownership Lease; an absent one is fine.
    pub async fn delete_owner_lease(&self, namespace: &str, name: &str) -> Result<(), kube::Error> {
        let api: KubeApi<Lease> = KubeApi::namespaced(self.client.clone(), namespace);
        let _permit = self.node_permit().await;
        let r = self.timed(api.delete(name, &DeleteParams::default())).await;
        self.counted_gone_ok("owner_lease", r)
    }
}
