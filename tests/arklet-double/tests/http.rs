//! The double over HTTP: a tiny axum controller stub receives heartbeats and answers
//! `/queryBaseline`; the test calls the base's Arklet API with reqwest.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arklet_double::{
    Base, BaseConfig, BizId, BizState, HttpEnumStyle, StateRecordsField, Transport,
};
use axum::Json;
use axum::extract::State;
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::watch;

const T: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Stub {
    url: String,
    heartbeats: Arc<Mutex<Vec<Value>>>,
    queries: Arc<Mutex<Vec<Value>>>,
    baseline: Arc<Mutex<Value>>,
    changed: watch::Sender<u64>,
}

impl Stub {
    async fn start(baseline: Value) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stub = Stub {
            url: format!("http://{}", listener.local_addr().unwrap()),
            heartbeats: Arc::default(),
            queries: Arc::default(),
            baseline: Arc::new(Mutex::new(baseline)),
            changed: watch::Sender::new(0),
        };
        async fn heartbeat(State(s): State<Stub>, Json(v): Json<Value>) -> &'static str {
            s.heartbeats.lock().unwrap().push(v);
            s.changed.send_modify(|n| *n += 1);
            "SUCCESS"
        }
        async fn query(State(s): State<Stub>, Json(v): Json<Value>) -> Json<Value> {
            s.queries.lock().unwrap().push(v);
            s.changed.send_modify(|n| *n += 1);
            Json(s.baseline.lock().unwrap().clone())
        }
        let app = axum::Router::new()
            .route("/heartbeat", post(heartbeat))
            .route("/queryBaseline", post(query))
            .with_state(stub.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        stub
    }

    fn heartbeats(&self) -> Vec<Value> {
        self.heartbeats.lock().unwrap().clone()
    }

    async fn wait(&self, pred: impl Fn(&Stub) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if pred(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => return pred(self),
            }
        }
    }
}

fn cfg(id: &str) -> BaseConfig {
    let mut c = BaseConfig::new(id);
    c.heartbeat_interval = Duration::from_millis(200);
    c
}

fn http(stub: &Stub) -> Transport {
    Transport::Http {
        controller_url: stub.url.clone(),
        listen_port: 0,
    }
}

