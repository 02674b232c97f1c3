//! The base task: owns one base's state, applies what the base says and which pods are bound
//! to its VNode, and on every tick decides (purely) and performs (through the effects executor).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::base::effects::{Effects, EffectsDeps, NodeJobDone, PodJobs};
use crate::base::ledger::ModuleLedger;
use crate::base::msg::{BaseMsg, WantedModules};
use crate::base::node_sync::{NodeSync, NodeWrites, VNodeParams, Verdict};
use crate::base::plan::{self, PlanInput, PodInfo};
use crate::model::{
    BaseCommand, BaseHeartbeat, BaseLifecycle, BaseMetadata, ModuleKey, ModuleSpec, Outcome,
    TunnelEvent,
};
use crate::peer::{self, PeerTemplate};
use crate::time::now_time;
use crate::vnode::liveness::LivenessPolicy;
use crate::vnode::shape::{self, NodeShapeInput};
use crate::vpod::spec::{creation_secs, modules_of, owner_of};
use crate::vpod::status::Note;

/// How often a base task plans when nothing changed but something waits on a clock (a command
/// retry, a backoff, a grace period, an install timeout).
const IDLE_REPLAN: Duration = Duration::from_secs(2);

/// How often a settled base task plans when nothing changed: nothing should change a settled
/// plan but news, so this is only a safety net for a time dependence no one foresaw. At 1,000
/// bases a 2 s beat here was most of the controller's idle CPU.
const SETTLED_REPLAN: Duration = Duration::from_secs(30);

/// How long after an install is sent the pod's "installing" status waits for the module to
/// start: a module that starts within it goes from Pending straight to Running, in one status
/// write instead of two (the apiserver's pod writes are what a large fleet waits for).
const EXECUTING_GRACE: Duration = Duration::from_secs(1);

/// Settings every base task shares.
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
    /// Longest a module is kept on a base waiting for its replacement during a rollout.
    pub retention_timeout: Duration,
    /// Longest a module may take to start before it shows as timed out.
    pub install_timeout: Duration,
    /// How long a module no pod asks for is kept before it is uninstalled.
    pub orphan_grace: Duration,
    /// Whether a new task starts by driving its base (one replica) or only observing it until
    /// this replica owns the base (several replicas share the bases).
    pub owned_from_start: bool,
    /// How long an observer keeps a drained or expired base before letting go (the owner
    /// removes its VNode; should the owner be gone, the observer takes over meanwhile).
    pub observer_linger: Duration,
    /// In which order status writes go out.
    pub order: StatusOrder,
}

/// The order of status writes on a base.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StatusOrder {
    /// NotReady before Ready, and hand-overs during rollouts: what the product always does.
    #[default]
    Lossless,
    /// Ready writes first and no hand-over: only for tests that show what the lossless order
    /// prevents.
    #[cfg(feature = "test-switches")]
    UnsafeReadyFirst,
}

/// Why a base task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActorExit {
    /// The base shut down gracefully; its VNode was removed.
    Drained,
    /// The base never came back within the TTL; its VNode was removed.
    Expired,
    /// The controller is stopping.
    Stopped,
}

/// The pods bound to the VNode, and what the controller says about them.
#[derive(Debug, Default)]
struct BoundPods {
    pods: BTreeMap<String, PodInfo>,
    synced: bool,
    held: HashMap<String, Note>,
    rollouts: Arc<HashSet<String>>,
    /// Peer Deployments of this env.
    peers: Arc<Vec<PeerTemplate>>,
}

impl BoundPods {
    fn upsert(&mut self, pod: Arc<Pod>) {
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
            written: None,
            pod,
        };
        self.pods.insert(uid, info);
    }
}

/// The state of one base.
pub struct BaseActor {
    /// Modules that unbound pods ask for (they may bind here), read when planning.
    wanted: WantedModules,
    tunnel_label: String,
    settings: Arc<ActorSettings>,
    fx: Effects,
    node: NodeSync,
    ledger: ModuleLedger,
    bound: BoundPods,
    baseline_requested: bool,
    pending_baseline: Vec<oneshot::Sender<Vec<ModuleSpec>>>,
    /// Who the base said it is when it asked for its baseline (before any heartbeat).
    metadata: Option<BaseMetadata>,
    /// Uninstall failures to report on the pods that asked for the module.
    uninstall_failures: Vec<(ModuleKey, String)>,
    /// This replica drives the base (else it only keeps its state warm for a takeover).
    owned: bool,
    /// When an observer saw the base drain or expire.
    ending_since: Option<Instant>,
    /// Something changed since the last plan.
    dirty: bool,
    last_plan: Option<Instant>,
    /// The module URLs last recorded for the VNode, and the ledger version they are from.
    urls: (u64, String),
    /// The pod writes in flight. Jobs run side by side (a pod bound a moment after another
    /// does not wait for the other's write); [`Effects::pod_job`] keeps NotReady before Ready
    /// across them.
    pod_jobs: PodJobs,
    /// The VNode writes in flight.
    node_job: Option<JoinHandle<NodeJobDone>>,
    /// Until when "installing" statuses wait for the modules just asked for to start.
    executing_grace: Option<Instant>,
}

