//! End-to-end tests of the controller core (issue 3) against a real kube-apiserver, scheduler
//! and controller-manager, a real mosquitto broker, and bases played by the independent Arklet
//! double (`arklet_double`). Install failures and invalid specs are covered, over both tunnels,
//! in `e2e_arklet.rs`.

mod common;

use std::time::Duration;

use arklet_double::BizId;
use common::watch::ReadyRecorder;
use common::{TestEnv, eventually, installs, uninstalls};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::watcher;
use module_controller::vpod::status::is_ready;
use rumqttc::{AsyncClient, MqttOptions, QoS};

const T: Duration = Duration::from_secs(60);

async fn lease_renew_time(env: &TestEnv, id: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "kube-node-lease");
    let l = leases
        .get_opt(&env.node_name(id))
        .await
        .expect("get lease")?;
    l.spec?.renew_time.map(|t| format!("{:?}", t.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_lifecycle_drives_vnode_readiness_lease_and_removal() {
    let mut env = TestEnv::new("lifecycle").await;
    env.start_controller().await;
    let base = env.mqtt_base("b1").await;

    // Online → Ready VNode of the reference shape, with a Lease.
    env.wait_node_ready("b1", T).await;
    let node = env.nodes().get(&env.node_name("b1")).await.expect("node");
    let labels = node.metadata.labels.clone().expect("labels");
    assert_eq!(labels["base.koupleless.io/name"], env.base_name);
    assert_eq!(labels["virtual-kubelet.koupleless.io/env"], env.env);
    assert_eq!(labels["virtual-kubelet.koupleless.io/component"], "vnode");
    let taints = node.spec.clone().expect("spec").taints.expect("taints");
    assert!(
        taints
            .iter()
            .any(|t| t.key == "schedule.koupleless.io/virtual-node" && t.effect == "NoExecute")
    );
    assert!(
        taints
            .iter()
            .any(|t| t.key == "schedule.koupleless.io/node-env"
                && t.value.as_deref() == Some(env.env.as_str()))
    );
    let addrs = node
        .status
        .clone()
        .expect("status")
        .addresses
        .expect("addresses");
    assert!(addrs.iter().any(|a| a.type_ == "InternalIP"));
    let alloc = node
        .status
        .expect("status")
        .allocatable
        .expect("allocatable");
    assert!(alloc.contains_key("pods") && alloc.contains_key("cpu"));
    let first = eventually(T, "lease", || lease_renew_time(&env, "b1")).await;
    eventually(T, "lease renewed", || async {
        lease_renew_time(&env, "b1").await.filter(|t| *t != first)
    })
    .await;

    // Silent → NotReady, and the Lease is no longer renewed.
    base.go_silent();
    eventually(T, "VNode NotReady", || async {
        (env.node_ready("b1").await.as_deref() != Some("True")).then_some(())
    })
    .await;
    let frozen = lease_renew_time(&env, "b1").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        lease_renew_time(&env, "b1").await,
        frozen,
        "lease must not be renewed for a silent base"
    );

    // Back → Ready again.
    base.resume();
    env.wait_node_ready("b1", T).await;

    // Graceful shutdown → VNode gone.
    base.shutdown_graceful().await;
    eventually(T, "VNode removed", || async {
        env.nodes()
            .get_opt(&env.node_name("b1"))
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_installs_modules_and_scale_down_uninstalls_them() {
    let mut env = TestEnv::new("modules").await;
    env.start_controller().await;
    let b1 = env.mqtt_base("m1").await;
    let b2 = env.mqtt_base("m2").await;
    for id in ["m1", "m2"] {
        env.wait_node_ready(id, T).await;
    }
    env.apply_deployment(&env.module_deployment("biz1", "biz1", "0.0.1", 2))
        .await;
    let pods = env.wait_ready_pods("biz1", 2, T).await;
    for p in &pods {
        let st = p.status.as_ref().expect("status");
        assert_eq!(st.phase.as_deref(), Some("Running"));
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .expect("bound");
        assert!(node.starts_with("vnode."), "bound to a VNode: {node}");
        assert!(st.pod_ip.is_some(), "podIP is the base IP");
    }
    let key = BizId::new("biz1", "0.0.1");
    let total_installs: usize = [&b1, &b2].iter().map(|b| installs(b, "biz1").len()).sum();
    assert!(total_installs >= 2, "install commands on the wire");
    let on_nodes: std::collections::BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    for (id, b) in [("m1", &b1), ("m2", &b2)] {
        assert_eq!(
            on_nodes.contains(&env.node_name(id)),
            b.active_modules().contains(&key),
            "base {id} runs the module iff a Ready pod is bound to it"
        );
    }

    // Scale down → uninstall on the wire → pod gone, module gone from that base.
    env.scale("biz1", 1).await;
    env.wait_ready_pods("biz1", 1, T).await;
    eventually(T, "old pod removed", || async {
        (env.app_pods("biz1").await.len() == 1).then_some(())
    })
    .await;
    let remaining = env.app_pods("biz1").await;
    let remaining_node = remaining[0]
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("bound");
    eventually(T, "module uninstalled where the pod went away", || async {
        let active: usize = [("m1", &b1), ("m2", &b2)]
            .iter()
            .filter(|(_, b)| b.active_modules().contains(&key))
            .count();
        let uninstalled = uninstalls(&b1, "biz1").len() + uninstalls(&b2, "biz1").len();
        (active == 1 && uninstalled >= 1).then_some(())
    })
    .await;
    for (id, b) in [("m1", &b1), ("m2", &b2)] {
        assert_eq!(
            env.node_name(id) == remaining_node,
            b.active_modules().contains(&key)
        );
    }
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_restart_reinstalls_nothing_and_never_flaps_ready() {
    let mut env = TestEnv::new("restart").await;
    env.start_controller().await;
    let b1 = env.mqtt_base("r1").await;
    let b2 = env.mqtt_base("r2").await;
    env.apply_deployment(&env.module_deployment("biz", "biz", "1.0.0", 2))
        .await;
    env.wait_ready_pods("biz", 2, T).await;
    let before = installs(&b1, "biz").len() + installs(&b2, "biz").len();

    // Record every Ready transition of the pods and the VNodes from now on; a recorder whose
    // watch errs or ends fails the test (it could have missed a flap).
    let pods = ReadyRecorder::pods(
        "module pods",
        env.pods(),
        watcher::Config::default().labels("app=biz"),
    )
    .await;
    let nodes = ReadyRecorder::vnodes(&env).await;

    env.stop_controller().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.start_controller().await;
    // Several heartbeats and a full resync later nothing changed.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = installs(&b1, "biz").len() + installs(&b2, "biz").len();
    assert_eq!(
        after, before,
        "no install command after a controller restart"
    );
    pods.assert_alive();
    nodes.assert_alive();
    // Control: the recorders watch the right objects (both pods and both VNodes seen Ready).
    assert_eq!(pods.ever_ready().len(), 2, "{:?}", pods.history());
    assert_eq!(nodes.ever_ready().len(), 2, "{:?}", nodes.history());
    assert!(
        pods.drops().is_empty(),
        "pods went NotReady: {:?}",
        pods.drops()
    );
    assert!(
        nodes.drops().is_empty(),
        "VNodes went NotReady: {:?}",
        nodes.drops()
    );
    env.wait_ready_pods("biz", 2, Duration::from_secs(5)).await;
    for id in ["r1", "r2"] {
        assert_eq!(env.node_ready(id).await.as_deref(), Some("True"));
    }
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_loses_and_duplicates_nothing() {
    let mut env = TestEnv::new("broker").await;
    env.start_controller().await;
    let b1 = env.mqtt_base("k1").await;
    let b2 = env.mqtt_base("k2").await;
    env.apply_deployment(&env.module_deployment("biz", "biz", "2.0.0", 1))
        .await;
    env.wait_ready_pods("biz", 1, T).await;

    env.broker.restart().await.expect("broker restarts");
    // After the outage: both VNodes Ready again and a scale-up reaches the bases.
    for id in ["k1", "k2"] {
        env.wait_node_ready(id, T).await;
    }
    env.scale("biz", 2).await;
    let pods = env.wait_ready_pods("biz", 2, T).await;
    let key = BizId::new("biz", "2.0.0");
    let nodes: std::collections::BTreeSet<String> = pods
        .iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect();
    // Duplicated = an install the base received more than once (its module list is keyed by
    // name and version and would show one copy either way).
    let mut installed = 0;
    for (id, b) in [("k1", &b1), ("k2", &b2)] {
        let sent = installs(b, "biz");
        assert!(
            sent.len() <= 1,
            "install sent {} times to {id}: {sent:?}",
            sent.len()
        );
        let resent = common::faults::resent_since(b, 0);
        assert!(resent.is_empty(), "commands sent again to {id}: {resent:?}");
        let runs = b.active_modules().contains(&key);
        assert_eq!(
            runs,
            nodes.contains(&env.node_name(id)),
            "module on {id} iff a pod is bound there"
        );
        installed += sent.len();
    }
    assert_eq!(
        installed,
        nodes.len(),
        "one install per bound pod, none lost"
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_stale_and_foreign_messages_are_dropped_and_counted() {
    let mut env = TestEnv::new("flood").await;
    env.start_controller().await;
    let _b = env.mqtt_base("x1").await;
    env.wait_node_ready("x1", T).await;
    let mqtt = env.metrics().mqtt.clone();
    let received_count = |r: &str| mqtt.received(r);
    let malformed0 = received_count("malformed");
    let stale0 = received_count("stale");
    let unknown0 = received_count("unknown_base");

    let mut opts = MqttOptions::new("flooder", env.broker.host(), env.broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut el) = AsyncClient::new(opts, 4096);
    let pump = tokio::spawn(async move { while el.poll().await.is_ok() {} });
    let p = |t: &str| format!("koupleless_{}/x1/{t}", env.env);
    let old = arklet_double::now_ms() - 60_000;
    for i in 0..200 {
        client
            .publish(
                p("base/heart"),
                QoS::AtLeastOnce,
                false,
                format!("{{garbage {i}"),
            )
            .await
            .expect("pub");
        client
            .publish(
                p("base/simpleBiz"),
                QoS::AtLeastOnce,
                false,
                r#"{"publishTimestamp":1,"data":{"not":"a list"}}"#,
            )
            .await
            .expect("pub");
    }
    for _ in 0..100 {
        let stale = format!(
            r#"{{"publishTimestamp":{old},"data":{{"baseMetadata":{{"identity":"x1"}},"state":"DEACTIVATED"}}}}"#
        );
        client
            .publish(p("base/heart"), QoS::AtLeastOnce, false, stale)
            .await
            .expect("pub");
        // A base nobody knows, speaking out of turn.
        let ghost = format!("koupleless_{}/ghost/base/simpleBiz", env.env);
        let body = format!(
            r#"{{"publishTimestamp":{},"data":[]}}"#,
            arklet_double::now_ms()
        );
        client
            .publish(ghost, QoS::AtLeastOnce, false, body)
            .await
            .expect("pub");
        // Another env: not even delivered to us.
        client
            .publish(
                "koupleless_otherenv/x1/base/heart",
                QoS::AtLeastOnce,
                false,
                "{}",
            )
            .await
            .expect("pub");
    }
    eventually(T, "drops counted", || async {
        (received_count("malformed") >= malformed0 + 400
            && received_count("stale") >= stale0 + 100
            && received_count("unknown_base") >= unknown0 + 100)
            .then_some(())
    })
    .await;
    pump.abort();
    // Still serving: the (stale) DEACTIVATED heartbeats did not drain the base, and modules install.
    assert_eq!(env.node_ready("x1").await.as_deref(), Some("True"));
    env.apply_deployment(&env.module_deployment("after", "after", "1.0.0", 1))
        .await;
    env.wait_ready_pods("after", 1, T).await;
    env.stop_controller().await;
}

/// Adds tolerations so pods leave a NotReady/unreachable node after 1 s (the default is 300 s).
fn fast_eviction(d: &mut k8s_openapi::api::apps::v1::Deployment) {
    let spec = d
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .expect("pod spec");
    let t = spec.tolerations.get_or_insert_with(Vec::new);
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        t.push(k8s_openapi::api::core::v1::Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: Some(1),
            value: None,
        });
    }
}

async fn host_of(env: &TestEnv, app: &str) -> String {
    let pods = env.wait_ready_pods(app, 1, T).await;
    pods[0]
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .expect("bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_move_off_silent_and_drained_bases() {
    let mut env = TestEnv::new("moves").await;
    env.start_controller().await;
    let bases = [
        env.mqtt_base("v1").await,
        env.mqtt_base("v2").await,
        env.mqtt_base("v3").await,
    ];
    for id in ["v1", "v2", "v3"] {
        env.wait_node_ready(id, T).await;
    }
    let mut d = env.module_deployment("mover", "mover", "1.0.0", 1);
    fast_eviction(&mut d);
    env.apply_deployment(&d).await;
    let first = host_of(&env, "mover").await;
    let idx = |node: &str| {
        ["v1", "v2", "v3"]
            .iter()
            .position(|id| env.node_name(id) == node)
            .expect("known node")
    };

    // Silent base: its VNode goes NotReady, Kubernetes evicts, the pod comes back elsewhere.
    bases[idx(&first)].go_silent();
    let second = eventually(
        Duration::from_secs(90),
        "pod Ready on another base",
        || async {
            let pods = env.app_pods("mover").await;
            pods.iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p.status.as_ref()))
                .filter_map(|p| p.spec.as_ref()?.node_name.clone())
                .find(|n| *n != first)
        },
    )
    .await;
    assert!(
        bases[idx(&second)]
            .active_modules()
            .contains(&BizId::new("mover", "1.0.0"))
    );

    // Graceful shutdown: drained at once, the pod moves again, the VNode is gone.
    bases[idx(&second)].shutdown_graceful().await;
    let third = eventually(T, "pod Ready on the last base", || async {
        let pods = env.app_pods("mover").await;
        pods.iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p.status.as_ref()))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .find(|n| *n != first && *n != second)
    })
    .await;
    assert!(
        env.nodes().get_opt(&second).await.expect("get").is_none(),
        "drained VNode removed"
    );
    assert!(
        bases[idx(&third)]
            .active_modules()
            .contains(&BizId::new("mover", "1.0.0"))
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vnode_of_a_base_that_never_returns_is_deleted_after_the_ttl() {
    let mut env = TestEnv::new("ttl").await;
    env.vnode_ttl = Duration::from_secs(8);
    env.start_controller().await;
    let b = env.mqtt_base("t1").await;
    env.wait_node_ready("t1", T).await;
    b.go_silent();
    eventually(T, "VNode NotReady", || async {
        (env.node_ready("t1").await.as_deref() == Some("False")).then_some(())
    })
    .await;
    assert!(
        env.nodes()
            .get_opt(&env.node_name("t1"))
            .await
            .expect("get")
            .is_some(),
        "kept until the TTL"
    );
    eventually(T, "VNode deleted after the TTL", || async {
        env.nodes()
            .get_opt(&env.node_name("t1"))
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
    // A base that comes back after that is a new base: a new VNode.
    b.resume();
    eventually(T, "VNode recreated", || async {
        (env.node_ready("t1").await.as_deref() == Some("True")).then_some(())
    })
    .await;
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_tunnel_bases_get_vnodes_and_modules() {
    let mut env = TestEnv::new("http").await;
    env.start_controller().await;
    let base = env.http_base("h1").await;
    env.wait_node_ready("h1", T).await;
    let node = env.nodes().get(&env.node_name("h1")).await.expect("node");
    assert_eq!(
        node.metadata.labels.expect("labels")["vnode.koupleless.io/tunnel"],
        "http"
    );
    env.apply_deployment(&env.module_deployment("webbiz", "webbiz", "3.1.0", 1))
        .await;
    env.wait_ready_pods("webbiz", 1, T).await;
    assert_eq!(installs(&base, "webbiz"), vec!["3.1.0".to_string()]);
    env.scale("webbiz", 0).await;
    eventually(T, "uninstalled over HTTP", || async {
        (!base
            .active_modules()
            .contains(&BizId::new("webbiz", "3.1.0"))
            && env.app_pods("webbiz").await.is_empty())
        .then_some(())
    })
    .await;
    assert_eq!(uninstalls(&base, "webbiz"), vec!["3.1.0".to_string()]);
    env.stop_controller().await;
}
