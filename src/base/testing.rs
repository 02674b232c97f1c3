//! What the base module's unit tests share: a tunnel that accepts every command, and a
//! heartbeat of base `b1`.

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
