//! A private Kubernetes v1.20 control plane (etcd, kube-apiserver, kube-scheduler,
//! kube-controller-manager) on loopback ports, for tests and the quick start.
//!
//! See `shared/design/control-plane.md` for the recipe. Escape hatches, like envtest:
//! `MC_K8S_BIN_DIR` picks the binaries, `MC_USE_EXISTING_CLUSTER=1` starts nothing and
//! uses `$KUBECONFIG`.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tempfile::TempDir;
use tracing::instrument::WithSubscriber;

use super::binaries::{self, K8sBinaries};
use super::ports::free_port;
use super::process::ManagedProcess;
use super::{env_flag, keep_dir, keep_test_dirs, owned_temp_dir};

/// Set to `1` to use the cluster in `$KUBECONFIG` instead of starting one.
pub const ENV_USE_EXISTING_CLUSTER: &str = "MC_USE_EXISTING_CLUSTER";

/// The bearer token of the `system:masters` user in the generated token file.
pub const ADMIN_TOKEN: &str = "admin-token";

/// How long each start-up phase may take before start fails.
const PHASE_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval while waiting for a component.
const POLL: Duration = Duration::from_millis(100);
/// Components must survive at least this long after spawn to count as healthy: flag and
/// config errors make them exit well within it.
const MIN_ALIVE: Duration = Duration::from_secs(1);
/// Log lines quoted in start-up errors.
const TAIL_LINES: usize = 40;
/// Namespaces the apiserver creates itself; tests and the controller rely on all of them.
const SYSTEM_NAMESPACES: [&str; 3] = ["default", "kube-system", "kube-node-lease"];

/// Tunables of a locally started control plane.
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// kcm `--node-monitor-grace-period`: how long a Node may go without a heartbeat
    /// before it is marked NotReady/Unknown. Keep it > 4 × the 2 s node-monitor period.
    pub node_monitor_grace_period: Duration,
    /// kcm `--pod-eviction-timeout`.
    pub pod_eviction_timeout: Duration,
    /// Appended last to kube-controller-manager's arguments, so they override the defaults.
    pub extra_controller_manager_args: Vec<String>,
    /// Appended last to kube-scheduler's arguments, so they override the defaults (e.g. a
    /// higher `--kube-api-qps` for benchmarks).
    pub extra_scheduler_args: Vec<String>,
    /// Appended last to kube-apiserver's arguments (e.g. `--max-requests-inflight`).
    pub extra_apiserver_args: Vec<String>,
    /// Directory for data, certificates and logs; kept after stop. `None`: a fresh temp
    /// dir, removed on stop unless `MC_KEEP_TEST_DIRS=1`.
    pub data_dir: Option<PathBuf>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            node_monitor_grace_period: Duration::from_secs(8),
            pod_eviction_timeout: Duration::from_secs(10),
            extra_controller_manager_args: Vec::new(),
            extra_scheduler_args: Vec::new(),
            extra_apiserver_args: Vec::new(),
            data_dir: None,
        }
    }
}

/// Processes and directory owned by a running local control plane.
#[derive(Debug, Default)]
struct Owned {
    /// In start order; stopped in reverse.
    processes: Vec<ManagedProcess>,
    temp_dir: Option<TempDir>,
}

impl Owned {
    /// Stops every process, then removes or keeps the temp dir.
    ///
    /// Everything but the first process (etcd) gets SIGTERM at once so the components shut
    /// down concurrently; etcd goes last so the apiserver never loses its storage mid-shutdown.
    fn shutdown(&mut self) {
        for process in self.processes.iter_mut().skip(1) {
            process.terminate();
        }
        while let Some(mut process) = self.processes.pop() {
            process.stop();
        }
        if let Some(dir) = self.temp_dir.take() {
            if keep_test_dirs() {
                let kept = keep_dir(dir);
                tracing::info!(dir = %kept.display(), "keeping control plane dir (MC_KEEP_TEST_DIRS=1)");
            } else if let Err(error) = dir.close() {
                tracing::warn!(%error, "removing control plane temp dir failed");
            }
        }
    }

