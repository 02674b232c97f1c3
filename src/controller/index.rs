//! The module index: module pods (two label selectors, each in a kube reflector store) and
//! module Deployments, turned into what each base task must hear — pods bound to its VNode,
//! batch holds, and the owners with a rollout in progress. Synchronous and pure: watch events
//! in, messages out; unit-tested without an apiserver.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::{self, ObjectRef, Store, store::Writer};
use kube::runtime::watcher;
use tracing::{debug, info};

use crate::base::BaseMsg;
use crate::controller::gates::{BatchGates, GateDone, GateJob, Request, pending_note};
use crate::model::ModuleKey;
use crate::peer::{PeerTemplate, peer_template};
use crate::rollout::gate::GatePod;
use crate::rollout::{PolicySource, is_admit_all};
use crate::vnode::shape;
use crate::vpod::spec::{
    MODULE_LABEL_VALUE, MODULE_LABELS, creation_secs, modules_of, owner_of, pod_key,
};
use crate::vpod::status::{Note, is_ready};

/// One watch per module label (published manifests use either).
pub const POD_STREAMS: usize = MODULE_LABELS.len();

/// Label selector of pod watch `stream`.
pub fn pod_selector(stream: usize) -> String {
    format!("{}={MODULE_LABEL_VALUE}", MODULE_LABELS[stream])
}

/// What the index asks the registry of base tasks to deliver.
#[derive(Debug)]
pub enum Out {
    /// A message for the task of one base (by VNode name).
    Base(String, BaseMsg),
    /// The owners with a rollout in progress changed: every task hears it.
    Rollouts(Arc<HashSet<String>>),
    /// The modules unbound pods ask for changed: every task hears it.
    Wanted(Arc<HashSet<ModuleKey>>),
    /// The peer Deployments changed: every task hears it.
    Peers(Arc<Vec<PeerTemplate>>),
    /// The pod lists were (re)listed: every task gets its full pod list ([`Index::pods_on`]).
    Resynced,
    /// A batch policy must be evaluated (off the loop); its result goes to
    /// [`Index::on_gate_done`].
    Evaluate(Box<GateJob>),
}

/// What the controller needs to know of a module Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploySummary {
    /// Its annotations (batch policy selection and parameters).
    pub annotations: BTreeMap<String, String>,
    /// Desired replicas.
    pub replicas: i32,
    /// A rollout is in progress.
    pub in_rollout: bool,
}

/// Summary of a Deployment whose pods are module pods; `None` for any other Deployment.
pub fn summarize(d: &Deployment) -> Option<DeploySummary> {
    let spec = d.spec.as_ref()?;
    let labels = spec.template.metadata.as_ref()?.labels.as_ref()?;
    let is_module = MODULE_LABELS
        .iter()
        .any(|k| labels.get(*k).map(String::as_str) == Some(MODULE_LABEL_VALUE));
    if !is_module {
        return None;
    }
    let replicas = spec.replicas.unwrap_or(1);
    let st = d.status.clone().unwrap_or_default();
    let generation = d.metadata.generation.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    // Mid-rollout from the moment the template changes until only updated pods remain and all
    // are available. (Terminating old pods are not in `status.replicas`, and `updatedReplicas`
    // counts new pods before they are Ready: neither alone says the hand-over is complete.)
    let in_rollout = st.observed_generation.unwrap_or(0) < generation
        || updated < replicas
        || st.replicas.unwrap_or(0) > updated
        || st.available_replicas.unwrap_or(0) < replicas;
    Some(DeploySummary {
        annotations: d.metadata.annotations.clone().unwrap_or_default(),
        replicas,
        in_rollout,
    })
}

