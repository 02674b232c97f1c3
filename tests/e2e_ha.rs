//! Several replicas share the bases (IS_CLUSTER=true): three real controller processes, ten
//! bases, module Deployments. Every base is driven by exactly one replica; a replica killed
//! mid-rollout is replaced within the Lease duration with nothing re-sent and nothing flapping;
//! a stopped replica hands its bases over in seconds; an HTTP base whose heartbeats reach
//! replicas that do not own it stays Ready.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arklet_double::{Base, Transport};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::{TestEnv, eventually};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt, watcher};
use module_controller::vpod::status::is_ready;
use serde_json::json;
use testkit::localenv::ports::free_port;
use testkit::localenv::process::ManagedProcess;

const T: Duration = Duration::from_secs(120);
/// Ownership Lease duration of the replicas under test.
const LEASE: Duration = Duration::from_secs(6);
const BASES: usize = 9;

struct Replica {
    id: String,
    proc: ManagedProcess,
}

fn spawn_replica(env: &TestEnv, id: &str, http_port: u16, dir: &std::path::Path) -> Replica {
    spawn_replica_as(env, id, http_port, dir, true)
}

fn spawn_replica_as(
    env: &TestEnv,
    id: &str,
    http_port: u16,
    dir: &std::path::Path,
    cluster: bool,
) -> Replica {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_module-controller"));
    cmd.env("KUBECONFIG", env.cp.kubeconfig_path())
        .env("ENV", &env.env)
        .env("CLIENT_ID", id)
        .env("ENABLE_MQTT_TUNNEL", "true")
        .env("MQTT_BROKER", env.broker.host())
        .env("MQTT_PORT", env.broker.port().to_string())
        .env("ENABLE_HTTP_TUNNEL", "true")
        .env("HTTP_TUNNEL_LISTEN_PORT", http_port.to_string())
        .env("POD_IP", "127.0.0.1")
        .env("IS_CLUSTER", cluster.to_string())
        .env("NAMESPACE", &env.ns)
        .env("OWNER_LEASE_SECS", LEASE.as_secs().to_string())
        .env("HEARTBEAT_PERIOD_SECS", "1")
        .env("HEARTBEAT_MISSES", "3")
        .env("COMMAND_TIMEOUT_SECS", "3")
        .env("RESYNC_SECS", "5")
        .env("METRICS_ADDR", "")
        .env("RUST_LOG", "info,kube=warn")
        .env_remove("POD_NAME");
    let log = dir.join(format!("{id}.log"));
    let proc = ManagedProcess::spawn(id, cmd, &log).expect("controller starts");
    Replica {
        id: id.to_string(),
        proc,
    }
}

/// Holder of every VNode ownership Lease of this test's env.
async fn owners(env: &TestEnv) -> BTreeMap<String, String> {
    let api: Api<Lease> = Api::namespaced(env.client.clone(), &env.ns);
    let lp = ListParams::default().labels(&format!(
        "module-controller.koupleless.io/env={},module-controller.koupleless.io/lease=vnode",
        env.env
    ));
    api.list(&lp)
        .await
        .expect("list leases")
        .items
        .into_iter()
        .filter_map(|l| {
            let holder = l.spec?.holder_identity.filter(|h| !h.is_empty())?;
            Some((l.metadata.name?, holder))
        })
        .collect()
}

fn shares(owners: &BTreeMap<String, String>) -> BTreeMap<String, usize> {
    let mut s = BTreeMap::new();
    for h in owners.values() {
        *s.entry(h.clone()).or_insert(0) += 1;
    }
    s
}

/// A round-robin front for the replicas' HTTP tunnels, as a Service would be.
#[derive(Clone)]
struct Front {
    backends: Arc<Vec<String>>,
    next: Arc<Mutex<usize>>,
    http: reqwest::Client,
}

