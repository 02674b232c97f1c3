//! The effects executor of a base task: commands to the base through its tunnel, and writes to
//! the apiserver — pod statuses in safe waves, pod removals, the VNode, its status and Lease,
//! and Events where users look.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PodStatus;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::apiserver::events::Notice;
use crate::apiserver::{self, Api, is_not_found};
use crate::base::BaseMetrics;
use crate::base::actor::StatusOrder;
use crate::base::backoff::WriteBackoff;
use crate::base::node_sync::{NodeSync, NodeWrites};
use crate::base::plan::PodInfo;
use crate::model::BaseCommand;
use crate::offload::{self, Pool};
use crate::rollout::PolicySource;
use crate::rollout::ordering::{OrderingError, StatusChange, Waves, default_waves, order_with};
use crate::tunnel::Tunnel;
use crate::vpod::spec::pod_key;
use crate::vpod::status::is_ready;

fn pod_write_key(uid: &str) -> String {
    format!("pod/{uid}/status")
}

fn pod_delete_key(uid: &str) -> String {
    format!("pod/{uid}/delete")
}

/// Event reason of an in-place module replacement (same name and version, new package).
pub const REPLACEMENT: &str = "ModuleController.InPlaceReplacement";

/// Reason prefixes of container problems that users must see as Events.
const REPORTED_SOURCES: [&str; 3] = ["Arklet.", "User.", "ModuleController."];

/// What an effects executor works with.
#[derive(Clone)]
pub struct EffectsDeps {
    /// Apiserver writes.
    pub api: Api,
    /// The base's tunnel.
    pub tunnel: Arc<dyn Tunnel>,
    /// Ordering rules.
    pub policies: Arc<dyn PolicySource>,
    /// Counters.
    pub metrics: BaseMetrics,
    /// The order of status writes.
    pub order: StatusOrder,
    /// Where plugin calls run.
    pub pool: Option<Pool>,
}

/// Performs what a base task decided.
pub struct Effects {
    pub(crate) api: Api,
    tunnel: Arc<dyn Tunnel>,
    base_id: String,
    node_name: String,
    policies: Arc<dyn PolicySource>,
    metrics: BaseMetrics,
    order: StatusOrder,
    pool: Option<Pool>,
    /// Problems already published as Events, per pod uid (forgotten with the pod).
    reported: BTreeMap<String, HashSet<(String, String)>>,
    /// Failing writes, per object.
    backoff: WriteBackoff,
}

impl Effects {
    /// An executor for one base.
    pub fn new(base_id: &str, node_name: &str, deps: EffectsDeps) -> Self {
        Effects {
            api: deps.api,
            tunnel: deps.tunnel,
            base_id: base_id.to_string(),
            node_name: node_name.to_string(),
            policies: deps.policies,
            metrics: deps.metrics,
            order: deps.order,
            pool: deps.pool,
            reported: BTreeMap::new(),
            backoff: WriteBackoff::default(),
        }
    }

    /// Objects whose writes are failing now.
    pub fn failing_writes(&self) -> usize {
        self.backoff.len()
    }

    /// Hands a command to the tunnel; false when it could not be sent.
    pub async fn send(&self, cmd: &BaseCommand) -> bool {
        match self.tunnel.send(&self.base_id, cmd).await {
            Ok(()) => {
                self.metrics.count(cmd.kind(), "sent");
                true
            }
            Err(e) => {
                self.metrics.count(cmd.kind(), "send_failed");
                warn!(command = cmd.kind(), error = %e, "command not sent");
                false
            }
        }
    }

    /// Counts a plan.
    pub fn count_plan(&self) {
        self.metrics.count_plan();
    }

    /// Counts a re-sent install.
    pub fn count_retry(&self, cmd: &BaseCommand) {
        self.metrics.count(cmd.kind(), "retry");
    }

    /// Writes status changes in waves and returns what was written: the pod job of `statuses`
    /// (see [`Effects::pod_job`]), run to the end on this task (the tests' view of a job).
    #[cfg(test)]
    pub async fn write_statuses(
        &mut self,
        pods: &BTreeMap<String, PodInfo>,
        statuses: Vec<(String, PodStatus)>,
    ) -> Vec<(String, PodStatus)> {
        let job = self.pod_job(pods, statuses, &[], &PodJobs::default());
        let done = job.run().await;
        self.pod_job_done(pods, done).0
    }