impl BaseActor {
    /// A new task state for `base_id`.
    pub fn new(
        base_id: &str,
        settings: Arc<ActorSettings>,
        deps: EffectsDeps,
        wanted: WantedModules,
    ) -> Self {
        let now = Instant::now();
        let node_name = shape::node_name(base_id, &settings.env);
        BaseActor {
            wanted,
            tunnel_label: deps.tunnel.label_for(base_id),
            fx: Effects::new(base_id, &node_name, deps),
            node: NodeSync::new(now),
            ledger: ModuleLedger::new(now),
            bound: BoundPods::default(),
            baseline_requested: false,
            pending_baseline: Vec::new(),
            metadata: None,
            uninstall_failures: Vec::new(),
            owned: settings.owned_from_start,
            ending_since: None,
            dirty: true,
            last_plan: None,
            urls: (u64::MAX, String::new()),
            pod_jobs: PodJobs::default(),
            node_job: None,
            executing_grace: None,
            settings,
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
                    self.handle(m);
                }
                done = self.pod_jobs.next_done(), if !self.pod_jobs.is_empty() => {
                    // A job whose writes all wait out a backoff changes nothing: planning again
                    // at once would spin until the backoff ends (the idle beat retries it).
                    self.dirty |= done.as_ref().is_none_or(|d| !d.did_nothing());
                    if let Some(done) = done {
                        let (written, removed) = self.fx.pod_job_done(&self.bound.pods, done);
                        for (uid, st) in written {
                            if let Some(p) = self.bound.pods.get_mut(&uid) {
                                p.written = Some(Box::new(st));
                            }
                        }
                        for uid in removed {
                            self.bound.pods.remove(&uid);
                        }
                    }
                }
                done = join(&mut self.node_job) => {
                    if let Some(done) = done {
                        self.fx.node_job_done(&mut self.node, done, Instant::now());
                    }
                }
                _ = sleep_until(self.executing_grace) => {
                    self.executing_grace = None;
                    self.dirty = true;
                }
                _ = tick.tick() => {
                    // After a long step both branches may be ready and `select!` picks one at
                    // random: what waits in the inbox (a heartbeat) is heard before liveness is
                    // judged, or a busy task would find its live base silent.
                    while let Ok(m) = rx.try_recv() {
                        self.handle(m);
                    }
                }
            }
            // Everything that arrived, before deciding, whichever branch woke us: a step can
            // take long (a plugin call, a starved machine; its writes run as jobs), and
            // liveness judged while heartbeats still sit in the inbox would call a live base
            // silent, or expire it and delete its VNode. It also coalesces a burst into one
            // reconcile.
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            if let Some(exit) = self.step().await {
                return exit;
            }
        }
    }

    fn handle(&mut self, m: BaseMsg) {
        let now = Instant::now();
        let m = match m {
            BaseMsg::Event(ev) => {
                // Most events are heartbeats that change nothing: they must not cost a plan.
                self.dirty |= self.on_event(*ev, now);
                return;
            }
            m => m,
        };
        self.dirty = true;
        match m {
            BaseMsg::Event(_) => {}
            BaseMsg::PodUpsert(pod) => self.bound.upsert(pod),
            BaseMsg::PodRemoved(uid) => {
                self.bound.pods.remove(&uid);
                self.bound.held.remove(&uid);
                self.fx.forget_pod(&uid);
            }
            BaseMsg::PodsSynced(pods) => {
                let keep: HashSet<String> =
                    pods.iter().filter_map(|p| p.metadata.uid.clone()).collect();
                let gone: Vec<String> = self
                    .bound
                    .pods
                    .keys()
                    .filter(|uid| !keep.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.bound.pods.remove(&uid);
                    self.fx.forget_pod(&uid);
                }
                for p in pods {
                    self.bound.upsert(p);
                }
                self.bound.synced = true;
                for tx in std::mem::take(&mut self.pending_baseline) {
                    let _ = tx.send(self.baseline());
                }
            }
            BaseMsg::Rollouts(r) => self.bound.rollouts = r,
            BaseMsg::Peers(p) => self.bound.peers = p,
            BaseMsg::Ownership(owned) => {
                if owned && !self.owned {
                    info!("this replica now drives the base");
                    self.ledger.took_over(now);
                } else if !owned && self.owned {
                    info!("another replica drives the base now; observing");
                }
                self.owned = owned;
            }
            BaseMsg::Adopted { urls } => {
                if let Some(u) = urls {
                    self.ledger.restore_urls(&u);
                }
            }
            BaseMsg::Holds(holds) => {
                for (uid, note) in holds {
                    match note {
                        Some(n) => self.bound.held.insert(uid, n),
                        None => self.bound.held.remove(&uid),
                    };
                }
            }
            BaseMsg::Baseline {
                metadata,
                reply: tx,
            } => {
                if self.node.heartbeat.is_none() {
                    self.metadata = Some(*metadata);
                }
                self.node.seen(now);
                self.ledger.base_restarted(now);
                if self.bound.synced {
                    let _ = tx.send(self.baseline());
                } else {
                    self.pending_baseline.push(tx);
                }
            }
        }
    }

    /// Applies what the base said; true when it may change the plan.
    fn on_event(&mut self, ev: TunnelEvent, now: Instant) -> bool {
        let timeout = self.settings.command_timeout;
        match ev {
            TunnelEvent::Heartbeat(hb) => {
                let back = self.node.was_silent();
                if back {
                    info!("base is back");
                    // What it runs may have changed while it was away.
                    self.ledger.base_returned(now);
                }
                if hb.lifecycle == BaseLifecycle::Deactivated {
                    info!("base announced shutdown; draining");
                }
                // The plan reads the heartbeat (the pods' IP, the labels peers select on).
                let changed = self.node.on_heartbeat(hb, now);
                return back || changed;
            }
            TunnelEvent::QueryBaseline(md) => {
                self.node.seen(now);
                self.ledger.base_restarted(now);
                self.metadata = Some(md);
                self.baseline_requested = true;
            }
            TunnelEvent::Health(h) => {
                // The Node's business (capacity), not the plan's.
                self.node.seen(now);
                self.node.on_health(h);
                self.ledger.health_received();
                return false;
            }
            TunnelEvent::ModuleList(list) => {
                self.node.seen(now);
                // What the base runs is known now: nothing left to wait for.
                self.executing_grace = None;
                self.ledger.on_module_list(list, now, timeout);
            }
            TunnelEvent::Operation(r) => {
                self.node.seen(now);
                let module = format!("{}@{}", r.name, r.version);
                match &r.outcome {
                    Outcome::Failed { code, message } => {
                        warn!(%module, command = r.kind.command(), ?code, %message, "operation failed")
                    }
                    Outcome::Busy => {
                        info!(%module, command = r.kind.command(), "base still busy with an earlier command for the module; waiting for it")
                    }
                    _ => {
                        debug!(%module, command = r.kind.command(), outcome = ?r.outcome, "operation answered")
                    }
                }
                if let Some(message) = self.ledger.on_operation(&r, now, timeout) {
                    self.uninstall_failures
                        .push((ModuleKey::new(&r.name, &r.version), message));
                }
            }
            TunnelEvent::Unreachable { reason } => {
                debug!(%reason, "base unreachable");
                return false;
            }
            TunnelEvent::CommandSeen(cmd) => {
                // Our own commands come back too; only another replica's matter.
                if self.owned {
                    return false;
                }
                self.ledger.command_seen(&cmd, now);
            }
        }
        true
    }

    /// One reconcile. Returns `Some` when the task should end.
    async fn step(&mut self) -> Option<ActorExit> {
        let now = Instant::now();
        let (verdict, changed) = self.node.assess(&self.settings.liveness, now);
        if let Some((from, to)) = changed {
            info!(?from, ?to, "base liveness changed");
            self.dirty = true;
        }
        if !self.owned {
            return self.observe(verdict, now);
        }
        let alive = match verdict {
            Verdict::Drain => {
                // Boxed, as the other rare awaits below: an await's state is part of every
                // base task's future for its whole life (8 KB a base for these).
                return Some(Box::pin(self.finish(ActorExit::Drained, "BaseDeactivated")).await);
            }
            Verdict::Expire => {
                warn!("base silent beyond the VNode TTL; removing its VNode");
                return Some(Box::pin(self.finish(ActorExit::Expired, "BaseExpired")).await);
            }
            Verdict::Serve(alive) => alive,
        };
        // Modules first: a pod's install and status never wait behind a Lease renewal.
        if alive {
            self.answer_baseline(now).await;
            for q in self.ledger.queries_due(now, self.settings.resync) {
                self.fx.send(&q).await;
            }
        }
        self.drive_modules(alive, now).await;
        self.sync_vnode(alive, now).await;
        None
    }

    /// Commands to the base and pod writes, when something changed (or, without any, on a
    /// slow beat that catches what time alone changes: retry and grace deadlines).
    async fn drive_modules(&mut self, alive: bool, now: Instant) {
        let beat = if self.ledger.waits_on_clock() || self.fx.failing_writes() > 0 {
            IDLE_REPLAN
        } else {
            SETTLED_REPLAN
        };
        if !self.dirty
            && self
                .last_plan
                .is_some_and(|t| now.saturating_duration_since(t) < beat)
        {
            return;
        }
        self.dirty = false;
        self.last_plan = Some(now);
        self.fx.count_plan();
        let wanted = self.wanted();
        let decided = plan::plan(&self.plan_input(alive, now, &wanted));
        self.ledger.track_orphans(&decided, now);
        for (module, owner) in self.ledger.retain(&decided, now) {
            info!(%module, %owner, "keeping the base's last instance until its replacement is active (rollout in progress)");
        }
        let commands = self.ledger.commands(&decided, now);
        let sent_any = !commands.is_empty();
        if commands
            .iter()
            .any(|(c, _)| matches!(c, BaseCommand::Install(_) | BaseCommand::Reinstall(_)))
        {
            self.executing_grace.get_or_insert(now + EXECUTING_GRACE);
        }
        for (cmd, attempts) in commands {
            if attempts > 1 {
                self.fx.count_retry(&cmd);
            }
            let module = match &cmd {
                BaseCommand::Install(s) | BaseCommand::Reinstall(s) => s.key().to_string(),
                BaseCommand::Uninstall(k) => k.to_string(),
                _ => String::new(),
            };
            info!(%module, command = cmd.kind(), attempts, "sending to the base");
            self.fx.send(&cmd).await;
        }
        for (spec, uid) in &decided.reinstalls {
            Box::pin(self.fx.report_replacement(&self.bound.pods, uid, spec)).await;
        }
        for (key, message) in std::mem::take(&mut self.uninstall_failures) {
            Box::pin(
                self.fx
                    .report_uninstall_failure(&self.bound.pods, &key, &message),
            )
            .await;
        }
        // The statuses of the plan were decided before its commands went out: a pod whose
        // install was just sent would be written "pending" and then at once "installing".
        // With the commands now in flight, the statuses are decided again.
        let mut statuses = if sent_any {
            plan::plan(&self.plan_input(alive, now, &wanted)).statuses
        } else {
            decided.statuses
        };
        if self.executing_grace.is_some_and(|t| now < t) {
            statuses.retain(|(_, st)| !only_installing(st));
        }
        for uid in &decided.delete_pods {
            let Some(p) = self.bound.pods.get(uid) else {
                continue;
            };
            // What the base last reported of the pod's modules: the why of a removal.
            let left: Vec<String> = p
                .specs()
                .map(|s| {
                    let state = self
                        .ledger
                        .reported
                        .as_ref()
                        .and_then(|r| r.get(&s.key()))
                        .map(|m| m.state.clone());
                    format!("{}={state:?}", s.key())
                })
                .collect();
            debug!(pod = %p.name, modules = ?left, alive, ?wanted, "pod leaves the base");
        }
        // Most plans of a settled base write nothing: no job (and its clients' clones) then.
        if statuses.is_empty() && decided.delete_pods.is_empty() {
            return;
        }
        let job = self.fx.pod_job(
            &self.bound.pods,
            statuses,
            &decided.delete_pods,
            &self.pod_jobs,
        );
        self.pod_jobs.spawn(job);
    }

    /// The VNode, its status and its Lease, as far as due.
    async fn sync_vnode(&mut self, alive: bool, now: Instant) {
        if self.urls.0 != self.ledger.urls_version() {
            self.urls = (self.ledger.urls_version(), self.ledger.url_annotation());
            self.node.touch();
        }
        let params = VNodeParams {
            env: &self.settings.env,
            tunnel: &self.tunnel_label,
            env_taint: self.settings.env_taint,
            lease_every: self.settings.lease_renew,
            module_urls: &self.urls.1,
        };
        if self.node_job.is_some() || self.node.backing_off(now) {
            return;
        }
        let writes = self.node.due(&params, alive, now);
        if writes.apply.is_none() && writes.status.is_none() {
            self.node.settled();
        }
        if writes != NodeWrites::default() {
            let job = self.fx.node_job(&self.node, writes, now);
            self.node_job = Some(tokio::spawn(job.run()));
        }
    }

    /// An observer only keeps its state warm; it lets go of a base that drained or expired
    /// once the owner had time to remove the VNode.
    fn observe(&mut self, verdict: Verdict, now: Instant) -> Option<ActorExit> {
        let exit = match verdict {
            Verdict::Drain => ActorExit::Drained,
            Verdict::Expire => ActorExit::Expired,
            Verdict::Serve(_) => {
                self.ending_since = None;
                return None;
            }
        };
        let since = *self.ending_since.get_or_insert(now);
        (now.saturating_duration_since(since) >= self.settings.observer_linger).then_some(exit)
    }

    async fn answer_baseline(&mut self, now: Instant) {
        if !(self.baseline_requested && self.bound.synced) {
            return;
        }
        self.baseline_requested = false;
        let specs = self.baseline();
        info!(modules = specs.len(), "answering queryBaseline");
        self.ledger.baseline_sent(&specs, now);
        self.fx.send(&BaseCommand::Baseline(specs)).await;
    }

    /// The peer Deployments' modules that may run on this base.
    fn peer_modules(&self) -> Vec<ModuleSpec> {
        if self.bound.peers.is_empty() {
            return Vec::new();
        }
        let hb = self.node.heartbeat.clone().or_else(|| {
            self.metadata.clone().map(|m| BaseHeartbeat {
                local_host_name: m.identity.clone(),
                metadata: m,
                local_ip: String::new(),
                port: None,
                lifecycle: BaseLifecycle::Activated,
            })
        });
        let Some(hb) = hb else { return Vec::new() };
        let node = shape::node(&NodeShapeInput {
            heartbeat: &hb,
            health: None,
            env: &self.settings.env,
            tunnel: &self.tunnel_label,
            env_taint: self.settings.env_taint,
            module_urls: None,
        });
        peer::modules_for(&self.bound.peers, &node)
    }

    /// What a (re)starting base should run: the modules of its pods and, as the reference
    /// does, those of the peer Deployments that select it (their pods are Ready the moment
    /// they bind).
    fn baseline(&self) -> Vec<ModuleSpec> {
        let mut specs = plan::baseline(&self.bound.pods);
        for m in self.peer_modules() {
            if !specs.iter().any(|s| s.name == m.name) {
                specs.push(m);
            }
        }
        specs.sort();
        specs
    }

    /// Modules not to uninstall although no pod here asks for them.
    fn wanted(&self) -> HashSet<ModuleKey> {
        let mut w: HashSet<ModuleKey> = self.wanted.borrow().iter().cloned().collect();
        w.extend(self.peer_modules().iter().map(ModuleSpec::key));
        w
    }

    fn plan_input<'a>(
        &'a self,
        alive: bool,
        now: Instant,
        wanted: &'a HashSet<ModuleKey>,
    ) -> PlanInput<'a> {
        PlanInput {
            pods: &self.bound.pods,
            pods_synced: self.bound.synced,
            reported: self.ledger.reported.as_ref(),
            inflight: &self.ledger.inflight,
            failures: &self.ledger.failures,
            held: &self.bound.held,
            alive,
            base_ip: self.node.base_ip(),
            now,
            now_time: now_time(),
            command_timeout: self.settings.command_timeout,
            rollouts: &self.bound.rollouts,
            retained: &self.ledger.retained,
            retention_timeout: self.settings.retention_timeout,
            lossless: self.settings.order == StatusOrder::Lossless,
            urls: &self.ledger.urls,
            wanted,
            orphan_since: &self.ledger.orphan_since,
            orphan_grace: self.settings.orphan_grace,
            install_timeout: self.settings.install_timeout,
            uninstall_failures: &self.ledger.uninstall_failures,
            reactivations: &self.ledger.reactivations,
        }
    }

    async fn finish(&mut self, exit: ActorExit, reason: &str) -> ActorExit {
        // The VNode and its pods go: what was being written of them no longer matters.
        self.pod_jobs.abort_all();
        if let Some(job) = self.node_job.take() {
            job.abort();
        }
        self.fx.remove_vnode(&self.bound.pods, reason).await;
        exit
    }
}

