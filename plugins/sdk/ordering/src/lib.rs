//! Guest SDK for status-ordering plugins.
//!
//! Implement [`Metadata`] and [`Ordering`] on one type and export it with
//! [`export_plugin!`]. The plugin runs in a fresh instance per call with no sockets, files,
//! environment or clock; its configuration comes from [`host::config`].

wit_bindgen::generate!({
    world: "status-ordering",
    path: "../../../wit",
    pub_export_macro: true,
    export_macro_name: "export_plugin",
    default_bindings_module: "ordering_sdk",
});

pub use exports::koupleless::plugin::metadata::Guest as Metadata;
pub use exports::koupleless::plugin::ordering::{Guest as Ordering, StatusChange};
pub use koupleless::plugin::host;
pub use koupleless::plugin::types::{PluginInfo, PluginKind};

/// The plugin API version this SDK builds for.
pub const API_VERSION: &str = "1.0.0";

/// The metadata a status-ordering plugin returns from `info`.
pub fn info(name: &str, version: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_string(),
        version: version.to_string(),
        kind: PluginKind::StatusOrdering,
        api_version: API_VERSION.to_string(),
    }
}

/// Whether the write makes a pod Ready (the writes the host always applies last).
pub fn becomes_ready(c: &StatusChange) -> bool {
    !c.from_ready && c.to_ready
}