    fn find_mut(&mut self, name: &str) -> Option<&mut ManagedProcess> {
        self.processes.iter_mut().find(|p| p.name() == name)
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A running control plane (or a handle to an existing cluster). Stopped on drop.
#[derive(Debug)]
pub struct ControlPlane {
    owned: Mutex<Owned>,
    config: kube::Config,
    kubeconfig_path: PathBuf,
    api_url: String,
    log_dir: PathBuf,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver, kube-scheduler and kube-controller-manager on private
    /// ports and waits until the apiserver is ready, the system namespaces exist and the
    /// controller manager is working. With `MC_USE_EXISTING_CLUSTER=1` it starts nothing.
    pub async fn start(opts: ControlPlaneOptions) -> anyhow::Result<ControlPlane> {
        if env_flag(ENV_USE_EXISTING_CLUSTER) {
            return Self::existing().await;
        }
        let started = Instant::now();
        let bins = binaries::resolve_k8s()?;
        let cp = start_local(&bins, &opts).await?;
        tracing::info!(
            api_url = %cp.api_url,
            log_dir = %cp.log_dir.display(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "local control plane ready"
        );
        Ok(cp)
    }

    /// The control plane shared by every test of this process (started with default
    /// options on first use, stopped when the process exits). Tests sharing it must use
    /// their own namespaces and object names.
    pub async fn shared() -> anyhow::Result<&'static ControlPlane> {
        static SHARED: tokio::sync::OnceCell<ControlPlane> = tokio::sync::OnceCell::const_new();

        extern "C" fn stop_shared_at_exit() {
            // Unwinding out of an atexit handler is undefined behaviour.
            let _ = std::panic::catch_unwind(|| {
                if let Some(cp) = SHARED.get() {
                    cp.owned().shutdown();
                }
            });
        }

        SHARED
            .get_or_try_init(|| async {
                let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
                // Statics are never dropped; exit handlers are the last chance to stop the
                // processes gracefully and remove the temp dir. PDEATHSIG still covers
                // abnormal exits.
                // SAFETY: registering a plain `extern "C" fn` with no captured state.
                if unsafe { libc::atexit(stop_shared_at_exit) } != 0 {
                    tracing::warn!("atexit registration failed; the shared control plane relies on PDEATHSIG only");
                }
                Ok(cp)
            })
            .await
    }

    /// A new client for the caller's tokio runtime (clients must not cross runtimes).
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        kube::Client::try_from(self.kube_config())
            .with_context(|| format!("building a kube client for {}", self.api_url))
    }

    /// The client configuration (admin token; the apiserver's self-signed cert is accepted).
    pub fn kube_config(&self) -> kube::Config {
        self.config.clone()
    }

    /// Path of a kubeconfig file for this cluster, for child processes such as the controller.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// The apiserver URL, e.g. `https://127.0.0.1:41234`.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// Directory with one log file per component.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// `(component, pid)` of every running process this control plane started.
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.owned()
            .processes
            .iter()
            .map(|p| (p.name().to_owned(), p.pid()))
            .collect()
    }

