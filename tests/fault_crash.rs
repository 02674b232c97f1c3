//! Fault: the controller process crashes (SIGKILL of the real binary, configured by
//! environment variables as in a cluster) with work in flight, and is started again.
//!
//! Nothing may be sent twice: every install and uninstall command a base received is counted by
//! exact name and version (the Arklet double's records). Nothing may flap: Node and Pod watches
//! record every Ready transition and fail the test if they end or error. A rollout interrupted
//! by the crash must stay lossless: on every base the old version stays active until the new
//! one is (the double's history of active modules).

mod common;

use std::time::Duration;

use arklet_double::{Base, BizId};
use common::faults::{empty_instants, op_counts, resent_since, rolling_deployment};
use common::process::ControllerProcess;
use common::watch::{Drop_, ReadyRecorder, now_ms};
use common::{TestEnv, eventually, installs, runs};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use module_controller::vpod::status::is_ready;
use serde_json::json;

const T: Duration = Duration::from_secs(90);

async fn recorders(env: &TestEnv) -> (ReadyRecorder, ReadyRecorder) {
    let nodes = ReadyRecorder::vnodes(env).await;
    let pods = ReadyRecorder::pods("module pods", env.pods(), watcher::Config::default()).await;
    (nodes, pods)
}

fn version_of(p: &Pod) -> Option<String> {
    p.metadata.labels.as_ref()?.get("version").cloned()
}

