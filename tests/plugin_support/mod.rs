//! Shared setup of the plugin tests: the built example plugins, a plugins directory with a
//! manifest, and a waiting helper. The simulated simple-agent base lives in `agent.rs`.

#![allow(dead_code)]

pub mod agent;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use module_controller::plugin::{PluginConfig, PluginFault, PluginMetrics};
use module_controller::rollout::ordering::StatusChange;
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;

/// Directory of the built plugin components, building them first (once per test binary).
/// Panics with what to do when they cannot be built: a plugin test that cannot run its
/// plugins fails, it never passes by skipping.
pub fn dist() -> &'static Path {
    static DIST: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match DIST.get_or_init(build) {
        Ok(d) => d,
        Err(e) => panic!("{e}"),
    }
}

fn build() -> Result<PathBuf, String> {
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins");
    let out = Command::new("bash")
        .arg(plugins.join("build.sh"))
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .output()
        .map_err(|e| format!("cannot run plugins/build.sh: {e}"))?;
    if out.status.success() {
        return Ok(plugins.join("dist"));
    }
    let target_ok = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.trim() == "wasm32-wasip2")
        })
        .unwrap_or(false);
    let hint = if target_ok {
        "plugins/build.sh failed"
    } else {
        "the wasm32-wasip2 Rust target is missing and could not be installed: run \
         `rustup target add wasm32-wasip2` (scripts/provision.sh does) and build the plugins \
         with `bash plugins/build.sh`"
    };
    Err(format!(
        "PLUGIN TESTS CANNOT RUN: {hint}\n--- build.sh stdout ---\n{}\n--- build.sh stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    ))
}

/// `n` varied status changes (mixed readiness, two revisions, creation times in 5 buckets).
pub fn status_changes(n: u32) -> Vec<StatusChange> {
    (0..n)
        .map(|i| StatusChange {
            pod_index: i,
            creation_ts: 100 + i64::from(i % 5),
            revision: i64::from(i % 2),
            from_ready: i % 3 == 0,
            to_ready: i % 2 == 1,
            deleting: false,
        })
        .collect()
}

/// A registry like the controller's (prefix `module_controller`) with the plugin metrics in it.
pub fn metrics() -> (Registry, PluginMetrics) {
    let mut registry = Registry::with_prefix("module_controller");
    let metrics = PluginMetrics::register(&mut registry);
    (registry, metrics)
}

/// The text exposition of `registry`.
pub fn scrape(registry: &Registry) -> String {
    let mut out = String::new();
    encode(&mut out, registry).expect("encoding metrics");
    out
}

/// The value of the sample `name{labels}` (exact text before the value) in a scrape, 0 if absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The bytes of a built plugin, e.g. `plugin_bytes(dist, "default-ordering")`.
pub fn plugin_bytes(dist: &Path, name: &str) -> Vec<u8> {
    std::fs::read(dist.join(format!("{name}.wasm")))
        .unwrap_or_else(|e| panic!("reading plugin {name}: {e}"))
}

/// A temporary plugins directory and a private artefact cache.
pub struct PluginDir {
    pub dir: tempfile::TempDir,
    pub cache: tempfile::TempDir,
}

impl PluginDir {
    /// Empty directories.
    pub fn new() -> PluginDir {
        PluginDir {
            dir: tempfile::Builder::new()
                .prefix("mc-plugins-")
                .tempdir()
                .expect("plugins temp dir"),
            cache: tempfile::Builder::new()
                .prefix("mc-plugin-cache-")
                .tempdir()
                .expect("cache temp dir"),
        }
    }

    /// Path of the plugins directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies built plugin `name` to `file` in the directory (atomically).
    pub fn install(&self, dist: &Path, name: &str, file: &str) {
        self.write(file, &plugin_bytes(dist, name));
    }

    /// Writes `file` atomically (temp + rename), as a careful operator would.
    pub fn write(&self, file: &str, bytes: &[u8]) {
        let dest = self.path().join(file);
        let tmp = self.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, bytes).expect("writing plugin temp file");
        std::fs::rename(&tmp, &dest).expect("renaming plugin file");
    }

    /// Writes the manifest.
    pub fn manifest(&self, json: &serde_json::Value) {
        self.write("plugins.json", json.to_string().as_bytes());
    }

    /// Host settings for this directory, with a short debounce for tests.
    pub fn config(&self) -> PluginConfig {
        let mut cfg = PluginConfig::new(self.path());
        cfg.cache_dir = self.cache.path().to_path_buf();
        cfg.debounce = Duration::from_millis(50);
        cfg.fault_interval = Duration::ZERO;
        cfg
    }
}

/// Polls `f` every 10 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Drains every fault received so far.
pub fn drain(rx: &mut tokio::sync::broadcast::Receiver<PluginFault>) -> Vec<PluginFault> {
    let mut out = Vec::new();
    loop {
        match rx.try_recv() {
            Ok(f) => out.push(f),
            Err(tokio::sync::broadcast::error::TryRecvError::Lagged(_)) => continue,
            Err(_) => return out,
        }
    }
}

/// Appends a custom section to a wasm binary: a different file (and content hash) with the
/// same behaviour, to make many distinct versions of one plugin.
pub fn with_custom_section(wasm: &[u8], name: &str, data: &[u8]) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut out = wasm.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}