/// The outcome of a job in flight; pending while there is none. The slot is emptied when the
/// job ends (`None` if it panicked or was aborted: nothing it did is known).
async fn join<T>(slot: &mut Option<JoinHandle<T>>) -> Option<T> {
    let Some(job) = slot.as_mut() else {
        return std::future::pending().await;
    };
    let r = job.await;
    *slot = None;
    match r {
        Ok(v) => Some(v),
        Err(e) => {
            warn!(error = %e, "a write job of the base task did not finish");
            None
        }
    }
}

/// Fires at `at`; pending while there is no deadline.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// Whether a status says no more than that its modules are being installed.
fn only_installing(st: &k8s_openapi::api::core::v1::PodStatus) -> bool {
    let containers = st.container_statuses.as_deref().unwrap_or_default();
    !containers.is_empty()
        && containers.iter().all(|c| {
            c.state
                .as_ref()
                .and_then(|s| s.waiting.as_ref())
                .and_then(|w| w.reason.as_deref())
                == Some(crate::vpod::status::INSTALL_EXECUTING)
        })
}

#[cfg(test)]
mod tests {
    //! The task against a slow apiserver (a mock that answers every request after a delay
    //! longer than the VNode TTL): liveness must be judged on the heartbeats that arrived,
    //! not on those the task found time to look at.

