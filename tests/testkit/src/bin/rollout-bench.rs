//! Benchmark: time of a rolling update over N bases through the controller, compared with the
//! same Deployment's pacing when pods become Ready the moment they are bound (no controller, no
//! bases) — the ratio is the controller's overhead — and apiserver writes per updated pod.
//!
//! `cargo run --release --bin rollout-bench -- [--bases 20] [--install-latency-ms 0]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arklet_double::{BaseConfig, Fleet, Transport};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use module_controller::config::Settings;
use module_controller::controller::{self, ControllerDeps};
use module_controller::metrics::Metrics;
use module_controller::rollout::BuiltinPolicies;
use module_controller::vpod::status::is_ready;
use serde_json::json;
use testkit::localenv::broker::Mosquitto;
use testkit::localenv::control_plane::{ControlPlane, ControlPlaneOptions};

#[derive(Parser)]
struct Args {
    /// Bases (and replicas).
    #[arg(long, default_value_t = 20)]
    bases: usize,
    /// How long each module takes to start on a base (stays RESOLVED meanwhile).
    #[arg(long, default_value_t = 0)]
    install_latency_ms: u64,
    /// Bases disable Nagle's algorithm on their MQTT socket (Paho, a real Arklet's client,
    /// does not).
    #[arg(long)]
    base_tcp_nodelay: bool,
}

fn deployment(
    ns: &str,
    base_name: &str,
    env: &str,
    version: &str,
    replicas: usize,
) -> anyhow::Result<Deployment> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "bench", "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "bench"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "bench", "version": version, "virtual-kubelet.koupleless.io/component": "module"}},
                "spec": {
                    "containers": [{"name": "benchbiz", "image": format!("https://example.invalid/benchbiz-{version}.jar"), "env": [{"name": "BIZ_VERSION", "value": version}]}],
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "base.koupleless.io/name", "operator": "In", "values": [base_name]}]}]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                            "labelSelector": {"matchLabels": {"app": "bench", "version": version}}, "topologyKey": "kubernetes.io/hostname"}]}
                    },
                    "tolerations": [
                        {"key": "schedule.koupleless.io/virtual-node", "operator": "Equal", "value": "True", "effect": "NoExecute"},
                        {"key": "schedule.koupleless.io/node-env", "operator": "Equal", "value": env, "effect": "NoExecute"}
                    ]
                }
            }
        }
    }))?)
}

async fn wait_rolled(
    pods: &Api<Pod>,
    version: &str,
    n: usize,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let list = pods
            .list(&ListParams::default().labels("app=bench"))
            .await?
            .items;
        let done = list.len() == n
            && list.iter().all(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && is_ready(p.status.as_ref())
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("version"))
                        .map(String::as_str)
                        == Some(version)
            });
        if done {
            return Ok(());
        }
        anyhow::ensure!(
            start.elapsed() < timeout,
            "rollout to {version} did not finish in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn make_ns(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}}))?,
    )
    .await?;
    Ok(())
}

/// A stand-in kubelet for the baseline: every bound pod is Ready at once; deletions are final at once.
fn instant_kubelet(client: kube::Client, ns: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pods: Api<Pod> = Api::namespaced(client, &ns);
        let mut s = watcher(pods.clone(), watcher::Config::default().labels("app=bench")).boxed();
        while let Some(Ok(ev)) = s.next().await {
            let (watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = ev else {
                continue;
            };
            let name = p.metadata.name.clone().unwrap_or_default();
            if p.metadata.deletion_timestamp.is_some() {
                let _ = pods
                    .delete(
                        &name,
                        &DeleteParams {
                            grace_period_seconds: Some(0),
                            ..Default::default()
                        },
                    )
                    .await;
            } else if p.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some()
                && !is_ready(p.status.as_ref())
            {
                let now = k8s_openapi::jiff::Timestamp::now().to_string();
                let st = json!({"status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": now},
                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}]}});
                let _ = pods
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&st))
                    .await;
            }
        }
    })
}

