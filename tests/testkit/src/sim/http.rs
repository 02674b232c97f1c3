//! The Arklet HTTP tunnel of a simulated base: the Arklet API served on its own port,
//! heartbeats POSTed to the controller, and the baseline pulled once at start.
//!
//! Silence over HTTP models a hung JVM: the socket still accepts, but requests get no
//! answer until the base resumes (then 503, the command was dropped) or stops (connection
//! closed after a 503).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use module_controller::model::BaseCommand;
use module_controller::protocol::arklet::{WireResponse, now_ms};
use module_controller::protocol::mqtt_topics::down;

use super::wire::{self, Reply};
use super::{Shared, engine};

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

/// A running HTTP base: Arklet server plus heartbeat and baseline tasks.
pub(super) struct HttpSession {
    shared: Arc<Shared>,
    cancel: CancellationToken,
    heartbeat_cancel: CancellationToken,
    client: reqwest::Client,
    controller_url: String,
    port: u16,
    server: JoinHandle<()>,
    heartbeat: JoinHandle<()>,
    baseline: JoinHandle<()>,
}

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    cancel: CancellationToken,
}

impl HttpSession {
    /// Binds the Arklet port (the same one across restarts) and spawns the tasks.
    pub(super) async fn start(
        shared: Arc<Shared>,
        controller_url: String,
        listen_port: u16,
        cancel: CancellationToken,
    ) -> anyhow::Result<Self> {
        let port = match shared.http_port.load(Ordering::Relaxed) {
            0 => listen_port,
            bound => bound,
        };
        let listener = bind(&shared.cfg.local_ip, port).await?;
        let port = listener
            .local_addr()
            .context("arklet listener address")?
            .port();
        shared.http_port.store(port, Ordering::Relaxed);

        let app = App {
            shared: shared.clone(),
            cancel: cancel.clone(),
        };
        let router = Router::new()
            .route("/installBiz", post(install))
            .route("/uninstallBiz", post(uninstall))
            .route("/queryAllBiz", post(query_all))
            .route("/health", post(health))
            .with_state(app);
        let server_cancel = cancel.clone();
        let id = shared.log_id().to_string();
        let server = tokio::spawn(async move {
            let serve = axum::serve(listener, router)
                .with_graceful_shutdown(server_cancel.cancelled_owned());
            if let Err(e) = serve.await {
                tracing::warn!(base = %id, error = %e, "arklet server failed");
            }
        });

        let client = reqwest::Client::builder()
            .timeout(
                shared
                    .cfg
                    .heartbeat_interval
                    .clamp(Duration::from_millis(500), Duration::from_secs(5)),
            )
            .build()
            .context("building the HTTP client")?;
        let controller_url = controller_url.trim_end_matches('/').to_string();
        let heartbeat_cancel = cancel.child_token();
        let (first_beat_tx, first_beat_rx) = oneshot::channel();
        let heartbeat = tokio::spawn(run_heartbeat(
            shared.clone(),
            client.clone(),
            controller_url.clone(),
            port,
            heartbeat_cancel.clone(),
            first_beat_tx,
        ));
        let baseline = tokio::spawn(run_query_baseline(
            shared.clone(),
            client.clone(),
            controller_url.clone(),
            cancel.clone(),
            first_beat_rx,
        ));
        tracing::info!(base = %shared.log_id(), port, "arklet HTTP API listening");
        Ok(HttpSession {
            shared,
            cancel,
            heartbeat_cancel,
            client,
            controller_url,
            port,
            server,
            heartbeat,
            baseline,
        })
    }

    /// POSTs a `DEACTIVATED` heartbeat, then stops serving.
    pub(super) async fn graceful(self) {
        self.heartbeat_cancel.cancel();
        let _ = self.heartbeat.await;
        let goodbye = wire::heartbeat(&self.shared.cfg, Some(self.port), "DEACTIVATED");
        let url = format!("{}/heartbeat", self.controller_url);
        match tokio::time::timeout(
            GOODBYE_TIMEOUT,
            self.client.post(&url).json(&goodbye).send(),
        )
        .await
        {
            Ok(Ok(resp)) => {
                tracing::debug!(base = %self.shared.log_id(), status = %resp.status(), "goodbye heartbeat sent")
            }
            Ok(Err(e)) => {
                tracing::warn!(base = %self.shared.log_id(), error = %e, "goodbye heartbeat failed")
            }
            Err(_) => tracing::warn!(base = %self.shared.log_id(), "goodbye heartbeat timed out"),
        }
        Self::finish(self.cancel, self.server, self.baseline).await;
    }

