//! The test-facing handle of one double base, the record of what it received and sent, and
//! the command engine both tunnels share (they differ only in how replies travel).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::config::{BaseConfig, Transport};
use crate::registry::{
    ActiveSnapshot, Begin, Biz, BizId, Failure, InstallReq, OpOutcome, Registry, Thrown,
    validation_failure,
};
use crate::{http, mqtt};

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One entry of a baseline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaselineEntry {
    /// `bizName`.
    pub name: Option<String>,
    /// `bizVersion`.
    pub version: Option<String>,
    /// `bizUrl`.
    pub url: Option<String>,
}

/// A command the base received, as the double understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `installBiz`.
    Install {
        /// `bizName` ("" when absent).
        name: String,
        /// `bizVersion` ("" when absent).
        version: String,
        /// `bizUrl` ("" when absent).
        url: String,
        /// `installStrategy`.
        strategy: Option<String>,
    },
    /// `uninstallBiz`.
    Uninstall {
        /// `bizName`.
        name: String,
        /// `bizVersion`.
        version: String,
    },
    /// `queryAllBiz`.
    QueryAllBiz,
    /// `health`.
    Health,
    /// A baseline (MQTT `base/baseline`, or the HTTP `/queryBaseline` answer).
    Baseline(Vec<BaselineEntry>),
}

/// A received command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// When (epoch millis).
    pub at_ms: u64,
    /// What.
    pub command: Command,
    /// Arrived while silent: recorded, never executed.
    pub dropped: bool,
}

/// A reply the base sent (MQTT publish other than heartbeat/queryBaseline, or HTTP answer).
#[derive(Debug, Clone, PartialEq)]
pub struct SentReply {
    /// When (epoch millis).
    pub at_ms: u64,
    /// `installBiz`, `uninstallBiz`, `batchInstallBiz`, `queryAllBiz` or `health`.
    pub command: String,
    /// The biz the command named, if any.
    pub biz: Option<BizId>,
    /// Topic suffix (`base/bizOperation`) or HTTP path (`/installBiz`).
    pub channel: String,
    /// Top-level `code` of the Arklet output (None for `simpleBiz`, which has none).
    pub code: Option<String>,
    /// `data.code`, when data is an object with a code.
    pub data_code: Option<String>,
    /// Top-level `message`.
    pub message: Option<String>,
    /// The whole JSON sent (MQTT: inside the envelope's `data`).
    pub body: Value,
}

impl SentReply {
    fn new(command: &str, biz: Option<BizId>, channel: &str, output: &Value, body: Value) -> Self {
        let text = |v: &Value| v.as_str().map(str::to_string);
        SentReply {
            at_ms: now_ms(),
            command: command.to_string(),
            biz,
            channel: channel.to_string(),
            code: output.get("code").and_then(text),
            data_code: output
                .get("data")
                .and_then(|d| d.get("code"))
                .and_then(text),
            message: output.get("message").and_then(text),
            body,
        }
    }
}

/// The mutable record of one base.
pub(crate) struct Core {
    pub registry: Registry,
    pub install_time: Duration,
    pub install_times: HashMap<String, Duration>,
    pub commands: Vec<Received>,
    pub replies: Vec<SentReply>,
    pub malformed: u64,
    pub heartbeats: u64,
    /// Connections made (MQTT: subscriptions acknowledged; HTTP: listener bound).
    pub connections: u64,
    /// Connected right now.
    pub connected: bool,
}

/// The running tunnel of one base "process".
pub(crate) enum Link {
    Mqtt(mqtt::MqttLink),
    Http(http::HttpLink),
}

pub(crate) struct Life {
    pub token: CancellationToken,
    pub link: Link,
}

/// State shared by the handle and the tunnel tasks.
pub(crate) struct Shared {
    pub cfg: BaseConfig,
    pub transport: Transport,
    core: Mutex<Core>,
    changed: watch::Sender<u64>,
    pub silent: watch::Sender<bool>,
    pub heartbeat_now: Notify,
    pub http_port: AtomicU16,
    root: CancellationToken,
    life: tokio::sync::Mutex<Option<Life>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock only happens in a failing test; keep going.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the record and wakes every `wait_until`.
    pub fn with<R>(&self, f: impl FnOnce(&mut Core) -> R) -> R {
        let r = f(&mut self.lock());
        self.changed.send_modify(|n| *n += 1);
        r
    }

    /// Reads the record without waking anyone.
    pub fn read<R>(&self, f: impl FnOnce(&Core) -> R) -> R {
        f(&self.lock())
    }

    pub fn is_silent(&self) -> bool {
        *self.silent.borrow()
    }

