//! The HTTP tunnel (Arklet HTTP API): bases POST heartbeats to us; we call their Arklet API.
//! Install/uninstall are synchronous on the base, so each call runs in its own task and its
//! outcome comes back as events, like over MQTT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::model::{BaseCommand, BaseEvent, BaseMetadata, ModuleSpec, OperationKind, TunnelEvent};
use crate::protocol::arklet::{
    UNINSTALL_THEN_INSTALL, WireBaseMetadata, WireBizInfo, WireHealthData, WireHeartbeat,
    WireInstallBiz, WireOperationData, WireResponse, WireUninstallBiz, operation_result,
};
use crate::tunnel::{Tunnel, TunnelError, TunnelMetrics};

/// Default Arklet HTTP port of a base that does not say.
pub const DEFAULT_ARKLET_PORT: u16 = 1238;

/// Header marking a heartbeat one replica forwards to another (never forwarded again).
pub const FORWARDED_HEADER: &str = "x-module-controller-forwarded";

/// Where heartbeats of a base owned by another replica go (several replicas share the bases).
pub trait Forwarding: Send + Sync {
    /// The HTTP tunnel URL of the replica that owns `base_id`, when another replica does.
    fn owner_endpoint(&self, base_id: &str) -> Option<String>;
}

/// Answers a base's `queryBaseline`: the modules it should run.
pub trait BaselineProvider: Send + Sync {
    /// Modules for the base `metadata.identity`.
    fn baseline<'a>(&'a self, metadata: &'a BaseMetadata) -> BoxFuture<'a, Vec<ModuleSpec>>;
}

struct Inner {
    events: mpsc::Sender<BaseEvent>,
    endpoints: Mutex<HashMap<String, String>>,
    http: reqwest::Client,
    baseline: Arc<dyn BaselineProvider>,
    metrics: TunnelMetrics,
    /// Longest wait for a list or health answer.
    query_timeout: Duration,
    /// Longest wait for an install or uninstall answer.
    operation_timeout: Duration,
    forwarding: Option<Arc<dyn Forwarding>>,
    token: Option<String>,
}

/// Largest request body a base may send (heartbeats and baseline queries are a few hundred
/// bytes); larger ones are answered 413 without being read.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// How the HTTP tunnel listens and waits.
#[derive(Debug, Clone)]
pub struct HttpTunnelConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Longest wait for a list or health answer from a base.
    pub query_timeout: Duration,
    /// Longest wait for an install or uninstall answer.
    pub operation_timeout: Duration,
    /// When set, `/heartbeat` and `/queryBaseline` need `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// The HTTP tunnel handle.
pub struct HttpTunnel {
    inner: Arc<Inner>,
    addr: SocketAddr,
    cancel: CancellationToken,
}

impl HttpTunnel {
    /// Listens as `cfg` says and forwards events to `events`.
    pub async fn start(
        cfg: HttpTunnelConfig,
        events: mpsc::Sender<BaseEvent>,
        baseline: Arc<dyn BaselineProvider>,
        metrics: TunnelMetrics,
        forwarding: Option<Arc<dyn Forwarding>>,
    ) -> Result<HttpTunnel, TunnelError> {
        let HttpTunnelConfig {
            listen,
            query_timeout,
            operation_timeout,
            token,
        } = cfg;
        let http = reqwest::Client::builder()
            .connect_timeout(query_timeout)
            .build()
            .map_err(|e| TunnelError::Config(format!("HTTP client: {e}")))?;
        let inner = Arc::new(Inner {
            events,
            endpoints: Mutex::new(HashMap::new()),
            http,
            baseline,
            metrics,
            query_timeout,
            operation_timeout,
            forwarding,
            token,
        });
        let app = Router::new()
            .route("/heartbeat", post(heartbeat))
            .route("/queryBaseline", post(query_baseline))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(inner.clone());
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
            TunnelError::Config(format!("HTTP tunnel cannot listen on {listen}: {e}"))
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| TunnelError::Config(e.to_string()))?;
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(c.cancelled_owned());
            if let Err(e) = serve.await {
                warn!(error = %e, "HTTP tunnel server stopped");
            }
        });
        info!(%addr, "HTTP tunnel listening");
        Ok(HttpTunnel {
            inner,
            addr,
            cancel,
        })
    }

    /// Address the tunnel listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpTunnel {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn parse_body<T: DeserializeOwned>(inner: &Inner, body: &[u8]) -> Result<T, Box<Response>> {
    serde_json::from_slice(body).map_err(|e| {
        inner.metrics.count_received("malformed");
        Box::new((StatusCode::BAD_REQUEST, format!("bad JSON: {e}")).into_response())
    })
}

