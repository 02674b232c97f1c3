//! The Arklet MQTT tunnel of a simulated base: one client connection, subscriptions
//! restored on every (re)connect, heartbeats, and a worker that executes commands in order.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use module_controller::model::BaseCommand;
use module_controller::protocol::arklet::{envelope, now_ms};
use module_controller::protocol::mqtt_topics::{self, UpTopic};

use super::wire::{self, CommandError, Reply};
use super::{Shared, engine};

/// Largest message either way; baselines and module lists of big bases exceed rumqttc's 10 KiB default.
const MAX_PACKET: usize = 4 * 1024 * 1024;
const REQUEST_CAPACITY: usize = 256;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// How long a graceful shutdown waits for its goodbye to leave.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

/// A running MQTT connection of one base.
pub(super) struct MqttSession {
    cancel: CancellationToken,
    heartbeat_cancel: CancellationToken,
    conn: Arc<Conn>,
    event_loop: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    worker: JoinHandle<()>,
}

/// What the connection tasks share.
struct Conn {
    shared: Arc<Shared>,
    client: AsyncClient,
    connected: AtomicBool,
    /// queryBaseline goes out once per session, on the first connect.
    baseline_asked: AtomicBool,
    cancel: CancellationToken,
}

impl Conn {
    fn topic(&self, kind: UpTopic) -> String {
        mqtt_topics::topic(
            &self.shared.cfg.env,
            &self.shared.cfg.identity,
            kind.suffix(),
        )
    }

    /// Publishes `payload` in the envelope at QoS 1; waits for room in the request queue.
    async fn publish<T: Serialize>(&self, kind: UpTopic, payload: T) {
        let topic = self.topic(kind);
        match serde_json::to_vec(&envelope(payload)) {
            Ok(body) => {
                if let Err(e) = self
                    .client
                    .publish(&topic, QoS::AtLeastOnce, false, body)
                    .await
                {
                    tracing::warn!(base = %self.shared.log_id(), %topic, error = %e, "publish failed");
                }
            }
            Err(e) => {
                tracing::error!(base = %self.shared.log_id(), %topic, error = %e, "cannot serialise")
            }
        }
    }

    /// Heartbeats never wait: a beat that cannot be queued now is stale by the next one.
    fn try_heartbeat(&self) {
        if !self.connected.load(Ordering::Relaxed) || self.shared.is_silent() {
            return;
        }
        let topic = self.topic(UpTopic::Heart);
        let hb = wire::heartbeat(&self.shared.cfg, None, "ACTIVATED");
        match serde_json::to_vec(&envelope(hb)) {
            Ok(body) => {
                if let Err(e) = self
                    .client
                    .try_publish(&topic, QoS::AtLeastOnce, false, body)
                {
                    tracing::debug!(base = %self.shared.log_id(), error = %e, "heartbeat not queued");
                } else {
                    tracing::trace!(base = %self.shared.log_id(), "heartbeat");
                }
            }
            Err(e) => {
                tracing::error!(base = %self.shared.log_id(), error = %e, "cannot serialise heartbeat")
            }
        }
    }

    /// Runs after every CONNACK: the session is clean, so subscriptions must be made again.
    async fn on_connect(&self) {
        let cfg = &self.shared.cfg;
        let filters = [
            mqtt_topics::topic(&cfg.env, &cfg.identity, "+"),
            mqtt_topics::topic(&cfg.env, &cfg.identity, mqtt_topics::down::BASELINE),
        ];
        for filter in filters {
            if let Err(e) = self.client.subscribe(&filter, QoS::AtLeastOnce).await {
                tracing::warn!(base = %self.shared.log_id(), %filter, error = %e, "subscribe failed");
                return;
            }
        }
        if self.shared.is_silent() {
            return;
        }
        self.try_heartbeat();
        if !self.baseline_asked.swap(true, Ordering::SeqCst) {
            self.publish(UpTopic::QueryBaseline, wire::metadata(cfg))
                .await;
            tracing::info!(base = %self.shared.log_id(), "queryBaseline sent");
        }
    }

    /// Parses and dispatches one incoming publish; commands go to the worker in order.
    fn on_publish(&self, topic: &str, payload: &[u8], jobs: &mpsc::UnboundedSender<BaseCommand>) {
        let cfg = &self.shared.cfg;
        let prefix = mqtt_topics::topic(&cfg.env, &cfg.identity, "");
        let Some(command) = topic.strip_prefix(&prefix) else {
            tracing::debug!(base = %self.shared.log_id(), %topic, "message on a foreign topic ignored");
            return;
        };
        let cmd = match wire::parse_command(command, payload) {
            Ok(cmd) => cmd,
            Err(CommandError::Unknown(_)) => {
                tracing::debug!(base = %self.shared.log_id(), %topic, "unknown command ignored");
                return;
            }
            Err(e) => {
                tracing::warn!(base = %self.shared.log_id(), %topic, error = %e, "malformed command ignored");
                self.shared.update(|s| s.record_malformed());
                return;
            }
        };
        let dropped = self.shared.is_silent();
        tracing::debug!(base = %self.shared.log_id(), kind = cmd.kind(), dropped, "command received");
        self.shared
            .update(|s| s.record_command(cmd.clone(), dropped, now_ms()));
        if !dropped && jobs.send(cmd).is_err() {
            tracing::debug!(base = %self.shared.log_id(), "worker gone; command not executed");
        }
    }
}

