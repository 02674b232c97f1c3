//! The effects executor of a base task: commands to the base through its tunnel, and writes to
//! the apiserver — pod statuses in safe waves, pod removals, the VNode, its status and Lease,
//! and Events where users look.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use futures::future::join_all;
use k8s_openapi::api::core::v1::PodStatus;
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

    /// Counts a re-sent install.
    pub fn count_retry(&self, cmd: &BaseCommand) {
        self.metrics.count(cmd.kind(), "retry");
    }

    /// Writes status changes in waves: every write of a wave is acknowledged before the next
    /// wave starts, every NotReady write comes before any Ready one, and a failed wave stops
    /// the later ones (they are retried next time, in the same order). Returns what was written.
    pub async fn write_statuses(
        &mut self,
        pods: &BTreeMap<String, PodInfo>,
        statuses: Vec<(String, PodStatus)>,
    ) -> Vec<(String, PodStatus)> {
        let statuses: Vec<(String, PodStatus)> = statuses
            .into_iter()
            .filter(|(uid, _)| pods.contains_key(uid))
            .collect();
        let changes: Vec<StatusChange> = statuses
            .iter()
            .enumerate()
            .map(|(i, (uid, st))| {
                let p = &pods[uid];
                StatusChange {
                    pod_index: i as u32,
                    creation_ts: p.creation_ts,
                    revision: p.revision,
                    from_ready: is_ready(p.status.as_ref()),
                    to_ready: is_ready(Some(st)),
                    deleting: p.deleting,
                }
            })
            .collect();
        let waves = self.waves(changes.clone()).await;
        let mut written = Vec::new();
        for wave in waves {
            let now = Instant::now();
            // A pod whose writes are failing waits out its backoff; the waves after it wait too.
            let (ready, waiting): (Vec<usize>, Vec<usize>) = wave
                .iter()
                .partition(|&&i| self.backoff.ready(&pod_write_key(&statuses[i].0), now));
            let writes = ready.iter().map(|&i| {
                let (uid, st) = &statuses[i];
                let p = &pods[uid];
                let api = self.api.clone();
                async move { api.patch_pod_status(&p.namespace, &p.name, st).await }
            });
            let results = join_all(writes).await;
            let mut failed = !waiting.is_empty();
            for (&i, r) in ready.iter().zip(results) {
                let (uid, st) = &statuses[i];
                let key = pod_write_key(uid);
                match r {
                    Ok(()) => {
                        debug!(pod = %pod_key(&pods[uid].pod), ready = is_ready(Some(st)), "pod status written");
                        self.backoff.succeeded(&key, "pod status write");
                        written.push((uid.clone(), st.clone()));
                    }
                    Err(e) => {
                        failed = true;
                        self.backoff
                            .failed(&key, "pod status write", &e, Instant::now());
                    }
                }
            }
            if failed {
                // The next wave may make a pod Ready; it must wait until this one is through.
                break;
            }
        }
        for (uid, st) in &written {
            self.report_problems(pods, uid, st).await;
        }
        written
    }

    /// The waves the ordering rule proposes, checked (`order_with` enforces the invariant);
    /// a plugin rule runs on the plugin pool, never on this task's thread.
    async fn waves(&self, changes: Vec<StatusChange>) -> Waves {
        match self.order {
            StatusOrder::Lossless => {
                let rule = self.policies.ordering();
                let name = rule.name().to_string();
                let (waves, err) = match &self.pool {
                    None => order_with(rule.as_ref(), &changes),
                    Some(pool) => {
                        let c = changes.clone();
                        match offload::run(pool.as_ref(), move || order_with(rule.as_ref(), &c))
                            .await
                        {
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

    /// Publishes an Event for every container problem a user must see, once per distinct problem.
    async fn report_problems(
        &mut self,
        pods: &BTreeMap<String, PodInfo>,
        uid: &str,
        st: &PodStatus,
    ) {
        let Some(p) = pods.get(uid) else { return };
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
                self.api
                    .event(&apiserver::object_ref(p.pod.as_ref()), notice)
                    .await;
            }
        }
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

    /// Removes pods whose modules are gone; returns the uids removed.
    pub async fn delete_pods(
        &mut self,
        pods: &BTreeMap<String, PodInfo>,
        uids: &[String],
    ) -> Vec<String> {
        let mut removed = Vec::new();
        for uid in uids {
            let Some(p) = pods.get(uid) else { continue };
            let key = pod_delete_key(uid);
            if !self.backoff.ready(&key, Instant::now()) {
                continue;
            }
            info!(pod = %pod_key(&p.pod), "modules gone; removing pod");
            match self.api.delete_pod_now(&p.namespace, &p.name, uid).await {
                Ok(()) => {
                    self.forget_pod(uid);
                    removed.push(uid.clone());
                }
                Err(e) => self.backoff.failed(&key, "pod removal", &e, Instant::now()),
            }
        }
        removed
    }

    /// Performs the VNode writes that are due and records what succeeded.
    pub async fn write_node(&self, node: &mut NodeSync, writes: NodeWrites, now: Instant) {
        if let Some(desired) = writes.apply {
            match self.api.apply_node(&desired).await {
                Ok(uid) => {
                    if !node.applied_once() {
                        info!(node = %self.node_name, "VNode applied");
                    }
                    node.node_applied(desired, uid);
                }
                Err(e) => {
                    warn!(node = %self.node_name, error = %e, "VNode apply failed; retrying");
                    return;
                }
            }
        }
        if let Some(status) = writes.status {
            match self.api.patch_node_status(&self.node_name, &status).await {
                Ok(()) => node.status_written(status, now),
                Err(e) if is_not_found(&e) => {
                    warn!(node = %self.node_name, "VNode was deleted externally; recreating");
                    node.node_missing();
                }
                Err(e) => {
                    warn!(node = %self.node_name, error = %e, "VNode status write failed; retrying")
                }
            }
        }
        if writes.lease {
            match self
                .api
                .renew_node_lease(&self.node_name, node.node_uid())
                .await
            {
                Ok(()) => node.lease_renewed(now),
                Err(e) => {
                    warn!(node = %self.node_name, error = %e, "lease renewal failed; retrying")
                }
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
            status: Some(status(ready)),
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
