//! Scale benchmark (issue 12): N Arklet double bases, M module Deployments of N replicas each,
//! the controller's release binary as a separate process, measured from outside.
//!
//! ```text
//! cargo build --release -p module-controller
//! cargo run --release -p testkit --bin scale-bench -- --bases 100 --modules 5 [--steady-secs 60] [--tunnel mqtt|http]
//! ```
//!
//! What it does: starts a private control plane and a mosquitto broker, runs
//! `module-controller` (next to this binary in the target dir, or `--controller PATH`)
//! configured through its environment variables, starts N double bases in this process (one
//! MQTT connection each, Arklet's 10 s heartbeats), waits for N Ready VNodes, creates M
//! Deployments and then rolls every one to a new version. A pod watch on its own thread stamps
//! when each pod is first seen bound and first seen Ready; the bases stamp when each install
//! command arrives and when its answer leaves (all clocks are this machine's epoch clock).
//! After everything is Ready it waits `--settle-secs`, then measures `--steady-secs` of steady
//! state: controller CPU (`/proc/<pid>/stat`) and RSS (`/proc/<pid>/status`), the apiserver's
//! own `apiserver_request_total` (all clients) and the controller's own write counters.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arklet_double::{BaseConfig, Command as BaseCommand, Fleet, Transport, now_ms};
use clap::{Parser, ValueEnum};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use testkit::localenv::broker::Mosquitto;
use testkit::localenv::control_plane::{ControlPlane, ControlPlaneOptions};
use testkit::localenv::ports::free_port;
use testkit::localenv::process::ManagedProcess;
use tokio_util::sync::CancellationToken;

const NS: &str = "scale-bench";
const ENV: &str = "scale";
const BASE_NAME: &str = "scalebase";
const BASE_PREFIX: &str = "scale-base";
const MODULE_LABEL: &str = "virtual-kubelet.koupleless.io/component";
const V1: &str = "1.0.0";
const V2: &str = "2.0.0";
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Tunnel {
    Mqtt,
    Http,
}

#[derive(Debug, Parser)]
#[command(about = "Scale benchmark: N bases × M modules through the controller's release binary")]
struct Args {
    /// Bases (VNodes), and replicas of every Deployment.
    #[arg(long, default_value_t = 100)]
    bases: usize,
    /// Module Deployments.
    #[arg(long, default_value_t = 5)]
    modules: usize,
    /// Steady-state window, seconds.
    #[arg(long, default_value_t = 60)]
    steady_secs: u64,
    /// Wait after the last phase before the steady-state window opens, seconds.
    #[arg(long, default_value_t = 15)]
    settle_secs: u64,
    /// How bases reach the controller.
    #[arg(long, value_enum, default_value = "mqtt")]
    tunnel: Tunnel,
    /// The controller binary (default: `module-controller` next to this binary).
    #[arg(long)]
    controller: Option<PathBuf>,
    /// Extra environment of the controller, `KEY=VALUE` (repeatable), e.g. `RUST_LOG=debug`.
    #[arg(long = "controller-env")]
    controller_env: Vec<String>,
    /// Heartbeat period of the bases and the controller's HEARTBEAT_PERIOD_SECS.
    #[arg(long, default_value_t = 10)]
    heartbeat_secs: u64,
    /// How long each module takes to start on a base.
    #[arg(long, default_value_t = 0)]
    install_latency_ms: u64,
    /// maxSurge of the rolling update (an integer or a percentage); maxUnavailable is 0.
    #[arg(long, default_value = "25%")]
    max_surge: String,
    /// `--kube-api-qps` of kube-controller-manager and kube-scheduler (burst is twice it).
    #[arg(long, default_value_t = 1000)]
    kube_api_qps: u32,
    /// Skip the rolling update.
    #[arg(long)]
    no_rollout: bool,
    /// Longest any phase may take, seconds.
    #[arg(long, default_value_t = 1800)]
    phase_timeout_secs: u64,
}

// ---------------------------------------------------------------------------------------------
// The pod book: what the watch saw, stamped on arrival.

#[derive(Debug, Clone, Default)]
struct PodRec {
    module: String,
    version: String,
    node: Option<String>,
    bound_ms: Option<u64>,
    ready_ms: Option<u64>,
    ready_now: bool,
    /// Times it went from Ready to not Ready while not being deleted.
    flaps: u32,
    gone: bool,
}

#[derive(Debug, Default)]
struct Book {
    pods: HashMap<String, PodRec>,
    synced: bool,
    errors: u64,
}

impl Book {
    fn live(&self, version: &str) -> impl Iterator<Item = &PodRec> {
        self.pods
            .values()
            .filter(move |p| !p.gone && p.version == version)
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn observe(book: &Mutex<Book>, ev: watcher::Event<Pod>) {
    let at = now_ms();
    let mut book = book.lock().unwrap_or_else(|p| p.into_inner());
    match ev {
        watcher::Event::Apply(pod) | watcher::Event::InitApply(pod) => {
            let Some(uid) = pod.metadata.uid.clone() else {
                return;
            };
            let rec = book.pods.entry(uid).or_insert_with(|| PodRec {
                module: pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.containers.first())
                    .map(|c| c.name.clone())
                    .unwrap_or_default(),
                version: pod
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("version"))
                    .cloned()
                    .unwrap_or_default(),
                ..PodRec::default()
            });
            if rec.node.is_none()
                && let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone())
            {
                rec.node = Some(node);
                rec.bound_ms = Some(at);
            }
            let ready = is_ready(&pod);
            if rec.ready_now && !ready && pod.metadata.deletion_timestamp.is_none() {
                rec.flaps += 1;
            }
            rec.ready_now = ready;
            if rec.ready_now && rec.ready_ms.is_none() {
                rec.ready_ms = Some(at);
            }
        }
        watcher::Event::Delete(pod) => {
            if let Some(rec) = pod.metadata.uid.and_then(|uid| book.pods.get_mut(&uid)) {
                rec.gone = true;
                rec.ready_now = false;
            }
        }
        watcher::Event::InitDone => book.synced = true,
        watcher::Event::Init => {}
    }
}