    /// The pod writes of one plan, as a job that needs nothing of this task and so can run
    /// off it (commands to the base never wait for the apiserver): status changes in waves,
    /// where every write of a wave is acknowledged before the next wave starts, every NotReady
    /// write comes before any Ready one, and a failed wave stops the later ones (they are
    /// retried next time, in the same order); then the removals of pods whose modules are gone.
    /// Objects whose writes are failing wait out their backoff. Its outcome goes to
    /// [`Effects::pod_job_done`].
    ///
    /// Jobs run side by side, so the same order holds across them: a pod in a job `in_flight`
    /// is left out (it is decided again once that job is through), and so is every Ready write
    /// while a job in flight makes a pod NotReady.
    pub fn pod_job(
        &self,
        pods: &BTreeMap<String, PodInfo>,
        statuses: Vec<(String, PodStatus)>,
        deletes: &[String],
        in_flight: &PodJobs,
    ) -> PodJob {
        let now = Instant::now();
        let lowering = in_flight.lowering();
        let mut writes = Vec::new();
        let mut changes = Vec::new();
        for (uid, st) in statuses {
            let Some(p) = pods.get(&uid) else { continue };
            let (from_ready, to_ready) = (is_ready(p.status()), is_ready(Some(&st)));
            if in_flight.busy(&uid) || (lowering && to_ready && !from_ready) {
                continue;
            }
            changes.push(StatusChange {
                pod_index: writes.len() as u32,
                creation_ts: p.creation_ts,
                revision: p.revision,
                from_ready,
                to_ready,
                deleting: p.deleting,
            });
            writes.push(PodWrite {
                ready: self.backoff.ready(&pod_write_key(&uid), now),
                uid,
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                status: st,
            });
        }
        let removals = deletes
            .iter()
            .filter(|uid| !in_flight.busy(uid))
            .filter_map(|uid| pods.get(uid))
            .filter(|p| self.backoff.ready(&pod_delete_key(&p.uid), now))
            .map(|p| {
                info!(pod = %pod_key(&p.pod), "modules gone; removing pod");
                (p.uid.clone(), p.namespace.clone(), p.name.clone())
            })
            .collect();
        PodJob {
            api: self.api.clone(),
            order: self.order,
            policies: self.policies.clone(),
            pool: self.pool.clone(),
            writes,
            changes,
            removals,
        }
    }

    /// Records what a pod job achieved (backoff of what failed, Events for the problems its
    /// statuses show) and returns the statuses written and the pods removed.
    pub fn pod_job_done(
        &mut self,
        pods: &BTreeMap<String, PodInfo>,
        done: PodJobDone,
    ) -> (Vec<(String, PodStatus)>, Vec<String>) {
        let now = Instant::now();
        let mut written = Vec::new();
        // A pod that went while its write was in flight is forgotten already.
        for (uid, status, r) in done.statuses {
            if !pods.contains_key(&uid) {
                continue;
            }
            let key = pod_write_key(&uid);
            match r {
                Ok(()) => {
                    debug!(%uid, ready = is_ready(Some(&status)), "pod status written");
                    self.backoff.succeeded(&key, "pod status write");
                    written.push((uid, status));
                }
                Err(e) => self.backoff.failed(&key, "pod status write", &e, now),
            }
        }
        let mut removed = Vec::new();
        for (uid, r) in done.removals {
            if !pods.contains_key(&uid) {
                continue;
            }
            match r {
                Ok(()) => {
                    self.forget_pod(&uid);
                    removed.push(uid);
                }
                Err(e) => self
                    .backoff
                    .failed(&pod_delete_key(&uid), "pod removal", &e, now),
            }
        }
        let notices: Vec<_> = written
            .iter()
            .flat_map(|(uid, st)| self.problems(pods, uid, st))
            .collect();
        if !notices.is_empty() {
            // Events are best effort and never hold up the base task.
            let api = self.api.clone();
            tokio::spawn(async move {
                for (object, notice) in notices {
                    api.event(&object, notice).await;
                }
            });
        }
        (written, removed)
    }

