//! Local environment for tests and the quick start: a private Kubernetes control plane,
//! MQTT brokers, free ports, and child processes that die with the test.
//!
//! Environment variables (envtest-style):
//! - `MC_K8S_BIN_DIR`: directory with kube-apiserver, kube-scheduler, kube-controller-manager.
//! - `MC_USE_EXISTING_CLUSTER=1`: start nothing; use the cluster in `$KUBECONFIG`.
//! - `MC_CACHE_DIR`: provisioning cache root (default `~/.cache/module-controller`).
//! - `MC_KEEP_TEST_DIRS=1`: keep data and log dirs after stop, for debugging.

pub mod binaries;
pub mod broker;
pub mod control_plane;
pub mod ports;
pub mod process;

/// Set to `1` to keep temp dirs (data, logs) after stop.
pub const ENV_KEEP_TEST_DIRS: &str = "MC_KEEP_TEST_DIRS";

/// Whether an environment flag is set to `1` or `true`.
pub(crate) fn env_flag(name: &str) -> bool {
    std::env::var(name)
        .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
        .unwrap_or(false)
}

/// Whether `MC_KEEP_TEST_DIRS` asks to keep temp dirs.
pub(crate) fn keep_test_dirs() -> bool {
    env_flag(ENV_KEEP_TEST_DIRS)
}