/// Watches the module pods on a thread of its own, so that the bases' load in the main runtime
/// does not delay the stamps.
fn spawn_pod_watch(
    config: kube::Config,
    book: Arc<Mutex<Book>>,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("pod-watch".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("pod watch: no runtime: {e}");
                    return;
                }
            };
            rt.block_on(async move {
                let client = match kube::Client::try_from(config) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("pod watch: no client: {e}");
                        return;
                    }
                };
                let api: Api<Pod> = Api::namespaced(client, NS);
                let cfg = watcher::Config::default().labels(&format!("{MODULE_LABEL}=module"));
                let mut stream = watcher(api, cfg).default_backoff().boxed();
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = stream.next() => next,
                    };
                    match next {
                        Some(Ok(ev)) => observe(&book, ev),
                        Some(Err(e)) => {
                            eprintln!("pod watch error (retrying): {e}");
                            book.lock().unwrap_or_else(|p| p.into_inner()).errors += 1;
                        }
                        None => return,
                    }
                }
            });
        })
        .context("starting the pod watch thread")
}

// ---------------------------------------------------------------------------------------------
// What the bases saw.

type BizKey = (String, String, String);

#[derive(Debug, Default)]
struct BaseRecords {
    /// (identity, module, version) → first install arrival, epoch ms.
    first_install: HashMap<BizKey, u64>,
    /// (identity, module, version) → install commands received.
    installs: HashMap<BizKey, u32>,
    /// (identity, module, version) → first install answer sent, epoch ms.
    first_reply: HashMap<BizKey, u64>,
}