    /// Stops serving and heartbeating without a goodbye.
    pub(super) async fn abort(self) {
        self.heartbeat_cancel.cancel();
        let _ = self.heartbeat.await;
        Self::finish(self.cancel, self.server, self.baseline).await;
    }

    async fn finish(cancel: CancellationToken, server: JoinHandle<()>, baseline: JoinHandle<()>) {
        cancel.cancel();
        let _ = baseline.await;
        // Handlers return as soon as the session is cancelled, so draining is quick; the
        // bound only guards against a client that never reads its response.
        let mut server = server;
        if tokio::time::timeout(GOODBYE_TIMEOUT, &mut server)
            .await
            .is_err()
        {
            server.abort();
        }
    }
}

/// Binds the reported local IP when this host owns it, else loopback (tests often report
/// made-up IPs for many simulated bases on one host).
async fn bind(local_ip: &str, port: u16) -> anyhow::Result<TcpListener> {
    if let Ok(ip) = local_ip.parse::<IpAddr>() {
        match TcpListener::bind(SocketAddr::new(ip, port)).await {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                tracing::debug!(%local_ip, "local IP not on this host; binding loopback");
            }
            Err(e) => {
                return Err(e).with_context(|| format!("binding arklet port {local_ip}:{port}"));
            }
        }
    }
    TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
        .await
        .with_context(|| format!("binding arklet port 127.0.0.1:{port}"))
}

async fn run_heartbeat(
    shared: Arc<Shared>,
    client: reqwest::Client,
    controller_url: String,
    port: u16,
    cancel: CancellationToken,
    first_beat: oneshot::Sender<()>,
) {
    let url = format!("{controller_url}/heartbeat");
    let mut first_beat = Some(first_beat);
    let mut tick = tokio::time::interval(shared.cfg.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
            _ = shared.beat_now.notified() => tick.reset(),
        }
        if shared.is_silent() {
            continue;
        }
        let hb = wire::heartbeat(&shared.cfg, Some(port), "ACTIVATED");
        let sent = tokio::select! {
            _ = cancel.cancelled() => break,
            r = client.post(&url).json(&hb).send() => r,
        };
        match sent {
            Ok(resp) if resp.status().is_success() => {
                tracing::trace!(base = %shared.log_id(), "heartbeat")
            }
            Ok(resp) => {
                tracing::debug!(base = %shared.log_id(), status = %resp.status(), "heartbeat refused")
            }
            Err(e) => tracing::debug!(base = %shared.log_id(), error = %e, "heartbeat failed"),
        }
        if let Some(tx) = first_beat.take() {
            let _ = tx.send(());
        }
    }
}

/// Asks the controller for the baseline (after the first heartbeat, so the controller
/// already knows the base) and installs it; retries while the controller is unreachable.
async fn run_query_baseline(
    shared: Arc<Shared>,
    client: reqwest::Client,
    controller_url: String,
    cancel: CancellationToken,
    first_beat: oneshot::Receiver<()>,
) {
    let id = shared.log_id().to_string();
    tokio::select! {
        _ = cancel.cancelled() => return,
        _ = first_beat => {}
    }
    let url = format!("{controller_url}/queryBaseline");
    let metadata = wire::metadata(&shared.cfg);
    let mut backoff = BACKOFF_MIN;
    let mut silent = shared.silent.subscribe();
    let body = loop {
        // A silent base sends nothing, not even this.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = silent.wait_for(|s| !*s) => {}
        }
        let attempt = async {
            let resp = client.post(&url).json(&metadata).send().await?;
            let status = resp.status();
            let body = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, body))
        };
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            r = attempt => r,
        };
        match result {
            Ok((status, body)) if status.is_success() => break body,
            Ok((status, _)) if status.is_client_error() => {
                tracing::warn!(base = %id, %status, "controller refused queryBaseline; not retrying");
                return;
            }
            Ok((status, _)) => {
                tracing::debug!(base = %id, %status, "queryBaseline failed; retrying")
            }
            Err(e) => tracing::debug!(base = %id, error = %e, "queryBaseline failed; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    };
    let specs = match wire::parse_baseline(&body) {
        Ok(specs) => specs,
        Err(e) => {
            tracing::warn!(base = %id, error = %e, "controller sent a malformed baseline; ignored");
            shared.update(|s| s.record_malformed());
            return;
        }
    };
    tracing::info!(base = %id, count = specs.len(), "baseline received");
    let cmd = BaseCommand::Baseline(specs);
    shared.update(|s| s.record_command(cmd.clone(), false, now_ms()));
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = async {
            let _turn = shared.exec_lock.lock().await;
            engine::execute(&shared, &cmd).await
        } => {}
    }
}

