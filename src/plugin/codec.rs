//! A tunnel-adapter plugin version as a [`MessageCodec`]. Routing (`handles`) uses the topic
//! filters the plugin returned at load, so no plugin call is spent on messages for others.

use std::sync::Arc;

use crate::model::{
    BaseCommand, BaseEvent, BaseHealth, BaseHeartbeat, BaseLifecycle, BaseMetadata, BizState,
    ModuleSpec, ModuleStatus, OperationKind, OperationResult, TunnelEvent,
};
use crate::tunnel::codec::{DecodeError, EncodeError, MessageCodec, OutMessage, topic_matches};

use super::bindings::wit_tunnel as w;
use super::faults::{Reporter, reasons};
use super::kind::PluginKind;
use super::loader::{Hook, PluginVersion};

/// Calls one tunnel-adapter version.
pub(crate) struct WasmCodec {
    version: Arc<PluginVersion>,
    reporter: Reporter,
    subscriptions: Vec<String>,
}

impl WasmCodec {
    /// Wraps a loaded tunnel-adapter version.
    pub(crate) fn new(version: Arc<PluginVersion>, reporter: Reporter) -> Self {
        let subscriptions = match &version.hook {
            Hook::Tunnel { subscriptions, .. } => subscriptions.clone(),
            _ => Vec::new(),
        };
        WasmCodec {
            version,
            reporter,
            subscriptions,
        }
    }

    /// The loaded version this codec calls.
    pub(crate) fn version(&self) -> &Arc<PluginVersion> {
        &self.version
    }

    fn fail(&self, subject: Option<&str>, reason: &str, message: String) -> String {
        let name = &self.version.name;
        self.reporter
            .fail(name, PluginKind::TunnelAdapter, subject, reason, message)
    }

    fn record_call(&self, elapsed: std::time::Duration) {
        let name = &self.version.name;
        self.reporter
            .metrics
            .call(name, PluginKind::TunnelAdapter, elapsed);
    }
}

fn metadata(m: w::BaseMetadata) -> BaseMetadata {
    BaseMetadata {
        identity: m.identity,
        name: m.name,
        version: m.version,
        cluster_name: m.cluster_name,
    }
}

fn event(e: w::TunnelEvent) -> TunnelEvent {
    match e {
        w::TunnelEvent::Heartbeat(h) => TunnelEvent::Heartbeat(BaseHeartbeat {
            metadata: metadata(h.metadata),
            local_ip: h.local_ip,
            local_host_name: h.local_host_name,
            port: h.port,
            lifecycle: match h.lifecycle {
                w::Lifecycle::Activated => BaseLifecycle::Activated,
                w::Lifecycle::Deactivated => BaseLifecycle::Deactivated,
            },
        }),
        w::TunnelEvent::QueryBaseline(m) => TunnelEvent::QueryBaseline(metadata(m)),
        w::TunnelEvent::Health(h) => TunnelEvent::Health(BaseHealth {
            max_metaspace: h.max_metaspace,
            committed_metaspace: h.committed_metaspace,
            used_metaspace: h.used_metaspace,
        }),
        w::TunnelEvent::ModuleList(ms) => TunnelEvent::ModuleList(
            ms.into_iter()
                .map(|m| ModuleStatus {
                    name: m.name,
                    version: m.version,
                    state: BizState::parse(&m.state),
                    change_time_ms: m.change_time_ms,
                    reason: m.reason,
                    message: m.message,
                })
                .collect(),
        ),
        w::TunnelEvent::Operation(o) => {
            let kind = match o.kind {
                w::OperationKind::Install => OperationKind::Install,
                w::OperationKind::Uninstall => OperationKind::Uninstall,
            };
            // Adapters report Arklet-style answers; the same rules tell a conflict or an
            // already-reached goal from a failure.
            let outcome = crate::protocol::arklet::classify(
                kind,
                o.success,
                o.error_code.as_deref(),
                &[Some(o.message.as_str())],
            );
            TunnelEvent::Operation(OperationResult {
                kind,
                name: o.name,
                version: o.version,
                outcome,
            })
        }
        w::TunnelEvent::Unreachable(reason) => TunnelEvent::Unreachable { reason },
    }
}

fn spec(m: &ModuleSpec) -> w::ModuleSpec {
    w::ModuleSpec {
        name: m.name.clone(),
        version: m.version.clone(),
        url: m.url.clone(),
    }
}

fn command(c: &BaseCommand) -> w::Command {
    match c {
        // WIT 1.0 has no install strategy: an adapter gets a plain install.
        BaseCommand::Install(m) | BaseCommand::Reinstall(m) => w::Command::Install(spec(m)),
        BaseCommand::Uninstall(k) => w::Command::Uninstall(w::ModuleKey {
            name: k.name.clone(),
            version: k.version.clone(),
        }),
        BaseCommand::QueryAllModules => w::Command::QueryAllModules,
        BaseCommand::QueryHealth => w::Command::QueryHealth,
        BaseCommand::Baseline(ms) => w::Command::Baseline(ms.iter().map(spec).collect()),
    }
}

impl MessageCodec for WasmCodec {
    fn name(&self) -> &str {
        &self.version.name
    }

    fn subscriptions(&self) -> Vec<String> {
        self.subscriptions.clone()
    }

    fn handles(&self, topic: &str) -> bool {
        self.subscriptions.iter().any(|f| topic_matches(f, topic))
    }

    fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Vec<BaseEvent>, DecodeError> {
        let Hook::Tunnel { indices, .. } = &self.version.hook else {
            return Err(DecodeError::CodecFailed(
                "not a tunnel-adapter plugin".into(),
            ));
        };
        let (result, stats) = self.version.call(None, |s, i| {
            indices
                .load(&mut *s, i)?
                .call_decode(&mut *s, topic, payload, now_ms)
        });
        self.record_call(stats.elapsed);
        match result {
            Ok(Ok(events)) => Ok(events
                .into_iter()
                .map(|e| BaseEvent {
                    base_id: e.base_id,
                    event: event(e.event),
                })
                .collect()),
            Ok(Err(e)) => Err(match e {
                w::DecodeError::UnknownTopic => DecodeError::UnknownTopic,
                w::DecodeError::Malformed(m) => DecodeError::Malformed(m),
                w::DecodeError::Stale(age_ms) => DecodeError::Stale { age_ms },
                w::DecodeError::Ignored(m) => DecodeError::Ignored(m),
            }),
            Err(f) => Err(DecodeError::CodecFailed(self.fail(
                Some(topic),
                f.reason,
                f.message,
            ))),
        }
    }

    fn encode(&self, base_id: &str, cmd: &BaseCommand) -> Result<Vec<OutMessage>, EncodeError> {
        let Hook::Tunnel { indices, .. } = &self.version.hook else {
            return Err(EncodeError {
                command: cmd.kind(),
                reason: "not a tunnel-adapter plugin".into(),
            });
        };
        let wire = command(cmd);
        let (result, stats) = self.version.call(None, |s, i| {
            indices
                .load(&mut *s, i)?
                .call_encode(&mut *s, base_id, &wire)
        });
        self.record_call(stats.elapsed);
        let reason = match result {
            Ok(Ok(msgs)) => {
                return Ok(msgs
                    .into_iter()
                    .map(|m| OutMessage {
                        topic: m.topic,
                        payload: m.payload,
                    })
                    .collect());
            }
            Ok(Err(msg)) => self.fail(Some(base_id), reasons::RETURNED_ERROR, msg),
            Err(f) => self.fail(Some(base_id), f.reason, f.message),
        };
        Err(EncodeError {
            command: cmd.kind(),
            reason,
        })
    }
}