impl BaseRecords {
    fn collect(fleet: &Fleet) -> BaseRecords {
        let mut r = BaseRecords::default();
        for base in fleet.bases() {
            let id = base.identity().to_string();
            for c in base.commands() {
                if let BaseCommand::Install { name, version, .. } = c.command {
                    let key = (id.clone(), name, version);
                    *r.installs.entry(key.clone()).or_default() += 1;
                    r.first_install.entry(key).or_insert(c.at_ms);
                }
            }
            for reply in base.replies() {
                if reply.command == "installBiz"
                    && let Some(biz) = reply.biz
                {
                    r.first_reply
                        .entry((id.clone(), biz.name, biz.version))
                        .or_insert(reply.at_ms);
                }
            }
        }
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Statistics.

#[derive(Debug, Clone, Copy, Default)]
struct Stats {
    n: usize,
    min: i64,
    p50: i64,
    p99: i64,
    max: i64,
}

fn stats(mut v: Vec<i64>) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    v.sort_unstable();
    let at = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    Stats {
        n: v.len(),
        min: v[0],
        p50: at(0.50),
        p99: at(0.99),
        max: v[v.len() - 1],
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.n == 0 {
            return write!(f, "-");
        }
        write!(
            f,
            "{} / {} / {} ms (min {})",
            self.p50, self.p99, self.max, self.min
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Processes: CPU and memory from /proc.

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `kB` field of /proc/<pid>/status, in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// (busy, total) ticks of the whole machine.
fn machine_ticks() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

#[derive(Debug, Clone)]
struct CpuSnap {
    at: Instant,
    ticks: Vec<Option<u64>>,
    machine: (u64, u64),
}

#[derive(Debug, Clone)]
struct Procs {
    list: Vec<(String, u32)>,
}

impl Procs {
    fn snap(&self) -> CpuSnap {
        CpuSnap {
            at: Instant::now(),
            ticks: self.list.iter().map(|(_, pid)| cpu_ticks(*pid)).collect(),
            machine: machine_ticks(),
        }
    }

    /// % of one core per process between two snapshots, then the machine's busy cores (as % of
    /// one core) and what no process of the bench used.
    fn usage(&self, a: &CpuSnap, b: &CpuSnap) -> Vec<(String, f64)> {
        let secs = b.at.duration_since(a.at).as_secs_f64().max(1e-3);
        let tck = clk_tck();
        let mut out = Vec::new();
        let mut ours = 0.0;
        for (i, (name, _)) in self.list.iter().enumerate() {
            let pct = match (a.ticks[i], b.ticks[i]) {
                (Some(x), Some(y)) => (y.saturating_sub(x)) as f64 / tck / secs * 100.0,
                _ => f64::NAN,
            };
            if pct.is_finite() {
                ours += pct;
            }
            out.push((name.clone(), pct));
        }
        let busy = (b.machine.0.saturating_sub(a.machine.0)) as f64 / tck / secs * 100.0;
        out.push(("machine (all processes)".into(), busy));
        out.push(("other processes".into(), (busy - ours).max(0.0)));
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus text.

/// `name{labels}` → value, labels sorted, for the families whose name starts with `prefix`.
fn parse_prom(text: &str, prefix: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || !line.starts_with(prefix) {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.trim().parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.find('{') {
            Some(i) => (&series[..i], parse_labels(&series[i + 1..])),
            None => (series, BTreeMap::new()),
        };
        out.push((name.to_string(), labels, value));
    }
    out
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        let key: String = chars
            .by_ref()
            .take_while(|c| *c != '=')
            .collect::<String>()
            .trim_start_matches(',')
            .trim()
            .to_string();
        if key.is_empty() || key.starts_with('}') {
            break;
        }
        if chars.next() != Some('"') {
            break;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => break,
                c => value.push(c),
            }
        }
        out.insert(key, value);
    }
    out
}

/// Apiserver requests by (verb, resource[/subresource]).
type ApiCounts = BTreeMap<(String, String), f64>;

/// What the apiserver's own metrics say: requests (`apiserver_request_total`) and the sum and
/// count of their durations (`apiserver_request_duration_seconds`), by verb and resource.
#[derive(Debug, Clone, Default)]
struct ApiSnap {
    requests: ApiCounts,
    seconds: ApiCounts,
    timed: ApiCounts,
}

async fn apiserver_metrics(client: &kube::Client) -> anyhow::Result<ApiSnap> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .context("building the /metrics request")?;
    let text = client
        .request_text(request)
        .await
        .context("reading the apiserver's /metrics")?;
    let mut out = ApiSnap::default();
    for (name, labels, value) in parse_prom(&text, "apiserver_request_") {
        let into = match name.as_str() {
            "apiserver_request_total" => &mut out.requests,
            "apiserver_request_duration_seconds_sum" => &mut out.seconds,
            "apiserver_request_duration_seconds_count" => &mut out.timed,
            _ => continue,
        };
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        let sub = get("subresource");
        let resource = if sub.is_empty() {
            get("resource")
        } else {
            format!("{}/{sub}", get("resource"))
        };
        *into.entry((get("verb"), resource)).or_default() += value;
    }
    Ok(out)
}

/// Mean apiserver latency (ms) and count of the writes of the controller's kinds between two
/// snapshots: the apiserver's share of every write, whoever sent it.
fn write_latencies(a: &ApiSnap, b: &ApiSnap) -> Vec<(String, f64, f64)> {
    const KINDS: [(&str, &str); 4] = [
        ("PATCH", "pods/status"),
        ("PATCH", "nodes"),
        ("PATCH", "nodes/status"),
        ("PATCH", "leases"),
    ];
    let delta = |m: &ApiCounts, n: &ApiCounts, k: &(String, String)| {
        n.get(k).copied().unwrap_or(0.0) - m.get(k).copied().unwrap_or(0.0)
    };
    KINDS
        .iter()
        .filter_map(|(verb, res)| {
            let k = (verb.to_string(), res.to_string());
            let n = delta(&a.timed, &b.timed, &k);
            (n > 0.0).then(|| {
                let ms = delta(&a.seconds, &b.seconds, &k) * 1000.0 / n;
                (format!("{verb} {res}"), n, ms)
            })
        })
        .collect()
}

fn api_diff(a: &ApiCounts, b: &ApiCounts) -> Vec<(String, String, f64)> {
    b.iter()
        .filter_map(|((verb, res), v)| {
            let d = v - a.get(&(verb.clone(), res.clone())).copied().unwrap_or(0.0);
            (d > 0.0).then(|| (verb.clone(), res.clone(), d))
        })
        .collect()
}

/// A sum that is +0 when empty (`Sum for f64` starts at -0.0, printed "-0").
fn total(values: impl Iterator<Item = f64>) -> f64 {
    values.fold(0.0, |a, b| a + b)
}

fn is_write(verb: &str) -> bool {
    !matches!(verb, "GET" | "LIST" | "WATCH" | "CONNECT")
}

/// The controller's own counters: `module_controller_apiserver_writes{kind}` (ok) and
/// `module_controller_base_commands{command,result}`.
#[derive(Debug, Clone, Default)]
struct CtlCounters {
    writes: BTreeMap<String, f64>,
    write_errors: f64,
    commands: BTreeMap<String, f64>,
    /// Messages from bases the controller dropped, by tunnel and reason (queue full, stale…).
    dropped: BTreeMap<String, f64>,
}

async fn controller_counters(http: &reqwest::Client, addr: &str) -> anyhow::Result<CtlCounters> {
    let text = http
        .get(format!("http://{addr}/metrics"))
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let mut c = CtlCounters::default();
    for (name, labels, value) in parse_prom(&text, "module_controller_") {
        let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
        match name.as_str() {
            "module_controller_apiserver_writes_total" if get("result") == "ok" => {
                *c.writes.entry(get("kind")).or_default() += value;
            }
            "module_controller_apiserver_writes_total" => c.write_errors += value,
            "module_controller_base_commands_total" => {
                *c.commands
                    .entry(format!("{} {}", get("command"), get("result")))
                    .or_default() += value;
            }
            "module_controller_mqtt_messages_received_total"
            | "module_controller_http_messages_received_total"
                if get("result") != "ok" =>
            {
                let tunnel = if name.contains("mqtt") {
                    "mqtt"
                } else {
                    "http"
                };
                *c.dropped
                    .entry(format!("{tunnel} {}", get("result")))
                    .or_default() += value;
            }
            _ => {}
        }
    }
    Ok(c)
}

fn map_diff(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    b.iter()
        .map(|(k, v)| (k.clone(), v - a.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Objects.

fn deployment(
    j: usize,
    version: &str,
    replicas: usize,
    max_surge: &str,
) -> anyhow::Result<Deployment> {
    let app = format!("biz{j}");
    let surge = match max_surge.parse::<u32>() {
        Ok(n) => json!(n),
        Err(_) => json!(max_surge),
    };
    Ok(serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": app, "namespace": NS},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": app}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": {"app": app, "version": version, MODULE_LABEL: "module"}},
                "spec": {
                    "containers": [{
                        "name": app,
                        "image": format!("https://example.invalid/modules/{app}-{version}-ark-biz.jar"),
                        "env": [{"name": "BIZ_VERSION", "value": version}]
                    }],
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "base.koupleless.io/name", "operator": "In", "values": [BASE_NAME]}]}]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                            "labelSelector": {"matchLabels": {"app": app, "version": version}},
                            "topologyKey": "kubernetes.io/hostname"}]}
                    },
                    "tolerations": [
                        {"key": "schedule.koupleless.io/virtual-node", "operator": "Equal", "value": "True", "effect": "NoExecute"},
                        {"key": "schedule.koupleless.io/node-env", "operator": "Equal", "value": ENV, "effect": "NoExecute"}
                    ]
                }
            }
        }
    }))?)
}

// ---------------------------------------------------------------------------------------------
// Phases.

#[derive(Debug, Default)]
struct Phase {
    pods: usize,
    all_bound: Option<Duration>,
    all_ready: Option<Duration>,
    old_gone: Option<Duration>,
    bound_to_install: Stats,
    bound_to_ready: Stats,
    install_to_reply: Stats,
    reply_to_ready: Stats,
    installs_per_pod: f64,
    missing_install: usize,
    /// Pods of this phase's version that went Ready → not Ready (none should).
    flapped_pods: usize,
    /// Messages from bases the controller dropped during the phase.
    dropped: BTreeMap<String, f64>,
    cpu: Vec<(String, f64)>,
    writes: BTreeMap<String, f64>,
    /// (verb resource, count, mean apiserver latency in ms), all clients.
    api_latency: Vec<(String, f64, f64)>,
    controller_rss_mib: f64,
    wall: Duration,
}