    /// The Events for every container problem a user must see, once per distinct problem.
    fn problems(
        &mut self,
        pods: &BTreeMap<String, PodInfo>,
        uid: &str,
        st: &PodStatus,
    ) -> Vec<(k8s_openapi::api::core::v1::ObjectReference, Notice)> {
        let Some(p) = pods.get(uid) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for c in st.container_statuses.iter().flatten() {
            let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = w.reason.clone().unwrap_or_default();
            // Progress and a silent base are states, not problems of this pod (the VNode
            // shows the latter).
            let routine = [
                crate::vpod::status::INSTALL_EXECUTING,
                crate::vpod::status::BASE_NOT_READY,
            ];
            if !REPORTED_SOURCES.iter().any(|s| reason.starts_with(s))
                || routine.contains(&reason.as_str())
            {
                continue;
            }
            let message = w.message.clone().unwrap_or_default();
            let new = self
                .reported
                .entry(uid.to_string())
                .or_default()
                .insert((reason.clone(), message.clone()));
            if new {
                // The same two-level code users see on the container (and know from the
                // reference), e.g. `Arklet.InstallModuleFailed`.
                let notice = Notice {
                    warning: true,
                    reason: reason.clone(),
                    action: "InstallModule".into(),
                    note: format!("module {} on base {}: {message}", c.name, self.base_id),
                };
                out.push((apiserver::object_ref(p.pod.as_ref()), notice));
            }
        }
        out
    }

    /// Tells the pod's users that its module is replaced in place (same name and version, new
    /// package): the old package stops before the new one starts on this base.
    pub async fn report_replacement(
        &self,
        pods: &BTreeMap<String, PodInfo>,
        uid: &str,
        spec: &crate::model::ModuleSpec,
    ) {
        let Some(p) = pods.get(uid) else { return };
        info!(module = %spec.key(), url = %spec.url, "replacing the module in place from a new package");
        let notice = Notice {
            warning: true,
            reason: REPLACEMENT.into(),
            action: "ReplaceModule".into(),
            note: format!(
                "module {} on base {} is reinstalled from {} (uninstallThenInstall): the same \
                 name and version cannot run twice on one base, so this base serves no \
                 {} while it restarts; change BIZ_VERSION for a lossless rollout",
                spec.key(),
                self.base_id,
                spec.url,
                spec.name
            ),
        };
        self.api
            .event(&apiserver::object_ref(p.pod.as_ref()), notice)
            .await;
    }

    /// Reports a failed uninstall on the pods that asked for the module (else only the log).
    pub async fn report_uninstall_failure(
        &self,
        pods: &BTreeMap<String, PodInfo>,
        key: &crate::model::ModuleKey,
        message: &str,
    ) {
        let subjects: Vec<&PodInfo> = pods
            .values()
            .filter(|p| p.specs().any(|s| s.key() == *key))
            .collect();
        if subjects.is_empty() {
            warn!(module = %key, %message, "uninstall failed; no pod to report it on");
        }
        for p in subjects {
            let notice = Notice {
                warning: true,
                reason: crate::vpod::status::UNINSTALL_FAILED.into(),
                action: "UninstallModule".into(),
                note: format!("module {key} on base {}: {message}", self.base_id),
            };
            self.api
                .event(&apiserver::object_ref(p.pod.as_ref()), notice)
                .await;
        }
    }

    /// Forgets what was reported about a pod that is gone.
    pub fn forget_pod(&mut self, uid: &str) {
        self.reported.remove(uid);
        self.backoff.forget(&pod_write_key(uid));
        self.backoff.forget(&pod_delete_key(uid));
    }

    /// The VNode writes that are due, as a job that can run off the base task (a Lease
    /// renewal never holds up a pod's install or status); its outcome goes to
    /// [`Effects::node_job_done`].
    pub fn node_job(&self, node: &NodeSync, writes: NodeWrites, now: Instant) -> NodeJob {
        NodeJob {
            api: self.api.clone(),
            node_name: self.node_name.clone(),
            node_uid: node.node_uid().map(str::to_string),
            writes,
            started: now,
        }
    }

