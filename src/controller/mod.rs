//! The controller: tunnels and watches feed the index and the base tasks. This module only
//! wires them and runs the loop that moves messages between them; every decision is made in
//! the index ([`index`]), the gates ([`gates`]) or a base task ([`crate::base`]).

mod faults;
pub mod gates;
pub mod index;
pub mod sharing;
mod tasks;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::future::BoxFuture;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api as KubeApi;
use kube::runtime::watcher;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::apiserver::Api;
use crate::apiserver::watch::{self as watches, WatchHealth};
use crate::base::{ActorSettings, BaseMsg, StatusOrder};
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::model::{BaseEvent, BaseLifecycle, BaseMetadata, ModuleSpec, TunnelEvent};
use crate::offload::{self, Pool};
use crate::rollout::PolicySource;
use crate::shard::writer::{LeaseWriter, Written};
use crate::shard::{ShardSettings, Shards};
use crate::tunnel::Tunnel;
use crate::tunnel::arklet_codec::ArkletCodec;
use crate::tunnel::codec::CodecSet;
use crate::tunnel::http::{BaselineProvider, HttpTunnel, HttpTunnelConfig};
use crate::tunnel::mqtt::MqttTunnel;
use crate::vnode::liveness::LivenessPolicy;
use crate::vnode::shape::{
    self, COMPONENT_LABEL, ENV_LABEL, IDENTITY_ANNOTATION, MODULE_URLS_ANNOTATION, TUNNEL_LABEL,
};
use gates::{GateDone, GateJob};
use index::{Index, Out, POD_STREAMS, pod_selector};
use sharing::{OwnerDirectory, Sharing};
use tasks::{Exit, TaskDeps, Tasks};

pub use faults::report_plugin_faults;

/// How often base tasks reconcile without news, and batch gates are re-evaluated.
const TICK: Duration = Duration::from_millis(500);
/// Longest wait for a base task to answer an HTTP base's queryBaseline.
const BASELINE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest an Arklet HTTP list or health call may take.
const HTTP_QUERY_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the apiserver is asked whether it answers (for `/readyz`).
const APISERVER_PROBE: Duration = Duration::from_secs(5);
/// Events from all tunnels waiting for the loop.
const EVENT_QUEUE: usize = 8192;

/// What the controller needs besides its settings.
pub struct ControllerDeps {
    client: kube::Client,
    policies: Arc<dyn PolicySource>,
    codecs: watch::Receiver<CodecSet>,
    metrics: Arc<Metrics>,
    order: StatusOrder,
    pool: Option<Pool>,
}

impl ControllerDeps {
    /// The Kubernetes client, the rules (built-in or plugins), the plugin tunnel adapters (see
    /// [`no_plugin_codecs`]) and the metrics to count into.
    pub fn new(
        client: kube::Client,
        policies: Arc<dyn PolicySource>,
        codecs: watch::Receiver<CodecSet>,
        metrics: Arc<Metrics>,
    ) -> Self {
        ControllerDeps {
            client,
            policies,
            codecs,
            metrics,
            order: StatusOrder::Lossless,
            pool: None,
        }
    }

    /// Runs plugin calls (batch policies, ordering rules, tunnel adapters) on this pool, never
    /// on the async runtime. Without it, only built-in rules are expected and they run inline.
    pub fn plugin_pool(mut self, pool: Pool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Writes Ready before NotReady and keeps no hand-over: the loss the product prevents, for
    /// tests that must show it.
    #[cfg(feature = "test-switches")]
    pub fn unsafe_status_order(mut self) -> Self {
        self.order = StatusOrder::UnsafeReadyFirst;
        self
    }
}

/// A running controller.
pub struct ControllerHandle {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// Where the HTTP tunnel listens, when enabled.
    pub http_addr: Option<SocketAddr>,
    /// Health of the watches (`/readyz`).
    pub health: Health,
    /// The instance's metrics.
    pub metrics: Arc<Metrics>,
    /// The instance's apiserver writer (shares its write limits).
    pub api: Api,
}

/// What `/readyz` reports.
#[derive(Clone, Debug, Default)]
pub struct Health {
    /// The watches.
    pub watches: WatchHealth,
}

impl Health {
    /// `None` when ready, else why not.
    pub fn problem(&self) -> Option<String> {
        self.watches.problem()
    }

