//! One task per base: owns that base's state, applies tunnel events and pod changes, and
//! performs the plan — commands to the base, status writes to Kubernetes, in a safe order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{Node, NodeStatus, Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::base::plan::{self, Failure, InFlight, PlanInput, PodInfo, Retention};
use crate::kube_util::{KubeCtx, now_time, pod_ref};
use crate::model::{
    BaseCommand, BaseHealth, BaseHeartbeat, BaseLifecycle, BizState, ModuleKey, ModuleSpec,
    ModuleStatus, OperationKind, OperationResult, TunnelEvent,
};
use crate::rollout::PolicySource;
use crate::rollout::ordering::{StatusChange, Waves, default_waves, order_with};
use crate::tunnel::Tunnel;
use crate::vnode::lease;
use crate::vnode::liveness::{Liveness, LivenessPolicy};
use crate::vnode::shape::{self, NodeReadiness, NodeShapeInput};
use crate::vpod::spec::{creation_secs, modules_of, owner_of, pod_key};
use crate::vpod::status::{Note, is_ready};
use crate::vpod::writer;

/// Node status is rewritten at least this often while nothing changes.
const NODE_STATUS_REFRESH: Duration = Duration::from_secs(60);

/// Settings every base actor shares.
#[derive(Debug, Clone)]
pub struct ActorSettings {
    /// Controller env.
    pub env: String,
    /// Add the env taint to VNodes.
    pub env_taint: bool,
    /// Liveness thresholds.
    pub liveness: LivenessPolicy,
    /// Lease renewal period.
    pub lease_renew: Duration,
    /// Full module-list query period.
    pub resync: Duration,
    /// Wait for a command outcome before re-sending.
    pub command_timeout: Duration,
    /// Tick period (liveness checks, retries).
    pub tick: Duration,
    /// Hand-over protection and the NotReady-before-Ready order; `false` only in tests that
    /// demonstrate what they prevent.
    pub lossless: bool,
    /// Longest a module is kept on a base waiting for its replacement during a rollout.
    pub retention_timeout: Duration,
}

/// A message to a base actor.
#[derive(Debug)]
pub enum BaseMsg {
    /// Something the base said.
    Event(TunnelEvent),
    /// A pod bound to this base's VNode was added or changed.
    PodUpsert(Arc<Pod>),
    /// A pod bound to this base's VNode is gone.
    PodRemoved(String),
    /// The complete set of pods bound to this VNode (after a watch (re)list).
    PodsSynced(Vec<Arc<Pod>>),
    /// HTTP tunnel: answer a base's queryBaseline.
    Baseline(oneshot::Sender<Vec<ModuleSpec>>),
    /// Owners with a rollout in progress (replaces the previous set).
    Rollouts(Arc<HashSet<String>>),
    /// Batch-policy holds for pods on this base (replaces the previous holds of those pods;
    /// `None` releases a pod).
    Holds(Vec<(String, Option<Note>)>),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CmdLabel {
    command: String,
    result: String,
}

fn command_counter() -> &'static Family<CmdLabel, Counter> {
    static F: OnceLock<Family<CmdLabel, Counter>> = OnceLock::new();
    F.get_or_init(|| {
        let f = Family::default();
        crate::metrics::register(
            "base_commands",
            "Commands sent to bases, by command and result (sent, retry, send_failed)",
            f.clone(),
        );
        f
    })
}

fn count_command(command: &str, result: &str) {
    command_counter()
        .get_or_create(&CmdLabel {
            command: command.into(),
            result: result.into(),
        })
        .inc();
}

/// Commands of `command` kind counted with `result` so far (for tests and benchmarks).
pub fn commands_counted(command: &str, result: &str) -> u64 {
    command_counter()
        .get_or_create(&CmdLabel {
            command: command.into(),
            result: result.into(),
        })
        .get()
}

/// Why an actor ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorExit {
    /// The base shut down gracefully; its VNode was removed.
    Drained,
    /// The base never came back within the TTL; its VNode was removed.
    Expired,
    /// The controller is stopping.
    Stopped,
}

