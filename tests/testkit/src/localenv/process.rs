//! Child processes that cannot outlive the test that started them.
//!
//! Every child is spawned from one dedicated, never-exiting thread with
//! `PR_SET_PDEATHSIG(SIGKILL)`: Linux delivers that signal when the *thread* that forked
//! the child exits, so spawning from a short-lived test thread would kill the child as
//! soon as that test's thread ends. Drop sends SIGTERM, escalates to SIGKILL after a grace
//! period, and reaps the child.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};

/// How long a process gets to exit after SIGTERM before it is SIGKILLed.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(2);

/// How often a stopping process is polled for exit.
const EXIT_POLL: Duration = Duration::from_millis(20);

/// A request to the spawner thread: the command, and where to send the spawned child.
struct SpawnRequest {
    command: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// The spawner thread's request queue, started on first use.
fn spawner() -> anyhow::Result<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    if let Some(tx) = SPAWNER.get() {
        return Ok(tx.lock().unwrap_or_else(|p| p.into_inner()).clone());
    }
    let (tx, rx) = mpsc::channel::<SpawnRequest>();
    thread::Builder::new()
        .name("localenv-spawner".into())
        .spawn(move || {
            // Holding `rx` keeps this thread alive until process exit: the senders live in
            // a static, so `recv` never reports disconnection.
            while let Ok(mut req) = rx.recv() {
                let result = req.command.spawn();
                // The requester may have given up; the child is then dropped unreaped,
                // which only leaks a zombie until process exit.
                let _ = req.reply.send(result);
            }
        })
        .context("starting the localenv spawner thread")?;
    let stored = SPAWNER.get_or_init(|| Mutex::new(tx));
    Ok(stored.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// A running child process with its output in a log file; stopped on drop.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    pid: u32,
    child: Option<Child>,
    log_path: PathBuf,
    exit_status: Option<ExitStatus>,
}

impl ManagedProcess {
    /// Spawns `command` with stdin closed and stdout+stderr appended to `log_path`.
    ///
    /// `name` labels the process in logs and errors.
    pub fn spawn(name: &str, mut command: Command, log_path: &Path) -> anyhow::Result<Self> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening log file {} for {name}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .with_context(|| format!("duplicating log file handle for {name}"))?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        let parent_pid = std::process::id();
        // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
        // functions (prctl, getppid, _exit); it allocates nothing and takes no locks.
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl; then nobody would ever
                // deliver the death signal.
                if libc::getppid() as u32 != parent_pid {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let program = command.get_program().to_string_lossy().into_owned();
        let (reply_tx, reply_rx) = mpsc::channel();
        spawner()?
            .send(SpawnRequest {
                command,
                reply: reply_tx,
            })
            .map_err(|_| anyhow!("the localenv spawner thread is gone"))?;
        let child = reply_rx
            .recv()
            .map_err(|_| anyhow!("the localenv spawner thread dropped the request for {name}"))?
            .with_context(|| format!("spawning {name} ({program})"))?;
        let pid = child.id();
        tracing::debug!(process = name, pid, log = %log_path.display(), "spawned process");
        Ok(Self {
            name: name.to_owned(),
            pid,
            child: Some(child),
            log_path: log_path.to_owned(),
            exit_status: None,
        })
    }

    /// The label given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The OS process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The file receiving the process's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status if the process has exited (reaping it), `None` while it runs.
    pub fn try_exit_status(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if let Some(status) = self.exit_status {
            return Ok(Some(status));
        }
        let Some(child) = self.child.as_mut() else {
            return Ok(self.exit_status);
        };
        let status = child
            .try_wait()
            .with_context(|| format!("polling {} (pid {})", self.name, self.pid))?;
        self.exit_status = status;
        Ok(status)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_exit_status(), Ok(None))
    }

    /// Sends SIGTERM without waiting, so several processes can shut down concurrently.
    pub fn terminate(&mut self) {
        if self.is_running() {
            self.send_signal(libc::SIGTERM);
            // A paused (SIGSTOPped) process acts on SIGTERM only once it runs again.
            self.send_signal(libc::SIGCONT);
        }
    }

    /// Stops the process: SIGTERM, SIGKILL after `grace`, then reaps it. Idempotent.
    pub fn stop_with_grace(&mut self, grace: Duration) {
        if self.child.is_none() {
            return;
        }
        self.terminate();
        let deadline = Instant::now() + grace;
        while self.is_running() && Instant::now() < deadline {
            thread::sleep(EXIT_POLL);
        }
        if let Some(mut child) = self.child.take()
            && self.exit_status.is_none()
        {
            tracing::warn!(
                process = %self.name,
                pid = self.pid,
                "did not exit after SIGTERM; sending SIGKILL"
            );
            if let Err(error) = child.kill() {
                tracing::warn!(process = %self.name, pid = self.pid, %error, "SIGKILL failed");
            }
            match child.wait() {
                Ok(status) => self.exit_status = Some(status),
                Err(error) => {
                    tracing::warn!(process = %self.name, pid = self.pid, %error, "reaping failed")
                }
            }
        }
        tracing::debug!(process = %self.name, pid = self.pid, status = ?self.exit_status, "process stopped");
    }