    /// Records what a VNode job achieved. A failure puts the VNode's writes on a backoff
    /// and is logged on the first failure of a streak only: a write that fails at once (the
    /// apiserver is known not to answer) was retried in a busy loop, 12,000 times a second.
    pub fn node_job_done(&self, node: &mut NodeSync, done: NodeJobDone, now: Instant) {
        let started = done.started;
        let mut failed: Vec<(&str, kube::Error)> = Vec::new();
        match done.applied {
            None => {}
            Some(Ok((desired, uid))) => {
                if !node.applied_once() {
                    info!(node = %self.node_name, "VNode applied");
                }
                node.node_applied(desired, uid);
            }
            Some(Err(e)) => failed.push(("VNode apply", e)),
        }
        match done.status {
            None => {}
            Some((status, Ok(()))) => node.status_written(status, started),
            Some((_, Err(e))) if is_not_found(&e) => {
                warn!(node = %self.node_name, "VNode was deleted externally; recreating");
                node.node_missing();
            }
            Some((_, Err(e))) => failed.push(("VNode status write", e)),
        }
        match done.lease {
            None => {}
            Some(Ok(())) => node.lease_renewed(started),
            Some(Err(e)) => failed.push(("lease renewal", e)),
        }
        if failed.is_empty() {
            if let Some(failures) = node.writes_succeeded() {
                info!(node = %self.node_name, failures, "VNode writes recovered");
            }
            return;
        }
        if node.write_failed(now) == 1 {
            for (what, e) in failed {
                warn!(node = %self.node_name, error = %e, "{what} failed; retrying with backoff");
            }
        }
    }

    /// Drains and removes the VNode: unschedulable first (nothing new binds to it), then its
    /// pods, then the Node and its Lease.
    pub async fn remove_vnode(&self, pods: &BTreeMap<String, PodInfo>, reason: &str) {
        if let Err(e) = self.api.cordon_node(&self.node_name).await {
            warn!(node = %self.node_name, error = %e, "VNode could not be cordoned before removal");
        }
        for p in pods.values() {
            if let Err(e) = self.api.delete_pod_now(&p.namespace, &p.name, &p.uid).await {
                warn!(pod = %pod_key(&p.pod), error = %e, "pod removal failed during drain");
            }
        }
        match self.api.delete_node(&self.node_name).await {
            Ok(()) => info!(node = %self.node_name, reason, "VNode removed"),
            Err(e) => warn!(node = %self.node_name, error = %e, reason, "VNode removal failed"),
        }
        self.tunnel.forget(&self.base_id);
    }
}

/// The VNode writes that are due (see [`Effects::node_job`]).
pub struct NodeJob {
    api: Api,
    node_name: String,
    node_uid: Option<String>,
    writes: NodeWrites,
    started: Instant,
}

/// What a [`NodeJob`] achieved; `None` for a write it did not attempt.
pub struct NodeJobDone {
    started: Instant,
    applied: Option<Result<(k8s_openapi::api::core::v1::Node, Option<String>), kube::Error>>,
    status: Option<(
        k8s_openapi::api::core::v1::NodeStatus,
        Result<(), kube::Error>,
    )>,
    lease: Option<Result<(), kube::Error>>,
}

impl NodeJob {
    /// Performs the writes: the Node first (a failure stops the rest), then its status, then
    /// its Lease.
    pub async fn run(self) -> NodeJobDone {
        let mut done = NodeJobDone {
            started: self.started,
            applied: None,
            status: None,
            lease: None,
        };
        let mut node_uid = self.node_uid;
        if let Some(desired) = self.writes.apply {
            match self.api.apply_node(&desired).await {
                Ok(uid) => {
                    node_uid.clone_from(&uid);
                    done.applied = Some(Ok((desired, uid)));
                }
                Err(e) => {
                    done.applied = Some(Err(e));
                    return done;
                }
            }
        }
        if let Some(status) = self.writes.status {
            let r = self.api.patch_node_status(&self.node_name, &status).await;
            done.status = Some((status, r));
        }
        if self.writes.lease {
            done.lease = Some(
                self.api
                    .renew_node_lease(&self.node_name, node_uid.as_deref())
                    .await,
            );
        }
        done
    }
}

/// One pod status write of a [`PodJob`].
#[derive(Debug, Clone)]
struct PodWrite {
    uid: String,
    namespace: String,
    name: String,
    status: PodStatus,
    /// False while the pod's writes wait out their backoff.
    ready: bool,
}

