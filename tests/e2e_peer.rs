//! End-to-end tests of module placement across bases, against a real kube-apiserver, scheduler
//! and controller-manager, a real mosquitto broker and Arklet double bases: peer deployments whose
//! replicas follow the Ready bases, DaemonSet modules, and a module release that needs a base
//! release which is not there yet.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use arklet_double::BizId;
use common::{TestEnv, eventually, installs};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use module_controller::apiserver::Api as Writer;
use module_controller::apiserver::watch::WatchHealth;
use module_controller::metrics::Metrics;
use module_controller::peer;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(90);

async fn wait_vnodes_ready(env: &TestEnv, ids: &[&str]) {
    for id in ids {
        eventually(T, &format!("VNode {id} Ready"), || async {
            (env.node_ready(id).await.as_deref() == Some("True")).then_some(())
        })
        .await;
    }
}

async fn replicas(env: &TestEnv, name: &str) -> Option<i32> {
    env.deployments()
        .get(name)
        .await
        .expect("get deployment")
        .spec?
        .replicas
}

async fn wait_replicas(env: &TestEnv, name: &str, n: i32) {
    eventually(T, &format!("{name} at {n} replicas"), || async {
        (replicas(env, name).await == Some(n)).then_some(())
    })
    .await;
}

/// PeerReplicasSynced Events about a Deployment.
async fn deployment_events(env: &TestEnv, name: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some("PeerReplicasSynced")
                && e.regarding.as_ref().and_then(|r| r.kind.as_deref()) == Some("Deployment")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

fn nodes_of(pods: &[Pod]) -> BTreeSet<String> {
    pods.iter()
        .filter_map(|p| p.spec.as_ref()?.node_name.clone())
        .collect()
}

/// The peer sync task of this test; cancelled when dropped (also when the test panics).
struct PeerSync {
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    metrics: std::sync::Arc<Metrics>,
}

impl PeerSync {
    fn start(env: &TestEnv) -> PeerSync {
        let cancel = CancellationToken::new();
        let metrics = Metrics::new();
        let api = Writer::new(env.client.clone(), 4, "peer-test", metrics.api.clone());
        let task = tokio::spawn(peer::run(
            api,
            env.env.clone(),
            metrics.peer.clone(),
            (WatchHealth::default(), metrics.watches.clone()),
            None,
            cancel.clone(),
        ));
        PeerSync {
            cancel,
            task: Some(task),
            metrics,
        }
    }

    /// Cancels the task and checks that it returns promptly.
    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("peer sync returns when cancelled")
                .expect("peer sync task does not panic");
        }
    }
}

impl Drop for PeerSync {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_deployment_replicas_follow_the_ready_bases() {
    let mut env = TestEnv::new("peer").await;
    env.start_controller().await;
    let sync = PeerSync::start(&env);
    let rescaled0 = sync.metrics.peer.total("rescaled");
    let b1 = env.mqtt_base("p1").await;
    let b2 = env.mqtt_base("p2").await;
    wait_vnodes_ready(&env, &["p1", "p2"]).await;

    let mut d = env.module_deployment("peerbiz", "peerbiz", "1.0.0", 1);
    d.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(peer::STRATEGY_LABEL.into(), peer::PEER_STRATEGY.into());
    env.apply_deployment(&d).await;
    env.apply_deployment(&env.module_deployment("solobiz", "solobiz", "1.0.0", 1))
        .await;
    // A peer Deployment of another env (it tolerates that env's taint): not this sync's to size.
    let mut foreign = env.module_deployment("foreignbiz", "foreignbiz", "1.0.0", 1);
    foreign
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(peer::STRATEGY_LABEL.into(), peer::PEER_STRATEGY.into());
    for t in foreign
        .spec
        .as_mut()
        .and_then(|s| s.template.spec.as_mut())
        .and_then(|s| s.tolerations.as_mut())
        .into_iter()
        .flatten()
    {
        if t.key.as_deref() == Some("schedule.koupleless.io/node-env") {
            t.value = Some(format!("{}-elsewhere", env.env));
        }
    }
    env.apply_deployment(&foreign).await;