    /// Stops the process with [`DEFAULT_STOP_GRACE`]. Idempotent.
    pub fn stop(&mut self) {
        self.stop_with_grace(DEFAULT_STOP_GRACE);
    }

    /// Crashes the process: SIGKILL (no chance to clean up, as with an OOM kill or a node
    /// failure), then reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if self.exit_status.is_none() {
                if let Err(error) = child.kill() {
                    tracing::warn!(process = %self.name, pid = self.pid, %error, "SIGKILL failed");
                }
                match child.wait() {
                    Ok(status) => self.exit_status = Some(status),
                    Err(error) => {
                        tracing::warn!(process = %self.name, pid = self.pid, %error, "reaping failed")
                    }
                }
            }
            tracing::info!(process = %self.name, pid = self.pid, status = ?self.exit_status, "process killed");
        }
    }

    /// Freezes the process (SIGSTOP): its sockets stay open and connections are still
    /// accepted by the kernel, but nothing answers, as with a hung server.
    pub fn pause(&mut self) {
        if self.is_running() {
            self.send_signal(libc::SIGSTOP);
        }
    }

    /// Lets a paused process run again (SIGCONT). Harmless on a running process.
    pub fn resume(&mut self) {
        if self.is_running() {
            self.send_signal(libc::SIGCONT);
        }
    }

    /// The last `lines` lines of the process's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log_path, lines)
    }

    fn send_signal(&self, signal: libc::c_int) {
        let Ok(pid) = libc::pid_t::try_from(self.pid) else {
            return;
        };
        // SAFETY: kill(2) has no memory-safety preconditions. The child is not reaped yet
        // (we still own the `Child`), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, signal) };
        if rc != 0 {
            let error = io::Error::last_os_error();
            tracing::debug!(process = %self.name, pid = self.pid, signal, %error, "kill failed");
        }
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether a process with this pid exists (zombies included), via `kill(pid, 0)`.
pub fn pid_exists(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 performs only the existence and permission check.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// The last `lines` lines of a log file (at most the last 64 KiB), or a note why not.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX_BYTES: u64 = 64 * 1024;
    let read = || -> io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(MAX_BYTES)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("<cannot read {}: {error}>", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drop_stops_the_process_and_logs_are_captured() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sh.log");
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello-out; echo hello-err >&2; exec sleep 30"]);
        let mut proc = ManagedProcess::spawn("sh", cmd, &log).expect("spawn sh");
        let pid = proc.pid();
        assert!(proc.is_running());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proc.log_tail(10).contains("hello-err") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let tail = proc.log_tail(10);
        assert!(
            tail.contains("hello-out") && tail.contains("hello-err"),
            "{tail}"
        );
        drop(proc);
        assert!(!pid_exists(pid), "pid {pid} survived drop");
    }

    #[test]
    fn sigterm_ignoring_process_is_killed_after_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("stubborn.log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap '' TERM; echo ready; while true; do sleep 0.05; done",
        ]);
        let mut proc = ManagedProcess::spawn("stubborn", cmd, &log).expect("spawn sh");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proc.log_tail(1).contains("ready") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let pid = proc.pid();
        let started = Instant::now();
        proc.stop_with_grace(Duration::from_millis(300));
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(!pid_exists(pid), "pid {pid} survived SIGKILL");
        assert!(!proc.is_running());
    }

    #[test]
    fn kill_is_abrupt_and_pause_freezes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("ticker.log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap 'echo got-term; exit 0' TERM; while true; do echo tick; sleep 0.05; done",
        ]);
        let mut proc = ManagedProcess::spawn("ticker", cmd, &log).expect("spawn sh");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !proc.log_tail(1).contains("tick") && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        proc.pause();
        thread::sleep(Duration::from_millis(200));
        let frozen = std::fs::read_to_string(&log).expect("log").len();
        thread::sleep(Duration::from_millis(300));
        assert_eq!(
            std::fs::read_to_string(&log).expect("log").len(),
            frozen,
            "a paused process wrote on"
        );
        proc.resume();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&log).expect("log").len() == frozen
            && Instant::now() < deadline
        {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(std::fs::read_to_string(&log).expect("log").len() > frozen);
        let pid = proc.pid();
        proc.kill();
        assert!(!pid_exists(pid), "pid {pid} survived SIGKILL");
        assert!(
            !proc.log_tail(5).contains("got-term"),
            "kill must not give the process a SIGTERM"
        );
    }

    #[test]
    fn spawn_failure_names_the_process() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = ManagedProcess::spawn(
            "ghost",
            Command::new("/nonexistent/binary"),
            &dir.path().join("g.log"),
        )
        .expect_err("spawning a missing binary fails");
        assert!(format!("{err:#}").contains("ghost"), "{err:#}");
    }
}