/// The state of one base.
pub struct BaseActor {
    base_id: String,
    node_name: String,
    settings: Arc<ActorSettings>,
    ctx: KubeCtx,
    tunnel: Arc<dyn Tunnel>,
    tunnel_name: String,
    policies: Arc<dyn PolicySource>,

    heartbeat: Option<BaseHeartbeat>,
    health: Option<BaseHealth>,
    last_seen: Instant,
    draining: bool,
    liveness: Liveness,
    node_uid: Option<String>,
    applied_node: Option<Node>,
    written_node_status: Option<NodeStatus>,
    node_status_written_at: Option<Instant>,
    ready_since: Time,
    last_lease: Option<Instant>,

    pods: BTreeMap<String, PodInfo>,
    pods_synced: bool,
    pending_baseline: Vec<oneshot::Sender<Vec<ModuleSpec>>>,
    baseline_requested: bool,
    reported: Option<HashMap<ModuleKey, ModuleStatus>>,
    inflight: HashMap<(OperationKind, ModuleKey), InFlight>,
    failures: HashMap<ModuleKey, Failure>,
    held: HashMap<String, Note>,
    rollouts: Arc<HashSet<String>>,
    retained: HashMap<ModuleKey, Retention>,
    next_query_at: Instant,
    last_query_at: Option<Instant>,
    events_sent: HashSet<(String, String, String)>,
}

impl BaseActor {
    /// A new actor for `base_id`. `adopted` means its VNode existed before this process started.
    pub fn new(
        base_id: &str,
        settings: Arc<ActorSettings>,
        ctx: KubeCtx,
        tunnel: Arc<dyn Tunnel>,
        tunnel_name: &str,
        policies: Arc<dyn PolicySource>,
    ) -> Self {
        let now = Instant::now();
        BaseActor {
            base_id: base_id.to_string(),
            node_name: shape::node_name(base_id, &settings.env),
            settings,
            ctx,
            tunnel,
            tunnel_name: tunnel_name.to_string(),
            policies,
            heartbeat: None,
            health: None,
            last_seen: now,
            draining: false,
            liveness: Liveness::Alive,
            node_uid: None,
            applied_node: None,
            written_node_status: None,
            node_status_written_at: None,
            ready_since: now_time(),
            last_lease: None,
            pods: BTreeMap::new(),
            pods_synced: false,
            pending_baseline: Vec::new(),
            baseline_requested: false,
            reported: None,
            inflight: HashMap::new(),
            failures: HashMap::new(),
            held: HashMap::new(),
            rollouts: Arc::new(HashSet::new()),
            retained: HashMap::new(),
            next_query_at: now,
            last_query_at: None,
            events_sent: HashSet::new(),
        }
    }