/// Waits until exactly `n` pods of `app` exist, all Ready, not deleting, all on `version`.
async fn wait_all_on(env: &TestEnv, app: &str, version: &str, n: usize) {
    eventually(
        T,
        &format!("{n} Ready pods of {app}, all on {version}"),
        || async {
            let pods = env.app_pods(app).await;
            let ok = pods.len() == n
                && pods.iter().all(|p| {
                    p.metadata.deletion_timestamp.is_none()
                        && is_ready(p.status.as_ref())
                        && version_of(p).as_deref() == Some(version)
                });
            ok.then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_install_resends_nothing_and_flaps_nothing() {
    let env = TestEnv::new("crash-install").await;
    let mut ctrl = ControllerProcess::start(ControllerProcess::vars(&env)).await;
    let bases = [env.mqtt_base("ci1").await, env.mqtt_base("ci2").await];
    for b in &bases {
        // A module that takes 10 s to start.
        b.set_install_time_of("slow", Duration::from_secs(10));
    }
    for id in ["ci1", "ci2"] {
        env.wait_node_ready(id, T).await;
    }
    let (nodes, pods) = recorders(&env).await;
    env.apply_deployment(&env.module_deployment("slow", "slow", "1.0.0", 2))
        .await;
    eventually(T, "both bases starting the module", || async {
        bases
            .iter()
            .all(|b| installs(b, "slow").len() == 1)
            .then_some(())
    })
    .await;
    // Mid-install: the bases are starting the module.
    for b in &bases {
        assert!(
            !runs(b, "slow", "1.0.0"),
            "{} already runs it",
            b.identity()
        );
    }
    let kill_ms = now_ms();
    let status = ctrl.kill();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL),
        "the controller died of SIGKILL: {status:?}"
    );
    ctrl.restart().await;
    let restarted_ms = now_ms();
    env.wait_ready_pods("slow", 2, T).await;
    // Several resyncs (5 s) and command timeouts (3 s) later.
    tokio::time::sleep(Duration::from_secs(8)).await;

    let mut problems = Vec::new();
    for b in &bases {
        // The module became active only after the restart: the kill really was mid-install.
        let active_at = b
            .history()
            .into_iter()
            .find(|s| s.active.contains(&BizId::new("slow", "1.0.0")))
            .map(|s| s.at_ms)
            .expect("the module became active");
        assert!(
            active_at > restarted_ms,
            "{}: the module was active before the restart ({active_at} ≤ {restarted_ms})",
            b.identity()
        );
        problems.extend(resent_since(b, kill_ms));
        let counts = op_counts(b);
        let expected = [(("install", "slow".to_string(), "1.0.0".to_string()), 1)]
            .into_iter()
            .collect();
        if counts != expected {
            problems.push(format!("{}: commands {counts:?}", b.identity()));
        }
    }
    nodes.assert_alive();
    pods.assert_alive();
    if !nodes.drops().is_empty() {
        problems.push(format!("VNodes went NotReady: {:?}", nodes.drops()));
    }
    if !pods.drops().is_empty() {
        problems.push(format!("pods went NotReady: {:?}", pods.drops()));
    }
    assert!(
        problems.is_empty(),
        "after a SIGKILL mid-install (kill at {kill_ms}, ready again at {restarted_ms}):\n  {}",
        problems.join("\n  ")
    );
    eprintln!(
        "mid-install crash: controller back {} ms after the kill; {} node and {} pod watch events recorded",
        restarted_ms - kill_ms,
        nodes.events(),
        pods.events()
    );
}

/// Pod Ready drops that are flaps in a rollout from `old` to `new`: a new-version pod going
/// NotReady, a pod Ready again after NotReady, an old pod NotReady but never deleted.
fn rollout_flaps(drops: Vec<Drop_>, old: &str) -> Vec<Drop_> {
    drops
        .into_iter()
        .filter(|d| {
            let retired = d.labels.get("version").map(String::as_str) == Some(old)
                && !d.ready_again
                && d.deleted_later;
            !retired
        })
        .collect()
}

/// On each base, the first moment without `old` active already has `new` active.
fn handover_gaps(b: &Base, module: &str, old: &str, new: &str) -> Vec<String> {
    let old_id = BizId::new(module, old);
    let new_id = BizId::new(module, new);
    let mut had_old = false;
    let mut out = Vec::new();
    for s in b.history() {
        if s.active.contains(&old_id) {
            had_old = true;
        } else if had_old {
            if !s.active.contains(&new_id) {
                out.push(format!(
                    "{}: {module}@{old} stopped at {} before {new} was active ({:?})",
                    b.identity(),
                    s.at_ms,
                    s.active
                ));
            }
            break;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_rollout_resends_nothing_and_stays_lossless() {
    const M: &str = "rollbiz";
    let env = TestEnv::new("crash-roll").await;
    let mut ctrl = ControllerProcess::start(ControllerProcess::vars(&env)).await;
    let mut bases = Vec::new();
    for i in 0..3 {
        let b = env.mqtt_base(&format!("cr{i}")).await;
        b.set_install_time(Duration::from_secs(1));
        bases.push(b);
    }
    for i in 0..3 {
        env.wait_node_ready(&format!("cr{i}"), T).await;
    }
    env.apply_deployment(&rolling_deployment(&env, "roll", M, "1.0.0", 3, 1, 0))
        .await;
    wait_all_on(&env, "roll", "1.0.0", 3).await;
    let (nodes, pods) = recorders(&env).await;

    env.apply_deployment(&rolling_deployment(&env, "roll", M, "2.0.0", 3, 1, 0))
        .await;
    // Mid-rollout: the first base is installing the new version.
    let first = eventually(T, "a base installing 2.0.0", || async {
        bases
            .iter()
            .find(|b| installs(b, M).iter().any(|v| v == "2.0.0"))
            .map(|b| b.identity().to_string())
    })
    .await;
    let kill_ms = now_ms();
    ctrl.kill();
    let busy_at_kill: Vec<String> = bases
        .iter()
        .filter(|b| installs(b, M).iter().any(|v| v == "2.0.0") && !runs(b, M, "2.0.0"))
        .map(|b| b.identity().to_string())
        .collect();
    ctrl.restart().await;
    let restarted_ms = now_ms();
    wait_all_on(&env, "roll", "2.0.0", 3).await;
    for b in &bases {
        let want = vec![BizId::new(M, "2.0.0")];
        assert!(
            b.wait_until(T, |b| b.active_modules() == want
                && b.modules().iter().filter(|m| m.name == M).count() == 1)
                .await,
            "{} should run only {M}@2.0.0: {:?}",
            b.identity(),
            b.modules()
        );
    }
    tokio::time::sleep(Duration::from_secs(6)).await;

    let mut problems = Vec::new();
    for b in &bases {
        problems.extend(resent_since(b, kill_ms));
        let counts = op_counts(b);
        let expected = [
            (("install", M.to_string(), "1.0.0".to_string()), 1),
            (("install", M.to_string(), "2.0.0".to_string()), 1),
            (("uninstall", M.to_string(), "1.0.0".to_string()), 1),
        ]
        .into_iter()
        .collect();
        if counts != expected {
            problems.push(format!("{}: commands {counts:?}", b.identity()));
        }
        let gaps = empty_instants(b, M);
        if !gaps.is_empty() {
            problems.push(format!("{} ran no {M} at {gaps:?}", b.identity()));
        }
        problems.extend(handover_gaps(b, M, "1.0.0", "2.0.0"));
    }
    nodes.assert_alive();
    pods.assert_alive();
    if !nodes.drops().is_empty() {
        problems.push(format!("VNodes went NotReady: {:?}", nodes.drops()));
    }
    let flaps = rollout_flaps(pods.drops(), "1.0.0");
    if !flaps.is_empty() {
        problems.push(format!("pod Ready flaps: {flaps:?}"));
    }
    assert!(
        problems.is_empty(),
        "after a SIGKILL mid-rollout (first base {first}, installing at the kill: {busy_at_kill:?}):\n  {}",
        problems.join("\n  ")
    );
    eprintln!(
        "mid-rollout crash: killed while {busy_at_kill:?} installed 2.0.0; controller back {} ms after the kill",
        restarted_ms - kill_ms
    );
}

/// Control: the checks above can fail. A base that loses an install command (it arrives while
/// the base is silent) gets it again, and `resent_since` sees that; a VNode or pod whose Ready is
/// taken away (here by another writer) is a drop, and the recorders see both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_the_checks_see_a_resent_install_and_ready_flaps() {
    let mut env = TestEnv::new("crash-control").await;
    // A liveness timeout long enough for a silent base to keep its VNode (and get commands).
    let settings = env.settings().with_heartbeat(Duration::from_secs(1), 30);
    env.start_controller_with(settings).await;
    let b = env.mqtt_base("cc1").await;
    env.wait_node_ready("cc1", T).await;
    let (nodes, pods) = recorders(&env).await;
    // The controller knows what the base runs (it installs nothing before that).
    eventually(T, "the base answered a module-list query", || async {
        b.replies()
            .iter()
            .any(|r| r.command == "queryAllBiz")
            .then_some(())
    })
    .await;

    b.go_silent();
    env.apply_deployment(&env.module_deployment("lost", "lost", "1.0.0", 1))
        .await;
    eventually(T, "the install reached the silent base", || async {
        (!installs(&b, "lost").is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.resume();
    let pod = env.wait_ready_pods("lost", 1, T).await.remove(0);
    let resent = resent_since(&b, 0);
    assert!(
        !resent.is_empty(),
        "the lost install was sent again, and the check must see it: {:?}",
        b.commands()
    );
    assert_eq!(installs(&b, "lost").len(), 2, "{resent:?}");
    assert!(pods.drops().is_empty() && nodes.drops().is_empty());

    // Another writer takes the pod's and the VNode's Ready away.
    let name = pod.metadata.name.clone().expect("name");
    env.pods()
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "Control"}
            ]}})),
        )
        .await
        .expect("patch pod status");
    env.nodes()
        .patch_status(
            &env.node_name("cc1"),
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "Control"}
            ]}})),
        )
        .await
        .expect("patch node status");
    eventually(T, "the recorders saw both drops", || async {
        (pods.drops().iter().any(|d| d.name == name)
            && nodes.drops().iter().any(|d| d.name == env.node_name("cc1")))
        .then_some(())
    })
    .await;
    nodes.assert_alive();
    pods.assert_alive();
    env.stop_controller().await;
}