    /// Ready to serve: every watch listed and none failing.
    pub fn is_ready(&self) -> bool {
        self.problem().is_none()
    }
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
            tokio::time::timeout(BASELINE_TIMEOUT, rx)
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
    let metrics = deps.metrics.clone();
    metrics.runtime.watch(tokio::runtime::Handle::current());
    let api = Api::new(
        deps.client.clone(),
        settings.workers,
        &settings.client_id,
        metrics.api.clone(),
    );
    let (event_tx, event_rx) = mpsc::channel::<(String, BaseEvent)>(EVENT_QUEUE);
    let (baseline_tx, baseline_rx) = mpsc::channel::<BaselineRequest>(256);
    let mut tunnels: HashMap<String, Arc<dyn Tunnel>> = HashMap::new();
    let mut http_addr = None;
    let directory = Arc::new(OwnerDirectory::new(&settings.env));

    if let Some(m) = &settings.mqtt {
        let (tx, rx) = mpsc::channel::<BaseEvent>(EVENT_QUEUE);
        let codec = match settings.cluster {
            // Replicas sharing the bases watch each other's commands (no double sends on a
            // takeover).
            Some(_) => ArkletCodec::new(&settings.env).observing_commands(),
            None => ArkletCodec::new(&settings.env),
        };
        let t = MqttTunnel::start(
            m,
            Arc::new(codec),
            deps.codecs.clone(),
            tx,
            metrics.mqtt.clone(),
            deps.pool.clone(),
        )
        .with_context(|| format!("starting the MQTT tunnel to {}:{}", m.host, m.port))?;
        forward(rx, "mqtt", event_tx.clone());
        tunnels.insert("mqtt".into(), Arc::new(t));
        info!(broker = %format!("{}:{}", m.host, m.port), "MQTT tunnel started");
    }
    if let Some(port) = settings.http_port {
        let (tx, rx) = mpsc::channel::<BaseEvent>(EVENT_QUEUE);
        let t = HttpTunnel::start(
            HttpTunnelConfig {
                listen: SocketAddr::from(([0, 0, 0, 0], port)),
                query_timeout: HTTP_QUERY_TIMEOUT,
                operation_timeout: settings.install_timeout,
                token: settings.http_token.clone(),
            },
            tx,
            Arc::new(ChannelBaseline(baseline_tx.clone())),
            metrics.http.clone(),
            settings
                .cluster
                .as_ref()
                .map(|_| directory.clone() as Arc<dyn crate::tunnel::http::Forwarding>),
        )
        .await
        .with_context(|| format!("starting the HTTP tunnel on port {port}"))?;
        http_addr = Some(t.local_addr());
        forward(rx, "http", event_tx.clone());
        tunnels.insert("http".into(), Arc::new(t));
    }