    // Two Ready bases: two replicas, one per base.
    wait_replicas(&env, "peerbiz", 2).await;
    let pods = env.wait_ready_pods("peerbiz", 2, T).await;
    assert_eq!(
        nodes_of(&pods),
        BTreeSet::from([env.node_name("p1"), env.node_name("p2")])
    );
    let key = BizId::new("peerbiz", "1.0.0");
    for b in [&b1, &b2] {
        assert!(
            b.active_modules().contains(&key),
            "{} runs it",
            b.identity()
        );
    }

    // A third base joins: three.
    let b3 = env.mqtt_base("p3").await;
    wait_replicas(&env, "peerbiz", 3).await;
    let pods = env.wait_ready_pods("peerbiz", 3, T).await;
    assert!(nodes_of(&pods).contains(&env.node_name("p3")));
    assert!(
        b3.wait_until(T, |b| b.active_modules().contains(&key))
            .await
    );

    // One leaves gracefully: back to two, on the remaining bases.
    b2.shutdown_graceful().await;
    wait_replicas(&env, "peerbiz", 2).await;
    let pods = env.wait_ready_pods("peerbiz", 2, T).await;
    assert_eq!(
        nodes_of(&pods),
        BTreeSet::from([env.node_name("p1"), env.node_name("p3")])
    );

    // Each rescale was announced on the Deployment (repeats of one direction form a series).
    let (up, down) = eventually(T, "rescale Events on the Deployment", || async {
        let ev = deployment_events(&env, "peerbiz").await;
        let find = |action: &str| {
            ev.iter()
                .find(|e| e.action.as_deref() == Some(action))
                .cloned()
        };
        let up = find("ScaleUp")?;
        let down = find("ScaleDown")?;
        (up.series.as_ref().map(|s| s.count) == Some(2)).then_some((up, down))
    })
    .await;
    assert!(
        up.note.as_deref().unwrap_or_default().contains("1 -> 2"),
        "{up:?}"
    );
    assert!(
        down.note.as_deref().unwrap_or_default().contains("3 -> 2"),
        "{down:?}"
    );
    assert!(sync.metrics.peer.total("rescaled") >= rescaled0 + 3);

    // The plain Deployment and the other env's peer Deployment were never touched.
    for name in ["solobiz", "foreignbiz"] {
        let d = env.deployments().get(name).await.expect("get deployment");
        assert_eq!(d.spec.as_ref().and_then(|s| s.replicas), Some(1), "{name}");
        assert_eq!(
            d.metadata.generation,
            Some(1),
            "no write to the spec of {name}"
        );
    }
    env.wait_ready_pods("solobiz", 1, T).await;

