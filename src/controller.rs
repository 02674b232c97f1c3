//! Wiring: tunnels feed base actors; a pod watch feeds the same actors; actors write to
//! Kubernetes and command bases. This module owns the registry of actors and the pod index.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use futures::future::BoxFuture;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::runtime::watcher;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::base::actor::{ActorExit, ActorSettings, BaseActor, BaseMsg};
use crate::config::Settings;
use crate::kube_util::KubeCtx;
use crate::model::{BaseEvent, BaseMetadata, ModuleSpec, TunnelEvent};
use crate::rollout::gate::{self, GatePod, GateState};
use crate::rollout::{PolicySource, is_admit_all};
use crate::tunnel::Tunnel;
use crate::tunnel::arklet_codec::ArkletCodec;
use crate::tunnel::codec::CodecSet;
use crate::tunnel::http::{BaselineProvider, HttpTunnel};
use crate::tunnel::mqtt::{MqttTunnel, count_received};
use crate::vnode::liveness::LivenessPolicy;
use crate::vnode::shape::{self, COMPONENT_LABEL, ENV_LABEL};
use crate::vpod::spec::{MODULE_LABEL_VALUE, MODULE_LABELS, owner_of};
use crate::vpod::spec::{creation_secs, modules_of};
use crate::vpod::status::{Note, is_ready};

struct ControllerMetrics {
    bases: Gauge,
    actor_exits: Counter,
    pod_events: Counter,
}

fn metrics() -> &'static ControllerMetrics {
    static M: OnceLock<ControllerMetrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = ControllerMetrics {
            bases: Gauge::default(),
            actor_exits: Counter::default(),
            pod_events: Counter::default(),
        };
        crate::metrics::register("bases", "Bases with a running actor", m.bases.clone());
        crate::metrics::register(
            "base_actor_exits",
            "Base actors ended (drained, expired)",
            m.actor_exits.clone(),
        );
        crate::metrics::register(
            "pod_watch_events",
            "Pod watch events processed",
            m.pod_events.clone(),
        );
        m
    })
}

/// What the controller needs besides its settings.
pub struct ControllerDeps {
    /// Kubernetes client.
    pub client: kube::Client,
    /// Ordering and batch rules.
    pub policies: Arc<dyn PolicySource>,
    /// Plugin tunnel adapters for the MQTT tunnel (an empty set when no plugins).
    pub codecs: watch::Receiver<CodecSet>,
}

/// A running controller.
pub struct ControllerHandle {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Where the HTTP tunnel listens, when enabled.
    pub http_addr: Option<SocketAddr>,
    /// True once the pod watch synced and the tunnels started.
    pub ready: Arc<AtomicBool>,
}

impl ControllerHandle {
    /// Stops the controller and waits for it.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.cancel.cancel();
        self.task.await.context("controller task panicked")?
    }

    /// Waits until the controller ends on its own (error) or is cancelled.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("controller task panicked")?
    }

    /// A token that stops the controller when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
}

/// An empty plugin codec set, for running without plugins.
pub fn no_plugin_codecs() -> watch::Receiver<CodecSet> {
    let (tx, rx) = watch::channel::<CodecSet>(Arc::new(Vec::new()));
    // Keep the sender alive for the process so receivers never see a closed channel.
    std::mem::forget(tx);
    rx
}

struct BaselineRequest {
    metadata: BaseMetadata,
    reply: oneshot::Sender<Vec<ModuleSpec>>,
}

struct ChannelBaseline(mpsc::Sender<BaselineRequest>);

impl BaselineProvider for ChannelBaseline {
    fn baseline<'a>(&'a self, metadata: &'a BaseMetadata) -> BoxFuture<'a, Vec<ModuleSpec>> {
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            let req = BaselineRequest {
                metadata: metadata.clone(),
                reply: tx,
            };
            if self.0.send(req).await.is_err() {
                return Vec::new();
            }
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default()
        })
    }
}

