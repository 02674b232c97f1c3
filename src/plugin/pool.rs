//! A bounded blocking pool for plugin calls: a fixed number of worker threads and a bounded
//! queue. A plugin call may take its whole CPU budget (tens of milliseconds); run inline it
//! would stall an async worker or the MQTT event loop for that long. Callers await the result
//! instead; when the queue is full they are refused at once ([`PoolError::Overloaded`]) rather
//! than queueing without bound behind a slow plugin.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Condvar, Mutex};

use thiserror::Error;
use tokio::sync::oneshot;
use tracing::error;

use super::telemetry::PluginMetrics;

/// Why a job did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PoolError {
    /// The queue was full; the job was not run. Counted in `plugin_pool_overloaded_total`.
    #[error("plugin call queue full ({0} waiting); call refused")]
    Overloaded(usize),
    /// The job panicked (the worker survives).
    #[error("plugin call panicked: {0}")]
    Panicked(String),
    /// The pool was shut down (its host was dropped) before the job ran.
    #[error("plugin call pool shut down")]
    Closed,
}

type Job = Box<dyn FnOnce() + Send + 'static>;

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    capacity: usize,
    metrics: PluginMetrics,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Closes the queue when the last [`PluginPool`] handle goes; workers finish what is queued,
/// then exit.
struct Closer(Arc<Shared>);

impl Drop for Closer {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.ready.notify_all();
    }
}

/// Worker threads for plugin calls. Cheap to clone; the workers stop when the last clone is
/// dropped.
#[derive(Clone)]
pub struct PluginPool {
    shared: Arc<Shared>,
    workers: usize,
    _closer: Arc<Closer>,
}

impl std::fmt::Debug for PluginPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginPool")
            .field("workers", &self.workers)
            .field("capacity", &self.shared.capacity)
            .finish_non_exhaustive()
    }
}

impl PluginPool {
    /// Starts `workers` threads (at least one) with room for `queue` waiting jobs (at least
    /// one). Fails only when the OS refuses a thread.
    pub fn new(workers: usize, queue: usize, metrics: PluginMetrics) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            capacity: queue.max(1),
            metrics,
        });
        let closer = Arc::new(Closer(shared.clone()));
        let workers = workers.max(1);
        for i in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("plugin-call-{i}"))
                .spawn(move || work(&s))?;
        }
        Ok(PluginPool {
            shared,
            workers,
            _closer: closer,
        })
    }

    /// Runs `f` on a pool worker and awaits its result without blocking the caller's thread.
    /// Refused at once with [`PoolError::Overloaded`] when the queue is full. Dropping the
    /// returned future before the job starts skips the job.
    pub async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            if tx.is_closed() {
                return; // the caller gave up waiting: spare the plugin call
            }
            let result = catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p));
            let _ = tx.send(result);
        });
        {
            let mut q = self.shared.lock();
            if q.closed {
                return Err(PoolError::Closed);
            }
            if q.jobs.len() >= self.shared.capacity {
                drop(q);
                self.shared.metrics.pool_overloaded();
                return Err(PoolError::Overloaded(self.shared.capacity));
            }
            q.jobs.push_back(job);
            self.shared.metrics.pool_queued(1);
        }
        self.shared.ready.notify_one();
        match rx.await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(msg)) => Err(PoolError::Panicked(msg)),
            Err(_) => Err(PoolError::Closed),
        }
    }

    /// Number of worker threads.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// How many jobs may wait for a worker.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

