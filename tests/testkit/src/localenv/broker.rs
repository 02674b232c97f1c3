//! MQTT brokers for tests and the quick start: a real mosquitto process, and rumqttd
//! embedded in this process.

use std::collections::HashMap;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tempfile::TempDir;

use super::binaries;
use super::ports::{free_port, is_listening};
use super::process::ManagedProcess;
use super::{keep_dir, keep_test_dirs, owned_temp_dir};

/// How long a broker may take to accept TCP connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a broker.
const POLL: Duration = Duration::from_millis(25);
/// Loopback host both brokers listen on.
const HOST: &str = "127.0.0.1";
/// Largest MQTT payload the embedded broker accepts; module lists of a busy base exceed
/// rumqttd's 20 KiB example default.
const EMBEDDED_MAX_PAYLOAD: usize = 16 * 1024 * 1024;

/// A mosquitto broker process on a private loopback port; stopped on drop.
#[derive(Debug)]
pub struct Mosquitto {
    port: u16,
    binary: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
    process: Option<ManagedProcess>,
    dir: Option<TempDir>,
}

impl Mosquitto {
    /// Starts mosquitto (anonymous, no persistence) on a free port and waits until it accepts
    /// connections.
    pub async fn start() -> anyhow::Result<Mosquitto> {
        let binary = binaries::resolve_mosquitto()?;
        let port = free_port()?;
        let dir = owned_temp_dir("mc-mosquitto-")?;
        let config_path = dir.path().join("mosquitto.conf");
        fs::write(&config_path, config_text(port))
            .with_context(|| format!("writing {}", config_path.display()))?;
        let mut broker = Mosquitto {
            port,
            binary,
            log_path: dir.path().join("mosquitto.log"),
            config_path,
            process: None,
            dir: Some(dir),
        };
        broker.launch().await?;
        tracing::info!(port, pid = ?broker.pid(), "mosquitto started");
        Ok(broker)
    }

    /// The host to connect to.
    pub fn host(&self) -> &str {
        HOST
    }

    /// The listening port (unchanged across [`Mosquitto::restart`]).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// The broker's log file (appended to across restarts).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops the broker (SIGTERM, then SIGKILL). Idempotent; [`Mosquitto::restart`] brings
    /// it back.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.stop();
            tracing::info!(port = self.port, "mosquitto stopped");
        }
    }

    /// Stops the broker if it runs and starts it again on the same port; clients see a
    /// dropped connection and must reconnect (no session state survives: persistence is off).
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.launch().await?;
        tracing::info!(port = self.port, pid = ?self.pid(), "mosquitto restarted");
        Ok(())
    }

    async fn launch(&mut self) -> anyhow::Result<()> {
        let mut command = Command::new(&self.binary);
        command.arg("-c").arg(&self.config_path);
        let mut process = ManagedProcess::spawn("mosquitto", command, &self.log_path)?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = process.try_exit_status()? {
                bail!(
                    "mosquitto on port {} exited during start-up ({status}); last lines of {}:\n{}",
                    self.port,
                    self.log_path.display(),
                    process.log_tail(20)
                );
            }
            if TcpStream::connect((HOST, self.port)).is_ok() {
                self.process = Some(process);
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "mosquitto did not accept connections on port {} within {READY_TIMEOUT:?}; last lines of {}:\n{}",
                    self.port,
                    self.log_path.display(),
                    process.log_tail(20)
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
        if let Some(dir) = self.dir.take() {
            if keep_test_dirs() {
                let kept = keep_dir(dir);
                tracing::info!(dir = %kept.display(), "keeping mosquitto dir (MC_KEEP_TEST_DIRS=1)");
            } else if let Err(error) = dir.close() {
                tracing::warn!(%error, "removing mosquitto temp dir failed");
            }
        }
    }
}

fn config_text(port: u16) -> String {
    // Started as root, mosquitto switches to the `mosquitto` user, and changing credentials
    // clears PR_SET_PDEATHSIG: it would outlive a killed test. Staying root keeps the signal.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root\n"
    } else {
        ""
    };
    format!(
        "# generated by module_controller::localenv::broker
{user}listener {port} {HOST}
allow_anonymous true
persistence false
log_dest stdout
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
log_timestamp true
# As a broker for bases should be set up: without it, every small publish that follows
# another waits for the peer's delayed ACK, some 40 ms per hop.
set_tcp_nodelay true
"
    )
}

/// rumqttd running inside this process, for the quick start (nothing to install).
///
/// rumqttd has no shutdown API, so the broker lives until the process exits.
#[derive(Debug)]
pub struct EmbeddedBroker {
    port: u16,
}

impl EmbeddedBroker {
    /// Starts an MQTT 3.1.1 broker on `127.0.0.1:port` and waits until it accepts connections.
    pub fn start(port: u16) -> anyhow::Result<EmbeddedBroker> {
        // rumqttd only logs a bind failure from its server thread; probe first to turn an
        // occupied port into an error.
        TcpListener::bind((Ipv4Addr::LOCALHOST, port))
            .with_context(|| format!("port {port} is not free for the embedded MQTT broker"))?;
        let mut broker = rumqttd::Broker::new(embedded_config(port));
        thread::Builder::new()
            .name(format!("rumqttd-{port}"))
            .spawn(move || {
                if let Err(error) = broker.start() {
                    tracing::error!(port, %error, "embedded MQTT broker stopped");
                }
            })
            .context("starting the embedded MQTT broker thread")?;
        let deadline = Instant::now() + READY_TIMEOUT;
        // A probe connection would make rumqttd log a failed CONNECT; look at the socket table.
        while !is_listening(port)? {
            if Instant::now() > deadline {
                bail!(
                    "embedded MQTT broker did not listen on port {port} within {READY_TIMEOUT:?}"
                );
            }
            thread::sleep(POLL);
        }
        tracing::info!(port, "embedded MQTT broker started");
        Ok(EmbeddedBroker { port })
    }

    /// The listening port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn embedded_config(port: u16) -> rumqttd::Config {
    let server = rumqttd::ServerSettings {
        name: format!("v4-{port}"),
        listen: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: EMBEDDED_MAX_PAYLOAD,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: 10_010,
            max_outgoing_packet_count: 200,
            max_segment_size: 100 * 1024 * 1024,
            max_segment_count: 10,
            ..Default::default()
        },
        v4: Some(HashMap::from([(server.name.clone(), server)])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosquitto_config_listens_on_loopback_only() {
        let text = config_text(4242);
        assert!(text.contains("listener 4242 127.0.0.1\n"));
        assert!(text.contains("persistence false\n"));
    }

    #[test]
    fn embedded_broker_rejects_an_occupied_port() {
        let squatter = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let port = squatter.local_addr().expect("addr").port();
        let err = EmbeddedBroker::start(port).expect_err("occupied port must fail");
        assert!(format!("{err:#}").contains("not free"), "{err:#}");
    }
}