impl MqttSession {
    /// Creates the client and spawns its tasks; connecting happens in the background.
    pub(super) fn start(
        shared: Arc<Shared>,
        host: String,
        port: u16,
        cancel: CancellationToken,
    ) -> Self {
        let cfg = &shared.cfg;
        let client_id = format!("{}@@@{}", cfg.client_prefix, cfg.identity);
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(MAX_PACKET, MAX_PACKET);
        if let Some(user) = &cfg.mqtt_username {
            opts.set_credentials(user.clone(), cfg.mqtt_password.clone().unwrap_or_default());
        }
        let (client, event_loop) = AsyncClient::new(opts, REQUEST_CAPACITY);
        let conn = Arc::new(Conn {
            shared: shared.clone(),
            client,
            connected: AtomicBool::new(false),
            baseline_asked: AtomicBool::new(false),
            cancel: cancel.clone(),
        });
        let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
        let heartbeat_cancel = cancel.child_token();
        MqttSession {
            event_loop: tokio::spawn(run_event_loop(conn.clone(), event_loop, jobs_tx)),
            worker: tokio::spawn(run_worker(conn.clone(), jobs_rx)),
            heartbeat: tokio::spawn(run_heartbeat(conn.clone(), heartbeat_cancel.clone())),
            heartbeat_cancel,
            cancel,
            conn,
        }
    }

    /// Sends a `DEACTIVATED` heartbeat, disconnects, and ends the tasks.
    pub(super) async fn graceful(self) {
        // Stop the periodic beat first, so no ACTIVATED beat can follow the goodbye.
        self.heartbeat_cancel.cancel();
        let _ = self.heartbeat.await;
        let goodbye = wire::heartbeat(&self.conn.shared.cfg, None, "DEACTIVATED");
        let id = self.conn.shared.log_id().to_string();
        // Requests leave in queue order, so the goodbye is written before the DISCONNECT.
        let sent = tokio::time::timeout(GOODBYE_TIMEOUT, async {
            self.conn.publish(UpTopic::Heart, goodbye).await;
            self.conn.client.disconnect().await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) {
            tracing::warn!(base = %id, "goodbye could not be queued in time");
        }
        let mut event_loop = self.event_loop;
        if tokio::time::timeout(GOODBYE_TIMEOUT, &mut event_loop)
            .await
            .is_err()
        {
            tracing::warn!(base = %id, "event loop did not finish disconnecting in time");
            self.cancel.cancel();
            let _ = event_loop.await;
        }
        self.cancel.cancel();
        let _ = self.worker.await;
    }

    /// Drops the connection without a goodbye.
    pub(super) async fn abort(self) {
        self.cancel.cancel();
        for task in [self.event_loop, self.heartbeat, self.worker] {
            let _ = task.await;
        }
    }
}

async fn run_event_loop(
    conn: Arc<Conn>,
    mut event_loop: EventLoop,
    jobs: mpsc::UnboundedSender<BaseCommand>,
) {
    let id = conn.shared.log_id().to_string();
    let mut backoff = BACKOFF_MIN;
    loop {
        let event = tokio::select! {
            _ = conn.cancel.cancelled() => break,
            ev = event_loop.poll() => ev,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                tracing::info!(base = %id, code = ?ack.code, "connected to broker");
                conn.connected.store(true, Ordering::Relaxed);
                backoff = BACKOFF_MIN;
                // Subscribing awaits queue space that only this loop frees: do it elsewhere.
                let c = conn.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = c.cancel.cancelled() => {}
                        _ = c.on_connect() => {}
                    }
                });
            }
            Ok(Event::Incoming(Packet::Publish(p))) => conn.on_publish(&p.topic, &p.payload, &jobs),
            Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                tracing::debug!(base = %id, "disconnect sent");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                let was_connected = conn.connected.swap(false, Ordering::Relaxed);
                if was_connected {
                    tracing::warn!(base = %id, error = %e, "broker connection lost; reconnecting");
                } else {
                    tracing::debug!(base = %id, error = %e, retry_in = ?backoff, "broker unreachable");
                }
                tokio::select! {
                    _ = conn.cancel.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    conn.connected.store(false, Ordering::Relaxed);
}

async fn run_worker(conn: Arc<Conn>, mut jobs: mpsc::UnboundedReceiver<BaseCommand>) {
    loop {
        let cmd = tokio::select! {
            _ = conn.cancel.cancelled() => break,
            cmd = jobs.recv() => match cmd { Some(c) => c, None => break },
        };
        let reply = tokio::select! {
            _ = conn.cancel.cancelled() => break,
            reply = async {
                let _turn = conn.shared.exec_lock.lock().await;
                engine::execute(&conn.shared, &cmd).await
            } => reply,
        };
        if conn.shared.is_silent() {
            tracing::debug!(base = %conn.shared.log_id(), kind = cmd.kind(), "silent: reply withheld");
            continue;
        }
        tokio::select! {
            _ = conn.cancel.cancelled() => break,
            _ = publish_reply(&conn, reply) => {}
        }
    }
}

async fn publish_reply(conn: &Conn, reply: Reply) {
    match reply {
        Reply::Operation(op) => conn.publish(UpTopic::BizOperation, op).await,
        Reply::Modules(list) => conn.publish(UpTopic::SimpleBiz, list).await,
        Reply::Health(h) => conn.publish(UpTopic::Health, h).await,
        Reply::Batch(b) => conn.publish(UpTopic::BatchInstallResponse, b).await,
    }
}

async fn run_heartbeat(conn: Arc<Conn>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(conn.shared.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
            _ = conn.shared.beat_now.notified() => tick.reset(),
        }
        conn.try_heartbeat();
    }
}
