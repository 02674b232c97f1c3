//! Guest SDK for batch-policy plugins.
//!
//! Implement [`Metadata`] and [`Batch`] on one type and export it with [`export_plugin!`].
//! The plugin runs in a fresh instance per call with no sockets, files, environment or clock;
//! its configuration comes from [`host::config`] and the owning Deployment's annotations from
//! [`rollout_context::annotation`].

wit_bindgen::generate!({
    world: "batch-policy",
    path: "../../../wit",
    pub_export_macro: true,
    export_macro_name: "export_plugin",
    default_bindings_module: "batch_sdk",
});

pub use exports::koupleless::plugin::batch::{
    Decision, Guest as Batch, PendingInstall, RolloutView,
};
pub use exports::koupleless::plugin::metadata::Guest as Metadata;
pub use koupleless::plugin::host;
pub use koupleless::plugin::rollout_context;
pub use koupleless::plugin::types::{PluginInfo, PluginKind};

/// The plugin API version this SDK builds for.
pub const API_VERSION: &str = "1.0.0";

/// The metadata a batch-policy plugin returns from `info`.
pub fn info(name: &str, version: &str) -> PluginInfo {
    PluginInfo {
        name: name.to_string(),
        version: version.to_string(),
        kind: PluginKind::BatchPolicy,
        api_version: API_VERSION.to_string(),
    }
}