    pub fn record_command(&self, command: Command, dropped: bool) {
        self.with(|c| {
            c.commands.push(Received {
                at_ms: now_ms(),
                command,
                dropped,
            })
        });
    }

    pub fn record_reply(&self, reply: SentReply) {
        self.with(|c| c.replies.push(reply));
    }

    pub fn reply(
        &self,
        command: &str,
        biz: Option<BizId>,
        channel: &str,
        output: &Value,
        body: Value,
    ) {
        self.record_reply(SentReply::new(command, biz, channel, output, body));
    }

    pub fn malformed(&self) {
        self.with(|c| c.malformed += 1);
    }

    pub fn heartbeat_sent(&self) {
        self.with(|c| c.heartbeats += 1);
    }

    /// Notes a (re)connection: the base can receive commands again.
    pub fn connected(&self) {
        self.with(|c| {
            c.connections += 1;
            c.connected = true;
        });
    }

    /// Notes the loss of the connection.
    pub fn disconnected(&self) {
        self.with(|c| c.connected = false);
    }

    fn install_time_for(&self, name: &str) -> Duration {
        self.read(|c| c.install_times.get(name).copied().unwrap_or(c.install_time))
    }

    /// Runs one install through the registry, waiting the module's start time. None when the
    /// base died meanwhile (nothing is answered then).
    pub async fn run_install(
        &self,
        req: &InstallReq,
        token: &CancellationToken,
        locked: bool,
    ) -> Option<OpOutcome> {
        if token.is_cancelled() {
            return None;
        }
        let begin = self.with(|c| c.registry.begin_install(req, now_ms(), locked));
        let id = match begin {
            Begin::Done(outcome) => return Some(outcome),
            Begin::Started(id) => id,
        };
        let wait = self.install_time_for(&id.name);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = token.cancelled() => return None,
        }
        Some(self.with(|c| c.registry.finish_install(&id, now_ms(), locked)))
    }

    /// Runs one uninstall.
    pub async fn run_uninstall(
        &self,
        name: Option<&str>,
        version: Option<&str>,
        token: &CancellationToken,
    ) -> Option<OpOutcome> {
        if token.is_cancelled() {
            return None;
        }
        let begin = self.with(|c| c.registry.begin_uninstall(name, version, now_ms()));
        let id = match begin {
            Begin::Done(outcome) => return Some(outcome),
            Begin::Started(id) => id,
        };
        let wait = self.cfg.uninstall_time;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = token.cancelled() => return None,
        }
        Some(self.with(|c| c.registry.finish_uninstall(&id, now_ms())))
    }

    /// `batchInstallBiz` (`BatchInstallBizHandler` → `UnifiedOperationServiceImpl
    /// .batchInstall`): validate every entry, take the `null:null` lock, install all entries
    /// at once (they share the default priority), report per URL. Err = the whole command
    /// failed (validation thrown, or conflict).
    pub async fn run_batch(
        self: &Arc<Self>,
        entries: &[InstallReq],
        token: &CancellationToken,
    ) -> Option<Result<Vec<(String, OpOutcome)>, OpOutcome>> {
        if token.is_cancelled() {
            return None;
        }
        for e in entries {
            if e.url.as_deref().is_none_or(str::is_empty) {
                return Some(Err(OpOutcome::Thrown(validation_failure(
                    "bizUrl should not be blank",
                    "BatchInstallBizHandler",
                ))));
            }
            let named = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
            if named(&e.name) != named(&e.version) {
                return Some(Err(OpOutcome::Thrown(validation_failure(
                    "bizName and bizVersion should be both blank or both not blank.",
                    "BatchInstallBizHandler",
                ))));
            }
        }
        if let Err(message) = self.with(|c| c.registry.begin_batch()) {
            return Some(Err(OpOutcome::Conflict { message }));
        }
        let mut set = JoinSet::new();
        for (i, e) in entries.iter().cloned().enumerate() {
            let shared = self.clone();
            let token = token.clone();
            set.spawn(async move { (i, shared.run_install(&e, &token, false).await) });
        }
        let mut results: Vec<Option<(String, OpOutcome)>> = vec![None; entries.len()];
        let mut died = false;
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((i, Some(outcome))) => {
                    results[i] = Some((entries[i].url.clone().unwrap_or_default(), outcome));
                }
                _ => died = true,
            }
        }
        self.with(|c| c.registry.end_batch());
        if died || token.is_cancelled() {
            return None;
        }
        Some(Ok(results.into_iter().flatten().collect()))
    }

    pub async fn life(&self) -> tokio::sync::MutexGuard<'_, Option<Life>> {
        self.life.lock().await
    }
}

