//! The double's own messages, captured off the wire, against the golden fixtures in
//! `tests/fixtures/`: same key paths, same value types (int/float/string/... per path).

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arklet_double::{Base, BaseConfig, HttpEnumStyle, StateRecordsField, Transport};
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use common::{Ctl, Mosquitto, assert_same_shape, fixture};
use serde_json::{Value, json};

const URL1: &str = "http://repo.example.com/biz1-0.0.1-ark-biz.jar";
const URL3: &str = "http://repo.example.com/biz3-1.0.0-ark-biz.jar";
const ROOT: &str =
    "org.springframework.boot.web.server.PortInUseException: Port 8080 is already in use";

struct Checked(BTreeSet<String>);

impl Checked {
    fn check(&mut self, file: &str, ours: &Value) {
        assert_same_shape(file, &fixture(file), ours);
        self.0.insert(file.to_string());
    }
}

fn install(name: &str, version: &str, url: &str) -> Value {
    json!({"bizName": name, "bizVersion": version, "bizUrl": url})
}

async fn mqtt_kinds(checked: &mut Checked) {
    let broker = Mosquitto::start().await;
    let ctl = Ctl::connect(broker.port, "dev").await;
    let transport = Transport::Mqtt {
        host: "127.0.0.1".into(),
        port: broker.port,
    };
    let id = "192.168.1.10";
    let mut cfg = BaseConfig::new(id);
    cfg.heartbeat_interval = Duration::from_secs(60);
    let base = Base::start(cfg, transport.clone()).await.unwrap();
    let raw = |m: common::Msg| m.json.expect("json");

    checked.check(
        "mqtt/query-baseline.json",
        &raw(ctl.nth(id, "base/queryBaseline", 1).await),
    );
    checked.check("mqtt/heart.json", &raw(ctl.nth(id, "base/heart", 1).await));

    // Baseline: biz1 starts, biz3 fails to start.
    base.fail_installs("biz3", "FAILED", ROOT);
    ctl.send(
        id,
        "base/baseline",
        &json!([
            {"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": URL1},
            {"bizName": "biz3", "bizVersion": "1.0.0", "bizUrl": URL3}
        ]),
    )
    .await;
    checked.check(
        "mqtt/batch-install-response.json",
        &raw(ctl.nth(id, "base/batchInstallBizResponse", 1).await),
    );

    let mut op = 0;
    let mut next_op = async |ctl: &Ctl| {
        op += 1;
        raw(ctl.nth(id, "base/bizOperation", op).await)
    };
    ctl.send(id, "installBiz", &install("biz1", "0.0.2", URL1))
        .await;
    checked.check(
        "mqtt/biz-operation-install-success.json",
        &next_op(&ctl).await,
    );
    ctl.send(id, "installBiz", &install("biz3", "2.0.0", URL3))
        .await;
    checked.check(
        "mqtt/biz-operation-install-failure.json",
        &next_op(&ctl).await,
    );
    ctl.send(id, "installBiz", &install("biz1", "0.0.2", URL1))
        .await;
    checked.check(
        "mqtt/biz-operation-install-repeat-biz.json",
        &next_op(&ctl).await,
    );
    base.set_install_time(Duration::from_millis(800));
    let slow = install("biz2", "1.0.0", "file:///biz2.jar");
    ctl.send(id, "installBiz", &slow).await;
    ctl.send(id, "installBiz", &slow).await;
    checked.check(
        "mqtt/biz-operation-install-conflict.json",
        &next_op(&ctl).await,
    );

    // While biz2 still starts: resolved, activated, deactivated and broken modules.
    ctl.send(id, "queryAllBiz", &json!({})).await;
    checked.check(
        "mqtt/simple-biz.json",
        &raw(ctl.nth(id, "base/simpleBiz", 1).await),
    );
    ctl.send(id, "health", &json!({})).await;
    checked.check(
        "mqtt/health.json",
        &raw(ctl.nth(id, "base/health", 1).await),
    );
    next_op(&ctl).await; // biz2 done

    ctl.send(
        id,
        "uninstallBiz",
        &json!({"bizName": "biz2", "bizVersion": "1.0.0"}),
    )
    .await;
    checked.check(
        "mqtt/biz-operation-uninstall-success.json",
        &next_op(&ctl).await,
    );
    ctl.send(
        id,
        "uninstallBiz",
        &json!({"bizName": "biz9", "bizVersion": "9.9.9"}),
    )
    .await;
    checked.check(
        "mqtt/biz-operation-uninstall-not-found.json",
        &next_op(&ctl).await,
    );

    base.shutdown_graceful().await;
    checked.check(
        "mqtt/heart-deactivated.json",
        &raw(ctl.nth(id, "base/heart", 2).await),
    );

    let mut legacy = BaseConfig::new("legacy");
    legacy.legacy_biz_topic = true;
    let old = Base::start(legacy, transport).await.unwrap();
    ctl.send("legacy", "installBiz", &install("biz1", "0.0.1", URL1))
        .await;
    ctl.nth("legacy", "base/bizOperation", 1).await;
    ctl.send("legacy", "queryAllBiz", &json!({})).await;
    checked.check(
        "mqtt/biz-legacy.json",
        &raw(ctl.nth("legacy", "base/biz", 1).await),
    );
    old.stop().await;
}

