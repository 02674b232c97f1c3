//! `base-sim`: runs simulated Koupleless bases that speak the Arklet protocol over MQTT or
//! HTTP, until SIGINT/SIGTERM, then shuts them down gracefully (DEACTIVATED heartbeats).

use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser};
use testkit::sim::{SimBaseConfig, SimFleet, SimTransport};
use tracing_subscriber::EnvFilter;

/// Simulated Koupleless bases for local runs and scale tests.
#[derive(Debug, Parser)]
#[command(name = "base-sim", version)]
#[command(group(ArgGroup::new("tunnel").required(true).args(["mqtt_host", "http_controller"])))]
struct Args {
    /// MQTT broker host (MQTT tunnel); exclusive with --http-controller.
    #[arg(long, env = "BASE_SIM_MQTT_HOST")]
    mqtt_host: Option<String>,
    /// MQTT broker port.
    #[arg(long, env = "BASE_SIM_MQTT_PORT", default_value_t = 1883)]
    mqtt_port: u16,
    /// MQTT user name, if the broker needs one.
    #[arg(long, env = "BASE_SIM_MQTT_USERNAME")]
    mqtt_username: Option<String>,
    /// MQTT password, if the broker needs one.
    #[arg(long, env = "BASE_SIM_MQTT_PASSWORD")]
    mqtt_password: Option<String>,
    /// MQTT client id prefix (client id is `<prefix>@@@<identity>`).
    #[arg(long, default_value = "koupleless")]
    client_prefix: String,
    /// Controller URL for the HTTP tunnel, e.g. http://127.0.0.1:7777.
    #[arg(long, env = "BASE_SIM_HTTP_CONTROLLER")]
    http_controller: Option<String>,
    /// Arklet HTTP port of the first base (base i listens on port+i); 0 picks free ports.
    #[arg(long, default_value_t = 0)]
    http_port: u16,
    /// How many bases to run.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Identity prefix: bases are `<prefix>-0`, `<prefix>-1`, ...
    #[arg(long, default_value = "sim-base")]
    id_prefix: String,
    /// Controller environment (topics `koupleless_<env>/...`).
    #[arg(long, env = "BASE_SIM_ENV", default_value = "dev")]
    env: String,
    /// Base application name (baseMetadata.name).
    #[arg(long, default_value = "base")]
    base_name: String,
    /// Base version (baseMetadata.version).
    #[arg(long, default_value = "1.0.0")]
    base_version: String,
    /// Cluster name (baseMetadata.clusterName).
    #[arg(long, default_value = "default")]
    cluster: String,
    /// Reported localIP of every base.
    #[arg(long, default_value = "127.0.0.1")]
    local_ip: String,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// Milliseconds an install or uninstall takes.
    #[arg(long, default_value_t = 0)]
    install_latency_ms: u64,
    /// Make installs of this module (any version) fail with InstallBizFailed; repeatable.
    #[arg(long = "fail-module", value_name = "NAME")]
    fail_modules: Vec<String>,
}

impl Args {
    fn transport(&self) -> anyhow::Result<SimTransport> {
        match (&self.mqtt_host, &self.http_controller) {
            (Some(host), None) => Ok(SimTransport::Mqtt {
                host: host.clone(),
                port: self.mqtt_port,
            }),
            (None, Some(url)) => Ok(SimTransport::Http {
                controller_url: url.clone(),
                listen_port: self.http_port,
            }),
            _ => anyhow::bail!("give exactly one of --mqtt-host or --http-controller"),
        }
    }

    fn template(&self) -> SimBaseConfig {
        let mut cfg = SimBaseConfig::new(&self.id_prefix);
        cfg.name = self.base_name.clone();
        cfg.version = self.base_version.clone();
        cfg.cluster_name = self.cluster.clone();
        cfg.env = self.env.clone();
        cfg.local_ip = self.local_ip.clone();
        cfg.heartbeat_interval = Duration::from_secs(self.heartbeat_secs.max(1));
        cfg.install_latency = Duration::from_millis(self.install_latency_ms);
        cfg.client_prefix = self.client_prefix.clone();
        cfg.mqtt_username = self.mqtt_username.clone();
        cfg.mqtt_password = self.mqtt_password.clone();
        cfg
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let transport = args.transport()?;
    let fleet = SimFleet::start(args.count, args.template(), transport)
        .await
        .context("starting simulated bases")?;
    for base in fleet.bases() {
        for name in &args.fail_modules {
            base.fail_installs(
                name,
                "InstallBizFailed",
                "install failure scripted by --fail-module",
            );
        }
    }
    tracing::info!(count = args.count, prefix = %args.id_prefix, "simulated bases running; Ctrl-C to stop");
    wait_for_signal().await?;
    tracing::info!("shutting down gracefully");
    fleet.shutdown_all().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}
