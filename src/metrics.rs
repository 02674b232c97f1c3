//! Every metric of a controller instance, registered once when it starts, so that every family
//! is in `/metrics` from the first scrape. Each concern defines its own families next to the
//! code that counts them; this struct only gathers them in one registry.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

use crate::apiserver::ApiMetrics;
use crate::apiserver::watch::WatchMetrics;
use crate::base::BaseMetrics;
use crate::controller::ControllerMetrics;
use crate::controller::sharing::ShardMetrics;
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
