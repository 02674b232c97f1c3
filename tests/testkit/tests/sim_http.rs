//! The simulated base over the Arklet HTTP tunnel: a tiny axum "controller" receives its
//! heartbeats and baseline queries, and reqwest calls its Arklet API.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use module_controller::model::{BaseCommand, ModuleKey};
use serde_json::{Value, json};
use testkit::sim::{SimBase, SimBaseConfig, SimTransport};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_millis(300);

#[derive(Default)]
struct Seen {
    heartbeats: Vec<(Value, Instant)>,
    baseline_queries: Vec<Value>,
    /// What `/queryBaseline` answers.
    baseline: Value,
    /// How many `/queryBaseline` calls fail with 503 before one succeeds.
    failing_queries: usize,
}

/// The controller side of the HTTP tunnel; stops serving on drop.
struct Controller {
    url: String,
    seen: Arc<Mutex<Seen>>,
    task: JoinHandle<()>,
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn heartbeat(State(seen): State<Arc<Mutex<Seen>>>, body: String) -> (StatusCode, String) {
    match serde_json::from_str::<Value>(&body) {
        Ok(v) => {
            seen.lock()
                .expect("seen")
                .heartbeats
                .push((v, Instant::now()));
            (StatusCode::OK, "SUCCESS".into())
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()),
    }
}

async fn query_baseline(
    State(seen): State<Arc<Mutex<Seen>>>,
    body: String,
) -> (StatusCode, String) {
    let mut s = seen.lock().expect("seen");
    s.baseline_queries
        .push(serde_json::from_str(&body).unwrap_or(Value::Null));
    if s.failing_queries > 0 {
        s.failing_queries -= 1;
        return (StatusCode::SERVICE_UNAVAILABLE, "not yet".into());
    }
    (StatusCode::OK, s.baseline.to_string())
}

impl Controller {
    async fn start(baseline: Value, failing_queries: usize) -> Controller {
        let seen = Arc::new(Mutex::new(Seen {
            baseline,
            failing_queries,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/heartbeat", post(heartbeat))
            .route("/queryBaseline", post(query_baseline))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind controller");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("controller serves");
        });
        Controller { url, seen, task }
    }

    fn heartbeats(&self) -> Vec<Value> {
        self.seen
            .lock()
            .expect("seen")
            .heartbeats
            .iter()
            .map(|(v, _)| v.clone())
            .collect()
    }

    fn beat_times(&self) -> Vec<Instant> {
        self.seen
            .lock()
            .expect("seen")
            .heartbeats
            .iter()
            .map(|(_, t)| *t)
            .collect()
    }

    fn baseline_queries(&self) -> Vec<Value> {
        self.seen.lock().expect("seen").baseline_queries.clone()
    }

    async fn wait(&self, what: &str, pred: impl Fn(&Controller) -> bool) {
        let deadline = Instant::now() + WAIT;
        while !pred(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn config(id: &str) -> SimBaseConfig {
    let mut cfg = SimBaseConfig::new(id);
    cfg.heartbeat_interval = HEARTBEAT;
    cfg.host_name = format!("host-{id}");
    cfg
}

async fn start_base(ctl: &Controller, cfg: SimBaseConfig) -> SimBase {
    SimBase::start(
        cfg,
        SimTransport::Http {
            controller_url: ctl.url.clone(),
            listen_port: 0,
        },
    )
    .await
    .expect("sim base starts")
}

fn arklet(base: &SimBase, command: &str) -> String {
    format!(
        "http://127.0.0.1:{}/{command}",
        base.http_port().expect("HTTP base has a port")
    )
}

async fn call(base: &SimBase, command: &str, body: Value) -> (StatusCode, Value) {
    let resp = reqwest::Client::new()
        .post(arklet(base, command))
        .json(&body)
        .timeout(WAIT)
        .send()
        .await
        .expect("arklet answers");
    let status = resp.status();
    let json = resp.json::<Value>().await.expect("arklet replies JSON");
    (status, json)
}

fn install_body(name: &str, version: &str) -> Value {
    json!({"bizName": name, "bizVersion": version, "bizUrl": format!("file:///tmp/{name}-{version}.jar")})
}

#[tokio::test]
async fn heartbeats_carry_the_port_and_the_baseline_is_pulled_and_installed() {
    let ctl = Controller::start(json!([install_body("a", "1"), install_body("b", "2")]), 0).await;
    let base = start_base(&ctl, config("h1")).await;
    let port = base.http_port().expect("port");

    ctl.wait("3 heartbeats", |c| c.heartbeats().len() >= 3)
        .await;
    assert_eq!(
        ctl.heartbeats()[0],
        json!({
            "baseMetadata": {"identity":"h1","version":"1.0.0","clusterName":"default","name":"base"},
            "localIP": "127.0.0.1",
            "localHostName": "host-h1",
            "port": port,
            "state": "ACTIVATED"
        }),
        "heartbeat over HTTP: no envelope, plus the Arklet port"
    );
    let times = ctl.beat_times();
    let gap = times[2] - times[1];
    assert!(
        gap >= HEARTBEAT / 2 && gap < HEARTBEAT * 5,
        "beat gap {gap:?}"
    );

    ctl.wait("queryBaseline", |c| !c.baseline_queries().is_empty())
        .await;
    assert_eq!(
        ctl.baseline_queries()[0],
        json!({"identity":"h1","version":"1.0.0","clusterName":"default","name":"base"})
    );
    assert!(
        base.wait_until(WAIT, |b| b.active_modules().len() == 2)
            .await,
        "baseline installed"
    );
    assert_eq!(
        base.active_modules(),
        vec![ModuleKey::new("a", "1"), ModuleKey::new("b", "2")]
    );
    assert!(matches!(
        &base.commands()[0].command,
        BaseCommand::Baseline(specs) if specs.len() == 2
    ));
    assert_eq!(ctl.baseline_queries().len(), 1, "asked once");
}

#[tokio::test]
async fn query_baseline_is_retried_while_the_controller_is_not_ready() {
    let ctl = Controller::start(json!([install_body("a", "1")]), 2).await;
    let base = start_base(&ctl, config("h2")).await;
    assert!(
        base.wait_until(WAIT, |b| b.active_modules().len() == 1)
            .await,
        "baseline installed after retries"
    );
    assert_eq!(ctl.baseline_queries().len(), 3);
}

#[tokio::test]
async fn arklet_api_replies_have_the_arklet_shape() {
    let ctl = Controller::start(json!([]), 0).await;
    let base = start_base(&ctl, config("h3")).await;

    let (status, r) = call(&base, "installBiz", install_body("biz1", "0.0.1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["code"], "SUCCESS");
    assert_eq!(r["baseIdentity"], "h3");
    assert_eq!(r["data"]["code"], "SUCCESS");
    assert_eq!(r["data"]["bizInfos"], json!([]));
    assert!(r["data"]["elapsedSpace"].is_i64());

    let (_, r) = call(&base, "installBiz", install_body("biz1", "0.0.2")).await;
    assert_eq!(r["code"], "SUCCESS");

    let (status, r) = call(&base, "queryAllBiz", json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["code"], "SUCCESS");
    assert_eq!(r["baseIdentity"], "h3");
    let list = r["data"].as_array().expect("data is the simpleBiz list");
    assert_eq!(list.len(), 2);
    assert_eq!(list[0]["version"], "0.0.1");
    assert_eq!(list[0]["state"], "deactivated");
    assert_eq!(list[1]["state"], "activated");
    assert!(list[1]["latestStateRecord"]["changeTime"].is_i64());

    let (_, r) = call(&base, "health", json!({})).await;
    assert_eq!(r["code"], "SUCCESS");
    assert_eq!(
        r["data"]["healthData"]["jvm"]["java max metaspace"],
        json!(base.config().max_metaspace)
    );
    assert_eq!(r["data"]["healthData"]["masterBizInfo"]["bizName"], "base");

    base.fail_installs("bad", "InstallBizFailed", "no such jar");
    let (status, r) = call(&base, "installBiz", install_body("bad", "1")).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "Arklet reports failures in the body"
    );
    assert_eq!(r["code"], "FAILED");
    assert_eq!(r["data"]["code"], "InstallBizFailed");
    assert_eq!(r["data"]["message"], "no such jar");

    let (_, r) = call(
        &base,
        "uninstallBiz",
        json!({"bizName":"biz1","bizVersion":"0.0.1"}),
    )
    .await;
    assert_eq!(r["code"], "SUCCESS");
    assert_eq!(base.active_modules(), vec![ModuleKey::new("biz1", "0.0.2")]);

    let (status, r) = call(&base, "installBiz", json!({"bizName":"x"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(r["code"], "FAILED");
    assert_eq!(base.malformed_count(), 1);

    let get = reqwest::get(arklet(&base, "health"))
        .await
        .expect("GET answered");
    assert_eq!(get.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn install_is_synchronous_and_takes_the_latency() {
    let ctl = Controller::start(json!([]), 0).await;
    let base = start_base(&ctl, config("h4")).await;
    // Let the start-up baseline go through first, so it cannot queue ahead of the calls below.
    assert!(
        base.wait_until(WAIT, |b| !b.commands().is_empty()).await,
        "baseline arrived"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    base.set_install_latency(Duration::from_millis(400));
    let started = Instant::now();
    let (_, r) = call(&base, "installBiz", install_body("slow", "1")).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert_eq!(r["code"], "SUCCESS");
    assert_eq!(base.active_modules(), vec![ModuleKey::new("slow", "1")]);

    base.set_install_latency(Duration::ZERO);
    let started = Instant::now();
    let _ = call(&base, "installBiz", install_body("fast", "1")).await;
    assert!(
        started.elapsed() < Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn silent_base_hangs_requests_and_stops_heartbeats() {
    let ctl = Controller::start(json!([]), 0).await;
    let mut cfg = config("h5");
    cfg.heartbeat_interval = Duration::from_secs(3);
    let base = start_base(&ctl, cfg).await;
    ctl.wait("first heartbeat", |c| !c.heartbeats().is_empty())
        .await;
    assert!(
        base.wait_until(WAIT, |b| !b.commands().is_empty()).await,
        "the (empty) baseline arrived"
    );

    base.go_silent();
    let beats = ctl.heartbeats().len();
    let short = reqwest::Client::new()
        .post(arklet(&base, "installBiz"))
        .json(&install_body("biz1", "1"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(
        short.as_ref().is_err_and(|e| e.is_timeout()),
        "a silent base does not answer: {short:?}"
    );
    // A request left waiting is answered 503 once the base is back: it was dropped.
    let waiting = {
        let url = arklet(&base, "health");
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(url)
                .json(&json!({}))
                .timeout(WAIT)
                .send()
                .await
                .map(|r| r.status())
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(ctl.heartbeats().len(), beats, "no heartbeats while silent");
    assert!(base.modules().is_empty());
    let cmds = &base.commands()[1..];
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    assert!(cmds.iter().all(|c| c.dropped));

    let resumed = Instant::now();
    base.resume();
    let status = waiting
        .await
        .expect("request task")
        .expect("answered after resume");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    ctl.wait("heartbeat after resume", |c| c.heartbeats().len() > beats)
        .await;
    assert!(
        resumed.elapsed() < Duration::from_millis(1500),
        "beat at once on resume"
    );
    let (_, r) = call(&base, "installBiz", install_body("biz1", "1")).await;
    assert_eq!(r["code"], "SUCCESS");
}

#[tokio::test]
async fn graceful_shutdown_says_deactivated_and_closes_the_arklet_port() {
    let ctl = Controller::start(json!([]), 0).await;
    let base = start_base(&ctl, config("h6")).await;
    ctl.wait("first heartbeat", |c| !c.heartbeats().is_empty())
        .await;
    let url = arklet(&base, "health");
    base.shutdown_graceful().await;
    let beats = ctl.heartbeats();
    let last = beats.last().expect("beats");
    assert_eq!(last["state"], "DEACTIVATED");
    assert_eq!(last["baseMetadata"]["identity"], "h6");
    tokio::time::sleep(HEARTBEAT * 3).await;
    assert_eq!(
        ctl.heartbeats().len(),
        beats.len(),
        "no beats after goodbye"
    );
    let after = reqwest::Client::new()
        .post(&url)
        .json(&json!({}))
        .timeout(Duration::from_secs(2))
        .send()
        .await;
    assert!(after.is_err(), "arklet port closed: {after:?}");
}

#[tokio::test]
async fn restart_keeps_the_port_forgets_modules_and_asks_again() {
    let ctl = Controller::start(json!([install_body("a", "1")]), 0).await;
    let base = start_base(&ctl, config("h7")).await;
    assert!(
        base.wait_until(WAIT, |b| b.active_modules().len() == 1)
            .await
    );
    let _ = call(&base, "installBiz", install_body("extra", "1")).await;
    let port = base.http_port();

    base.restart(false).await.expect("restart");
    assert_eq!(base.http_port(), port, "same Arklet port after restart");
    ctl.wait("second queryBaseline", |c| c.baseline_queries().len() == 2)
        .await;
    assert!(
        base.wait_until(WAIT, |b| b.active_modules()
            == vec![ModuleKey::new("a", "1")])
            .await,
        "only the baseline is back after a JVM restart: {:?}",
        base.active_modules()
    );
    let (_, r) = call(&base, "queryAllBiz", json!({})).await;
    assert_eq!(r["data"].as_array().map(Vec::len), Some(1));
}
