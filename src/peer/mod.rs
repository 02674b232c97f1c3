//! Peer deployments: a Deployment labelled `virtual-kubelet.koupleless.io/strategy=peer` is kept
//! at one replica per Ready base it can run on (`ENABLE_MODULE_REPLICAS_SYNC_WITH_BASE`).
//!
//! The count is a pure function of the Deployment and the VNodes ([`peer_replicas`], [`plan`]);
//! [`run`] feeds it from two reflectors and writes the result to the Deployment's `scale`
//! subresource (RBAC: `patch` on `apps/deployments/scale`, `list`+`watch` on `apps/deployments`
//! and `nodes`).
//!
//! Which Deployments are ours: several controllers (one per env) may share a cluster, and a
//! controller that counted another env's Deployment against its own VNodes would scale it to
//! zero. So a Deployment that names an env — the label `virtual-kubelet.koupleless.io/env` on
//! the Deployment, or an `Equal` toleration of the env taint in its pod template — is only
//! handled by the controller of that env; one that names none is handled when at least one
//! VNode of this env (Ready or not) matches its scheduling constraints.

mod task;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, PodSpec};
use kube::ResourceExt;
use tokio::time::Instant;

use crate::vnode::shape::{COMPONENT_LABEL, ENV_LABEL, NODE_ENV_TAINT};

pub use task::{PeerMetrics, run};

/// What a base needs to know of a peer Deployment: which bases it runs on and its modules.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerTemplate {
    /// `namespace/Deployment/name`.
    pub owner: String,
    /// The pod template's spec (node selection).
    pub spec: Option<PodSpec>,
    /// Its modules.
    pub modules: Vec<crate::model::ModuleSpec>,
}

/// The template of a peer Deployment of `env`, if `d` is one.
pub fn peer_template(d: &Deployment, env: &str) -> Option<PeerTemplate> {
    if !is_peer(d) || d.metadata.deletion_timestamp.is_some() {
        return None;
    }
    if named_env(d).is_some_and(|e| e != env) {
        return None;
    }
    let template = &d.spec.as_ref()?.template;
    let pod = k8s_openapi::api::core::v1::Pod {
        metadata: template.metadata.clone().unwrap_or_default(),
        spec: template.spec.clone(),
        status: None,
    };
    let modules = crate::vpod::spec::modules_of(&pod)
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    Some(PeerTemplate {
        owner: format!(
            "{}/Deployment/{}",
            d.namespace().unwrap_or_default(),
            d.name_any()
        ),
        spec: template.spec.clone(),
        modules,
    })
}

/// The modules of the peer Deployments whose pods may run on `node`: a new base gets them
/// in its baseline, and they are not uninstalled while waiting for their pods.
pub fn modules_for(templates: &[PeerTemplate], node: &Node) -> Vec<crate::model::ModuleSpec> {
    let mut out: Vec<crate::model::ModuleSpec> = templates
        .iter()
        .filter(|t| schedulable_on(t.spec.as_ref(), node))
        .flat_map(|t| t.modules.iter().cloned())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Label that marks a Deployment as a peer deployment (value [`PEER_STRATEGY`]).
pub const STRATEGY_LABEL: &str = "virtual-kubelet.koupleless.io/strategy";
/// Value of [`STRATEGY_LABEL`] for peer deployments.
pub const PEER_STRATEGY: &str = "peer";

/// Quiet time after the last change before replicas are recomputed.
pub(crate) const DEBOUNCE: Duration = Duration::from_secs(1);
/// Upper bound on the wait when changes keep arriving (a flapping base still converges).
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(5);
/// Delay before a failed write is tried again.
pub(crate) const RETRY: Duration = Duration::from_secs(5);

/// Whether the Deployment is labelled as a peer deployment.
pub fn is_peer(deployment: &Deployment) -> bool {
    deployment.labels().get(STRATEGY_LABEL).map(String::as_str) == Some(PEER_STRATEGY)
}

/// The env a Deployment names: its own env label, else the value its pod template tolerates
/// for the env taint.
pub fn named_env(deployment: &Deployment) -> Option<String> {
    env_named(deployment.labels(), pod_spec(deployment))
}

/// The env a workload or pod names: its env label, else the value its pod spec tolerates for
/// the env taint.
pub fn env_named(
    labels: &std::collections::BTreeMap<String, String>,
    spec: Option<&PodSpec>,
) -> Option<String> {
    if let Some(env) = labels.get(ENV_LABEL) {
        return Some(env.clone());
    }
    spec?
        .tolerations
        .as_ref()?
        .iter()
        .find(|t| {
            t.key.as_deref() == Some(NODE_ENV_TAINT)
                && matches!(t.operator.as_deref(), None | Some("Equal"))
        })
        .and_then(|t| t.value.clone())
}

fn pod_spec(deployment: &Deployment) -> Option<&PodSpec> {
    deployment.spec.as_ref()?.template.spec.as_ref()
}

/// Replicas a peer Deployment should have: the number of Ready VNodes of `env` its pod template
/// can be scheduled on. `None` when the Deployment is not a peer deployment or is not this
/// env's (see the module docs).
pub fn peer_replicas(deployment: &Deployment, vnodes: &[Node], env: &str) -> Option<i32> {
    desired(deployment, vnodes.iter(), env)
}

fn desired<'a>(
    deployment: &Deployment,
    vnodes: impl Iterator<Item = &'a Node>,
    env: &str,
) -> Option<i32> {
    if !is_peer(deployment) {
        return None;
    }
    let named = named_env(deployment);
    if named.as_deref().is_some_and(|e| e != env) {
        return None;
    }
    let spec = pod_spec(deployment);
    let (mut matching, mut ready) = (0i32, 0i32);
    for node in vnodes.filter(|n| is_vnode_of(n, env) && schedulable_on(spec, n)) {
        matching = matching.saturating_add(1);
        if is_ready(node) {
            ready = ready.saturating_add(1);
        }
    }
    (named.is_some() || matching > 0).then_some(ready)
}

