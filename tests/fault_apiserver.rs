//! Fault: the kube-apiserver hangs for a minute (SIGSTOP of a private control plane's
//! apiserver: connections stay open, nothing answers, as with an overloaded or partitioned
//! apiserver).
//!
//! The controller must keep serving its bases (heartbeats keep them alive, module-list queries
//! keep flowing), say it is not ready while the apiserver does not answer, and afterwards
//! flap nothing, re-install nothing, and act on what was applied during the outage.
//!
//! Also: a watch the apiserver keeps refusing (RBAC without `list`/`watch` on Deployments)
//! shows in `/readyz`, by name, while the bases are served.

mod common;

use std::time::{Duration, Instant};

use common::faults::{http_get, longest_gap, queries_between};
use common::watch::{ReadyRecorder, now_ms};
use common::{PrivateControlPlane, TestEnv, eventually, installs};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use module_controller::apiserver::watch::WatchState;
use testkit::localenv::control_plane::ControlPlaneOptions;

const T: Duration = Duration::from_secs(90);
/// How long the apiserver stays frozen.
const FREEZE: Duration = Duration::from_secs(60);
/// The controller's full module-list period in these tests (`TestEnv::settings`).
const RESYNC: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apiserver_outage_keeps_bases_served_and_flaps_nothing() {
    // kube-controller-manager's node lifecycle controller is cut off by the freeze too: once the
    // apiserver answers again it would judge every Lease by its stale cache and mark every Node
    // NotReady (and their pods), whatever the controller did. A grace period longer than the
    // outage keeps that out of this test, which is about the module controller.
    let pcp = PrivateControlPlane::start(ControlPlaneOptions {
        node_monitor_grace_period: Duration::from_secs(150),
        ..Default::default()
    })
    .await;
    let mut env = TestEnv::new_on("outage", pcp.get()).await;
    env.start_controller().await;
    let endpoint = env.serve_endpoint().await;
    let readyz = format!("{endpoint}/readyz");
    let health = env.controller.as_ref().expect("controller").health.clone();

    let mqtt = env.mqtt_base("o-mqtt").await;
    let http = env.http_base("o-http").await;
    for id in ["o-mqtt", "o-http"] {
        env.wait_node_ready(id, T).await;
    }
    env.apply_deployment(&env.module_deployment("before", "before", "1.0.0", 2))
        .await;
    env.wait_ready_pods("before", 2, T).await;
    let installs_before = (installs(&mqtt, "before"), installs(&http, "before"));
    assert_eq!(installs_before.0.len(), 1);
    assert_eq!(installs_before.1.len(), 1);
    assert_eq!(http_get(&readyz).await.map(|r| r.0), Some(200));

    let pods = ReadyRecorder::pods("module pods", env.pods(), watcher::Config::default()).await;
    let nodes = ReadyRecorder::vnodes(&env).await;
    // Both watches are open before the freeze: a change to a watched object reaches each.
    // (A watch still opening when the apiserver froze failed its connect 30 s later.)
    let (pod_events, node_events) = (pods.events(), nodes.events());
    let probe =
        serde_json::json!({"metadata": {"annotations": {"e2e.koupleless.io/watch-probe": "1"}}});
    let pod_name = env
        .pods()
        .list(&Default::default())
        .await
        .expect("list pods")
        .items
        .first()
        .and_then(|p| p.metadata.name.clone())
        .expect("a module pod");
    env.pods()
        .patch(&pod_name, &PatchParams::default(), &Patch::Merge(&probe))
        .await
        .expect("annotate a pod");
    env.nodes()
        .patch(
            &env.node_name("o-mqtt"),
            &PatchParams::default(),
            &Patch::Merge(&probe),
        )
        .await
        .expect("annotate a VNode");
    pods.wait_event_after(pod_events).await;
    nodes.wait_event_after(node_events).await;

    // ---- The outage.
    let frozen = env.cp.freeze_apiserver().expect("freeze");
    let t0 = now_ms();
    let started = Instant::now();
    // Control: the apiserver really does not answer (a client without its own deadline, such
    // as a kube client, waits as long as the outage lasts).
    let direct = tokio::time::timeout(Duration::from_secs(5), env.client.apiserver_version()).await;
    assert!(direct.is_err(), "the frozen apiserver answered: {direct:?}");
    // A module Deployment applied during the outage: the request waits for the apiserver.
    let late = env.module_deployment("during", "during", "1.0.0", 2);
    let deployments = env.deployments();
    let apply = tokio::spawn(async move {
        deployments
            .patch(
                "during",
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(&late),
            )
            .await
    });
    let mut readyz_seen: Vec<(u64, u16, String)> = Vec::new();
    let mut watches_alone_ready_while_frozen = false;
    while started.elapsed() < FREEZE {
        let (code, body) = http_get(&readyz).await.unwrap_or((0, "no answer".into()));
        readyz_seen.push((now_ms() - t0, code, body));
        // What /readyz would say from the watches alone (they stall without an error).
        let states = health.watches.states();
        if started.elapsed() > Duration::from_secs(15)
            && states
                .iter()
                .filter(|(n, _)| n.as_str() != "apiserver")
                .all(|(_, s)| *s == WatchState::Synced)
        {
            watches_alone_ready_while_frozen = true;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let t1 = now_ms();
    frozen.thaw();
    let thawed = Instant::now();

    // ---- After the thaw.
    // A request made during the outage fails once the client's connect timeout (30 s) passes;
    // then it is applied right after the thaw, as a user would retry it.
    let applied_during = tokio::time::timeout(Duration::from_secs(60), apply)
        .await
        .expect("the apply made during the outage ends")
        .expect("apply task");
    if let Err(e) = &applied_during {
        eprintln!("the apply made during the outage failed ({e}); applied again after the thaw");
        env.apply_deployment(&env.module_deployment("during", "during", "1.0.0", 2))
            .await;
    }
    common::eventually(
        Duration::from_secs(30),
        "/readyz 200 after the thaw",
        || async { matches!(http_get(&readyz).await, Some((200, _))).then_some(()) },
    )
    .await;
    let readyz_recovery = thawed.elapsed();
    env.wait_ready_pods("during", 2, T).await;
    let during_ready = thawed.elapsed();
    // A few more heartbeats, Lease renewals and resyncs.
    tokio::time::sleep(Duration::from_secs(8)).await;

    // Every VNode's Lease was renewed after the thaw, and every node is Ready.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(env.client.clone(), "kube-node-lease");
    for id in ["o-mqtt", "o-http"] {
        let l = leases.get(&env.node_name(id)).await.expect("lease");
        let renewed = l
            .spec
            .and_then(|s| s.renew_time)
            .map(|t| t.0.as_millisecond() as u64)
            .unwrap_or(0);
        assert!(
            renewed > t1,
            "the Lease of {id} was not renewed after the thaw"
        );
        assert_eq!(env.node_ready(id).await.as_deref(), Some("True"));
    }

    let mut problems = Vec::new();
    // The controller kept talking to its bases: module-list queries kept flowing.
    for b in [&mqtt, &http] {
        let qs = queries_between(b, t0, t1);
        let gap = longest_gap(&qs, t0, t1);
        eprintln!(
            "{}: {} module-list queries during the {} s outage, longest gap {} ms",
            b.identity(),
            qs.len(),
            FREEZE.as_secs(),
            gap
        );
        if gap > 3 * RESYNC.as_millis() as u64 {
            problems.push(format!(
                "{}: no module-list query for {gap} ms during the outage ({} queries in {} s; resync every {} s)",
                b.identity(),
                qs.len(),
                FREEZE.as_secs(),
                RESYNC.as_secs()
            ));
        }
    }
    // /readyz said not-ready while frozen (the controller probes every 5 s)...
    let first_503 = readyz_seen.iter().find(|(_, c, _)| *c == 503);
    match first_503 {
        None => problems.push(format!(
            "/readyz never reported the outage: {readyz_seen:?}"
        )),
        Some((at, _, body)) => {
            if *at > 15_000 {
                problems.push(format!("/readyz reported the outage only after {at} ms"));
            }
            if !body.contains("apiserver") {
                problems.push(format!("/readyz does not name the apiserver: {body}"));
            }
            let ok_after: Vec<_> = readyz_seen
                .iter()
                .filter(|(t, c, _)| t > at && *c != 503)
                .collect();
            if !ok_after.is_empty() {
                problems.push(format!(
                    "/readyz said ready again while frozen: {ok_after:?}"
                ));
            }
        }
    }
    // ... and the watches alone would not have told (they stall without an error): the
    // probe is what makes /readyz honest.
    eprintln!(
        "watches alone looked ready while frozen: {watches_alone_ready_while_frozen}; /readyz back to 200 {} ms after the thaw; the Deployment applied during the outage Ready {} ms after it",
        readyz_recovery.as_millis(),
        during_ready.as_millis()
    );
    // Nothing flapped.
    pods.assert_alive();
    nodes.assert_alive();
    let pod_drops = pods.drops();
    if !pod_drops.is_empty() {
        problems.push(format!("pods went NotReady: {pod_drops:?}"));
    }
    let node_drops = nodes.drops();
    if !node_drops.is_empty() {
        problems.push(format!("VNodes went NotReady: {node_drops:?}"));
    }
    // Nothing re-installed.
    let installs_after = (installs(&mqtt, "before"), installs(&http, "before"));
    if installs_after != installs_before {
        problems.push(format!(
            "modules re-installed: {installs_before:?} before, {installs_after:?} after"
        ));
    }
    for b in [&mqtt, &http] {
        let n = installs(b, "during").len();
        if n != 1 {
            problems.push(format!(
                "{}: {n} installs of the module applied during the outage",
                b.identity()
            ));
        }
    }
    let nodes_now: Vec<Node> = env
        .nodes()
        .list(
            &kube::api::ListParams::default()
                .labels(&format!("virtual-kubelet.koupleless.io/env={}", env.env)),
        )
        .await
        .expect("list")
        .items;
    assert_eq!(nodes_now.len(), 2);
    assert!(
        problems.is_empty(),
        "after a {} s apiserver outage:\n  {}\nreadyz while frozen: {:?}",
        FREEZE.as_secs(),
        problems.join("\n  "),
        readyz_seen
            .iter()
            .map(|(t, c, _)| (t, c))
            .collect::<Vec<_>>()
    );
    env.stop_controller().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_watch_shows_in_readyz_while_bases_are_served() {
    let mut env = TestEnv::new("watch-rbac").await;
    // The rights of deploy/rbac.yaml, but Deployments may only be read one by one: the
    // controller's Deployment watch is refused (403), its other watches are not.
    let client = common::deploy::controller_client(&env, |rules| {
        for r in rules.iter_mut() {
            if r["resources"] == serde_json::json!(["deployments"]) {
                r["verbs"] = serde_json::json!(["get"]);
            }
        }
    })
    .await;
    // Control: the refusal is real (the controller's own rights cannot list Deployments).
    let own: Api<k8s_openapi::api::apps::v1::Deployment> = Api::all(client.clone());
    match own.list(&Default::default()).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("listing Deployments was not refused: {other:?}"),
    }
    env.launch_controller(env.settings(), client).await;
    let endpoint = env.serve_endpoint().await;
    let metrics = env.metrics();

    // Once the other watches listed, /readyz names the refused one, and why, and only it.
    let readyz = eventually(T, "/readyz names the refused watch alone", || async {
        match http_get(&format!("{endpoint}/readyz")).await {
            Some((503, body))
                if body.starts_with("deployments:")
                    && body.contains("forbidden")
                    && !body.contains(';') =>
            {
                Some(body)
            }
            _ => None,
        }
    })
    .await;
    eprintln!("/readyz: 503 {readyz}");
    assert_eq!(
        http_get(&format!("{endpoint}/healthz")).await.map(|r| r.0),
        Some(200),
        "the process is alive"
    );

    // The bases are served all the same: heartbeats become Ready VNodes with renewed Leases,
    // module lists keep being queried.
    let mqtt = env.mqtt_base("w-mqtt").await;
    let http = env.http_base("w-http").await;
    for id in ["w-mqtt", "w-http"] {
        env.wait_node_ready(id, T).await;
    }
    let t0 = now_ms();
    let errors0 = metrics.watches.errors("deployments");
    tokio::time::sleep(Duration::from_secs(12)).await;
    let t1 = now_ms();
    for b in [&mqtt, &http] {
        let qs = queries_between(b, t0, t1);
        assert!(
            qs.len() >= 2,
            "{}: {} module-list queries in 12 s (resync every {} s)",
            b.identity(),
            qs.len(),
            RESYNC.as_secs()
        );
    }
    for id in ["w-mqtt", "w-http"] {
        assert_eq!(env.node_ready(id).await.as_deref(), Some("True"), "{id}");
    }
    // Nothing the MQTT bases said was dropped for want of room (a stalled loop fills the
    // queue the MQTT event loop hands messages to; the HTTP tunnel waits for room instead).
    assert_eq!(
        metrics.mqtt.received("queue_full"),
        0,
        "MQTT messages dropped"
    );
    assert!(metrics.mqtt.received("ok") > 0 && metrics.http.received("ok") > 0);
    // Persistent: still not ready, and the watch retries with backoff, not in a hot loop.
    let (code, body) = http_get(&format!("{endpoint}/readyz"))
        .await
        .expect("answers");
    assert_eq!(code, 503, "{body}");
    let retries = metrics.watches.errors("deployments") - errors0;
    assert!(
        (1..=15).contains(&retries),
        "{retries} refused Deployment watch attempts in 12 s"
    );

    // Control: with the rights of deploy/rbac.yaml the watch lists, and /readyz says ready.
    common::deploy::controller_client(&env, |_| {}).await;
    let recovered = Instant::now();
    eventually(
        Duration::from_secs(90),
        "/readyz 200 once allowed",
        || async {
            matches!(
                http_get(&format!("{endpoint}/readyz")).await,
                Some((200, _))
            )
            .then_some(())
        },
    )
    .await;
    eprintln!(
        "/readyz 200 {:.1} s after the Deployment watch was allowed",
        recovered.elapsed().as_secs_f64()
    );
    env.stop_controller().await;
}
