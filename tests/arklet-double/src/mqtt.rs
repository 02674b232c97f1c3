//! The MQTT tunnel, after `arklet-tunnel-mqtt` (`PahoMqttClient`, `MqttMessageHandler`,
//! `PlaybackBaselineHandler`, `HeartBeatScheduledTask`).
//!
//! Threading, as in Arklet: the paho callback hands every message to a thread pool
//! (`ExecutorServiceManager`: 5 core threads, a queue of 100, 10 max, caller-runs), so up to
//! five commands run at the same time and the rest wait in arrival order. Every MQTT tunnel
//! since the first (July 2024, commit 67201f30) does this, so protocol.md's "one at a time"
//! matches no release: a slow install does *not* delay a `queryAllBiz` that arrives after it,
//! and a second command for the same biz meets the per-biz lock and is rejected at once (five
//! slow installs at once do fill the pool and delay everything behind them). The double keeps
//! the 5 workers and an unbounded FIFO queue; the growth to 10 threads and
//! caller-runs (which only happen with 100 queued commands) are not modelled.
//!
//! Connection: client id `<prefix>@@@<identity>`, clean session, automatic reconnect; every
//! (re)connect subscribes `koupleless_<env>/<id>/+` and `.../base/baseline` at QoS 1; only
//! the first connect of a process publishes `base/queryBaseline` and starts the heartbeat
//! (`onConnectCompleted`'s `run.compareAndSet(false, true)`). A publish while disconnected
//! is lost (paho throws; nothing is buffered).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, SubscribeFilter};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::base::{Command, Shared, baseline_entries, now_ms};
use crate::config::BaselineReply;
use crate::registry::{BizId, OpKind};
use crate::wire::{self, Style};

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The command thread pool of one base: `max` workers, FIFO queue.
struct Pool {
    max: usize,
    state: Mutex<(usize, VecDeque<Job>)>,
}

impl Pool {
    fn submit(self: &Arc<Self>, job: Job) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.0 < self.max {
            st.0 += 1;
            drop(st);
            let pool = self.clone();
            tokio::spawn(async move { pool.work(job).await });
        } else {
            st.1.push_back(job);
        }
    }

    async fn work(self: Arc<Self>, first: Job) {
        let mut job = first;
        loop {
            job.await;
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match st.1.pop_front() {
                Some(next) => job = next,
                None => {
                    st.0 -= 1;
                    return;
                }
            }
        }
    }
}

/// What command jobs need.
struct Ctx {
    shared: Arc<Shared>,
    client: AsyncClient,
    connected: AtomicBool,
    token: CancellationToken,
    pool: Arc<Pool>,
    prefix: String,
}

impl Ctx {
    /// Publishes `data` in the envelope on `<prefix>/<suffix>`, unless disconnected (lost,
    /// as with paho) or silent.
    async fn publish(&self, suffix: &str, data: &Value) -> bool {
        if !self.connected.load(Ordering::SeqCst) || self.shared.is_silent() {
            return false;
        }
        let body = wire::envelope(now_ms(), data.clone()).to_string();
        let topic = format!("{}/{suffix}", self.prefix);
        self.client
            .publish(topic, QoS::AtLeastOnce, false, body)
            .await
            .is_ok()
    }

    /// The same without waiting for room in the request queue (used from the event loop).
    fn try_publish(&self, suffix: &str, data: &Value) -> bool {
        let body = wire::envelope(now_ms(), data.clone()).to_string();
        let topic = format!("{}/{suffix}", self.prefix);
        self.client
            .try_publish(topic, QoS::AtLeastOnce, false, body)
            .is_ok()
    }
}

/// The running MQTT tunnel of one base process.
pub(crate) struct MqttLink {
    ctx: Arc<Ctx>,
    events: JoinHandle<()>,
    heart: JoinHandle<()>,
}

