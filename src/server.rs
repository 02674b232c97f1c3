//! The operator's endpoint: `/metrics`, `/healthz` (the process serves) and `/readyz` (every
//! watch listed and none failing).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::http::StatusCode;
use axum::routing::get;
use tracing::warn;

use crate::controller::Health;
use crate::metrics::Metrics;

/// Serves the endpoint on `addr`; returns the address bound.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Health,
) -> anyhow::Result<SocketAddr> {
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { m.render() }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let h = health.clone();
                async move {
                    match h.problem() {
                        None => (StatusCode::OK, "ready".to_string()),
                        Some(p) => (StatusCode::SERVICE_UNAVAILABLE, p),
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