/// Whether the node is a VNode of `env`.
pub fn is_vnode_of(node: &Node, env: &str) -> bool {
    let labels = node.labels();
    labels.get(COMPONENT_LABEL).map(String::as_str) == Some("vnode")
        && labels.get(ENV_LABEL).map(String::as_str) == Some(env)
}

/// Ready condition True, schedulable, and not being deleted.
pub fn is_ready(node: &Node) -> bool {
    let unschedulable = node
        .spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false);
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    ready && !unschedulable && node.metadata.deletion_timestamp.is_none()
}

/// Whether a pod with this spec may be scheduled on `node` as far as `nodeSelector` and the
/// required node affinity go (taints and pod affinity are not considered).
pub fn schedulable_on(spec: Option<&PodSpec>, node: &Node) -> bool {
    let Some(spec) = spec else {
        return true;
    };
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let selector_ok = spec
        .node_selector
        .as_ref()
        .is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|na| {
            na.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    let affinity_ok = required.is_none_or(|r| {
        r.node_selector_terms
            .iter()
            .any(|t| term_matches(t, labels, node.metadata.name.as_deref()))
    });
    selector_ok && affinity_ok
}

/// A term is the AND of its requirements; an empty term matches nothing (as in Kubernetes).
fn term_matches(
    term: &NodeSelectorTerm,
    labels: &BTreeMap<String, String>,
    name: Option<&str>,
) -> bool {
    let exprs = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if exprs.is_empty() && fields.is_empty() {
        return false;
    }
    exprs
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            // metadata.name is the only node field selector Kubernetes supports.
            r.key == "metadata.name" && requirement_matches(r, name)
        })
}

fn requirement_matches(r: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = r.values.as_deref().unwrap_or_default();
    let contains = |v: &str| values.iter().any(|x| x == v);
    match r.operator.as_str() {
        "In" => value.is_some_and(contains),
        "NotIn" => !value.is_some_and(contains),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(actual), [bound]) = (value.and_then(|v| v.parse::<i64>().ok()), values)
            else {
                return false;
            };
            let Ok(bound) = bound.parse::<i64>() else {
                return false;
            };
            if r.operator == "Gt" {
                actual > bound
            } else {
                actual < bound
            }
        }
        _ => false,
    }
}

/// One replica change to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rescale {
    /// Namespace of the Deployment.
    pub namespace: String,
    /// Name of the Deployment.
    pub name: String,
    /// `resourceVersion` the decision was made on.
    pub resource_version: Option<String>,
    /// Current `spec.replicas` (Kubernetes defaults a missing value to 1).
    pub from: i32,
    /// Desired `spec.replicas`.
    pub to: i32,
}

/// The rescales that bring every peer Deployment of `env` in line with the VNodes.
pub fn plan<'a>(
    deployments: impl IntoIterator<Item = &'a Deployment>,
    vnodes: &[&Node],
    env: &str,
) -> Vec<Rescale> {
    deployments
        .into_iter()
        .filter(|d| d.metadata.deletion_timestamp.is_none())
        .filter_map(|d| {
            let to = desired(d, vnodes.iter().copied(), env)?;
            let from = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            (from != to).then(|| Rescale {
                namespace: d.namespace().unwrap_or_default(),
                name: d.name_any(),
                resource_version: d.resource_version(),
                from,
                to,
            })
        })
        .collect()
}