    /// The last `lines` lines of every component log, for printing when a test fails.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for process in &self.owned().processes {
            let _ = writeln!(
                out,
                "===== {} ({}) =====\n{}",
                process.name(),
                process.log_path().display(),
                process.log_tail(lines)
            );
        }
        out
    }

    /// Stops every process and removes the temp dir (unless `MC_KEEP_TEST_DIRS=1`). Idempotent.
    ///
    /// Blocks the calling thread while the components exit (well under a second normally,
    /// at most a few seconds if one ignores SIGTERM).
    pub fn stop(&mut self) {
        self.owned().shutdown();
    }

    /// Stops every process and removes the temp dir, like [`ControlPlane::stop`], through a
    /// shared reference (for a control plane kept in a `'static`, e.g. a test's private one).
    pub fn shutdown(&self) {
        self.owned().shutdown();
    }

    /// Freezes the kube-apiserver (SIGSTOP): connections stay open and new ones are accepted
    /// by the kernel, but no request is answered, as with a hung or overloaded apiserver. The
    /// other components keep running. Thawed by [`ControlPlane::thaw_apiserver`] or when the
    /// returned guard drops (so a failing test never leaves it frozen).
    pub fn freeze_apiserver(&self) -> anyhow::Result<ApiserverFrozen<'_>> {
        let mut owned = self.owned();
        let apiserver = owned
            .find_mut("kube-apiserver")
            .ok_or_else(|| anyhow!("this control plane runs no kube-apiserver of its own"))?;
        if !apiserver.is_running() {
            bail!("kube-apiserver is not running");
        }
        apiserver.pause();
        tracing::info!(pid = apiserver.pid(), "kube-apiserver frozen (SIGSTOP)");
        Ok(ApiserverFrozen { cp: self })
    }

    /// Lets a frozen kube-apiserver run again (SIGCONT). Harmless when it is not frozen.
    pub fn thaw_apiserver(&self) {
        if let Some(apiserver) = self.owned().find_mut("kube-apiserver") {
            apiserver.resume();
            tracing::info!(pid = apiserver.pid(), "kube-apiserver thawed (SIGCONT)");
        }
    }

    fn owned(&self) -> MutexGuard<'_, Owned> {
        // Poisoning only means another thread panicked while holding the lock; the process
        // list is still accurate and must still be stopped.
        self.owned.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A handle to the cluster in `$KUBECONFIG` (or `~/.kube/config`).
    async fn existing() -> anyhow::Result<ControlPlane> {
        let config = kube::Config::from_kubeconfig(&KubeConfigOptions::default())
            .await
            .context("MC_USE_EXISTING_CLUSTER=1 but no usable kubeconfig ($KUBECONFIG or ~/.kube/config)")?;
        let kubeconfig_path = std::env::var_os("KUBECONFIG")
            .and_then(|v| std::env::split_paths(&v).next())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".kube/config")))
            .ok_or_else(|| anyhow!("neither KUBECONFIG nor HOME is set"))?;
        let temp_dir = owned_temp_dir("mc-existing-cluster-")?;
        let api_url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        tracing::info!(%api_url, kubeconfig = %kubeconfig_path.display(), "using existing cluster");
        Ok(ControlPlane {
            log_dir: temp_dir.path().to_owned(),
            owned: Mutex::new(Owned {
                processes: Vec::new(),
                temp_dir: Some(temp_dir),
            }),
            config,
            kubeconfig_path,
            api_url,
        })
    }
}

/// A frozen kube-apiserver; thawed when dropped.
#[derive(Debug)]
#[must_use = "the apiserver is thawed when the guard drops"]
pub struct ApiserverFrozen<'a> {
    cp: &'a ControlPlane,
}

impl ApiserverFrozen<'_> {
    /// Thaws the apiserver now.
    pub fn thaw(self) {
        drop(self);
    }
}

