//! The kinds of plugin.

use std::fmt;

/// What a plugin is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PluginKind {
    /// Codec between a base agent's wire format and canonical events/commands.
    TunnelAdapter,
    /// Order of pod status writes on one base.
    StatusOrdering,
    /// Which pending installs of a rollout proceed now.
    BatchPolicy,
    /// Not known (manifest errors, unreadable files of unbound plugins).
    Unknown,
}

impl PluginKind {
    /// Every real kind.
    pub const ALL: [PluginKind; 3] = [
        PluginKind::TunnelAdapter,
        PluginKind::StatusOrdering,
        PluginKind::BatchPolicy,
    ];
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::TunnelAdapter => "tunnel-adapter",
            PluginKind::StatusOrdering => "status-ordering",
            PluginKind::BatchPolicy => "batch-policy",
            PluginKind::Unknown => "unknown",
        })
    }
}
