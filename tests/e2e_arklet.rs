//! Issue 9: the controller against bases that behave like the real Arklet, over MQTT and over
//! HTTP. Every scenario is one `async fn` taking the tunnel, run by one test per tunnel.
//!
//! The bases are the independent Arklet double (`arklet_double`), written from the Arklet and
//! SOFAArk sources and sharing no code with the controller: installs take time (the module is
//! RESOLVED meanwhile), a start failure is *thrown* (the real reason is the last `Caused by:`
//! line), a second command for a running identity is rejected as a conflict, a repeated install
//! of an installed identity is `REPEAT_BIZ`, and `base/baseline` is answered with one
//! `batchInstallBizResponse`.
//!
//! Scenarios: lifecycle (install, scale down, silence, graceful shutdown), a start failure's real
//! reason, a 60 s module start, the install timeout, a conflict answer, in-place replacement
//! (pod image patch, image-only rollout), a base returning after eviction, a peer Deployment's
//! modules in a new base's baseline, invalid module specs.
//!
//! `slow_module_start_*` takes a little over a minute by design (a 60 s module start).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arklet_double::{Base, BizId, BizState, Command};
use common::{
    TestEnv, Tunnel, eventually, installs, node_of, pod_events, runs, uninstalls, waiting,
};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::watcher;
use module_controller::vpod::status::is_ready;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use serde_json::json;

const T: Duration = Duration::from_secs(90);
/// Longer than the controller's test `command_timeout` (3 s) and a heartbeat: a command that
/// was going to be (re)sent has been by then.
const QUIET: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers

/// The package URL `module_deployment` gives a module.
fn url_of(module: &str, version: &str) -> String {
    format!("https://example.invalid/modules/{module}-{version}-ark-biz.jar")
}

/// Whether a container reason (or Event reason) says something failed.
fn is_failure(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    ["fail", "timedout", "error", "conflict", "broken"]
        .iter()
        .any(|w| r.contains(w))
}

