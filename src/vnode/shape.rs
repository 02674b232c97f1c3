//! The Node a base becomes (protocol.md, "The VNode a base becomes"). Pure functions.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use sha2::Digest;

use crate::model::{BaseHealth, BaseHeartbeat};

/// Label marking VNodes.
pub const COMPONENT_LABEL: &str = "virtual-kubelet.koupleless.io/component";
/// Label holding the env of a VNode.
pub const ENV_LABEL: &str = "virtual-kubelet.koupleless.io/env";
/// Base name label.
pub const BASE_NAME_LABEL: &str = "base.koupleless.io/name";
/// Base version label.
pub const BASE_VERSION_LABEL: &str = "base.koupleless.io/version";
/// Base cluster label.
pub const BASE_CLUSTER_LABEL: &str = "base.koupleless.io/cluster-name";
/// Taint every VNode carries so only module pods land there.
pub const VIRTUAL_NODE_TAINT: &str = "schedule.koupleless.io/virtual-node";
/// Env taint key.
pub const NODE_ENV_TAINT: &str = "schedule.koupleless.io/node-env";
/// Label naming the tunnel (or tunnel adapter) a VNode's base speaks.
pub const TUNNEL_LABEL: &str = "vnode.koupleless.io/tunnel";

/// Annotation of a VNode recording the package URL each of its modules was installed from
/// (`{"name@version": url}`): bases do not report it, and a restarted controller needs it to
/// tell an in-place replacement from an installed module.
pub const MODULE_URLS_ANNOTATION: &str = "module-controller.koupleless.io/module-urls";

/// Annotation of a VNode holding its base's identity exactly as the base spells it.
pub const IDENTITY_ANNOTATION: &str = "base.koupleless.io/identity";

/// Longest node name the apiserver accepts (a DNS-1123 subdomain).
const MAX_NODE_NAME: usize = 253;

/// Node name of a base: `vnode.<identity>.<env>`. An identity that is not valid in a node name
/// (uppercase, `_`, `:`, …) maps deterministically to a valid one: lowercased, other characters
/// replaced by `-`, plus a hash of the original so that two identities never share a node.
pub fn node_name(base_id: &str, env: &str) -> String {
    if is_dns_subdomain(base_id) && base_id.len() + env.len() + 7 <= MAX_NODE_NAME {
        return format!("vnode.{base_id}.{env}");
    }
    let digest = sha2::Sha256::digest(base_id.as_bytes());
    let hash: String = hex::encode(digest).chars().take(8).collect();
    let mut safe: Vec<String> = base_id
        .to_ascii_lowercase()
        .split('.')
        .map(|seg| {
            let s: String = seg
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            s.trim_matches('-').to_string()
        })
        .filter(|s| !s.is_empty())
        .collect();
    let budget = MAX_NODE_NAME.saturating_sub(env.len() + 7 + hash.len() + 1);
    let mut joined = safe.join(".");
    if joined.len() > budget {
        joined.truncate(budget);
        safe = joined
            .split('.')
            .map(|s| s.trim_matches('-').to_string())
            .filter(|s| !s.is_empty())
            .collect();
        joined = safe.join(".");
    }
    if joined.is_empty() {
        format!("vnode.{hash}.{env}")
    } else {
        format!("vnode.{joined}-{hash}.{env}")
    }
}

/// Whether `s` is a DNS-1123 subdomain (what a node name must be).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NODE_NAME
        && s.split('.').all(|seg| {
            let b = seg.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

/// Whether `node` is a VNode name of `env`.
pub fn is_vnode_name(node: &str, env: &str) -> bool {
    base_id_of(node, env).is_some()
}

/// The identity part of a VNode name of `env` (the base identity itself unless it had to be
/// mapped; the exact identity is then in the node's [`IDENTITY_ANNOTATION`]).
pub fn base_id_of(node_name: &str, env: &str) -> Option<String> {
    let id = node_name
        .strip_prefix("vnode.")?
        .strip_suffix(env)?
        .strip_suffix('.')?;
    (!id.is_empty()).then(|| id.to_string())
}

/// What the node shape depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeShapeInput<'a> {
    /// Latest heartbeat.
    pub heartbeat: &'a BaseHeartbeat,
    /// Latest health, if any.
    pub health: Option<&'a BaseHealth>,
    /// Controller env.
    pub env: &'a str,
    /// Tunnel (codec) name the base speaks.
    pub tunnel: &'a str,
    /// Whether to add the env taint.
    pub env_taint: bool,
    /// The module URLs to record ([`MODULE_URLS_ANNOTATION`]), when known.
    pub module_urls: Option<&'a str>,
}

/// Labels of a VNode.
pub fn labels(i: &NodeShapeInput<'_>) -> BTreeMap<String, String> {
    let md = &i.heartbeat.metadata;
    let host = if i.heartbeat.local_host_name.is_empty() {
        node_name(&md.identity, i.env)
    } else {
        i.heartbeat.local_host_name.clone()
    };
    let mut l = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        l.insert(k.to_string(), label_value(v));
    };
    put(BASE_NAME_LABEL, &md.name);
    put(BASE_VERSION_LABEL, &md.version);
    put(BASE_CLUSTER_LABEL, &md.cluster_name);
    put("vnode.koupleless.io/name", &md.name);
    put("vnode.koupleless.io/version", &md.version);
    put("base.koupleless.io/stack", "java");
    put("kubernetes.io/hostname", &host);
    put(COMPONENT_LABEL, "vnode");
    put(ENV_LABEL, i.env);
    put(TUNNEL_LABEL, i.tunnel);
    put("kubernetes.io/os", "linux");
    put("type", "virtual-kubelet");
    l
}