    /// Runs until the base is drained or expired, or the channel closes.
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<BaseMsg>) -> ActorExit {
        let mut tick = tokio::time::interval(self.settings.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                m = rx.recv() => {
                    let Some(m) = m else { return ActorExit::Stopped };
                    self.handle(m).await;
                    // Coalesce a burst into one reconcile.
                    while let Ok(m) = rx.try_recv() {
                        self.handle(m).await;
                    }
                }
                _ = tick.tick() => {}
            }
            if let Some(exit) = self.step().await {
                return exit;
            }
        }
    }

    fn seen(&mut self) {
        self.last_seen = Instant::now();
    }

    async fn handle(&mut self, m: BaseMsg) {
        match m {
            BaseMsg::Event(ev) => self.on_event(ev).await,
            BaseMsg::PodUpsert(pod) => self.upsert_pod(pod),
            BaseMsg::PodRemoved(uid) => {
                self.pods.remove(&uid);
                self.held.remove(&uid);
            }
            BaseMsg::PodsSynced(pods) => {
                let keep: HashSet<String> =
                    pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
                self.pods.retain(|uid, _| keep.contains(uid));
                for p in pods {
                    self.upsert_pod(p);
                }
                self.pods_synced = true;
                for tx in std::mem::take(&mut self.pending_baseline) {
                    let _ = tx.send(plan::baseline(&self.pods));
                }
            }
            BaseMsg::Rollouts(r) => self.rollouts = r,
            BaseMsg::Holds(holds) => {
                for (uid, note) in holds {
                    match note {
                        Some(n) => {
                            self.held.insert(uid, n);
                        }
                        None => {
                            self.held.remove(&uid);
                        }
                    }
                }
            }
            BaseMsg::Baseline(tx) => {
                self.seen();
                self.base_restarted();
                if self.pods_synced {
                    let _ = tx.send(plan::baseline(&self.pods));
                } else {
                    self.pending_baseline.push(tx);
                }
            }
        }
    }

    fn upsert_pod(&mut self, pod: Arc<Pod>) {
        let Some(uid) = pod.metadata.uid.clone() else {
            return;
        };
        let info = PodInfo {
            uid: uid.clone(),
            namespace: pod.metadata.namespace.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            creation_ts: creation_secs(&pod),
            revision: 0,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            owner: owner_of(&pod).map(|o| o.key),
            modules: modules_of(&pod),
            status: pod.status.clone(),
            pod,
        };
        self.pods.insert(uid, info);
    }

    /// A base that (re)starts forgets what it ran: wait for a fresh list before judging pods.
    fn base_restarted(&mut self) {
        self.reported = None;
        self.inflight.clear();
        self.next_query_at = Instant::now() + Duration::from_millis(500);
    }

    async fn on_event(&mut self, ev: TunnelEvent) {
        match ev {
            TunnelEvent::Heartbeat(hb) => {
                if self.liveness != Liveness::Alive {
                    info!(base = %self.base_id, "base is back");
                    // What it runs may have changed while it was away.
                    self.reported = None;
                    self.next_query_at = Instant::now();
                }
                self.seen();
                if hb.lifecycle == BaseLifecycle::Deactivated {
                    info!(base = %self.base_id, "base announced shutdown; draining");
                    self.draining = true;
                }
                self.heartbeat = Some(hb);
            }
            TunnelEvent::QueryBaseline(_) => {
                self.seen();
                self.base_restarted();
                self.baseline_requested = true;
            }
            TunnelEvent::Health(h) => {
                self.seen();
                self.health = Some(h);
            }
            TunnelEvent::ModuleList(list) => {
                self.seen();
                self.on_module_list(list).await;
            }
            TunnelEvent::Operation(r) => {
                self.seen();
                self.on_operation(r).await;
            }
            TunnelEvent::Unreachable { reason } => {
                debug!(base = %self.base_id, %reason, "base unreachable");
            }
        }
    }

    async fn on_module_list(&mut self, list: Vec<ModuleStatus>) {
        let now = Instant::now();
        let map: HashMap<ModuleKey, ModuleStatus> =
            list.into_iter().map(|m| (m.key(), m)).collect();
        self.inflight.retain(|(kind, key), _| match kind {
            OperationKind::Install => !map
                .get(key)
                .is_some_and(|m| matches!(m.state, BizState::Activated | BizState::Broken)),
            OperationKind::Uninstall => map.contains_key(key),
        });
        for (key, m) in &map {
            match m.state {
                BizState::Activated => {
                    self.failures.remove(key);
                }
                BizState::Broken if !self.failures.contains_key(key) => {
                    let f = plan::next_failure(
                        None,
                        m.reason.as_deref(),
                        m.message.as_deref().unwrap_or("install failed"),
                        now,
                        self.settings.command_timeout,
                    );
                    self.failures.insert(key.clone(), f);
                }
                _ => {}
            }
        }
        self.retained.retain(|k, _| map.contains_key(k));
        self.reported = Some(map);
    }

    async fn on_operation(&mut self, r: OperationResult) {
        let key = ModuleKey::new(&r.name, &r.version);
        // A success is confirmed by the module list we query next; until then the command stays
        // in flight (restarted clock), or a list published before the operation would re-send it.
        if r.success {
            if let Some(f) = self.inflight.get_mut(&(r.kind, key.clone())) {
                f.sent_at = Instant::now();
            }
        } else {
            self.inflight.remove(&(r.kind, key.clone()));
        }
        match (r.kind, r.success) {
            (OperationKind::Install, false) => {
                warn!(base = %self.base_id, module = %key, code = ?r.error_code, message = %r.message, "install failed");
                let prev = self.failures.get(&key).cloned();
                let f = plan::next_failure(
                    prev.as_ref(),
                    r.error_code.as_deref(),
                    &r.message,
                    Instant::now(),
                    self.settings.command_timeout,
                );
                self.failures.insert(key, f);
            }
            (OperationKind::Install, true) => {
                self.failures.remove(&key);
            }
            (OperationKind::Uninstall, ok) => {
                if !ok {
                    warn!(base = %self.base_id, module = %key, message = %r.message, "uninstall failed");
                }
            }
        }
        // Real bases do not publish their module list unasked: ask now.
        self.next_query_at = Instant::now();
    }

    async fn send(&mut self, cmd: BaseCommand) -> bool {
        match self.tunnel.send(&self.base_id, &cmd).await {
            Ok(()) => {
                count_command(cmd.kind(), "sent");
                true
            }
            Err(e) => {
                count_command(cmd.kind(), "send_failed");
                warn!(base = %self.base_id, command = cmd.kind(), error = %e, "command not sent");
                false
            }
        }
    }

    /// One reconcile. Returns `Some` when the actor should end.
    async fn step(&mut self) -> Option<ActorExit> {
        let now = Instant::now();
        if self.draining {
            self.remove_vnode("BaseDeactivated").await;
            return Some(ActorExit::Drained);
        }
        let liveness = self.settings.liveness.assess(self.last_seen, now);
        if liveness == Liveness::Expired {
            warn!(base = %self.base_id, "base silent beyond the VNode TTL; removing its VNode");
            self.remove_vnode("BaseExpired").await;
            return Some(ActorExit::Expired);
        }
        if liveness != self.liveness {
            info!(base = %self.base_id, node = %self.node_name, from = ?self.liveness, to = ?liveness, "base liveness changed");
            self.liveness = liveness;
            self.ready_since = now_time();
        }
        let alive = liveness == Liveness::Alive;

        self.sync_node(alive).await;

        if alive {
            if self.baseline_requested && self.pods_synced {
                self.baseline_requested = false;
                let specs = plan::baseline(&self.pods);
                info!(base = %self.base_id, modules = specs.len(), "answering queryBaseline");
                for s in &specs {
                    self.inflight.insert(
                        (OperationKind::Install, s.key()),
                        InFlight {
                            sent_at: now,
                            attempts: 1,
                        },
                    );
                }
                self.send(BaseCommand::Baseline(specs)).await;
                self.next_query_at = now + Duration::from_secs(1);
            }
            let query_lost = self.reported.is_none()
                && self
                    .last_query_at
                    .is_some_and(|t| now.saturating_duration_since(t) > Duration::from_secs(3));
            if now >= self.next_query_at || query_lost {
                self.send(BaseCommand::QueryAllModules).await;
                if self
                    .last_query_at
                    .is_none_or(|t| now.saturating_duration_since(t) >= self.settings.resync)
                    || self.health.is_none()
                {
                    self.send(BaseCommand::QueryHealth).await;
                }
                self.last_query_at = Some(now);
                self.next_query_at = now + self.settings.resync;
            }
        }

        let now_t = now_time();
        let base_ip = self
            .heartbeat
            .as_ref()
            .map(|h| h.local_ip.clone())
            .unwrap_or_default();
        let decided = plan::plan(&PlanInput {
            pods: &self.pods,
            pods_synced: self.pods_synced,
            reported: self.reported.as_ref(),
            inflight: &self.inflight,
            failures: &self.failures,
            held: &self.held,
            alive,
            base_ip: &base_ip,
            now,
            now_time: &now_t,
            command_timeout: self.settings.command_timeout,
            rollouts: &self.rollouts,
            retained: &self.retained,
            retention_timeout: self.settings.retention_timeout,
            lossless: self.settings.lossless,
        });

        for (key, owner) in decided.retain {
            if !self.retained.contains_key(&key) {
                info!(base = %self.base_id, module = %key, %owner, "keeping the base's last instance until its replacement is active (rollout in progress)");
                self.retained.insert(key, Retention { owner, since: now });
            }
        }

        for spec in decided.installs {
            let key = spec.key();
            let entry = self
                .inflight
                .get(&(OperationKind::Install, key.clone()))
                .copied();
            let attempts = entry.map(|f| f.attempts + 1).unwrap_or(1);
            if attempts > 1 {
                count_command("install", "retry");
            }
            info!(base = %self.base_id, module = %key, attempts, "installing module");
            self.send(BaseCommand::Install(spec)).await;
            self.inflight.insert(
                (OperationKind::Install, key),
                InFlight {
                    sent_at: now,
                    attempts,
                },
            );
        }
        for key in decided.uninstalls {
            let entry = self
                .inflight
                .get(&(OperationKind::Uninstall, key.clone()))
                .copied();
            let attempts = entry.map(|f| f.attempts + 1).unwrap_or(1);
            info!(base = %self.base_id, module = %key, attempts, "uninstalling module");
            self.send(BaseCommand::Uninstall(key.clone())).await;
            self.inflight.insert(
                (OperationKind::Uninstall, key),
                InFlight {
                    sent_at: now,
                    attempts,
                },
            );
        }
        if !decided.statuses.is_empty() {
            self.write_statuses(decided.statuses).await;
        }
        for uid in decided.delete_pods {
            if let Some(p) = self.pods.get(&uid) {
                info!(base = %self.base_id, pod = %pod_key(&p.pod), "modules gone; removing pod");
                match writer::delete_now(&self.ctx, &p.namespace, &p.name, &uid).await {
                    Ok(()) => {
                        self.pods.remove(&uid);
                    }
                    Err(e) => {
                        warn!(pod = %pod_key(&p.pod), error = %e, "pod removal failed; retrying")
                    }
                }
            }
        }
        None
    }

    /// Writes status changes in waves: every NotReady write is acknowledged before any Ready one.
    async fn write_statuses(&mut self, statuses: Vec<(String, PodStatus)>) {
        let changes: Vec<StatusChange> = statuses
            .iter()
            .enumerate()
            .map(|(i, (uid, st))| {
                let p = &self.pods[uid];
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
        let waves: Waves = if self.settings.lossless {
            let rule = self.policies.ordering();
            let (waves, err) = order_with(rule.as_ref(), &changes);
            if let Some(e) = err {
                warn!(base = %self.base_id, rule = rule.name(), error = %e, "ordering rule overruled; built-in order used");
            }
            waves
        } else {
            // Test-only: the unsafe order (Ready writes first), to show what the invariant prevents.
            default_waves(&changes).into_iter().rev().collect()
        };
        for wave in waves {
            let writes = wave.iter().map(|&i| {
                let (uid, st) = &statuses[i];
                let p = &self.pods[uid];
                let ctx = self.ctx.clone();
                let (ns, name) = (p.namespace.clone(), p.name.clone());
                let st = st.clone();
                async move {
                    let r = writer::patch_status(&ctx, &ns, &name, &st).await;
                    (r, ns, name)
                }
            });
            let results = join_all(writes).await;
            for (&i, (r, ns, name)) in wave.iter().zip(results) {
                let (uid, st) = &statuses[i];
                match r {
                    Ok(()) => {
                        debug!(base = %self.base_id, pod = %format!("{ns}/{name}"), ready = is_ready(Some(st)), "pod status written");
                        self.report_problems(uid, st).await;
                        if let Some(p) = self.pods.get_mut(uid) {
                            p.status = Some(st.clone());
                        }
                    }
                    Err(e) => {
                        warn!(pod = %format!("{ns}/{name}"), error = %e, "pod status write failed; retrying")
                    }
                }
            }
        }
    }

    /// Publishes an Event for every container problem a user must see, once per distinct problem.
    async fn report_problems(&mut self, uid: &str, st: &PodStatus) {
        let Some(p) = self.pods.get(uid) else { return };
        let object = pod_ref(&p.pod);
        for c in st.container_statuses.iter().flatten() {
            let Some(w) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
                continue;
            };
            let reason = w.reason.clone().unwrap_or_default();
            if !["Arklet.", "User.", "ModuleController."]
                .iter()
                .any(|p| reason.starts_with(p))
            {
                continue;
            }
            let message = w.message.clone().unwrap_or_default();
            if self
                .events_sent
                .insert((uid.to_string(), reason.clone(), message.clone()))
            {
                let note = format!("module {} on base {}: {message}", c.name, self.base_id);
                self.ctx
                    .event(
                        &object,
                        true,
                        &reason.replace('.', ""),
                        "InstallModule",
                        note,
                    )
                    .await;
            }
        }
    }

    async fn sync_node(&mut self, alive: bool) {
        let Some(hb) = self.heartbeat.clone() else {
            // An adopted VNode whose base has not spoken since we started: only mark it NotReady.
            if !alive && self.written_node_status.is_none() {
                self.mark_not_ready_minimal().await;
            }
            return;
        };
        let input = NodeShapeInput {
            heartbeat: &hb,
            health: self.health.as_ref(),
            env: &self.settings.env,
            tunnel: &self.tunnel_name,
            env_taint: self.settings.env_taint,
        };
        let desired = shape::node(&input);
        let needs_apply = self.node_uid.is_none()
            || self.applied_node.as_ref().is_none_or(|n| {
                n.metadata.labels != desired.metadata.labels || n.spec != desired.spec
            });
        if needs_apply {
            match lease::apply_node(&self.ctx, &desired).await {
                Ok(uid) => {
                    if self.applied_node.is_none() {
                        info!(base = %self.base_id, node = %self.node_name, "VNode applied");
                    }
                    self.node_uid = uid;
                    self.applied_node = Some(desired);
                    self.written_node_status = None;
                }
                Err(e) => {
                    warn!(node = %self.node_name, error = %e, "VNode apply failed; retrying");
                    return;
                }
            }
        }
        let readiness = if alive {
            NodeReadiness::Ready
        } else {
            NodeReadiness::NotReady
        };
        let status = shape::status(&input, readiness, self.ready_since.clone(), now_time());
        // Also refreshed periodically, as the kubelet does: the node lifecycle controller may
        // overwrite the Ready condition, and we do not watch nodes.
        let stale = self
            .node_status_written_at
            .is_none_or(|t| t.elapsed() >= NODE_STATUS_REFRESH);
        if stale
            || self
                .written_node_status
                .as_ref()
                .is_none_or(|w| shape::status_differs(w, &status))
        {
            match lease::patch_node_status(&self.ctx, &self.node_name, &status).await {
                Ok(()) => {
                    self.written_node_status = Some(status);
                    self.node_status_written_at = Some(Instant::now());
                }
                Err(e) if lease::is_not_found(&e) => {
                    warn!(node = %self.node_name, "VNode was deleted externally; recreating");
                    self.node_uid = None;
                }
                Err(e) => {
                    warn!(node = %self.node_name, error = %e, "VNode status write failed; retrying")
                }
            }
        }
        if alive
            && self
                .last_lease
                .is_none_or(|t| t.elapsed() >= self.settings.lease_renew)
        {
            match lease::renew_lease(&self.ctx, &self.node_name, self.node_uid.as_deref()).await {
                Ok(()) => self.last_lease = Some(Instant::now()),
                Err(e) => {
                    warn!(node = %self.node_name, error = %e, "lease renewal failed; retrying")
                }
            }
        }
    }

    async fn mark_not_ready_minimal(&mut self) {
        let status = NodeStatus {
            conditions: Some(vec![k8s_openapi::api::core::v1::NodeCondition {
                type_: "Ready".into(),
                status: "False".into(),
                reason: Some("BaseUnreachable".into()),
                message: Some("base has not sent a heartbeat since the controller started".into()),
                last_heartbeat_time: Some(now_time()),
                last_transition_time: Some(now_time()),
            }]),
            ..Default::default()
        };
        if lease::patch_node_status(&self.ctx, &self.node_name, &status)
            .await
            .is_ok()
        {
            self.written_node_status = Some(status);
        }
    }

    async fn remove_vnode(&mut self, reason: &str) {
        for p in self.pods.values() {
            if let Err(e) = writer::delete_now(&self.ctx, &p.namespace, &p.name, &p.uid).await {
                warn!(pod = %pod_key(&p.pod), error = %e, "pod removal failed during drain");
            }
        }
        match lease::delete_node(&self.ctx, &self.node_name).await {
            Ok(()) => info!(base = %self.base_id, node = %self.node_name, reason, "VNode removed"),
            Err(e) => warn!(node = %self.node_name, error = %e, reason, "VNode removal failed"),
        }
    }
}
