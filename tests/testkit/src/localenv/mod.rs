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

/// File in each temp dir naming the process that owns it, for [`sweep_stale_dirs`].
const OWNER_FILE: &str = "owner.pid";

/// Creates a temp dir named `<prefix>*` owned by this process, after removing dirs with
/// the same prefix whose owner died (a SIGKILLed test cannot clean up; its children die
/// with it through PDEATHSIG, but their data dirs would pile up in /tmp).
pub(crate) fn owned_temp_dir(prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    use anyhow::Context;
    sweep_stale_dirs(prefix);
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .with_context(|| format!("creating a {prefix}* temp dir"))?;
    let owner = dir.path().join(OWNER_FILE);
    std::fs::write(&owner, std::process::id().to_string())
        .with_context(|| format!("writing {}", owner.display()))?;
    Ok(dir)
}

/// Keeps a temp dir (MC_KEEP_TEST_DIRS=1) and exempts it from sweeping.
pub(crate) fn keep_dir(dir: tempfile::TempDir) -> std::path::PathBuf {
    let kept = dir.keep();
    // Without an owner file the sweeper leaves the dir alone.
    let _ = std::fs::remove_file(kept.join(OWNER_FILE));
    kept
}

/// Removes `<tmp>/<prefix>*` dirs whose recorded owner process no longer exists. Dirs
/// without a readable owner file (kept dirs, other tools) are never touched.
fn sweep_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_name().to_string_lossy().starts_with(prefix) {
            continue;
        }
        let path = entry.path();
        let owner = std::fs::read_to_string(path.join(OWNER_FILE))
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok());
        if let Some(pid) = owner
            && !process::pid_exists(pid)
        {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(dir = %path.display(), pid, "removed temp dir of a dead test process")
                }
                Err(error) => {
                    tracing::debug!(dir = %path.display(), %error, "cannot remove stale temp dir")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_only_dirs_of_dead_owners() {
        let prefix = format!("mc-sweeptest-{}-", uuid::Uuid::new_v4().simple());
        let mine = owned_temp_dir(&prefix).expect("own dir");
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let dead_pid = child.id();
        child.wait().expect("reap true");
        let orphan = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .expect("orphan dir")
            .keep();
        std::fs::write(orphan.join(OWNER_FILE), dead_pid.to_string()).expect("owner file");
        let unowned = tempfile::Builder::new()
            .prefix(&prefix)
            .tempdir()
            .expect("unowned dir");

        sweep_stale_dirs(&prefix);

        assert!(!orphan.exists(), "dir of dead pid {dead_pid} survived");
        assert!(mine.path().exists(), "a live owner's dir was removed");
        assert!(
            unowned.path().exists(),
            "a dir without owner file was removed"
        );
    }
}
