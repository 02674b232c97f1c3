//! Tunnels: how the controller talks to bases. A tunnel turns wire messages into canonical
//! [`crate::model::BaseEvent`]s (sent to the controller's event queue) and carries
//! [`crate::model::BaseCommand`]s back.

pub mod arklet_codec;
pub mod codec;
#[cfg(test)]
mod fixtures;
pub mod http;
pub mod mqtt;

use futures::future::BoxFuture;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use thiserror::Error;

use crate::model::BaseCommand;

/// Why a command could not be handed to a base.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum TunnelError {
    /// The command could not be encoded.
    #[error("encode: {0}")]
    Encode(String),
    /// The transport refused it (broker queue closed, base unreachable, ...).
    #[error("transport: {0}")]
    Transport(String),
    /// The tunnel does not know the base.
    #[error("unknown base {0}")]
    UnknownBase(String),
    /// Bad tunnel configuration.
    #[error("configuration: {0}")]
    Config(String),
}

/// A transport to bases. `send` hands the command over; the outcome arrives later as an event.
pub trait Tunnel: Send + Sync {
    /// Name (`mqtt`, `http`).
    fn name(&self) -> &str;
    /// Sends one command to a base.
    fn send<'a>(
        &'a self,
        base_id: &'a str,
        cmd: &'a BaseCommand,
    ) -> BoxFuture<'a, Result<(), TunnelError>>;
    /// The tunnel label of a base's VNode: the tunnel name, or the adapter the base speaks.
    fn label_for(&self, _base_id: &str) -> String {
        self.name().to_string()
    }
    /// Forgets what the tunnel keeps about a base that is gone (endpoints, codec bindings).
    fn forget(&self, _base_id: &str) {}
    /// Stops the tunnel (disconnects, stops listening).
    fn stop(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

/// Counters of one tunnel.
#[derive(Clone, Debug, Default)]
pub struct TunnelMetrics {
    received: Family<ResultLabel, Counter>,
    sent: Family<ResultLabel, Counter>,
    /// Broker connections lost and retried (MQTT).
    pub reconnects: Counter,
    /// 1 while connected to the broker (MQTT).
    pub connected: Gauge,
}

impl TunnelMetrics {
    /// Registers the families of tunnel `name` (`mqtt`, `http`) in `registry`.
    pub fn register(registry: &mut Registry, name: &str) -> Self {
        let m = TunnelMetrics::default();
        registry.register(
            format!("{name}_messages_received"),
            "Messages received from bases, by outcome (ok or the drop reason)",
            m.received.clone(),
        );
        registry.register(
            format!("{name}_commands_published"),
            "Commands sent to bases, by command or failure",
            m.sent.clone(),
        );
        if name == "mqtt" {
            registry.register(
                "mqtt_reconnects",
                "Broker connections lost and retried",
                m.reconnects.clone(),
            );
            registry.register(
                "mqtt_connected",
                "1 while connected to the broker",
                m.connected.clone(),
            );
        }
        let _ = m.received("ok");
        m
    }

    /// Counts a received message by outcome (`ok` or a drop reason).
    pub fn count_received(&self, result: &str) {
        self.received
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }

    /// Messages received with `result` so far.
    pub fn received(&self, result: &str) -> u64 {
        self.received
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .get()
    }

    /// Counts a command handed to the transport (`install`, …) or a failure (`encode_failed`).
    pub fn count_sent(&self, result: &str) {
        self.sent
            .get_or_create(&ResultLabel {
                result: result.to_string(),
            })
            .inc();
    }
}