/// Connects and returns once the command subscriptions are acknowledged.
pub(crate) async fn start(
    shared: Arc<Shared>,
    host: String,
    port: u16,
    token: CancellationToken,
) -> anyhow::Result<MqttLink> {
    let cfg = &shared.cfg;
    let broker = format!("{host}:{port}");
    let mut opts = MqttOptions::new(cfg.client_id(), host, port);
    opts.set_keep_alive(cfg.mqtt_keep_alive);
    opts.set_clean_session(true);
    // Baselines and module lists of big bases exceed rumqttc's 10 KiB default.
    opts.set_max_packet_size(4 << 20, 4 << 20);
    if let Some(user) = &cfg.mqtt_username {
        opts.set_credentials(user.clone(), cfg.mqtt_password.clone().unwrap_or_default());
    }
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    if cfg.tcp_nodelay {
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
    }
    let ctx = Arc::new(Ctx {
        prefix: cfg.topic_prefix(),
        shared: shared.clone(),
        client,
        connected: AtomicBool::new(false),
        token: token.clone(),
        pool: Arc::new(Pool {
            max: cfg.mqtt_workers.max(1),
            state: Mutex::new((0, VecDeque::new())),
        }),
    });
    let (ready_tx, ready_rx) = oneshot::channel();
    let (hb_tx, hb_rx) = oneshot::channel();
    let events = tokio::spawn(event_loop(ctx.clone(), eventloop, ready_tx, hb_tx));
    let heart = tokio::spawn(heartbeat_loop(ctx.clone(), hb_rx));
    let link = MqttLink { ctx, events, heart };
    match tokio::time::timeout(Duration::from_secs(10), ready_rx).await {
        Ok(Ok(())) => Ok(link),
        _ => {
            token.cancel();
            link.join().await;
            Err(anyhow!(
                "base {} could not connect and subscribe to {broker} within 10 s",
                shared.cfg.identity
            ))
        }
    }
}

impl MqttLink {
    pub(crate) async fn join(self) {
        self.ctx.token.cancel();
        let _ = self.events.await;
        let _ = self.heart.await;
    }

    /// Arklet's `MqttTunnel.shutdown` only disconnects; the `deactivated` heartbeat is
    /// protocol.md's (see `BaseConfig::deactivated_heartbeat_on_shutdown`).
    pub(crate) async fn shutdown_graceful(self, shared: &Shared, token: &CancellationToken) {
        if shared.cfg.deactivated_heartbeat_on_shutdown {
            let hb = wire::mqtt_heartbeat(&shared.cfg, "deactivated");
            if self.ctx.publish("base/heart", &hb).await {
                shared.heartbeat_sent();
            }
        }
        let _ = self.ctx.client.disconnect().await;
        let events = self.events;
        // The event loop ends when DISCONNECT has been written; don't hang on a dead broker.
        let _ = tokio::time::timeout(Duration::from_secs(5), events).await;
        token.cancel();
        let _ = self.heart.await;
    }
}

