//! Tunnels: how the controller talks to bases. A tunnel turns wire messages into canonical
//! [`crate::model::BaseEvent`]s (sent to the controller's event queue) and carries
//! [`crate::model::BaseCommand`]s back.

pub mod arklet_codec;
pub mod codec;
pub mod http;
pub mod mqtt;

use futures::future::BoxFuture;
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
}