/// Whether the request carries the shared token (always, when none is configured).
fn authorized(inner: &Inner, headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = &inner.token else {
        return true;
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    // Same time whatever the first differing byte: the token is not guessable byte by byte.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn unauthorized(inner: &Inner) -> Response {
    inner.metrics.count_received("unauthorized");
    (StatusCode::UNAUTHORIZED, "missing or wrong bearer token").into_response()
}

async fn heartbeat(
    State(inner): State<Arc<Inner>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&inner, &headers) {
        return unauthorized(&inner);
    }
    let hb: WireHeartbeat = match parse_body(&inner, &body) {
        Ok(h) => h,
        Err(r) => return *r,
    };
    let hb = hb.to_model();
    let id = hb.metadata.identity.clone();
    if id.is_empty() {
        inner.metrics.count_received("malformed");
        return (StatusCode::BAD_REQUEST, "baseMetadata.identity is required").into_response();
    }
    // A base a load balancer sent to a replica that does not own it: the owner hears it too
    // (this replica keeps it as an observer, for a takeover).
    if !headers.contains_key(FORWARDED_HEADER)
        && let Some(owner) = inner
            .forwarding
            .as_ref()
            .and_then(|f| f.owner_endpoint(&id))
    {
        inner.forward(&owner, body.clone()).await;
    }
    let port = hb.port.unwrap_or(DEFAULT_ARKLET_PORT);
    inner
        .endpoints
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id.clone(), format!("http://{}:{}", hb.local_ip, port));
    inner.metrics.count_received("ok");
    if inner
        .events
        .send(BaseEvent {
            base_id: id,
            event: TunnelEvent::Heartbeat(hb),
        })
        .await
        .is_err()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "controller stopping").into_response();
    }
    (StatusCode::OK, "SUCCESS").into_response()
}

async fn query_baseline(
    State(inner): State<Arc<Inner>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if !authorized(&inner, &headers) {
        return unauthorized(&inner);
    }
    let md: WireBaseMetadata = match parse_body(&inner, &body) {
        Ok(m) => m,
        Err(r) => return *r,
    };
    let md: BaseMetadata = (&md).into();
    inner.metrics.count_received("ok");
    let specs = inner.baseline.baseline(&md).await;
    let body: Vec<WireInstallBiz> = specs.iter().map(WireInstallBiz::from).collect();
    axum::Json(body).into_response()
}