/// `namespace/Deployment/name`, the owner key pods derive from their ReplicaSet.
pub fn deployment_key(d: &Deployment) -> String {
    format!(
        "{}/Deployment/{}",
        d.metadata.namespace.as_deref().unwrap_or("default"),
        d.metadata.name.as_deref().unwrap_or("")
    )
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

/// The index.
pub struct Index {
    env: String,
    policies: Arc<dyn PolicySource>,
    stores: Vec<(Store<Pod>, Writer<Pod>)>,
    synced: [bool; POD_STREAMS],
    /// Pods in either store, by uid.
    pods: HashMap<String, Arc<Pod>>,
    /// Bound pods by node name (uids).
    by_node: HashMap<String, BTreeSet<String>>,
    /// Live (not deleting) pods per owner: uid → template revision.
    owners: HashMap<String, HashMap<String, Option<String>>>,
    deployments: (Store<Deployment>, Writer<Deployment>),
    summaries: HashMap<String, DeploySummary>,
    rollouts: Arc<HashSet<String>>,
    gates: BatchGates,
    /// The holds base tasks know of.
    sent_holds: HashMap<String, Note>,
    /// Pods a completed evaluation of their owner's policy has decided on.
    decided_pods: HashSet<String>,
    /// How many live unbound pods ask for each module.
    pending_keys: HashMap<ModuleKey, usize>,
    wanted: Arc<HashSet<ModuleKey>>,
    peers: Arc<Vec<PeerTemplate>>,
}

impl Index {
    /// An empty index for controller env `env`.
    pub fn new(env: &str, policies: Arc<dyn PolicySource>) -> Self {
        Index {
            env: env.to_string(),
            policies,
            stores: (0..POD_STREAMS).map(|_| reflector::store()).collect(),
            synced: [false; POD_STREAMS],
            pods: HashMap::new(),
            by_node: HashMap::new(),
            owners: HashMap::new(),
            deployments: reflector::store(),
            summaries: HashMap::new(),
            rollouts: Arc::new(HashSet::new()),
            gates: BatchGates::default(),
            sent_holds: HashMap::new(),
            decided_pods: HashSet::new(),
            pending_keys: HashMap::new(),
            wanted: Arc::new(HashSet::new()),
            peers: Arc::new(Vec::new()),
        }
    }

    /// Whether every pod watch has listed once.
    pub fn synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    /// Module pods known.
    pub fn pod_count(&self) -> usize {
        self.pods.len()
    }

    /// Pods bound to `node`.
    pub fn pods_on(&self, node: &str) -> Vec<Arc<Pod>> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|uid| self.pods.get(uid).cloned())
            .collect()
    }

    /// Owners with a rollout in progress.
    pub fn rollouts(&self) -> Arc<HashSet<String>> {
        self.rollouts.clone()
    }

    /// What the task of VNode `node` must hear first when it starts, in order: rollouts, peer
    /// Deployments, holds, its pods (the wanted modules it reads from [`Out::Wanted`]'s
    /// latest).
    pub fn bootstrap(&self, node: &str) -> Vec<BaseMsg> {
        let mut out = vec![
            BaseMsg::Rollouts(self.rollouts.clone()),
            BaseMsg::Peers(self.peers.clone()),
        ];
        if !self.synced() {
            return out;
        }
        let pods = self.pods_on(node);
        let holds: Vec<(String, Option<Note>)> = pods
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .filter_map(|uid| self.sent_holds.get(&uid).map(|n| (uid, Some(n.clone()))))
            .collect();
        if !holds.is_empty() {
            out.push(BaseMsg::Holds(holds));
        }
        out.push(BaseMsg::PodsSynced(pods));
        out
    }

    /// Applies a pod watch event of watch `stream`.
    pub fn on_pod_event(
        &mut self,
        stream: usize,
        ev: watcher::Event<Pod>,
        now: Instant,
    ) -> Vec<Out> {
        let Some((_, writer)) = self.stores.get_mut(stream) else {
            return Vec::new();
        };
        writer.apply_watcher_event(&ev);
        let mut out = Vec::new();
        let mut pod_msgs = Vec::new();
        let touched: Vec<String> = match ev {
            watcher::Event::Init | watcher::Event::InitApply(_) => return Vec::new(),
            watcher::Event::InitDone => {
                self.synced[stream] = true;
                self.rebuild();
                if self.synced() {
                    info!(pods = self.pods.len(), "pod watch synced");
                    // Every task gets its full pod list, after the holds below.
                    pod_msgs.push(Out::Resynced);
                }
                self.summaries.keys().cloned().collect()
            }
            watcher::Event::Apply(p) => {
                let owner = owner_of(&p).map(|o| o.key);
                if let Some(uid) = p.metadata.uid.clone() {
                    // The store's copy, shared: one copy of each pod in memory.
                    let p = self
                        .stores
                        .get(stream)
                        .and_then(|(s, _)| s.get(&ObjectRef::from_obj(&p)))
                        .filter(|s| s.metadata.uid.as_deref() == Some(&uid))
                        .unwrap_or_else(|| Arc::new(p));
                    self.insert(uid, p.clone());
                    if self.synced() {
                        pod_msgs.extend(self.route(&p, BaseMsg::PodUpsert(p.clone())));
                    }
                }
                owner.into_iter().collect()
            }
            watcher::Event::Delete(p) => {
                let owner = owner_of(&p).map(|o| o.key);
                if let Some(uid) = p.metadata.uid.clone() {
                    // Gone only when the other label's watch does not list it either.
                    let key = ObjectRef::from_obj(&p);
                    let elsewhere = self.stores.iter().any(|(s, _)| {
                        s.get(&key)
                            .is_some_and(|o| o.metadata.uid.as_deref() == Some(&uid))
                    });
                    if !elsewhere {
                        self.remove(&uid);
                        self.sent_holds.remove(&uid);
                        self.decided_pods.remove(&uid);
                        pod_msgs.extend(self.route(&p, BaseMsg::PodRemoved(uid)));
                    }
                }
                owner.into_iter().collect()
            }
        };
        self.refresh_rollouts(&mut out);
        self.refresh_wanted(&mut out);
        // Holds first, then the pod changes: a task never sees a new pod before knowing
        // whether the batch policy holds it.
        for owner in touched {
            self.gate_owner(&owner, now, &mut out);
        }
        out.extend(pod_msgs);
        out
    }

    /// Applies a Deployment watch event.
    pub fn on_deployment_event(
        &mut self,
        ev: watcher::Event<Deployment>,
        now: Instant,
    ) -> Vec<Out> {
        self.deployments.1.apply_watcher_event(&ev);
        let touched: Vec<String> = match &ev {
            watcher::Event::Init | watcher::Event::InitApply(_) => return Vec::new(),
            watcher::Event::InitDone => {
                let before: HashSet<String> = self.summaries.keys().cloned().collect();
                self.summaries = self
                    .deployments
                    .0
                    .state()
                    .iter()
                    .filter_map(|d| summarize(d).map(|s| (deployment_key(d), s)))
                    .collect();
                before
                    .into_iter()
                    .chain(self.summaries.keys().cloned())
                    .collect()
            }
            watcher::Event::Apply(d) => {
                let key = deployment_key(d);
                match summarize(d) {
                    Some(s) => self.summaries.insert(key.clone(), s),
                    None => self.summaries.remove(&key),
                };
                vec![key]
            }
            watcher::Event::Delete(d) => {
                let key = deployment_key(d);
                self.summaries.remove(&key);
                vec![key]
            }
        };
        let mut out = Vec::new();
        self.refresh_rollouts(&mut out);
        self.refresh_peers(&mut out);
        let touched: BTreeSet<String> = touched.into_iter().collect();
        for owner in touched {
            self.gate_owner(&owner, now, &mut out);
        }
        out
    }

    /// Re-evaluates the gates whose policy asked for it by `now`.
    pub fn recheck(&mut self, now: Instant) -> Vec<Out> {
        let mut out = Vec::new();
        for owner in self.gates.due(now) {
            self.gate_owner(&owner, now, &mut out);
        }
        out
    }

    /// The modules a pod asks for while it is live and unbound (it may still bind anywhere).
    /// The modules an unbound pod of this env asks for. A pod naming another env cannot land
    /// on our bases (controllers of several envs share a cluster and module names).
    fn pending_contribution(env: &str, p: &Pod) -> Vec<ModuleKey> {
        if node_of(p).is_some() || p.metadata.deletion_timestamp.is_some() {
            return Vec::new();
        }
        if crate::peer::env_named(kube::ResourceExt::labels(p), p.spec.as_ref())
            .is_some_and(|e| e != env)
        {
            return Vec::new();
        }
        modules_of(p)
            .into_iter()
            .filter_map(Result::ok)
            .map(|m| m.key())
            .collect()
    }

    fn count_pending(&mut self, p: &Pod, delta: isize) {
        for k in Self::pending_contribution(&self.env, p) {
            let n = self.pending_keys.entry(k.clone()).or_insert(0);
            *n = n.saturating_add_signed(delta);
            if *n == 0 {
                self.pending_keys.remove(&k);
            }
        }
    }

    fn insert(&mut self, uid: String, p: Arc<Pod>) {
        if let Some(old) = self.pods.get(&uid).cloned() {
            self.count_pending(&old, -1);
        }
        self.count_pending(&p, 1);
        if let Some(old) = self.pods.get(&uid)
            && let Some(n) = node_of(old)
            && node_of(&p) != Some(n)
            && let Some(set) = self.by_node.get_mut(n)
        {
            set.remove(&uid);
        }
        if let Some(n) = node_of(&p) {
            self.by_node
                .entry(n.to_string())
                .or_default()
                .insert(uid.clone());
        }
        self.track_owner(&uid, &p, true);
        self.pods.insert(uid, p);
    }

    fn remove(&mut self, uid: &str) {
        if let Some(p) = self.pods.remove(uid) {
            self.count_pending(&p, -1);
            if let Some(n) = node_of(&p)
                && let Some(set) = self.by_node.get_mut(n)
            {
                set.remove(uid);
                if set.is_empty() {
                    self.by_node.remove(n);
                }
            }
            self.track_owner(uid, &p, false);
        }
    }

    /// Rebuilds the merged view from both stores (after a (re)list).
    fn rebuild(&mut self) {
        let mut pods: HashMap<String, Arc<Pod>> = HashMap::new();
        for (store, _) in &self.stores {
            for p in store.state() {
                if let Some(uid) = p.metadata.uid.clone() {
                    pods.insert(uid, p);
                }
            }
        }
        self.sent_holds.retain(|uid, _| pods.contains_key(uid));
        self.decided_pods.retain(|uid| pods.contains_key(uid));
        self.pods.clear();
        self.by_node.clear();
        self.owners.clear();
        self.pending_keys.clear();
        for (uid, p) in pods {
            self.insert(uid, p);
        }
    }

    fn route(&self, pod: &Pod, msg: BaseMsg) -> Option<Out> {
        let node = node_of(pod).filter(|n| shape::is_vnode_name(n, &self.env))?;
        Some(Out::Base(node.to_string(), msg))
    }

    fn track_owner(&mut self, uid: &str, pod: &Pod, present: bool) {
        let Some(owner) = owner_of(pod) else {
            return;
        };
        let live = present && pod.metadata.deletion_timestamp.is_none();
        let entry = self.owners.entry(owner.key.clone()).or_default();
        if live {
            entry.insert(uid.to_string(), owner.template_hash);
        } else {
            entry.remove(uid);
            if entry.is_empty() {
                self.owners.remove(&owner.key);
            }
        }
    }

    fn refresh_wanted(&mut self, out: &mut Vec<Out>) {
        if self.wanted.len() == self.pending_keys.len()
            && self.pending_keys.keys().all(|k| self.wanted.contains(k))
        {
            return;
        }
        self.wanted = Arc::new(self.pending_keys.keys().cloned().collect());
        out.push(Out::Wanted(self.wanted.clone()));
    }

    fn refresh_peers(&mut self, out: &mut Vec<Out>) {
        let mut peers: Vec<PeerTemplate> = self
            .deployments
            .0
            .state()
            .iter()
            .filter_map(|d| peer_template(d, &self.env))
            .collect();
        peers.sort_by(|a, b| a.owner.cmp(&b.owner));
        if *self.peers != peers {
            self.peers = Arc::new(peers);
            out.push(Out::Peers(self.peers.clone()));
        }
    }

    /// Recomputes the owners with a rollout in progress; every task hears of a change.
    fn refresh_rollouts(&mut self, out: &mut Vec<Out>) {
        let mut set: HashSet<String> = self
            .owners
            .iter()
            // More than one template revision among its live pods (no set built: this runs
            // on every pod event).
            .filter(|(_, pods)| {
                let mut revisions = pods.values();
                let first = revisions.next();
                revisions.any(|r| Some(r) != first)
            })
            .map(|(o, _)| o.clone())
            .collect();
        set.extend(
            self.summaries
                .iter()
                .filter(|(_, d)| d.in_rollout)
                .map(|(k, _)| k.clone()),
        );
        if *self.rollouts != set {
            debug!(rollouts = ?set, "rollouts in progress changed");
            self.rollouts = Arc::new(set);
            out.push(Out::Rollouts(self.rollouts.clone()));
        }
    }

    fn gate_pod(&self, uid: &str, hash: &Option<String>) -> Option<GatePod> {
        let p = self.pods.get(uid)?;
        let node = node_of(p).map(str::to_string);
        Some(GatePod {
            uid: uid.to_string(),
            name: pod_key(p),
            base_id: node
                .as_deref()
                .and_then(|n| shape::base_id_of(n, &self.env)),
            node,
            template_hash: hash.clone(),
            creation_ts: creation_secs(p),
            ready: is_ready(p.status.as_ref()),
            module: modules_of(p)
                .into_iter()
                .next()
                .and_then(Result::ok)
                .map(|m| (m.name, m.version)),
        })
    }

    /// Asks for an evaluation of one owner's batch policy. Its pods that no evaluation has
    /// decided on yet are held meanwhile.
    fn gate_owner(&mut self, owner: &str, now: Instant, out: &mut Vec<Out>) {
        let summary = self.summaries.get(owner);
        let policy = summary
            .and_then(|d| self.policies.batch_policy(&d.annotations))
            .filter(|p| !is_admit_all(p.as_ref()));
        if policy.is_none() {
            // Nothing to evaluate (this runs on every pod event of the owner): release what an
            // earlier policy held, without building the owner's whole pod list each time.
            let _ = self
                .gates
                .request(owner, None, Vec::new(), 0, &BTreeMap::new(), now);
            if self.sent_holds.is_empty() && self.decided_pods.is_empty() {
                return;
            }
            let uids: Vec<String> = self
                .owners
                .get(owner)
                .into_iter()
                .flat_map(|m| m.keys())
                .filter(|u| self.sent_holds.contains_key(*u) || self.decided_pods.contains(*u))
                .cloned()
                .collect();
            for uid in uids {
                self.decided_pods.remove(&uid);
                self.set_hold(&uid, None, out);
            }
            return;
        }
        let mut uids: Vec<(String, Option<String>)> = self
            .owners
            .get(owner)
            .map(|m| m.iter().map(|(u, h)| (u.clone(), h.clone())).collect())
            .unwrap_or_default();
        uids.sort();
        let policy_name = policy.as_ref().map(|p| p.name().to_string());
        let pods: Vec<GatePod> = uids
            .iter()
            .filter_map(|(u, h)| self.gate_pod(u, h))
            .collect();
        let (desired, annotations) = summary
            .map(|d| (d.replicas.max(0) as u32, d.annotations.clone()))
            .unwrap_or_default();
        let undecided: Vec<String> = pods
            .iter()
            .filter(|p| !self.decided_pods.contains(&p.uid))
            .map(|p| p.uid.clone())
            .collect();
        match self
            .gates
            .request(owner, policy, pods.clone(), desired, &annotations, now)
        {
            Request::Release => {
                for p in pods {
                    self.decided_pods.remove(&p.uid);
                    self.set_hold(&p.uid, None, out);
                }
            }
            request => {
                let note = pending_note(policy_name.as_deref().unwrap_or_default());
                for uid in undecided {
                    if !self.sent_holds.contains_key(&uid) {
                        self.set_hold(&uid, Some(note.clone()), out);
                    }
                }
                if let Request::Run(job) = request {
                    out.push(Out::Evaluate(job));
                }
            }
        }
    }

    /// Applies an evaluation's result.
    pub fn on_gate_done(&mut self, done: GateDone, now: Instant) -> Vec<Out> {
        let owner = done.owner.clone();
        let (holds, decided, again) = self.gates.complete(done);
        let mut out = Vec::new();
        for (uid, note) in holds {
            // A pod that was unbound when evaluated was not pending: it stays undecided (held
            // once bound) until an evaluation sees it bound.
            if self.pods.contains_key(&uid) && decided.contains(&uid) {
                self.decided_pods.insert(uid.clone());
                self.set_hold(&uid, note, &mut out);
            }
        }
        if again {
            self.gate_owner(&owner, now, &mut out);
        }
        out
    }

    /// Sets a pod's hold, telling its task only when it changes.
    fn set_hold(&mut self, uid: &str, note: Option<Note>, out: &mut Vec<Out>) {
        // Holds matter once a pod is bound: only then does a task know it.
        let Some(p) = self.pods.get(uid).filter(|p| node_of(p).is_some()).cloned() else {
            return;
        };
        if self.sent_holds.get(uid) == note.as_ref() {
            return;
        }
        match &note {
            Some(n) => self.sent_holds.insert(uid.to_string(), n.clone()),
            None => self.sent_holds.remove(uid),
        };
        out.extend(self.route(&p, BaseMsg::Holds(vec![(uid.to_string(), note)])));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::batch::{
        BatchDecision, BatchError, BatchPolicy, PendingInstall, RolloutView,
    };
    use crate::rollout::ordering::{DefaultOrdering, OrderingRule};
    use serde_json::json;

    /// Holds every pending install of a Deployment annotated `hold: "true"`.
    struct HoldAll;
    impl BatchPolicy for HoldAll {
        fn name(&self) -> &str {
            "hold-all"
        }
        fn decide(
            &self,
            _: &RolloutView,
            _: &[PendingInstall],
        ) -> Result<BatchDecision, BatchError> {
            Ok(BatchDecision {
                admit: vec![],
                hold_reason: Some("approval needed".into()),
                recheck_after_ms: None,
            })
        }
    }
    struct Policies;
    impl PolicySource for Policies {
        fn ordering(&self) -> Arc<dyn OrderingRule> {
            Arc::new(DefaultOrdering)
        }
        fn batch_policy(&self, a: &BTreeMap<String, String>) -> Option<Arc<dyn BatchPolicy>> {
            (a.get("hold").map(String::as_str) == Some("true")).then(|| Arc::new(HoldAll) as _)
        }
    }

    fn index() -> Index {
        Index::new("dev", Arc::new(Policies))
    }

    fn pod(name: &str, uid: &str, hash: &str, node: Option<&str>, label: usize) -> Pod {
        let mut spec = json!({"containers": [{"name": "biz", "image": "https://x/biz.jar",
            "env": [{"name": "BIZ_VERSION", "value": hash}]}]});
        if let Some(n) = node {
            spec["nodeName"] = json!(n);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "uid": uid,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {MODULE_LABELS[label]: MODULE_LABEL_VALUE, "pod-template-hash": hash},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": format!("d-{hash}"), "uid": "rs", "controller": true}]},
            "spec": spec,
        }))
        .expect("pod")
    }

    fn deployment(hold: bool) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "d", "namespace": "ns", "generation": 1,
                "annotations": {"hold": hold.to_string()}},
            "spec": {"replicas": 1, "selector": {},
                "template": {"metadata": {"labels": {MODULE_LABELS[0]: MODULE_LABEL_VALUE}}}},
            "status": {"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                "availableReplicas": 1}
        }))
        .expect("deployment")
    }

    fn sync(ix: &mut Index, now: Instant) {
        for s in 0..POD_STREAMS {
            ix.on_pod_event(s, watcher::Event::Init, now);
            ix.on_pod_event(s, watcher::Event::InitDone, now);
        }
        ix.on_deployment_event(watcher::Event::Init, now);
        ix.on_deployment_event(watcher::Event::InitDone, now);
    }

    fn describe(out: &[Out]) -> Vec<String> {
        out.iter()
            .map(|o| match o {
                Out::Base(id, BaseMsg::PodUpsert(p)) => {
                    format!(
                        "{id}:upsert:{}",
                        p.metadata.name.clone().unwrap_or_default()
                    )
                }
                Out::Base(id, BaseMsg::PodRemoved(uid)) => format!("{id}:removed:{uid}"),
                Out::Base(id, BaseMsg::Holds(h)) => format!(
                    "{id}:holds:{}",
                    h.iter()
                        .map(|(u, n)| format!("{u}={}", n.is_some()))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                Out::Base(id, m) => format!("{id}:{m:?}"),
                Out::Rollouts(r) => {
                    let mut v: Vec<&String> = r.iter().collect();
                    v.sort();
                    format!("rollouts:{v:?}")
                }
                Out::Resynced => "resynced".into(),
                Out::Evaluate(j) => format!("evaluate:{}", j.owner),
                Out::Wanted(w) => format!("wanted:{}", w.len()),
                Out::Peers(p) => format!("peers:{}", p.len()),
            })
            .collect()
    }

    #[test]
    fn nothing_is_routed_before_every_watch_listed() {
        let now = Instant::now();
        let mut ix = index();
        ix.on_pod_event(0, watcher::Event::Init, now);
        ix.on_pod_event(
            0,
            watcher::Event::InitApply(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        let out = ix.on_pod_event(0, watcher::Event::InitDone, now);
        assert!(!ix.synced());
        assert!(!describe(&out).contains(&"resynced".to_string()));
        ix.on_pod_event(1, watcher::Event::Init, now);
        let out = ix.on_pod_event(1, watcher::Event::InitDone, now);
        assert!(ix.synced());
        assert_eq!(describe(&out).last().map(String::as_str), Some("resynced"));
        assert_eq!(ix.pods_on("vnode.b1.dev").len(), 1);
    }

    #[test]
    fn unbound_pods_of_another_env_are_not_wanted_here() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        let mut other = pod("o", "u9", "h1", None, 0);
        other.spec.get_or_insert_with(Default::default).tolerations =
            Some(vec![k8s_openapi::api::core::v1::Toleration {
                key: Some(shape::NODE_ENV_TAINT.into()),
                operator: Some("Equal".into()),
                value: Some("other".into()),
                effect: Some("NoExecute".into()),
                ..Default::default()
            }]);
        let out = ix.on_pod_event(0, watcher::Event::Apply(other.clone()), now);
        assert!(describe(&out).is_empty(), "another env's pending pod");
        // Control: the same pod tolerating this env's taint is wanted.
        if let Some(t) = other
            .spec
            .as_mut()
            .and_then(|s| s.tolerations.as_mut())
            .and_then(|t| t.first_mut())
        {
            t.value = Some("dev".into());
        }
        let out = ix.on_pod_event(0, watcher::Event::Apply(other), now);
        assert_eq!(describe(&out), vec!["wanted:1"]);
    }

    #[test]
    fn bound_pods_reach_their_base_and_unbound_ones_do_not() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        let out = ix.on_pod_event(0, watcher::Event::Apply(pod("a", "u1", "h1", None, 0)), now);
        assert_eq!(
            describe(&out),
            vec!["wanted:1"],
            "unbound: only wanted somewhere"
        );
        let out = ix.on_pod_event(
            0,
            watcher::Event::Apply(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        assert_eq!(describe(&out), vec!["wanted:0", "vnode.b1.dev:upsert:a"]);
        let out = ix.on_pod_event(
            0,
            watcher::Event::Apply(pod("c", "u3", "h1", Some("vnode.x.other"), 0)),
            now,
        );
        assert!(
            describe(&out).is_empty(),
            "a foreign env's node is not ours"
        );
    }

    #[test]
    fn a_pod_listed_by_both_label_watches_is_removed_only_when_both_lose_it() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        let p = pod("a", "u1", "h1", Some("vnode.b1.dev"), 0);
        ix.on_pod_event(0, watcher::Event::Apply(p.clone()), now);
        ix.on_pod_event(1, watcher::Event::Apply(p.clone()), now);
        let out = ix.on_pod_event(1, watcher::Event::Delete(p.clone()), now);
        assert!(describe(&out).is_empty(), "{:?}", describe(&out));
        assert_eq!(ix.pod_count(), 1);
        let out = ix.on_pod_event(0, watcher::Event::Delete(p), now);
        assert_eq!(describe(&out), vec!["vnode.b1.dev:removed:u1"]);
        assert!(ix.pods_on("vnode.b1.dev").is_empty());
    }

    #[test]
    fn two_template_revisions_of_one_owner_are_a_rollout() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        ix.on_pod_event(
            0,
            watcher::Event::Apply(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        let out = ix.on_pod_event(0, watcher::Event::Apply(pod("b", "u2", "h2", None, 0)), now);
        assert_eq!(
            describe(&out),
            vec![r#"rollouts:["ns/Deployment/d"]"#, "wanted:1"]
        );
        let out = ix.on_pod_event(
            0,
            watcher::Event::Delete(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        assert_eq!(
            describe(&out),
            vec!["rollouts:[]", "vnode.b1.dev:removed:u1"]
        );
    }

    /// Runs the evaluations in `out` as the loop would; returns the rest of `out` and what the
    /// evaluations produced.
    fn settle(ix: &mut Index, out: Vec<Out>, now: Instant) -> Vec<Out> {
        let mut rest = Vec::new();
        let mut jobs = Vec::new();
        for o in out {
            match o {
                Out::Evaluate(j) => jobs.push(j),
                other => rest.push(other),
            }
        }
        for j in jobs {
            let more = ix.on_gate_done(j.run(), now);
            rest.extend(settle(ix, more, now));
        }
        rest
    }

    #[test]
    fn a_held_pod_hears_its_hold_before_the_pod_itself() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        let out = ix.on_deployment_event(watcher::Event::Apply(deployment(true)), now);
        assert_eq!(describe(&out), vec!["evaluate:ns/Deployment/d"]);
        settle(&mut ix, out, now);
        let out = ix.on_pod_event(
            0,
            watcher::Event::Apply(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        // Held while the policy has not decided, before the task hears of the pod.
        assert_eq!(
            describe(&out),
            vec![
                "vnode.b1.dev:holds:u1=true",
                "evaluate:ns/Deployment/d",
                "vnode.b1.dev:upsert:a"
            ]
        );
        let out = settle(&mut ix, out, now);
        let note = out.iter().rev().find_map(|o| match o {
            Out::Base(_, BaseMsg::Holds(h)) => h[0].1.clone(),
            _ => None,
        });
        assert_eq!(note.map(|n| n.message), Some("approval needed".to_string()));
        // A new task for b1 learns the hold before its pods.
        let boot = ix.bootstrap("vnode.b1.dev");
        assert!(
            matches!(boot.as_slice(), [BaseMsg::Rollouts(_), BaseMsg::Peers(_), BaseMsg::Holds(_), BaseMsg::PodsSynced(p)] if p.len() == 1)
        );
        // The policy is dropped from the Deployment: the hold is released.
        let out = ix.on_deployment_event(watcher::Event::Apply(deployment(false)), now);
        assert_eq!(describe(&out), vec!["vnode.b1.dev:holds:u1=false"]);
    }

    #[test]
    fn a_pod_evaluated_unbound_is_held_when_it_binds() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        let out = ix.on_deployment_event(watcher::Event::Apply(deployment(true)), now);
        settle(&mut ix, out, now);
        let out = ix.on_pod_event(0, watcher::Event::Apply(pod("a", "u1", "h1", None, 0)), now);
        settle(&mut ix, out, now);
        // Bound while nothing decided it as a bound pod: held before the task hears of it.
        let out = ix.on_pod_event(
            0,
            watcher::Event::Apply(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        assert_eq!(
            describe(&out),
            vec![
                "wanted:0",
                "vnode.b1.dev:holds:u1=true",
                "evaluate:ns/Deployment/d",
                "vnode.b1.dev:upsert:a"
            ]
        );
    }

    #[test]
    fn pods_arriving_during_an_evaluation_stay_held_and_are_evaluated_next() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        let out = ix.on_deployment_event(watcher::Event::Apply(deployment(true)), now);
        let job = match out.into_iter().next() {
            Some(Out::Evaluate(j)) => j,
            other => panic!("{other:?}"),
        };
        let out = ix.on_pod_event(
            0,
            watcher::Event::Apply(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        assert_eq!(
            describe(&out),
            vec!["vnode.b1.dev:holds:u1=true", "vnode.b1.dev:upsert:a"],
            "queued behind the running evaluation, and held"
        );
        let out = ix.on_gate_done(job.run(), now);
        assert_eq!(describe(&out), vec!["evaluate:ns/Deployment/d"]);
    }

    #[test]
    fn a_relist_drops_pods_deleted_while_the_watch_was_down() {
        let now = Instant::now();
        let mut ix = index();
        sync(&mut ix, now);
        ix.on_pod_event(
            0,
            watcher::Event::Apply(pod("a", "u1", "h1", Some("vnode.b1.dev"), 0)),
            now,
        );
        ix.on_pod_event(0, watcher::Event::Init, now);
        let out = ix.on_pod_event(0, watcher::Event::InitDone, now);
        assert_eq!(describe(&out), vec!["resynced"]);
        assert!(ix.pods_on("vnode.b1.dev").is_empty());
    }
}
