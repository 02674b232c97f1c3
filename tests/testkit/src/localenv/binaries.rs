//! Where the external programs of the local environment come from (envtest-style lookup).

use std::env;
use std::path::{Path, PathBuf};

use anyhow::bail;

/// Directory holding `kube-apiserver`, `kube-scheduler` and `kube-controller-manager`
/// (and optionally `etcd`); overrides the provisioned cache.
pub const ENV_K8S_BIN_DIR: &str = "MC_K8S_BIN_DIR";
/// Root of the provisioning cache (same variable as `scripts/provision.sh`).
pub const ENV_CACHE_DIR: &str = "MC_CACHE_DIR";
/// Explicit path of the etcd binary.
pub const ENV_ETCD_BIN: &str = "MC_ETCD_BIN";
/// Explicit path of the mosquitto binary.
pub const ENV_MOSQUITTO_BIN: &str = "MC_MOSQUITTO_BIN";
/// Kubernetes version `scripts/provision.sh` builds.
pub const K8S_VERSION: &str = "1.20.2";

const HINT: &str = "run scripts/provision.sh once (it builds and caches the control plane), \
                    or set MC_K8S_BIN_DIR to a directory with these binaries, \
                    or MC_USE_EXISTING_CLUSTER=1 to use the cluster in $KUBECONFIG";

/// Paths of the four control-plane programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sBinaries {
    /// etcd 3.4.
    pub etcd: PathBuf,
    /// kube-apiserver v1.20.2.
    pub kube_apiserver: PathBuf,
    /// kube-scheduler v1.20.2.
    pub kube_scheduler: PathBuf,
    /// kube-controller-manager v1.20.2.
    pub kube_controller_manager: PathBuf,
}

/// The provisioning cache root: `$MC_CACHE_DIR`, else `$XDG_CACHE_HOME/module-controller`,
/// else `$HOME/.cache/module-controller` (as in `scripts/provision.sh`).
pub fn cache_root() -> Option<PathBuf> {
    if let Some(dir) = env::var_os(ENV_CACHE_DIR).filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let base = env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("module-controller"))
}

/// Resolves the control-plane binaries: `$MC_K8S_BIN_DIR`, else the provisioned cache.
pub fn resolve_k8s() -> anyhow::Result<K8sBinaries> {
    let dir = match env::var_os(ENV_K8S_BIN_DIR).filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match cache_root() {
            Some(root) => root.join(format!("k8s-v{K8S_VERSION}")).join("bin"),
            None => bail!(
                "cannot locate the provisioning cache: neither MC_CACHE_DIR nor HOME is set; {HINT}"
            ),
        },
    };
    let in_dir = |name: &str| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        if is_executable(&path) {
            Ok(path)
        } else {
            bail!("{name} not found at {}; {HINT}", path.display())
        }
    };
    let etcd = match env::var_os(ENV_ETCD_BIN).filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None if is_executable(&dir.join("etcd")) => dir.join("etcd"),
        None => find_program("etcd", &["/usr/bin/etcd", "/usr/local/bin/etcd"]).ok_or_else(
            || anyhow::anyhow!("etcd not found on PATH or in /usr/bin; {HINT} (it installs the etcd-server package)"),
        )?,
    };
    Ok(K8sBinaries {
        etcd,
        kube_apiserver: in_dir("kube-apiserver")?,
        kube_scheduler: in_dir("kube-scheduler")?,
        kube_controller_manager: in_dir("kube-controller-manager")?,
    })
}

/// The mosquitto broker: `$MC_MOSQUITTO_BIN`, else PATH, else `/usr/sbin/mosquitto`
/// (Debian installs it outside a normal user's PATH).
pub fn resolve_mosquitto() -> anyhow::Result<PathBuf> {
    if let Some(path) = env::var_os(ENV_MOSQUITTO_BIN).filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(path));
    }
    find_program(
        "mosquitto",
        &["/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"],
    )
    .ok_or_else(|| {
        anyhow::anyhow!(
            "mosquitto not found on PATH or in /usr/sbin; run scripts/provision.sh \
                 (it installs the mosquitto package) or set MC_MOSQUITTO_BIN"
        )
    })
}

/// Finds `name` on `PATH`, then at the given fallback paths.
pub fn find_program(name: &str, fallbacks: &[&str]) -> Option<PathBuf> {
    let on_path = env::var_os("PATH").and_then(|paths| {
        env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|candidate| is_executable(candidate))
    });
    on_path.or_else(|| {
        fallbacks
            .iter()
            .map(PathBuf::from)
            .find(|candidate| is_executable(candidate))
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_rejects_missing_programs() {
        assert!(find_program("sh", &[]).is_some());
        assert_eq!(
            find_program("definitely-not-a-program-mc", &["/nonexistent"]),
            None
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let plain = dir.path().join("data.txt");
        std::fs::write(&plain, "x").expect("write");
        assert!(!is_executable(&plain), "a 0644 file is not a program");
        assert!(!is_executable(dir.path()), "a directory is not a program");
    }
}