/// POSTs a command to the base; returns status, headers and body text.
async fn call(base: &Base, cmd: &str, body: &Value) -> (u16, reqwest::header::HeaderMap, String) {
    let url = format!("http://127.0.0.1:{}/{cmd}", base.http_port().unwrap());
    let resp = reqwest::Client::new()
        .post(url)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

async fn call_json(base: &Base, cmd: &str, body: &Value) -> Value {
    let (status, _, text) = call(base, cmd, body).await;
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn install(name: &str, version: &str, url: &str) -> Value {
    json!({"bizName": name, "bizVersion": version, "bizUrl": url})
}

#[tokio::test]
async fn heartbeats_and_baseline_from_the_controller() {
    let stub = Stub::start(json!([
        {"bizName": "biz1", "bizVersion": "0.0.1", "bizUrl": "file:///biz1.jar"}
    ]))
    .await;
    let base = Base::start(cfg("h1"), http(&stub)).await.unwrap();
    assert!(stub.wait(|s| s.heartbeats().len() >= 2).await);
    let hb = &stub.heartbeats()[0];
    assert_eq!(hb["state"], "activated");
    assert_eq!(hb["port"], base.http_port().unwrap());
    assert_eq!(hb["baseMetadata"]["identity"], "h1");
    assert!(
        hb.get("publishTimestamp").is_none(),
        "no envelope over HTTP"
    );
    assert!(stub.wait(|s| s.queries.lock().unwrap().len() == 1).await);
    assert_eq!(stub.queries.lock().unwrap()[0]["identity"], "h1");
    assert!(
        base.wait_until(T, |b| b.active_modules()
            == vec![BizId::new("biz1", "0.0.1")])
            .await
    );
}

#[tokio::test]
async fn arklet_api_answers_like_arklet() {
    let stub = Stub::start(json!([])).await;
    let base = Base::start(cfg("h2"), http(&stub)).await.unwrap();
    let (status, headers, text) =
        call(&base, "installBiz", &install("biz1", "1", "file:///a.jar")).await;
    assert_eq!(status, 200);
    assert!(
        headers.get("content-type").is_none(),
        "Arklet sets no Content-Type"
    );
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["code"], "SUCCESS");
    assert_eq!(v["baseIdentity"], "h2");
    assert_eq!(v["data"]["code"], "SUCCESS");
    assert_eq!(v["data"]["bizInfos"][0]["bizState"], "activated");

    let repeat = call_json(&base, "installBiz", &install("biz1", "1", "file:///a.jar")).await;
    assert_eq!(repeat["code"], "FAILED");
    assert_eq!(repeat["data"]["code"], "REPEAT_BIZ");

    let all = call_json(&base, "queryAllBiz", &json!({})).await;
    let biz = &all["data"][0];
    assert_eq!(biz["bizName"], "biz1");
    assert_eq!(biz["bizState"], "activated");
    assert!(biz["classLoader"].is_object());
    assert_eq!(biz["bizStateRecords"][1]["reason"], "Started");
    assert!(biz.get("bizStateChangeLogs").is_none());

    let health = call_json(&base, "health", &json!({})).await;
    assert_eq!(
        health["data"]["healthData"]["jvm"]["java committed metaspace"],
        128i64 << 20
    );

    let nf = call_json(
        &base,
        "uninstallBiz",
        &json!({"bizName": "x", "bizVersion": "1"}),
    )
    .await;
    assert_eq!(nf["data"]["code"], "NOT_FOUND_BIZ");
    let ok = call_json(
        &base,
        "uninstallBiz",
        &json!({"bizName": "biz1", "bizVersion": "1"}),
    )
    .await;
    assert_eq!(ok["code"], "SUCCESS");
    assert!(base.modules().is_empty());

    let unknown = call_json(&base, "rebootPlease", &json!({})).await;
    assert_eq!(unknown["code"], "CMD_NOT_FOUND");
    let get = reqwest::get(format!(
        "http://127.0.0.1:{}/health",
        base.http_port().unwrap()
    ))
    .await
    .unwrap();
    assert_eq!(get.status().as_u16(), 500);
    let bad = reqwest::Client::new()
        .post(format!(
            "http://127.0.0.1:{}/installBiz",
            base.http_port().unwrap()
        ))
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 500);
    assert_eq!(base.malformed_count(), 1);
    let codes: Vec<_> = base.replies().iter().map(|r| r.data_code.clone()).collect();
    assert_eq!(
        codes,
        vec![
            Some("SUCCESS".into()),
            Some("REPEAT_BIZ".into()),
            None,
            None,
            Some("NOT_FOUND_BIZ".into()),
            Some("SUCCESS".into())
        ]
    );
}

#[tokio::test]
async fn a_slow_install_is_resolved_and_a_concurrent_one_conflicts() {
    let stub = Stub::start(json!([])).await;
    let mut c = cfg("h3");
    c.install_time = Duration::from_millis(1500);
    let base = Base::start(c, http(&stub)).await.unwrap();
    let b = base.clone();
    let first = tokio::spawn(async move {
        call_json(&b, "installBiz", &install("biz1", "1", "file:///a.jar")).await
    });
    assert!(base.wait_until(T, |b| !b.modules().is_empty()).await);
    let all = call_json(&base, "queryAllBiz", &json!({})).await;
    assert_eq!(all["data"][0]["bizState"], "resolved");
    let second = call_json(&base, "installBiz", &install("biz1", "1", "file:///a.jar")).await;
    assert_eq!(
        second,
        json!({
            "code": "FAILED",
            "message": "FAILED:biz1:1 installBiz conflict, exist unfinished command(installBiz) for this biz",
            "baseIdentity": "h3"
        })
    );
    assert!(!first.is_finished(), "the conflict was answered at once");
    let first = first.await.unwrap();
    assert_eq!(first["code"], "SUCCESS");
    assert_eq!(base.modules()[0].state, BizState::Activated);
}