/// Live (not deleting) pods of `app`.
async fn live_pods(env: &TestEnv, app: &str) -> Vec<Pod> {
    env.app_pods(app)
        .await
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

/// Every waiting reason any pod of an app shows, from the moment it is started: a watch sees
/// each status write, so a failure shown for a moment is not missed.
struct SeenReasons {
    seen: Arc<Mutex<Vec<(String, String, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SeenReasons {
    async fn start(env: &TestEnv, app: &str) -> SeenReasons {
        let seen: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let s = seen.clone();
        let api: Api<Pod> = env.pods();
        let selector = format!("app={app}");
        let task = tokio::spawn(async move {
            let mut synced = Some(synced_tx);
            let mut stream = watcher(api, watcher::Config::default().labels(&selector)).boxed();
            while let Some(ev) = stream.next().await {
                let pod = match ev {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => p,
                    Ok(watcher::Event::InitDone) => {
                        if let Some(tx) = synced.take() {
                            let _ = tx.send(());
                        }
                        continue;
                    }
                    _ => continue,
                };
                if let Some((reason, message)) = waiting(&pod) {
                    let name = pod.metadata.name.clone().unwrap_or_default();
                    s.lock().expect("lock").push((name, reason, message));
                }
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(30), synced_rx).await;
        SeenReasons { seen, task }
    }

    fn all(&self) -> Vec<(String, String, String)> {
        self.seen.lock().expect("lock").clone()
    }

    fn reasons(&self) -> BTreeSet<String> {
        self.all().into_iter().map(|(_, r, _)| r).collect()
    }
}

impl Drop for SeenReasons {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Events the module controller reported in the test namespace about pods whose name starts
/// with `app` (Deployment pods).
async fn app_pod_events(env: &TestEnv, app: &str) -> Vec<(String, String, String)> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), &env.ns);
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| e.reporting_controller.as_deref() == Some(common::REPORTING_CONTROLLER))
        .filter_map(|e| {
            let r = e.regarding.as_ref()?;
            let name = r.name.clone()?;
            (r.kind.as_deref() == Some("Pod") && name.starts_with(&format!("{app}-"))).then(|| {
                (
                    name,
                    e.reason.clone().unwrap_or_default(),
                    e.note.clone().unwrap_or_default(),
                )
            })
        })
        .collect()
}

/// The module's `installBiz` commands a base received, as (version, url, strategy).
fn install_cmds(b: &Base, name: &str) -> Vec<(String, String, Option<String>)> {
    b.installs_of(name)
        .into_iter()
        .filter_map(|r| match r.command {
            Command::Install {
                version,
                url,
                strategy,
                ..
            } => Some((version, url, strategy)),
            _ => None,
        })
        .collect()
}

/// Instants at which `b` ran no ACTIVATED instance of `name` after it first ran one.
fn empty_instants(b: &Base, name: &str) -> Vec<u64> {
    let mut seen = false;
    let mut gaps = Vec::new();
    for snap in b.history() {
        if snap.active.iter().any(|k| k.name == name) {
            seen = true;
        } else if seen {
            gaps.push(snap.at_ms);
        }
    }
    gaps
}

/// Sends one MQTT message from a client of its own (QoS 1, waits for the broker's PUBACK).
async fn publish_raw(env: &TestEnv, topic: &str, body: serde_json::Value) {
    let id = format!(
        "e2e-raw-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let mut opts = MqttOptions::new(id, env.broker.host(), env.broker.port());
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut events) = AsyncClient::new(opts, 8);
    client
        .publish(topic, QoS::AtLeastOnce, false, body.to_string())
        .await
        .expect("publish queued");
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await;
    assert_eq!(acked, Ok(true), "the broker acknowledged {topic}");
    let _ = client.disconnect().await;
}

/// POSTs one Arklet command to an HTTP base, as another client would; returns the JSON answer.
async fn post_to_base(b: &Base, command: &str, body: serde_json::Value) -> serde_json::Value {
    let port = b.http_port().expect("an HTTP base");
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/{command}"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("the base answers");
    let text = resp.text().await.expect("answer body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("answer {text:?} is not JSON: {e}"))
}

/// Adds tolerations so pods leave a NotReady/unreachable node after 1 s (the default is 300 s).
fn fast_eviction(d: &mut Deployment) {
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

/// `module_deployment` whose pods carry `pkg=<pkg>` and spread one per base per `pkg`, so a
/// rollout's new pod may join a base that still runs the old one; the module's image is `url`.
fn package_deployment(
    env: &TestEnv,
    name: &str,
    version: &str,
    replicas: i32,
    pkg: &str,
    url: &str,
) -> Deployment {
    let mut d = env.module_deployment(name, name, version, replicas);
    let tpl = &mut d.spec.as_mut().expect("spec").template;
    tpl.metadata
        .get_or_insert_with(Default::default)
        .labels
        .get_or_insert_with(Default::default)
        .insert("pkg".into(), pkg.into());
    let spec = tpl.spec.as_mut().expect("pod spec");
    spec.containers[0].image = Some(url.into());
    let anti = spec
        .affinity
        .as_mut()
        .and_then(|a| a.pod_anti_affinity.as_mut())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_mut()
        })
        .expect("pod anti-affinity");
    anti[0]
        .label_selector
        .get_or_insert_with(Default::default)
        .match_labels
        .get_or_insert_with(Default::default)
        .insert("pkg".into(), pkg.into());
    d
}

// ---------------------------------------------------------------------------------------------
// 1. install → Ready; scale down → one uninstall; silent → NotReady → back, nothing re-installed;
//    graceful shutdown → VNode removed.

async fn lifecycle(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-life-{}", tunnel.name())).await;
    env.start_controller().await;
    let b1 = env.base(tunnel, "l1").await;
    let b2 = env.base(tunnel, "l2").await;
    for id in ["l1", "l2"] {
        env.wait_node_ready(id, T).await;
    }
    let (m, v) = ("lifebiz", "1.0.0");
    env.apply_deployment(&env.module_deployment(m, m, v, 2))
        .await;
    let pods = env.wait_ready_pods(m, 2, T).await;
    let nodes: BTreeSet<String> = pods.iter().filter_map(node_of).collect();
    assert_eq!(nodes.len(), 2, "one pod per base: {nodes:?}");
    for b in [&b1, &b2] {
        assert!(runs(b, m, v), "{} runs {m}", b.identity());
        assert_eq!(
            install_cmds(b, m),
            vec![(v.to_string(), url_of(m, v), None)],
            "{}: exactly one plain installBiz",
            b.identity()
        );
    }

    // Scale down: exactly one uninstallBiz of that name and version, on the base that lost
    // its pod; the other base keeps the module.
    env.scale(m, 1).await;
    let kept_node = eventually(
        T,
        "one pod left and one base without the module",
        || async {
            let pods = env.app_pods(m).await;
            let running = [&b1, &b2].iter().filter(|b| runs(b, m, v)).count();
            (pods.len() == 1 && running == 1)
                .then(|| node_of(&pods[0]))
                .flatten()
        },
    )
    .await;
    let (kept, gone, kept_id) = if kept_node == env.node_name("l1") {
        (&b1, &b2, "l1")
    } else {
        (&b2, &b1, "l2")
    };
    assert!(runs(kept, m, v), "the base of the remaining pod runs it");
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        uninstalls(gone, m),
        vec![v.to_string()],
        "exactly one uninstallBiz of {m}:{v} where the pod went away"
    );
    assert!(
        uninstalls(kept, m).is_empty(),
        "nothing uninstalled where the pod stays"
    );
    let survivor = live_pods(&env, m).await[0]
        .metadata
        .name
        .clone()
        .expect("name");

    // The base goes silent: its VNode and its pod go NotReady, with the reason.
    let installs_before = installs(kept, m).len();
    kept.go_silent();
    eventually(T, "VNode NotReady", || async {
        (env.node_ready(kept_id).await.as_deref() != Some("True")).then_some(())
    })
    .await;
    let (reason, message) = eventually(T, "pod NotReady with BaseInstanceNotReady", || async {
        let p = env.pods().get(&survivor).await.ok()?;
        let w = waiting(&p)?;
        (w.0 == "ModuleController.BaseInstanceNotReady" && !is_ready(p.status.as_ref()))
            .then_some(w)
    })
    .await;
    assert_eq!(reason, "ModuleController.BaseInstanceNotReady");
    assert!(!message.is_empty(), "the reason comes with a message");

    // Back: Ready again, the same pod, and nothing re-installed or uninstalled.
    kept.resume();
    env.wait_node_ready(kept_id, T).await;
    let pods = env.wait_ready_pods(m, 1, T).await;
    assert_eq!(pods[0].metadata.name.as_deref(), Some(survivor.as_str()));
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        installs(kept, m).len(),
        installs_before,
        "nothing re-installed after the base came back"
    );
    assert!(uninstalls(kept, m).is_empty());
    assert!(runs(kept, m, v));
    assert!(
        empty_instants(kept, m).is_empty(),
        "the module never stopped on the returning base"
    );

    // Graceful shutdown (deactivated heartbeat): the VNode is removed.
    kept.shutdown_graceful().await;
    eventually(T, "VNode removed after a graceful shutdown", || async {
        env.nodes()
            .get_opt(&env.node_name(kept_id))
            .await
            .expect("get node")
            .is_none()
            .then_some(())
    })
    .await;
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_install_scale_down_silence_and_shutdown_mqtt() {
    lifecycle(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_install_scale_down_silence_and_shutdown_http() {
    lifecycle(Tunnel::Http).await;
}

// ---------------------------------------------------------------------------------------------
// 2. An install failure shows the base's real reason, on the container and as an Event.

async fn install_failure(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-fail-{}", tunnel.name())).await;
    env.start_controller().await;
    let base = env.base(tunnel, "f1").await;
    // What the module's main method throws; Arklet wraps it in InvocationTargetException
    // (MQTT: `message` = that class name, the stack in `data.message`; HTTP: an internal
    // error with `errorStackTrace`), the BROKEN record carries the same stack.
    let root = format!(
        "java.lang.IllegalStateException: port 8080 already in use by {} test",
        tunnel.name()
    );
    base.fail_installs("badbiz", "FAILED", &root);
    env.wait_node_ready("f1", T).await;
    env.apply_deployment(&env.module_deployment("badbiz", "badbiz", "1.0.0", 1))
        .await;
    let (pod, message) = eventually(T, "Arklet.InstallModuleFailed on the container", || async {
        let p = env.app_pods("badbiz").await.into_iter().next()?;
        let (reason, message) = waiting(&p)?;
        (reason == "Arklet.InstallModuleFailed").then_some((p, message))
    })
    .await;
    assert!(
        message.contains(&root),
        "the message carries the base's real reason {root:?}: {message:?}"
    );
    assert!(
        !message.contains("install biz not success!") && message.trim() != "FAILED",
        "not Arklet's generic text: {message:?}"
    );
    assert!(!is_ready(pod.status.as_ref()));
    let name = pod.metadata.name.clone().expect("name");
    eventually(
        T,
        "Event Arklet.InstallModuleFailed with the reason",
        || async {
            pod_events(&env.client, &env.ns, &name)
                .await
                .into_iter()
                .any(|(r, note)| r == "Arklet.InstallModuleFailed" && note.contains(&root))
                .then_some(())
        },
    )
    .await;
    // The base really failed the module (the double's own record, not the controller's).
    assert_eq!(
        base.module("badbiz", "1.0.0").map(|b| b.state),
        Some(BizState::Broken)
    );
    assert!(!installs(&base, "badbiz").is_empty());
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_failure_shows_the_real_reason_and_an_event_mqtt() {
    install_failure(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_failure_shows_the_real_reason_and_an_event_http() {
    install_failure(Tunnel::Http).await;
}

// ---------------------------------------------------------------------------------------------
// 3. A module that takes 60 s to start: one installBiz, "executing" meanwhile, never a failure.

async fn slow_start(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-slow-{}", tunnel.name())).await;
    env.start_controller().await;
    let base = env.base(tunnel, "s1").await;
    let (m, v) = ("slowbiz", "1.0.0");
    base.set_install_time_of(m, Duration::from_secs(60));
    env.wait_node_ready("s1", T).await;
    let seen = SeenReasons::start(&env, m).await;
    env.apply_deployment(&env.module_deployment(m, m, v, 1))
        .await;
    let sent = eventually(T, "installBiz received", || async {
        base.installs_of(m).first().map(|r| r.at_ms)
    })
    .await;
    eventually(
        T,
        "Arklet.InstallModuleExecuting while it starts",
        || async {
            let p = env.app_pods(m).await.into_iter().next()?;
            (waiting(&p)?.0 == "Arklet.InstallModuleExecuting").then_some(())
        },
    )
    .await;
    assert_eq!(
        base.module(m, v).map(|b| b.state),
        Some(BizState::Resolved),
        "still starting when the pod says so"
    );
    let pods = env.wait_ready_pods(m, 1, Duration::from_secs(150)).await;
    let ready_after = arklet_double::now_ms().saturating_sub(sent);
    assert!(
        ready_after >= 59_000,
        "Ready only once the module started ({ready_after} ms after the install)"
    );
    assert!(is_ready(pods[0].status.as_ref()));
    assert_eq!(
        installs(&base, m),
        vec![v.to_string()],
        "exactly one installBiz over the whole start"
    );
    let conflicts: Vec<_> = base
        .replies()
        .into_iter()
        .filter(|r| r.message.as_deref().is_some_and(|m| m.contains("conflict")))
        .collect();
    assert!(conflicts.is_empty(), "no command collided: {conflicts:?}");
    let failures: Vec<_> = seen
        .all()
        .into_iter()
        .filter(|(_, r, _)| is_failure(r))
        .collect();
    assert!(failures.is_empty(), "a failure was shown: {failures:?}");
    assert!(
        seen.reasons().contains("Arklet.InstallModuleExecuting"),
        "{:?}",
        seen.reasons()
    );
    let events: Vec<_> = app_pod_events(&env, m)
        .await
        .into_iter()
        .filter(|(_, r, _)| is_failure(r))
        .collect();
    assert!(events.is_empty(), "failure Events: {events:?}");
    // Only real changes are written, never a clock: a minute of "still starting" is one status
    // (pending install, executing, Ready: a few writes, not one per second).
    let waiting_writes = seen.all();
    assert!(
        waiting_writes.len() <= 6,
        "the pod's status was rewritten {} times while the module started: {:?}",
        waiting_writes.len(),
        &waiting_writes[..waiting_writes.len().min(6)]
    );
    env.stop_controller().await;
}

/// Slow by design (a 60 s module start), always run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_module_start_is_one_install_and_never_a_failure_mqtt() {
    slow_start(Tunnel::Mqtt).await;
}

/// Slow by design (a 60 s module start, longer than the controller's 30 s HTTP call timeout),
/// always run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_module_start_is_one_install_and_never_a_failure_http() {
    slow_start(Tunnel::Http).await;
}

/// Past `MODULE_INSTALL_TIMEOUT_SECS` a module still starting says so (and the base keeps
/// starting it: it becomes Ready when it has started, with no second install).
async fn install_timeout(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-tout-{}", tunnel.name())).await;
    let mut settings = env.settings();
    settings.install_timeout = Duration::from_secs(4);
    env.start_controller_with(settings).await;
    let base = env.base(tunnel, "o1").await;
    let (m, v) = ("latebiz", "1.0.0");
    base.set_install_time_of(m, Duration::from_secs(20));
    env.wait_node_ready("o1", T).await;
    env.apply_deployment(&env.module_deployment(m, m, v, 1))
        .await;
    let (pod, message) = eventually(T, "Arklet.InstallModuleTimedOut", || async {
        let p = env.app_pods(m).await.into_iter().next()?;
        let (reason, message) = waiting(&p)?;
        (reason == "Arklet.InstallModuleTimedOut").then_some((p, message))
    })
    .await;
    assert!(!message.is_empty(), "the reason comes with a message");
    assert_eq!(
        base.module(m, v).map(|b| b.state),
        Some(BizState::Resolved),
        "shown while the base is still starting it"
    );
    let name = pod.metadata.name.clone().expect("name");
    eventually(T, "Event Arklet.InstallModuleTimedOut", || async {
        pod_events(&env.client, &env.ns, &name)
            .await
            .into_iter()
            .any(|(r, _)| r == "Arklet.InstallModuleTimedOut")
            .then_some(())
    })
    .await;
    let pods = env.wait_ready_pods(m, 1, T).await;
    assert_eq!(pods[0].metadata.name.as_deref(), Some(name.as_str()));
    assert_eq!(
        installs(&base, m),
        vec![v.to_string()],
        "one installBiz: a late module is not sent again"
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_past_its_timeout_is_reported_then_ready_mqtt() {
    install_timeout(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_past_its_timeout_is_reported_then_ready_http() {
    install_timeout(Tunnel::Http).await;
}

// ---------------------------------------------------------------------------------------------
// 4. A conflict answer (a second install of an identity whose install still runs) is not a
//    failure.

async fn conflict(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-conf-{}", tunnel.name())).await;
    env.start_controller().await;
    let base = env.base(tunnel, "c1").await;
    let (m, v) = ("confbiz", "1.0.0");
    let id = BizId::new(m, v);
    base.set_install_time_of(m, Duration::from_secs(25));
    env.wait_node_ready("c1", T).await;
    let seen = SeenReasons::start(&env, m).await;
    env.apply_deployment(&env.module_deployment(m, m, v, 1))
        .await;
    eventually(T, "the install runs on the base", || async {
        (base.module(m, v).map(|b| b.state) == Some(BizState::Resolved)).then_some(())
    })
    .await;

    // The controller restarts mid-install; the new instance finds the module starting.
    env.stop_controller().await;
    env.start_controller().await;
    // A second install of the same identity reaches the base while the first still runs (as
    // a re-send of the new instance, or of another client, would). Over MQTT the base
    // publishes its answer on `base/bizOperation`, where the controller reads it.
    let body = json!({"bizName": m, "bizVersion": v, "bizUrl": url_of(m, v)});
    match tunnel {
        Tunnel::Mqtt => {
            let topic = format!("koupleless_{}/c1/installBiz", env.env);
            publish_raw(&env, &topic, body).await;
        }
        Tunnel::Http => {
            let answer = post_to_base(&base, "installBiz", body).await;
            assert_eq!(answer["code"], "FAILED", "{answer}");
        }
    }
    // Only an identity whose command is unfinished gets this answer (Arklet's per-biz lock).
    eventually(T, "the base answered a conflict", || async {
        base.replies().into_iter().find(|r| {
            r.command == "installBiz"
                && r.biz.as_ref() == Some(&id)
                && r.code.as_deref() == Some("FAILED")
                && r.message
                    .as_deref()
                    .is_some_and(|t| t.contains("conflict, exist unfinished command(installBiz)"))
        })
    })
    .await;

    // The first install finishes: Ready, no failure shown at any time.
    env.wait_ready_pods(m, 1, T).await;
    assert_eq!(base.active_modules(), vec![id.clone()]);
    assert!(uninstalls(&base, m).is_empty(), "nothing uninstalled");
    tokio::time::sleep(QUIET).await;
    let failures: Vec<_> = seen
        .all()
        .into_iter()
        .filter(|(_, r, _)| is_failure(r))
        .collect();
    assert!(failures.is_empty(), "a failure was shown: {failures:?}");
    let events: Vec<_> = app_pod_events(&env, m)
        .await
        .into_iter()
        .filter(|(_, r, _)| is_failure(r))
        .collect();
    assert!(events.is_empty(), "failure Events: {events:?}");
    env.wait_ready_pods(m, 1, Duration::from_secs(5)).await;
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_answer_is_not_a_failure_mqtt() {
    conflict(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflict_answer_is_not_a_failure_http() {
    conflict(Tunnel::Http).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Same name and version from another package URL: replaced in place.

async fn in_place_image_change(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-inpl-{}", tunnel.name())).await;
    env.start_controller().await;
    let base = env.base(tunnel, "i1").await;
    let (m, v) = ("inplbiz", "1.0.0");
    env.wait_node_ready("i1", T).await;
    env.apply_deployment(&env.module_deployment(m, m, v, 1))
        .await;
    let pods = env.wait_ready_pods(m, 1, T).await;
    let pod = pods[0].metadata.name.clone().expect("name");
    assert_eq!(
        base.module(m, v).map(|b| b.url),
        Some(url_of(m, v)),
        "installed from the first URL"
    );

    // Patch the pod's image: same BIZ_VERSION, another package.
    let new_url = format!("https://example.invalid/modules/{m}-{v}-hotfix-ark-biz.jar");
    env.pods()
        .patch(
            &pod,
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"containers": [{"name": m, "image": new_url}]}})),
        )
        .await
        .expect("patch the pod's image");
    eventually(
        T,
        "installBiz uninstallThenInstall with the new URL",
        || async {
            install_cmds(&base, m)
                .into_iter()
                .any(|(ver, url, strategy)| {
                    ver == v
                        && url == new_url
                        && strategy.as_deref() == Some("uninstallThenInstall")
                })
                .then_some(())
        },
    )
    .await;
    eventually(
        T,
        "the base runs the module from the new URL, pod Ready",
        || async {
            let biz = base.module(m, v)?;
            let p = env.pods().get(&pod).await.ok()?;
            (biz.url == new_url && biz.state == BizState::Activated && is_ready(p.status.as_ref()))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        base.modules().iter().filter(|b| b.name == m).count(),
        1,
        "one instance of the module: {:?}",
        base.modules()
    );
    let note = eventually(T, "Event ModuleController.InPlaceReplacement", || async {
        pod_events(&env.client, &env.ns, &pod)
            .await
            .into_iter()
            .find(|(r, _)| r == "ModuleController.InPlaceReplacement")
            .map(|(_, note)| note)
    })
    .await;
    let lower = note.to_lowercase();
    assert!(
        lower.contains("lossless") && lower.contains("not"),
        "the Event says the replacement was not lossless: {note:?}"
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_image_change_replaces_the_module_mqtt() {
    in_place_image_change(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_image_change_replaces_the_module_http() {
    in_place_image_change(Tunnel::Http).await;
}

async fn image_only_rollout(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-imgr-{}", tunnel.name())).await;
    env.start_controller().await;
    let bases = [env.base(tunnel, "g1").await, env.base(tunnel, "g2").await];
    for id in ["g1", "g2"] {
        env.wait_node_ready(id, T).await;
    }
    let (m, v) = ("imgbiz", "1.0.0");
    let old_url = url_of(m, v);
    let new_url = format!("https://example.invalid/modules/{m}-{v}-rebuilt-ark-biz.jar");
    env.apply_deployment(&package_deployment(&env, m, v, 2, "a", &old_url))
        .await;
    env.wait_ready_pods(m, 2, T).await;
    for b in &bases {
        assert_eq!(b.module(m, v).map(|b| b.url), Some(old_url.clone()));
    }

    // A rollout that changes only the image: same name, same BIZ_VERSION.
    env.apply_deployment(&package_deployment(&env, m, v, 2, "b", &new_url))
        .await;
    eventually(T, "2 Ready pods, all of the new template", || async {
        let pods = env.app_pods(m).await;
        let ok = pods.len() == 2
            && pods.iter().all(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && is_ready(p.status.as_ref())
                    && p.metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get("pkg"))
                        .map(String::as_str)
                        == Some("b")
            });
        ok.then_some(())
    })
    .await;
    for b in &bases {
        let ok = b
            .wait_until(T, |b| {
                b.module(m, v)
                    .is_some_and(|biz| biz.url == new_url && biz.state == BizState::Activated)
                    && b.modules().iter().filter(|x| x.name == m).count() == 1
            })
            .await;
        assert!(
            ok,
            "base {} runs {m}:{v} from the new URL; has {:?}",
            b.identity(),
            b.modules()
        );
        assert!(
            install_cmds(b, m).iter().any(|(_, url, _)| *url == new_url),
            "base {} was sent the new URL",
            b.identity()
        );
    }
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_only_rollout_replaces_the_module_on_every_base_mqtt() {
    image_only_rollout(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_only_rollout_replaces_the_module_on_every_base_http() {
    image_only_rollout(Tunnel::Http).await;
}

// ---------------------------------------------------------------------------------------------
// 6. A base returns after Kubernetes evicted its pods; the replacements bind back to it.

async fn evicted_and_back(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-evict-{}", tunnel.name())).await;
    env.start_controller().await;
    let base = env.base(tunnel, "e1").await;
    let (m, v) = ("evictbiz", "1.0.0");
    env.wait_node_ready("e1", T).await;
    let mut d = env.module_deployment(m, m, v, 1);
    fast_eviction(&mut d);
    env.apply_deployment(&d).await;
    let pods = env.wait_ready_pods(m, 1, T).await;
    let first = pods[0].metadata.name.clone().expect("name");
    assert_eq!(installs(&base, m), vec![v.to_string()]);

    // Silent long enough for the node lifecycle controller to taint the VNode and evict.
    base.go_silent();
    eventually(
        Duration::from_secs(120),
        "the pod evicted, a replacement created",
        || async {
            let pods = env.app_pods(m).await;
            let evicted = pods
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(first.as_str()))
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
            let replacement = pods.iter().any(|p| {
                p.metadata.name.as_deref() != Some(first.as_str())
                    && p.metadata.deletion_timestamp.is_none()
            });
            (evicted && replacement).then_some(())
        },
    )
    .await;

    // Back: the replacement binds to the same base and is Ready, the evicted pod goes away.
    base.resume();
    let pods = env.wait_ready_pods(m, 1, Duration::from_secs(120)).await;
    assert_ne!(pods[0].metadata.name.as_deref(), Some(first.as_str()));
    assert_eq!(node_of(&pods[0]), Some(env.node_name("e1")));
    eventually(T, "the evicted pod is gone", || async {
        env.pods()
            .get_opt(&first)
            .await
            .expect("get pod")
            .is_none()
            .then_some(())
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        installs(&base, m),
        vec![v.to_string()],
        "no installBiz after the base returned (only the first one)"
    );
    assert!(
        uninstalls(&base, m).is_empty(),
        "no uninstallBiz: {:?}",
        base.uninstalls_of(m)
    );
    assert!(runs(&base, m, v));
    assert!(
        empty_instants(&base, m).is_empty(),
        "the module never left the base: {:?}",
        base.history()
    );
    env.wait_ready_pods(m, 1, Duration::from_secs(5)).await;
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_base_keeps_its_module_for_replacement_pods_mqtt() {
    evicted_and_back(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returning_base_keeps_its_module_for_replacement_pods_http() {
    evicted_and_back(Tunnel::Http).await;
}

// ---------------------------------------------------------------------------------------------
// 7. A new base gets a peer Deployment's modules in its baseline.

async fn peer_baseline(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-peer-{}", tunnel.name())).await;
    let mut settings = env.settings();
    settings.replicas_sync = true;
    env.start_controller_with(settings).await;
    let p1 = env.base(tunnel, "p1").await;
    env.wait_node_ready("p1", T).await;
    let (m, v) = ("peerbiz", "1.0.0");
    let mut d = env.module_deployment(m, m, v, 1);
    d.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(
            "virtual-kubelet.koupleless.io/strategy".into(),
            "peer".into(),
        );
    env.apply_deployment(&d).await;
    env.wait_ready_pods(m, 1, T).await;
    assert!(runs(&p1, m, v));

    // A new base: its baseline (MQTT `base/baseline`, HTTP `/queryBaseline` answer) has it.
    let started = Instant::now();
    let p2 = env.base(tunnel, "p2").await;
    let entries = eventually(T, "the new base received its baseline", || async {
        p2.commands().into_iter().find_map(|r| match r.command {
            Command::Baseline(entries) => Some(entries),
            _ => None,
        })
    })
    .await;
    assert!(
        entries.iter().any(|e| e.name.as_deref() == Some(m)
            && e.version.as_deref() == Some(v)
            && e.url.as_deref() == Some(url_of(m, v).as_str())),
        "the baseline has {m}:{v} with its URL: {entries:?}"
    );
    assert!(
        p2.wait_until(T, |b| runs(b, m, v)).await,
        "the new base installed its baseline"
    );

    // Replicas follow the bases; the new pod is Ready once bound, with no installBiz of its own.
    let pods = env.wait_ready_pods(m, 2, T).await;
    let nodes: BTreeSet<String> = pods.iter().filter_map(node_of).collect();
    assert_eq!(
        nodes,
        BTreeSet::from([env.node_name("p1"), env.node_name("p2")])
    );
    assert!(
        installs(&p2, m).is_empty(),
        "no separate installBiz on the new base: {:?}",
        p2.installs_of(m)
    );
    assert_eq!(installs(&p1, m), vec![v.to_string()]);
    eprintln!(
        "peer baseline ({}): new pod Ready {:?} after the base started",
        tunnel.name(),
        started.elapsed()
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_base_gets_peer_modules_in_its_baseline_mqtt() {
    peer_baseline(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_base_gets_peer_modules_in_its_baseline_http() {
    peer_baseline(Tunnel::Http).await;
}

// ---------------------------------------------------------------------------------------------
// 8. An invalid module spec: User.InvalidParameter with a clear message, and an Event.

async fn invalid_spec(tunnel: Tunnel) {
    let mut env = TestEnv::new(&format!("ark-inval-{}", tunnel.name())).await;
    env.start_controller().await;
    let base = env.base(tunnel, "n1").await;
    env.wait_node_ready("n1", T).await;

    let mut no_version = env.module_deployment("nover", "nover", "1.0.0", 1);
    let image = "registry.example.invalid/team/notaurl:1.0.0";
    let mut not_url = env.module_deployment("noturl", "noturl", "1.0.0", 1);
    for (d, edit) in [(&mut no_version, 0), (&mut not_url, 1)] {
        let c = d
            .spec
            .as_mut()
            .and_then(|s| s.template.spec.as_mut())
            .and_then(|s| s.containers.first_mut())
            .expect("container");
        if edit == 0 {
            c.env = None;
        } else {
            c.image = Some(image.into());
        }
    }
    env.apply_deployment(&no_version).await;
    env.apply_deployment(&not_url).await;

    for (app, must_mention) in [("nover", "BIZ_VERSION"), ("noturl", image)] {
        let (pod, message) = eventually(T, &format!("User.InvalidParameter on {app}"), || async {
            let p = env.app_pods(app).await.into_iter().next()?;
            let (reason, message) = waiting(&p)?;
            (reason == "User.InvalidParameter").then_some((p, message))
        })
        .await;
        assert!(
            message.contains(must_mention),
            "{app}: the message names the problem ({must_mention}): {message:?}"
        );
        assert!(!is_ready(pod.status.as_ref()));
        let name = pod.metadata.name.clone().expect("name");
        eventually(
            T,
            &format!("Event User.InvalidParameter on {app}"),
            || async {
                pod_events(&env.client, &env.ns, &name)
                    .await
                    .into_iter()
                    .any(|(r, note)| r == "User.InvalidParameter" && note.contains(must_mention))
                    .then_some(())
            },
        )
        .await;
    }
    tokio::time::sleep(QUIET).await;
    for app in ["nover", "noturl"] {
        assert!(
            base.installs_of(app).is_empty(),
            "an invalid module is never sent to the base: {:?}",
            base.installs_of(app)
        );
    }
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_module_spec_is_a_user_error_with_an_event_mqtt() {
    invalid_spec(Tunnel::Mqtt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_module_spec_is_a_user_error_with_an_event_http() {
    invalid_spec(Tunnel::Http).await;
}