impl Inner {
    async fn forward(&self, owner: &str, body: axum::body::Bytes) {
        let url = format!("{}/heartbeat", owner.trim_end_matches('/'));
        let sent = self
            .http
            .post(&url)
            .header(FORWARDED_HEADER, "1")
            .bearer_auth(self.token.clone().unwrap_or_default())
            .header("content-type", "application/json")
            .body(body)
            .timeout(self.query_timeout)
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => self.metrics.count_sent("heartbeat_forwarded"),
            Ok(r) => {
                self.metrics.count_sent("heartbeat_forward_failed");
                debug!(%url, status = %r.status(), "heartbeat not taken by the owner");
            }
            Err(e) => {
                self.metrics.count_sent("heartbeat_forward_failed");
                debug!(%url, error = %e, "heartbeat not forwarded to the owner");
            }
        }
    }

    fn endpoint(&self, base_id: &str) -> Option<String> {
        self.endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(base_id)
            .cloned()
    }

    async fn call<B: serde::Serialize, T: DeserializeOwned + Default>(
        &self,
        base_id: &str,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<WireResponse<T>, String> {
        let url = format!(
            "{}/{path}",
            self.endpoint(base_id)
                .ok_or_else(|| format!("no endpoint known for base {base_id}"))?
        );
        let resp = self
            .http
            .post(&url)
            .json(body)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| format!("POST {url}: {e}"))?;
        if !status.is_success() {
            return Err(format!("POST {url}: HTTP {status}"));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("POST {url}: bad reply: {e}"))
    }

    async fn emit(&self, base_id: &str, event: TunnelEvent) {
        let _ = self
            .events
            .send(BaseEvent {
                base_id: base_id.to_string(),
                event,
            })
            .await;
    }

    async fn unreachable(&self, base_id: &str, reason: String) {
        warn!(base = base_id, %reason, "base unreachable over HTTP");
        self.emit(base_id, TunnelEvent::Unreachable { reason })
            .await;
    }

    async fn query_all(&self, base_id: &str) {
        // Over HTTP the list is `BizInfo` objects, not the MQTT `simpleBiz` shape.
        match self
            .call::<_, Vec<WireBizInfo>>(
                base_id,
                "queryAllBiz",
                &serde_json::json!({}),
                self.query_timeout,
            )
            .await
        {
            Ok(r) if r.code.eq_ignore_ascii_case("SUCCESS") => {
                let list = r.data.unwrap_or_default();
                self.emit(
                    base_id,
                    TunnelEvent::ModuleList(list.iter().map(WireBizInfo::to_model).collect()),
                )
                .await;
            }
            Ok(r) => debug!(base = base_id, code = %r.code, "queryAllBiz not successful"),
            Err(e) => self.unreachable(base_id, e).await,
        }
    }

    async fn operate(
        &self,
        base_id: &str,
        kind: OperationKind,
        spec: ModuleSpec,
        strategy: Option<&str>,
    ) {
        // Install and uninstall answer when done, which for a module that starts slowly takes
        // minutes: wait as long as the install deadline, not the short query timeout.
        let reply = match kind {
            OperationKind::Install => {
                let body = WireInstallBiz {
                    install_strategy: strategy.map(str::to_string),
                    ..WireInstallBiz::from(&spec)
                };
                self.call::<_, WireOperationData>(
                    base_id,
                    "installBiz",
                    &body,
                    self.operation_timeout,
                )
                .await
            }
            OperationKind::Uninstall => {
                let body = WireUninstallBiz {
                    biz_name: spec.name.clone(),
                    biz_version: spec.version.clone(),
                };
                self.call::<_, WireOperationData>(
                    base_id,
                    "uninstallBiz",
                    &body,
                    self.operation_timeout,
                )
                .await
            }
        };
        match reply {
            Ok(r) => {
                let result = operation_result(kind, &spec.name, &spec.version, &r);
                self.emit(base_id, TunnelEvent::Operation(result)).await;
                self.query_all(base_id).await;
            }
            Err(e) => self.unreachable(base_id, e).await,
        }
    }

    async fn execute(self: Arc<Self>, base_id: String, cmd: BaseCommand) {
        match cmd {
            BaseCommand::Install(spec) => {
                self.operate(&base_id, OperationKind::Install, spec, None)
                    .await
            }
            BaseCommand::Reinstall(spec) => {
                self.operate(
                    &base_id,
                    OperationKind::Install,
                    spec,
                    Some(UNINSTALL_THEN_INSTALL),
                )
                .await
            }
            BaseCommand::Uninstall(key) => {
                let spec = ModuleSpec {
                    name: key.name,
                    version: key.version,
                    url: String::new(),
                };
                self.operate(&base_id, OperationKind::Uninstall, spec, None)
                    .await
            }
            BaseCommand::Baseline(specs) => {
                for spec in specs {
                    self.operate(&base_id, OperationKind::Install, spec, None)
                        .await;
                }
            }
            BaseCommand::QueryAllModules => self.query_all(&base_id).await,
            BaseCommand::QueryHealth => {
                match self
                    .call::<_, WireHealthData>(
                        &base_id,
                        "health",
                        &serde_json::json!({}),
                        self.query_timeout,
                    )
                    .await
                {
                    Ok(r) => {
                        let wire = crate::protocol::arklet::WireHealth {
                            code: r.code,
                            message: r.message,
                            data: r.data,
                        };
                        if let Some(h) = wire.to_model() {
                            self.emit(&base_id, TunnelEvent::Health(h)).await;
                        }
                    }
                    Err(e) => self.unreachable(&base_id, e).await,
                }
            }
        }
    }
}

