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

    /// The OS process id of the current process.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// Resident memory of the current process (KiB; 0 when it is not running).
    pub fn rss_kib(&self) -> u64 {
        self.pid().map_or(0, |p| rss_kib(&p.to_string()))
    }

    /// The established TCP connections of the current process.
    pub fn connections(&self) -> Vec<Connection> {
        self.pid()
            .map_or_else(Vec::new, |p| connections(&p.to_string()))
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

/// One end of an established TCP connection of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connection {
    /// This end's port.
    pub local: u16,
    /// The other end's port.
    pub remote: u16,
}

/// Resident memory (KiB) of process `pid` (`self` for this one); 0 when unknown.
pub fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The established TCP connections of process `pid` (`self` for this one): the sockets of
/// its file descriptors, looked up in the kernel's TCP tables.
pub fn connections(pid: &str) -> Vec<Connection> {
    let inodes: std::collections::BTreeSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    l.to_str()?
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    let port = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
            .unwrap_or(0)
    };
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // Fields: sl local remote state … inode (10th); state 01 is ESTABLISHED.
            if f.len() < 10 || f[3] != "01" {
                continue;
            }
            if f[9].parse().is_ok_and(|i: u64| inodes.contains(&i)) {
                out.push(Connection {
                    local: port(f[1]),
                    remote: port(f[2]),
                });
            }
        }
    }
    out
}
