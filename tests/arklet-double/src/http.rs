//! The HTTP tunnel, after `arklet-core/.../api/tunnel/http` (`HttpTunnel`,
//! `HeartBeatScheduledMission`, `netty/NettyHttpServer`).
//!
//! Served API: `POST /<command>` with a JSON body; the answer is always HTTP 200 with the
//! JSON `Response` (`code`, `message`, `data`, `errorStackTrace`, `baseIdentity`; nulls
//! omitted), no `Content-Type` header (Netty's `DefaultFullHttpResponse` sets none) and the
//! connection closed after it. A non-POST gets 500 with a plain-text message; an unknown
//! command `CMD_NOT_FOUND`; a command that throws `CMD_PROCESS_INTERNAL_ERROR` with
//! `errorStackTrace`. Requests run concurrently (Netty worker threads), so two requests for
//! one biz meet the per-biz lock.
//!
//! Heartbeats: the `BaseStatus` JSON (no envelope, with `port`) POSTed to
//! `<controller>/heartbeat` at once and then every interval. `/queryBaseline` is protocol.md's
//! (no Arklet calls it): POSTed once at start with the base metadata; the answer (an array of
//! `{bizName,bizVersion,bizUrl}`) is installed like a baseline.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::Response;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::base::{Command, Shared, baseline_entries, thrown_of};
use crate::registry::{BizId, OpKind, OpOutcome};
use crate::wire::{self, Style};

/// One client for every base: a fleet of 1,000 shares its connection pool.
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    })
}

#[derive(Clone)]
struct Ctx {
    shared: Arc<Shared>,
    token: CancellationToken,
}

/// The running HTTP tunnel of one base process.
pub(crate) struct HttpLink {
    controller_url: String,
    server: JoinHandle<()>,
    heart: JoinHandle<()>,
}

/// Binds the Arklet port (keeping an earlier pick) and starts serving and heartbeating.
pub(crate) async fn start(
    shared: Arc<Shared>,
    controller_url: String,
    token: CancellationToken,
) -> anyhow::Result<HttpLink> {
    let port = shared.http_port.load(Ordering::SeqCst);
    let ip = shared.cfg.local_ip.clone();
    let listener = tokio::net::TcpListener::bind((ip.as_str(), port))
        .await
        .with_context(|| format!("binding the Arklet HTTP port {ip}:{port}"))?;
    let port = listener.local_addr()?.port();
    shared.http_port.store(port, Ordering::SeqCst);
    shared.connected();
    let ctx = Ctx {
        shared: shared.clone(),
        token: token.clone(),
    };
    let app = Router::new().fallback(handle).with_state(ctx.clone());
    let stop = token.clone();
    let server = tokio::spawn(async move {
        let serve = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serve.await {
            tracing::warn!("arklet http server ended: {e}");
        }
    });
    let url = controller_url.trim_end_matches('/').to_string();
    let heart = tokio::spawn(heartbeat_loop(ctx.clone(), url.clone(), port));
    if shared.cfg.http_query_baseline {
        tokio::spawn(query_baseline(ctx, url.clone()));
    }
    Ok(HttpLink {
        controller_url: url,
        server,
        heart,
    })
}

impl HttpLink {
    pub(crate) async fn join(self) {
        self.heart.abort();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }

    /// Arklet's `HttpTunnel.shutdown` just stops; the `deactivated` heartbeat is protocol.md's.
    pub(crate) async fn shutdown_graceful(self, shared: &Shared, token: &CancellationToken) {
        self.heart.abort();
        if shared.cfg.deactivated_heartbeat_on_shutdown {
            let port = shared.http_port.load(Ordering::SeqCst);
            let body = wire::http_heartbeat(&shared.cfg, port, "deactivated");
            if post(&self.controller_url, "/heartbeat", &body)
                .await
                .is_ok()
            {
                shared.heartbeat_sent();
            }
        }
        token.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.server).await;
    }
}