/// When to recompute: `DEBOUNCE` after the last change, at most `MAX_DELAY` after the first.
#[derive(Debug, Default)]
pub(crate) struct Debounce {
    first: Option<Instant>,
    last: Option<Instant>,
    retry: Option<Instant>,
}

impl Debounce {
    pub(crate) fn touch(&mut self, now: Instant) {
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    pub(crate) fn retry(&mut self, at: Instant) {
        self.retry = Some(at);
    }

    pub(crate) fn clear(&mut self) {
        *self = Debounce::default();
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        let change = match (self.first, self.last) {
            (Some(first), Some(last)) => Some((last + DEBOUNCE).min(first + MAX_DELAY)),
            _ => None,
        };
        match (change, self.retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// What was last written per Deployment, so a stale cache entry is not rescaled (and
/// announced) twice before the watch catches up.
#[derive(Debug, Default)]
pub(crate) struct Written(HashMap<(String, String), (Option<String>, i32)>);

impl Written {
    pub(crate) fn already(&self, r: &Rescale) -> bool {
        self.0
            .get(&(r.namespace.clone(), r.name.clone()))
            .is_some_and(|(rv, to)| *rv == r.resource_version && *to == r.to)
    }

    pub(crate) fn record(&mut self, r: &Rescale) {
        self.0.insert(
            (r.namespace.clone(), r.name.clone()),
            (r.resource_version.clone(), r.to),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn node(name: &str, env: &str, ready: &str, extra: Value) -> Node {
        let mut labels = json!({
            COMPONENT_LABEL: "vnode",
            ENV_LABEL: env,
            "base.koupleless.io/name": "base",
            "base.koupleless.io/version": "1.0.0",
            "base.koupleless.io/cluster-name": "c1",
        });
        if let (Some(l), Some(x)) = (labels.as_object_mut(), extra.as_object()) {
            for (k, v) in x {
                l.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "status": {"conditions": [{"type": "Ready", "status": ready}]}
        }))
        .expect("node")
    }

    fn deployment(labels: Value, pod_spec: Value) -> Deployment {
        let mut spec = json!({"containers": [{"name": "biz"}]});
        if let (Some(s), Some(x)) = (spec.as_object_mut(), pod_spec.as_object()) {
            for (k, v) in x {
                s.insert(k.clone(), v.clone());
            }
        }
        serde_json::from_value(json!({
            "metadata": {"name": "biz", "namespace": "ns", "labels": labels, "resourceVersion": "7"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "biz"}},
                "template": {"metadata": {"labels": {"app": "biz"}}, "spec": spec}
            }
        }))
        .expect("deployment")
    }

    fn peer(pod_spec: Value) -> Deployment {
        deployment(json!({STRATEGY_LABEL: PEER_STRATEGY}), pod_spec)
    }

    fn affinity(terms: Value) -> Value {
        json!({"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": terms
        }}}})
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> Value {
        json!({"key": key, "operator": op, "values": values})
    }

    fn fleet() -> Vec<Node> {
        vec![
            node("n1", "dev", "True", json!({})),
            node("n2", "dev", "True", json!({})),
            node("n3", "dev", "False", json!({})),
            node("n4", "prod", "True", json!({})),
            node(
                "n5",
                "dev",
                "True",
                json!({"base.koupleless.io/version": "2.0.0", "rank": "10"}),
            ),
        ]
    }

    #[test]
    fn only_peer_deployments_are_counted() {
        let nodes = fleet();
        let plain = deployment(json!({"app": "biz"}), json!({}));
        assert_eq!(peer_replicas(&plain, &nodes, "dev"), None);
        let other_strategy = deployment(json!({STRATEGY_LABEL: "default"}), json!({}));
        assert_eq!(peer_replicas(&other_strategy, &nodes, "dev"), None);
        // Ready dev VNodes: n1, n2, n5 (n3 NotReady, n4 another env).
        assert_eq!(peer_replicas(&peer(json!({})), &nodes, "dev"), Some(3));
        assert_eq!(peer_replicas(&peer(json!({})), &nodes, "prod"), Some(1));
    }

    #[test]
    fn not_ready_unschedulable_deleting_and_foreign_nodes_do_not_count() {
        let mut cordoned = node("c", "dev", "True", json!({}));
        cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let mut deleting = node("d", "dev", "True", json!({}));
        deleting.metadata.deletion_timestamp = Some(crate::time::now_time());
        let mut no_status = node("s", "dev", "True", json!({}));
        no_status.status = None;
        let mut worker = node("w", "dev", "True", json!({}));
        worker
            .metadata
            .labels
            .as_mut()
            .expect("labels")
            .remove(COMPONENT_LABEL);
        let unknown = node("u", "dev", "Unknown", json!({}));
        let nodes = vec![cordoned, deleting, no_status, worker, unknown];
        // Matching VNodes exist, so the Deployment is ours, and none of them is Ready.
        assert_eq!(peer_replicas(&peer(json!({})), &nodes, "dev"), Some(0));
    }

    #[test]
    fn node_selector_must_match_every_label() {
        let nodes = fleet();
        let d = peer(json!({"nodeSelector": {"base.koupleless.io/version": "2.0.0"}}));
        assert_eq!(peer_replicas(&d, &nodes, "dev"), Some(1));
        let d = peer(json!({"nodeSelector": {
            "base.koupleless.io/version": "2.0.0", "base.koupleless.io/cluster-name": "c2"
        }}));
        assert_eq!(peer_replicas(&d, &nodes, "dev"), None, "matches no VNode");
    }

    #[test]
    fn in_notin_exists_doesnotexist() {
        let nodes = fleet();
        let count = |e: Value| {
            peer_replicas(
                &peer(affinity(json!([{"matchExpressions": [e]}]))),
                &nodes,
                "dev",
            )
        };
        assert_eq!(
            count(expr("base.koupleless.io/version", "In", &["1.0.0"])),
            Some(2)
        );
        assert_eq!(
            count(expr(
                "base.koupleless.io/version",
                "In",
                &["1.0.0", "2.0.0"]
            )),
            Some(3)
        );
        assert_eq!(
            count(expr("base.koupleless.io/version", "NotIn", &["1.0.0"])),
            Some(1)
        );
        // NotIn matches nodes without the label too.
        assert_eq!(count(expr("missing", "NotIn", &["x"])), Some(3));
        assert_eq!(count(expr("rank", "Exists", &[])), Some(1));
        assert_eq!(count(expr("rank", "DoesNotExist", &[])), Some(2));
        assert_eq!(
            count(expr("base.koupleless.io/name", "In", &["other"])),
            None
        );
        assert_eq!(count(expr("rank", "Bogus", &["10"])), None);
    }

    #[test]
    fn gt_and_lt_compare_integers() {
        let mut nodes = fleet();
        nodes.push(node("n6", "dev", "True", json!({"rank": "3"})));
        nodes.push(node("n7", "dev", "True", json!({"rank": "x"})));
        let count = |e: Value| {
            peer_replicas(
                &peer(affinity(json!([{"matchExpressions": [e]}]))),
                &nodes,
                "dev",
            )
        };
        assert_eq!(count(expr("rank", "Gt", &["5"])), Some(1));
        assert_eq!(count(expr("rank", "Lt", &["5"])), Some(1));
        assert_eq!(count(expr("rank", "Gt", &["-1"])), Some(2));
        assert_eq!(count(expr("rank", "Gt", &["100"])), None);
        // Exactly one integer value is required.
        assert_eq!(count(expr("rank", "Gt", &["1", "2"])), None);
        assert_eq!(count(expr("rank", "Lt", &["abc"])), None);
    }

    #[test]
    fn terms_are_ored_and_expressions_anded() {
        let nodes = fleet();
        let d = peer(affinity(json!([{"matchExpressions": [
            expr("base.koupleless.io/name", "In", &["base"]),
            expr("base.koupleless.io/version", "In", &["2.0.0"])
        ]}])));
        assert_eq!(peer_replicas(&d, &nodes, "dev"), Some(1));
        let d = peer(affinity(json!([
            {"matchExpressions": [expr("base.koupleless.io/version", "In", &["2.0.0"])]},
            {"matchFields": [expr("metadata.name", "In", &["n1", "n3"])]}
        ])));
        assert_eq!(
            peer_replicas(&d, &nodes, "dev"),
            Some(2),
            "n5 or n1 (n3 NotReady)"
        );
        // An empty term matches nothing; an empty list of terms likewise.
        assert_eq!(
            peer_replicas(&peer(affinity(json!([{}]))), &nodes, "dev"),
            None
        );
        assert_eq!(
            peer_replicas(&peer(affinity(json!([]))), &nodes, "dev"),
            None
        );
    }

    #[test]
    fn match_fields_only_know_the_node_name() {
        let nodes = fleet();
        let d = peer(affinity(
            json!([{"matchFields": [expr("metadata.name", "NotIn", &["n1"])]}]),
        ));
        assert_eq!(peer_replicas(&d, &nodes, "dev"), Some(2));
        let d = peer(affinity(
            json!([{"matchFields": [expr("metadata.uid", "In", &["n1"])]}]),
        ));
        assert_eq!(peer_replicas(&d, &nodes, "dev"), None);
    }

    #[test]
    fn selector_and_affinity_both_apply() {
        let nodes = fleet();
        let mut spec = affinity(json!([{"matchExpressions": [expr("rank", "DoesNotExist", &[])]}]));
        spec["nodeSelector"] = json!({"base.koupleless.io/name": "base"});
        assert_eq!(peer_replicas(&peer(spec), &nodes, "dev"), Some(2));
    }

    #[test]
    fn a_deployment_of_another_env_is_left_alone() {
        let nodes = fleet();
        let tol = |env: &str| json!({"tolerations": [{"key": NODE_ENV_TAINT, "operator": "Equal", "value": env, "effect": "NoExecute"}]});
        assert_eq!(peer_replicas(&peer(tol("prod")), &nodes, "dev"), None);
        assert_eq!(peer_replicas(&peer(tol("dev")), &nodes, "dev"), Some(3));
        let labelled = deployment(
            json!({STRATEGY_LABEL: PEER_STRATEGY, ENV_LABEL: "prod"}),
            json!({}),
        );
        assert_eq!(peer_replicas(&labelled, &nodes, "dev"), None);
        assert_eq!(named_env(&labelled).as_deref(), Some("prod"));
        // A Deployment naming this env is ours even when none of its bases is left.
        let gone = peer(
            json!({"nodeSelector": {"base.koupleless.io/name": "gone"}, "tolerations": tol("dev")["tolerations"]}),
        );
        assert_eq!(peer_replicas(&gone, &nodes, "dev"), Some(0));
        // Without an env, a Deployment matching no VNode of ours may be another env's.
        let unnamed = peer(json!({"nodeSelector": {"base.koupleless.io/name": "gone"}}));
        assert_eq!(peer_replicas(&unnamed, &nodes, "dev"), None);
    }

    #[test]
    fn plan_lists_only_real_changes() {
        let nodes = fleet();
        let refs: Vec<&Node> = nodes.iter().collect();
        let mut at_three = peer(json!({}));
        at_three.metadata.name = Some("steady".into());
        if let Some(s) = at_three.spec.as_mut() {
            s.replicas = Some(3);
        }
        let mut unset = peer(json!({}));
        if let Some(s) = unset.spec.as_mut() {
            s.replicas = None;
        }
        let plain = deployment(json!({}), json!({}));
        let mut deleting = peer(json!({}));
        deleting.metadata.deletion_timestamp = Some(crate::time::now_time());
        let p = plan([&at_three, &unset, &plain, &deleting], &refs, "dev");
        assert_eq!(
            p,
            vec![Rescale {
                namespace: "ns".into(),
                name: "biz".into(),
                resource_version: Some("7".into()),
                from: 1,
                to: 3,
            }]
        );
    }

    #[test]
    fn written_suppresses_repeats_until_the_object_changes() {
        let mut w = Written::default();
        let r = Rescale {
            namespace: "ns".into(),
            name: "biz".into(),
            resource_version: Some("7".into()),
            from: 1,
            to: 3,
        };
        assert!(!w.already(&r));
        w.record(&r);
        assert!(w.already(&r));
        assert!(!w.already(&Rescale { to: 2, ..r.clone() }));
        assert!(!w.already(&Rescale {
            resource_version: Some("8".into()),
            ..r
        }));
    }

    #[test]
    fn debounce_waits_for_quiet_but_not_forever() {
        let t0 = Instant::now();
        let mut d = Debounce::default();
        assert_eq!(d.deadline(), None);
        d.touch(t0);
        assert_eq!(d.deadline(), Some(t0 + DEBOUNCE));
        d.touch(t0 + Duration::from_millis(800));
        assert_eq!(d.deadline(), Some(t0 + Duration::from_millis(1800)));
        // A flapping source: changes every 800 ms still fire after MAX_DELAY.
        d.touch(t0 + Duration::from_millis(4800));
        assert_eq!(d.deadline(), Some(t0 + MAX_DELAY));
        d.clear();
        d.retry(t0 + RETRY);
        assert_eq!(d.deadline(), Some(t0 + RETRY));
        d.touch(t0);
        assert_eq!(d.deadline(), Some(t0 + DEBOUNCE));
    }
}