/// Converts request entries to the recorded form.
pub(crate) fn baseline_entries(reqs: &[InstallReq]) -> Vec<BaselineEntry> {
    reqs.iter()
        .map(|r| BaselineEntry {
            name: r.name.clone(),
            version: r.version.clone(),
            url: r.url.clone(),
        })
        .collect()
}

/// `Thrown` as `OpOutcome`, for tunnels.
pub(crate) fn thrown_of(o: &OpOutcome) -> Option<&Thrown> {
    match o {
        OpOutcome::Thrown(t) => Some(t),
        _ => None,
    }
}

/// A double base. Cheap to clone; dropping the last clone stops it.
#[derive(Clone)]
pub struct Base {
    shared: Arc<Shared>,
    _guard: Arc<DropGuard>,
}

impl std::fmt::Debug for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Base")
            .field("identity", &self.shared.cfg.identity)
            .finish()
    }
}

impl Base {
    /// Starts a base and returns once it can receive commands (MQTT: subscribed; HTTP:
    /// listening).
    pub async fn start(cfg: BaseConfig, transport: Transport) -> anyhow::Result<Base> {
        let port = match &transport {
            Transport::Http { listen_port, .. } => *listen_port,
            Transport::Mqtt { .. } => 0,
        };
        let registry = Registry::new(cfg.multi_version, cfg.keep_failed_modules);
        let core = Core {
            registry,
            install_time: cfg.install_time,
            install_times: HashMap::new(),
            commands: Vec::new(),
            replies: Vec::new(),
            malformed: 0,
            heartbeats: 0,
            connections: 0,
            connected: false,
        };
        let root = CancellationToken::new();
        let shared = Arc::new(Shared {
            cfg,
            transport,
            core: Mutex::new(core),
            changed: watch::Sender::new(0),
            silent: watch::Sender::new(false),
            heartbeat_now: Notify::new(),
            http_port: AtomicU16::new(port),
            root: root.clone(),
            life: tokio::sync::Mutex::new(None),
        });
        let base = Base {
            shared,
            _guard: Arc::new(root.drop_guard()),
        };
        base.launch().await?;
        Ok(base)
    }

    async fn launch(&self) -> anyhow::Result<()> {
        let mut life = self.shared.life().await;
        if life.is_some() {
            return Ok(());
        }
        let token = self.shared.root.child_token();
        let link = match &self.shared.transport {
            Transport::Mqtt { host, port } => Link::Mqtt(
                mqtt::start(self.shared.clone(), host.clone(), *port, token.clone()).await?,
            ),
            Transport::Http { controller_url, .. } => Link::Http(
                http::start(self.shared.clone(), controller_url.clone(), token.clone()).await?,
            ),
        };
        *life = Some(Life { token, link });
        Ok(())
    }

    /// The base identity.
    pub fn identity(&self) -> &str {
        &self.shared.cfg.identity
    }

    /// The configuration it was started with.
    pub fn config(&self) -> &BaseConfig {
        &self.shared.cfg
    }

    /// The Arklet HTTP port (HTTP transport), kept across restarts.
    pub fn http_port(&self) -> Option<u16> {
        match self.shared.transport {
            Transport::Http { .. } => Some(self.shared.http_port.load(Ordering::SeqCst)),
            Transport::Mqtt { .. } => None,
        }
    }

    /// Every registered module.
    pub fn modules(&self) -> Vec<Biz> {
        self.shared.read(|c| c.registry.bizs())
    }

    /// One module.
    pub fn module(&self, name: &str, version: &str) -> Option<Biz> {
        let id = BizId::new(name, version);
        self.shared.read(|c| c.registry.get(&id).cloned())
    }

    /// ACTIVATED modules, sorted.
    pub fn active_modules(&self) -> Vec<BizId> {
        self.shared.read(|c| c.registry.active())
    }

    /// One snapshot per change of the active set.
    pub fn history(&self) -> Vec<ActiveSnapshot> {
        self.shared.read(|c| c.registry.history().to_vec())
    }

    /// Every command received, in arrival order.
    pub fn commands(&self) -> Vec<Received> {
        self.shared.read(|c| c.commands.clone())
    }

    /// Every reply sent, in order.
    pub fn replies(&self) -> Vec<SentReply> {
        self.shared.read(|c| c.replies.clone())
    }

    /// Messages that could not be understood (bad JSON, unknown command topic).
    pub fn malformed_count(&self) -> u64 {
        self.shared.read(|c| c.malformed)
    }

    /// Whether the base is connected (MQTT) or listening (HTTP) now.
    pub fn is_connected(&self) -> bool {
        self.shared.read(|c| c.connected)
    }

