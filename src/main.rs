//! `module-controller`: runs the controller (default) or the plugin author's tools.

use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use module_controller::config::RunArgs;
use module_controller::controller::{self, ControllerDeps};
use module_controller::metrics::Metrics;
use module_controller::plugin::{PluginConfig, PluginHost, PluginMetrics, PluginPolicies};
use module_controller::rollout::{BuiltinPolicies, PolicySource};
use tracing::{error, info};

#[derive(Parser)]
#[command(
    name = "module-controller",
    version,
    about = "Runs Koupleless modules on bases as Kubernetes pods on virtual nodes",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the controller (the default when no subcommand is given).
    Run(Box<RunArgs>),
    /// Plugin author tools: check a plugin, dry-run its decisions.
    #[command(subcommand)]
    Plugin(module_controller::plugin::cli::PluginCommand),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("info,kube=error,rumqttc=warn,rumqttd=off")
    });
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let settings = args.validate()?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes access: in-cluster config and KUBECONFIG both failed")?;
    info!(env = %settings.env, client_id = %settings.client_id, "starting module controller");
    let metrics = Metrics::new();
    let mut faults = None;
    let mut pool = None;
    let (policies, codecs): (Arc<dyn PolicySource>, _) = match &settings.plugins_dir {
        Some(dir) => {
            let mut cfg = PluginConfig::new(dir.clone());
            let limits = &settings.plugin_limits;
            if let Some(c) = &limits.cache_dir {
                cfg.cache_dir = c.clone();
            }
            cfg.call_budget = limits.call_budget;
            cfg.memory_limit_bytes = limits.memory_bytes;
            cfg.max_file_bytes = limits.max_file_bytes;
            cfg.compile_budget = limits.compile_budget;
            cfg.pool_workers = limits.workers;
            cfg.metrics = metrics.register_with(PluginMetrics::register);
            let host = PluginHost::start(cfg)
                .await
                .with_context(|| format!("starting the plugin host on {}", dir.display()))?;
            for p in host.status() {
                info!(plugin = %p.name, kind = ?p.kind, version = %p.version, "plugin loaded");
            }
            faults = Some(host.faults());
            pool =
                Some(std::sync::Arc::new(host.pool().clone()) as module_controller::offload::Pool);
            let codecs = host.codecs();
            (Arc::new(PluginPolicies(host)), codecs)
        }
        None => (Arc::new(BuiltinPolicies), controller::no_plugin_codecs()),
    };
    let handle = controller::start(
        settings.clone(),
        match pool {
            Some(p) => {
                ControllerDeps::new(client, policies, codecs, metrics.clone()).plugin_pool(p)
            }
            None => ControllerDeps::new(client, policies, codecs, metrics.clone()),
        },
    )
    .await?;
    if let Some(f) = faults {
        controller::report_plugin_faults(handle.api.clone(), f);
    }
    if let Some(addr) = settings.metrics_addr {
        let local = module_controller::server::serve(addr, metrics, handle.health.clone()).await?;
        info!(%local, "metrics and health endpoint listening");
    }
    let cancel = handle.cancel_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown signal received");
        cancel.cancel();
    });
    handle.wait().await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// With glibc's malloc the controller's RSS grew by a third over a 5,000-pod rollout and stayed
/// there; with mimalloc it grew by a tenth (BENCHMARKS.md). Feature `system-allocator` drops
/// it for heap profilers.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.cmd {
            Some(Cmd::Run(args)) => run(*args).await,
            Some(Cmd::Plugin(cmd)) => module_controller::plugin::cli::run(cmd),
            None => run(cli.run).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