    sync.stop().await;
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemonset_module_runs_once_on_every_matching_base() {
    let mut env = TestEnv::new("daemon").await;
    env.start_controller().await;
    let d1 = env.mqtt_base("d1").await;
    let d2 = env.mqtt_base("d2").await;
    // A base of another name: the DaemonSet's node affinity keeps the module off it.
    let mut other_cfg = env.base_config("o1");
    other_cfg.name = format!("other-{}", env.env);
    let other = env.mqtt_base_with(other_cfg).await;
    wait_vnodes_ready(&env, &["d1", "d2", "o1"]).await;

    let ds: DaemonSet = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": "auditmod", "namespace": env.ns},
        "spec": {
            "selector": {"matchLabels": {"app": "auditmod"}},
            "template": {
                "metadata": {"labels": {"app": "auditmod", "virtual-kubelet.koupleless.io/component": "module"}},
                "spec": {
                    "containers": [{
                        "name": "auditmod",
                        "image": "https://example.invalid/modules/auditmod-2.0.0-ark-biz.jar",
                        "env": [{"name": "BIZ_VERSION", "value": "2.0.0"}]
                    }],
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "base.koupleless.io/name", "operator": "In", "values": [env.base_name]}
                        ]}]
                    }}},
                    "tolerations": [
                        {"key": "schedule.koupleless.io/virtual-node", "operator": "Equal", "value": "True", "effect": "NoExecute"},
                        {"key": "schedule.koupleless.io/node-env", "operator": "Equal", "value": env.env, "effect": "NoExecute"}
                    ]
                }
            }
        }
    }))
    .expect("daemonset");
    let api: Api<DaemonSet> = Api::namespaced(env.client.clone(), &env.ns);
    api.patch(
        "auditmod",
        &PatchParams::apply("e2e-test").force(),
        &Patch::Apply(&ds),
    )
    .await
    .expect("apply daemonset");

    let key = BizId::new("auditmod", "2.0.0");
    let pods = env.wait_ready_pods("auditmod", 2, T).await;
    assert_eq!(
        nodes_of(&pods),
        BTreeSet::from([env.node_name("d1"), env.node_name("d2")])
    );
    for b in [&d1, &d2] {
        assert!(
            b.active_modules().contains(&key),
            "{} runs it",
            b.identity()
        );
        assert_eq!(installs(b, "auditmod"), vec!["2.0.0".to_string()]);
    }

    // A new base of the name gets its own instance.
    let d3 = env.mqtt_base("d3").await;
    let pods = env.wait_ready_pods("auditmod", 3, T).await;
    assert_eq!(
        nodes_of(&pods),
        BTreeSet::from([
            env.node_name("d1"),
            env.node_name("d2"),
            env.node_name("d3")
        ])
    );
    assert!(
        d3.wait_until(T, |b| b.active_modules().contains(&key))
            .await
    );
    eventually(T, "DaemonSet status counts 3 Ready", || async {
        let s = api.get("auditmod").await.expect("get daemonset").status?;
        (s.desired_number_scheduled == 3 && s.number_ready == 3).then_some(())
    })
    .await;
    assert!(
        installs(&other, "auditmod").is_empty(),
        "a base of another name is never asked to install it"
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_needing_a_newer_base_waits_until_that_base_is_online() {
    let mut env = TestEnv::new("compat").await;
    env.start_controller().await;
    let old1 = env.mqtt_base("c1").await;
    let old2 = env.mqtt_base("c2").await;
    wait_vnodes_ready(&env, &["c1", "c2"]).await;

    let mut d: Deployment = env.module_deployment("newbiz", "newbiz", "1.2.0", 1);
    common::require_node_label(&mut d, "base.koupleless.io/version", &["2.0.0"]);
    env.apply_deployment(&d).await;

    // The scheduler finds no compatible base: the pod stays Pending, unbound.
    let pending = eventually(T, "pod reported Unschedulable", || async {
        let pods = env.app_pods("newbiz").await;
        let p = pods.into_iter().next()?;
        let unschedulable = p.status.as_ref()?.conditions.as_ref()?.iter().any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
        });
        unschedulable.then_some(p)
    })
    .await;
    assert_eq!(
        pending.spec.as_ref().and_then(|s| s.node_name.clone()),
        None
    );
    assert_eq!(
        pending.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Pending")
    );
    // A few heartbeats and a resync later, still nothing sent to the old bases.
    tokio::time::sleep(Duration::from_secs(6)).await;
    for b in [&old1, &old2] {
        assert!(installs(b, "newbiz").is_empty(), "{}", b.identity());
    }
    assert!(
        env.app_pods("newbiz").await.iter().all(|p| p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_none())
    );

    // The base release the module needs comes online: installed there, Ready.
    let mut cfg = env.base_config("c3");
    cfg.version = "2.0.0".into();
    let new = env.mqtt_base_with(cfg).await;
    let pods = env.wait_ready_pods("newbiz", 1, T).await;
    assert_eq!(nodes_of(&pods), BTreeSet::from([env.node_name("c3")]));
    assert_eq!(installs(&new, "newbiz"), vec!["1.2.0".to_string()]);
    assert!(
        new.active_modules()
            .contains(&BizId::new("newbiz", "1.2.0"))
    );
    for b in [&old1, &old2] {
        assert!(installs(b, "newbiz").is_empty(), "{}", b.identity());
    }
    env.stop_controller().await;
}