fn elapsed_since(start_ms: u64, at_ms: u64) -> Duration {
    Duration::from_millis(at_ms.saturating_sub(start_ms))
}

/// Per-pod latencies of the live pods of `version`.
fn latencies(
    book: &Book,
    records: &BaseRecords,
    node_base: &HashMap<String, String>,
    version: &str,
    phase: &mut Phase,
) {
    let mut b2i = Vec::new();
    let mut b2r = Vec::new();
    let mut i2r = Vec::new();
    let mut r2r = Vec::new();
    let mut installs = 0u64;
    let mut pods = 0usize;
    for p in book.live(version) {
        pods += 1;
        let (Some(bound), Some(node)) = (p.bound_ms, p.node.as_ref()) else {
            continue;
        };
        if let Some(ready) = p.ready_ms {
            b2r.push(ready as i64 - bound as i64);
        }
        let Some(identity) = node_base.get(node) else {
            phase.missing_install += 1;
            continue;
        };
        let key = (identity.clone(), p.module.clone(), p.version.clone());
        installs += u64::from(records.installs.get(&key).copied().unwrap_or(0));
        match records.first_install.get(&key) {
            Some(&at) => {
                b2i.push(at as i64 - bound as i64);
                if let Some(&reply) = records.first_reply.get(&key) {
                    i2r.push(reply as i64 - at as i64);
                    if let Some(ready) = p.ready_ms {
                        r2r.push(ready as i64 - reply as i64);
                    }
                }
            }
            None => phase.missing_install += 1,
        }
    }
    phase.pods = pods;
    phase.bound_to_install = stats(b2i);
    phase.bound_to_ready = stats(b2r);
    phase.install_to_reply = stats(i2r);
    phase.reply_to_ready = stats(r2r);
    phase.installs_per_pod = installs as f64 / pods.max(1) as f64;
    phase.flapped_pods = book.live(version).filter(|p| p.flaps > 0).count();
}

struct Bench {
    args: Args,
    client: kube::Client,
    book: Arc<Mutex<Book>>,
    fleet: Fleet,
    node_base: HashMap<String, String>,
    procs: Procs,
    http: reqwest::Client,
    metrics_addr: String,
    controller_pid: u32,
}

impl Bench {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.phase_timeout_secs)
    }

    /// Polls the book until `done` holds; `what` names the wait in errors and progress.
    async fn wait_book(
        &self,
        what: &str,
        done: impl Fn(&Book) -> Result<(), String>,
    ) -> anyhow::Result<()> {
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            let state = done(&self.book());
            match state {
                Ok(()) => return Ok(()),
                Err(progress) => {
                    if start.elapsed() > self.timeout() {
                        bail!("{what}: not done after {:?}: {progress}", self.timeout());
                    }
                    if last_report.elapsed() > Duration::from_secs(10) {
                        eprintln!(
                            "  … {what}: {progress} ({:.0} s)",
                            start.elapsed().as_secs_f64()
                        );
                        last_report = Instant::now();
                    }
                }
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn counters(&self) -> CtlCounters {
        match controller_counters(&self.http, &self.metrics_addr).await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("warning: controller /metrics unreadable: {e:#}");
                CtlCounters::default()
            }
        }
    }

    /// The apiserver's metrics, or nothing (with a warning) when they cannot be read.
    async fn api_snap(&self) -> ApiSnap {
        match apiserver_metrics(&self.client).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("warning: {e:#}");
                ApiSnap::default()
            }
        }
    }

    async fn create(&self) -> anyhow::Result<Phase> {
        let (n, m) = (self.args.bases, self.args.modules);
        let want = n * m;
        let deps: Api<Deployment> = Api::namespaced(self.client.clone(), NS);
        let a0 = self.api_snap().await;
        let c0 = self.counters().await;
        let cpu0 = self.procs.snap();
        let t0 = now_ms();
        for j in 0..m {
            deps.create(
                &PostParams::default(),
                &deployment(j, V1, n, &self.args.max_surge)?,
            )
            .await
            .with_context(|| format!("creating Deployment biz{j}"))?;
        }
        self.wait_book("create: pods bound and Ready", |b| {
            let bound = b.live(V1).filter(|p| p.bound_ms.is_some()).count();
            let ready = b.live(V1).filter(|p| p.ready_now).count();
            if bound == want && ready == want {
                Ok(())
            } else {
                Err(format!("{bound}/{want} bound, {ready}/{want} Ready"))
            }
        })
        .await?;
        let cpu1 = self.procs.snap();
        let c1 = self.counters().await;
        let a1 = self.api_snap().await;
        let records = BaseRecords::collect(&self.fleet);
        let mut phase = Phase {
            wall: cpu1.at.duration_since(cpu0.at),
            cpu: self.procs.usage(&cpu0, &cpu1),
            writes: map_diff(&c0.writes, &c1.writes),
            dropped: map_diff(&c0.dropped, &c1.dropped),
            api_latency: write_latencies(&a0, &a1),
            controller_rss_mib: status_mib(self.controller_pid, "VmRSS:").unwrap_or(f64::NAN),
            ..Phase::default()
        };
        let book = self.book();
        phase.all_bound = book
            .live(V1)
            .filter_map(|p| p.bound_ms)
            .max()
            .map(|t| elapsed_since(t0, t));
        phase.all_ready = book
            .live(V1)
            .filter_map(|p| p.ready_ms)
            .max()
            .map(|t| elapsed_since(t0, t));
        latencies(&book, &records, &self.node_base, V1, &mut phase);
        Ok(phase)
    }

    async fn rollout(&self) -> anyhow::Result<Phase> {
        let (n, m) = (self.args.bases, self.args.modules);
        let want = n * m;
        let deps: Api<Deployment> = Api::namespaced(self.client.clone(), NS);
        let a0 = self.api_snap().await;
        let c0 = self.counters().await;
        let cpu0 = self.procs.snap();
        let t0 = now_ms();
        for j in 0..m {
            let name = format!("biz{j}");
            let mut d = deployment(j, V2, n, &self.args.max_surge)?;
            d.metadata.resource_version = deps.get(&name).await?.metadata.resource_version;
            deps.replace(&name, &PostParams::default(), &d)
                .await
                .with_context(|| format!("updating Deployment {name}"))?;
        }
        self.wait_book("rolling update: new pods Ready", |b| {
            let ready = b.live(V2).filter(|p| p.ready_now).count();
            if ready == want {
                Ok(())
            } else {
                let old = b.live(V1).count();
                Err(format!(
                    "{ready}/{want} new pods Ready, {old} old pods left"
                ))
            }
        })
        .await?;
        let all_new_ready = now_ms();
        self.wait_book("rolling update: old pods gone", |b| {
            let old = b.live(V1).count();
            if old == 0 {
                Ok(())
            } else {
                Err(format!("{old} old pods left"))
            }
        })
        .await?;
        let old_gone = now_ms();
        let cpu1 = self.procs.snap();
        let c1 = self.counters().await;
        let a1 = self.api_snap().await;
        let records = BaseRecords::collect(&self.fleet);
        let mut phase = Phase {
            wall: cpu1.at.duration_since(cpu0.at),
            cpu: self.procs.usage(&cpu0, &cpu1),
            writes: map_diff(&c0.writes, &c1.writes),
            dropped: map_diff(&c0.dropped, &c1.dropped),
            api_latency: write_latencies(&a0, &a1),
            controller_rss_mib: status_mib(self.controller_pid, "VmRSS:").unwrap_or(f64::NAN),
            old_gone: Some(elapsed_since(t0, old_gone)),
            ..Phase::default()
        };
        let book = self.book();
        phase.all_bound = book
            .live(V2)
            .filter_map(|p| p.bound_ms)
            .max()
            .map(|t| elapsed_since(t0, t));
        phase.all_ready = Some(elapsed_since(t0, all_new_ready));
        latencies(&book, &records, &self.node_base, V2, &mut phase);
        Ok(phase)
    }

    async fn steady(&self) -> anyhow::Result<Steady> {
        if self.args.settle_secs > 0 {
            eprintln!("settling {} s", self.args.settle_secs);
            tokio::time::sleep(Duration::from_secs(self.args.settle_secs)).await;
        }
        eprintln!("steady-state window: {} s", self.args.steady_secs);
        let a0 = apiserver_metrics(&self.client).await?;
        let c0 = self.counters().await;
        let cpu0 = self.procs.snap();
        tokio::time::sleep(Duration::from_secs(self.args.steady_secs)).await;
        let cpu1 = self.procs.snap();
        let c1 = self.counters().await;
        let a1 = apiserver_metrics(&self.client).await?;
        let (not_ready, pod_changes) = {
            let b = self.book();
            let live: Vec<_> = b.pods.values().filter(|p| !p.gone).collect();
            (live.iter().filter(|p| !p.ready_now).count(), live.len())
        };
        Ok(Steady {
            secs: cpu1.at.duration_since(cpu0.at).as_secs_f64(),
            cpu: self.procs.usage(&cpu0, &cpu1),
            rss_mib: status_mib(self.controller_pid, "VmRSS:").unwrap_or(f64::NAN),
            hwm_mib: status_mib(self.controller_pid, "VmHWM:").unwrap_or(f64::NAN),
            api: api_diff(&a0.requests, &a1.requests),
            api_latency: write_latencies(&a0, &a1),
            writes: map_diff(&c0.writes, &c1.writes),
            write_errors: c1.write_errors - c0.write_errors,
            commands: map_diff(&c0.commands, &c1.commands),
            dropped: map_diff(&c0.dropped, &c1.dropped),
            not_ready,
            live_pods: pod_changes,
        })
    }
}