fn work(shared: &Shared) {
    loop {
        let job = {
            let mut q = shared.lock();
            loop {
                if let Some(job) = q.jobs.pop_front() {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        shared.metrics.pool_queued(-1);
        // Jobs catch their own panics; this guard only keeps the worker alive should the
        // result hand-off itself panic.
        if catch_unwind(AssertUnwindSafe(job)).is_err() {
            error!("plugin pool job panicked outside its own guard");
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_string())
}

impl crate::offload::Offload for PluginPool {
    fn run_job(
        &self,
        job: crate::offload::Job,
    ) -> futures::future::BoxFuture<'_, Result<(), String>> {
        Box::pin(async move { self.run(job).await.map_err(|e| e.to_string()) })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    use super::*;

    fn pool(workers: usize, queue: usize) -> (PluginPool, Registry) {
        let mut registry = Registry::with_prefix("module_controller");
        let metrics = PluginMetrics::register(&mut registry);
        let pool = PluginPool::new(workers, queue, metrics).expect("pool threads");
        (pool, registry)
    }

    /// A job that holds its worker until `release` is sent to, and says when it started.
    fn blocker(
        pool: &PluginPool,
    ) -> (
        tokio::task::JoinHandle<Result<(), PoolError>>,
        mpsc::Sender<()>,
        mpsc::Receiver<()>,
    ) {
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let (started_tx, started_rx) = mpsc::channel::<()>();
        let p = pool.clone();
        let handle = tokio::spawn(async move {
            p.run(move || {
                let _ = started_tx.send(());
                let _ = release_rx.recv_timeout(Duration::from_secs(10));
            })
            .await
        });
        (handle, release_tx, started_rx)
    }

    #[tokio::test(flavor = "current_thread")]
    async fn returns_results_from_worker_threads() {
        let (pool, _) = pool(2, 4);
        let caller = std::thread::current().id();
        let (value, worker) = pool
            .run(move || (6 * 7, std::thread::current().id()))
            .await
            .expect("job runs");
        assert_eq!(value, 42);
        assert_ne!(worker, caller, "the job ran on a pool thread");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_callers_runtime_thread_keeps_running_while_a_job_blocks() {
        let (pool, _) = pool(1, 4);
        let (blocked, release, started) = blocker(&pool);
        tokio::task::yield_now().await;
        // On a single-threaded runtime, this timer only fires if the blocked job is not
        // holding the runtime's one thread.
        tokio::time::sleep(Duration::from_millis(20)).await;
        started
            .recv_timeout(Duration::from_secs(5))
            .expect("the job runs meanwhile");
        release.send(()).expect("release");
        assert_eq!(blocked.await.expect("task"), Ok(()));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_refuses_and_counts() {
        let (pool, registry) = pool(1, 2);
        let (blocked, release, started) = blocker(&pool);
        tokio::task::yield_now().await;
        started
            .recv_timeout(Duration::from_secs(5))
            .expect("the blocker occupies the only worker");
        // Two jobs fit in the queue behind it...
        let queued: Vec<_> = (0..2)
            .map(|i| {
                let p = pool.clone();
                tokio::spawn(async move { p.run(move || i).await })
            })
            .collect();
        while pool.shared.lock().jobs.len() < 2 {
            tokio::task::yield_now().await;
        }
        // ...a third does not.
        assert_eq!(pool.run(|| 99).await, Err(PoolError::Overloaded(2)));
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("module_controller_plugin_pool_overloaded_total 1"),
            "{text}"
        );
        assert!(
            text.contains("module_controller_plugin_pool_queued 2"),
            "{text}"
        );
        // Control: once the worker is free, the queued jobs run and room comes back.
        release.send(()).expect("release");
        assert_eq!(blocked.await.expect("task"), Ok(()));
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await.expect("task"), Ok(i));
        }
        assert_eq!(pool.run(|| 99).await, Ok(99));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_panicking_job_does_not_kill_its_worker() {
        let (pool, _) = pool(1, 4);
        let r = pool.run(|| -> u32 { panic!("job blew up") }).await;
        assert_eq!(r, Err(PoolError::Panicked("job blew up".into())));
        // The only worker is still there.
        assert_eq!(pool.run(|| 7).await, Ok(7));
        let r = pool
            .run(|| -> u32 { panic!("{}", String::from("again")) })
            .await;
        assert_eq!(r, Err(PoolError::Panicked("again".into())));
        assert_eq!(pool.run(|| 8).await, Ok(8));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn workers_exit_when_the_pool_is_dropped() {
        let (pool, _) = pool(2, 4);
        let weak = Arc::downgrade(&pool.shared);
        assert_eq!(pool.run(|| 1).await, Ok(1));
        drop(pool);
        // Each worker holds the shared state until it exits.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while weak.strong_count() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "workers still running"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