/// Starts the controller in the background.
pub async fn start(settings: Settings, deps: ControllerDeps) -> anyhow::Result<ControllerHandle> {
    let cancel = CancellationToken::new();
    let ctx = KubeCtx::new(deps.client.clone(), settings.workers, &settings.client_id);
    let (event_tx, event_rx) = mpsc::channel::<(String, BaseEvent)>(8192);
    let (baseline_tx, baseline_rx) = mpsc::channel::<BaselineRequest>(256);
    let mut tunnels: HashMap<String, Arc<dyn Tunnel>> = HashMap::new();
    let mut mqtt: Option<Arc<MqttTunnel>> = None;
    let mut http_addr = None;

    if let Some(m) = &settings.mqtt {
        let (tx, rx) = mpsc::channel::<BaseEvent>(8192);
        let t = MqttTunnel::start(
            m,
            Arc::new(ArkletCodec::new(&settings.env)),
            deps.codecs.clone(),
            tx,
        )
        .with_context(|| format!("starting the MQTT tunnel to {}:{}", m.host, m.port))?;
        let t = Arc::new(t);
        forward(rx, "mqtt", event_tx.clone());
        tunnels.insert("mqtt".into(), t.clone());
        mqtt = Some(t);
        info!(broker = %format!("{}:{}", m.host, m.port), "MQTT tunnel started");
    }
    if let Some(port) = settings.http_port {
        let (tx, rx) = mpsc::channel::<BaseEvent>(8192);
        let t = HttpTunnel::start(
            SocketAddr::from(([0, 0, 0, 0], port)),
            tx,
            Arc::new(ChannelBaseline(baseline_tx.clone())),
            Duration::from_secs(30),
        )
        .await
        .with_context(|| format!("starting the HTTP tunnel on port {port}"))?;
        http_addr = Some(t.local_addr());
        forward(rx, "http", event_tx.clone());
        tunnels.insert("http".into(), Arc::new(t));
    }

    let actor_settings = Arc::new(ActorSettings {
        env: settings.env.clone(),
        env_taint: settings.env_taint,
        liveness: LivenessPolicy {
            timeout: settings.liveness_timeout,
            ttl: settings.vnode_ttl,
        },
        lease_renew: (settings.liveness_timeout / 3)
            .clamp(Duration::from_millis(500), Duration::from_secs(10)),
        resync: settings.resync,
        command_timeout: settings.command_timeout,
        tick: Duration::from_millis(500),
        lossless: settings.lossless,
        retention_timeout: settings.retention_timeout,
    });
    if settings.replicas_sync {
        info!("peer deployments follow their Ready bases (ENABLE_MODULE_REPLICAS_SYNC_WITH_BASE)");
        tokio::spawn(crate::rollout::peer::run(
            deps.client.clone(),
            settings.env.clone(),
            cancel.child_token(),
        ));
    }
    let ready = Arc::new(AtomicBool::new(false));
    let (exit_tx, exit_rx) = mpsc::unbounded_channel();
    let core = Core {
        env: settings.env.clone(),
        ctx,
        policies: deps.policies,
        actor_settings,
        tunnels,
        mqtt,
        actors: HashMap::new(),
        generation: 0,
        pods: PodIndex::default(),
        owners: HashMap::new(),
        deployments: HashMap::new(),
        rollouts: Arc::new(HashSet::new()),
        gates: HashMap::new(),
        gate_recheck: HashMap::new(),
        sent_holds: HashMap::new(),
        outbox: Vec::new(),
        exit_tx,
    };
    let c = cancel.clone();
    let r = ready.clone();
    let client = deps.client;
    let task =
        tokio::spawn(async move { core.run(client, event_rx, baseline_rx, exit_rx, c, r).await });
    Ok(ControllerHandle {
        cancel,
        task,
        http_addr,
        ready,
    })
}

fn forward(
    mut rx: mpsc::Receiver<BaseEvent>,
    tunnel: &'static str,
    tx: mpsc::Sender<(String, BaseEvent)>,
) {
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            if tx.send((tunnel.to_string(), ev)).await.is_err() {
                return;
            }
        }
    });
}

struct ActorEntry {
    tx: mpsc::UnboundedSender<BaseMsg>,
    generation: u64,
}

#[derive(Default)]
struct PodIndex {
    /// uid → (pod, which label watches currently list it).
    by_uid: HashMap<String, (Arc<Pod>, [bool; 2])>,
    init: [Option<Vec<Arc<Pod>>>; 2],
    synced: [bool; 2],
}

impl PodIndex {
    fn all_synced(&self) -> bool {
        self.synced.iter().all(|s| *s)
    }

