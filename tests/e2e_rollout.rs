//! Lossless rolling updates (issue 5), proven with the real Deployment and ReplicaSet
//! controllers and scheduler: the bases (Arklet doubles) record their active modules over time and no
//! base may ever be left without a running instance of the module.

mod common;

use std::time::Duration;

use arklet_double::{Base, BizId};
use common::{TestEnv, eventually};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};
use module_controller::vpod::status::is_ready;
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const MODULE: &str = "rollbiz";

/// A module Deployment spread one pod per base *per version*: the anti-affinity selects the
/// version label, so a new-version pod may join a base that still runs the old one.
fn rolling_deployment(
    env: &TestEnv,
    version: &str,
    replicas: i32,
    surge: &str,
    unavailable: &str,
) -> Deployment {
    let surge: serde_json::Value = surge
        .parse::<i64>()
        .map(serde_json::Value::from)
        .unwrap_or_else(|_| surge.into());
    let unavailable: serde_json::Value = unavailable
        .parse::<i64>()
        .map(serde_json::Value::from)
        .unwrap_or_else(|_| unavailable.into());
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "roll", "namespace": env.ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "roll"}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
            "template": {
                "metadata": {"labels": {"app": "roll", "version": version, "virtual-kubelet.koupleless.io/component": "module"}},
                "spec": {
                    "containers": [{
                        "name": MODULE,
                        "image": format!("https://example.invalid/{MODULE}-{version}-ark-biz.jar"),
                        "env": [{"name": "BIZ_VERSION", "value": version}]
                    }],
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "base.koupleless.io/name", "operator": "In", "values": [env.base_name]}
                        ]}]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                            "labelSelector": {"matchLabels": {"app": "roll", "version": version}},
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

/// Instants (ms) at which `base` ran no instance of the module after it first ran one.
fn empty_instants(base: &Base) -> Vec<u64> {
    let mut seen = false;
    let mut gaps = Vec::new();
    for snap in base.history() {
        let has = snap.active.iter().any(|k| k.name == MODULE);
        if has {
            seen = true;
        } else if seen {
            gaps.push(snap.at_ms);
        }
    }
    gaps
}

async fn start(env: &mut TestEnv, lossless: bool, n: usize) -> Vec<Base> {
    env.unsafe_order = !lossless;
    env.start_controller().await;
    let mut bases = Vec::new();
    for i in 0..n {
        let b = env.mqtt_base(&format!("ru{i}")).await;
        // Real installs take time; a gap between an uninstall and the next install shows.
        b.set_install_time(Duration::from_millis(800));
        bases.push(b);
    }
    for i in 0..n {
        let id = format!("ru{i}");
        env.wait_node_ready(&id, T).await;
    }
    bases
}

async fn wait_all_on(env: &TestEnv, version: &str, n: usize) {
    eventually(T, &format!("{n} Ready pods all on {version}"), || async {
        let pods = env.app_pods("roll").await;
        let live: Vec<_> = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        let ok = pods.len() == n
            && live.len() == n
            && live.iter().all(|p| {
                is_ready(p.status.as_ref())
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("version"))
                        .map(String::as_str)
                        == Some(version)
            });
        ok.then_some(())
    })
    .await;
}

/// Every base ends with exactly `version` installed and active (the other uninstalled).
async fn wait_bases_only(bases: &[Base], version: &str) {
    for b in bases {
        let want = vec![BizId::new(MODULE, version)];
        let ok = b
            .wait_until(T, |b| {
                b.active_modules() == want
                    && b.modules().iter().filter(|m| m.name == MODULE).count() == 1
            })
            .await;
        assert!(
            ok,
            "base {} should run only {MODULE}@{version}; has {:?}",
            b.identity(),
            b.modules()
        );
    }
}