async fn event_loop(
    ctx: Arc<Ctx>,
    mut eventloop: rumqttc::EventLoop,
    ready: oneshot::Sender<()>,
    heart_start: oneshot::Sender<()>,
) {
    let mut ready = Some(ready);
    let mut heart_start = Some(heart_start);
    loop {
        // The token is the only other branch, so poll() is cancelled at most once, at the end.
        let ev = tokio::select! {
            _ = ctx.token.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                ctx.connected.store(true, Ordering::SeqCst);
                let filters = vec![
                    SubscribeFilter::new(format!("{}/+", ctx.prefix), QoS::AtLeastOnce),
                    SubscribeFilter::new(format!("{}/base/baseline", ctx.prefix), QoS::AtLeastOnce),
                ];
                if let Err(e) = ctx.client.try_subscribe_many(filters) {
                    tracing::warn!(identity = %ctx.shared.cfg.identity, "subscribe failed: {e}");
                }
                if let Some(tx) = heart_start.take() {
                    let q = wire::query_baseline(&ctx.shared.cfg);
                    ctx.try_publish("base/queryBaseline", &q);
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                ctx.shared.connected();
                if let Some(tx) = ready.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => on_message(&ctx, &p.topic, &p.payload),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(e) => {
                if ctx.connected.swap(false, Ordering::SeqCst) {
                    ctx.shared.disconnected();
                }
                tracing::debug!(identity = %ctx.shared.cfg.identity, "mqtt connection: {e}");
                // Paho's automatic reconnect starts after 1 s.
                tokio::select! {
                    _ = ctx.token.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    if ctx.connected.swap(false, Ordering::SeqCst) {
        ctx.shared.disconnected();
    }
}

async fn heartbeat_loop(ctx: Arc<Ctx>, start: oneshot::Receiver<()>) {
    tokio::select! {
        _ = ctx.token.cancelled() => return,
        r = start => if r.is_err() { return },
    }
    let mut tick = tokio::time::interval(ctx.shared.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.token.cancelled() => return,
            _ = tick.tick() => {}
            _ = ctx.shared.heartbeat_now.notified() => {}
        }
        if ctx.shared.is_silent() {
            continue;
        }
        if !ctx.connected.load(Ordering::SeqCst) {
            if ctx.shared.cfg.heartbeat_stops_after_publish_failure {
                tracing::info!(identity = %ctx.shared.cfg.identity, "heartbeat task died (as Arklet's does)");
                return;
            }
            continue;
        }
        let hb = wire::mqtt_heartbeat(&ctx.shared.cfg, "activated");
        if ctx.publish("base/heart", &hb).await {
            ctx.shared.heartbeat_sent();
        }
    }
}

/// `PahoMqttCallback.messageArrived` + `MqttMessageHandler.handleCommand`: the command is the
/// last topic segment; a body that does not parse is dropped without an answer (the parse
/// happens outside Arklet's try blocks).
fn on_message(ctx: &Arc<Ctx>, topic: &str, payload: &[u8]) {
    let cmd = topic.rsplit('/').next().unwrap_or_default();
    let parsed: Option<Value> = if payload.iter().all(u8::is_ascii_whitespace) {
        Some(Value::Null)
    } else {
        serde_json::from_slice(payload).ok()
    };
    let shared = &ctx.shared;
    let (command, job): (Command, Job) = match (cmd, parsed) {
        ("installBiz", Some(v)) if v.is_object() => {
            let req = wire::parse_install(&v);
            let command = Command::Install {
                name: req.name.clone().unwrap_or_default(),
                version: req.version.clone().unwrap_or_default(),
                url: req.url.clone().unwrap_or_default(),
                strategy: req.strategy.clone(),
            };
            let c = ctx.clone();
            (
                command,
                Box::pin(async move {
                    let Some(outcome) = c.shared.run_install(&req, &c.token, true).await else {
                        return;
                    };
                    let biz = req.name.clone().zip(req.version.clone());
                    answer_op(&c, OpKind::Install, &v, biz, &outcome).await;
                }),
            )
        }
        ("uninstallBiz", Some(v)) if v.is_object() => {
            let name = wire::text_field(&v, "bizName");
            let version = wire::text_field(&v, "bizVersion");
            let command = Command::Uninstall {
                name: name.clone().unwrap_or_default(),
                version: version.clone().unwrap_or_default(),
            };
            let c = ctx.clone();
            (
                command,
                Box::pin(async move {
                    let run = c
                        .shared
                        .run_uninstall(name.as_deref(), version.as_deref(), &c.token);
                    let Some(outcome) = run.await else { return };
                    let biz = name.zip(version);
                    answer_op(&c, OpKind::Uninstall, &v, biz, &outcome).await;
                }),
            )
        }
        ("queryAllBiz", Some(v)) if v.is_object() || v.is_null() => {
            let c = ctx.clone();
            (
                Command::QueryAllBiz,
                Box::pin(async move {
                    let bizs = c.shared.read(|core| core.registry.bizs());
                    let (suffix, data) = if c.shared.cfg.legacy_biz_topic {
                        ("base/biz", wire::legacy_biz(&bizs))
                    } else {
                        ("base/simpleBiz", wire::simple_biz(&bizs))
                    };
                    if c.publish(suffix, &data).await {
                        c.shared
                            .reply("queryAllBiz", None, suffix, &data, data.clone());
                    }
                }),
            )
        }
        ("health", Some(v)) if v.is_object() || v.is_null() => {
            let c = ctx.clone();
            (
                Command::Health,
                Box::pin(async move {
                    let bizs = c.shared.read(|core| core.registry.bizs());
                    let data = wire::health_output(&c.shared.cfg, &bizs, Style::Name);
                    if c.publish("base/health", &data).await {
                        c.shared
                            .reply("health", None, "base/health", &data, data.clone());
                    }
                }),
            )
        }
        ("baseline", Some(Value::Array(items))) => {
            let reqs: Vec<_> = items.iter().map(wire::parse_install).collect();
            let command = Command::Baseline(baseline_entries(&reqs));
            let c = ctx.clone();
            (
                command,
                Box::pin(async move { play_baseline(&c, reqs).await }),
            )
        }
        _ => {
            tracing::debug!(identity = %shared.cfg.identity, topic, "unparsable or unsupported command");
            shared.malformed();
            return;
        }
    };
    if shared.is_silent() {
        shared.record_command(command, true);
        return;
    }
    shared.record_command(command, false);
    let token = ctx.token.clone();
    ctx.pool.submit(Box::pin(async move {
        if !token.is_cancelled() {
            job.await;
        }
    }));
}

/// Publishes one `base/bizOperation`, the only answer to install/uninstall.
async fn answer_op(
    c: &Ctx,
    kind: OpKind,
    request: &Value,
    biz: Option<(String, String)>,
    outcome: &crate::registry::OpOutcome,
) {
    let output = wire::op_output(kind, outcome, Style::Name);
    let data = wire::biz_operation(
        kind,
        request.get("bizName"),
        request.get("bizVersion"),
        output.clone(),
    );
    if c.publish("base/bizOperation", &data).await {
        let biz = biz.map(|(n, v)| BizId::new(n, v));
        c.shared
            .reply(kind.id(), biz, "base/bizOperation", &output, data);
    }
}

/// `base/baseline`: what follows depends on the Arklet release (`BaseConfig::baseline_reply`).
async fn play_baseline(c: &Ctx, reqs: Vec<crate::registry::InstallReq>) {
    match c.shared.cfg.baseline_reply {
        BaselineReply::BatchInstallResponse => {
            let Some(result) = c.shared.run_batch(&reqs, &c.token).await else {
                return;
            };
            let output = match result {
                Ok(results) => wire::batch_output(&results),
                Err(whole) => wire::op_output(OpKind::BatchInstall, &whole, Style::Name),
            };
            let data = wire::batch_install_response(output.clone());
            let suffix = "base/batchInstallBizResponse";
            if c.publish(suffix, &data).await {
                c.shared
                    .reply("batchInstallBiz", None, suffix, &output, data);
            }
        }
        BaselineReply::SimpleBiz | BaselineReply::Nothing => {
            // One by one through the installBiz command (per-biz lock); failures are skipped.
            for r in &reqs {
                if c.shared.run_install(r, &c.token, true).await.is_none() {
                    return;
                }
            }
            if c.shared.cfg.baseline_reply == BaselineReply::SimpleBiz {
                let data = wire::simple_biz(&c.shared.read(|core| core.registry.bizs()));
                if c.publish("base/simpleBiz", &data).await {
                    c.shared
                        .reply("queryAllBiz", None, "base/simpleBiz", &data, data.clone());
                }
            }
        }
    }
}

/// Checks that a broker accepts connections (used by the binary).
pub async fn probe(host: &str, port: u16) -> anyhow::Result<()> {
    tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("connecting to MQTT broker {host}:{port}"))?;
    Ok(())
}