/// The pod jobs of a base in flight, and what each holds back from the next ones.
#[derive(Default)]
pub struct PodJobs {
    jobs: JoinSet<PodJobDone>,
    claims: HashMap<tokio::task::Id, JobClaim>,
}

/// What a pod job in flight holds back.
#[derive(Debug)]
struct JobClaim {
    /// Its pods (uids).
    pods: HashSet<String>,
    /// It makes a pod NotReady.
    lowers: bool,
}

impl PodJobs {
    /// Starts `job` (nothing when it is empty).
    pub fn spawn(&mut self, job: PodJob) {
        if job.is_empty() {
            return;
        }
        let claim = JobClaim {
            pods: job.pods(),
            lowers: job.lowers(),
        };
        let id = self.jobs.spawn(job.run()).id();
        self.claims.insert(id, claim);
    }

    /// Whether no job is in flight.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The next job to end: `None` if it panicked or was aborted (nothing it did is known);
    /// pending while none is in flight.
    pub async fn next_done(&mut self) -> Option<PodJobDone> {
        let Some(done) = self.jobs.join_next_with_id().await else {
            return std::future::pending().await;
        };
        match done {
            Ok((id, done)) => {
                self.claims.remove(&id);
                Some(done)
            }
            Err(e) => {
                self.claims.remove(&e.id());
                warn!(error = %e, "a pod write job of the base task did not finish");
                None
            }
        }
    }

    /// Stops every job.
    pub fn abort_all(&mut self) {
        self.jobs.abort_all();
        self.claims.clear();
    }

    fn busy(&self, uid: &str) -> bool {
        self.claims.values().any(|c| c.pods.contains(uid))
    }

    fn lowering(&self) -> bool {
        self.claims.values().any(|c| c.lowers)
    }
}

/// The pod writes one plan decided (see [`Effects::pod_job`]).
pub struct PodJob {
    api: Api,
    order: StatusOrder,
    policies: Arc<dyn PolicySource>,
    pool: Option<Pool>,
    writes: Vec<PodWrite>,
    changes: Vec<StatusChange>,
    /// uid, namespace, name.
    removals: Vec<(String, String, String)>,
}

/// What a [`PodJob`] achieved, write by write.
pub struct PodJobDone {
    statuses: Vec<(String, PodStatus, Result<(), kube::Error>)>,
    removals: Vec<(String, Result<(), kube::Error>)>,
}

impl PodJobDone {
    /// Whether the job wrote nothing and failed nothing: all its writes wait out a backoff.
    pub fn did_nothing(&self) -> bool {
        self.statuses.is_empty() && self.removals.is_empty()
    }
}

impl PodJob {
    /// Whether the job has nothing to write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.removals.is_empty()
    }

    /// Whether it makes a pod NotReady (a Ready write must not overtake it).
    pub fn lowers(&self) -> bool {
        self.changes.iter().any(|c| c.from_ready && !c.to_ready)
    }

    /// The pods it writes or removes (uids).
    pub fn pods(&self) -> HashSet<String> {
        self.writes
            .iter()
            .map(|w| w.uid.clone())
            .chain(self.removals.iter().map(|(uid, _, _)| uid.clone()))
            .collect()
    }

    /// Performs the writes.
    pub async fn run(self) -> PodJobDone {
        let mut statuses = Vec::new();
        if !self.writes.is_empty() {
            let waves = waves(
                self.order,
                &self.policies,
                self.pool.as_ref(),
                self.changes.clone(),
            )
            .await;
            for wave in waves {
                let (ready, waiting): (Vec<usize>, Vec<usize>) =
                    wave.iter().partition(|&&i| self.writes[i].ready);
                let (api, writes) = (&self.api, &self.writes);
                let results: Vec<_> =
                    futures::stream::iter(ready.clone().into_iter().map(move |i: usize| {
                        let w = &writes[i];
                        api.patch_pod_status(&w.namespace, &w.name, &w.status)
                    }))
                    .buffered(self.api.base_workers())
                    .collect()
                    .await;
                let mut failed = !waiting.is_empty();
                for (&i, r) in ready.iter().zip(results) {
                    failed |= r.is_err();
                    let w = &self.writes[i];
                    statuses.push((w.uid.clone(), w.status.clone(), r));
                }
                if failed {
                    // The next wave may make a pod Ready; it must wait until this one is through.
                    break;
                }
            }
        }
        let mut removals = Vec::new();
        for (uid, namespace, name) in self.removals {
            let r = self.api.delete_pod_now(&namespace, &name, &uid).await;
            removals.push((uid, r));
        }
        PodJobDone { statuses, removals }
    }
}