async fn post(url: &str, path: &str, body: &Value) -> anyhow::Result<reqwest::Response> {
    let resp = client()
        .post(format!("{url}{path}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .await?;
    Ok(resp)
}

async fn heartbeat_loop(ctx: Ctx, url: String, port: u16) {
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
        let body = wire::http_heartbeat(&ctx.shared.cfg, port, "activated");
        // HeartBeatScheduledMission logs a non-200 and carries on.
        match post(&url, "/heartbeat", &body).await {
            Ok(_) => ctx.shared.heartbeat_sent(),
            Err(e) => tracing::debug!(identity = %ctx.shared.cfg.identity, "heartbeat: {e}"),
        }
    }
}

async fn query_baseline(ctx: Ctx, url: String) {
    let meta = wire::query_baseline(&ctx.shared.cfg);
    let answer = tokio::select! {
        _ = ctx.token.cancelled() => return,
        r = post(&url, "/queryBaseline", &meta) => r,
    };
    let items = match answer {
        Ok(resp) => match resp.json::<Value>().await {
            Ok(Value::Array(items)) => items,
            other => {
                tracing::warn!(identity = %ctx.shared.cfg.identity, "queryBaseline answer is not an array: {other:?}");
                ctx.shared.malformed();
                return;
            }
        },
        Err(e) => {
            tracing::warn!(identity = %ctx.shared.cfg.identity, "queryBaseline failed: {e}");
            return;
        }
    };
    let reqs: Vec<_> = items.iter().map(wire::parse_install).collect();
    ctx.shared
        .record_command(Command::Baseline(baseline_entries(&reqs)), false);
    // No reply channel: the outcome shows in the registry.
    let _ = ctx.shared.run_batch(&reqs, &ctx.token).await;
}

fn reply(status: StatusCode, body: String) -> Response {
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    resp
}

fn json_reply(v: &Value) -> Response {
    reply(StatusCode::OK, v.to_string())
}

/// `NettyHttpHandler.channelRead0`.
async fn handle(State(ctx): State<Ctx>, method: Method, uri: Uri, body: Bytes) -> Response {
    let shared = &ctx.shared;
    if method != Method::POST {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "POST http request only supported by arklet".to_string(),
        );
    }
    let cmd = uri.path().trim_start_matches('/').to_string();
    let parsed: Value = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(v) if v.is_object() => v,
            _ => {
                // fastjson throws in validate(), outside the handler's try: no JSON answer.
                shared.malformed();
                return reply(StatusCode::INTERNAL_SERVER_ERROR, String::new());
            }
        }
    };
    let command = match cmd.as_str() {
        "installBiz" => {
            let r = wire::parse_install(&parsed);
            Command::Install {
                name: r.name.unwrap_or_default(),
                version: r.version.unwrap_or_default(),
                url: r.url.unwrap_or_default(),
                strategy: r.strategy,
            }
        }
        "uninstallBiz" => Command::Uninstall {
            name: wire::text_field(&parsed, "bizName").unwrap_or_default(),
            version: wire::text_field(&parsed, "bizVersion").unwrap_or_default(),
        },
        "queryAllBiz" => Command::QueryAllBiz,
        "health" => Command::Health,
        // help, switchBiz, queryBizOps and batchInstallBiz exist in Arklet but not here.
        _ => return json_reply(&wire::http_not_found()),
    };
    if shared.is_silent() {
        shared.record_command(command, true);
        let mut silent = shared.silent.subscribe();
        tokio::select! {
            _ = silent.wait_for(|s| !*s) => {}
            _ = ctx.token.cancelled() => {}
        }
        return reply(StatusCode::SERVICE_UNAVAILABLE, String::new());
    }
    shared.record_command(command, false);
    let path = format!("/{cmd}");
    let style = Style::from(shared.cfg.http_enum_style);
    let identity = Some(shared.cfg.identity.as_str()).filter(|_| shared.cfg.http_base_identity);
    let (answer, biz) = match cmd.as_str() {
        "installBiz" | "uninstallBiz" => {
            let kind = if cmd == "installBiz" {
                OpKind::Install
            } else {
                OpKind::Uninstall
            };
            if parsed.is_null() {
                // toJavaBean(null) → null input → NPE in validate, caught by the handler.
                let stack = format!(
                    "java.lang.NullPointerException\n\tat com.alipay.sofa.koupleless.arklet.core.command.CommandServiceImpl.process(CommandServiceImpl.java:{})\n",
                    if kind == OpKind::Install { 104 } else { 105 }
                );
                (wire::http_internal_error(None, &stack), None)
            } else {
                let name = wire::text_field(&parsed, "bizName");
                let version = wire::text_field(&parsed, "bizVersion");
                // The operation runs in its own task, as on Arklet's Netty worker thread: a
                // caller that hangs up (e.g. a client timeout) does not cut the install short.
                let (task_shared, token) = (ctx.shared.clone(), ctx.token.clone());
                let (task_name, task_version) = (name.clone(), version.clone());
                let req = wire::parse_install(&parsed);
                let op = tokio::spawn(async move {
                    if kind == OpKind::Install {
                        task_shared.run_install(&req, &token, true).await
                    } else {
                        let (n, v) = (task_name.as_deref(), task_version.as_deref());
                        task_shared.run_uninstall(n, v, &token).await
                    }
                });
                let outcome = op.await.ok().flatten();
                let Some(outcome) = outcome else {
                    return reply(StatusCode::SERVICE_UNAVAILABLE, String::new());
                };
                let biz = name.zip(version).map(|(n, v)| BizId::new(n, v));
                (op_answer(kind, &outcome, style, identity), biz)
            }
        }
        "queryAllBiz" => {
            let bizs = shared.read(|c| c.registry.bizs());
            let field = shared.cfg.http_state_records_field;
            let data: Vec<Value> = bizs
                .iter()
                .map(|b| wire::http_biz_info(b, field, style))
                .collect();
            let out = serde_json::json!({"code": "SUCCESS", "data": data});
            (wire::http_response(out, identity), None)
        }
        _ => {
            let bizs = shared.read(|c| c.registry.bizs());
            let out = wire::health_output(&shared.cfg, &bizs, style);
            (wire::http_response(out, identity), None)
        }
    };
    if shared.is_silent() {
        return reply(StatusCode::SERVICE_UNAVAILABLE, String::new());
    }
    shared.reply(&cmd, biz, &path, &answer, answer.clone());
    json_reply(&answer)
}

fn op_answer(kind: OpKind, outcome: &OpOutcome, style: Style, identity: Option<&str>) -> Value {
    match thrown_of(outcome) {
        Some(t) => wire::http_internal_error(t.message.as_deref(), &t.stack),
        None => wire::http_response(wire::op_output(kind, outcome, style), identity),
    }
}
