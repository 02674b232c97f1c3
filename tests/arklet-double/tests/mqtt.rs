//! The double over a real broker, driven by a raw MQTT client playing the controller.

mod common;

use std::time::Duration;

use arklet_double::{Base, BaseConfig, BaselineReply, BizId, BizState, Command, Fleet, Transport};
use common::{Ctl, Mosquitto};
use serde_json::json;

const T: Duration = Duration::from_secs(10);

fn cfg(id: &str) -> BaseConfig {
    let mut c = BaseConfig::new(id);
    c.heartbeat_interval = Duration::from_millis(300);
    c
}

fn mqtt(b: &Mosquitto) -> Transport {
    Transport::Mqtt {
        host: "127.0.0.1".into(),
        port: b.port,
    }
}

fn install(name: &str, version: &str, url: &str) -> serde_json::Value {
    json!({"bizName": name, "bizVersion": version, "bizUrl": url})
}

#[tokio::test]
async fn connect_publishes_query_baseline_then_heartbeats() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let base = Base::start(cfg("10.0.0.1"), mqtt(&broker)).await.unwrap();
    let q = ctl.nth("10.0.0.1", "base/queryBaseline", 1).await;
    assert_eq!(
        q.data(),
        &json!({"identity": "10.0.0.1", "name": "base", "version": "1.0.0", "clusterName": "default"})
    );
    assert!(q.json.as_ref().unwrap()["publishTimestamp"].is_u64());
    let hb = ctl.nth("10.0.0.1", "base/heart", 3).await;
    assert_eq!(hb.data()["state"], "activated");
    assert_eq!(hb.data()["baseMetadata"]["identity"], "10.0.0.1");
    assert_eq!(hb.data()["port"], 0);
    assert!(hb.data().get("healthData").is_none());
    // The first message of the process is queryBaseline, before any heartbeat.
    assert_eq!(
        ctl.all("10.0.0.1")[0].topic,
        "koupleless_dev/10.0.0.1/base/queryBaseline"
    );
    // Only heartbeats and one queryBaseline are sent unasked.
    assert!(
        ctl.all("10.0.0.1")
            .iter()
            .all(|m| m.topic.ends_with("/base/heart") || m.topic.ends_with("/base/queryBaseline"))
    );
    assert_eq!(ctl.on("10.0.0.1", "base/queryBaseline").len(), 1);
    assert!(base.heartbeats_sent() >= 3);
}

#[tokio::test]
async fn slow_install_is_resolved_then_activated_and_queries_are_not_blocked() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b1");
    c.install_time = Duration::from_millis(1500);
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    ctl.send(
        "b1",
        "installBiz",
        &install("biz1", "0.0.1", "file:///biz1.jar"),
    )
    .await;
    assert!(base.wait_until(T, |b| !b.modules().is_empty()).await);
    ctl.send("b1", "queryAllBiz", &json!({})).await;
    let first = ctl.nth("b1", "base/simpleBiz", 1).await;
    assert_eq!(first.data()[0]["state"], "resolved");
    assert_eq!(first.data()[0]["latestStateRecord"]["state"], "RESOLVED");
    // The query was answered while the install still ran (5 MQTT worker threads).
    assert!(ctl.on("b1", "base/bizOperation").is_empty());
    let op = ctl.nth("b1", "base/bizOperation", 1).await;
    assert_eq!(op.data()["command"], "installBiz");
    assert_eq!(op.data()["bizName"], "biz1");
    assert_eq!(op.data()["response"]["code"], "SUCCESS");
    assert_eq!(op.data()["response"]["data"]["code"], "SUCCESS");
    ctl.send("b1", "queryAllBiz", &json!({})).await;
    let second = ctl.nth("b1", "base/simpleBiz", 2).await;
    assert_eq!(second.data()[0]["state"], "activated");
    assert_eq!(second.data()[0]["latestStateRecord"]["reason"], "STARTED");
    assert_eq!(base.active_modules(), vec![BizId::new("biz1", "0.0.1")]);
    assert_eq!(base.modules()[0].url, "file:///biz1.jar");
}