    let health = Health::default();
    watches::spawn_probe(
        deps.client.clone(),
        health.watches.clone(),
        api.reachability(),
        APISERVER_PROBE,
        cancel.child_token(),
    );
    // With several replicas, the replica-wide chores run on one of them.
    let leader = settings
        .cluster
        .as_ref()
        .map(|_| Arc::new(std::sync::atomic::AtomicBool::new(false)));
    if settings.replicas_sync {
        info!("peer deployments follow their Ready bases (ENABLE_MODULE_REPLICAS_SYNC_WITH_BASE)");
        tokio::spawn(crate::peer::run(
            api.clone(),
            settings.env.clone(),
            metrics.peer.clone(),
            (health.watches.clone(), metrics.watches.clone()),
            leader.clone(),
            cancel.child_token(),
        ));
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
        tick: TICK,
        retention_timeout: settings.retention_timeout,
        install_timeout: settings.install_timeout,
        orphan_grace: settings.orphan_grace,
        owned_from_start: settings.cluster.is_none(),
        observer_linger: settings
            .cluster
            .as_ref()
            .map_or(Duration::ZERO, |c| c.lease * 2),
        order: deps.order,
    });
    let (exit_tx, exit_rx) = mpsc::unbounded_channel();
    let tasks = Tasks::new(
        TaskDeps {
            api: api.clone(),
            policies: deps.policies.clone(),
            settings: actor_settings,
            tunnels,
            base_metrics: metrics.bases.clone(),
            metrics: metrics.controller.clone(),
            pool: deps.pool.clone(),
        },
        exit_tx,
    );
    let pods: KubeApi<Pod> = KubeApi::all(deps.client.clone());
    // Unbound pods too: a rollout is visible before its new pods are scheduled.
    let pod_rx: Vec<mpsc::Receiver<watcher::Event<Pod>>> = (0..POD_STREAMS)
        .map(|i| {
            watches::spawn(
                &format!("pods[{}]", pod_selector(i)),
                pods.clone(),
                watcher::Config::default().labels(&pod_selector(i)),
                health.watches.clone(),
                metrics.watches.clone(),
                cancel.child_token(),
            )
        })
        .collect();
    let deploy_rx = watches::spawn(
        "deployments",
        KubeApi::<Deployment>::all(deps.client.clone()),
        watcher::Config::default(),
        health.watches.clone(),
        metrics.watches.clone(),
        cancel.child_token(),
    );
    let (gate_tx, gate_rx) = mpsc::unbounded_channel();
    let (written_tx, written_rx) = mpsc::unbounded_channel();
    let (sharing, lease_rx) = match &settings.cluster {
        None => (None, None),
        Some(c) => {
            let endpoint = match (&c.advertise_host, http_addr) {
                (Some(host), Some(addr)) => Some(format!("http://{host}:{}", addr.port())),
                _ => None,
            };
            let shard_settings = ShardSettings {
                me: settings.client_id.clone(),
                env: settings.env.clone(),
                namespace: c.namespace.clone(),
                lease: c.lease,
                max_level: c.max_level,
                endpoint,
            };
            let rx = watches::spawn(
                "ownership-leases",
                KubeApi::<Lease>::namespaced(deps.client.clone(), &c.namespace),
                watcher::Config::default().labels(&shard_settings.selector()),
                health.watches.clone(),
                metrics.watches.clone(),
                cancel.child_token(),
            );
            info!(namespace = %c.namespace, lease_secs = c.lease.as_secs(), "sharing the bases with the other replicas (IS_CLUSTER)");
            let writer = LeaseWriter::new(api.clone(), &c.namespace, written_tx);
            let sharing = Sharing::new(
                Shards::new(shard_settings),
                writer,
                directory.clone(),
                metrics.shards.clone(),
                leader.clone().unwrap_or_default(),
            );
            (Some(sharing), Some(rx))
        }
    };
    let core = Loop {
        env: settings.env.clone(),
        index: Index::new(&settings.env, deps.policies),
        tasks,
        metrics: metrics.clone(),
        pool: deps.pool,
        gate_tx,
        sharing,
    };
    let c = cancel.clone();
    let loop_api = api.clone();
    let task = tokio::spawn(async move {
        core.run(
            loop_api,
            Inputs {
                events: event_rx,
                baselines: baseline_rx,
                exits: exit_rx,
                pods: pod_rx,
                deployments: deploy_rx,
                gates: gate_rx,
                leases: lease_rx,
                written: written_rx,
            },
            c,
        )
        .await
    });
    Ok(ControllerHandle {
        cancel,
        task,
        http_addr,
        health,
        metrics,
        api,
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

struct Inputs {
    events: mpsc::Receiver<(String, BaseEvent)>,
    baselines: mpsc::Receiver<BaselineRequest>,
    exits: mpsc::UnboundedReceiver<Exit>,
    pods: Vec<mpsc::Receiver<watcher::Event<Pod>>>,
    deployments: mpsc::Receiver<watcher::Event<Deployment>>,
    gates: mpsc::UnboundedReceiver<GateDone>,
    leases: Option<mpsc::Receiver<watcher::Event<Lease>>>,
    written: mpsc::UnboundedReceiver<Written>,
}

/// The loop: never waits on anything but its inputs.
struct Loop {
    env: String,
    index: Index,
    tasks: Tasks,
    metrics: Arc<Metrics>,
    pool: Option<Pool>,
    gate_tx: mpsc::UnboundedSender<GateDone>,
    sharing: Option<Sharing>,
}

impl Loop {
    /// Starts the task of a base and, when replicas share the bases, lets the others know.
    fn spawn(&mut self, base_id: &str, tunnel: &str, boot: Vec<BaseMsg>) -> bool {
        let started = self.tasks.spawn(base_id, tunnel, boot);
        if started && let Some(s) = self.sharing.as_mut() {
            s.base_seen(&shape::node_name(base_id, &self.env));
        }
        started
    }

    /// Hands the index's output on: evaluations to the plugin pool, the rest to the tasks.
    fn deliver(&self, outs: Vec<Out>) {
        let mut rest = Vec::with_capacity(outs.len());
        for o in outs {
            match o {
                Out::Evaluate(job) => self.evaluate(job),
                other => rest.push(other),
            }
        }
        self.tasks.deliver(rest, &self.index);
    }

    /// Runs a batch-policy evaluation off the loop; its result comes back on `gate_tx`.
    fn evaluate(&self, job: Box<GateJob>) {
        let tx = self.gate_tx.clone();
        let Some(pool) = self.pool.clone() else {
            // Built-in policies only: cheap and pure, run here.
            let _ = tx.send(job.run());
            return;
        };
        tokio::spawn(async move {
            let owner = job.owner.clone();
            // The job comes back untouched when the pool refuses it, so its state is kept.
            let slot = Arc::new(std::sync::Mutex::new(Some(job)));
            let taken = slot.clone();
            let result = offload::run(pool.as_ref(), move || {
                let job = taken.lock().unwrap_or_else(|p| p.into_inner()).take();
                job.map(|j| j.run())
            })
            .await;
            let now = Instant::now();
            let done = match result {
                Ok(Some(done)) => done,
                Ok(None) => GateDone::lost(owner, "evaluation job was empty", now),
                Err(e) => match slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    Some(job) => job.not_run(&e, now),
                    None => GateDone::lost(owner, &e, now),
                },
            };
            let _ = tx.send(done);
        });
    }

    async fn run(
        mut self,
        api: Api,
        mut inp: Inputs,
        cancel: CancellationToken,
    ) -> anyhow::Result<()> {
        self.adopt_existing_vnodes(&api).await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pods = futures::stream::select_all(
            inp.pods
                .drain(..)
                .enumerate()
                .map(|(i, rx)| futures::StreamExt::map(tokio_stream_from(rx), move |e| (i, e))),
        );
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                Some((tunnel, ev)) = inp.events.recv() => self.on_base_event(&tunnel, ev),
                Some(req) = inp.baselines.recv() => self.on_baseline_request(req),
                Some((node, generation, exit)) = inp.exits.recv() => {
                    if self.tasks.on_exit(&node, generation, exit)
                        && let Some(s) = self.sharing.as_mut()
                    {
                        s.base_gone(&node, &self.tasks);
                    }
                }
                Some(ev) = recv_opt(&mut inp.leases) => {
                    if let Some(s) = self.sharing.as_mut() {
                        s.on_lease(ev, Instant::now());
                    }
                }
                Some(w) = inp.written.recv() => {
                    if let Some(s) = self.sharing.as_mut() {
                        s.on_written(w, &self.tasks, Instant::now());
                    }
                }
                Some((stream, ev)) = futures::StreamExt::next(&mut pods) => {
                    self.metrics.controller.pod_events.inc();
                    let out = self.index.on_pod_event(stream, ev, Instant::now());
                    self.deliver(out);
                }
                Some(ev) = inp.deployments.recv() => {
                    let out = self.index.on_deployment_event(ev, Instant::now());
                    self.deliver(out);
                }
                Some(done) = inp.gates.recv() => {
                    let out = self.index.on_gate_done(done, Instant::now());
                    self.deliver(out);
                }
                _ = tick.tick() => {
                    let out = self.index.recheck(Instant::now());
                    self.deliver(out);
                    if let Some(s) = self.sharing.as_mut() {
                        s.tick(&self.tasks, Instant::now());
                    }
                }
            }
        }
        info!("controller stopping");
        if let Some(s) = self.sharing.as_mut() {
            s.leave(&self.tasks).await;
        }
        self.tasks.clear();
        for t in self.tasks.tunnels() {
            t.stop().await;
        }
        Ok(())
    }

