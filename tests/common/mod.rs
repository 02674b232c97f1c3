//! Shared support for end-to-end tests: a private environment per test (namespace, env name,
//! broker, controller) on the process-wide local control plane.

#![allow(dead_code)]

pub mod deploy;
pub mod faults;
pub mod process;
pub mod watch;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arklet_double::{Base, BaseConfig, BizId, Command, Transport};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use module_controller::config::Settings;
use module_controller::controller::{self, ControllerDeps, ControllerHandle};
use module_controller::metrics::Metrics;
use module_controller::rollout::{BuiltinPolicies, PolicySource};
use module_controller::vpod::status::is_ready;
use serde_json::json;
use testkit::localenv::broker::Mosquitto;
use testkit::localenv::control_plane::{ControlPlane, ControlPlaneOptions};

/// Polls `f` every 200 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Which tunnel a base uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tunnel {
    /// MQTT through this test's mosquitto.
    Mqtt,
    /// The HTTP tunnel: heartbeats to the controller, the controller calls the base's Arklet API.
    Http,
}

impl Tunnel {
    /// Lowercase name, for identities and messages.
    pub fn name(self) -> &'static str {
        match self {
            Tunnel::Mqtt => "mqtt",
            Tunnel::Http => "http",
        }
    }
}

/// Versions of every `installBiz` for module `name` the base received (executed or dropped).
pub fn installs(b: &Base, name: &str) -> Vec<String> {
    b.installs_of(name)
        .into_iter()
        .filter_map(|r| match r.command {
            Command::Install { version, .. } => Some(version),
            _ => None,
        })
        .collect()
}

/// Versions of every `uninstallBiz` for module `name` the base received (executed or dropped).
pub fn uninstalls(b: &Base, name: &str) -> Vec<String> {
    b.uninstalls_of(name)
        .into_iter()
        .filter_map(|r| match r.command {
            Command::Uninstall { version, .. } => Some(version),
            _ => None,
        })
        .collect()
}

/// Whether the base runs exactly this identity ACTIVATED.
pub fn runs(b: &Base, name: &str, version: &str) -> bool {
    b.active_modules().contains(&BizId::new(name, version))
}

/// The first container's waiting (reason, message), if it is waiting.
pub fn waiting(p: &Pod) -> Option<(String, String)> {
    let w = p
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .clone()?;
    Some((w.reason.unwrap_or_default(), w.message.unwrap_or_default()))
}

/// The node a pod is bound to.
pub fn node_of(p: &Pod) -> Option<String> {
    p.spec.as_ref()?.node_name.clone()
}

/// Installs the crypto provider and the test log subscriber (once per process).
pub fn init_test_logging() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,rumqttc=error".into()),
        )
        .with_test_writer()
        .try_init();
}

/// A control plane of one test's own (to freeze it, or to load it without disturbing other
/// tests); stopped when dropped. Declare it before the [`TestEnv`] that uses it, so that the
/// environment's cleanup runs while it is still up.
pub struct PrivateControlPlane(&'static ControlPlane);

impl PrivateControlPlane {
    /// Starts one with `opts`.
    pub async fn start(opts: ControlPlaneOptions) -> PrivateControlPlane {
        init_test_logging();
        let cp = ControlPlane::start(opts)
            .await
            .expect("private control plane starts");
        PrivateControlPlane(Box::leak(Box::new(cp)))
    }

    /// The control plane, for [`TestEnv::new_on`].
    pub fn get(&self) -> &'static ControlPlane {
        self.0
    }
}

impl Drop for PrivateControlPlane {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

/// One test's world.
pub struct TestEnv {
    pub cp: &'static ControlPlane,
    pub client: kube::Client,
    pub broker: Mosquitto,
    /// Namespace for this test's workloads.
    pub ns: String,
    /// Controller env (also isolates this test's VNodes from other tests').
    pub env: String,
    /// Base name this test's bases announce (Deployments select it).
    pub base_name: String,
    pub controller: Option<ControllerHandle>,
    pub policies: Arc<dyn PolicySource>,
    pub vnode_ttl: Duration,
    /// Start controllers with the unsafe status order (negative controls only).
    pub unsafe_order: bool,
    /// The plugin pool, when `policies` come from a plugin host.
    pub pool: Option<module_controller::plugin::PluginPool>,
    /// The HTTP tunnel port of the first controller started, reused by restarts so HTTP bases
    /// keep reaching it.
    pub http_port: Option<u16>,
}

impl TestEnv {
    /// A fresh namespace, env and broker; no controller yet.
    pub async fn new(name: &str) -> TestEnv {
        init_test_logging();
        let cp = ControlPlane::shared()
            .await
            .expect("local control plane starts");
        TestEnv::new_on(name, cp).await
    }

