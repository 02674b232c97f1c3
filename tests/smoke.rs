//! Smoke test of the local environment: a real control plane schedules a Deployment's pod
//! onto a hand-made Node, an Arklet double base heartbeats through a real mosquitto, the
//! embedded broker routes messages, and every process the test started is gone afterwards.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use arklet_double::{Base, BaseConfig, Transport};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, Namespace, Node, NodeSpec, Pod, PodSpec, PodTemplateSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use testkit::localenv::broker::{EmbeddedBroker, Mosquitto};
use testkit::localenv::control_plane::{ControlPlane, ControlPlaneOptions};
use testkit::localenv::ports::free_port;
use testkit::localenv::process::pid_exists;

const VNODE_TAINT_KEY: &str = "schedule.koupleless.io/virtual-node";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rumqttd=warn")),
        )
        .with_test_writer()
        .try_init();
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}

/// Asserts within a few seconds that none of the pids exists any more.
fn assert_all_gone(pids: &[(String, u32)]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut alive: Vec<&(String, u32)> = pids.iter().collect();
    while !alive.is_empty() && Instant::now() < deadline {
        alive.retain(|(_, pid)| pid_exists(*pid));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        alive.is_empty(),
        "processes survived their owner: {alive:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_schedules_a_deployment_onto_a_virtual_node() {
    init_tracing();
    let started = Instant::now();
    let mut cp = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts");
    let startup = started.elapsed();
    eprintln!("control plane ready in {startup:?} at {}", cp.api_url());
    let pids = cp.pids();
    assert_eq!(pids.len(), 4, "etcd, apiserver, scheduler, kcm: {pids:?}");
    assert!(pids.iter().all(|(_, pid)| pid_exists(*pid)));
    assert!(cp.kubeconfig_path().is_file());

    let result = schedule_scenario(&cp).await;
    if let Err(error) = &result {
        eprintln!("{error:#}\ncomponent logs:\n{}", cp.log_tails(40));
    }
    result.expect("the scheduler binds the deployment's pod to the node");

    let stopping = Instant::now();
    cp.stop();
    eprintln!("control plane stopped in {:?}", stopping.elapsed());
    assert_all_gone(&pids);
    // stop is idempotent and Drop after stop is a no-op.
    cp.stop();
    drop(cp);
}

async fn schedule_scenario(cp: &ControlPlane) -> anyhow::Result<()> {
    let client = cp.client().await?;
    let id = short_id();
    let ns = format!("smoke-{id}");
    let node_name = format!("vnode.smoke-{id}.dev");

    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .context("creating the namespace")?;

    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &virtual_node(&node_name))
        .await
        .context("creating the node")?;
    // Keep the Ready heartbeat fresh, as a real node agent would, so the node lifecycle
    // controller never marks it unreachable while the test runs.
    let heartbeat = tokio::spawn({
        let nodes = nodes.clone();
        let node_name = node_name.clone();
        async move {
            loop {
                if let Err(error) = patch_node_ready(&nodes, &node_name).await {
                    tracing::warn!(%error, "node heartbeat failed");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    });
    let outcome = async {
        patch_node_ready(&nodes, &node_name).await?;
        Api::<Deployment>::namespaced(client.clone(), &ns)
            .create(&PostParams::default(), &deployment(&node_name))
            .await
            .context("creating the deployment")?;
        wait_for_binding(&Api::<Pod>::namespaced(client.clone(), &ns), &node_name).await
    }
    .await;
    heartbeat.abort();
    outcome
}

fn virtual_node(name: &str) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                ("kubernetes.io/hostname".to_owned(), name.to_owned()),
                ("type".to_owned(), "virtual-kubelet".to_owned()),
            ])),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            taints: Some(vec![Taint {
                key: VNODE_TAINT_KEY.to_owned(),
                value: Some("True".to_owned()),
                effect: "NoExecute".to_owned(),
                time_added: None,
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

async fn patch_node_ready(nodes: &Api<Node>, name: &str) -> anyhow::Result<()> {
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let resources = serde_json::json!({"cpu": "8", "memory": "16Gi", "pods": "110"});
    let status = serde_json::json!({
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "conditions": [{
                "type": "Ready",
                "status": "True",
                "reason": "SmokeTest",
                "message": "heartbeat from the smoke test",
                "lastHeartbeatTime": now,
                "lastTransitionTime": now,
            }],
        }
    });
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Strategic(&status))
        .await
        .context("patching the node status")?;
    Ok(())
}

fn deployment(node_name: &str) -> Deployment {
    let labels = BTreeMap::from([("app".to_owned(), "smoke".to_owned())]);
    Deployment {
        metadata: ObjectMeta {
            name: Some("smoke".to_owned()),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "biz".to_owned(),
                        image: Some("biz1:0.0.1".to_owned()),
                        ..Default::default()
                    }],
                    node_selector: Some(BTreeMap::from([(
                        "kubernetes.io/hostname".to_owned(),
                        node_name.to_owned(),
                    )])),
                    tolerations: Some(vec![Toleration {
                        key: Some(VNODE_TAINT_KEY.to_owned()),
                        operator: Some("Equal".to_owned()),
                        value: Some("True".to_owned()),
                        effect: Some("NoExecute".to_owned()),
                        toleration_seconds: None,
                    }]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

async fn wait_for_binding(pods: &Api<Pod>, node_name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let selector = ListParams::default().labels("app=smoke");
    loop {
        let list = pods.list(&selector).await.context("listing pods")?;
        let bound: Vec<Option<String>> = list
            .items
            .iter()
            .map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
            .collect();
        if bound.iter().any(|n| n.as_deref() == Some(node_name)) {
            ensure!(list.items.len() == 1, "expected one pod, got {bound:?}");
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no pod bound to {node_name} within 60s; pods and their nodes: {bound:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Subscribes on `filter` and returns the client with its event loop once the broker acked.
async fn subscriber(
    host: &str,
    port: u16,
    filter: &str,
) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let mut opts = MqttOptions::new(format!("smoke-sub-{}", short_id()), host, port);
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 64);
    client.subscribe(filter, QoS::AtLeastOnce).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return Ok((client, events)),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => bail!("subscriber on {host}:{port}: {error}"),
            Err(_) => bail!("no SUBACK from {host}:{port} within 10s"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arklet_double_base_heartbeats_through_mosquitto() {
    init_tracing();
    let mut broker = Mosquitto::start().await.expect("mosquitto starts");
    let first_pid = broker.pid().expect("mosquitto runs");
    assert!(pid_exists(first_pid));

    let (_sub, mut events) =
        subscriber(broker.host(), broker.port(), "koupleless_dev/+/base/heart")
            .await
            .expect("subscribed");
    let mut cfg = BaseConfig::new("smoke-1");
    cfg.heartbeat_interval = Duration::from_secs(1);
    let base = Base::start(
        cfg,
        Transport::Mqtt {
            host: broker.host().to_owned(),
            port: broker.port(),
        },
    )
    .await
    .expect("the base starts");

    // A base may beat once right after connecting; requiring the beats to span most of an
    // interval proves the periodic heartbeat, not just the greeting.
    let mut heartbeats = Vec::new();
    let mut first_at = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while heartbeats.len() < 2
        || first_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(900))
    {
        let Ok(polled) = tokio::time::timeout_at(deadline, events.poll()).await else {
            panic!("only {} heartbeats within 20s", heartbeats.len());
        };
        let event = polled.expect("subscriber connection stays up");
        if let Event::Incoming(Packet::Publish(publish)) = event {
            assert_eq!(publish.topic, "koupleless_dev/smoke-1/base/heart");
            let envelope: serde_json::Value =
                serde_json::from_slice(&publish.payload).expect("a heartbeat is JSON");
            heartbeats.push(envelope);
            first_at.get_or_insert_with(Instant::now);
        }
    }
    let now_ms = chrono::Utc::now().timestamp_millis();
    for hb in &heartbeats {
        // The envelope and the fields of protocol.md, read without any controller type.
        assert_eq!(hb["data"]["baseMetadata"]["identity"], "smoke-1", "{hb}");
        let state = hb["data"]["state"].as_str().expect("state is a string");
        assert!(state.eq_ignore_ascii_case("activated"), "state {state}");
        let published = hb["publishTimestamp"]
            .as_i64()
            .expect("publishTimestamp is epoch millis");
        assert!(
            (now_ms - published).abs() < 30_000,
            "publishTimestamp {published} is not recent (now {now_ms})"
        );
    }
    base.shutdown_graceful().await;
    drop(base);

    // A restart keeps the port and replaces the process.
    let port = broker.port();
    broker.restart().await.expect("mosquitto restarts");
    let second_pid = broker.pid().expect("mosquitto runs again");
    assert_eq!(broker.port(), port);
    assert_ne!(first_pid, second_pid);
    assert!(
        !pid_exists(first_pid),
        "old mosquitto {first_pid} survived restart"
    );
    subscriber(broker.host(), broker.port(), "smoke/#")
        .await
        .expect("restarted broker accepts subscriptions on the same port");

    drop(broker);
    assert_all_gone(&[("mosquitto".to_owned(), second_pid)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_round_trip() {
    init_tracing();
    let port = free_port().expect("free port");
    let broker = EmbeddedBroker::start(port).expect("embedded broker starts");
    assert_eq!(broker.port(), port);

    let (client, mut events) = subscriber("127.0.0.1", port, "smoke/embedded/+")
        .await
        .expect("subscribed to the embedded broker");
    client
        .publish(
            "smoke/embedded/1",
            QoS::AtLeastOnce,
            false,
            b"ping".to_vec(),
        )
        .await
        .expect("publish queued");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let event = tokio::time::timeout_at(deadline, events.poll())
            .await
            .expect("message comes back within 10s")
            .expect("connection stays up");
        if let Event::Incoming(Packet::Publish(publish)) = event {
            assert_eq!(publish.topic, "smoke/embedded/1");
            assert_eq!(&publish.payload[..], b"ping");
            break;
        }
    }
}

/// `shared()` hands every test the same control plane, and clients made on separate tokio
/// runtimes (as separate `#[tokio::test]`s have) both work; it is stopped at process exit.
#[test]
fn shared_control_plane_serves_clients_from_separate_runtimes() {
    init_tracing();
    let list_namespaces = || -> (usize, String) {
        let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
        runtime.block_on(async {
            let cp = ControlPlane::shared().await.expect("shared control plane");
            let client = cp.client().await.expect("client");
            let namespaces = Api::<Namespace>::all(client)
                .list(&ListParams::default())
                .await
                .expect("list namespaces");
            let names: Vec<String> = namespaces
                .items
                .iter()
                .filter_map(|n| n.metadata.name.clone())
                .collect();
            assert!(names.iter().any(|n| n == "default"), "{names:?}");
            (cp as *const ControlPlane as usize, cp.api_url().to_owned())
        })
    };
    let first = list_namespaces();
    let second = list_namespaces();
    assert_eq!(first, second, "shared() returned different control planes");
}