/// The waves the ordering rule proposes, checked (`order_with` enforces the invariant); a
/// plugin rule runs on the plugin pool, never on a base task's thread.
async fn waves(
    order: StatusOrder,
    policies: &Arc<dyn PolicySource>,
    pool: Option<&Pool>,
    changes: Vec<StatusChange>,
) -> Waves {
    match order {
        StatusOrder::Lossless => {
            let rule = policies.ordering();
            let name = rule.name().to_string();
            let (waves, err) = match pool {
                None => order_with(rule.as_ref(), &changes),
                Some(pool) => {
                    let c = changes.clone();
                    match offload::run(pool.as_ref(), move || order_with(rule.as_ref(), &c)).await {
                        Ok(r) => r,
                        Err(e) => (default_waves(&changes), Some(OrderingError::RuleFailed(e))),
                    }
                }
            };
            if let Some(e) = err {
                warn!(rule = %name, error = %e, "ordering rule overruled; built-in order used");
            }
            waves
        }
        #[cfg(feature = "test-switches")]
        StatusOrder::UnsafeReadyFirst => default_waves(&changes).into_iter().rev().collect(),
    }
}

#[cfg(test)]
mod tests {
    //! The apiserver conversation of a status write, pinned request by request (a mock
    //! apiserver answers each one, so the order in which they go out is observable).

    use super::*;
    use crate::apiserver::ApiMetrics;
    use crate::base::testing::NoTunnel;
    use crate::rollout::BuiltinPolicies;
    use http::{Request, Response};
    use k8s_openapi::api::core::v1::{Pod, PodCondition};
    use kube::client::Body;
    use std::time::Duration;