async fn install(State(app): State<App>, body: Bytes) -> Response {
    handle(app, down::INSTALL_BIZ, body).await
}

async fn uninstall(State(app): State<App>, body: Bytes) -> Response {
    handle(app, down::UNINSTALL_BIZ, body).await
}

async fn query_all(State(app): State<App>, body: Bytes) -> Response {
    handle(app, down::QUERY_ALL_BIZ, body).await
}

async fn health(State(app): State<App>, body: Bytes) -> Response {
    handle(app, down::HEALTH, body).await
}

async fn handle(app: App, command: &str, body: Bytes) -> Response {
    let id = app.shared.cfg.identity.clone();
    let cmd = match wire::parse_command(command, &body) {
        Ok(cmd) => cmd,
        Err(e) => {
            tracing::warn!(base = %id, command, error = %e, "malformed command ignored");
            app.shared.update(|s| s.record_malformed());
            return failure(StatusCode::BAD_REQUEST, &id, e.to_string());
        }
    };
    let dropped = app.shared.is_silent();
    tracing::debug!(base = %id, kind = cmd.kind(), dropped, "command received");
    app.shared
        .update(|s| s.record_command(cmd.clone(), dropped, now_ms()));
    if dropped {
        return hang(&app).await;
    }
    let reply = tokio::select! {
        _ = app.cancel.cancelled() => {
            return failure(StatusCode::SERVICE_UNAVAILABLE, &id, "base stopped".into());
        }
        reply = async {
            let _turn = app.shared.exec_lock.lock().await;
            engine::execute(&app.shared, &cmd).await
        } => reply,
    };
    if app.shared.is_silent() {
        return hang(&app).await;
    }
    match http_body(reply, &id) {
        Ok(v) => (StatusCode::OK, axum::Json(v)).into_response(),
        Err(e) => {
            tracing::error!(base = %id, error = %e, "cannot serialise reply");
            failure(StatusCode::INTERNAL_SERVER_ERROR, &id, e.to_string())
        }
    }
}

/// What an unreachable base "answers": nothing until it resumes or stops.
async fn hang(app: &App) -> Response {
    let mut silent = app.shared.silent.subscribe();
    tokio::select! {
        _ = app.cancel.cancelled() => {}
        _ = silent.wait_for(|s| !*s) => {}
    }
    failure(
        StatusCode::SERVICE_UNAVAILABLE,
        &app.shared.cfg.identity,
        "base was unreachable; command dropped".into(),
    )
}

fn failure(status: StatusCode, id: &str, message: String) -> Response {
    let body: WireResponse<()> = WireResponse {
        code: "FAILED".into(),
        message: Some(message),
        data: None,
        error_stack_trace: None,
        base_identity: Some(id.to_string()),
    };
    (status, axum::Json(body)).into_response()
}

/// The Arklet HTTP reply `{code,message,data,errorStackTrace,baseIdentity}` for a reply.
fn http_body(reply: Reply, id: &str) -> serde_json::Result<serde_json::Value> {
    fn with_id<T: Serialize>(
        mut r: WireResponse<T>,
        id: &str,
    ) -> serde_json::Result<serde_json::Value> {
        r.base_identity = Some(id.to_string());
        serde_json::to_value(r)
    }
    match reply {
        Reply::Operation(op) => with_id(op.response, id),
        Reply::Modules(list) => with_id(
            WireResponse {
                code: "SUCCESS".into(),
                message: None,
                data: Some(list),
                error_stack_trace: None,
                base_identity: None,
            },
            id,
        ),
        Reply::Health(h) => with_id(
            WireResponse {
                code: h.code,
                message: h.message,
                data: h.data,
                error_stack_trace: None,
                base_identity: None,
            },
            id,
        ),
        Reply::Batch(b) => with_id(b.response, id),
    }
}