    /// How many times the base has (re)connected with its subscriptions acknowledged
    /// (MQTT) or bound its port (HTTP). Lets a test wait for a reconnect.
    pub fn connections(&self) -> u64 {
        self.shared.read(|c| c.connections)
    }

    /// Heartbeats sent so far.
    pub fn heartbeats_sent(&self) -> u64 {
        self.shared.read(|c| c.heartbeats)
    }

    /// Install commands received for `name` (executed or dropped).
    pub fn installs_of(&self, name: &str) -> Vec<Received> {
        self.commands()
            .into_iter()
            .filter(|r| matches!(&r.command, Command::Install { name: n, .. } if n == name))
            .collect()
    }

    /// Uninstall commands received for `name`.
    pub fn uninstalls_of(&self, name: &str) -> Vec<Received> {
        self.commands()
            .into_iter()
            .filter(|r| matches!(&r.command, Command::Uninstall { name: n, .. } if n == name))
            .collect()
    }

    /// Sets how long every module (without its own setting) stays RESOLVED.
    pub fn set_install_time(&self, d: Duration) {
        self.shared.with(|c| c.install_time = d);
    }

    /// Sets how long modules named `name` stay RESOLVED.
    pub fn set_install_time_of(&self, name: &str, d: Duration) {
        self.shared
            .with(|c| c.install_times.insert(name.to_string(), d));
    }

    /// Makes every install of `name` fail (see [`Failure`] for what `data_code` selects).
    pub fn fail_installs(&self, name: &str, data_code: &str, message: &str) {
        let f = Failure {
            data_code: data_code.to_string(),
            message: message.to_string(),
        };
        self.shared.with(|c| c.registry.add_failure(name, None, f));
    }

    /// Makes installs of one version fail.
    pub fn fail_install_version(&self, name: &str, version: &str, data_code: &str, message: &str) {
        let f = Failure {
            data_code: data_code.to_string(),
            message: message.to_string(),
        };
        self.shared
            .with(|c| c.registry.add_failure(name, Some(version), f));
    }

    /// Removes every scripted failure.
    pub fn clear_failures(&self) {
        self.shared.with(|c| c.registry.clear_failures());
    }

    /// Stops heartbeats and answers; commands arriving meanwhile are recorded as dropped.
    /// The MQTT connection stays up; HTTP requests hang until [`Base::resume`] (then 503).
    pub fn go_silent(&self) {
        self.shared.silent.send_replace(true);
        self.shared.with(|_| ());
    }

    /// Ends silence and sends a heartbeat at once.
    pub fn resume(&self) {
        self.shared.silent.send_replace(false);
        self.shared.heartbeat_now.notify_one();
        self.shared.with(|_| ());
    }

    /// Whether the base is silent.
    pub fn is_silent(&self) -> bool {
        self.shared.is_silent()
    }

    /// Whether the base "process" is running.
    pub async fn is_running(&self) -> bool {
        self.shared.life().await.is_some()
    }

    /// Graceful shutdown: a `deactivated` heartbeat (if configured), then a clean
    /// disconnect (MQTT) or the end of the HTTP server.
    pub async fn shutdown_graceful(&self) {
        let Some(life) = self.shared.life().await.take() else {
            return;
        };
        match life.link {
            Link::Mqtt(link) => link.shutdown_graceful(&self.shared, &life.token).await,
            Link::Http(link) => link.shutdown_graceful(&self.shared, &life.token).await,
        }
        self.shared.disconnected();
    }

    /// Abrupt stop: the connection drops without a goodbye, work in progress is lost.
    pub async fn stop(&self) {
        let Some(life) = self.shared.life().await.take() else {
            return;
        };
        life.token.cancel();
        match life.link {
            Link::Mqtt(link) => link.join().await,
            Link::Http(link) => link.join().await,
        }
        self.shared.disconnected();
    }

    /// Abrupt stop, then a new "process": reconnects and asks for the baseline again.
    /// `keep_modules` false = a JVM restart (no modules); true keeps finished modules.
    pub async fn restart(&self, keep_modules: bool) -> anyhow::Result<()> {
        self.stop().await;
        self.shared.with(|c| {
            if keep_modules {
                c.registry.drop_unfinished(now_ms());
            } else {
                c.registry.reset(now_ms());
            }
        });
        self.shared.silent.send_replace(false);
        self.launch().await
    }

    /// Waits until `pred` holds (re-checked on every change of the base), at most `timeout`.
    pub async fn wait_until(&self, timeout: Duration, pred: impl Fn(&Base) -> bool) -> bool {
        let mut rx = self.shared.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return pred(self),
            }
        }
    }
}
