//! Settings of the plugin host: where plugins come from and every budget they run under.

use std::path::PathBuf;
use std::time::Duration;

use super::telemetry::PluginMetrics;

/// Settings of the plugin host. Every limit is per host; the wasm stack cap is the only one
/// fixed per process (it is an Engine setting, and there is one Engine per process).
#[derive(Debug, Clone)]
pub struct PluginConfig {
    /// The watched plugins directory (a mounted ConfigMap, typically).
    pub dir: PathBuf,
    /// Where precompiled artefacts are kept; should be writable and must NOT be the mounted
    /// directory. When it cannot be written, plugins still load (compiled every time).
    pub cache_dir: PathBuf,
    /// CPU-time budget of one plugin call, instantiation included (wall time is capped at four
    /// budgets).
    pub call_budget: Duration,
    /// Cap on one plugin instance: all its linear memories and tables together.
    pub memory_limit_bytes: usize,
    /// Plugin files larger than this are refused at load without being compiled.
    pub max_file_bytes: u64,
    /// A component whose compilation takes longer than this is refused (cache hits are not
    /// compiled, so this only applies to new content).
    pub compile_budget: Duration,
    /// Worker threads of the blocking pool plugin calls run on.
    pub pool_workers: usize,
    /// Calls that may wait for a pool worker; beyond that a call is refused as overloaded.
    pub pool_queue: usize,
    /// Quiet time after a directory change before rescanning.
    pub debounce: Duration,
    /// Rescan this often even without change notifications (missed events, odd mounts).
    pub resync_interval: Duration,
    /// Identical faults are reported at most once per this interval (metrics count all).
    pub fault_interval: Duration,
    /// Where the host's metrics go; [`PluginMetrics::register`] them in the controller's
    /// registry. The default is a set no registry exposes.
    pub metrics: PluginMetrics,
}

impl PluginConfig {
    /// Defaults for `dir`: 50 ms call budget, 64 MiB per instance, 16 MiB files, 10 s compile
    /// budget, 2 pool workers with 256 queued calls, 200 ms debounce, cache under the user's
    /// cache directory, unregistered metrics.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PluginConfig {
            dir: dir.into(),
            cache_dir: default_cache_dir(),
            call_budget: Duration::from_millis(50),
            memory_limit_bytes: 64 << 20,
            max_file_bytes: 16 << 20,
            compile_budget: Duration::from_secs(10),
            pool_workers: 2,
            pool_queue: 256,
            debounce: Duration::from_millis(200),
            resync_interval: Duration::from_secs(30),
            fault_interval: Duration::from_secs(60),
            metrics: PluginMetrics::default(),
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