    /// Starts tasks for VNodes of this env that exist already, so that a restart neither loses
    /// track of silent bases nor re-creates anything.
    async fn adopt_existing_vnodes(&mut self, api: &Api) {
        let selector = format!("{COMPONENT_LABEL}=vnode,{ENV_LABEL}={}", self.env);
        match api.list_nodes(&selector).await {
            Ok(nodes) => {
                for n in nodes {
                    let Some(name) = n.metadata.name.as_deref() else {
                        continue;
                    };
                    let Some(short) = shape::base_id_of(name, &self.env) else {
                        continue;
                    };
                    // The exact identity (a mapped one differs from the name's part).
                    let id = n
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(IDENTITY_ANNOTATION))
                        .cloned()
                        .unwrap_or(short);
                    if shape::node_name(&id, &self.env) != name {
                        warn!(node = name, identity = %id, "VNode name does not match its base identity; not adopted");
                        continue;
                    }
                    let tunnel = n
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(TUNNEL_LABEL))
                        .map(String::as_str);
                    info!(base = %id, node = name, "adopting existing VNode");
                    let tunnel = if tunnel == Some("http") {
                        "http"
                    } else {
                        "mqtt"
                    };
                    let mut boot = self.index.bootstrap(name);
                    let urls = n
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(MODULE_URLS_ANNOTATION))
                        .cloned();
                    boot.insert(0, BaseMsg::Adopted { urls });
                    self.spawn(&id, tunnel, boot);
                }
            }
            Err(e) => {
                warn!(error = %e, "listing existing VNodes failed; they are adopted when their bases speak")
            }
        }
    }

    fn on_base_event(&mut self, tunnel: &str, ev: BaseEvent) {
        let node = shape::node_name(&ev.base_id, &self.env);
        if !self.tasks.contains(&node) {
            let creates = matches!(
                &ev.event,
                TunnelEvent::Heartbeat(h) if h.lifecycle == BaseLifecycle::Activated
            ) || matches!(&ev.event, TunnelEvent::QueryBaseline(_));
            if !creates {
                self.count_unknown(tunnel);
                debug!(base = %ev.base_id, "event from a base without a VNode; dropped");
                return;
            }
            info!(base = %ev.base_id, %node, tunnel, "new base");
            let boot = self.index.bootstrap(&node);
            if !self.spawn(&ev.base_id, tunnel, boot) {
                return;
            }
        }
        self.tasks.send(&node, BaseMsg::from(ev.event));
    }

    fn count_unknown(&self, tunnel: &str) {
        match tunnel {
            "http" => self.metrics.http.count_received("unknown_base"),
            _ => self.metrics.mqtt.count_received("unknown_base"),
        }
    }

    fn on_baseline_request(&mut self, req: BaselineRequest) {
        let id = req.metadata.identity.clone();
        if id.is_empty() {
            let _ = req.reply.send(Vec::new());
            return;
        }
        let node = shape::node_name(&id, &self.env);
        if !self.tasks.contains(&node) {
            let boot = self.index.bootstrap(&node);
            if !self.spawn(&id, "http", boot) {
                let _ = req.reply.send(Vec::new());
                return;
            }
        }
        self.tasks.send(
            &node,
            BaseMsg::Baseline {
                metadata: Box::new(req.metadata),
                reply: req.reply,
            },
        );
    }
}

/// Receives from an optional channel; pending forever when there is none.
async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn tokio_stream_from<T: Send + 'static>(
    rx: mpsc::Receiver<T>,
) -> futures::stream::BoxStream<'static, T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|v| (v, rx))
    }))
}