    fn pods_on(&self, node: &str) -> Vec<Arc<Pod>> {
        self.by_uid
            .values()
            .filter(|(p, _)| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

/// What the controller needs to know of a module Deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DeploySummary {
    annotations: BTreeMap<String, String>,
    replicas: i32,
    in_rollout: bool,
}

/// Summary of a Deployment whose pods are module pods; `None` for any other Deployment.
fn summarize(d: &Deployment) -> Option<DeploySummary> {
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

fn deployment_key(d: &Deployment) -> String {
    format!(
        "{}/Deployment/{}",
        d.metadata.namespace.as_deref().unwrap_or("default"),
        d.metadata.name.as_deref().unwrap_or("")
    )
}

struct Core {
    env: String,
    ctx: KubeCtx,
    policies: Arc<dyn PolicySource>,
    actor_settings: Arc<ActorSettings>,
    tunnels: HashMap<String, Arc<dyn Tunnel>>,
    mqtt: Option<Arc<MqttTunnel>>,
    actors: HashMap<String, ActorEntry>,
    generation: u64,
    pods: PodIndex,
    /// Live (not deleting) pods per owner: uid → template revision.
    owners: HashMap<String, HashMap<String, Option<String>>>,
    deployments: HashMap<String, DeploySummary>,
    rollouts: Arc<HashSet<String>>,
    /// Batch gating memory per Deployment, next re-evaluation, and the holds actors know of.
    gates: HashMap<String, GateState>,
    gate_recheck: HashMap<String, std::time::Instant>,
    sent_holds: HashMap<String, Note>,
    /// Messages to actors, sent after the holds computed for the same event.
    outbox: Vec<(String, BaseMsg)>,
    exit_tx: mpsc::UnboundedSender<(String, u64, ActorExit)>,
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref())
}

impl Core {
    async fn run(
        mut self,
        client: kube::Client,
        mut events: mpsc::Receiver<(String, BaseEvent)>,
        mut baselines: mpsc::Receiver<BaselineRequest>,
        mut exits: mpsc::UnboundedReceiver<(String, u64, ActorExit)>,
        cancel: CancellationToken,
        ready: Arc<AtomicBool>,
    ) -> anyhow::Result<()> {
        self.adopt_existing_vnodes(&client).await;
        let pods: Api<Pod> = Api::all(client.clone());
        let streams = MODULE_LABELS.iter().enumerate().map(|(i, label)| {
            // Unbound pods too: a rollout is visible before its new pods are scheduled.
            let cfg = watcher::Config::default().labels(&format!("{label}={MODULE_LABEL_VALUE}"));
            watcher(pods.clone(), cfg).map_ok(move |e| (i, e)).boxed()
        });
        let mut pod_stream = futures::stream::select_all(streams);
        let deployments: Api<Deployment> = Api::all(client.clone());
        let mut deploy_stream = watcher(deployments, watcher::Config::default()).boxed();
        let mut gate_tick = tokio::time::interval(Duration::from_millis(500));
        gate_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some((tunnel, ev)) = events.recv() => self.on_base_event(&tunnel, ev),
                Some(req) = baselines.recv() => self.on_baseline_request(req),
                Some((base, generation, exit)) = exits.recv() => self.on_actor_exit(&base, generation, exit),
                item = pod_stream.next() => match item {
                    Some(Ok((i, e))) => {
                        self.on_pod_event(i, e);
                        if self.pods.all_synced() && !ready.swap(true, Ordering::SeqCst) {
                            info!(pods = self.pods.by_uid.len(), "pod watch synced; controller ready");
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "pod watch error; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => anyhow::bail!("pod watch ended"),
                },
                _ = gate_tick.tick() => self.recheck_gates(),
                item = deploy_stream.next() => match item {
                    Some(Ok(e)) => self.on_deployment_event(e),
                    Some(Err(e)) => {
                        warn!(error = %e, "deployment watch error; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => anyhow::bail!("deployment watch ended"),
                },
            }
        }
        info!("controller stopping");
        self.actors.clear();
        if let Some(m) = &self.mqtt {
            m.stop().await;
        }
        Ok(())
    }

    /// Starts actors for VNodes of this env that exist already, so that a restart neither loses
    /// track of silent bases nor re-creates anything.
    async fn adopt_existing_vnodes(&mut self, client: &kube::Client) {
        let nodes: Api<Node> = Api::all(client.clone());
        let lp = ListParams::default()
            .labels(&format!("{COMPONENT_LABEL}=vnode,{ENV_LABEL}={}", self.env));
        match nodes.list(&lp).await {
            Ok(list) => {
                for n in list.items {
                    let Some(name) = n.metadata.name.as_deref() else {
                        continue;
                    };
                    let Some(id) = shape::base_id_of(name, &self.env) else {
                        continue;
                    };
                    let tunnel = n
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("vnode.koupleless.io/tunnel"))
                        .cloned()
                        .unwrap_or_else(|| "mqtt".into());
                    info!(base = %id, node = name, "adopting existing VNode");
                    self.spawn_actor(&id, if tunnel == "http" { "http" } else { "mqtt" });
                }
            }
            Err(e) => {
                warn!(error = %e, "listing existing VNodes failed; they are adopted when their bases speak")
            }
        }
    }

    fn tunnel_label(&self, tunnel: &str, base_id: &str) -> String {
        match (&self.mqtt, tunnel) {
            (Some(m), "mqtt") => m.codec_name_for(base_id),
            _ => tunnel.to_string(),
        }
    }

    fn spawn_actor(&mut self, base_id: &str, tunnel: &str) -> Option<&ActorEntry> {
        let t = self
            .tunnels
            .get(tunnel)
            .or_else(|| self.tunnels.values().next())?
            .clone();
        let label = self.tunnel_label(tunnel, base_id);
        let (tx, rx) = mpsc::unbounded_channel();
        self.generation += 1;
        let generation = self.generation;
        let actor = BaseActor::new(
            base_id,
            self.actor_settings.clone(),
            self.ctx.clone(),
            t,
            &label,
            self.policies.clone(),
        );
        let exit_tx = self.exit_tx.clone();
        let id = base_id.to_string();
        tokio::spawn(async move {
            let exit = actor.run(rx).await;
            let _ = exit_tx.send((id, generation, exit));
        });
        let _ = tx.send(BaseMsg::Rollouts(self.rollouts.clone()));
        if self.pods.all_synced() {
            let node = shape::node_name(base_id, &self.env);
            let holds: Vec<(String, Option<Note>)> = self
                .pods
                .pods_on(&node)
                .iter()
                .filter_map(|p| p.metadata.uid.clone())
                .filter_map(|uid| self.sent_holds.get(&uid).map(|n| (uid, Some(n.clone()))))
                .collect();
            if !holds.is_empty() {
                let _ = tx.send(BaseMsg::Holds(holds));
            }
            let _ = tx.send(BaseMsg::PodsSynced(self.pods.pods_on(&node)));
        }
        metrics().bases.inc();
        self.actors
            .insert(base_id.to_string(), ActorEntry { tx, generation });
        self.actors.get(base_id)
    }

    fn on_base_event(&mut self, tunnel: &str, ev: BaseEvent) {
        if !self.actors.contains_key(&ev.base_id) {
            let creates = matches!(
                &ev.event,
                TunnelEvent::Heartbeat(h) if h.lifecycle == crate::model::BaseLifecycle::Activated
            ) || matches!(&ev.event, TunnelEvent::QueryBaseline(_));
            if !creates {
                count_received("unknown_base");
                debug!(base = %ev.base_id, "event from a base without a VNode; dropped");
                return;
            }
            info!(base = %ev.base_id, tunnel, "new base");
            if self.spawn_actor(&ev.base_id, tunnel).is_none() {
                return;
            }
        }
        if let Some(a) = self.actors.get(&ev.base_id) {
            let _ = a.tx.send(BaseMsg::Event(ev.event));
        }
    }

    fn on_baseline_request(&mut self, req: BaselineRequest) {
        let id = req.metadata.identity.clone();
        if id.is_empty() {
            let _ = req.reply.send(Vec::new());
            return;
        }
        if !self.actors.contains_key(&id) {
            self.spawn_actor(&id, "http");
        }
        match self.actors.get(&id) {
            Some(a) => {
                let _ = a.tx.send(BaseMsg::Baseline(req.reply));
            }
            None => {
                let _ = req.reply.send(Vec::new());
            }
        }
    }

    fn on_actor_exit(&mut self, base: &str, generation: u64, exit: ActorExit) {
        info!(base, ?exit, "base actor ended");
        metrics().actor_exits.inc();
        if self
            .actors
            .get(base)
            .is_some_and(|a| a.generation == generation)
        {
            self.actors.remove(base);
            metrics().bases.dec();
        }
    }

    /// Queues a message for the actor of `node`; sent by `flush` after the event's holds.
    fn route(&mut self, node: Option<&str>, msg: BaseMsg) {
        if let Some(id) = node.and_then(|n| shape::base_id_of(n, &self.env)) {
            self.outbox.push((id, msg));
        }
    }

    fn flush(&mut self) {
        for (id, msg) in std::mem::take(&mut self.outbox) {
            if let Some(a) = self.actors.get(&id) {
                let _ = a.tx.send(msg);
            }
        }
    }

    fn send_to_node(&self, node: Option<&str>, msg: BaseMsg) {
        let Some(id) = node.and_then(|n| shape::base_id_of(n, &self.env)) else {
            return;
        };
        if let Some(a) = self.actors.get(&id) {
            let _ = a.tx.send(msg);
        }
    }

    fn gate_pod(&self, uid: &str, hash: &Option<String>) -> Option<GatePod> {
        let (p, _) = self.pods.by_uid.get(uid)?;
        let node = node_of(p).map(str::to_string);
        Some(GatePod {
            uid: uid.to_string(),
            name: crate::vpod::spec::pod_key(p),
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

    /// Sets a pod's hold, telling its actor only when it changes.
    fn set_hold(&mut self, uid: &str, note: Option<Note>) {
        // Holds matter once a pod is bound: only then does an actor know it.
        let bound = self
            .pods
            .by_uid
            .get(uid)
            .is_some_and(|(p, _)| node_of(p).is_some());
        if !bound || self.sent_holds.get(uid) == note.as_ref() {
            return;
        }
        match &note {
            Some(n) => {
                self.sent_holds.insert(uid.to_string(), n.clone());
            }
            None => {
                self.sent_holds.remove(uid);
            }
        }
        let node = self
            .pods
            .by_uid
            .get(uid)
            .and_then(|(p, _)| node_of(p).map(str::to_string));
        self.send_to_node(
            node.as_deref(),
            BaseMsg::Holds(vec![(uid.to_string(), note)]),
        );
    }

    /// Re-evaluates the batch policy of one owner's rollout and updates holds.
    fn gate_owner(&mut self, owner: &str) {
        let uids: Vec<(String, Option<String>)> = self
            .owners
            .get(owner)
            .map(|m| m.iter().map(|(u, h)| (u.clone(), h.clone())).collect())
            .unwrap_or_default();
        let policy = self
            .deployments
            .get(owner)
            .and_then(|d| self.policies.batch_policy(&d.annotations))
            .filter(|p| !is_admit_all(p.as_ref()));
        let Some(policy) = policy else {
            self.gates.remove(owner);
            self.gate_recheck.remove(owner);
            for (uid, _) in uids {
                self.set_hold(&uid, None);
            }
            return;
        };
        let pods: Vec<GatePod> = uids
            .iter()
            .filter_map(|(u, h)| self.gate_pod(u, h))
            .collect();
        let (desired, annotations) = self
            .deployments
            .get(owner)
            .map(|d| (d.replicas.max(0) as u32, d.annotations.clone()))
            .unwrap_or_default();
        let now = std::time::Instant::now();
        let state = self.gates.entry(owner.to_string()).or_default();
        let (out, err) = gate::evaluate(
            policy.as_ref(),
            state,
            owner,
            &pods,
            desired,
            &annotations,
            now,
        );
        if let Some(e) = err {
            warn!(owner, policy = policy.name(), error = %e, "batch policy overruled; all pending installs admitted");
        }
        if !out.newly_admitted.is_empty() {
            info!(
                owner,
                policy = policy.name(),
                admitted = out.newly_admitted.len(),
                "batch admitted"
            );
        }
        match out.recheck_at {
            Some(t) => {
                self.gate_recheck.insert(owner.to_string(), t);
            }
            None => {
                self.gate_recheck.remove(owner);
            }
        }
        for (uid, note) in out.holds {
            self.set_hold(&uid, note);
        }
    }

    fn recheck_gates(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<String> = self
            .gate_recheck
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(o, _)| o.clone())
            .collect();
        for owner in due {
            self.gate_owner(&owner);
        }
    }

    fn track_owner(&mut self, pod: &Pod, present: bool) {
        let (Some(owner), Some(uid)) = (owner_of(pod), pod.metadata.uid.clone()) else {
            return;
        };
        let live = present && pod.metadata.deletion_timestamp.is_none();
        let entry = self.owners.entry(owner.key.clone()).or_default();
        if live {
            entry.insert(uid, owner.template_hash);
        } else {
            entry.remove(&uid);
            if entry.is_empty() {
                self.owners.remove(&owner.key);
            }
        }
    }

    /// Recomputes the owners with a rollout in progress and tells every actor when it changed.
    fn refresh_rollouts(&mut self) {
        let mut set: HashSet<String> = self
            .owners
            .iter()
            .filter(|(_, pods)| pods.values().collect::<HashSet<_>>().len() > 1)
            .map(|(o, _)| o.clone())
            .collect();
        set.extend(
            self.deployments
                .iter()
                .filter(|(_, d)| d.in_rollout)
                .map(|(k, _)| k.clone()),
        );
        if *self.rollouts != set {
            debug!(rollouts = ?set, "rollouts in progress changed");
            self.rollouts = Arc::new(set);
            for a in self.actors.values() {
                let _ = a.tx.send(BaseMsg::Rollouts(self.rollouts.clone()));
            }
        }
    }

    fn on_deployment_event(&mut self, e: watcher::Event<Deployment>) {
        let mut touched = None;
        match e {
            watcher::Event::Apply(d) | watcher::Event::InitApply(d) => {
                let key = deployment_key(&d);
                touched = Some(key.clone());
                match summarize(&d) {
                    Some(s) => {
                        self.deployments.insert(key, s);
                    }
                    None => {
                        self.deployments.remove(&key);
                    }
                }
            }
            watcher::Event::Delete(d) => {
                let key = deployment_key(&d);
                self.deployments.remove(&key);
                touched = Some(key);
            }
            watcher::Event::Init | watcher::Event::InitDone => {}
        }
        self.refresh_rollouts();
        if let Some(owner) = touched {
            self.gate_owner(&owner);
        }
    }

    fn on_pod_event(&mut self, stream: usize, e: watcher::Event<Pod>) {
        metrics().pod_events.inc();
        let touched: Vec<String> = match &e {
            watcher::Event::Apply(p) | watcher::Event::Delete(p) => {
                owner_of(p).map(|o| vec![o.key]).unwrap_or_default()
            }
            watcher::Event::InitDone => self.deployments.keys().cloned().collect(),
            _ => Vec::new(),
        };
        if let watcher::Event::Delete(p) = &e
            && let Some(uid) = p.metadata.uid.as_deref()
        {
            self.sent_holds.remove(uid);
        }
        self.apply_pod_event(stream, e);
        self.refresh_rollouts();
        // Holds first, then the pod changes themselves: an actor never sees a new pod before
        // knowing whether the batch policy holds it.
        for owner in touched {
            self.gate_owner(&owner);
        }
        self.flush();
    }

    fn apply_pod_event(&mut self, stream: usize, e: watcher::Event<Pod>) {
        match e {
            watcher::Event::Init => self.pods.init[stream] = Some(Vec::new()),
            watcher::Event::InitApply(p) => {
                if let Some(buf) = self.pods.init[stream].as_mut() {
                    buf.push(Arc::new(p));
                }
            }
            watcher::Event::InitDone => {
                let listed = self.pods.init[stream].take().unwrap_or_default();
                let uids: HashSet<String> = listed
                    .iter()
                    .filter_map(|p| p.metadata.uid.clone())
                    .collect();
                self.pods.by_uid.retain(|uid, (_, seen)| {
                    if !uids.contains(uid) {
                        seen[stream] = false;
                    }
                    seen.iter().any(|s| *s)
                });
                for p in listed {
                    if let Some(uid) = p.metadata.uid.clone() {
                        let entry = self
                            .pods
                            .by_uid
                            .entry(uid)
                            .or_insert((p.clone(), [false; 2]));
                        entry.0 = p;
                        entry.1[stream] = true;
                    }
                }
                self.pods.synced[stream] = true;
                self.owners.clear();
                let all: Vec<Arc<Pod>> =
                    self.pods.by_uid.values().map(|(p, _)| p.clone()).collect();
                for p in &all {
                    self.track_owner(p, true);
                }
                if self.pods.all_synced() {
                    let mut by_node: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
                    for (p, _) in self.pods.by_uid.values() {
                        if let Some(n) = node_of(p) {
                            by_node.entry(n.to_string()).or_default().push(p.clone());
                        }
                    }
                    let ids: Vec<String> = self.actors.keys().cloned().collect();
                    for id in ids {
                        let node = shape::node_name(&id, &self.env);
                        let pods = by_node.remove(&node).unwrap_or_default();
                        self.outbox.push((id, BaseMsg::PodsSynced(pods)));
                    }
                }
            }
            watcher::Event::Apply(p) => {
                let Some(uid) = p.metadata.uid.clone() else {
                    return;
                };
                let p = Arc::new(p);
                self.track_owner(&p, true);
                let entry = self
                    .pods
                    .by_uid
                    .entry(uid)
                    .or_insert((p.clone(), [false; 2]));
                entry.0 = p.clone();
                entry.1[stream] = true;
                if self.pods.all_synced() {
                    self.route(node_of(&p), BaseMsg::PodUpsert(p.clone()));
                }
            }
            watcher::Event::Delete(p) => {
                let Some(uid) = p.metadata.uid.clone() else {
                    return;
                };
                let gone = match self.pods.by_uid.get_mut(&uid) {
                    Some((_, seen)) => {
                        seen[stream] = false;
                        !seen.iter().any(|s| *s)
                    }
                    None => true,
                };
                if gone {
                    self.track_owner(&p, false);
                    self.pods.by_uid.remove(&uid);
                    self.route(node_of(&p), BaseMsg::PodRemoved(uid));
                }
            }
        }
    }
}

/// Turns plugin faults into Kubernetes Events: on the Deployment a decision was for, else on the
/// controller's own pod (`POD_NAMESPACE`/`POD_NAME`), else only the log and the metrics.
pub fn report_plugin_faults(
    client: kube::Client,
    instance: &str,
    mut faults: tokio::sync::broadcast::Receiver<crate::plugin::PluginFault>,
) {
    let ctx = KubeCtx::new(client, 2, instance);
    let own_pod = match (std::env::var("POD_NAMESPACE"), std::env::var("POD_NAME")) {
        (Ok(ns), Ok(name)) if !ns.is_empty() && !name.is_empty() => {
            Some(k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(ns),
                name: Some(name),
                ..Default::default()
            })
        }
        _ => None,
    };
    tokio::spawn(async move {
        loop {
            let f = match faults.recv().await {
                Ok(f) => f,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    warn!(skipped = n, "plugin fault reporter lagged");
                    continue;
                }
                Err(_) => return,
            };
            warn!(plugin = %f.plugin, reason = %f.reason, subject = ?f.subject, "plugin fault: {}", f.message);
            let object = f
                .subject
                .as_deref()
                .and_then(|s| {
                    let parts: Vec<&str> = s.split('/').collect();
                    match parts.as_slice() {
                        [ns, "Deployment", name] | [ns, name] => {
                            Some(k8s_openapi::api::core::v1::ObjectReference {
                                api_version: Some("apps/v1".into()),
                                kind: Some("Deployment".into()),
                                namespace: Some(ns.to_string()),
                                name: Some(name.to_string()),
                                ..Default::default()
                            })
                        }
                        _ => None,
                    }
                })
                .or_else(|| own_pod.clone());
            if let Some(o) = object {
                let note = format!("plugin {}: {}", f.plugin, f.message);
                ctx.event(&o, true, &f.reason, "PluginCall", note).await;
            }
        }
    });
}

/// Serves `/metrics`, `/healthz` and `/readyz`.
pub async fn serve_metrics(addr: SocketAddr, ready: Arc<AtomicBool>) -> anyhow::Result<SocketAddr> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/metrics", get(|| async { crate::metrics::render() }))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    if ready.load(Ordering::SeqCst) {
                        (axum::http::StatusCode::OK, "ready")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "pod watch not synced",
                        )
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics endpoint cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(local)
}