#[tokio::test]
async fn a_second_command_for_a_running_biz_is_rejected_at_once() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b2");
    c.install_time = Duration::from_millis(1500);
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    let req = install("biz1", "0.0.1", "file:///biz1.jar");
    ctl.send("b2", "installBiz", &req).await;
    ctl.send("b2", "installBiz", &req).await;
    ctl.send(
        "b2",
        "uninstallBiz",
        &json!({"bizName": "biz1", "bizVersion": "0.0.1"}),
    )
    .await;
    let conflict = ctl.nth("b2", "base/bizOperation", 1).await;
    assert_eq!(
        conflict.data()["response"],
        json!({"code": "FAILED", "message": "FAILED:biz1:0.0.1 installBiz conflict, exist unfinished command(installBiz) for this biz"})
    );
    let conflict2 = ctl.nth("b2", "base/bizOperation", 2).await;
    assert_eq!(
        conflict2.data()["response"]["message"],
        "FAILED:biz1:0.0.1 uninstallBiz conflict, exist unfinished command(installBiz) for this biz"
    );
    // Both rejections came while the module was still starting.
    assert_eq!(base.modules()[0].state, BizState::Resolved);
    let done = ctl.nth("b2", "base/bizOperation", 3).await;
    assert_eq!(done.data()["response"]["code"], "SUCCESS");
    assert!(base.wait_until(T, |b| b.replies().len() == 3).await);
    assert!(
        base.replies()[..2]
            .iter()
            .all(|r| r.code.as_deref() == Some("FAILED")
                && r.message.as_deref().is_some_and(|m| m.contains("conflict")))
    );
}

#[tokio::test]
async fn repeat_biz_not_found_biz_and_uninstall() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let base = Base::start(cfg("b3"), mqtt(&broker)).await.unwrap();
    let req = install("biz1", "0.0.1", "file:///biz1.jar");
    ctl.send("b3", "installBiz", &req).await;
    ctl.nth("b3", "base/bizOperation", 1).await;
    ctl.send("b3", "installBiz", &req).await;
    let repeat = ctl.nth("b3", "base/bizOperation", 2).await;
    assert_eq!(repeat.data()["response"]["code"], "FAILED");
    assert_eq!(
        repeat.data()["response"]["message"],
        "install biz not success!"
    );
    assert_eq!(repeat.data()["response"]["data"]["code"], "REPEAT_BIZ");
    ctl.send(
        "b3",
        "uninstallBiz",
        &json!({"bizName": "biz9", "bizVersion": "9"}),
    )
    .await;
    let nf = ctl.nth("b3", "base/bizOperation", 3).await;
    assert_eq!(nf.data()["command"], "uninstallBiz");
    assert_eq!(nf.data()["response"]["data"]["code"], "NOT_FOUND_BIZ");
    assert_eq!(
        nf.data()["response"]["message"],
        "uninstall biz not success!"
    );
    ctl.send(
        "b3",
        "uninstallBiz",
        &json!({"bizName": "biz1", "bizVersion": "0.0.1"}),
    )
    .await;
    let ok = ctl.nth("b3", "base/bizOperation", 4).await;
    assert_eq!(ok.data()["response"]["code"], "SUCCESS");
    assert!(base.modules().is_empty());
    assert!(base.wait_until(T, |b| b.replies().len() == 4).await);
    let data_codes: Vec<_> = base.replies().iter().map(|r| r.data_code.clone()).collect();
    assert_eq!(
        data_codes,
        vec![
            Some("SUCCESS".into()),
            Some("REPEAT_BIZ".into()),
            Some("NOT_FOUND_BIZ".into()),
            Some("SUCCESS".into())
        ]
    );
    assert_eq!(base.installs_of("biz1").len(), 2);
    assert_eq!(base.uninstalls_of("biz1").len(), 1);
}

#[tokio::test]
async fn uninstall_then_install_replaces_the_package() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let base = Base::start(cfg("b4"), mqtt(&broker)).await.unwrap();
    ctl.send(
        "b4",
        "installBiz",
        &install("biz1", "0.0.1", "file:///old.jar"),
    )
    .await;
    ctl.nth("b4", "base/bizOperation", 1).await;
    let mut req = install("biz1", "0.0.1", "file:///new.jar");
    req["installStrategy"] = json!("uninstallThenInstall");
    ctl.send("b4", "installBiz", &req).await;
    let op = ctl.nth("b4", "base/bizOperation", 2).await;
    assert_eq!(op.data()["response"]["code"], "SUCCESS");
    assert_eq!(base.modules().len(), 1);
    assert_eq!(base.modules()[0].url, "file:///new.jar");
    assert_eq!(base.modules()[0].state, BizState::Activated);
    // The replacement went through an empty active set.
    let sets: Vec<usize> = base.history().iter().map(|s| s.active.len()).collect();
    assert_eq!(sets, vec![1, 0, 1]);
}