    /// Like [`TestEnv::new`], on a given control plane (e.g. a test's private one, see
    /// [`PrivateControlPlane`]).
    pub async fn new_on(name: &str, cp: &'static ControlPlane) -> TestEnv {
        init_test_logging();
        let client = cp.client().await.expect("client");
        let broker = Mosquitto::start().await.expect("mosquitto starts");
        let ns = format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        let namespaces: Api<Namespace> = Api::all(client.clone());
        let nsobj: Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns");
        namespaces
            .create(&PostParams::default(), &nsobj)
            .await
            .expect("create namespace");
        let env = ns.replace('_', "-");
        TestEnv {
            cp,
            client,
            broker,
            base_name: format!("base-{env}"),
            ns,
            env,
            controller: None,
            policies: Arc::new(BuiltinPolicies),
            vnode_ttl: Duration::from_secs(600),
            unsafe_order: false,
            pool: None,
            http_port: None,
        }
    }

    /// Controller settings for fast tests: 1 s heartbeats, NotReady after 3 s of silence; both
    /// tunnels (MQTT to this test's broker, HTTP on a free port kept across restarts).
    pub fn settings(&self) -> Settings {
        let mut s = Settings::local(&self.env);
        s.client_id = format!("test-{}", self.env);
        let mut s = s
            .with_mqtt(self.broker.host(), self.broker.port())
            .with_heartbeat(Duration::from_secs(1), 3);
        s.http_port = Some(self.http_port.unwrap_or(0));
        s.vnode_ttl = self.vnode_ttl;
        s.resync = Duration::from_secs(5);
        s.command_timeout = Duration::from_secs(3);
        s.retention_timeout = Duration::from_secs(120);
        s
    }

    /// Starts (or restarts) the controller in this process.
    pub async fn start_controller(&mut self) {
        self.start_controller_with(self.settings()).await;
    }

    /// Starts the controller with explicit settings.
    pub async fn start_controller_with(&mut self, settings: Settings) {
        let client = self.cp.client().await.expect("client");
        self.start_controller_as(settings, client).await;
    }

    /// Starts the controller with explicit settings and its own client (e.g. other credentials).
    pub async fn start_controller_as(&mut self, settings: Settings, client: kube::Client) {
        self.launch_controller(settings, client).await;
        self.wait_controller_ready().await;
    }

    /// Waits until the running controller is ready (every watch listed).
    async fn wait_controller_ready(&self) {
        let health = self
            .controller
            .as_ref()
            .expect("controller running")
            .health
            .clone();
        eventually(Duration::from_secs(30), "controller ready", || {
            let h = health.clone();
            async move { h.is_ready().then_some(()) }
        })
        .await;
    }

    /// Starts the controller without waiting until it is ready (e.g. when a watch is expected
    /// to fail).
    pub async fn launch_controller(&mut self, settings: Settings, client: kube::Client) {
        let handle = controller::start(settings, self.deps(client))
            .await
            .expect("controller starts");
        self.launched(handle);
    }

    /// Starts the controller on runtime `rt` (its client, watches, tunnels and base tasks all
    /// live there, and nothing else does: that runtime's task count is the controller's) and
    /// waits until it is ready.
    pub async fn start_controller_on(&mut self, rt: &tokio::runtime::Handle, settings: Settings) {
        let cp = self.cp;
        let (policies, unsafe_order, pool) =
            (self.policies.clone(), self.unsafe_order, self.pool.clone());
        let handle = rt
            .spawn(async move {
                // Created here: the client's connection pool and buffer task belong to `rt`.
                let client = cp.client().await.expect("client");
                let deps = deps_for(client, policies, unsafe_order, pool);
                controller::start(settings, deps).await
            })
            .await
            .expect("controller start task")
            .expect("controller starts");
        self.launched(handle);
        self.wait_controller_ready().await;
    }

    fn deps(&self, client: kube::Client) -> ControllerDeps {
        deps_for(
            client,
            self.policies.clone(),
            self.unsafe_order,
            self.pool.clone(),
        )
    }

    fn launched(&mut self, handle: ControllerHandle) {
        if let Some(addr) = handle.http_addr {
            self.http_port = Some(addr.port());
        }
        self.controller = Some(handle);
    }

