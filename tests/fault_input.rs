//! Fault: hostile input from bases, and writes the apiserver refuses.
//!
//! - A base identity that is no valid node name (`Acc_Base_UPPER:1`) becomes a Ready VNode
//!   under a mapped name, keeps its identity in an annotation, and runs modules.
//! - A base whose `localIP` is no IP runs its modules; their pods go Ready without a podIP.
//! - A pod status write the apiserver keeps refusing is retried with backoff, not twice a
//!   second, and goes through once it is allowed.
//!
//! Each has a control that shows the input is really hostile (the real apiserver refuses the
//! naive write) or that the count would see hot retries.

mod common;

use std::time::{Duration, Instant};

use common::watch::node_ready;
use common::{TestEnv, Tunnel, eventually, installs, runs};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use module_controller::vnode::shape::{IDENTITY_ANNOTATION, node_name};
use module_controller::vpod::status::is_ready;
use serde_json::json;

const T: Duration = Duration::from_secs(60);

/// The HTTP status of a refused apiserver call.
fn refused_with<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> u16 {
    match r {
        Err(kube::Error::Api(s)) => s.code,
        other => panic!("the apiserver accepted it: {other:?}"),
    }
}

async fn only_vnode(env: &TestEnv, base_name: &str) -> Node {
    let nodes = env
        .nodes()
        .list(&ListParams::default().labels(&format!(
            "virtual-kubelet.koupleless.io/env={},base.koupleless.io/name={base_name}",
            env.env
        )))
        .await
        .expect("list nodes")
        .items;
    assert_eq!(nodes.len(), 1, "one VNode for the base: {nodes:?}");
    nodes.into_iter().next().expect("one")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_that_is_no_node_name_becomes_a_ready_vnode_that_runs_modules() {
    let mut env = TestEnv::new("hostile-id").await;
    env.start_controller().await;
    let metrics = env.metrics();

    for (tunnel, identity) in [
        (Tunnel::Mqtt, "Acc_Base_UPPER:1"),
        (Tunnel::Http, "Acc_Base_UPPER:2"),
    ] {
        // Control: the identity is really no node name; the real apiserver refuses the Node
        // the naive mapping would write.
        let raw = format!("vnode.{identity}.{}", env.env);
        let naive: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": raw}
        }))
        .expect("node");
        let refused = env
            .nodes()
            .patch(
                &raw,
                &PatchParams::apply("e2e-input"),
                &Patch::Apply(&naive),
            )
            .await;
        assert_eq!(refused_with(refused), 422, "{raw}");

        // Each base in a Deployment of its own (its base name), so the two do not mix.
        let mut cfg = env.base_config(identity);
        cfg.name = format!("{}-{}", env.base_name, tunnel.name());
        let base = env.base_with(tunnel, cfg.clone()).await;
        let node = eventually(T, &format!("a Ready VNode for {identity}"), || async {
            let nodes = env
                .nodes()
                .list(
                    &ListParams::default().labels(&format!("base.koupleless.io/name={}", cfg.name)),
                )
                .await
                .expect("list nodes")
                .items;
            nodes.into_iter().find(node_ready)
        })
        .await;
        let name = node.metadata.name.clone().expect("name");
        assert_eq!(name, node_name(identity, &env.env));
        assert!(
            name.starts_with(&format!("vnode.acc-base-upper-{}-", &identity[15..]))
                && name.ends_with(&format!(".{}", env.env)),
            "{name}"
        );
        assert_eq!(
            node.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(IDENTITY_ANNOTATION))
                .map(String::as_str),
            Some(identity),
            "the exact identity is kept on the VNode"
        );
        assert_eq!(
            only_vnode(&env, &cfg.name).await.metadata.name,
            Some(name.clone())
        );

        // A module pod scheduled to it is installed and goes Ready.
        let app = format!("hostile-{}", tunnel.name());
        let mut d = env.module_deployment(&app, &app, "1.0.0", 1);
        common::require_node_label(&mut d, "base.koupleless.io/name", &[&cfg.name]);
        env.apply_deployment(&d).await;
        let pods = env.wait_ready_pods(&app, 1, T).await;
        assert_eq!(common::node_of(&pods[0]).as_deref(), Some(name.as_str()));
        assert_eq!(installs(&base, &app), vec!["1.0.0".to_string()]);
        assert!(runs(&base, &app, "1.0.0"));
    }
    // Nothing was refused, so nothing was retried.
    assert_eq!(metrics.api.failed("node"), 0, "Node writes refused");
    assert_eq!(
        metrics.api.failed("node_status"),
        0,
        "Node status writes refused"
    );
    assert_eq!(
        metrics.api.failed("pod_status"),
        0,
        "pod status writes refused"
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_base_whose_local_ip_is_no_ip_runs_modules_whose_pods_have_no_pod_ip() {
    let mut env = TestEnv::new("hostile-ip").await;
    env.start_controller().await;
    let metrics = env.metrics();
    // MQTT only: the HTTP tunnel reaches a base at its localIP, and the double listens there.
    let mut cfg = env.base_config("noip");
    cfg.local_ip = "not-an-ip".into();
    let base = env.mqtt_base_with(cfg).await;
    env.wait_node_ready("noip", T).await;
    env.apply_deployment(&env.module_deployment("noip", "noip", "1.0.0", 1))
        .await;
    let pods = env.wait_ready_pods("noip", 1, T).await;
    let pod = &pods[0];
    let status = pod.status.as_ref().expect("status");
    assert_eq!(status.pod_ip, None, "no podIP for a base without an IP");
    assert!(
        status.pod_ips.as_ref().is_none_or(Vec::is_empty),
        "{status:?}"
    );
    assert!(runs(&base, "noip", "1.0.0"));

    // No write was refused, and none is retried: the pod status is not written again while
    // nothing changes (heartbeats, resyncs and Lease renewals go on meanwhile).
    let writes = || metrics.api.ok("pod_status") + metrics.api.failed("pod_status");
    let before = writes();
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        writes(),
        before,
        "pod status written again with nothing new"
    );
    assert_eq!(metrics.api.failed("pod_status"), 0);
    assert_eq!(metrics.api.failed("node"), 0);
    assert_eq!(metrics.api.failed("node_status"), 0);

    // Control: the apiserver refuses a podIP that is no IP (what writing it would have met).
    let name = pod.metadata.name.clone().expect("name");
    let refused = env
        .pods()
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"status": {"podIP": "not-an-ip", "podIPs": [{"ip": "not-an-ip"}]}}),
            ),
        )
        .await;
    assert_eq!(refused_with(refused), 422);
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_pod_status_write_backs_off_and_goes_through_once_allowed() {
    let mut env = TestEnv::new("backoff").await;
    // The rights of deploy/rbac.yaml without writing pod statuses: every status write of the
    // module pod is refused (403), while Nodes, Leases and Events go through.
    let without_status = |rules: &mut Vec<serde_json::Value>| {
        rules.retain(|r| r["resources"] != json!(["pods/status"]));
    };
    let client = common::deploy::controller_client(&env, without_status).await;
    env.start_controller_as(env.settings(), client.clone())
        .await;
    let metrics = env.metrics();
    let base = env.mqtt_base("bo1").await;
    env.wait_node_ready("bo1", T).await;
    env.apply_deployment(&env.module_deployment("bo", "bo", "1.0.0", 1))
        .await;
    // The module is installed (commands do not need the apiserver)...
    eventually(T, "module running on the base", || async {
        runs(&base, "bo", "1.0.0").then_some(())
    })
    .await;
    // ... and its pod's status write is refused.
    eventually(T, "the first refused status write", || async {
        (metrics.api.failed("pod_status") > 0).then_some(())
    })
    .await;
    let t0 = Instant::now();
    let first = metrics.api.failed("pod_status");
    const WINDOW: Duration = Duration::from_secs(30);
    tokio::time::sleep(WINDOW).await;
    let retries = metrics.api.failed("pod_status") - first;
    let elapsed = t0.elapsed();
    eprintln!(
        "{retries} refused pod status writes in {:.1} s after the first (every 500 ms tick would be {})",
        elapsed.as_secs_f64(),
        elapsed.as_millis() / 500
    );
    // Control: the refusal is real and persistent (the controller's own rights are refused)...
    let pod = env
        .app_pods("bo")
        .await
        .into_iter()
        .next()
        .expect("the pod");
    let name = pod.metadata.name.clone().expect("name");
    let own: kube::Api<Pod> = kube::Api::namespaced(client.clone(), &env.ns);
    let refused = own
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {}})),
        )
        .await;
    assert_eq!(refused_with(refused), 403);
    // ... and the count sees the retries (it is not zero because nothing was retried).
    assert!(
        retries >= 3,
        "the refused write is retried (doubling from 500 ms: 6 or 7 tries in 30 s): {retries}"
    );
    assert!(
        retries <= 10,
        "{retries} refused writes of one pod status in {elapsed:?}: not backing off"
    );
    assert!(
        !is_ready(pod.status.as_ref()),
        "the pod cannot be Ready yet"
    );
    // Meanwhile the base is served: its VNode stays Ready (Node and Lease writes).
    assert_eq!(env.node_ready("bo1").await.as_deref(), Some("True"));

    // Allowed again: the next retry goes through (the backoff is a minute at most).
    common::deploy::controller_client(&env, |_| {}).await;
    let allowed = Instant::now();
    env.wait_ready_pods("bo", 1, Duration::from_secs(90)).await;
    eprintln!(
        "pod Ready {:.1} s after the status write was allowed",
        allowed.elapsed().as_secs_f64()
    );
    assert_eq!(installs(&base, "bo").len(), 1, "installed once");
    env.stop_controller().await;
}