#[tokio::test]
async fn operations_publish_one_biz_operation_and_nothing_else() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b5");
    c.heartbeat_interval = Duration::from_secs(60);
    let _base = Base::start(c, mqtt(&broker)).await.unwrap();
    ctl.send(
        "b5",
        "installBiz",
        &install("biz1", "0.0.1", "file:///a.jar"),
    )
    .await;
    ctl.nth("b5", "base/bizOperation", 1).await;
    ctl.send(
        "b5",
        "uninstallBiz",
        &json!({"bizName": "biz1", "bizVersion": "0.0.1"}),
    )
    .await;
    ctl.nth("b5", "base/bizOperation", 2).await;
    // Everything the base publishes travels one connection in order: once the answer to a
    // later query arrives, anything published after the operations has arrived too.
    ctl.send("b5", "queryAllBiz", &json!({})).await;
    let answer = ctl.nth("b5", "base/simpleBiz", 1).await;
    assert_eq!(answer.data(), &json!([]));
    ctl.send("b5", "health", &json!({})).await;
    let health = ctl.nth("b5", "base/health", 1).await;
    assert_eq!(health.data()["code"], "SUCCESS");
    assert_eq!(
        health.data()["data"]["healthData"]["jvm"]["java max metaspace"],
        1i64 << 30
    );
    let topics: Vec<String> = ctl
        .all("b5")
        .iter()
        .map(|m| m.topic.rsplit_once("b5/").unwrap().1.to_string())
        .collect();
    assert_eq!(
        topics,
        vec![
            "base/queryBaseline",
            "base/heart",
            "base/bizOperation",
            "base/bizOperation",
            "base/simpleBiz",
            "base/health"
        ]
    );
}

#[tokio::test]
async fn baseline_is_batch_installed_and_answered() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b6");
    c.install_time = Duration::from_millis(300);
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    ctl.nth("b6", "base/queryBaseline", 1).await;
    ctl.send(
        "b6",
        "base/baseline",
        &json!([
            {"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": "file:///biz1.jar"},
            {"bizName": "biz2", "bizVersion": "0.0.1", "bizUrl": "file:///biz2.jar"}
        ]),
    )
    .await;
    // Entries of one priority start in parallel: both are RESOLVED at the same time.
    assert!(
        base.wait_until(T, |b| b.modules().len() == 2
            && b.modules().iter().all(|m| m.state == BizState::Resolved))
            .await
    );
    let resp = ctl.nth("b6", "base/batchInstallBizResponse", 1).await;
    assert_eq!(resp.data()["command"], "batchInstallBiz");
    assert_eq!(resp.data()["response"]["code"], "SUCCESS");
    let by_url = &resp.data()["response"]["data"]["bizUrlToResponse"];
    assert_eq!(by_url["file:///biz1.jar"]["code"], "SUCCESS");
    assert_eq!(by_url["file:///biz2.jar"]["code"], "SUCCESS");
    assert_eq!(base.active_modules().len(), 2);
    assert!(ctl.on("b6", "base/simpleBiz").is_empty());
    assert!(matches!(base.commands()[0].command, Command::Baseline(ref e) if e.len() == 2));
}

#[tokio::test]
async fn baseline_of_the_nov_2024_arklet_publishes_simple_biz() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b7");
    c.baseline_reply = BaselineReply::SimpleBiz;
    c.query_baseline_with_name = false;
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    let q = ctl.nth("b7", "base/queryBaseline", 1).await;
    assert!(q.data().get("name").is_none());
    ctl.send(
        "b7",
        "base/baseline",
        &json!([{"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": "file:///biz1.jar"}]),
    )
    .await;
    let list = ctl.nth("b7", "base/simpleBiz", 1).await;
    assert_eq!(list.data()[0]["name"], "biz1");
    assert_eq!(list.data()[0]["state"], "activated");
    assert!(ctl.on("b7", "base/batchInstallBizResponse").is_empty());
    assert_eq!(base.active_modules(), vec![BizId::new("biz1", "0.0.1")]);
}

