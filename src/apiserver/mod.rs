//! Every conversation with the kube-apiserver lives here: Node, Lease, Pod, Deployment writes,
//! Events, and the watches that feed the controller. Nothing else in the crate calls the
//! apiserver; the decisions that lead to these calls are pure and live elsewhere.

pub mod deployments;
pub mod events;
pub mod leases;
pub mod nodes;
pub mod pods;
pub mod watch;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::sync::{Semaphore, SemaphorePermit};

pub use events::EventSink;

/// Field manager of every write (server-side apply and patches).
pub const MANAGER: &str = "module-controller";

/// Node and Lease writes in flight at once across all VNodes. Separate from the pod writes so
/// that a burst of them never delays a base's Lease, and the reverse. At 1,000 bases the
/// Leases alone are 100 writes a second; at 100–300 ms each that keeps 10–30 in flight.
const NODE_WRITE_LIMIT: usize = 48;

/// Module work (pod status writes, pod removals, pod Events) in flight at once across all
/// VNodes: a guard that keeps a burst (a restart that rewrites every pod) from flooding the
/// apiserver, far above what a steady stream of pods needs, so that no pod waits behind other
/// bases' pods. Each VNode has its own `VNODE_WORKER_NUM` within it.
const MODULE_WRITE_LIMIT: usize = 64;

/// Longest wait for the apiserver's answer to one write. A frozen or partitioned apiserver
/// keeps connections open and answers nothing; without a deadline a base task (and the write
/// permit it holds) would wait for it, and stop talking to its base meanwhile.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabel {
    kind: &'static str,
    result: &'static str,
}

/// Apiserver write counters, by object kind and result.
#[derive(Clone, Debug, Default)]
pub struct ApiMetrics {
    writes: Family<WriteLabel, Counter>,
}

impl ApiMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ApiMetrics::default();
        registry.register(
            "apiserver_writes",
            "Writes to the apiserver, by object kind and result",
            m.writes.clone(),
        );
        for kind in [
            "node",
            "node_status",
            "node_delete",
            "lease",
            "pod_status",
            "pod_delete",
            "event",
            "deployment_scale",
            "owner_lease",
        ] {
            for result in ["ok", "error"] {
                let _ = m.writes.get_or_create(&WriteLabel { kind, result });
            }
        }
        m
    }

    /// Counts one write.
    pub fn count(&self, kind: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.writes
            .get_or_create(&WriteLabel { kind, result })
            .inc();
    }

    /// Writes of `kind` that succeeded so far.
    pub fn ok(&self, kind: &'static str) -> u64 {
        self.writes
            .get_or_create(&WriteLabel { kind, result: "ok" })
            .get()
    }

    /// Writes of `kind` that failed so far.
    pub fn failed(&self, kind: &'static str) -> u64 {
        self.writes
            .get_or_create(&WriteLabel {
                kind,
                result: "error",
            })
            .get()
    }
}

/// What every writer needs: the client, the write limits and the counters.
#[derive(Clone)]
pub struct Api {
    /// The client.
    pub client: kube::Client,
    /// Module work in flight at once across all VNodes ([`MODULE_WRITE_LIMIT`]).
    module_writes: Arc<Semaphore>,
    /// `VNODE_WORKER_NUM`: a VNode's own module writes in flight at once, as the reference's
    /// per-VNode workers.
    base_workers: usize,
    node_writes: Arc<Semaphore>,
    metrics: ApiMetrics,
    events: EventSink,
    /// False while the readiness probe gets no answer: writes fail at once instead of each
    /// waiting out its deadline (they are retried with backoff by their callers).
    reachable: Arc<AtomicBool>,
}

impl Api {
    /// Builds the writer context; `base_workers` is `VNODE_WORKER_NUM`.
    pub fn new(
        client: kube::Client,
        base_workers: usize,
        instance: &str,
        metrics: ApiMetrics,
    ) -> Self {
        Api {
            events: EventSink::new(client.clone(), instance),
            client,
            module_writes: Arc::new(Semaphore::new(MODULE_WRITE_LIMIT)),
            base_workers: base_workers.max(1),
            node_writes: Arc::new(Semaphore::new(NODE_WRITE_LIMIT)),
            metrics,
            reachable: Arc::new(AtomicBool::new(true)),
        }
    }

    /// The flag the apiserver probe keeps (see [`watch::spawn_probe`]).
    pub fn reachability(&self) -> Arc<AtomicBool> {
        self.reachable.clone()
    }

    /// One request under [`WRITE_DEADLINE`]; fails at once while the apiserver is known not
    /// to answer.
    async fn timed<T>(
        &self,
        request: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        if !self.reachable.load(Ordering::Relaxed) {
            return Err(unanswered("the apiserver is not answering; write deferred"));
        }
        match tokio::time::timeout(WRITE_DEADLINE, request).await {
            Ok(r) => r,
            Err(_) => Err(unanswered(&format!(
                "no answer from the apiserver within {} s",
                WRITE_DEADLINE.as_secs()
            ))),
        }
    }

    /// How many of one VNode's module writes may be in flight at once (`VNODE_WORKER_NUM`).
    pub fn base_workers(&self) -> usize {
        self.base_workers
    }

    /// The write counters.
    pub fn metrics(&self) -> &ApiMetrics {
        &self.metrics
    }

    async fn module_permit(&self) -> Option<SemaphorePermit<'_>> {
        // The semaphore is never closed; `None` only if it were, and then writes go unbounded.
        self.module_writes.acquire().await.ok()
    }

    async fn node_permit(&self) -> Option<SemaphorePermit<'_>> {
        self.node_writes.acquire().await.ok()
    }

    fn counted<T>(&self, kind: &'static str, r: Result<T, kube::Error>) -> Result<T, kube::Error> {
        self.metrics.count(kind, r.is_ok());
        r
    }

    /// Counts a write whose target may already be gone (404, or 409 for a failed uid
    /// precondition): the goal is reached then, and nothing was written.
    fn counted_gone_ok<T>(
        &self,
        kind: &'static str,
        r: Result<T, kube::Error>,
    ) -> Result<(), kube::Error> {
        match r {
            Ok(_) => {
                self.metrics.count(kind, true);
                Ok(())
            }
            Err(e) if is_not_found(&e) || is_conflict(&e) => Ok(()),
            Err(e) => {
                self.metrics.count(kind, false);
                Err(e)
            }
        }
    }
}

fn unanswered(why: &str) -> kube::Error {
    kube::Error::Service(why.to_string().into())
}

/// Whether an apiserver error is a 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    status_code(e) == Some(404)
}

/// Whether an apiserver error is a 409 (conflict or failed precondition).
pub fn is_conflict(e: &kube::Error) -> bool {
    status_code(e) == Some(409)
}

/// The HTTP status of an apiserver error answer, if the apiserver answered.
pub fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// An `ObjectReference` to any object (the subject of an Event).
pub fn object_ref<K: kube::Resource<DynamicType = ()>>(
    obj: &K,
) -> k8s_openapi::api::core::v1::ObjectReference {
    obj.object_ref(&())
}
