//! The quick start: a private local control plane, an embedded MQTT broker, the controller and a
//! few bases (the independent Arklet double); applies an example module Deployment and shows it becoming Ready.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arklet_double::{BaseConfig, Fleet, Transport};
use clap::Parser;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, Patch, PatchParams};

use crate::localenv::broker::EmbeddedBroker;
use crate::localenv::control_plane::{ControlPlane, ControlPlaneOptions};
use crate::localenv::ports::free_port;
use module_controller::config::Settings;
use module_controller::controller::{self, ControllerDeps};
use module_controller::metrics::Metrics;
use module_controller::rollout::BuiltinPolicies;
use module_controller::server;
use module_controller::vpod::status::is_ready;

/// Quick start options (`cargo run -p testkit --bin demo -- --help`).
#[derive(Debug, Clone, Parser)]
#[command(
    name = "demo",
    about = "Quick start: local control plane, embedded MQTT broker, the controller and Arklet base doubles"
)]
pub struct DemoArgs {
    /// Number of bases (Arklet doubles).
    #[arg(long, default_value_t = 3)]
    pub bases: usize,
    /// Module Deployment to apply (YAML).
    #[arg(long, default_value = "examples/module-deployment.yaml")]
    pub deployment: PathBuf,
    /// Stop everything once the modules are Ready (default: keep running until Ctrl-C).
    #[arg(long)]
    pub exit_when_ready: bool,
    /// Give up if the modules are not Ready within this many seconds.
    #[arg(long, default_value_t = 180)]
    pub timeout_secs: u64,
}

fn demo_settings(broker_port: u16, metrics_port: u16) -> Settings {
    let mut s = Settings::local("dev")
        .with_mqtt("127.0.0.1", broker_port)
        .with_heartbeat(Duration::from_secs(2), 3);
    s.client_id = "demo".into();
    s.resync = Duration::from_secs(10);
    s.command_timeout = Duration::from_secs(10);
    s.metrics_addr = Some(([127, 0, 0, 1], metrics_port).into());
    s
}

/// Logs to stderr, `RUST_LOG` or quiet defaults.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("warn,rumqttc=error,rumqttd=off,kube=error")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

async fn print_state(client: &kube::Client, app: &str) -> anyhow::Result<(usize, usize)> {
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::all(client.clone());
    println!("\n{:<34} {:<8}", "NODE", "READY");
    for n in nodes
        .list(&ListParams::default().labels("virtual-kubelet.koupleless.io/component=vnode"))
        .await?
        .items
    {
        let ready = n
            .status
            .and_then(|s| s.conditions)
            .and_then(|c| c.into_iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.status)
            .unwrap_or_else(|| "Unknown".into());
        println!("{:<34} {:<8}", n.metadata.name.unwrap_or_default(), ready);
    }
    println!(
        "{:<34} {:<7} {:<10} {:<26} STATE",
        "POD", "READY", "PHASE", "NODE"
    );
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?
        .items;
    let mut ready = 0;
    for p in &list {
        let r = is_ready(p.status.as_ref());
        ready += usize::from(r);
        let state = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .map(|s| {
                if s.running.is_some() {
                    "running".to_string()
                } else if let Some(w) = &s.waiting {
                    format!("waiting: {}", w.reason.clone().unwrap_or_default())
                } else {
                    "terminated".to_string()
                }
            })
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<34} {:<7} {:<10} {:<26} {}",
            p.metadata.name.clone().unwrap_or_default(),
            r,
            p.status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default(),
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_else(|| "<pending>".into()),
            state
        );
    }
    Ok((ready, list.len()))
}

/// Runs the quick start.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let yaml = std::fs::read_to_string(&args.deployment)
        .with_context(|| format!("reading {}", args.deployment.display()))?;
    let deployment: Deployment = serde_yaml::from_str(&yaml)
        .with_context(|| format!("{} is not a Deployment", args.deployment.display()))?;
    let name = deployment
        .metadata
        .name
        .clone()
        .context("the Deployment has no name")?;
    let ns = deployment
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let replicas = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .max(0) as usize;

    println!(
        "starting a local control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager)..."
    );
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .context("starting the local control plane (run scripts/provision.sh once to build it)")?;
    let client = cp.client().await?;
    let broker =
        EmbeddedBroker::start(free_port()?).context("starting the embedded MQTT broker")?;
    let metrics_port = free_port()?;
    println!("embedded MQTT broker on 127.0.0.1:{}", broker.port());

    let metrics = Metrics::new();
    let handle = controller::start(
        demo_settings(broker.port(), metrics_port),
        ControllerDeps::new(
            client.clone(),
            Arc::new(BuiltinPolicies),
            controller::no_plugin_codecs(),
            metrics.clone(),
        ),
    )
    .await?;
    server::serve(
        ([127, 0, 0, 1], metrics_port).into(),
        metrics,
        handle.health.clone(),
    )
    .await?;

    let mut template = BaseConfig::new("demo-base");
    template.env = "dev".into();
    template.name = "base".into();
    template.version = "1.0.0".into();
    template.heartbeat_interval = Duration::from_secs(2);
    template.install_time = Duration::from_millis(300);
    let fleet = Fleet::start(
        args.bases,
        template,
        Transport::Mqtt {
            host: "127.0.0.1".into(),
            port: broker.port(),
        },
    )
    .await
    .context("starting the bases")?;
    println!(
        "{} bases connected; applying {}",
        args.bases,
        args.deployment.display()
    );

    let api: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    api.patch(
        &name,
        &PatchParams::apply("module-controller-demo").force(),
        &Patch::Apply(&deployment),
    )
    .await
    .with_context(|| format!("applying Deployment {ns}/{name}"))?;

    let start = Instant::now();
    let mut done = false;
    while start.elapsed() < Duration::from_secs(args.timeout_secs) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (ready, total) = print_state(&client, &name).await?;
        if total == replicas.min(args.bases) && ready == total && total > 0 {
            done = true;
            break;
        }
    }
    if !done {
        bail!(
            "modules did not become Ready within {} s (logs: {})",
            args.timeout_secs,
            cp.log_dir().display()
        );
    }
    println!(
        "\nall {replicas} module pods are Running and Ready after {:.1} s.",
        start.elapsed().as_secs_f64()
    );
    for b in fleet.bases() {
        let active: Vec<String> = b.active_modules().iter().map(|k| k.to_string()).collect();
        println!("  base {} runs {:?}", b.identity(), active);
    }
    println!(
        "\npoint kubectl at it:\n  export KUBECONFIG={}\n  kubectl get nodes,pods -o wide\n  kubectl scale deployment/{name} --replicas=1\nmetrics: http://127.0.0.1:{metrics_port}/metrics",
        cp.kubeconfig_path().display()
    );
    if !args.exit_when_ready {
        println!("\nrunning until Ctrl-C");
        let _ = tokio::signal::ctrl_c().await;
    }
    println!("stopping: bases shut down gracefully, then the controller and the control plane");
    fleet.shutdown_graceful().await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    handle.stop().await?;
    drop(cp);
    Ok(())
}