#[tokio::test]
async fn a_failed_start_is_reported_and_leaves_a_broken_module() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let base = Base::start(cfg("b8"), mqtt(&broker)).await.unwrap();
    base.fail_installs(
        "bad",
        "FAILED",
        "java.lang.IllegalStateException: port 8080 in use",
    );
    ctl.send(
        "b8",
        "installBiz",
        &install("bad", "1.0.0", "file:///bad.jar"),
    )
    .await;
    let op = ctl.nth("b8", "base/bizOperation", 1).await;
    let resp = &op.data()["response"];
    assert_eq!(resp["code"], "FAILED");
    assert_eq!(
        resp["message"],
        "java.lang.reflect.InvocationTargetException"
    );
    assert_eq!(resp["data"]["code"], "FAILED");
    assert!(
        resp["data"]["message"]
            .as_str()
            .unwrap()
            .contains("Caused by: java.lang.IllegalStateException: port 8080 in use")
    );
    ctl.send("b8", "queryAllBiz", &json!({})).await;
    let list = ctl.nth("b8", "base/simpleBiz", 1).await;
    assert_eq!(list.data()[0]["state"], "broken");
    assert_eq!(
        list.data()[0]["latestStateRecord"]["reason"],
        "INSTALL_FAILED"
    );
    assert!(
        list.data()[0]["latestStateRecord"]["message"]
            .as_str()
            .unwrap()
            .contains("port 8080 in use")
    );
    // A returned (not thrown) code takes the "install biz not success!" path.
    base.fail_install_version("odd", "1", "ILLEGAL_STATE_BIZ", "odd state");
    ctl.send("b8", "installBiz", &install("odd", "1", "file:///odd.jar"))
        .await;
    let op = ctl.nth("b8", "base/bizOperation", 2).await;
    assert_eq!(op.data()["response"]["message"], "install biz not success!");
    assert_eq!(op.data()["response"]["data"]["code"], "ILLEGAL_STATE_BIZ");
    assert_eq!(op.data()["response"]["data"]["message"], "odd state");
    base.clear_failures();
    ctl.send("b8", "installBiz", &install("odd", "1", "file:///odd.jar"))
        .await;
    let op = ctl.nth("b8", "base/bizOperation", 3).await;
    assert_eq!(op.data()["response"]["code"], "SUCCESS");
}

#[tokio::test]
async fn a_newer_version_takes_over_and_the_old_one_is_deactivated() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let base = Base::start(cfg("b9"), mqtt(&broker)).await.unwrap();
    ctl.send("b9", "installBiz", &install("biz1", "1", "file:///1.jar"))
        .await;
    ctl.nth("b9", "base/bizOperation", 1).await;
    ctl.send("b9", "installBiz", &install("biz1", "2", "file:///2.jar"))
        .await;
    ctl.nth("b9", "base/bizOperation", 2).await;
    ctl.send("b9", "queryAllBiz", &json!({})).await;
    let list = ctl.nth("b9", "base/simpleBiz", 1).await;
    assert_eq!(list.data()[0]["state"], "deactivated");
    assert_eq!(list.data()[0]["latestStateRecord"]["reason"], "SWITCHED");
    assert_eq!(list.data()[1]["state"], "activated");
    let active: Vec<_> = base.history().into_iter().map(|s| s.active).collect();
    assert_eq!(
        active,
        vec![vec![BizId::new("biz1", "1")], vec![BizId::new("biz1", "2")]]
    );
}