async fn rolling_update_is_lossless(name: &str, surge: &str, unavailable: &str) {
    let mut env = TestEnv::new(name).await;
    let bases = start(&mut env, true, 4).await;
    env.apply_deployment(&rolling_deployment(&env, "1.0.0", 4, surge, unavailable))
        .await;
    wait_all_on(&env, "1.0.0", 4).await;
    wait_bases_only(&bases, "1.0.0").await;

    env.apply_deployment(&rolling_deployment(&env, "2.0.0", 4, surge, unavailable))
        .await;
    wait_all_on(&env, "2.0.0", 4).await;
    wait_bases_only(&bases, "2.0.0").await;
    for b in &bases {
        assert!(
            empty_instants(b).is_empty(),
            "base {} ran no instance of {MODULE} at {:?}",
            b.identity(),
            empty_instants(b)
        );
    }
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_surge_1_unavailable_0_never_empties_a_base() {
    rolling_update_is_lossless("roll-s1u0", "1", "0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_30_30_never_empties_a_base() {
    rolling_update_is_lossless("roll-3030", "30%", "30%").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_surge_0_unavailable_1_never_empties_a_base() {
    // The Deployment controller deletes an old pod before its replacement exists: the base keeps
    // its old version until the new one is active there.
    rolling_update_is_lossless("roll-s0u1", "0", "1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_protections_the_same_rollout_empties_a_base() {
    // Same scenario with the ordering reversed and no hand-over (the reference's behaviour): the
    // base whose old pod is deleted first runs nothing until its replacement is installed.
    let mut env = TestEnv::new("roll-unsafe").await;
    let bases = start(&mut env, false, 4).await;
    env.apply_deployment(&rolling_deployment(&env, "1.0.0", 4, "0", "1"))
        .await;
    wait_all_on(&env, "1.0.0", 4).await;
    wait_bases_only(&bases, "1.0.0").await;
    env.apply_deployment(&rolling_deployment(&env, "2.0.0", 4, "0", "1"))
        .await;
    wait_all_on(&env, "2.0.0", 4).await;
    wait_bases_only(&bases, "2.0.0").await;
    let emptied: Vec<String> = bases
        .iter()
        .filter(|b| !empty_instants(b).is_empty())
        .map(|b| b.identity().to_string())
        .collect();
    assert!(
        !emptied.is_empty(),
        "the unsafe mode should have left some base without the module"
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_mid_rollout_restores_the_old_version_without_emptying_a_base() {
    let mut env = TestEnv::new("roll-back").await;
    let bases = start(&mut env, true, 4).await;
    env.apply_deployment(&rolling_deployment(&env, "1.0.0", 4, "1", "0"))
        .await;
    wait_all_on(&env, "1.0.0", 4).await;
    wait_bases_only(&bases, "1.0.0").await;
    for b in &bases {
        b.set_install_time(Duration::from_millis(1500));
    }
    env.apply_deployment(&rolling_deployment(&env, "2.0.0", 4, "1", "0"))
        .await;
    // Mid-rollout: the first new-version pod is Ready.
    eventually(T, "first 2.0.0 pod Ready", || async {
        env.app_pods("roll")
            .await
            .iter()
            .any(|p| {
                is_ready(p.status.as_ref())
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("version"))
                        .map(String::as_str)
                        == Some("2.0.0")
            })
            .then_some(())
    })
    .await;
    // `kubectl rollout undo`: the Deployment's template goes back to the previous one.
    env.deployments()
        .patch(
            "roll",
            &PatchParams::apply("e2e-test").force(),
            &Patch::Apply(&rolling_deployment(&env, "1.0.0", 4, "1", "0")),
        )
        .await
        .expect("rollback");
    wait_all_on(&env, "1.0.0", 4).await;
    wait_bases_only(&bases, "1.0.0").await;
    for b in &bases {
        assert!(
            empty_instants(b).is_empty(),
            "base {} ran no instance of {MODULE} at {:?}",
            b.identity(),
            empty_instants(b)
        );
    }
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_restart_with_the_same_version_keeps_every_base_serving() {
    let mut env = TestEnv::new("roll-restart").await;
    let bases = start(&mut env, true, 4).await;
    env.apply_deployment(&rolling_deployment(&env, "1.0.0", 4, "1", "1"))
        .await;
    wait_all_on(&env, "1.0.0", 4).await;
    wait_bases_only(&bases, "1.0.0").await;
    let old: std::collections::BTreeSet<String> = env
        .app_pods("roll")
        .await
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    // `kubectl rollout restart`: a template annotation changes, the module version does not.
    let mut d = rolling_deployment(&env, "1.0.0", 4, "1", "1");
    if let Some(t) = d.spec.as_mut().map(|s| &mut s.template.metadata) {
        t.get_or_insert_with(Default::default)
            .annotations
            .get_or_insert_with(Default::default)
            .insert(
                "kubectl.kubernetes.io/restartedAt".into(),
                "2026-11-22T00:00:00Z".into(),
            );
    }
    env.apply_deployment(&d).await;
    eventually(T, "every pod replaced", || async {
        let pods = env.app_pods("roll").await;
        let ok = pods.len() == 4
            && pods.iter().all(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && is_ready(p.status.as_ref())
                    && !old.contains(p.metadata.name.as_deref().unwrap_or(""))
            });
        ok.then_some(())
    })
    .await;
    wait_bases_only(&bases, "1.0.0").await;
    for b in &bases {
        assert!(
            empty_instants(b).is_empty(),
            "base {} ran no instance of {MODULE} at {:?}",
            b.identity(),
            empty_instants(b)
        );
    }
    env.stop_controller().await;
}
