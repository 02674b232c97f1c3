//! What the base module's unit tests share: tunnels that accept every command (one of them
//! keeps what it was given), and a heartbeat of base `b1`.

use futures::future::BoxFuture;

use crate::model::{BaseCommand, BaseHeartbeat, BaseLifecycle, BaseMetadata};
use crate::tunnel::{Tunnel, TunnelError};

/// A tunnel that sends nothing and never fails.
pub(crate) struct NoTunnel;

impl Tunnel for NoTunnel {
    fn name(&self) -> &str {
        "none"
    }
    fn send<'a>(
        &'a self,
        _: &'a str,
        _: &'a BaseCommand,
    ) -> BoxFuture<'a, Result<(), TunnelError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A tunnel that keeps every command it is given, with when.
#[derive(Default)]
pub(crate) struct RecordingTunnel {
    pub sent: std::sync::Mutex<Vec<(std::time::Instant, BaseCommand)>>,
}

impl Tunnel for RecordingTunnel {
    fn name(&self) -> &str {
        "recording"
    }
    fn send<'a>(
        &'a self,
        _: &'a str,
        cmd: &'a BaseCommand,
    ) -> BoxFuture<'a, Result<(), TunnelError>> {
        self.sent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((std::time::Instant::now(), cmd.clone()));
        Box::pin(async { Ok(()) })
    }
}

/// A heartbeat of base `b1` (IP 10.0.0.1).
pub(crate) fn heartbeat(lifecycle: BaseLifecycle) -> BaseHeartbeat {
    BaseHeartbeat {
        metadata: BaseMetadata {
            identity: "b1".into(),
            name: "base".into(),
            version: "1.0.0".into(),
            cluster_name: "c".into(),
        },
        local_ip: "10.0.0.1".into(),
        local_host_name: "b1".into(),
        port: None,
        lifecycle,
    }
}