#[tokio::test]
async fn silence_drops_commands_and_resume_heartbeats_at_once() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b10");
    c.heartbeat_interval = Duration::from_secs(60);
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    ctl.nth("b10", "base/heart", 1).await;
    base.go_silent();
    assert!(base.is_silent());
    ctl.send("b10", "installBiz", &install("biz1", "1", "file:///1.jar"))
        .await;
    assert!(base.wait_until(T, |b| !b.commands().is_empty()).await);
    assert!(base.commands()[0].dropped);
    assert!(base.modules().is_empty());
    base.resume();
    // The heartbeat interval is a minute: only resume() can produce a second one now.
    ctl.nth("b10", "base/heart", 2).await;
    assert!(ctl.on("b10", "base/bizOperation").is_empty());
    ctl.send("b10", "queryAllBiz", &json!({})).await;
    ctl.nth("b10", "base/simpleBiz", 1).await;
    assert!(ctl.on("b10", "base/bizOperation").is_empty());
}

#[tokio::test]
async fn graceful_shutdown_and_restart() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b11");
    c.heartbeat_interval = Duration::from_secs(60);
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    ctl.send("b11", "installBiz", &install("biz1", "1", "file:///1.jar"))
        .await;
    ctl.nth("b11", "base/bizOperation", 1).await;
    base.shutdown_graceful().await;
    let last = ctl.nth("b11", "base/heart", 2).await;
    assert_eq!(last.data()["state"], "deactivated");
    assert!(!base.is_running().await);
    base.restart(true).await.unwrap();
    ctl.nth("b11", "base/queryBaseline", 2).await;
    assert_eq!(base.active_modules(), vec![BizId::new("biz1", "1")]);
    base.restart(false).await.unwrap();
    ctl.nth("b11", "base/queryBaseline", 3).await;
    assert!(base.modules().is_empty());
    // Still answering after the restarts.
    ctl.send("b11", "queryAllBiz", &json!({})).await;
    ctl.nth("b11", "base/simpleBiz", 1).await;
}

#[tokio::test]
async fn malformed_and_unknown_messages_get_no_answer() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let base = Base::start(cfg("b12"), mqtt(&broker)).await.unwrap();
    ctl.send_raw("b12", "installBiz", b"{not json".to_vec())
        .await;
    ctl.send_raw("b12", "installBiz", b"[1,2]".to_vec()).await;
    ctl.send("b12", "rebootPlease", &json!({})).await;
    ctl.send_raw("b12", "base/baseline", b"{}".to_vec()).await;
    assert!(base.wait_until(T, |b| b.malformed_count() == 4).await);
    // Validation failures do get an answer (thrown inside the handler's try).
    ctl.send(
        "b12",
        "installBiz",
        &json!({"bizName": "a", "bizVersion": "1"}),
    )
    .await;
    let op = ctl.nth("b12", "base/bizOperation", 1).await;
    assert_eq!(
        op.data()["response"]["message"],
        "bizUrl should not be blank"
    );
    assert_eq!(ctl.on("b12", "base/bizOperation").len(), 1);
}

#[tokio::test]
async fn legacy_bases_answer_on_base_biz() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("b13");
    c.legacy_biz_topic = true;
    let _base = Base::start(c, mqtt(&broker)).await.unwrap();
    ctl.send("b13", "installBiz", &install("biz1", "1", "file:///1.jar"))
        .await;
    ctl.nth("b13", "base/bizOperation", 1).await;
    ctl.send("b13", "queryAllBiz", &json!({})).await;
    let m = ctl.nth("b13", "base/biz", 1).await;
    assert_eq!(m.data()["code"], "SUCCESS");
    assert_eq!(m.data()["data"][0]["bizState"], "ACTIVATED");
    assert!(ctl.on("b13", "base/simpleBiz").is_empty());
}

#[tokio::test]
async fn a_fleet_shares_one_broker() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let fleet = Fleet::start(50, cfg("f"), mqtt(&broker)).await.unwrap();
    assert_eq!(fleet.len(), 50);
    assert_eq!(fleet.base(7).unwrap().identity(), "f-7");
    assert!(
        ctl.wait(T, |c| (0..50)
            .all(|i| !c.on(&format!("f-{i}"), "base/heart").is_empty()))
            .await
    );
    ctl.send("f-3", "installBiz", &install("biz1", "1", "file:///1.jar"))
        .await;
    ctl.nth("f-3", "base/bizOperation", 1).await;
    assert_eq!(fleet.base(3).unwrap().active_modules().len(), 1);
    assert!(fleet.base(4).unwrap().modules().is_empty());
    fleet.stop().await;
}

