//! Simulated Koupleless bases: each one speaks the Arklet protocol (shared/design/protocol.md)
//! over MQTT or HTTP exactly as a real base does, and exposes a scriptable handle for tests
//! (latency, failures, silence, restarts) plus a record of what it was asked.
//!
//! Layout: [`state`] is the pure state machine, [`wire`] maps it to the Arklet wire types,
//! `engine` executes commands, `mqtt` and `http` are the two transports, [`fleet`] runs many.

mod engine;
pub mod fleet;
mod http;
mod mqtt;
pub mod state;
pub mod wire;

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use module_controller::model::{ModuleKey, ModuleStatus};

pub use fleet::SimFleet;
pub use state::{ActiveSnapshot, ReceivedCommand};

/// Who a simulated base is and how its JVM looks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimBaseConfig {
    /// Identity (unique per base; becomes `vnode.<identity>.<env>`).
    pub identity: String,
    /// Base application name.
    pub name: String,
    /// Base version.
    pub version: String,
    /// Cluster name.
    pub cluster_name: String,
    /// Controller environment (`koupleless_<env>` topics).
    pub env: String,
    /// Reported `localIP`.
    pub local_ip: String,
    /// Reported `localHostName`.
    pub host_name: String,
    /// Time between heartbeats.
    pub heartbeat_interval: Duration,
    /// Time an install or uninstall takes before the base answers.
    pub install_latency: Duration,
    /// `java max metaspace` (-1 = unlimited).
    pub max_metaspace: i64,
    /// `java committed metaspace`.
    pub committed_metaspace: i64,
    /// `java used metaspace`.
    pub used_metaspace: i64,
    /// MQTT client id prefix (`<prefix>@@@<identity>`).
    pub client_prefix: String,
    /// MQTT user name, if the broker wants one.
    pub mqtt_username: Option<String>,
    /// MQTT password, if the broker wants one.
    pub mqtt_password: Option<String>,
}

impl SimBaseConfig {
    /// Defaults of a typical base: name `base`, version `1.0.0`, cluster `default`, env `dev`,
    /// 10 s heartbeats, instant installs, 1 GiB max metaspace.
    pub fn new(identity: &str) -> Self {
        SimBaseConfig {
            identity: identity.to_string(),
            name: "base".into(),
            version: "1.0.0".into(),
            cluster_name: "default".into(),
            env: "dev".into(),
            local_ip: "127.0.0.1".into(),
            host_name: identity.to_string(),
            heartbeat_interval: Duration::from_secs(10),
            install_latency: Duration::ZERO,
            max_metaspace: 1024 * 1024 * 1024,
            committed_metaspace: 128 * 1024 * 1024,
            used_metaspace: 100 * 1024 * 1024,
            client_prefix: "koupleless".into(),
            mqtt_username: None,
            mqtt_password: None,
        }
    }
}

/// How a simulated base reaches the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimTransport {
    /// Arklet MQTT tunnel through a broker.
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
    },
    /// Arklet HTTP tunnel: heartbeats to the controller, Arklet API served locally.
    Http {
        /// Controller base URL, e.g. `http://127.0.0.1:7777`.
        controller_url: String,
        /// Arklet API port; 0 picks a free one (kept across restarts).
        listen_port: u16,
    },
}

