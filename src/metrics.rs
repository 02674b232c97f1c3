//! Every metric of a controller instance, registered once when it starts, so that every family
//! is in `/metrics` from the first scrape. Each concern defines its own families next to the
//! code that counts them; this struct only gathers them in one registry.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
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
        })
    }

    /// Registers more families (e.g. the plugin host's, which exists before the controller).
    pub fn register_with<T>(&self, f: impl FnOnce(&mut Registry) -> T) -> T {
        f(&mut self.registry.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Text exposition of every family.
    pub fn render(&self) -> String {
        let reg = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        if encode(&mut out, &reg).is_err() {
            out.clear();
        }
        out
    }
}

/// Counters of the controller loop.
#[derive(Clone, Debug, Default)]
pub struct ControllerMetrics {
    /// Bases with a running task.
    pub bases: Gauge,
    /// Base tasks ended (drained, expired).
    pub task_exits: Counter,
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
            "Base tasks ended (drained, expired)",
            m.task_exits.clone(),
        );
        registry.register(
            "pod_watch_events",
            "Pod watch events processed",
            m.pod_events.clone(),
        );
        m
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