    /// Serves the running controller's `/metrics` and `/readyz` on a free loopback port, as the
    /// binary does on `METRICS_ADDR`; returns the base URL.
    pub async fn serve_endpoint(&self) -> String {
        let h = self.controller.as_ref().expect("controller running");
        let addr = module_controller::server::serve(
            std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
            h.metrics.clone(),
            h.health.clone(),
        )
        .await
        .expect("metrics endpoint");
        format!("http://{addr}")
    }

    /// The running controller's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.controller
            .as_ref()
            .expect("controller running")
            .metrics
            .clone()
    }

    /// Stops the controller.
    pub async fn stop_controller(&mut self) {
        if let Some(h) = self.controller.take() {
            h.stop().await.expect("controller stops cleanly");
        }
    }

    /// Base config for this test (its env, its base name, 1 s heartbeats); otherwise the
    /// double's defaults, which follow the current Arklet.
    pub fn base_config(&self, id: &str) -> BaseConfig {
        let mut c = BaseConfig::new(id);
        c.env = self.env.clone();
        c.name = self.base_name.clone();
        c.version = "1.0.0".into();
        c.cluster_name = format!("cluster-{}", self.env);
        c.heartbeat_interval = Duration::from_secs(1);
        c
    }

    /// The MQTT transport of this test's broker.
    pub fn mqtt_transport(&self) -> Transport {
        Transport::Mqtt {
            host: self.broker.host().to_string(),
            port: self.broker.port(),
        }
    }

    /// The HTTP transport to this test's controller (which must be running).
    pub fn http_transport(&self) -> Transport {
        let port = self
            .controller
            .as_ref()
            .and_then(|c| c.http_addr)
            .map(|a| a.port())
            .or(self.http_port)
            .expect("the controller runs its HTTP tunnel");
        Transport::Http {
            controller_url: format!("http://127.0.0.1:{port}"),
            listen_port: 0,
        }
    }

    /// Starts an Arklet double base over MQTT.
    pub async fn mqtt_base(&self, id: &str) -> Base {
        self.mqtt_base_with(self.base_config(id)).await
    }

    /// Starts an Arklet double base over MQTT with a custom config.
    pub async fn mqtt_base_with(&self, cfg: BaseConfig) -> Base {
        Base::start(cfg, self.mqtt_transport())
            .await
            .expect("MQTT base starts")
    }

    /// Starts an Arklet double base over the HTTP tunnel.
    pub async fn http_base(&self, id: &str) -> Base {
        self.http_base_with(self.base_config(id)).await
    }

    /// Starts an Arklet double base over the HTTP tunnel with a custom config.
    pub async fn http_base_with(&self, cfg: BaseConfig) -> Base {
        Base::start(cfg, self.http_transport())
            .await
            .expect("HTTP base starts")
    }

    /// Starts a base over `tunnel`.
    pub async fn base(&self, tunnel: Tunnel, id: &str) -> Base {
        self.base_with(tunnel, self.base_config(id)).await
    }

    /// Starts a base over `tunnel` with a custom config.
    pub async fn base_with(&self, tunnel: Tunnel, cfg: BaseConfig) -> Base {
        match tunnel {
            Tunnel::Mqtt => self.mqtt_base_with(cfg).await,
            Tunnel::Http => self.http_base_with(cfg).await,
        }
    }

    /// Node name of a base.
    pub fn node_name(&self, id: &str) -> String {
        format!("vnode.{id}.{}", self.env)
    }