/// Coerces a string into a valid label value (≤63 chars of `[A-Za-z0-9._-]`, alphanumeric ends).
pub fn label_value(v: &str) -> String {
    let s: String = v
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(63)
        .collect();
    s.trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// Taints of a VNode.
pub fn taints(env: &str, env_taint: bool) -> Vec<Taint> {
    let mut t = vec![Taint {
        key: VIRTUAL_NODE_TAINT.into(),
        value: Some("True".into()),
        effect: "NoExecute".into(),
        time_added: None,
    }];
    if env_taint {
        t.push(Taint {
            key: NODE_ENV_TAINT.into(),
            value: Some(env.into()),
            effect: "NoExecute".into(),
            time_added: None,
        });
    }
    t
}

/// The Node object (metadata and spec) to create or apply.
pub fn node(i: &NodeShapeInput<'_>) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(node_name(&i.heartbeat.metadata.identity, i.env)),
            labels: Some(labels(i)),
            annotations: Some(annotations(i)),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(taints(i.env, i.env_taint)),
            ..Default::default()
        }),
        status: None,
    }
}

/// Annotations of a VNode: the exact base identity, and the module URLs when known.
pub fn annotations(i: &NodeShapeInput<'_>) -> BTreeMap<String, String> {
    let mut a = BTreeMap::from([(
        IDENTITY_ANNOTATION.to_string(),
        i.heartbeat.metadata.identity.clone(),
    )]);
    if let Some(urls) = i.module_urls.filter(|u| !u.is_empty() && *u != "{}") {
        a.insert(MODULE_URLS_ANNOTATION.to_string(), urls.to_string());
    }
    a
}

/// Capacity and allocatable: memory from metaspace (skipped when unlimited or unknown),
/// cpu and pods generous so the scheduler can place modules.
pub fn resources(
    health: Option<&BaseHealth>,
) -> (BTreeMap<String, Quantity>, BTreeMap<String, Quantity>) {
    let mut cap = BTreeMap::new();
    cap.insert("cpu".to_string(), Quantity("1000".into()));
    cap.insert("pods".to_string(), Quantity("1000".into()));
    let mut alloc = cap.clone();
    if let Some(max) = health.and_then(|h| h.max_metaspace).filter(|m| *m > 0) {
        cap.insert("memory".to_string(), Quantity(max.to_string()));
        let committed = health
            .and_then(|h| h.committed_metaspace)
            .filter(|c| *c > 0)
            .unwrap_or(0);
        alloc.insert(
            "memory".to_string(),
            Quantity(max.saturating_sub(committed).max(0).to_string()),
        );
    }
    (cap, alloc)
}

/// Readiness as the VNode's Ready condition reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeReadiness {
    /// Heartbeats arrive.
    Ready,
    /// Heartbeats stopped.
    NotReady,
}