    fn status(ready: bool) -> PodStatus {
        PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn info(name: &str, ready: bool, created: i64) -> PodInfo {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "uid": name}
        }))
        .expect("pod");
        PodInfo {
            uid: name.into(),
            namespace: "ns".into(),
            name: name.into(),
            creation_ts: created,
            revision: 0,
            deleting: false,
            owner: None,
            modules: vec![],
            written: Some(Box::new(status(ready))),
            pod: Arc::new(pod),
        }
    }

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn effects() -> (Effects, Handle) {
        let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(svc, "default");
        let api = Api::new(client, 8, "test", ApiMetrics::default());
        let fx = Effects::new(
            "b1",
            "vnode.b1.dev",
            EffectsDeps {
                api,
                tunnel: Arc::new(NoTunnel),
                policies: Arc::new(BuiltinPolicies),
                metrics: BaseMetrics::default(),
                order: StatusOrder::Lossless,
                pool: None,
            },
        );
        (fx, handle)
    }

    fn pods() -> BTreeMap<String, PodInfo> {
        [info("old", true, 1), info("new", false, 2)]
            .into_iter()
            .map(|p| (p.uid.clone(), p))
            .collect()
    }

    /// The next request: its method and path. Panics if none comes within a second.
    async fn expect_request(
        handle: &mut Handle,
    ) -> (String, tower_test::mock::SendResponse<Response<Body>>) {
        let (req, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
            .await
            .expect("a request within 1 s")
            .expect("service alive");
        (format!("{} {}", req.method(), req.uri().path()), send)
    }

    /// True when no request arrives within `d` (the service may also be gone).
    async fn no_request_within(handle: &mut Handle, d: Duration) -> bool {
        !matches!(
            tokio::time::timeout(d, handle.next_request()).await,
            Ok(Some(_))
        )
    }

    fn ok_pod(name: &str) -> Response<Body> {
        ok_object("Pod", name)
    }

    fn ok_object(kind: &str, name: &str) -> Response<Body> {
        let mut body = serde_json::json!({"apiVersion": "v1", "kind": kind,
            "metadata": {"name": name, "namespace": "ns"}});
        if kind == "Status" {
            body["status"] = "Success".into();
        }
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response")
    }

    fn server_error() -> Response<Body> {
        let body = serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "etcd is down", "reason": "InternalError", "code": 500});
        Response::builder()
            .status(500)
            .body(Body::from(serde_json::to_vec(&body).expect("json")))
            .expect("response")
    }

    #[tokio::test]
    async fn the_ready_write_waits_for_the_not_ready_write_to_be_acknowledged() {
        let (mut fx, mut handle) = effects();
        let pods = pods();
        let writes = vec![
            ("new".to_string(), status(true)),
            ("old".to_string(), status(false)),
        ];
        let task = tokio::spawn(async move { fx.write_statuses(&pods, writes).await });
        let (first, send) = expect_request(&mut handle).await;
        assert_eq!(first, "PATCH /api/v1/namespaces/ns/pods/old/status");
        // Unacknowledged: nothing else may go out.
        assert!(
            no_request_within(&mut handle, Duration::from_millis(200)).await,
            "the Ready write went out before the NotReady write was acknowledged"
        );
        send.send_response(ok_pod("old"));
        let (second, send) = expect_request(&mut handle).await;
        assert_eq!(second, "PATCH /api/v1/namespaces/ns/pods/new/status");
        send.send_response(ok_pod("new"));
        let written = task.await.expect("task");
        let uids: Vec<&str> = written.iter().map(|(u, _)| u.as_str()).collect();
        assert_eq!(uids, vec!["old", "new"]);
    }

    #[tokio::test]
    async fn a_failed_not_ready_write_holds_back_the_ready_write() {
        let (mut fx, mut handle) = effects();
        let pods = pods();
        let writes = vec![
            ("new".to_string(), status(true)),
            ("old".to_string(), status(false)),
        ];
        let task = tokio::spawn(async move { fx.write_statuses(&pods, writes).await });
        let (first, send) = expect_request(&mut handle).await;
        assert_eq!(first, "PATCH /api/v1/namespaces/ns/pods/old/status");
        send.send_response(server_error());
        assert!(
            no_request_within(&mut handle, Duration::from_millis(300)).await,
            "a Ready write went out after its NotReady write failed"
        );
        let written = tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("returns")
            .expect("task");
        assert!(written.is_empty(), "{written:?}");
    }

    #[tokio::test]
    async fn a_ready_write_does_not_start_while_another_job_makes_a_pod_not_ready() {
        let (fx, mut handle) = effects();
        let pods = pods();
        let mut jobs = PodJobs::default();
        jobs.spawn(fx.pod_job(&pods, vec![("old".into(), status(false))], &[], &jobs));
        let (first, send) = expect_request(&mut handle).await;
        assert_eq!(first, "PATCH /api/v1/namespaces/ns/pods/old/status");
        // While the NotReady write is in flight, a second job is asked for the Ready write
        // and another write of the same pod: both are left for later.
        let second = fx.pod_job(
            &pods,
            vec![("new".into(), status(true)), ("old".into(), status(false))],
            &[],
            &jobs,
        );
        assert!(second.is_empty(), "{:?}", second.pods());
        send.send_response(ok_pod("old"));
        assert!(jobs.next_done().await.is_some_and(|d| !d.did_nothing()));
        // Once it is through, the Ready write goes.
        let third = fx.pod_job(&pods, vec![("new".into(), status(true))], &[], &jobs);
        assert_eq!(third.pods(), HashSet::from(["new".to_string()]));
    }

    #[tokio::test]
    async fn a_drain_cordons_the_node_before_removing_pods() {
        let (fx, mut handle) = effects();
        let pods = pods();
        let task = tokio::spawn(async move { fx.remove_vnode(&pods, "BaseDeactivated").await });
        let (first, send) = expect_request(&mut handle).await;
        assert_eq!(first, "PATCH /api/v1/nodes/vnode.b1.dev");
        send.send_response(ok_object("Node", "vnode.b1.dev"));
        let mut rest = Vec::new();
        for _ in 0..4 {
            let (r, send) = expect_request(&mut handle).await;
            rest.push(r);
            send.send_response(ok_object("Status", "x"));
        }
        task.await.expect("task");
        assert_eq!(
            rest,
            vec![
                "DELETE /api/v1/namespaces/ns/pods/new",
                "DELETE /api/v1/namespaces/ns/pods/old",
                "DELETE /apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/vnode.b1.dev",
                "DELETE /api/v1/nodes/vnode.b1.dev",
            ]
        );
    }
}