impl Drop for ApiserverFrozen<'_> {
    fn drop(&mut self) {
        self.cp.thaw_apiserver();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Files and ports of one instance.
struct Layout {
    dir: PathBuf,
    logs: PathBuf,
    etcd_port: u16,
    etcd_peer_port: u16,
    api_port: u16,
}

impl Layout {
    fn log(&self, component: &str) -> PathBuf {
        self.logs.join(format!("{component}.log"))
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

async fn start_local(
    bins: &K8sBinaries,
    opts: &ControlPlaneOptions,
) -> anyhow::Result<ControlPlane> {
    let openssl = binaries::find_program("openssl", &["/usr/bin/openssl"])
        .ok_or_else(|| anyhow!("openssl not found; run scripts/provision.sh"))?;
    let mut owned = Owned::default();
    let dir = match &opts.data_dir {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            let temp = owned_temp_dir("mc-control-plane-")?;
            let path = temp.path().to_owned();
            owned.temp_dir = Some(temp);
            path
        }
    };
    let layout = Layout {
        logs: dir.join("logs"),
        dir,
        etcd_port: free_port()?,
        etcd_peer_port: free_port()?,
        api_port: free_port()?,
    };
    for sub in ["logs", "etcd", "certs"] {
        let path = layout.path(sub);
        // etcd warns about data dirs readable by others.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
    }
    let t0 = Instant::now();

    owned
        .processes
        .push(spawn(&bins.etcd, "etcd", &etcd_args(&layout), &layout)?);
    generate_key(&openssl, &layout.path("sa.key")).await?;
    let tokens = layout.path("tokens.csv");
    fs::write(
        &tokens,
        format!("{ADMIN_TOKEN},admin,admin,system:masters\n"),
    )
    .with_context(|| format!("writing {}", tokens.display()))?;
    wait_etcd(&mut owned, layout.etcd_port).await?;
    let etcd_ms = t0.elapsed().as_millis() as u64;

    owned.processes.push(spawn(
        &bins.kube_apiserver,
        "kube-apiserver",
        &with_extra(apiserver_args(&layout), &opts.extra_apiserver_args),
        &layout,
    )?);
    let api_url = format!("https://127.0.0.1:{}", layout.api_port);
    let kubeconfig_yaml = kubeconfig_yaml(&api_url);
    let kubeconfig_path = layout.path("kubeconfig");
    fs::write(&kubeconfig_path, &kubeconfig_yaml)
        .with_context(|| format!("writing {}", kubeconfig_path.display()))?;
    let config = kube_config_from_yaml(&kubeconfig_yaml).await?;
    let client = kube::Client::try_from(config.clone()).context("building the readiness client")?;
    wait_readyz(&mut owned, &client).await?;
    let apiserver_ms = t0.elapsed().as_millis() as u64;

    owned.processes.push(spawn(
        &bins.kube_scheduler,
        "kube-scheduler",
        &with_extra(scheduler_args(&kubeconfig_path), &opts.extra_scheduler_args),
        &layout,
    )?);
    owned.processes.push(spawn(
        &bins.kube_controller_manager,
        "kube-controller-manager",
        &controller_manager_args(&kubeconfig_path, &layout, opts),
        &layout,
    )?);
    let components_spawned = Instant::now();
    wait_cluster_usable(&mut owned, &client).await?;
    // A component that fails on flags or config exits within moments; make sure both
    // lived long enough to have hit such errors before calling the cluster healthy.
    if let Some(rest) = MIN_ALIVE.checked_sub(components_spawned.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    for name in [
        "etcd",
        "kube-apiserver",
        "kube-scheduler",
        "kube-controller-manager",
    ] {
        ensure_running(&mut owned, name)?;
    }
    tracing::debug!(
        etcd_ms,
        apiserver_ms,
        total_ms = t0.elapsed().as_millis() as u64,
        "control plane start-up phases"
    );
    Ok(ControlPlane {
        log_dir: layout.logs.clone(),
        owned: Mutex::new(owned),
        config,
        kubeconfig_path,
        api_url,
    })
}

fn spawn(
    program: &Path,
    name: &str,
    args: &[String],
    layout: &Layout,
) -> anyhow::Result<ManagedProcess> {
    let mut command = Command::new(program);
    command.args(args).current_dir(&layout.dir);
    ManagedProcess::spawn(name, command, &layout.log(name))
}

/// `args` followed by `extra` (later flags override earlier ones in Kubernetes components).
fn with_extra(mut args: Vec<String>, extra: &[String]) -> Vec<String> {
    args.extend(extra.iter().cloned());
    args
}

/// A Go duration flag value; milliseconds keep sub-second options exact.
fn go_duration(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

fn etcd_args(l: &Layout) -> Vec<String> {
    let client = format!("http://127.0.0.1:{}", l.etcd_port);
    let peer = format!("http://127.0.0.1:{}", l.etcd_peer_port);
    vec![
        "--name=mc-etcd".into(),
        format!("--data-dir={}", l.path("etcd").display()),
        format!("--listen-client-urls={client}"),
        format!("--advertise-client-urls={client}"),
        format!("--listen-peer-urls={peer}"),
        format!("--initial-advertise-peer-urls={peer}"),
        format!("--initial-cluster=mc-etcd={peer}"),
        // Test data is disposable; fsync dominates etcd latency on CI disks.
        "--unsafe-no-fsync".into(),
        "--log-level=warn".into(),
        "--logger=zap".into(),
    ]
}

fn apiserver_args(l: &Layout) -> Vec<String> {
    let key = l.path("sa.key").display().to_string();
    vec![
        format!("--etcd-servers=http://127.0.0.1:{}", l.etcd_port),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={}", l.api_port),
        // v1.20 still serves plain HTTP on 8080 by default: that would collide between
        // parallel instances.
        "--insecure-port=0".into(),
        "--advertise-address=127.0.0.1".into(),
        format!("--cert-dir={}", l.path("certs").display()),
        format!("--service-account-key-file={key}"),
        format!("--service-account-signing-key-file={key}"),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        format!("--token-auth-file={}", l.path("tokens.csv").display()),
        "--authorization-mode=RBAC".into(),
        "--service-cluster-ip-range=10.0.0.0/24".into(),
        "--disable-admission-plugins=ServiceAccount".into(),
        // The `kubernetes` Service endpoint would be 127.0.0.1, which Endpoints validation
        // rejects (loopback) and the reconciler would log forever. Nothing here uses it.
        "--endpoint-reconciler-type=none".into(),
        "--profiling=false".into(),
    ]
}

fn scheduler_args(kubeconfig: &Path) -> Vec<String> {
    vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--secure-port=0".into(),
        "--port=0".into(),
        "--kube-api-qps=200".into(),
        "--kube-api-burst=400".into(),
        "--profiling=false".into(),
    ]
}

fn controller_manager_args(
    kubeconfig: &Path,
    l: &Layout,
    opts: &ControlPlaneOptions,
) -> Vec<String> {
    let mut args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--leader-elect=false".into(),
        "--bind-address=127.0.0.1".into(),
        "--secure-port=0".into(),
        "--port=0".into(),
        format!(
            "--service-account-private-key-file={}",
            l.path("sa.key").display()
        ),
        // Publish the apiserver's serving cert as kube-root-ca.crt; without it the
        // root-ca-cert-publisher has no CA (the kubeconfig skips TLS verification).
        format!("--root-ca-file={}", l.path("certs/apiserver.crt").display()),
        "--use-service-account-credentials=false".into(),
        // Token controller off: pods run without ServiceAccount tokens. The cloud-only
        // controllers would only log errors without a cloud provider.
        "--controllers=*,-serviceaccount-token,-cloud-node-lifecycle,-service,-route".into(),
        "--node-monitor-period=2s".into(),
        format!(
            "--node-monitor-grace-period={}",
            go_duration(opts.node_monitor_grace_period)
        ),
        format!(
            "--pod-eviction-timeout={}",
            go_duration(opts.pod_eviction_timeout)
        ),
        // Tests of unrelated environments share this control plane (one unlabelled "zone"), so
        // stale VNodes of finished tests must not put the zone into partial disruption, which
        // stops evictions in clusters under 50 nodes.
        "--unhealthy-zone-threshold=1".into(),
        "--kube-api-qps=200".into(),
        "--kube-api-burst=400".into(),
        "--profiling=false".into(),
    ];
    args.extend(opts.extra_controller_manager_args.iter().cloned());
    args
}

fn kubeconfig_yaml(api_url: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: {api_url}
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: {ADMIN_TOKEN}
contexts:
- name: local
  context:
    cluster: local
    user: admin
    namespace: default
current-context: local
"
    )
}

/// Builds the client config through kube's own kubeconfig loader, so the file handed to
/// child processes and the in-process client can never disagree.
async fn kube_config_from_yaml(yaml: &str) -> anyhow::Result<kube::Config> {
    let kubeconfig = Kubeconfig::from_yaml(yaml).context("parsing the generated kubeconfig")?;
    kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading the generated kubeconfig")
}

async fn generate_key(openssl: &Path, path: &Path) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(openssl)
        .args(["genrsa", "-out"])
        .arg(path)
        .arg("2048")
        .output()
        .await
        .with_context(|| format!("running {} genrsa", openssl.display()))?;
    if !output.status.success() {
        bail!(
            "openssl genrsa failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Fails with the log tail if `name` has exited.
fn ensure_running(owned: &mut Owned, name: &str) -> anyhow::Result<()> {
    let process = owned
        .find_mut(name)
        .ok_or_else(|| anyhow!("{name} was never started"))?;
    match process.try_exit_status()? {
        None => Ok(()),
        Some(status) => bail!(
            "{name} exited during start-up ({status}); last lines of {}:\n{}",
            process.log_path().display(),
            process.log_tail(TAIL_LINES)
        ),
    }
}

fn timeout_error(owned: &Owned, what: &str) -> anyhow::Error {
    let mut tails = String::new();
    for process in &owned.processes {
        let _ = write!(
            tails,
            "\n===== {} =====\n{}",
            process.log_path().display(),
            process.log_tail(TAIL_LINES)
        );
    }
    anyhow!(
        "timed out after {PHASE_TIMEOUT:?} waiting for {what} (set MC_KEEP_TEST_DIRS=1 to keep the logs){tails}"
    )
}

async fn wait_etcd(owned: &mut Owned, port: u16) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .context("building an HTTP client")?;
    let url = format!("http://127.0.0.1:{port}/health");
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        ensure_running(owned, "etcd")?;
        if let Ok(response) = http.get(&url).send().await
            && let Ok(body) = response.text().await
            && body.contains("\"health\":\"true\"")
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(timeout_error(owned, "etcd /health"));
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_readyz(owned: &mut Owned, client: &kube::Client) -> anyhow::Result<()> {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        ensure_running(owned, "kube-apiserver")?;
        let request = http::Request::get("/readyz")
            .body(Vec::new())
            .context("building the /readyz request")?;
        // kube's HTTP trace layer logs every refused connection and 500 at ERROR; while
        // the apiserver boots those are expected, so keep them out of the caller's logs.
        let answer = client
            .request_text(request)
            .with_subscriber(tracing::subscriber::NoSubscriber::default())
            .await;
        let last = match answer {
            Ok(body) if body.trim() == "ok" => return Ok(()),
            Ok(body) => body,
            Err(error) => error.to_string(),
        };
        if Instant::now() > deadline {
            return Err(timeout_error(owned, "kube-apiserver /readyz")
                .context(format!("last /readyz answer: {last}")));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits for the system namespaces and for the `default` ServiceAccount, which the
/// controller manager's serviceaccount controller creates once its informers run: proof
/// that kcm reached the apiserver and is reconciling.
async fn wait_cluster_usable(owned: &mut Owned, client: &kube::Client) -> anyhow::Result<()> {
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + PHASE_TIMEOUT;
    let mut pending: Vec<&str> = SYSTEM_NAMESPACES.to_vec();
    loop {
        ensure_running(owned, "kube-apiserver")?;
        ensure_running(owned, "kube-scheduler")?;
        ensure_running(owned, "kube-controller-manager")?;
        let mut still = Vec::new();
        for name in pending {
            if !matches!(namespaces.get_opt(name).await, Ok(Some(_))) {
                still.push(name);
            }
        }
        pending = still;
        if pending.is_empty() && matches!(accounts.get_opt("default").await, Ok(Some(_))) {
            return Ok(());
        }
        if Instant::now() > deadline {
            let what = if pending.is_empty() {
                "the default ServiceAccount (kube-controller-manager not working)".to_owned()
            } else {
                format!("namespaces {pending:?}")
            };
            return Err(timeout_error(owned, &what));
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            dir: PathBuf::from("/d"),
            logs: PathBuf::from("/d/logs"),
            etcd_port: 1,
            etcd_peer_port: 2,
            api_port: 3,
        }
    }

    #[test]
    fn kcm_extra_args_come_last_and_durations_are_exact() {
        let opts = ControlPlaneOptions {
            node_monitor_grace_period: Duration::from_millis(500),
            pod_eviction_timeout: Duration::from_secs(30),
            extra_controller_manager_args: vec!["--node-monitor-period=1s".into()],
            extra_scheduler_args: Vec::new(),
            extra_apiserver_args: Vec::new(),
            data_dir: None,
        };
        let args = controller_manager_args(Path::new("/k"), &layout(), &opts);
        assert_eq!(
            args.last().map(String::as_str),
            Some("--node-monitor-period=1s")
        );
        assert!(args.contains(&"--node-monitor-grace-period=500ms".to_owned()));
        assert!(args.contains(&"--pod-eviction-timeout=30000ms".to_owned()));
        assert!(
            args.iter()
                .any(|a| a.starts_with("--controllers=*,-serviceaccount-token"))
        );
    }

    #[test]
    fn extra_scheduler_and_apiserver_args_come_last() {
        let extra = ["--kube-api-qps=1000".to_owned()];
        let args = with_extra(scheduler_args(Path::new("/k")), &extra);
        assert!(args.contains(&"--kube-api-qps=200".to_owned()));
        assert_eq!(args.last().map(String::as_str), Some("--kube-api-qps=1000"));
        let args = with_extra(apiserver_args(&layout()), &[]);
        assert_eq!(args, apiserver_args(&layout()));
    }

    #[test]
    fn apiserver_never_opens_the_insecure_port() {
        let args = apiserver_args(&layout());
        assert!(args.contains(&"--insecure-port=0".to_owned()));
        assert!(args.contains(&"--secure-port=3".to_owned()));
    }

    #[tokio::test]
    async fn generated_kubeconfig_loads_with_token_and_insecure_tls() {
        let config = kube_config_from_yaml(&kubeconfig_yaml("https://127.0.0.1:4443"))
            .await
            .expect("kubeconfig loads");
        assert!(config.accept_invalid_certs);
        assert_eq!(config.cluster_url.to_string(), "https://127.0.0.1:4443/");
        assert!(config.auth_info.token.is_some());
    }
}