/// State shared by a base's handle and its tasks. Tasks hold this, never the handle's
/// drop guard, so dropping the last handle cancels them.
pub(crate) struct Shared {
    cfg: SimBaseConfig,
    transport: SimTransport,
    state: Mutex<state::SimState>,
    latency_ms: AtomicU64,
    silent: watch::Sender<bool>,
    /// Wakes `wait_until` callers after any change.
    changed: Notify,
    /// Asks the heartbeat task for an immediate beat.
    beat_now: Notify,
    /// Serialises command execution: commands run in arrival order per base.
    exec_lock: tokio::sync::Mutex<()>,
    /// Arklet HTTP port once bound (0 = none).
    http_port: AtomicU16,
    session: tokio::sync::Mutex<Option<Session>>,
    root: CancellationToken,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, state::SimState> {
        // A panic while holding the lock cannot leave SimState half-updated in a way that
        // matters to a simulator, so recover the guard rather than propagate the poison.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the state and wakes waiters.
    fn update<R>(&self, f: impl FnOnce(&mut state::SimState) -> R) -> R {
        let r = f(&mut self.state());
        self.changed.notify_waiters();
        r
    }

    fn is_silent(&self) -> bool {
        *self.silent.borrow()
    }

    fn latency(&self) -> Duration {
        Duration::from_millis(self.latency_ms.load(Ordering::Relaxed))
    }

    fn log_id(&self) -> &str {
        &self.cfg.identity
    }
}

/// One connection lifetime of a base (between start/restart and stop).
enum Session {
    Mqtt(mqtt::MqttSession),
    Http(http::HttpSession),
}

impl Session {
    async fn start(shared: &Arc<Shared>) -> anyhow::Result<Session> {
        let cancel = shared.root.child_token();
        match &shared.transport {
            SimTransport::Mqtt { host, port } => Ok(Session::Mqtt(mqtt::MqttSession::start(
                shared.clone(),
                host.clone(),
                *port,
                cancel,
            ))),
            SimTransport::Http {
                controller_url,
                listen_port,
            } => Ok(Session::Http(
                http::HttpSession::start(
                    shared.clone(),
                    controller_url.clone(),
                    *listen_port,
                    cancel,
                )
                .await?,
            )),
        }
    }

    async fn graceful(self) {
        match self {
            Session::Mqtt(s) => s.graceful().await,
            Session::Http(s) => s.graceful().await,
        }
    }

    async fn abort(self) {
        match self {
            Session::Mqtt(s) => s.abort().await,
            Session::Http(s) => s.abort().await,
        }
    }
}

/// Handle to a simulated base; cheap to clone. Dropping the last clone stops the base.
#[derive(Clone)]
pub struct SimBase {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for SimBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBase")
            .field("identity", &self.shared.cfg.identity)
            .field("transport", &self.shared.transport)
            .finish()
    }
}