#[derive(Debug)]
struct Steady {
    secs: f64,
    cpu: Vec<(String, f64)>,
    rss_mib: f64,
    hwm_mib: f64,
    api: Vec<(String, String, f64)>,
    api_latency: Vec<(String, f64, f64)>,
    writes: BTreeMap<String, f64>,
    write_errors: f64,
    commands: BTreeMap<String, f64>,
    dropped: BTreeMap<String, f64>,
    not_ready: usize,
    live_pods: usize,
}

// ---------------------------------------------------------------------------------------------
// Setup.

fn controller_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.controller {
        return Ok(p.clone());
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let dir = exe.parent().context("this binary has no directory")?;
    let p = dir.join("module-controller");
    if !p.exists() {
        bail!(
            "{} not found: build it with `cargo build --release -p module-controller` (same target dir), or pass --controller PATH",
            p.display()
        );
    }
    Ok(p)
}

struct Machine {
    nproc: usize,
    model: String,
    load: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        model,
        load: loadavg(),
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

async fn wait_controller_ready(
    process: &mut ManagedProcess,
    http: &reqwest::Client,
    addr: &str,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = process.try_exit_status()? {
            bail!(
                "module-controller exited ({status}); last lines of {}:\n{}",
                process.log_path().display(),
                process.log_tail(30)
            );
        }
        if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "module-controller not ready within 60 s; last lines of {}:\n{}",
                process.log_path().display(),
                process.log_tail(30)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn wait_vnodes(client: &kube::Client, n: usize, timeout: Duration) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let lp = ListParams::default().labels(&format!("base.koupleless.io/name={BASE_NAME}"));
    let start = Instant::now();
    loop {
        let list = nodes.list(&lp).await?.items;
        let ready = list
            .iter()
            .filter(|node| {
                node.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        if ready >= n {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("only {ready}/{n} VNodes Ready after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Report.

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1} s", d.as_secs_f64()))
}

fn verdict(ok: bool) -> &'static str {
    if ok { "MET" } else { "NOT MET" }
}

struct Report<'a> {
    args: &'a Args,
    machine: &'a Machine,
    bases_connected: Duration,
    vnodes_ready: Duration,
    create: &'a Phase,
    rollout: Option<&'a Phase>,
    steady: &'a Steady,
    watch_errors: u64,
}

fn print_report(r: &Report<'_>) {
    let a = r.args;
    let (n, m) = (a.bases, a.modules);
    let tunnel = match a.tunnel {
        Tunnel::Mqtt => "MQTT (mosquitto)",
        Tunnel::Http => "HTTP",
    };
    println!();
    println!(
        "scale-bench: {n} bases × {m} modules = {} module pods, tunnel {tunnel}",
        n * m
    );
    println!(
        "machine: {} × {} (nproc {}); load average at start {}; the control plane (etcd, kube-apiserver, kube-scheduler, \
         kube-controller-manager), the broker, the controller and the {n} double bases (this process) all share it",
        r.machine.nproc, r.machine.model, r.machine.nproc, r.machine.load
    );
    println!(
        "controller: release binary, separate process; heartbeats every {} s; install latency {} ms; maxSurge {}, maxUnavailable 0; kcm/scheduler --kube-api-qps {}",
        a.heartbeat_secs, a.install_latency_ms, a.max_surge, a.kube_api_qps
    );
    println!();
    println!("| setup | |");
    println!("|---|---|");
    println!(
        "| {n} bases connected (64 at a time) | {:.1} s |",
        r.bases_connected.as_secs_f64()
    );
    println!(
        "| all {n} VNodes Ready, from the first base's start | {:.1} s |",
        r.vnodes_ready.as_secs_f64()
    );
    println!();
    let phases: Vec<(&str, &Phase)> = std::iter::once(("create", r.create))
        .chain(r.rollout.map(|p| ("rolling update", p)))
        .collect();
    let mut header = String::from("| latency and cost |");
    let mut rule = String::from("|---|");
    for (name, p) in &phases {
        header.push_str(&format!(" {name} ({} pods) |", p.pods));
        rule.push_str("---|");
    }
    println!("{header}");
    println!("{rule}");
    let row = |label: &str, f: &dyn Fn(&Phase) -> String| {
        let mut line = format!("| {label} |");
        for (_, p) in &phases {
            line.push_str(&format!(" {} |", f(p)));
        }
        println!("{line}");
    };
    row("→ all pods bound (from the first apply)", &|p| {
        secs(p.all_bound)
    });
    row("→ all pods Ready (from the first apply)", &|p| {
        secs(p.all_ready)
    });
    if r.rollout.is_some() {
        row("→ all old pods gone", &|p| secs(p.old_gone));
    }
    row(
        "bound → install command at the base, p50 / p99 / max",
        &|p| p.bound_to_install.to_string(),
    );
    row("bound → Ready, p50 / p99 / max", &|p| {
        p.bound_to_ready.to_string()
    });
    row("install command → base's answer, p50 / p99 / max", &|p| {
        p.install_to_reply.to_string()
    });
    row("base's answer → Ready seen, p50 / p99 / max", &|p| {
        p.reply_to_ready.to_string()
    });
    row("install commands per pod", &|p| {
        format!("{:.3}", p.installs_per_pod)
    });
    row("pods without an install record", &|p| {
        p.missing_install.to_string()
    });
    row("pods of this version that went Ready → not Ready", &|p| {
        p.flapped_pods.to_string()
    });
    row("messages from bases dropped by the controller", &|p| {
        if p.dropped.is_empty() {
            return "0".into();
        }
        p.dropped
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row("controller writes per pod (ok)", &|p| {
        let pods = p.pods.max(1) as f64;
        p.writes
            .iter()
            .map(|(k, v)| format!("{k} {:.2}", v / pods))
            .collect::<Vec<_>>()
            .join(", ")
    });
    row(
        "apiserver mean latency per write, all clients (count)",
        &|p| {
            if p.api_latency.is_empty() {
                return "-".into();
            }
            p.api_latency
                .iter()
                .map(|(k, n, ms)| format!("{k} {ms:.0} ms ({n:.0})"))
                .collect::<Vec<_>>()
                .join(", ")
        },
    );
    row("controller RSS at the end", &|p| {
        format!("{:.0} MiB", p.controller_rss_mib)
    });
    row("phase wall time", &|p| {
        format!("{:.1} s", p.wall.as_secs_f64())
    });
    if let Some((_, first)) = phases.first() {
        for (i, (name, _)) in first.cpu.iter().enumerate() {
            row(&format!("CPU % of one core: {name}"), &|p| {
                p.cpu
                    .get(i)
                    .map_or("-".into(), |(_, v)| format!("{v:.0} %"))
            });
        }
    }
    println!();

    let s = r.steady;
    let minutes = s.secs / 60.0;
    let per = |count: f64| count / n as f64 / minutes;
    let ctl_cpu = s
        .cpu
        .iter()
        .find(|(k, _)| k == "module-controller")
        .map_or(f64::NAN, |(_, v)| *v);
    println!(
        "steady state: {:.0} s window, opened {} s after the last phase ({} live pods, {} not Ready)",
        s.secs, a.settle_secs, s.live_pods, s.not_ready
    );
    println!();
    println!("| steady state | value |");
    println!("|---|---|");
    for (name, v) in &s.cpu {
        println!("| CPU % of one core: {name} | {v:.1} % |");
    }
    println!(
        "| controller RSS (peak over the run) | {:.1} MiB ({:.1} MiB) |",
        s.rss_mib, s.hwm_mib
    );
    for (k, n, ms) in &s.api_latency {
        println!("| apiserver mean latency: {k} ({n:.0}, all clients) | {ms:.1} ms |");
    }
    println!();
    println!(
        "| apiserver writes, all clients (apiserver_request_total) | count | per base per minute |"
    );
    println!("|---|---|---|");
    let mut writes: Vec<_> = s.api.iter().filter(|(v, _, _)| is_write(v)).collect();
    writes.sort_by(|x, y| y.2.total_cmp(&x.2));
    if writes.is_empty() {
        println!("| (none) | 0 | 0 |");
    }
    for (verb, res, count) in &writes {
        println!("| {verb} {res} | {count:.0} | {:.3} |", per(*count));
    }
    let reads = total(s.api.iter().filter(|(v, _, _)| !is_write(v)).map(|x| x.2));
    println!(
        "| (reads: GET/LIST/WATCH, all clients) | {reads:.0} | {:.3} |",
        per(reads)
    );
    println!();
    println!(
        "| controller's own writes and commands (its /metrics) | count | per base per minute |"
    );
    println!("|---|---|---|");
    if s.writes.is_empty() {
        println!("| writes | 0 | 0 |");
    }
    for (k, v) in &s.writes {
        println!("| write {k} | {v:.0} | {:.3} |", per(*v));
    }
    println!("| write errors | {:.0} | |", s.write_errors);
    for (k, v) in &s.commands {
        println!("| command {k} | {v:.0} | {:.3} |", per(*v));
    }
    for (k, v) in &s.dropped {
        println!(
            "| messages from bases dropped: {k} | {v:.0} | {:.3} |",
            per(*v)
        );
    }
    println!();

    let w = |k: &str| s.writes.get(k).copied().unwrap_or(0.0);
    let api_count = |verb_ok: &dyn Fn(&str) -> bool, res: &str| -> f64 {
        total(
            s.api
                .iter()
                .filter(|(v, r, _)| verb_ok(v) && r == res)
                .map(|x| x.2),
        )
    };
    let node_patches = api_count(&|v| v == "PATCH" || v == "APPLY" || v == "PUT", "nodes");
    let pod_writes = total(
        s.api
            .iter()
            .filter(|(v, r, _)| is_write(v) && (r == "pods" || r.starts_with("pods/")))
            .map(|x| x.2),
    );
    let node_status = api_count(&|v| is_write(v), "nodes/status");
    let worst = |p: &Phase, f: fn(&Phase) -> &Stats| f(p).p99;
    let big = r.create;
    println!("| target (issue 12) | measured | verdict |");
    println!("|---|---|---|");
    let mut phases_p99 = vec![("create", big)];
    if let Some(p) = r.rollout {
        phases_p99.push(("rolling update", p));
    }
    for (name, p) in &phases_p99 {
        let b2r = worst(p, |p| &p.bound_to_ready);
        let b2i = worst(p, |p| &p.bound_to_install);
        println!(
            "| {name}: bound → Ready p99 ≤ 250 ms | {b2r} ms | {} |",
            verdict(p.bound_to_ready.n > 0 && b2r <= 250)
        );
        println!(
            "| {name}: install command p99 ≤ 50 ms after binding | {b2i} ms | {} |",
            verdict(p.bound_to_install.n > 0 && b2i <= 50)
        );
    }
    println!(
        "| steady: zero Node object patches | {node_patches:.0} (controller: {:.0}) | {} |",
        w("node"),
        verdict(node_patches == 0.0)
    );
    println!(
        "| steady: zero pod writes | {pod_writes:.0} (controller: {:.0}) | {} |",
        w("pod_status") + w("pod_delete"),
        verdict(pod_writes == 0.0)
    );
    println!(
        "| steady: node status only on change (≤ 1 per base per few minutes) | {node_status:.0} = {:.3} per base per minute (controller: {:.0}) | {} |",
        per(node_status),
        w("node_status"),
        verdict(per(node_status) <= 1.0 / 3.0)
    );
    println!(
        "| steady: controller CPU ≤ 10 % of one core | {ctl_cpu:.1} % | {} |",
        verdict(ctl_cpu <= 10.0)
    );
    println!(
        "| steady: controller RSS ≤ 150 MiB | {:.1} MiB | {} |",
        s.rss_mib,
        verdict(s.rss_mib <= 150.0)
    );
    if r.watch_errors > 0 {
        println!();
        println!(
            "note: the bench's pod watch failed {} times and re-listed; stamps after a re-list can be late",
            r.watch_errors
        );
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();
    anyhow::ensure!(
        args.bases > 0 && args.modules > 0,
        "--bases and --modules must be > 0"
    );
    let machine = machine();
    let controller_bin = controller_binary(&args)?;
    let (n, m) = (args.bases, args.modules);
    eprintln!(
        "scale-bench: {n} bases × {m} modules; load average {}",
        machine.load
    );

    let qps = args.kube_api_qps;
    let rate = vec![
        format!("--kube-api-qps={qps}"),
        format!("--kube-api-burst={}", qps * 2),
    ];
    let opts = ControlPlaneOptions {
        // Leases are renewed every 10 s as by kubelets: keep kcm's defaults (40 s, 5 min).
        node_monitor_grace_period: Duration::from_secs(40),
        pod_eviction_timeout: Duration::from_secs(300),
        extra_controller_manager_args: rate.clone(),
        extra_scheduler_args: rate,
        ..ControlPlaneOptions::default()
    };
    let cp = ControlPlane::start(opts)
        .await
        .context("control plane (run scripts/provision.sh)")?;
    let client = cp.client().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;

    let broker = match args.tunnel {
        Tunnel::Mqtt => Some(Mosquitto::start().await?),
        Tunnel::Http => None,
    };
    let metrics_addr = format!("127.0.0.1:{}", free_port()?);
    let http_port = free_port()?;
    let mut command = Command::new(&controller_bin);
    command
        .env_remove("RUST_LOG")
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("ENV", ENV)
        .env("CLIENT_ID", "scale-bench")
        .env("HEARTBEAT_PERIOD_SECS", args.heartbeat_secs.to_string())
        .env("METRICS_ADDR", &metrics_addr)
        .env("LOG_FORMAT", "json");
    match &broker {
        Some(b) => {
            command
                .env("ENABLE_MQTT_TUNNEL", "true")
                .env("MQTT_BROKER", b.host())
                .env("MQTT_PORT", b.port().to_string())
                .env("ENABLE_HTTP_TUNNEL", "false");
        }
        None => {
            command
                .env("ENABLE_MQTT_TUNNEL", "false")
                .env("ENABLE_HTTP_TUNNEL", "true")
                .env("HTTP_TUNNEL_LISTEN_PORT", http_port.to_string());
        }
    }
    for kv in &args.controller_env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--controller-env {kv}: not KEY=VALUE"))?;
        command.env(k, v);
    }
    let log_path = cp.log_dir().join("module-controller.log");
    let mut controller = ManagedProcess::spawn("module-controller", command, &log_path)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    wait_controller_ready(&mut controller, &http, &metrics_addr).await?;
    eprintln!(
        "controller pid {} ready; log {}",
        controller.pid(),
        log_path.display()
    );

    let book = Arc::new(Mutex::new(Book::default()));
    let stop = CancellationToken::new();
    let watch_thread = spawn_pod_watch(cp.kube_config(), book.clone(), stop.clone())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !book.lock().unwrap_or_else(|p| p.into_inner()).synced {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the pod watch did not sync in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut template = BaseConfig::new(BASE_PREFIX);
    template.env = ENV.into();
    template.name = BASE_NAME.into();
    template.heartbeat_interval = Duration::from_secs(args.heartbeat_secs);
    template.install_time = Duration::from_millis(args.install_latency_ms);
    let transport = match &broker {
        Some(b) => Transport::Mqtt {
            host: b.host().into(),
            port: b.port(),
        },
        None => Transport::Http {
            controller_url: format!("http://127.0.0.1:{http_port}"),
            listen_port: 0,
        },
    };
    let t_bases = Instant::now();
    let fleet = Fleet::start(n, template, transport).await?;
    let bases_connected = t_bases.elapsed();
    eprintln!(
        "{n} bases connected in {:.1} s",
        bases_connected.as_secs_f64()
    );
    wait_vnodes(&client, n, Duration::from_secs(args.phase_timeout_secs)).await?;
    let vnodes_ready = t_bases.elapsed();
    eprintln!("{n} VNodes Ready after {:.1} s", vnodes_ready.as_secs_f64());

    let node_base: HashMap<String, String> = fleet
        .bases()
        .iter()
        .map(|b| {
            (
                format!("vnode.{}.{ENV}", b.identity()),
                b.identity().to_string(),
            )
        })
        .collect();
    let mut list = vec![("module-controller".to_string(), controller.pid())];
    list.extend(cp.pids());
    if let Some(pid) = broker.as_ref().and_then(Mosquitto::pid) {
        list.push(("mosquitto".into(), pid));
    }
    list.push(("scale-bench (bases, watch)".into(), std::process::id()));
    let bench = Bench {
        args,
        client: client.clone(),
        book: book.clone(),
        fleet,
        node_base,
        procs: Procs { list },
        http,
        metrics_addr,
        controller_pid: controller.pid(),
    };

    eprintln!("creating {m} Deployments of {n} replicas");
    let create = bench.create().await?;
    eprintln!(
        "created: all Ready after {}; bound → Ready {}",
        secs(create.all_ready),
        create.bound_to_ready
    );
    let rollout = if bench.args.no_rollout {
        None
    } else {
        eprintln!("rolling every Deployment to {V2}");
        let p = bench.rollout().await?;
        eprintln!(
            "rolled: all new Ready after {}; bound → Ready {}",
            secs(p.all_ready),
            p.bound_to_ready
        );
        Some(p)
    };
    let steady = bench.steady().await?;
    let watch_errors = bench.book().errors;
    print_report(&Report {
        args: &bench.args,
        machine: &machine,
        bases_connected,
        vnodes_ready,
        create: &create,
        rollout: rollout.as_ref(),
        steady: &steady,
        watch_errors,
    });

    // Stop the controller first, so that the bases' disappearance costs nothing measurable.
    controller.stop();
    stop.cancel();
    let _ = watch_thread.join();
    bench.fleet.stop().await;
    drop(broker);
    drop(cp);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let s = stats((1..=100).collect());
        assert_eq!((s.min, s.p50, s.p99, s.max), (1, 50, 99, 100));
        let s = stats(vec![7]);
        assert_eq!((s.p50, s.p99), (7, 7));
        assert_eq!(stats(Vec::new()).n, 0);
    }

    #[test]
    fn prometheus_lines_parse_with_labels() {
        let text = "# HELP x\n\
            apiserver_request_total{code=\"200\",resource=\"leases\",subresource=\"\",verb=\"PUT\"} 12\n\
            apiserver_request_total{code=\"201\",resource=\"nodes\",subresource=\"status\",verb=\"PATCH\"} 3\n\
            module_controller_apiserver_writes_total{kind=\"lease\",result=\"ok\"} 5\n";
        let rows = parse_prom(text, "apiserver_request_total");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].1.get("verb").map(String::as_str), Some("PUT"));
        assert_eq!(rows[0].1.get("subresource").map(String::as_str), Some(""));
        assert_eq!(rows[1].2, 3.0);
        let rows = parse_prom(text, "module_controller_");
        assert_eq!(rows[0].1.get("kind").map(String::as_str), Some("lease"));
    }

    #[test]
    fn write_latency_is_the_mean_between_snapshots() {
        let key = ("PATCH".to_owned(), "pods/status".to_owned());
        let snap = |secs: f64, n: f64| ApiSnap {
            requests: ApiCounts::new(),
            seconds: [(key.clone(), secs)].into_iter().collect(),
            timed: [(key.clone(), n)].into_iter().collect(),
        };
        let l = write_latencies(&snap(1.0, 10.0), &snap(3.0, 30.0));
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].0, "PATCH pods/status");
        assert_eq!(l[0].1, 20.0);
        assert!((l[0].2 - 100.0).abs() < 1e-9);
        assert!(write_latencies(&snap(1.0, 10.0), &snap(1.0, 10.0)).is_empty());
        assert_eq!(total(std::iter::empty()).to_string(), "0");
    }

    #[test]
    fn cpu_ticks_of_this_process_are_readable() {
        assert!(cpu_ticks(std::process::id()).is_some());
        assert!(status_mib(std::process::id(), "VmRSS:").is_some_and(|v| v > 0.0));
    }

    #[test]
    fn deployments_take_integer_or_percent_surge() {
        let d = deployment(0, V1, 3, "1").expect("deployment");
        let s = serde_json::to_value(&d).expect("json");
        assert_eq!(s["spec"]["strategy"]["rollingUpdate"]["maxSurge"], json!(1));
        let d = deployment(0, V1, 3, "25%").expect("deployment");
        let s = serde_json::to_value(&d).expect("json");
        assert_eq!(
            s["spec"]["strategy"]["rollingUpdate"]["maxSurge"],
            json!("25%")
        );
    }
}
