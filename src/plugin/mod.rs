//! WASM plugin host: operators change how the controller talks to bases (tunnel adapters),
//! orders status writes (status ordering) and paces rollouts (batch policies) by dropping
//! WebAssembly components into a watched directory.
//!
//! - One wasmtime Engine per process; typed bindings generated from `wit/`.
//! - Every call runs in a fresh instance with a time budget (epoch interruption), a memory
//!   cap and a stack cap. Plugins get no sockets or HTTP (refused at load) and no files,
//!   environment or clock: the WASI imports a Rust guest carries are stubs that trap when
//!   called (random is a fixed-seed generator).
//! - A failing plugin is counted, logged and reported as a [`PluginFault`]; the built-in
//!   default decides that call.
//! - The directory is watched (ConfigMap `..data` symlink swaps included), changes debounced,
//!   new versions compiled and validated before an atomic swap; a broken file keeps the old
//!   version. Compiled artefacts are cached by content hash.
//!
//! See `plugins/README.md` for the plugin author's guide and the manifest format.

mod batch;
mod bindings;
mod cache;
pub mod cli;
mod codec;
mod engine;
mod faults;
mod host;
mod limits;
mod loader;
pub mod manifest;
mod ordering;
mod reload;
mod telemetry;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

pub use faults::{PluginFault, reasons};
pub use host::PluginHost;
pub use limits::CallFailure;
pub use loader::{API_VERSION, LoadError};
pub use manifest::Manifest;

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

/// Settings of the plugin host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginConfig {
    /// The watched plugins directory (a mounted ConfigMap, typically).
    pub dir: PathBuf,
    /// Where precompiled artefacts are kept; must be writable and NOT the mounted directory.
    pub cache_dir: PathBuf,
    /// Wall-clock budget of one plugin call, instantiation included.
    pub call_budget: Duration,
    /// Cap on a plugin instance's linear memory.
    pub memory_limit_bytes: usize,
    /// Quiet time after a directory change before rescanning.
    pub debounce: Duration,
    /// Rescan this often even without change notifications (missed events, odd mounts).
    pub resync_interval: Duration,
    /// Identical faults are reported at most once per this interval (metrics count all).
    pub fault_interval: Duration,
}

impl PluginConfig {
    /// Defaults for `dir`: 50 ms budget, 64 MiB memory, 200 ms debounce, cache under the
    /// user's cache directory.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PluginConfig {
            dir: dir.into(),
            cache_dir: default_cache_dir(),
            call_budget: Duration::from_millis(50),
            memory_limit_bytes: 64 << 20,
            debounce: Duration::from_millis(200),
            resync_interval: Duration::from_secs(30),
            fault_interval: Duration::from_secs(60),
        }
    }
}

/// `$XDG_CACHE_HOME/module-controller/plugins`, else `~/.cache/...`, else the temp dir.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("module-controller").join("plugins")
}

/// A loaded plugin version, as reported by [`PluginHost::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPlugin {
    /// Name in the manifest.
    pub name: String,
    /// Kind.
    pub kind: PluginKind,
    /// Name the plugin gives itself.
    pub plugin_name: String,
    /// Version the plugin gives itself.
    pub version: String,
    /// Plugin API version it was built for.
    pub api_version: String,
    /// SHA-256 of the component file.
    pub content_hash: String,
    /// Where it was loaded from.
    pub file: PathBuf,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Time from reading the file to a validated version (compile or cache load included).
    pub load_time: Duration,
    /// Whether the compiled code came from the artefact cache.
    pub from_cache: bool,
    /// Largest linear memory one instance of this version has used so far.
    pub peak_instance_memory: usize,
}