/// The Node status for the given readiness. `since` is the Ready condition's transition time.
pub fn status(
    i: &NodeShapeInput<'_>,
    readiness: NodeReadiness,
    since: Time,
    now: Time,
) -> NodeStatus {
    let (capacity, allocatable) = resources(i.health);
    let hb = i.heartbeat;
    let mut addresses = Vec::new();
    if !hb.local_ip.is_empty() {
        addresses.push(NodeAddress {
            type_: "InternalIP".into(),
            address: hb.local_ip.clone(),
        });
    }
    if !hb.local_host_name.is_empty() {
        addresses.push(NodeAddress {
            type_: "Hostname".into(),
            address: hb.local_host_name.clone(),
        });
    }
    let (st, reason, message) = match readiness {
        NodeReadiness::Ready => ("True", "BaseReady", "base is sending heartbeats"),
        NodeReadiness::NotReady => (
            "False",
            "BaseUnreachable",
            "base stopped sending heartbeats",
        ),
    };
    NodeStatus {
        addresses: Some(addresses),
        capacity: Some(capacity),
        allocatable: Some(allocatable),
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: st.into(),
            reason: Some(reason.into()),
            message: Some(message.into()),
            last_heartbeat_time: Some(now),
            last_transition_time: Some(since),
        }]),
        node_info: Some(NodeSystemInfo {
            architecture: "amd64".into(),
            operating_system: "linux".into(),
            kubelet_version: format!("module-controller/{}", env!("CARGO_PKG_VERSION")),
            kube_proxy_version: String::new(),
            os_image: format!("koupleless base {}", hb.metadata.version),
            kernel_version: String::new(),
            container_runtime_version: format!("koupleless://{}", hb.metadata.name),
            machine_id: hb.metadata.identity.clone(),
            system_uuid: hb.metadata.identity.clone(),
            boot_id: String::new(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Whether two statuses differ in anything but heartbeat timestamps.
pub fn status_differs(a: &NodeStatus, b: &NodeStatus) -> bool {
    let strip = |s: &NodeStatus| {
        let mut s = s.clone();
        if let Some(c) = s.conditions.as_mut() {
            for c in c.iter_mut() {
                c.last_heartbeat_time = None;
                c.last_transition_time = None;
            }
            c.sort_by(|x, y| x.type_.cmp(&y.type_));
        }
        (s.addresses, s.capacity, s.allocatable, s.conditions)
    };
    strip(a) != strip(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BaseLifecycle, BaseMetadata};

    fn hb() -> BaseHeartbeat {
        BaseHeartbeat {
            metadata: BaseMetadata {
                identity: "10.0.0.7".into(),
                name: "base".into(),
                version: "1.0.0".into(),
                cluster_name: "c1".into(),
            },
            local_ip: "10.0.0.7".into(),
            local_host_name: "host-7".into(),
            port: None,
            lifecycle: BaseLifecycle::Activated,
        }
    }

    #[test]
    fn names_round_trip_with_dots() {
        let n = node_name("10.0.0.7", "dev");
        assert_eq!(n, "vnode.10.0.0.7.dev");
        assert_eq!(base_id_of(&n, "dev").as_deref(), Some("10.0.0.7"));
        assert_eq!(base_id_of(&n, "prod"), None);
        assert_eq!(base_id_of("vnode..dev", "dev"), None);
        assert_eq!(base_id_of("worker-1", "dev"), None);
    }

    #[test]
    fn node_has_reference_labels_and_taints() {
        let h = hb();
        let i = NodeShapeInput {
            heartbeat: &h,
            health: None,
            env: "dev",
            tunnel: "mqtt",
            env_taint: true,
            module_urls: None,
        };
        let n = node(&i);
        let l = n.metadata.labels.expect("labels");
        assert_eq!(l["base.koupleless.io/name"], "base");
        assert_eq!(l["vnode.koupleless.io/version"], "1.0.0");
        assert_eq!(l["kubernetes.io/hostname"], "host-7");
        assert_eq!(l["virtual-kubelet.koupleless.io/env"], "dev");
        let t = n.spec.expect("spec").taints.expect("taints");
        assert_eq!(t.len(), 2);
        assert_eq!(taints("dev", false).len(), 1);
    }

    #[test]
    fn memory_comes_from_metaspace() {
        let h = BaseHealth {
            max_metaspace: Some(1000),
            committed_metaspace: Some(300),
            used_metaspace: Some(10),
        };
        let (cap, alloc) = resources(Some(&h));
        assert_eq!(cap["memory"].0, "1000");
        assert_eq!(alloc["memory"].0, "700");
        let unlimited = BaseHealth {
            max_metaspace: Some(-1),
            ..h
        };
        assert!(!resources(Some(&unlimited)).0.contains_key("memory"));
        assert_eq!(resources(None).1["pods"].0, "1000");
    }

    #[test]
    fn heartbeat_time_alone_is_not_a_change() {
        let h = hb();
        let i = NodeShapeInput {
            heartbeat: &h,
            health: None,
            env: "dev",
            tunnel: "mqtt",
            env_taint: true,
            module_urls: None,
        };
        let t0 = crate::time::time_from_ms(0).expect("t");
        let t1 = crate::time::time_from_ms(100_000).expect("t");
        let a = status(&i, NodeReadiness::Ready, t0.clone(), t0.clone());
        let b = status(&i, NodeReadiness::Ready, t0.clone(), t1);
        assert!(!status_differs(&a, &b));
        let c = status(&i, NodeReadiness::NotReady, t0.clone(), t0);
        assert!(status_differs(&a, &c));
    }

    #[test]
    fn identities_that_are_not_node_names_map_to_valid_distinct_names() {
        assert_eq!(node_name("10.1.2.3", "dev"), "vnode.10.1.2.3.dev");
        let a = node_name("Acc_Base_UPPER:1", "dev");
        assert!(is_dns_subdomain(&a), "{a}");
        assert!(
            a.starts_with("vnode.acc-base-upper-1-") && a.ends_with(".dev"),
            "{a}"
        );
        assert_eq!(a, node_name("Acc_Base_UPPER:1", "dev"), "deterministic");
        assert_ne!(
            a,
            node_name("acc_base_upper:1", "dev"),
            "case kept apart by the hash"
        );
        let odd = node_name("..__..", "dev");
        assert!(is_dns_subdomain(&odd), "{odd}");
        let long = node_name(&"X".repeat(400), "dev");
        assert!(
            is_dns_subdomain(&long) && long.len() <= 253,
            "{}",
            long.len()
        );
        assert!(base_id_of(&a, "dev").is_some());
    }
}
