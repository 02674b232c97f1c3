//! Where calls that must not run on the async runtime go (plugin calls: untrusted code with a
//! CPU budget): a bounded pool of threads behind this trait. The plugin host provides it;
//! callers (tunnels, base tasks, the batch gates) only see the trait.

use std::sync::Arc;

use futures::future::BoxFuture;
use tokio::sync::oneshot;

/// A job for the pool.
pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// A bounded pool of threads for blocking calls.
pub trait Offload: Send + Sync {
    /// Runs `job` on a worker; resolves once it ran, or with why it could not (queue full,
    /// pool gone, the job panicked).
    fn run_job(&self, job: Job) -> BoxFuture<'_, Result<(), String>>;
}

/// A shared pool.
pub type Pool = Arc<dyn Offload>;

/// Runs `f` on `pool` and returns its result, without blocking the caller's thread.
pub async fn run<R: Send + 'static>(
    pool: &dyn Offload,
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, String> {
    let (tx, rx) = oneshot::channel();
    pool.run_job(Box::new(move || {
        let _ = tx.send(f());
    }))
    .await?;
    rx.await
        .map_err(|_| "the call produced no result".to_string())
}