impl Tunnel for HttpTunnel {
    fn name(&self) -> &str {
        "http"
    }

    fn forget(&self, base_id: &str) {
        self.inner
            .endpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(base_id);
    }

    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move { self.cancel.cancel() })
    }

    fn send<'a>(
        &'a self,
        base_id: &'a str,
        cmd: &'a BaseCommand,
    ) -> BoxFuture<'a, Result<(), TunnelError>> {
        Box::pin(async move {
            if self.inner.endpoint(base_id).is_none() {
                return Err(TunnelError::UnknownBase(base_id.to_string()));
            }
            self.inner.metrics.count_sent(cmd.kind());
            tokio::spawn(self.inner.clone().execute(base_id.to_string(), cmd.clone()));
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    //! The tunnel's HTTP surface as a base (or anyone else) sees it.

    use super::*;

    struct NoBaseline;
    impl BaselineProvider for NoBaseline {
        fn baseline<'a>(&'a self, _: &'a BaseMetadata) -> BoxFuture<'a, Vec<ModuleSpec>> {
            Box::pin(async { Vec::new() })
        }
    }

    async fn tunnel(token: Option<&str>) -> (HttpTunnel, mpsc::Receiver<BaseEvent>, String) {
        let (tx, rx) = mpsc::channel(16);
        let t = HttpTunnel::start(
            HttpTunnelConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 0)),
                query_timeout: Duration::from_secs(2),
                operation_timeout: Duration::from_secs(2),
                token: token.map(str::to_string),
            },
            tx,
            Arc::new(NoBaseline),
            TunnelMetrics::default(),
            None,
        )
        .await
        .expect("listens");
        let url = format!("http://{}", t.local_addr());
        (t, rx, url)
    }

    const HEARTBEAT: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/http/heartbeat.json"
    ));

    #[tokio::test]
    async fn bad_requests_get_clear_answers_and_nothing_reaches_the_controller() {
        let (t, mut rx, url) = tunnel(None).await;
        let c = reqwest::Client::new();
        let post = |body: Vec<u8>| c.post(format!("{url}/heartbeat")).body(body).send();
        let r = post(b"{not json".to_vec()).await.expect("answer");
        assert_eq!(r.status(), 400);
        let r = post(br#"{"baseMetadata":{}}"#.to_vec())
            .await
            .expect("answer");
        assert_eq!(r.status(), 400, "identity required");
        let r = post(vec![b' '; MAX_BODY_BYTES + 1]).await.expect("answer");
        assert_eq!(r.status(), 413);
        let r = c
            .get(format!("{url}/heartbeat"))
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 405);
        assert!(rx.try_recv().is_err(), "nothing forwarded");
        let r = post(HEARTBEAT.as_bytes().to_vec()).await.expect("answer");
        assert_eq!(r.status(), 200);
        let ev = rx.recv().await.expect("heartbeat event");
        assert_eq!(ev.base_id, "192.168.1.10");
        assert_eq!(t.inner.metrics.received("malformed"), 2);
    }

    #[tokio::test]
    async fn with_a_token_only_bearers_of_it_are_heard() {
        let (_t, mut rx, url) = tunnel(Some("s3cret")).await;
        let c = reqwest::Client::new();
        for auth in [None, Some("Bearer wrong!"), Some("Bearer s3cre")] {
            let mut req = c.post(format!("{url}/heartbeat")).body(HEARTBEAT);
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            assert_eq!(req.send().await.expect("answer").status(), 401, "{auth:?}");
        }
        let r = c
            .post(format!("{url}/queryBaseline"))
            .body(r#"{"identity":"x"}"#)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 401);
        assert!(rx.try_recv().is_err());
        let r = c
            .post(format!("{url}/heartbeat"))
            .bearer_auth("s3cret")
            .body(HEARTBEAT)
            .send()
            .await
            .expect("answer");
        assert_eq!(r.status(), 200);
        assert!(rx.recv().await.is_some());
    }
}
