//! Guest SDK for tunnel-adapter plugins.
//!
//! Implement [`Metadata`] and [`Tunnel`] on one type and export it with [`export_plugin!`].
//! The host owns the broker connection: the adapter names the topics to subscribe to and
//! translates each message both ways. No sockets, files, environment or clock; the receive
//! time comes as an argument of `decode`.

wit_bindgen::generate!({
    world: "tunnel-adapter",
    path: "../../../wit",
    pub_export_macro: true,
    export_macro_name: "export_plugin",
    default_bindings_module: "tunnel_sdk",
});

pub use exports::koupleless::plugin::metadata::Guest as Metadata;
pub use exports::koupleless::plugin::tunnel::{
    BaseEvent, BaseMetadata, Command, DecodeError, Guest as Tunnel, Health, Heartbeat, Lifecycle,
    ModuleKey, ModuleSpec, ModuleStatus, OperationKind, OperationResult, OutMessage, TunnelEvent,
};
pub use koupleless::plugin::host;
pub use koupleless::plugin::types::{PluginInfo, PluginKind};

/// The plugin API version this SDK builds for.
pub const API_VERSION: &str = "1.0.0";

/// The metadata a tunnel-adapter plugin returns from `info`.
pub fn info(name: &str, version: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_string(),
        version: version.to_string(),
        kind: PluginKind::TunnelAdapter,
        api_version: API_VERSION.to_string(),
    }
}

/// Whether an MQTT topic filter (with `+` and `#`) matches a topic.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}
