//! The real controller binary as a child process: configured by environment variables, as in
//! a cluster, and crashed with SIGKILL.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::localenv::ports::free_port;
use testkit::localenv::process::ManagedProcess;

use super::TestEnv;

/// The controller binary built with these tests.
pub const BINARY: &str = env!("CARGO_BIN_EXE_module-controller");

/// The `module-controller` binary, run as a process.
pub struct ControllerProcess {
    process: Option<ManagedProcess>,
    vars: Vec<(String, String)>,
    /// Where `/metrics`, `/readyz` listen (a new port at each start).
    pub metrics_addr: SocketAddr,
    /// Log of every run (appended).
    pub log: PathBuf,
    _dir: tempfile::TempDir,
    /// Processes started so far.
    pub starts: u32,
}

impl ControllerProcess {
    /// The environment of a controller for `env`'s bases (MQTT through its broker, 1 s
    /// heartbeats, NotReady after 3 misses, 3 s command timeout, resync every 5 s).
    pub fn vars(env: &TestEnv) -> Vec<(String, String)> {
        [
            ("KUBECONFIG", env.cp.kubeconfig_path().display().to_string()),
            ("ENV", env.env.clone()),
            ("CLIENT_ID", format!("proc-{}", env.env)),
            ("ENABLE_MQTT_TUNNEL", "true".into()),
            ("MQTT_BROKER", env.broker.host().to_string()),
            ("MQTT_PORT", env.broker.port().to_string()),
            ("HEARTBEAT_PERIOD_SECS", "1".into()),
            ("HEARTBEAT_MISSES", "3".into()),
            ("COMMAND_TIMEOUT_SECS", "3".into()),
            ("RESYNC_SECS", "5".into()),
            ("RUST_LOG", "info,kube=warn,rumqttc=warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Starts the binary with `vars` and waits until `/readyz` answers 200.
    pub async fn start(vars: Vec<(String, String)>) -> ControllerProcess {
        let dir = tempfile::Builder::new()
            .prefix("mc-controller-proc-")
            .tempdir()
            .expect("temp dir");
        let mut p = ControllerProcess {
            process: None,
            vars,
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log: dir.path().join("module-controller.log"),
            _dir: dir,
            starts: 0,
        };
        p.launch().await;
        p
    }

    async fn launch(&mut self) {
        let port = free_port().expect("free port");
        self.metrics_addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(BINARY);
        // Nothing of the test's own environment (a KUBECONFIG of the developer) leaks in.
        cmd.env_clear();
        for (k, v) in &self.vars {
            cmd.env(k, v);
        }
        cmd.env("METRICS_ADDR", self.metrics_addr.to_string());
        if let Ok(path) = std::env::var("PATH") {
            cmd.env("PATH", path);
        }
        let process = ManagedProcess::spawn("module-controller", cmd, &self.log)
            .expect("module-controller starts");
        self.starts += 1;
        tracing::info!(pid = process.pid(), start = self.starts, log = %self.log.display(), "module-controller process started");
        self.process = Some(process);
        let started = Instant::now();
        loop {
            if let Some((200, _)) = self.readyz().await {
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "module-controller process ready"
                );
                return;
            }
            let p = self.process.as_mut().expect("process");
            if !p.is_running() || started.elapsed() > Duration::from_secs(60) {
                panic!(
                    "module-controller did not become ready (running: {}); log tail:\n{}",
                    p.is_running(),
                    p.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: the process dies on the spot, with commands and writes in flight. Returns how
    /// it ended.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        let mut p = self.process.take().expect("the controller process runs");
        p.kill();
        p.try_exit_status()
            .expect("exit status")
            .expect("the process ended")
    }

    /// Starts the binary again (after [`ControllerProcess::kill`]) and waits until ready.
    pub async fn restart(&mut self) {
        if self.process.is_some() {
            self.kill();
        }
        self.launch().await;
    }

    /// Whether the current process runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }

    /// `/readyz`: (status, body), None when nothing answers.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        super::faults::http_get(&format!("http://{}/readyz", self.metrics_addr)).await
    }

    /// `/metrics` text ("" when nothing answers).
    pub async fn metrics(&self) -> String {
        super::faults::http_get(&format!("http://{}/metrics", self.metrics_addr))
            .await
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        testkit::localenv::process::log_tail(&self.log, lines)
    }

    /// Lines of the log (all runs) containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "module-controller log tail ({}):\n{}",
                self.log.display(),
                self.log_tail(80)
            );
        }
    }
}