/// The double itself scales to the fleets the churn test and the scale bench use (about a
/// second on 2 cores).
#[tokio::test]
async fn a_thousand_bases_in_one_process() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let started = std::time::Instant::now();
    let fleet = Fleet::start(1000, cfg("k"), mqtt(&broker)).await.unwrap();
    eprintln!("1000 bases up in {:?}", started.elapsed());
    assert!(
        ctl.wait(Duration::from_secs(30), |c| (0..1000)
            .all(|i| !c.on(&format!("k-{i}"), "base/heart").is_empty()))
            .await
    );
    ctl.send(
        "k-999",
        "installBiz",
        &install("biz1", "1", "file:///1.jar"),
    )
    .await;
    ctl.nth("k-999", "base/bizOperation", 1).await;
    fleet.shutdown_graceful().await;
}

#[tokio::test]
async fn subscriptions_survive_a_broker_restart_without_a_second_query_baseline() {
    let mut broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let base = Base::start(cfg("r1"), mqtt(&broker)).await.unwrap();
    ctl.nth("r1", "base/heart", 1).await;
    broker.restart().await;
    let before = ctl.on("r1", "base/heart").len();
    // Heartbeats flow again once the base has reconnected on its own.
    ctl.nth("r1", "base/heart", before + 2).await;
    assert!(base.wait_until(T, |b| b.connections() == 2).await);
    assert!(ctl.wait(T, |c| c.subscriptions() == 2).await);
    ctl.send("r1", "installBiz", &install("biz1", "1", "file:///1.jar"))
        .await;
    let op = ctl.nth("r1", "base/bizOperation", 1).await;
    assert_eq!(op.data()["response"]["code"], "SUCCESS");
    assert_eq!(ctl.on("r1", "base/queryBaseline").len(), 1);
    assert_eq!(base.active_modules().len(), 1);
}

#[tokio::test]
async fn arklet_heartbeat_bug_stops_heartbeats_after_an_outage() {
    let mut broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("r2");
    c.heartbeat_interval = Duration::from_millis(100);
    c.heartbeat_stops_after_publish_failure = true;
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    ctl.nth("r2", "base/heart", 1).await;
    broker.restart().await;
    assert!(base.wait_until(T, |b| b.connections() == 2).await);
    assert!(ctl.wait(T, |c| c.subscriptions() == 2).await);
    // Commands still work after the reconnect...
    ctl.send("r2", "queryAllBiz", &json!({})).await;
    ctl.nth("r2", "base/simpleBiz", 1).await;
    // ...but the heartbeat task died during the outage (a 100 ms period always hits it).
    let beats = base.heartbeats_sent();
    ctl.send("r2", "health", &json!({})).await;
    ctl.nth("r2", "base/health", 1).await;
    // Absence of heartbeats can only be seen by waiting a few periods.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(base.heartbeats_sent(), beats);
}

#[tokio::test]
async fn five_slow_commands_fill_the_worker_pool() {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let mut c = cfg("p1");
    c.install_time = Duration::from_millis(1000);
    let base = Base::start(c, mqtt(&broker)).await.unwrap();
    // Four slow installs leave a worker free: the query is answered at once.
    for i in 0..4 {
        ctl.send(
            "p1",
            "installBiz",
            &install(&format!("m{i}"), "1", "file:///m.jar"),
        )
        .await;
    }
    assert!(base.wait_until(T, |b| b.modules().len() == 4).await);
    ctl.send("p1", "queryAllBiz", &json!({})).await;
    ctl.nth("p1", "base/simpleBiz", 1).await;
    assert!(ctl.on("p1", "base/bizOperation").is_empty());
    for i in 1..=4 {
        ctl.nth("p1", "base/bizOperation", i).await;
    }
    // Five fill all workers: the query waits for the first of them to finish.
    for i in 4..9 {
        ctl.send(
            "p1",
            "installBiz",
            &install(&format!("m{i}"), "1", "file:///m.jar"),
        )
        .await;
    }
    assert!(base.wait_until(T, |b| b.modules().len() == 9).await);
    ctl.send("p1", "queryAllBiz", &json!({})).await;
    ctl.nth("p1", "base/simpleBiz", 2).await;
    assert!(ctl.on("p1", "base/bizOperation").len() >= 5);
}