    use super::*;
    use crate::apiserver::{Api, ApiMetrics};
    use crate::base::BaseMetrics;
    use crate::base::testing::NoTunnel;
    use crate::rollout::BuiltinPolicies;
    use http::{Request, Response};
    use kube::client::Body;

    /// Longer than the TTL below: one write makes a step outlast it.
    const APISERVER_DELAY: Duration = Duration::from_millis(700);

    fn answer(req: &Request<Body>) -> Response<Body> {
        let path = req.uri().path();
        let name = path.rsplit('/').next().unwrap_or_default();
        let body = if path.contains("/leases/") || path.ends_with("/leases") {
            serde_json::json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": "kube-node-lease"}})
        } else if path.starts_with("/api/v1/nodes/") && req.method() != http::Method::DELETE {
            serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "vnode.b1.dev"}})
        } else if path.contains("/pods/broken") {
            // Pods of module `broken` cannot be written.
            return Response::builder()
                .status(500)
                .body(Body::from(
                    serde_json::to_vec(&serde_json::json!({"apiVersion": "v1", "kind": "Status",
                        "status": "Failure", "code": 500, "message": "etcdserver: request timed out"}))
                    .unwrap_or_default(),
                ))
                .unwrap_or_else(|_| Response::new(Body::empty()));
        } else if path.contains("/pods/") && req.method() == http::Method::PATCH {
            let pod = path.rsplit('/').nth(1).unwrap_or_default();
            serde_json::json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": "default"}})
        } else {
            serde_json::json!({"apiVersion": "v1", "kind": "Status", "status": "Success"})
        };
        Response::builder()
            .status(200)
            .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
            .unwrap_or_else(|_| Response::new(Body::empty()))
    }

    /// A base task whose every apiserver request is answered after [`APISERVER_DELAY`].
    fn slow_apiserver_actor() -> BaseActor {
        slow_apiserver_actor_with(
            Arc::new(NoTunnel),
            Answered::default(),
            BaseMetrics::default(),
        )
    }

    /// The requests the mock apiserver answered: when, method and path.
    type Answered = Arc<std::sync::Mutex<Vec<(Instant, String)>>>;

    /// The same, sending through `tunnel`, noting in `answered` the requests answered and in
    /// `metrics` what the task did.
    fn slow_apiserver_actor_with(
        tunnel: Arc<dyn crate::tunnel::Tunnel>,
        answered: Answered,
        metrics: BaseMetrics,
    ) -> BaseActor {
        slow_apiserver_actor_on(tunnel, answered, metrics, ApiMetrics::default(), true)
    }

    /// The same, counting writes in `api_metrics`; with `reachable` false, as after the
    /// apiserver probe found no answer (every write fails at once).
    fn slow_apiserver_actor_on(
        tunnel: Arc<dyn crate::tunnel::Tunnel>,
        answered: Answered,
        metrics: BaseMetrics,
        api_metrics: ApiMetrics,
        reachable: bool,
    ) -> BaseActor {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let answered = answered.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(APISERVER_DELAY).await;
                    send.send_response(answer(&req));
                    let what = format!("{} {}", req.method(), req.uri().path());
                    answered
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((Instant::now(), what));
                });
            }
        });
        let client = kube::Client::new(svc, "default");
        let settings = ActorSettings {
            env: "dev".into(),
            env_taint: true,
            liveness: LivenessPolicy {
                timeout: Duration::from_millis(250),
                ttl: Duration::from_millis(500),
            },
            // A Lease renewal in nearly every step: every step outlasts the TTL.
            lease_renew: Duration::from_millis(100),
            resync: Duration::from_secs(60),
            command_timeout: Duration::from_secs(10),
            tick: Duration::from_millis(50),
            retention_timeout: Duration::from_secs(60),
            install_timeout: Duration::from_secs(60),
            orphan_grace: Duration::from_secs(60),
            owned_from_start: true,
            observer_linger: Duration::ZERO,
            order: StatusOrder::Lossless,
        };
        let api = Api::new(client, 8, "test", api_metrics);
        api.reachability()
            .store(reachable, std::sync::atomic::Ordering::Relaxed);
        BaseActor::new(
            "b1",
            Arc::new(settings),
            EffectsDeps {
                api,
                tunnel,
                policies: Arc::new(BuiltinPolicies),
                metrics,
                order: StatusOrder::Lossless,
                pool: None,
            },
            tokio::sync::watch::channel(Arc::default()).1,
        )
    }

    fn heartbeat(lifecycle: BaseLifecycle) -> BaseMsg {
        BaseMsg::from(TunnelEvent::Heartbeat(crate::base::testing::heartbeat(
            lifecycle,
        )))
    }

    /// Module `name` 1.0.0, active on the base.
    fn running(name: &str) -> crate::model::ModuleStatus {
        crate::model::ModuleStatus {
            name: name.into(),
            version: "1.0.0".into(),
            state: crate::model::BizState::Activated,
            change_time_ms: None,
            reason: None,
            message: None,
        }
    }

    /// Starts the task of `b1` on the slow apiserver, with `pods` bound to its VNode and
    /// `modules` running on the base.
    fn start_base(
        answered: Answered,
        metrics: BaseMetrics,
        pods: Vec<Arc<Pod>>,
        modules: Vec<crate::model::ModuleStatus>,
    ) -> (
        tokio::task::JoinHandle<ActorExit>,
        mpsc::UnboundedSender<BaseMsg>,
    ) {
        let actor = slow_apiserver_actor_with(Arc::new(NoTunnel), answered, metrics);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(actor.run(rx));
        for m in [
            heartbeat(BaseLifecycle::Activated),
            BaseMsg::PodsSynced(pods),
            BaseMsg::from(TunnelEvent::ModuleList(modules)),
        ] {
            tx.send(m).expect("task alive");
        }
        (task, tx)
    }

    /// Heartbeats every 50 ms, `beats` times (the liveness timeout is 250 ms).
    async fn keep_alive(tx: &mpsc::UnboundedSender<BaseMsg>, beats: usize) {
        for _ in 0..beats {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(heartbeat(BaseLifecycle::Activated))
                .expect("task alive");
        }
    }

    /// Starts the task and a heartbeat every 50 ms until the returned token is cancelled.
    fn run_with_heartbeats() -> (
        tokio::task::JoinHandle<ActorExit>,
        mpsc::UnboundedSender<BaseMsg>,
        tokio_util::sync::CancellationToken,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(slow_apiserver_actor().run(rx));
        let stop = tokio_util::sync::CancellationToken::new();
        let (beats, s) = (tx.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.is_cancelled() {
                if beats.send(heartbeat(BaseLifecycle::Activated)).is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        (task, tx, stop)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_base_is_not_expired_while_its_task_waits_for_the_apiserver() {
        let (task, tx, stop) = run_with_heartbeats();
        // Every step outlasts the TTL (its writes wait for the slow apiserver): some eight
        // steps, each a chance to judge the base on heartbeats not yet looked at.
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(
            !task.is_finished(),
            "a base heartbeating every 50 ms was removed: {:?}",
            task.await
        );
        // Its goodbye, behind a long step, is a drain, not an expiry.
        stop.cancel();
        tx.send(heartbeat(BaseLifecycle::Deactivated))
            .expect("task alive");
        let exit = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("the task ends")
            .expect("task");
        assert_eq!(exit, ActorExit::Drained);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn control_a_base_that_falls_silent_expires_behind_the_slow_apiserver() {
        let (task, _tx, stop) = run_with_heartbeats();
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        let exit = tokio::time::timeout(Duration::from_secs(15), task)
            .await
            .expect("the task ends")
            .expect("task");
        assert_eq!(exit, ActorExit::Expired);
    }

    /// A pod of module `biz1` bound to the VNode of `b1`.
    fn bound_pod() -> Arc<Pod> {
        module_pod("biz1", "u1")
    }

    /// A pod (uid `uid`) of module `module` 1.0.0 bound to the VNode of `b1`.
    fn module_pod(module: &str, uid: &str) -> Arc<Pod> {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{module}-a"), "namespace": "default", "uid": uid,
                "labels": {"virtual-kubelet.koupleless.io/component": "module"}},
            "spec": {"nodeName": "vnode.b1.dev", "containers": [{"name": module,
                "image": format!("https://repo.example/{module}-1.0.0-ark-biz.jar"),
                "env": [{"name": "BIZ_VERSION", "value": "1.0.0"}]}]}
        }))
        .expect("pod");
        Arc::new(pod)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_install_goes_out_while_the_apiserver_is_still_answering_earlier_writes() {
        let tunnel = Arc::new(crate::base::testing::RecordingTunnel::default());
        let answered = Answered::default();
        let actor =
            slow_apiserver_actor_with(tunnel.clone(), answered.clone(), BaseMetrics::default());
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(actor.run(rx));
        tx.send(heartbeat(BaseLifecycle::Activated))
            .expect("task alive");
        tx.send(BaseMsg::PodsSynced(Vec::new()))
            .expect("task alive");
        tx.send(BaseMsg::from(TunnelEvent::ModuleList(Vec::new())))
            .expect("task alive");
        // The VNode's first writes are now waiting for the apiserver (700 ms each).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let bound_at = Instant::now();
        tx.send(BaseMsg::PodUpsert(bound_pod()))
            .expect("task alive");
        let mut install_at = None;
        for _ in 0..100 {
            let sent = tunnel
                .sent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            install_at = sent
                .iter()
                .find(|(_, c)| matches!(c, BaseCommand::Install(s) if s.name == "biz1"))
                .map(|(t, _)| *t);
            if install_at.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let in_flight_then = answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        task.abort();
        let install_at = install_at.expect("installBiz sent");
        let waited = install_at.saturating_duration_since(bound_at);
        // Behind the VNode's writes it would have waited for their 700 ms.
        assert!(
            in_flight_then,
            "the VNode's writes were answered already: the check proves nothing"
        );
        assert!(
            waited < Duration::from_millis(300),
            "installBiz went out {waited:?} after the pod was bound"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_heartbeat_that_changes_nothing_costs_no_plan() {
        let metrics = BaseMetrics::default();
        let (task, tx) = start_base(Answered::default(), metrics.clone(), vec![], vec![]);
        keep_alive(&tx, 6).await;
        let settled = metrics.plans();
        // 1.2 s of heartbeats, less than the 2 s idle beat: a task that planned on every
        // heartbeat would plan 24 times.
        keep_alive(&tx, 24).await;
        let idle = metrics.plans() - settled;
        // A heartbeat with news (the base's IP, the pods' podIP) is planned on.
        let mut hb = crate::base::testing::heartbeat(BaseLifecycle::Activated);
        hb.local_ip = "10.0.0.2".into();
        tx.send(BaseMsg::from(TunnelEvent::Heartbeat(hb)))
            .expect("task alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after_news = metrics.plans() - settled - idle;
        task.abort();
        assert!(settled >= 1, "the task never planned");
        assert_eq!(idle, 0, "plans on 24 heartbeats that changed nothing");
        assert_eq!(after_news, 1, "plans on a heartbeat with a new IP");
    }

    #[tokio::test]
    async fn a_base_task_is_small() {
        // Every base task's future lives as long as its base: the state of an await it rarely
        // reaches (an Event, the drain) belongs boxed, not inline in all 1,000 of them.
        let actor = slow_apiserver_actor();
        let (_tx, rx) = mpsc::unbounded_channel();
        let size = std::mem::size_of_val(&actor.run(rx));
        assert!(size <= 10 * 1024, "{size} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn what_unbound_pods_want_is_read_when_planning_and_never_wakes_the_task() {
        let tunnel = Arc::new(crate::base::testing::RecordingTunnel::default());
        let metrics = BaseMetrics::default();
        let mut actor =
            slow_apiserver_actor_with(tunnel.clone(), Answered::default(), metrics.clone());
        let key = |n: &str, v: &str| ModuleKey::new(n, v);
        let (wanted, rx) =
            tokio::sync::watch::channel(Arc::new(HashSet::from([key("biz1", "1.0.0")])));
        actor.wanted = rx;
        let mut settings = (*actor.settings).clone();
        settings.orphan_grace = Duration::from_millis(300);
        actor.settings = Arc::new(settings);
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(actor.run(rx));
        // The base runs biz1, which no pod here asks for but a pod not bound yet does.
        for m in [
            heartbeat(BaseLifecycle::Activated),
            BaseMsg::PodsSynced(vec![]),
            BaseMsg::from(TunnelEvent::ModuleList(vec![running("biz1")])),
        ] {
            tx.send(m).expect("task alive");
        }
        keep_alive(&tx, 6).await;
        let settled = metrics.plans();
        // Pods elsewhere come and go, this base's module among them: none of it is news here.
        for i in 0..10 {
            wanted.send_replace(Arc::new(HashSet::from([key("biz2", &i.to_string())])));
            wanted.send_replace(Arc::new(HashSet::from([key("biz1", "1.0.0")])));
            keep_alive(&tx, 1).await;
        }
        let on_changes = metrics.plans() - settled;
        // Well past the orphan grace, planned on the idle beat: still wanted, still there.
        keep_alive(&tx, 50).await;
        let uninstalls = || {
            tunnel
                .sent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .filter(|(_, c)| matches!(c, BaseCommand::Uninstall(k) if k.name == "biz1"))
                .count()
        };
        let while_wanted = uninstalls();
        let beats = metrics.plans() - settled - on_changes;
        // No one wants it any more: it goes once the grace has passed.
        wanted.send_replace(Arc::default());
        for _ in 0..120 {
            if uninstalls() > 0 {
                break;
            }
            keep_alive(&tx, 1).await;
        }
        let after = uninstalls();
        task.abort();
        assert_eq!(
            on_changes, 0,
            "plans on changes of what pods elsewhere want"
        );
        assert!(
            beats >= 1,
            "a module kept for a pod elsewhere is planned on the beat"
        );
        assert_eq!(
            while_wanted, 0,
            "uninstalled while a pod not bound yet wants it"
        );
        assert_eq!(after, 1, "never uninstalled once no one wants it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pod_bound_while_another_pods_status_is_being_written_does_not_wait_for_it() {
        let answered = Answered::default();
        // Both modules run already: each pod is Ready in one write as soon as it binds.
        let (task, tx) = start_base(
            answered.clone(),
            BaseMetrics::default(),
            vec![],
            vec![running("biz1"), running("biz2")],
        );
        let start = Instant::now();
        tx.send(BaseMsg::PodUpsert(module_pod("biz1", "u1")))
            .expect("task alive");
        tokio::time::sleep(Duration::from_millis(150)).await;
        tx.send(BaseMsg::PodUpsert(module_pod("biz2", "u2")))
            .expect("task alive");
        keep_alive(&tx, 36).await;
        task.abort();
        let status_writes: Vec<Duration> = answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, what)| what.starts_with("PATCH /api/v1/namespaces/default/pods/"))
            .map(|(at, _)| at.saturating_duration_since(start))
            .collect();
        assert_eq!(status_writes.len(), 2, "{status_writes:?}");
        // Each is answered 700 ms after it went out; one after the other, the second would
        // be answered some 1.4 s after the first pod bound.
        assert!(
            status_writes[1] < Duration::from_millis(1100),
            "the second pod's status was written only after the first's: {status_writes:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pod_whose_status_writes_fail_is_retried_with_backoff_not_in_a_loop() {
        let (metrics, answered) = (BaseMetrics::default(), Answered::default());
        let (task, tx) = start_base(
            answered.clone(),
            metrics.clone(),
            vec![module_pod("broken", "u1")],
            vec![running("broken")],
        );
        keep_alive(&tx, 60).await;
        task.abort();
        let attempts = answered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, what)| what.contains("/pods/broken"))
            .count();
        // 3 s: the first write fails after 700 ms, the retries wait 0.5 s, 1 s … (and the
        // idle beat of 2 s). Planning at once after every job would plan thousands of times.
        assert!(attempts >= 1, "the status was never written");
        assert!(
            metrics.plans() < 20,
            "{} plans in 3 s for one pod whose writes fail",
            metrics.plans()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vnode_writes_that_fail_at_once_are_retried_with_backoff_not_in_a_loop() {
        let api_metrics = ApiMetrics::default();
        let actor = slow_apiserver_actor_on(
            Arc::new(NoTunnel),
            Answered::default(),
            BaseMetrics::default(),
            api_metrics.clone(),
            false,
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(actor.run(rx));
        tx.send(heartbeat(BaseLifecycle::Activated))
            .expect("task alive");
        keep_alive(&tx, 60).await;
        task.abort();
        let failed: u64 = ["node", "node_status", "lease"]
            .iter()
            .map(|k| api_metrics.failed(k))
            .sum();
        // 3 s of writes that fail at once: attempts at 0, 0.5, 1.5 and 3.5 s (the waits
        // double from 0.5 s). Without the backoff the task retried them in a busy loop,
        // 24,294 attempts in 3 s when the check was removed.
        assert!(failed >= 1, "no VNode write was attempted");
        assert!(failed <= 5, "{failed} failed VNode writes in 3 s");
    }

    #[test]
    fn only_a_status_that_says_installing_waits_for_the_module_to_start() {
        let st = |reason: Option<&str>, running: bool| -> k8s_openapi::api::core::v1::PodStatus {
            serde_json::from_value(serde_json::json!({"containerStatuses": [{
                "name": "biz1", "image": "", "imageID": "", "ready": running, "restartCount": 0,
                "state": if running { serde_json::json!({"running": {}}) }
                         else { serde_json::json!({"waiting": {"reason": reason}}) }
            }]}))
            .expect("status")
        };
        assert!(only_installing(&st(
            Some(crate::vpod::status::INSTALL_EXECUTING),
            false
        )));
        assert!(!only_installing(&st(
            Some("Arklet.InstallModuleFailed"),
            false
        )));
        assert!(!only_installing(&st(None, true)));
        assert!(!only_installing(&Default::default()));
    }
}