impl SimBase {
    /// Starts a base: connects (MQTT) or binds its Arklet API (HTTP), heartbeats, and asks
    /// for its baseline. Returns once the transport is set up, not once connected.
    pub async fn start(cfg: SimBaseConfig, transport: SimTransport) -> anyhow::Result<SimBase> {
        let root = CancellationToken::new();
        let (silent, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            latency_ms: AtomicU64::new(duration_ms(cfg.install_latency)),
            cfg,
            transport,
            state: Mutex::new(state::SimState::new()),
            silent,
            changed: Notify::new(),
            beat_now: Notify::new(),
            exec_lock: tokio::sync::Mutex::new(()),
            http_port: AtomicU16::new(0),
            session: tokio::sync::Mutex::new(None),
            root: root.clone(),
        });
        let session = Session::start(&shared).await?;
        *shared.session.lock().await = Some(session);
        tracing::info!(base = %shared.cfg.identity, transport = ?shared.transport, "simulated base started");
        Ok(SimBase {
            shared,
            _guard: Arc::new(root.drop_guard()),
        })
    }

    /// The base's identity.
    pub fn identity(&self) -> String {
        self.shared.cfg.identity.clone()
    }

    /// The configuration the base was started with.
    pub fn config(&self) -> &SimBaseConfig {
        &self.shared.cfg
    }

    /// The Arklet HTTP port (HTTP transport only).
    pub fn http_port(&self) -> Option<u16> {
        Some(self.shared.http_port.load(Ordering::Relaxed)).filter(|p| *p != 0)
    }

    /// Every installed module with its state.
    pub fn modules(&self) -> Vec<ModuleStatus> {
        self.shared.state().modules()
    }

    /// The activated modules, sorted.
    pub fn active_modules(&self) -> Vec<ModuleKey> {
        self.shared.state().active_modules()
    }

    /// One entry per change of the active set, oldest first.
    pub fn history(&self) -> Vec<ActiveSnapshot> {
        self.shared.state().history().to_vec()
    }

    /// Every command received, in arrival order (including dropped ones).
    pub fn commands(&self) -> Vec<ReceivedCommand> {
        self.shared.state().commands().to_vec()
    }

    /// How many commands could not be parsed (they were logged and ignored).
    pub fn malformed_count(&self) -> u64 {
        self.shared.state().malformed_count()
    }

    /// Changes how long installs and uninstalls take from now on.
    pub fn set_install_latency(&self, d: Duration) {
        self.shared
            .latency_ms
            .store(duration_ms(d), Ordering::Relaxed);
    }

    /// Makes every install of `biz_name` (any version) fail with this reason and message.
    pub fn fail_installs(&self, biz_name: &str, reason: &str, message: &str) {
        self.shared
            .update(|s| s.fail_installs(biz_name, None, reason, message));
    }

    /// Makes installs of exactly `biz_name`@`biz_version` fail with this reason and message.
    pub fn fail_install_version(
        &self,
        biz_name: &str,
        biz_version: &str,
        reason: &str,
        message: &str,
    ) {
        self.shared
            .update(|s| s.fail_installs(biz_name, Some(biz_version), reason, message));
    }

    /// Removes every scripted failure.
    pub fn clear_failures(&self) {
        self.shared.update(|s| s.clear_failures());
    }

    /// Makes the base unreachable: no heartbeats, no answers; commands that arrive are
    /// recorded as dropped and never executed. The MQTT connection stays up (a hung JVM's
    /// socket does too); HTTP requests hang until `resume` (then 503) or stop.
    pub fn go_silent(&self) {
        self.shared.silent.send_replace(true);
        self.shared.changed.notify_waiters();
        tracing::info!(base = %self.shared.log_id(), "simulated base went silent");
    }

    /// Ends silence: same modules, and a heartbeat goes out at once.
    pub fn resume(&self) {
        self.shared.silent.send_replace(false);
        self.shared.beat_now.notify_one();
        self.shared.changed.notify_waiters();
        tracing::info!(base = %self.shared.log_id(), "simulated base resumed");
    }

    /// Whether the base is currently silent.
    pub fn is_silent(&self) -> bool {
        self.shared.is_silent()
    }

    /// Announces shutdown (a `DEACTIVATED` heartbeat), then disconnects cleanly.
    pub async fn shutdown_graceful(&self) {
        let session = self.shared.session.lock().await.take();
        if let Some(s) = session {
            s.graceful().await;
            tracing::info!(base = %self.shared.log_id(), "simulated base shut down gracefully");
        }
    }

    /// Drops the connection abruptly, without a goodbye (as a killed JVM does).
    pub async fn stop(&self) {
        let session = self.shared.session.lock().await.take();
        if let Some(s) = session {
            s.abort().await;
            tracing::info!(base = %self.shared.log_id(), "simulated base stopped");
        }
    }

    /// Restarts the base with the same identity: drops the current connection abruptly (if
    /// any), forgets its modules unless `keep_modules`, ends silence, connects again and asks
    /// for its baseline again.
    pub async fn restart(&self, keep_modules: bool) -> anyhow::Result<()> {
        let mut slot = self.shared.session.lock().await;
        if let Some(s) = slot.take() {
            s.abort().await;
        }
        if !keep_modules {
            self.shared
                .update(|s| s.clear_modules(module_controller::protocol::arklet::now_ms()));
        }
        self.shared.silent.send_replace(false);
        *slot = Some(Session::start(&self.shared).await?);
        tracing::info!(base = %self.shared.log_id(), keep_modules, "simulated base restarted");
        Ok(())
    }

    /// Waits until `pred` holds (true) or `timeout` passes (false).
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&SimBase) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.shared.changed.notified();
            if pred(self) {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            // The predicate may look at things that do not notify (e.g. time), so poll too.
            let nap = (deadline - now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(nap, notified).await;
        }
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