async fn front_forward(
    State(f): State<Front>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Bytes) {
    let i = {
        let mut n = f.next.lock().unwrap_or_else(|p| p.into_inner());
        *n = (*n + 1) % f.backends.len();
        *n
    };
    let mut req = f
        .http
        .post(format!("{}{}", f.backends[i], uri.path()))
        .body(body);
    if let Some(ct) = headers.get("content-type") {
        req = req.header("content-type", ct);
    }
    match req.send().await {
        Ok(r) => (
            StatusCode::from_u16(r.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY),
            r.bytes().await.unwrap_or_default(),
        ),
        Err(_) => (StatusCode::BAD_GATEWAY, Bytes::new()),
    }
}

async fn start_front(backends: Vec<String>) -> String {
    let f = Front {
        backends: Arc::new(backends),
        next: Arc::new(Mutex::new(0)),
        http: reqwest::Client::new(),
    };
    let app = axum::Router::new()
        .route("/heartbeat", post(front_forward))
        .route("/queryBaseline", post(front_forward))
        .with_state(f);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("front listens");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    format!("http://{addr}")
}

/// Records every Ready transition of the pods of `app` (an ended watch fails the test).
fn watch_ready(env: &TestEnv, app: &str) -> Arc<Mutex<Vec<(String, bool)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &env.ns);
    let cfg = watcher::Config::default().labels(&format!("app={app}"));
    tokio::spawn(async move {
        let mut last: BTreeMap<String, bool> = BTreeMap::new();
        let mut stream = watcher(pods, cfg)
            .default_backoff()
            .applied_objects()
            .boxed();
        while let Some(ev) = stream.next().await {
            let Ok(p) = ev else { continue };
            let name = p.metadata.name.clone().unwrap_or_default();
            let ready = is_ready(p.status.as_ref());
            if last.insert(name.clone(), ready) != Some(ready) {
                s.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((name, ready));
            }
        }
        panic!("pod watch ended");
    });
    seen
}

/// One pod per MQTT base and version (the anti-affinity selects the version, so a new-version
/// pod may join a base that still runs the old one); maxSurge 1, maxUnavailable 0.
fn deployment(env: &TestEnv, app: &str, module: &str, version: &str) -> Deployment {
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app, "namespace": env.ns},
        "spec": {
            "replicas": BASES,
            "selector": {"matchLabels": {"app": app}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": app, "version": version, "virtual-kubelet.koupleless.io/component": "module"}},
                "spec": {
                    "containers": [{
                        "name": module,
                        "image": format!("https://example.invalid/{module}-{version}-ark-biz.jar"),
                        "env": [{"name": "BIZ_VERSION", "value": version}]
                    }],
                    "nodeSelector": {"vnode.koupleless.io/tunnel": "mqtt"},
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "base.koupleless.io/name", "operator": "In", "values": [env.base_name]}
                        ]}]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                            "labelSelector": {"matchLabels": {"app": app, "version": version}},
                            "topologyKey": "kubernetes.io/hostname"
                        }]}
                    },
                    "tolerations": [
                        {"key": "schedule.koupleless.io/virtual-node", "operator": "Equal", "value": "True", "effect": "NoExecute"},
                        {"key": "schedule.koupleless.io/node-env", "operator": "Equal", "value": env.env, "effect": "NoExecute"}
                    ]
                }
            }
        }
    }))
    .expect("deployment")
}

fn duplicates(cmds: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    cmds.iter()
        .filter(|c| !seen.insert((*c).clone()))
        .cloned()
        .collect()
}

