//! Batch gating with the real canary plugin (issue 5): the first batch is exactly one base, the
//! rollout pauses until the approval annotation, then proceeds in waves; nothing is installed
//! while paused, and held pods say why.

mod common;

use std::sync::Arc;
use std::time::Duration;

use arklet_double::{Base, Command};
use common::{TestEnv, eventually};
use kube::api::{Patch, PatchParams};
use module_controller::plugin::{PluginConfig, PluginHost, PluginPolicies};
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const MODULE: &str = "canarybiz";

fn deployment(
    env: &TestEnv,
    version: &str,
    canary: bool,
) -> k8s_openapi::api::apps::v1::Deployment {
    let annotations = if canary {
        json!({"module-controller.koupleless.io/batch-policy": "canary"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "canary", "namespace": env.ns, "annotations": annotations},
        "spec": {
            "replicas": 4,
            "selector": {"matchLabels": {"app": "canary"}},
            // Let Kubernetes create every new pod at once: only the policy paces the rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 4, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": "canary", "version": version, "virtual-kubelet.koupleless.io/component": "module"}},
                "spec": {
                    "containers": [{"name": MODULE, "image": format!("https://example.invalid/{MODULE}-{version}.jar"), "env": [{"name": "BIZ_VERSION", "value": version}]}],
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "base.koupleless.io/name", "operator": "In", "values": [env.base_name]}]}]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                            "labelSelector": {"matchLabels": {"app": "canary", "version": version}}, "topologyKey": "kubernetes.io/hostname"}]}
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

/// When each base received `installBiz` for `version` (ms), sorted.
fn install_times(bases: &[Base], version: &str) -> Vec<i64> {
    let mut t: Vec<i64> = bases
        .iter()
        .flat_map(|b| b.installs_of(MODULE))
        .filter_map(|r| match r.command {
            Command::Install { version: v, .. } if v == version => Some(r.at_ms as i64),
            _ => None,
        })
        .collect();
    t.sort();
    t
}

/// Groups sorted instants into batches separated by more than `gap_ms`.
fn batches(times: &[i64], gap_ms: i64) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    let mut last: Option<i64> = None;
    for &t in times {
        match last {
            Some(l) if t - l <= gap_ms => *out.last_mut().expect("batch") += 1,
            _ => out.push(1),
        }
        last = Some(t);
    }
    out
}

fn active_on(bases: &[Base], version: &str) -> usize {
    bases
        .iter()
        .filter(|b| {
            b.active_modules()
                .iter()
                .any(|k| k.name == MODULE && k.version == version)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_then_approval_then_waves() {
    let dist = std::path::Path::new("plugins/dist/canary-batch.wasm");
    assert!(
        dist.is_file(),
        "plugins/dist/canary-batch.wasm missing: run plugins/build.sh (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::copy(dist, dir.path().join("canary-batch.wasm")).expect("copy plugin");
    std::fs::write(
        dir.path().join("plugins.json"),
        serde_json::to_vec_pretty(&json!({
            "plugins": {"canary": {"file": "canary-batch.wasm", "config": {"percent": 50, "soakSeconds": 3}}},
            "batch": {"default": null, "selectable": ["canary"], "annotation": "module-controller.koupleless.io/batch-policy"}
        }))
        .expect("json"),
    )
    .expect("manifest");
    let mut cfg = PluginConfig::new(dir.path().to_path_buf());
    cfg.cache_dir = dir.path().join("..cache");
    let host = PluginHost::start(cfg).await.expect("plugin host");

    let mut env = TestEnv::new("canary").await;
    env.pool = Some(host.pool().clone());
    env.policies = Arc::new(PluginPolicies(host));
    env.start_controller().await;
    let mut bases = Vec::new();
    for i in 0..4 {
        let b = env.mqtt_base(&format!("c{i}")).await;
        b.set_install_time(Duration::from_millis(500));
        bases.push(b);
    }
    env.apply_deployment(&deployment(&env, "1.0.0", false))
        .await;
    env.wait_ready_pods("canary", 4, T).await;

    // The rollout: every new pod exists at once, but only the canary installs.
    env.apply_deployment(&deployment(&env, "2.0.0", true)).await;
    eventually(T, "canary active on one base", || async {
        (active_on(&bases, "2.0.0") == 1).then_some(())
    })
    .await;
    let held = eventually(T, "held pods say they wait for approval", || async {
        let pods = env.app_pods("canary").await;
        let msgs: Vec<String> = pods
            .iter()
            .filter_map(|p| {
                p.status
                    .as_ref()?
                    .container_statuses
                    .as_ref()?
                    .first()?
                    .state
                    .as_ref()?
                    .waiting
                    .clone()
            })
            .filter(|w| w.reason.as_deref() == Some("WaitingForBatch"))
            .filter_map(|w| w.message)
            .collect();
        (msgs.len() == 3 && msgs.iter().all(|m| m.contains("waiting for approval"))).then_some(msgs)
    })
    .await;
    assert_eq!(held.len(), 3);
    // Paused: nothing more is installed.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        install_times(&bases, "2.0.0").len(),
        1,
        "nothing installed while paused"
    );
    assert_eq!(active_on(&bases, "2.0.0"), 1);
    assert_eq!(
        active_on(&bases, "1.0.0"),
        3,
        "the other bases keep serving the old version"
    );

    // Approve: waves of 50 % of 4 = 2 bases, 3 s apart.
    env.deployments()
        .patch("canary", &PatchParams::default(), &Patch::Merge(&json!({"metadata": {"annotations": {"module-controller.koupleless.io/approved": "true"}}})))
        .await
        .expect("approve");
    eventually(T, "all bases on 2.0.0", || async {
        (active_on(&bases, "2.0.0") == 4).then_some(())
    })
    .await;
    env.wait_ready_pods("canary", 4, T).await;
    let times = install_times(&bases, "2.0.0");
    assert_eq!(times.len(), 4, "exactly one install per base: {times:?}");
    assert!(
        times[1] - times[0] >= 6_000,
        "the pause held the second batch: {times:?}"
    );
    assert_eq!(
        batches(&times, 1_500),
        vec![1, 2, 1],
        "canary, then waves of 2 (the last one smaller): {times:?}"
    );
    env.stop_controller().await;
}