    pub fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn deployments(&self) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The module Deployment shape of `examples/` for this test's bases.
    pub fn module_deployment(
        &self,
        name: &str,
        module: &str,
        version: &str,
        replicas: i32,
    ) -> Deployment {
        serde_json::from_value(json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": self.ns},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                "template": {
                    "metadata": {"labels": {"app": name, "virtual-kubelet.koupleless.io/component": "module"}},
                    "spec": {
                        "containers": [{
                            "name": module,
                            "image": format!("https://example.invalid/modules/{module}-{version}-ark-biz.jar"),
                            "env": [{"name": "BIZ_VERSION", "value": version}]
                        }],
                        "affinity": {
                            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [{"matchExpressions": [
                                    {"key": "base.koupleless.io/name", "operator": "In", "values": [self.base_name]},
                                    {"key": "base.koupleless.io/version", "operator": "In", "values": ["1.0.0"]}
                                ]}]
                            }},
                            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                                "labelSelector": {"matchLabels": {"app": name}},
                                "topologyKey": "kubernetes.io/hostname"
                            }]}
                        },
                        "tolerations": [
                            {"key": "schedule.koupleless.io/virtual-node", "operator": "Equal", "value": "True", "effect": "NoExecute"},
                            {"key": "schedule.koupleless.io/node-env", "operator": "Equal", "value": self.env, "effect": "NoExecute"}
                        ]
                    }
                }
            }
        }))
        .expect("deployment")
    }

    pub async fn apply_deployment(&self, d: &Deployment) {
        let name = d.metadata.name.clone().expect("name");
        self.deployments()
            .patch(
                &name,
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(d),
            )
            .await
            .expect("apply deployment");
    }

    pub async fn scale(&self, name: &str, replicas: i32) {
        self.deployments()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"spec": {"replicas": replicas}})),
            )
            .await
            .expect("scale");
    }

    /// Pods of a Deployment (by its `app` label).
    pub async fn app_pods(&self, app: &str) -> Vec<Pod> {
        self.pods()
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .expect("list pods")
            .items
    }

    /// Waits until `n` pods of `app` exist, all Ready, none deleting.
    pub async fn wait_ready_pods(&self, app: &str, n: usize, timeout: Duration) -> Vec<Pod> {
        eventually(timeout, &format!("{n} Ready pods of {app}"), || async {
            let pods = self.app_pods(app).await;
            let live: Vec<Pod> = pods
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect();
            (live.len() == n && live.iter().all(|p| is_ready(p.status.as_ref()))).then_some(live)
        })
        .await
    }

    /// Waits until the VNode of base `id` reports Ready=True.
    pub async fn wait_node_ready(&self, id: &str, timeout: Duration) {
        eventually(timeout, &format!("VNode of {id} Ready"), || async {
            (self.node_ready(id).await.as_deref() == Some("True")).then_some(())
        })
        .await;
    }

    /// Ready condition status of a node ("True"/"False"/"Unknown"), if it exists.
    pub async fn node_ready(&self, id: &str) -> Option<String> {
        let n = self
            .nodes()
            .get_opt(&self.node_name(id))
            .await
            .expect("get node")?;
        n.status?
            .conditions?
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.status)
    }
}

impl Drop for TestEnv {
    /// Removes this test's VNodes (also when it panicked), so stale NotReady nodes do not pile up
    /// in the shared control plane.
    fn drop(&mut self) {
        let cp = self.cp;
        let env = self.env.clone();
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(client) = cp.client().await else {
                    return;
                };
                let nodes: Api<Node> = Api::all(client);
                let lp = ListParams::default()
                    .labels(&format!("virtual-kubelet.koupleless.io/env={env}"));
                if let Ok(list) = nodes.list(&lp).await {
                    for n in list.items {
                        if let Some(name) = n.metadata.name {
                            let _ = nodes.delete(&name, &Default::default()).await;
                        }
                    }
                }
            });
        });
        let _ = cleanup.join();
    }
}

fn deps_for(
    client: kube::Client,
    policies: Arc<dyn PolicySource>,
    unsafe_order: bool,
    pool: Option<module_controller::plugin::PluginPool>,
) -> ControllerDeps {
    let mut deps = ControllerDeps::new(
        client,
        policies,
        controller::no_plugin_codecs(),
        Metrics::new(),
    );
    if unsafe_order {
        deps = deps.unsafe_status_order();
    }
    if let Some(pool) = pool {
        deps = deps.plugin_pool(Arc::new(pool));
    }
    deps
}

/// The `reportingController` of the module controller's Events.
pub const REPORTING_CONTROLLER: &str = "module-controller";

/// Events in `ns` about `pod` (events.k8s.io/v1 `regarding`) that the module controller
/// reported: (reason, note). The scheduler, the kubelet and the Deployment controller write
/// Events about the same pods; a check that took theirs would not be checking ours.
pub async fn pod_events(client: &kube::Client, ns: &str, pod: &str) -> Vec<(String, String)> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
        .filter(|e| e.reporting_controller.as_deref() == Some(REPORTING_CONTROLLER))
        .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Sets the values of the required node-affinity expression on `key` of a Deployment's pod
/// template (e.g. which base name or version its pods need).
pub fn require_node_label(d: &mut Deployment, key: &str, values: &[&str]) {
    let terms = d
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .and_then(|s| s.affinity.as_mut())
        .and_then(|a| a.node_affinity.as_mut())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_mut()
        })
        .expect("required node affinity");
    let mut found = false;
    for term in &mut terms.node_selector_terms {
        for e in term.match_expressions.iter_mut().flatten() {
            if e.key == key {
                e.values = Some(values.iter().map(|v| v.to_string()).collect());
                found = true;
            }
        }
    }
    assert!(found, "no required node affinity on {key}");
}

/// Labels map helper.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
