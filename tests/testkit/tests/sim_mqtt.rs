//! The simulated base over a real mosquitto broker, observed by a plain rumqttc client
//! playing the controller. Assertions are on raw JSON, so field names are checked too.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use module_controller::model::{BaseCommand, BizState, ModuleKey};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};
use testkit::localenv::broker::Mosquitto;
use testkit::sim::{SimBase, SimBaseConfig, SimFleet, SimTransport};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_millis(300);

/// One message a base published.
#[derive(Debug, Clone)]
struct Seen {
    topic: String,
    json: Value,
    at: Instant,
}

/// A minimal "controller": sees everything bases publish, sends commands at QoS 1.
struct Controller {
    client: AsyncClient,
    env: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Index of the first message `expect` has not consumed yet, per topic suffix.
    cursors: Mutex<std::collections::HashMap<String, usize>>,
    task: JoinHandle<()>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Controller {
    async fn connect(broker: &Mosquitto, env: &str) -> Controller {
        let id = format!("test-controller-{}", uuid::Uuid::new_v4());
        let mut opts = MqttOptions::new(id, broker.host(), broker.port());
        opts.set_clean_session(true)
            .set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut event_loop) = AsyncClient::new(opts, 100);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let filter = format!("koupleless_{env}/+/base/#");
        let task = {
            let client = client.clone();
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                loop {
                    match event_loop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            // Clean session: subscribe again after every reconnect.
                            let c = client.clone();
                            let f = filter.clone();
                            tokio::spawn(async move {
                                c.subscribe(f, QoS::AtLeastOnce).await.expect("subscribe");
                            });
                        }
                        Ok(Event::Incoming(Packet::SubAck(_))) => {
                            if let Some(tx) = ready.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::Publish(p))) => {
                            let json: Value =
                                serde_json::from_slice(&p.payload).unwrap_or_else(|e| {
                                    panic!("base sent invalid JSON on {}: {e}", p.topic)
                                });
                            seen.lock().expect("seen lock").push(Seen {
                                topic: p.topic.clone(),
                                json,
                                at: Instant::now(),
                            });
                        }
                        Ok(_) => {}
                        Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            })
        };
        tokio::time::timeout(WAIT, ready_rx)
            .await
            .expect("controller subscribed in time")
            .expect("controller task alive");
        Controller {
            client,
            env: env.to_string(),
            seen,
            cursors: Mutex::new(Default::default()),
            task,
        }
    }

    fn topic(&self, id: &str, suffix: &str) -> String {
        format!("koupleless_{}/{id}/{suffix}", self.env)
    }

    async fn send(&self, id: &str, command: &str, body: Value) {
        self.send_raw(id, command, body.to_string().into_bytes())
            .await;
    }

    async fn send_raw(&self, id: &str, command: &str, body: Vec<u8>) {
        self.client
            .publish(self.topic(id, command), QoS::AtLeastOnce, false, body)
            .await
            .expect("publish command");
    }

    /// All messages so far from base `id` on `base/<suffix>`.
    fn all(&self, id: &str, suffix: &str) -> Vec<Seen> {
        let topic = self.topic(id, &format!("base/{suffix}"));
        self.seen
            .lock()
            .expect("seen lock")
            .iter()
            .filter(|s| s.topic == topic)
            .cloned()
            .collect()
    }

    /// The next not-yet-consumed message from base `id` on `base/<suffix>`.
    async fn expect(&self, id: &str, suffix: &str) -> Value {
        let key = format!("{id}/{suffix}");
        let deadline = Instant::now() + WAIT;
        loop {
            let cursor = *self
                .cursors
                .lock()
                .expect("cursor lock")
                .get(&key)
                .unwrap_or(&0);
            let all = self.all(id, suffix);
            if let Some(m) = all.get(cursor) {
                self.cursors
                    .lock()
                    .expect("cursor lock")
                    .insert(key, cursor + 1);
                return m.json.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no base/{suffix} from {id} within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Skips what arrived so far on `base/<suffix>`.
    fn skip_all(&self, id: &str, suffix: &str) {
        let n = self.all(id, suffix).len();
        self.cursors
            .lock()
            .expect("cursor lock")
            .insert(format!("{id}/{suffix}"), n);
    }
}

fn config(id: &str) -> SimBaseConfig {
    let mut cfg = SimBaseConfig::new(id);
    cfg.heartbeat_interval = HEARTBEAT;
    cfg.local_ip = "10.1.2.3".into();
    cfg.host_name = format!("host-{id}");
    cfg.cluster_name = "c1".into();
    cfg
}

fn mqtt(broker: &Mosquitto) -> SimTransport {
    SimTransport::Mqtt {
        host: broker.host().to_string(),
        port: broker.port(),
    }
}

/// Envelope check: `{"publishTimestamp": <recent ms>, "data": ...}`, returns `data`.
fn unwrap_envelope(v: &Value) -> Value {
    let obj = v.as_object().expect("envelope is an object");
    assert_eq!(
        obj.keys().map(String::as_str).collect::<Vec<_>>().len(),
        2,
        "envelope has exactly publishTimestamp and data: {v}"
    );
    let ts = obj["publishTimestamp"]
        .as_i64()
        .expect("publishTimestamp is a number");
    let now = chrono::Utc::now().timestamp_millis();
    assert!(
        (now - ts).abs() < 10_000,
        "publishTimestamp {ts} is recent (now {now})"
    );
    obj["data"].clone()
}

fn install_body(name: &str, version: &str) -> Value {
    json!({"bizName": name, "bizVersion": version, "bizUrl": format!("file:///tmp/{name}-{version}.jar")})
}

async fn setup(id: &str) -> (Mosquitto, Controller, SimBase) {
    setup_with(config(id)).await
}

async fn setup_with(cfg: SimBaseConfig) -> (Mosquitto, Controller, SimBase) {
    let id = cfg.identity.clone();
    let id = id.as_str();
    let broker = Mosquitto::start().await.expect("mosquitto starts");
    let ctl = Controller::connect(&broker, "dev").await;
    let base = SimBase::start(cfg, mqtt(&broker))
        .await
        .expect("sim base starts");
    // Once queryBaseline arrived the base is subscribed (it subscribes first).
    let _ = ctl.expect(id, "queryBaseline").await;
    (broker, ctl, base)
}

#[tokio::test]
async fn announces_itself_and_heartbeats_with_exact_fields() {
    let broker = Mosquitto::start().await.expect("mosquitto starts");
    let ctl = Controller::connect(&broker, "dev").await;
    let base = SimBase::start(config("10.1.2.3"), mqtt(&broker))
        .await
        .expect("sim base starts");

    let qb = unwrap_envelope(&ctl.expect("10.1.2.3", "queryBaseline").await);
    assert_eq!(
        qb,
        json!({"identity":"10.1.2.3","version":"1.0.0","clusterName":"c1","name":"base"})
    );
    let hb = unwrap_envelope(&ctl.expect("10.1.2.3", "heart").await);
    assert_eq!(
        hb,
        json!({
            "baseMetadata": {"identity":"10.1.2.3","version":"1.0.0","clusterName":"c1","name":"base"},
            "localIP": "10.1.2.3",
            "localHostName": "host-10.1.2.3",
            "state": "ACTIVATED"
        })
    );
    // Periodic: after the beat on connect, beats follow at the configured interval.
    for _ in 0..4 {
        let _ = ctl.expect("10.1.2.3", "heart").await;
    }
    let beats = ctl.all("10.1.2.3", "heart");
    let span = beats[4].at - beats[1].at;
    assert!(
        span >= HEARTBEAT * 5 / 2 && span < HEARTBEAT * 10,
        "3 intervals took {span:?}"
    );
    // queryBaseline is sent once, and a real base never sends its module list unasked.
    assert_eq!(ctl.all("10.1.2.3", "queryBaseline").len(), 1);
    assert!(ctl.all("10.1.2.3", "simpleBiz").is_empty());
    assert!(ctl.all("10.1.2.3", "biz").is_empty());

    drop(base);
    // mosquitto block-buffers its log when it is a file; stopping it flushes the buffer.
    let mut broker = broker;
    broker.stop();
    let log = std::fs::read_to_string(broker.log_path()).expect("broker log");
    assert!(
        log.contains("as koupleless@@@10.1.2.3"),
        "client id is <prefix>@@@<identity>; broker log:\n{log}"
    );
}

#[tokio::test]
async fn install_query_health_uninstall_replies_have_the_arklet_shape() {
    let (_broker, ctl, base) = setup("b1").await;

    ctl.send("b1", "installBiz", install_body("biz1", "0.0.1"))
        .await;
    let op = unwrap_envelope(&ctl.expect("b1", "bizOperation").await);
    assert_eq!(op["command"], "installBiz");
    assert_eq!(op["bizName"], "biz1");
    assert_eq!(op["bizVersion"], "0.0.1");
    assert_eq!(op["response"]["code"], "SUCCESS");
    assert_eq!(op["response"]["data"]["code"], "SUCCESS");
    assert_eq!(op["response"]["data"]["bizInfos"], json!([]));
    assert!(op["response"]["data"]["elapsedSpace"].is_i64());
    assert!(op["response"]["message"].is_string());
    assert_eq!(base.active_modules(), vec![ModuleKey::new("biz1", "0.0.1")]);

    ctl.send("b1", "queryAllBiz", json!({})).await;
    let list = unwrap_envelope(&ctl.expect("b1", "simpleBiz").await);
    let list = list.as_array().expect("simpleBiz is an array");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["name"], "biz1");
    assert_eq!(list[0]["version"], "0.0.1");
    assert_eq!(list[0]["state"], "activated");
    let rec = &list[0]["latestStateRecord"];
    assert!(rec["changeTime"].is_i64(), "changeTime in ms: {rec}");
    assert_eq!(rec["state"], "activated");
    assert!(rec["reason"].is_string() && rec["message"].is_string());

    ctl.send("b1", "health", json!({})).await;
    let health = unwrap_envelope(&ctl.expect("b1", "health").await);
    assert_eq!(health["code"], "SUCCESS");
    let hd = &health["data"]["healthData"];
    let cfg = base.config();
    assert_eq!(hd["jvm"]["java max metaspace"], json!(cfg.max_metaspace));
    assert_eq!(
        hd["jvm"]["java committed metaspace"],
        json!(cfg.committed_metaspace)
    );
    assert_eq!(hd["jvm"]["java used metaspace"], json!(cfg.used_metaspace));
    assert_eq!(hd["cpu"], json!({}));
    assert_eq!(
        hd["masterBizInfo"],
        json!({"bizName":"base","bizState":"ACTIVATED","bizVersion":"1.0.0","webContextPath":"/"})
    );

    ctl.send(
        "b1",
        "uninstallBiz",
        json!({"bizName":"biz1","bizVersion":"0.0.1"}),
    )
    .await;
    let op = unwrap_envelope(&ctl.expect("b1", "bizOperation").await);
    assert_eq!(op["command"], "uninstallBiz");
    assert_eq!(op["response"]["code"], "SUCCESS");
    assert!(base.modules().is_empty());
    // Idempotent: uninstalling what is absent succeeds too.
    ctl.send(
        "b1",
        "uninstallBiz",
        json!({"bizName":"biz1","bizVersion":"0.0.1"}),
    )
    .await;
    let op = unwrap_envelope(&ctl.expect("b1", "bizOperation").await);
    assert_eq!(op["response"]["code"], "SUCCESS");

    let kinds: Vec<&str> = base.commands().iter().map(|c| c.command.kind()).collect();
    assert_eq!(
        kinds,
        vec!["install", "query_all", "health", "uninstall", "uninstall"]
    );
    assert!(base.commands().iter().all(|c| !c.dropped));
}

#[tokio::test]
async fn new_version_deactivates_old_one_and_uninstall_is_exact() {
    let (_broker, ctl, base) = setup("b2").await;
    ctl.send("b2", "installBiz", install_body("biz1", "1"))
        .await;
    ctl.send("b2", "installBiz", install_body("biz1", "2"))
        .await;
    ctl.send("b2", "queryAllBiz", json!({})).await;
    for _ in 0..2 {
        let op = unwrap_envelope(&ctl.expect("b2", "bizOperation").await);
        assert_eq!(op["response"]["code"], "SUCCESS");
    }
    let list = unwrap_envelope(&ctl.expect("b2", "simpleBiz").await);
    let states: Vec<(String, String)> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|m| {
            (
                m["version"].as_str().expect("version").to_string(),
                m["state"].as_str().expect("state").to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        vec![
            ("1".to_string(), "deactivated".to_string()),
            ("2".to_string(), "activated".to_string())
        ]
    );

    ctl.send(
        "b2",
        "uninstallBiz",
        json!({"bizName":"biz1","bizVersion":"1"}),
    )
    .await;
    let _ = ctl.expect("b2", "bizOperation").await;
    assert_eq!(base.active_modules(), vec![ModuleKey::new("biz1", "2")]);
    assert_eq!(base.modules().len(), 1);
    let history: Vec<Vec<ModuleKey>> = base.history().into_iter().map(|h| h.active).collect();
    assert_eq!(
        history,
        vec![
            vec![ModuleKey::new("biz1", "1")],
            vec![ModuleKey::new("biz1", "2")]
        ]
    );
}

#[tokio::test]
async fn scripted_failure_is_reported_failed_and_broken() {
    let (_broker, ctl, base) = setup("b3").await;
    base.fail_installs("bad", "InstallBizFailed", "jar is corrupt");
    ctl.send("b3", "installBiz", install_body("bad", "1")).await;
    let op = unwrap_envelope(&ctl.expect("b3", "bizOperation").await);
    assert_eq!(op["command"], "installBiz");
    assert_eq!(op["response"]["code"], "FAILED");
    assert_eq!(op["response"]["data"]["code"], "InstallBizFailed");
    assert_eq!(op["response"]["data"]["message"], "jar is corrupt");

    ctl.send("b3", "queryAllBiz", json!({})).await;
    let list = unwrap_envelope(&ctl.expect("b3", "simpleBiz").await);
    assert_eq!(list[0]["state"], "broken");
    assert_eq!(list[0]["latestStateRecord"]["reason"], "InstallBizFailed");
    assert_eq!(list[0]["latestStateRecord"]["message"], "jar is corrupt");
    assert!(base.active_modules().is_empty());

    base.clear_failures();
    ctl.send("b3", "installBiz", install_body("bad", "1")).await;
    let op = unwrap_envelope(&ctl.expect("b3", "bizOperation").await);
    assert_eq!(op["response"]["code"], "SUCCESS");
    assert_eq!(base.modules()[0].state, BizState::Activated);
}

#[tokio::test]
async fn baseline_is_batch_installed_and_answered_by_url() {
    let (_broker, ctl, base) = setup("b4").await;
    base.fail_installs("broken-one", "PullBizError", "404");
    let baseline = json!([
        install_body("a", "1"),
        install_body("b", "2"),
        install_body("broken-one", "1")
    ]);
    // The baseline is a bare array, without envelope.
    ctl.send("b4", "base/baseline", baseline).await;
    let resp = unwrap_envelope(&ctl.expect("b4", "batchInstallBizResponse").await);
    assert_eq!(resp["command"], "batchInstallBiz");
    assert_eq!(resp["response"]["code"], "FAILED");
    let by_url = &resp["response"]["data"]["bizUrlToResponse"];
    assert_eq!(by_url["file:///tmp/a-1.jar"]["code"], "SUCCESS");
    assert_eq!(by_url["file:///tmp/a-1.jar"]["bizInfos"], json!([]));
    assert_eq!(by_url["file:///tmp/b-2.jar"]["code"], "SUCCESS");
    assert_eq!(
        by_url["file:///tmp/broken-one-1.jar"]["code"],
        "PullBizError"
    );
    assert!(resp["response"]["data"]["elapsedSpace"].is_i64());
    assert_eq!(
        base.active_modules(),
        vec![ModuleKey::new("a", "1"), ModuleKey::new("b", "2")]
    );
    assert!(matches!(
        base.commands().last().map(|c| &c.command),
        Some(BaseCommand::Baseline(specs)) if specs.len() == 3
    ));
}

#[tokio::test]
async fn malformed_commands_are_counted_and_ignored() {
    let (_broker, ctl, base) = setup("b5").await;
    ctl.send_raw("b5", "installBiz", b"{not json".to_vec())
        .await;
    ctl.send("b5", "installBiz", json!({"bizName":"x"})).await;
    ctl.send_raw("b5", "base/baseline", b"{}".to_vec()).await;
    ctl.send("b5", "health", json!({})).await;
    let health = unwrap_envelope(&ctl.expect("b5", "health").await);
    assert_eq!(health["code"], "SUCCESS");
    assert_eq!(base.malformed_count(), 3);
    assert!(ctl.all("b5", "bizOperation").is_empty());
    assert_eq!(
        base.commands().len(),
        1,
        "only the valid command is recorded"
    );
}

#[tokio::test]
async fn latency_does_not_block_heartbeats_and_commands_keep_their_order() {
    let (_broker, ctl, base) = setup("b6").await;
    base.set_install_latency(Duration::from_millis(1500));
    ctl.skip_all("b6", "heart");
    let sent = Instant::now();
    ctl.send("b6", "installBiz", install_body("slow", "1"))
        .await;
    ctl.send("b6", "queryAllBiz", json!({})).await;
    let op = unwrap_envelope(&ctl.expect("b6", "bizOperation").await);
    assert!(
        sent.elapsed() >= Duration::from_millis(1400),
        "latency applied"
    );
    assert!(op["response"]["data"]["elapsedSpace"].as_i64().expect("ms") >= 1400);
    let beats_during = ctl
        .all("b6", "heart")
        .iter()
        .filter(|s| s.at >= sent)
        .count();
    assert!(
        beats_during >= 3,
        "heartbeats kept flowing during the install: {beats_during}"
    );
    // queryAllBiz was queued behind the install, so it already sees the module.
    let list = unwrap_envelope(&ctl.expect("b6", "simpleBiz").await);
    assert_eq!(list[0]["name"], "slow");
    assert_eq!(list[0]["state"], "activated");
}

#[tokio::test]
async fn silent_base_neither_beats_nor_answers_until_resumed() {
    // A long interval, so the beat right after resume cannot be a periodic one.
    let slow = Duration::from_secs(3);
    let mut cfg = config("b7");
    cfg.heartbeat_interval = slow;
    let (_broker, ctl, base) = setup_with(cfg).await;
    let _ = ctl.expect("b7", "heart").await;
    base.go_silent();
    // A beat may have been in flight; let it land before counting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = ctl.all("b7", "heart").len();
    ctl.send("b7", "installBiz", install_body("biz1", "1"))
        .await;
    ctl.send("b7", "health", json!({})).await;
    tokio::time::sleep(slow + Duration::from_millis(500)).await;
    assert_eq!(
        ctl.all("b7", "heart").len(),
        before,
        "no heartbeats while silent"
    );
    assert!(ctl.all("b7", "bizOperation").is_empty());
    assert!(ctl.all("b7", "health").is_empty());
    assert!(
        base.modules().is_empty(),
        "dropped commands are not executed"
    );
    let cmds = base.commands();
    assert_eq!(cmds.len(), 2);
    assert!(cmds.iter().all(|c| c.dropped));

    let resumed = Instant::now();
    base.resume();
    ctl.skip_all("b7", "heart");
    let _ = ctl.expect("b7", "heart").await;
    assert!(
        resumed.elapsed() < slow / 2,
        "a heartbeat goes out at once on resume ({:?})",
        resumed.elapsed()
    );
    ctl.send("b7", "installBiz", install_body("biz1", "1"))
        .await;
    let op = unwrap_envelope(&ctl.expect("b7", "bizOperation").await);
    assert_eq!(op["response"]["code"], "SUCCESS");
}

#[tokio::test]
async fn graceful_shutdown_says_deactivated_and_stop_says_nothing() {
    let (broker, ctl, base) = setup("b8").await;
    let _ = ctl.expect("b8", "heart").await;
    base.shutdown_graceful().await;
    let deadline = Instant::now() + WAIT;
    let last = loop {
        let beats = ctl.all("b8", "heart");
        let last = unwrap_envelope(&beats.last().expect("beats").json);
        if last["state"] == "DEACTIVATED" || Instant::now() > deadline {
            break last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(last["state"], "DEACTIVATED");
    assert_eq!(last["baseMetadata"]["identity"], "b8");
    let count = ctl.all("b8", "heart").len();
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(ctl.all("b8", "heart").len(), count, "silent after goodbye");

    // An abrupt stop sends no goodbye.
    let other = SimBase::start(config("b9"), mqtt(&broker))
        .await
        .expect("second base starts");
    let _ = ctl.expect("b9", "heart").await;
    other.stop().await;
    tokio::time::sleep(HEARTBEAT * 3).await;
    let beats = ctl.all("b9", "heart");
    assert!(
        beats
            .iter()
            .all(|b| unwrap_envelope(&b.json)["state"] == "ACTIVATED"),
        "no DEACTIVATED beat on abrupt stop"
    );
    let n = beats.len();
    tokio::time::sleep(HEARTBEAT * 2).await;
    assert_eq!(ctl.all("b9", "heart").len(), n, "no beats after stop");
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_base() {
    let (_broker, ctl, base) = setup("b10").await;
    let _ = ctl.expect("b10", "heart").await;
    let clone = base.clone();
    drop(base);
    tokio::time::sleep(HEARTBEAT * 2).await;
    assert!(
        ctl.all("b10", "heart").len() >= 2,
        "a clone keeps the base alive"
    );
    drop(clone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let n = ctl.all("b10", "heart").len();
    tokio::time::sleep(HEARTBEAT * 4).await;
    assert_eq!(
        ctl.all("b10", "heart").len(),
        n,
        "no beats after the last handle is gone"
    );
}

#[tokio::test]
async fn reconnects_after_broker_restart_and_keeps_serving() {
    let (mut broker, ctl, base) = setup("b11").await;
    ctl.send("b11", "installBiz", install_body("biz1", "1"))
        .await;
    let _ = ctl.expect("b11", "bizOperation").await;

    broker.restart().await.expect("broker restarts");
    let restarted = Instant::now();
    ctl.skip_all("b11", "heart");
    let hb = unwrap_envelope(&ctl.expect("b11", "heart").await);
    assert_eq!(hb["state"], "ACTIVATED");
    assert!(restarted.elapsed() < WAIT);
    // Subscriptions were restored: commands reach the base again.
    ctl.send("b11", "queryAllBiz", json!({})).await;
    let list = unwrap_envelope(&ctl.expect("b11", "simpleBiz").await);
    assert_eq!(list[0]["name"], "biz1", "modules survive a broker restart");
    assert_eq!(base.active_modules(), vec![ModuleKey::new("biz1", "1")]);
    // A reconnect is not a restart: no second queryBaseline.
    assert_eq!(ctl.all("b11", "queryBaseline").len(), 1);
}

#[tokio::test]
async fn restart_forgets_modules_and_asks_for_the_baseline_again() {
    let (_broker, ctl, base) = setup("b12").await;
    ctl.send("b12", "installBiz", install_body("biz1", "1"))
        .await;
    let _ = ctl.expect("b12", "bizOperation").await;

    base.restart(true).await.expect("restart keeping modules");
    let _ = ctl.expect("b12", "queryBaseline").await;
    assert_eq!(base.active_modules(), vec![ModuleKey::new("biz1", "1")]);

    base.restart(false).await.expect("JVM restart");
    let qb = unwrap_envelope(&ctl.expect("b12", "queryBaseline").await);
    assert_eq!(qb["identity"], "b12");
    assert!(base.modules().is_empty());
    assert_eq!(base.history().last().map(|h| h.active.len()), Some(0));
    ctl.send("b12", "installBiz", install_body("biz1", "1"))
        .await;
    let op = unwrap_envelope(&ctl.expect("b12", "bizOperation").await);
    assert_eq!(op["response"]["code"], "SUCCESS");
}

#[tokio::test]
async fn a_fleet_runs_many_bases_with_indexed_identities() {
    let broker = Mosquitto::start().await.expect("mosquitto starts");
    let ctl = Controller::connect(&broker, "dev").await;
    let fleet = SimFleet::start(20, config("f"), mqtt(&broker))
        .await
        .expect("fleet starts");
    assert_eq!(fleet.bases().len(), 20);
    for (i, base) in fleet.bases().iter().enumerate() {
        let id = format!("f-{i}");
        assert_eq!(base.identity(), id);
        let hb = unwrap_envelope(&ctl.expect(&id, "heart").await);
        assert_eq!(hb["baseMetadata"]["identity"], id.as_str());
        assert_eq!(
            hb["localHostName"], "host-f",
            "an explicit host name is kept"
        );
    }
    ctl.send("f-7", "installBiz", install_body("biz1", "1"))
        .await;
    let _ = ctl.expect("f-7", "bizOperation").await;
    assert_eq!(fleet.bases()[7].active_modules().len(), 1);
    assert!(
        fleet.bases()[6].modules().is_empty(),
        "commands reach one base only"
    );
    fleet.stop_all().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let n = ctl.all("f-3", "heart").len();
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(ctl.all("f-3", "heart").len(), n, "stopped bases are quiet");
}

/// Kills the child on drop, so a failing test leaves no process behind.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_binary_serves_bases_and_says_goodbye_on_sigterm() {
    let broker = Mosquitto::start().await.expect("mosquitto starts");
    let ctl = Controller::connect(&broker, "dev").await;
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_base-sim"))
        .args(["--mqtt-host", broker.host()])
        .args(["--mqtt-port", &broker.port().to_string()])
        .args([
            "--count",
            "2",
            "--id-prefix",
            "bin",
            "--heartbeat-secs",
            "1",
        ])
        .args(["--cluster", "c9", "--fail-module", "bad"])
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("base-sim spawns");
    let mut child = ChildGuard(child);

    let qb = unwrap_envelope(&ctl.expect("bin-1", "queryBaseline").await);
    assert_eq!(qb["clusterName"], "c9");
    let _ = ctl.expect("bin-0", "heart").await;
    ctl.send("bin-1", "installBiz", install_body("bad", "1"))
        .await;
    let op = unwrap_envelope(&ctl.expect("bin-1", "bizOperation").await);
    assert_eq!(op["response"]["code"], "FAILED");
    assert_eq!(op["response"]["data"]["code"], "InstallBizFailed");

    let pid = i32::try_from(child.0.id()).expect("pid fits");
    // SAFETY: plain kill(2) on the child we spawned and still own.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "base-sim exits after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "clean exit: {status}");
    for id in ["bin-0", "bin-1"] {
        let beats = ctl.all(id, "heart");
        let last = unwrap_envelope(&beats.last().expect("beats").json);
        assert_eq!(last["state"], "DEACTIVATED", "{id} said goodbye");
    }
}