async fn rollout(
    client: &kube::Client,
    ns: &str,
    base_name: &str,
    env: &str,
    n: usize,
) -> anyhow::Result<Duration> {
    let deps: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pp = PatchParams::apply("rollout-bench").force();
    deps.patch(
        "bench",
        &pp,
        &Patch::Apply(&deployment(ns, base_name, env, "1.0.0", n)?),
    )
    .await?;
    wait_rolled(&pods, "1.0.0", n, Duration::from_secs(300)).await?;
    let start = Instant::now();
    deps.patch(
        "bench",
        &pp,
        &Patch::Apply(&deployment(ns, base_name, env, "2.0.0", n)?),
    )
    .await?;
    wait_rolled(&pods, "2.0.0", n, Duration::from_secs(600)).await?;
    Ok(start.elapsed())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    // Logs only when asked (RUST_LOG), to trace one pod's critical path.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .try_init();
    }
    let n = args.bases;
    let cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .context("control plane (run scripts/provision.sh)")?;
    let client = cp.client().await?;

    // Baseline: plain nodes that accept the module pods, and an instant kubelet.
    make_ns(&client, "baseline").await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for i in 0..n {
        let name = format!("plain-{i}");
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": {
            "base.koupleless.io/name": "plainbase", "kubernetes.io/hostname": name}}}))?;
        nodes.create(&PostParams::default(), &node).await?;
        let st = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": k8s_openapi::jiff::Timestamp::now().to_string()}],
            "allocatable": {"cpu": "100", "memory": "100Gi", "pods": "100"}, "capacity": {"cpu": "100", "memory": "100Gi", "pods": "100"}}});
        nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&st))
            .await?;
    }
    let kubelet = instant_kubelet(client.clone(), "baseline".into());
    let baseline = rollout(&client, "baseline", "plainbase", "dev", n).await?;
    kubelet.abort();

    // Through the controller, with Arklet double bases over a real broker.
    let broker = Mosquitto::start().await?;
    make_ns(&client, "bench").await?;
    let mut settings = Settings::local("bench")
        .with_mqtt(broker.host(), broker.port())
        .with_heartbeat(Duration::from_secs(2), 3);
    settings.client_id = "bench".into();
    settings.command_timeout = Duration::from_secs(10);
    let metrics = Metrics::new();
    let handle = controller::start(
        settings,
        ControllerDeps::new(
            client.clone(),
            Arc::new(BuiltinPolicies),
            controller::no_plugin_codecs(),
            metrics.clone(),
        ),
    )
    .await?;
    let mut template = BaseConfig::new("bench-base");
    template.env = "bench".into();
    template.name = "benchbase".into();
    template.heartbeat_interval = Duration::from_secs(2);
    template.install_time = Duration::from_millis(args.install_latency_ms);
    template.tcp_nodelay = args.base_tcp_nodelay;
    let fleet = Fleet::start(
        n,
        template,
        Transport::Mqtt {
            host: broker.host().into(),
            port: broker.port(),
        },
    )
    .await?;
    let writes_ok = |k: &'static str| metrics.api.ok(k);
    let writes_before = ["pod_status", "pod_delete", "event"].map(writes_ok);
    let with_controller = rollout(&client, "bench", "benchbase", "bench", n).await?;
    let writes_after = ["pod_status", "pod_delete", "event"].map(writes_ok);
    // `rollout` installs v1 on every base, then updates to v2: 2n pods in all.
    let per_pod: Vec<f64> = writes_before
        .iter()
        .zip(writes_after.iter())
        .map(|(b, a)| (a - b) as f64 / (2 * n) as f64)
        .collect();

    println!(
        "rolling update of {n} module pods (maxSurge 1, maxUnavailable 0), install latency {} ms, \
         bases' MQTT sockets {}",
        args.install_latency_ms,
        if args.base_tcp_nodelay {
            "TCP_NODELAY"
        } else {
            "with Nagle's algorithm (as Paho's)"
        }
    );
    println!(
        "  baseline (pods Ready when bound):  {:>8.2} s",
        baseline.as_secs_f64()
    );
    println!(
        "  through the controller:            {:>8.2} s",
        with_controller.as_secs_f64()
    );
    println!(
        "  ratio (controller / baseline):     {:>8.2}",
        with_controller.as_secs_f64() / baseline.as_secs_f64()
    );
    println!("  apiserver writes per pod (install + update, both versions):");
    println!(
        "    pod status {:.2}, pod delete {:.2}, events {:.2}",
        per_pod[0], per_pod[1], per_pod[2]
    );
    fleet.shutdown_graceful().await;
    handle.stop().await?;
    drop(cp);
    Ok(())
}