#[tokio::test]
async fn a_failed_start_is_an_internal_error_with_the_stack() {
    let stub = Stub::start(json!([])).await;
    let base = Base::start(cfg("h4"), http(&stub)).await.unwrap();
    base.fail_installs("bad", "FAILED", "java.lang.IllegalStateException: no db");
    let v = call_json(&base, "installBiz", &install("bad", "1", "file:///bad.jar")).await;
    assert_eq!(v["code"], "CMD_PROCESS_INTERNAL_ERROR");
    assert_eq!(
        v["message"],
        "Internal Error: java.lang.reflect.InvocationTargetException"
    );
    assert!(
        v["errorStackTrace"]
            .as_str()
            .unwrap()
            .contains("Caused by: java.lang.IllegalStateException: no db")
    );
    assert!(v.get("baseIdentity").is_none());
    let all = call_json(&base, "queryAllBiz", &json!({})).await;
    assert_eq!(all["data"][0]["bizState"], "broken");
    assert_eq!(
        all["data"][0]["bizStateRecords"][1]["reason"],
        "Install Failed"
    );
}

#[tokio::test]
async fn silent_requests_hang_until_resume_then_503() {
    let stub = Stub::start(json!([])).await;
    let base = Base::start(cfg("h5"), http(&stub)).await.unwrap();
    assert!(stub.wait(|s| !s.heartbeats().is_empty()).await);
    base.go_silent();
    let b = base.clone();
    let mut pending = tokio::spawn(async move { call(&b, "queryAllBiz", &json!({})).await.0 });
    assert!(
        base.wait_until(T, |b| b.commands().iter().any(|r| r.dropped))
            .await
    );
    let beats = stub.heartbeats().len();
    // Hanging is the behaviour under test, so give it a moment to (wrongly) answer.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut pending)
            .await
            .is_err()
    );
    assert!(
        stub.heartbeats().len() <= beats + 1,
        "no heartbeats while silent"
    );
    base.resume();
    assert_eq!(pending.await.unwrap(), 503);
    assert!(stub.wait(|s| s.heartbeats().len() > beats + 1).await);
}

#[tokio::test]
async fn port_is_kept_across_restarts_and_shutdown_says_deactivated() {
    let stub = Stub::start(json!([])).await;
    let base = Base::start(cfg("h6"), http(&stub)).await.unwrap();
    let port = base.http_port().unwrap();
    call_json(&base, "installBiz", &install("biz1", "1", "file:///a.jar")).await;
    base.restart(false).await.unwrap();
    assert_eq!(base.http_port(), Some(port));
    assert!(base.modules().is_empty());
    assert!(stub.wait(|s| s.queries.lock().unwrap().len() == 2).await);
    let all = call_json(&base, "queryAllBiz", &json!({})).await;
    assert_eq!(all["data"], json!([]));
    base.shutdown_graceful().await;
    assert!(
        stub.wait(|s| s
            .heartbeats()
            .last()
            .is_some_and(|h| h["state"] == "deactivated"))
            .await
    );
    assert!(
        reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/health"))
            .json(&json!({}))
            .send()
            .await
            .is_err(),
        "the Arklet port is closed after shutdown"
    );
}

#[tokio::test]
async fn older_arklet_variants() {
    let stub = Stub::start(json!([])).await;
    let mut c = cfg("h7");
    c.http_state_records_field = StateRecordsField::BizStateChangeLogs;
    c.http_enum_style = HttpEnumStyle::Name;
    c.http_base_identity = false;
    let base = Base::start(c, http(&stub)).await.unwrap();
    call_json(&base, "installBiz", &install("biz1", "1", "file:///a.jar")).await;
    let all = call_json(&base, "queryAllBiz", &json!({})).await;
    assert_eq!(all["data"][0]["bizState"], "ACTIVATED");
    assert_eq!(all["data"][0]["bizStateChangeLogs"][0]["reason"], "CREATED");
    assert!(all.get("baseIdentity").is_none());
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_base() {
    let stub = Stub::start(json!([])).await;
    let base = Base::start(cfg("h8"), http(&stub)).await.unwrap();
    let port = base.http_port().unwrap();
    let clone = base.clone();
    drop(base);
    // A clone keeps it alive.
    assert_eq!(
        call_json(&clone, "queryAllBiz", &json!({})).await["code"],
        "SUCCESS"
    );
    drop(clone);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let beats = stub.heartbeats().len();
    // Polling the heartbeat list is the only way to see that nothing more arrives.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        stub.heartbeats().len(),
        beats,
        "no heartbeats after the drop"
    );
}
