//! Every metric of a controller instance, registered once when it starts, so that every family
//! is in `/metrics` from the first scrape. Each concern defines its own families next to the
//! code that counts them; this struct only gathers them in one registry.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::apiserver::ApiMetrics;
use crate::apiserver::watch::WatchMetrics;
use crate::base::BaseMetrics;
use crate::peer::PeerMetrics;
use crate::tunnel::TunnelMetrics;

/// The metrics of one controller instance.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Apiserver writes.
    pub api: ApiMetrics,
    /// Watches.
    pub watches: WatchMetrics,
    /// The controller loop.
    pub controller: ControllerMetrics,
    /// Base tasks: commands sent to bases.
    pub bases: BaseMetrics,
    /// The MQTT tunnel.
    pub mqtt: TunnelMetrics,
    /// The HTTP tunnel.
    pub http: TunnelMetrics,
    /// Peer replica sync.
    pub peer: PeerMetrics,
    /// Base sharing between replicas.
    pub shards: ShardMetrics,
    /// The async runtime the controller runs on.
    pub runtime: RuntimeMetrics,
}

impl Metrics {
    /// Creates and registers every family (prefix `module_controller`).
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("module_controller");
        let api = ApiMetrics::register(&mut registry);
        let watches = WatchMetrics::register(&mut registry);
        let controller = ControllerMetrics::register(&mut registry);
        let bases = BaseMetrics::register(&mut registry);
        let mqtt = TunnelMetrics::register(&mut registry, "mqtt");
        let http = TunnelMetrics::register(&mut registry, "http");
        let peer = PeerMetrics::register(&mut registry);
        let shards = ShardMetrics::register(&mut registry);
        let runtime = RuntimeMetrics::register(&mut registry);
        Arc::new(Metrics {
            registry: Mutex::new(registry),
            api,
            watches,
            controller,
            bases,
            mqtt,
            http,
            peer,
            shards,
            runtime,
        })
    }

    /// Registers more families (e.g. the plugin host's, which exists before the controller).
    pub fn register_with<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut self.registry.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Text exposition of every family.
    pub fn render(&self) -> String {
        self.runtime.refresh();
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabel {
    reason: &'static str,
}

/// Counters of the controller loop.
#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    /// Bases with a running task.
    pub bases: Gauge,
    /// Base tasks ended, by why: a base that said goodbye is `drained`, one that fell silent
    /// `expired` (many expiries where bases left gracefully mean lost goodbyes).
    task_exits: Family<ExitLabel, Counter>,
    /// Pod watch events processed.
    pub pod_events: Counter,
}

impl ControllerMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ControllerMetrics::default();
        registry.register("bases", "Bases with a running task", m.bases.clone());
        registry.register(
            "base_actor_exits",
            "Base tasks ended, by reason (drained, expired, stopped)",
            m.task_exits.clone(),
        );
        for reason in ["drained", "expired", "stopped"] {
            let _ = m.task_exits.get_or_create(&ExitLabel { reason });
        }
        registry.register(
            "pod_watch_events",
            "Pod watch events processed",
            m.pod_events.clone(),
        );
        m
    }

    /// Counts a base task that ended for `reason` (`drained`, `expired`, `stopped`).
    pub fn task_exited(&self, reason: &'static str) {
        self.task_exits.get_or_create(&ExitLabel { reason }).inc();
    }

    /// Base tasks that ended for `reason` so far.
    pub fn task_exits(&self, reason: &'static str) -> u64 {
        self.task_exits.get_or_create(&ExitLabel { reason }).get()
    }
}

/// Counters of base sharing.
#[derive(Clone, Debug, Default)]
pub struct ShardMetrics {
    /// Bases this replica drives.
    pub owned: Gauge,
    /// Bases taken over from another (dead or leaving) replica.
    pub takeovers: Counter,
    /// Bases handed over to other replicas (rebalancing, shutdown).
    pub handovers: Counter,
    /// Ownership Lease renewals that failed.
    pub renewal_failures: Counter,
}

impl ShardMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = ShardMetrics::default();
        registry.register(
            "shard_owned_bases",
            "Bases this replica drives",
            m.owned.clone(),
        );
        registry.register(
            "shard_takeovers",
            "Bases taken over from another replica",
            m.takeovers.clone(),
        );
        registry.register(
            "shard_handovers",
            "Bases handed over to other replicas",
            m.handovers.clone(),
        );
        registry.register(
            "shard_lease_renewal_failures",
            "Ownership Lease renewals that failed",
            m.renewal_failures.clone(),
        );
        m
    }
}

/// Gauges of the async runtime the controller was started on. Every base holds tasks (its
/// own, its connections'); a count that does not come back down after bases leave is a leak
/// an operator can see.
#[derive(Debug, Default)]
pub struct RuntimeMetrics {
    /// Tasks alive on the runtime (refreshed at each scrape).
    pub tasks: Gauge,
    handle: Mutex<Option<tokio::runtime::Handle>>,
}

impl RuntimeMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = RuntimeMetrics::default();
        registry.register(
            "runtime_alive_tasks",
            "Tasks alive on the controller's async runtime",
            m.tasks.clone(),
        );
        m
    }

    /// Reports the tasks of `handle`'s runtime from now on (the controller calls this with its
    /// own runtime at start; a scrape may come from another one).
    pub fn watch(&self, handle: tokio::runtime::Handle) {
        *self.handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Reads the runtime's task count into the gauge.
    pub fn refresh(&self) {
        if let Some(h) = self
            .handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            let n = i64::try_from(h.metrics().num_alive_tasks()).unwrap_or(i64::MAX);
            self.tasks.set(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Metrics;

    fn tasks(m: &Metrics) -> i64 {
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix("module_controller_runtime_alive_tasks "))
            .and_then(|v| v.trim().parse().ok())
            .expect("runtime_alive_tasks in the exposition")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_runtime_task_gauge_follows_the_watched_runtime() {
        let m = Metrics::new();
        assert_eq!(tasks(&m), 0, "no runtime watched yet");
        m.runtime.watch(tokio::runtime::Handle::current());
        let before = tasks(&m);
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        let t = tokio::spawn(async move { s.cancelled().await });
        assert_eq!(tasks(&m), before + 1);
        stop.cancel();
        t.await.expect("task ends");
        assert_eq!(tasks(&m), before);
    }
}