#[derive(Clone, Default)]
struct Seen {
    heartbeats: Arc<Mutex<Vec<Value>>>,
    queries: Arc<Mutex<Vec<Value>>>,
}

async fn stub() -> (String, Seen) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Seen::default();
    async fn heartbeat(State(s): State<Seen>, Json(v): Json<Value>) -> &'static str {
        s.heartbeats.lock().unwrap().push(v);
        "SUCCESS"
    }
    async fn query(State(s): State<Seen>, Json(v): Json<Value>) -> Json<Value> {
        s.queries.lock().unwrap().push(v);
        Json(json!([]))
    }
    let app = axum::Router::new()
        .route("/heartbeat", post(heartbeat))
        .route("/queryBaseline", post(query))
        .with_state(seen.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, seen)
}

async fn call(base: &Base, cmd: &str, body: &Value) -> Value {
    let url = format!("http://127.0.0.1:{}/{cmd}", base.http_port().unwrap());
    let text = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    serde_json::from_str(&text).unwrap()
}

async fn http_kinds(checked: &mut Checked) {
    let (url, seen) = stub().await;
    let transport = Transport::Http {
        controller_url: url,
        listen_port: 0,
    };
    let mut cfg = BaseConfig::new("192.168.1.10");
    cfg.heartbeat_interval = Duration::from_secs(60);
    let base = Base::start(cfg, transport.clone()).await.unwrap();
    assert!(
        base.wait_until(Duration::from_secs(10), |b| b.heartbeats_sent() >= 1
            && b.commands()
                .iter()
                .any(|c| matches!(c.command, arklet_double::Command::Baseline(_))))
            .await
    );
    let hb = seen.heartbeats.lock().unwrap()[0].clone();
    checked.check("http/heartbeat.json", &hb);
    let q = seen.queries.lock().unwrap()[0].clone();
    checked.check("http/query-baseline.json", &q);

    let ok = call(&base, "installBiz", &install("biz1", "0.0.1", URL1)).await;
    checked.check("http/install-success.json", &ok);
    let repeat = call(&base, "installBiz", &install("biz1", "0.0.1", URL1)).await;
    checked.check("http/install-repeat-biz.json", &repeat);
    base.fail_installs("biz3", "FAILED", ROOT);
    let failed = call(&base, "installBiz", &install("biz3", "1.0.0", URL3)).await;
    checked.check("http/install-failure.json", &failed);

    base.set_install_time(Duration::from_millis(800));
    let b = base.clone();
    let first =
        tokio::spawn(async move { call(&b, "installBiz", &install("biz1", "0.0.2", URL1)).await });
    assert!(
        base.wait_until(Duration::from_secs(10), |b| b.modules().len() == 3)
            .await
    );
    let conflict = call(&base, "installBiz", &install("biz1", "0.0.2", URL1)).await;
    checked.check("http/install-conflict.json", &conflict);
    first.await.unwrap();

    let all = call(&base, "queryAllBiz", &json!({})).await;
    checked.check("http/query-all-biz-state-records.json", &all);
    let health = call(&base, "health", &json!({})).await;
    checked.check("http/health.json", &health);
    let un = call(
        &base,
        "uninstallBiz",
        &json!({"bizName": "biz1", "bizVersion": "0.0.1"}),
    )
    .await;
    checked.check("http/uninstall-success.json", &un);
    let nf = call(
        &base,
        "uninstallBiz",
        &json!({"bizName": "biz9", "bizVersion": "9.9.9"}),
    )
    .await;
    checked.check("http/uninstall-not-found.json", &nf);
    base.stop().await;

    let mut old = BaseConfig::new("old");
    old.http_state_records_field = StateRecordsField::BizStateChangeLogs;
    old.http_enum_style = HttpEnumStyle::Name;
    old.http_base_identity = false;
    old.http_query_baseline = false;
    let old = Base::start(old, transport).await.unwrap();
    call(&old, "installBiz", &install("biz1", "0.0.1", URL1)).await;
    let all = call(&old, "queryAllBiz", &json!({})).await;
    checked.check("http/query-all-biz-change-logs.json", &all);
    old.stop().await;
}

#[tokio::test]
async fn the_double_sends_every_fixture_shape() {
    let mut checked = Checked(BTreeSet::new());
    mqtt_kinds(&mut checked).await;
    http_kinds(&mut checked).await;
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let mut files = BTreeSet::new();
    for sub in ["mqtt", "http"] {
        for e in std::fs::read_dir(dir.join(sub)).unwrap() {
            let name = e.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".json") {
                files.insert(format!("{sub}/{name}"));
            }
        }
    }
    assert_eq!(checked.0, files, "every fixture is checked");
}

#[test]
fn shape_comparison_can_fail() {
    let a = json!({"code": "SUCCESS", "data": {"changeTime": 1}});
    let b = json!({"code": "SUCCESS", "data": {"changeTime": "1"}});
    assert_ne!(common::shape(&a), common::shape(&b));
    let c = json!({"code": "SUCCESS", "data": {"changeTime": 1, "extra": true}});
    assert_ne!(common::shape(&a), common::shape(&c));
}