/// The gaps in which a base ran no version of `module` after first running one.
fn gaps(b: &Base, module: &str) -> usize {
    let mut started = false;
    let mut gaps = 0;
    for snap in b.history() {
        let any = snap.active.iter().any(|m| m.name == module);
        if any {
            started = true;
        } else if started {
            gaps += 1;
        }
    }
    gaps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_bases_take_over_and_hand_over() {
    let env = TestEnv::new("ha").await;
    let dir = tempfile::tempdir().expect("log dir");
    let ports: Vec<u16> = (0..3).map(|_| free_port().expect("port")).collect();
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| spawn_replica(&env, &format!("replica-{i}"), ports[i], dir.path()))
        .collect();
    let mut bases = Vec::new();
    for i in 0..BASES {
        let b = env.mqtt_base(&format!("h{i}")).await;
        b.set_install_time(Duration::from_millis(800));
        bases.push(b);
    }
    // An HTTP base behind a round-robin front: most of its heartbeats reach a non-owner.
    let front = start_front(
        ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
    )
    .await;
    let http_base = Base::start(
        env.base_config("hx"),
        Transport::Http {
            controller_url: front.clone(),
            listen_port: 0,
        },
    )
    .await
    .expect("http base");
    let all: Vec<String> = (0..BASES)
        .map(|i| format!("h{i}"))
        .chain(["hx".to_string()])
        .collect();
    for id in &all {
        env.wait_node_ready(id, T).await;
    }

    // Every base owned by exactly one replica, shares within one of each other.
    let ids: Vec<String> = all.iter().map(|id| env.node_name(id)).collect();
    let deadline = Instant::now() + T;
    let settled = loop {
        let o = owners(&env).await;
        let s = shares(&o);
        let (min, max) = (s.values().min().copied(), s.values().max().copied());
        if ids.iter().all(|n| o.contains_key(n))
            && s.len() == 3
            && max.zip(min).is_some_and(|(a, b)| a - b <= 1)
        {
            break o;
        }
        if Instant::now() > deadline {
            for r in &replicas {
                eprintln!("--- {} ---\n{}", r.id, r.proc.log_tail(40));
            }
            panic!("ownership never settled: {o:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    eprintln!("ownership: {:?}", shares(&settled));

    // The HTTP base stays Ready although most heartbeats reach replicas that do not own it.
    let hx = env.node_name("hx");
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        assert_eq!(env.node_ready("hx").await.as_deref(), Some("True"), "{hx}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Two module Deployments on the MQTT bases (the HTTP one is for the forwarding check):
    // one stays as it is (no pod may flap), one rolls.
    let stable = deployment(&env, "stable", "stablebiz", "1.0.0");
    env.apply_deployment(&stable).await;
    env.apply_deployment(&deployment(&env, "roll", "rollbiz", "1.0.0"))
        .await;
    env.wait_ready_pods("stable", BASES, T).await;
    env.wait_ready_pods("roll", BASES, T).await;
    let stable_flaps = watch_ready(&env, "stable");
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Start a rolling update, then kill the replica owning the most bases mid-rollout.
    env.apply_deployment(&deployment(&env, "roll", "rollbiz", "2.0.0"))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = owners(&env).await;
    let victim_id = shares(&before)
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(id, _)| id)
        .expect("a replica owns bases");
    let victim = replicas
        .iter()
        .position(|r| r.id == victim_id)
        .expect("victim");
    let lost: Vec<String> = before
        .iter()
        .filter(|(_, h)| **h == victim_id)
        .map(|(n, _)| n.clone())
        .collect();
    // SIGKILL: no goodbye, its Leases just stop being renewed.
    unsafe {
        libc::kill(replicas[victim].proc.pid() as i32, libc::SIGKILL);
    }
    let killed_at = Instant::now();
    eventually(
        LEASE * 3,
        "the killed replica's bases owned by others",
        || async {
            let o = owners(&env).await;
            lost.iter()
                .all(|n| o.get(n).is_some_and(|h| *h != victim_id))
                .then_some(())
        },
    )
    .await;
    let takeover = killed_at.elapsed();
    eprintln!("takeover of {} bases after {takeover:?}", lost.len());
    assert!(
        takeover <= LEASE + Duration::from_secs(3),
        "takeover took {takeover:?}"
    );

    // The rollout completes, losslessly, with nothing sent twice and nothing flapping.
    let deadline = Instant::now() + T;
    while !bases.iter().all(|b| common::runs(b, "rollbiz", "2.0.0")) {
        if Instant::now() > deadline {
            for (i, b) in bases.iter().enumerate() {
                eprintln!(
                    "h{i}: active {:?} installs {:?} uninstalls {:?}",
                    b.active_modules(),
                    common::installs(b, "rollbiz"),
                    common::uninstalls(b, "rollbiz")
                );
            }
            for p in env.app_pods("roll").await {
                eprintln!(
                    "pod {:?} node {:?} ready {} waiting {:?} deleting {}",
                    p.metadata.name,
                    common::node_of(&p),
                    is_ready(p.status.as_ref()),
                    common::waiting(&p),
                    p.metadata.deletion_timestamp.is_some()
                );
            }
            eprintln!("owners {:?}", owners(&env).await);
            for r in &replicas {
                eprintln!("--- {} ---\n{}", r.id, r.proc.log_tail(30));
            }
            panic!("the rollout did not complete");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    env.wait_ready_pods("roll", BASES, T).await;
    for (i, b) in bases.iter().enumerate() {
        assert_eq!(gaps(b, "rollbiz"), 0, "h{i} ran no rollbiz for a while");
        let installs = common::installs(b, "rollbiz");
        assert!(
            duplicates(&installs).is_empty(),
            "h{i} got an install twice: {installs:?}"
        );
        let uninstalls = common::uninstalls(b, "rollbiz");
        assert!(
            duplicates(&uninstalls).is_empty(),
            "h{i} got an uninstall twice: {uninstalls:?}"
        );
        assert_eq!(
            common::installs(b, "stablebiz").len(),
            1,
            "h{i}: stablebiz installed once"
        );
    }
    let flaps: Vec<(String, bool)> = stable_flaps
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, ready)| !ready)
        .cloned()
        .collect();
    assert!(flaps.is_empty(), "stable pods went NotReady: {flaps:?}");

    // SIGTERM another replica: it hands its bases over within seconds.
    let o = owners(&env).await;
    let leaving = replicas
        .iter()
        .position(|r| r.id != victim_id && o.values().any(|h| *h == r.id))
        .expect("a live replica owning bases");
    let leaving_id = replicas[leaving].id.clone();
    let handed: Vec<String> = o
        .iter()
        .filter(|(_, h)| **h == leaving_id)
        .map(|(n, _)| n.clone())
        .collect();
    unsafe {
        libc::kill(replicas[leaving].proc.pid() as i32, libc::SIGTERM);
    }
    let termed_at = Instant::now();
    eventually(Duration::from_secs(10), "bases handed over", || async {
        let o = owners(&env).await;
        handed
            .iter()
            .all(|n| {
                o.get(n)
                    .is_some_and(|h| *h != leaving_id && *h != victim_id)
            })
            .then_some(())
    })
    .await;
    let handover = termed_at.elapsed();
    eprintln!("hand-over of {} bases after {handover:?}", handed.len());
    assert!(
        handover <= Duration::from_secs(5),
        "hand-over took {handover:?}"
    );
    // The last replica drives everything; the modules stay Ready.
    env.wait_ready_pods("stable", BASES, T).await;
    assert_eq!(env.node_ready("hx").await.as_deref(), Some("True"));
    drop(http_base);
    for r in &mut replicas {
        r.proc.stop();
    }
}

/// The control: the same replicas without IS_CLUSTER each drive every base, and the bases get
/// every command twice: what the ownership Leases prevent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_sharing_two_replicas_send_every_command_twice() {
    let env = TestEnv::new("ha-off").await;
    let dir = tempfile::tempdir().expect("log dir");
    let mut replicas: Vec<Replica> = (0..2)
        .map(|i| {
            let port = free_port().expect("port");
            spawn_replica_as(&env, &format!("solo-{i}"), port, dir.path(), false)
        })
        .collect();
    let mut bases = Vec::new();
    for i in 0..2 {
        bases.push(env.mqtt_base(&format!("s{i}")).await);
    }
    for i in 0..2 {
        env.wait_node_ready(&format!("s{i}"), T).await;
    }
    let mut d = deployment(&env, "dup", "dupbiz", "1.0.0");
    if let Some(spec) = d.spec.as_mut() {
        spec.replicas = Some(2);
    }
    env.apply_deployment(&d).await;
    eventually(T, "a base got the same install twice", || async {
        bases
            .iter()
            .any(|b| !duplicates(&common::installs(b, "dupbiz")).is_empty())
            .then_some(())
    })
    .await;
    for r in &mut replicas {
        r.proc.stop();
    }
}
