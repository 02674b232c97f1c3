//! Fault: churn. Many bases (MQTT, and some HTTP) join, become VNodes and leave; the
//! controller's per-base state must return to its starting size: the `bases` gauge, the
//! tunnels' tracked-bases gauges, the tasks of its runtime, its connections, and no VNode or
//! Lease left behind.
//!
//! The controller is the real binary in a process of its own, so that its tasks, connections
//! and memory are its own (the Arklet doubles live in the test process). A task count that
//! stays above its start after the bases left is either a leak or a connection someone keeps
//! open; the check tells them apart by counting the process's connections: tasks that drive
//! no connection must be back to their start, connections to the apiserver stay within the
//! controller's concurrency (kube's connection pool keeps idle ones forever, as many as
//! requests were once in flight at once, not one per base), and the controller keeps no
//! connection of a base that the base itself let go. Every goodbye must end as a drain, every
//! silent base as an expiry (`module_controller_base_actor_exits_total` by reason).
//!
//! `FAULT_CHURN_BASES` sets how many MQTT bases (plus one HTTP base per 20). The default is
//! the 1,000: about 75 s on a 2-core machine (debug build), and the load that found
//! the bug this test exists for (a base task that judged liveness before reading its inbox:
//! under apiserver backlog, live bases expired and half the goodbyes were lost; 200 bases did
//! not show it). A quicker run: `FAULT_CHURN_BASES=200 cargo test --test fault_churn --
//! --nocapture` (about 50 s). Heartbeats every 5 s: 1 s would mean a Lease renewal per base
//! per second, more than a 2-core machine's apiserver writes.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use arklet_double::{Fleet, Transport};
use common::faults::sample_of;
use common::process::{self, Connection, ControllerProcess};
use common::{PrivateControlPlane, TestEnv, eventually};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ListParams};
use testkit::localenv::control_plane::ControlPlaneOptions;
use testkit::localenv::ports::free_port;

/// Bases that leave without a goodbye (control: their state stays until the VNode TTL).
const ABRUPT: usize = 10;
const HEARTBEAT: Duration = Duration::from_secs(5);
const VNODE_TTL: Duration = Duration::from_secs(30);
/// What kube's connection pool may keep beyond its start: it never closes an idle connection
/// (kube builds hyper's pool without a timer), so it keeps as many as requests were ever in
/// flight at once: Node and Lease writes (48, `src/apiserver`), module writes (64, across all
/// VNodes), the apiserver probe, and a few more when a request starts while a finished one's
/// connection is still on its way back to the pool. Bounded by the controller's concurrency,
/// not by its bases: a leak of one per base would be a thousand.
const APISERVER_POOL: usize = 48 + 64 + 1 + 7;

fn bases_wanted() -> usize {
    std::env::var("FAULT_CHURN_BASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// The controller's per-base state, as its `/metrics` and the kernel see it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Size {
    bases: i64,
    mqtt_tracked: i64,
    http_tracked: i64,
    /// Alive tasks of the controller's runtime.
    tasks: i64,
    /// The process's established TCP connections, by peer.
    conns: BTreeMap<&'static str, usize>,
}

impl Size {
    /// Connections but the metrics scrape's own (which may or may not be closed yet when the
    /// kernel is asked; its task is counted at every scrape alike).
    fn conns_total(&self) -> i64 {
        self.conns
            .iter()
            .filter(|(peer, _)| **peer != "metrics scrape")
            .map(|(_, n)| *n as i64)
            .sum()
    }
    fn conn(&self, peer: &str) -> usize {
        self.conns.get(peer).copied().unwrap_or(0)
    }
    /// Tasks that drive no connection (hyper runs each connection in a task of its own).
    fn other_tasks(&self) -> i64 {
        self.tasks - self.conns_total()
    }
}

struct Ports {
    apiserver: u16,
    broker: u16,
    tunnel: u16,
    metrics: u16,
}

fn classify(c: &Connection, p: &Ports) -> &'static str {
    if c.remote == p.apiserver {
        "apiserver"
    } else if c.remote == p.broker {
        "broker"
    } else if c.local == p.tunnel {
        "from bases (HTTP tunnel)"
    } else if c.local == p.metrics {
        "metrics scrape"
    } else {
        "to bases (Arklet API)"
    }
}

async fn size(ctl: &ControllerProcess, p: &Ports) -> Size {
    let text = ctl.metrics().await;
    let mut conns = BTreeMap::new();
    for c in ctl.connections() {
        *conns.entry(classify(&c, p)).or_default() += 1;
    }
    Size {
        bases: sample_of(&text, "module_controller_bases") as i64,
        mqtt_tracked: sample_of(&text, "module_controller_mqtt_tracked_bases") as i64,
        http_tracked: sample_of(&text, "module_controller_http_tracked_bases") as i64,
        tasks: sample_of(&text, "module_controller_runtime_alive_tasks") as i64,
        conns,
    }
}

/// Connections the bases (this process) hold open to the controller's HTTP tunnel.
fn held_by_bases(tunnel: u16) -> usize {
    process::connections("self")
        .iter()
        .filter(|c| c.remote == tunnel)
        .count()
}

async fn vnode_names(env: &TestEnv) -> BTreeSet<String> {
    env.nodes()
        .list_metadata(
            &ListParams::default()
                .labels(&format!("virtual-kubelet.koupleless.io/env={}", env.env)),
        )
        .await
        .expect("list nodes")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect()
}

async fn count_leases(env: &TestEnv) -> usize {
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "kube-node-lease");
    let suffix = format!(".{}", env.env);
    leases
        .list_metadata(&ListParams::default())
        .await
        .expect("list leases")
        .items
        .into_iter()
        .filter(|l| {
            l.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("vnode.") && n.ends_with(&suffix))
        })
        .count()
}

/// Base tasks that ended for `reason` (`drained`, `expired`).
async fn exits(ctl: &ControllerProcess, reason: &str) -> u64 {
    sample_of(
        &ctl.metrics().await,
        &format!("module_controller_base_actor_exits_total{{reason=\"{reason}\"}}"),
    ) as u64
}

async fn bases_gauge(ctl: &ControllerProcess) -> i64 {
    sample_of(&ctl.metrics().await, "module_controller_bases") as i64
}

fn url_port(url: &str) -> u16 {
    url.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .expect("apiserver URL with a port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_many_bases_returns_per_base_state_to_its_starting_size() {
    let n = bases_wanted();
    assert!(n > ABRUPT, "FAULT_CHURN_BASES must exceed {ABRUPT}");
    let budget = Duration::from_secs(60 + n as u64 / 4);
    let test_started = Instant::now();
    // A private control plane: a thousand Nodes and Leases are nobody else's business, and the
    // node lifecycle controller gets a grace period that tolerates Lease renewals lagging under
    // this load (it would only add taints).
    let pcp = PrivateControlPlane::start(ControlPlaneOptions {
        node_monitor_grace_period: Duration::from_secs(60),
        ..Default::default()
    })
    .await;
    let env = TestEnv::new_on("churn", pcp.get()).await;
    let tunnel = free_port().expect("free port");
    let mut vars: Vec<(String, String)> = ControllerProcess::vars(&env)
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "HEARTBEAT_PERIOD_SECS" | "RESYNC_SECS"))
        .collect();
    for (k, v) in [
        ("HEARTBEAT_PERIOD_SECS", "5".to_string()),
        ("RESYNC_SECS", "30".into()),
        ("VNODE_TTL_SECS", VNODE_TTL.as_secs().to_string()),
        ("ENABLE_HTTP_TUNNEL", "true".into()),
        ("HTTP_TUNNEL_LISTEN_PORT", tunnel.to_string()),
    ] {
        vars.push((k.to_string(), v));
    }
    let ctl = ControllerProcess::start(vars).await;
    let ports = Ports {
        apiserver: url_port(env.cp.api_url()),
        broker: env.broker.port(),
        tunnel,
        metrics: ctl.metrics_addr.port(),
    };
    let http = Transport::Http {
        controller_url: format!("http://127.0.0.1:{tunnel}"),
        listen_port: 0,
    };

    // Warm-up: one base of each tunnel joins and leaves, so that what the first base of a
    // tunnel sets up once (e.g. the idle-connection reaper of the HTTP client to bases) is
    // part of the starting size.
    let mut cfg = env.base_config("warm");
    cfg.heartbeat_interval = HEARTBEAT;
    let warm = [
        env.mqtt_base_with(cfg.clone()).await,
        arklet_double::Base::start(
            {
                let mut c = cfg.clone();
                c.identity = "warmh".into();
                c
            },
            http.clone(),
        )
        .await
        .expect("HTTP base"),
    ];
    eventually(budget, "warm-up bases' VNodes", || async {
        (vnode_names(&env).await.len() == 2).then_some(())
    })
    .await;
    for b in &warm {
        b.shutdown_graceful().await;
    }
    eventually(budget, "warm-up bases gone", || async {
        (bases_gauge(&ctl).await == 0 && vnode_names(&env).await.is_empty()).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = size(&ctl, &ports).await;
    let rss0 = ctl.rss_kib();
    eprintln!("start: {start:?}, controller RSS {rss0} KiB");

    // ---- Join.
    let t = Instant::now();
    let mut template = env.base_config("churn");
    template.heartbeat_interval = HEARTBEAT;
    let fleet = Fleet::start(n, template, env.mqtt_transport())
        .await
        .expect("fleet starts");
    // A few HTTP bases too: the MQTT tunnel keeps per-base state only for bases bound to a
    // plugin adapter (none here), the HTTP tunnel for every base (its endpoint).
    let h = (n / 20).max(5);
    let mut template = env.base_config("churnh");
    template.heartbeat_interval = HEARTBEAT;
    let http_fleet = Fleet::start(h, template, http.clone())
        .await
        .expect("HTTP fleet starts");
    let total = n + h;
    let connected = t.elapsed();
    eventually(budget, &format!("{total} base tasks"), || async {
        (bases_gauge(&ctl).await == start.bases + total as i64).then_some(())
    })
    .await;
    eventually(budget, &format!("{total} VNodes"), || async {
        (vnode_names(&env).await.len() == total).then_some(())
    })
    .await;
    let joined = t.elapsed();
    let peak = size(&ctl, &ports).await;
    let rss1 = ctl.rss_kib();
    eprintln!(
        "{n} MQTT and {h} HTTP bases connected in {:.1} s, all VNodes in {:.1} s; peak: {peak:?}, controller RSS {rss1} KiB",
        connected.as_secs_f64(),
        joined.as_secs_f64(),
    );
    // Control: the measures see per-base state (one task per base at least).
    assert_eq!(peak.bases, start.bases + total as i64);
    assert_eq!(peak.http_tracked, start.http_tracked + h as i64);
    assert!(
        peak.other_tasks() >= start.other_tasks() + total as i64,
        "the task count sees the base tasks: {peak:?} vs {start:?}"
    );

    // ---- Leave: all but a few gracefully (deactivated heartbeat → drained); the others keep
    // heartbeating meanwhile (a live base must not expire behind the drains' writes), then
    // stop without a goodbye.
    let t = Instant::now();
    let exits0 = (exits(&ctl, "drained").await, exits(&ctl, "expired").await);
    let (graceful, abrupt) = fleet.bases().split_at(n - ABRUPT);
    let abrupt_nodes: BTreeSet<String> =
        abrupt.iter().map(|b| env.node_name(b.identity())).collect();
    let mut set = tokio::task::JoinSet::new();
    for b in graceful.iter().chain(http_fleet.bases()) {
        let b = b.clone();
        set.spawn(async move { b.shutdown_graceful().await });
    }
    while set.join_next().await.is_some() {}
    // Every goodbye is a drain, and exactly the silent ones are left: a goodbye that was lost
    // would go only at the TTL, as an expiry.
    let drained = loop {
        let names = vnode_names(&env).await;
        let (d, x) = (exits(&ctl, "drained").await, exits(&ctl, "expired").await);
        if d - exits0.0 == (total - ABRUPT) as u64 && names == abrupt_nodes {
            break t.elapsed();
        }
        if t.elapsed() > budget || x > exits0.1 {
            let stayed: Vec<&String> = names.difference(&abrupt_nodes).collect();
            let log: Vec<String> = stayed
                .iter()
                .take(3)
                .flat_map(|node| ctl.log_lines(node.as_str()))
                .collect();
            panic!(
                "after {:?}: {} of {} goodbyes drained, {} bases expired; VNodes left beside the silent ones: {stayed:?}; controller log about the first:\n{}",
                t.elapsed(),
                d - exits0.0,
                total - ABRUPT,
                x - exits0.1,
                log.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for b in abrupt {
        b.stop().await;
    }
    // Control: bases gone without a goodbye keep their state until the VNode TTL: the gauges
    // tell retained state from released state.
    let retained = size(&ctl, &ports).await;
    eprintln!(
        "{} bases drained in {:.1} s; {ABRUPT} silent ones retained: {retained:?}",
        total - ABRUPT,
        drained.as_secs_f64()
    );
    assert_eq!(retained.bases, start.bases + ABRUPT as i64);
    assert!(
        retained.other_tasks() >= start.other_tasks() + ABRUPT as i64,
        "{retained:?} vs {start:?}"
    );
    let silent = Instant::now();
    eventually(
        VNODE_TTL + Duration::from_secs(60),
        "silent bases expired after the VNode TTL",
        || async {
            (bases_gauge(&ctl).await == start.bases && vnode_names(&env).await.is_empty())
                .then_some(())
        },
    )
    .await;
    let expired = silent.elapsed();
    assert_eq!(
        (
            exits(&ctl, "drained").await - exits0.0,
            exits(&ctl, "expired").await - exits0.1
        ),
        ((total - ABRUPT) as u64, ABRUPT as u64),
        "base tasks ended as (drained, expired)"
    );

    // ---- Back to the starting size. Base tasks end as their bases go; what they spawned
    // (commands in flight, connections to bases) ends with them or within a few seconds.
    drop(fleet);
    drop(http_fleet);
    let verdict = |now: &Size, peers: usize| -> Vec<String> {
        let mut bad = Vec::new();
        if (now.bases, now.mqtt_tracked, now.http_tracked)
            != (start.bases, start.mqtt_tracked, start.http_tracked)
        {
            bad.push("base gauges".to_string());
        }
        if now.other_tasks() > start.other_tasks() {
            bad.push(format!(
                "{} tasks beside connections, {} at the start",
                now.other_tasks(),
                start.other_tasks()
            ));
        }
        if now.conn("to bases (Arklet API)") > start.conn("to bases (Arklet API)") {
            bad.push("connections to departed bases".into());
        }
        if now.conn("from bases (HTTP tunnel)") > peers {
            bad.push(format!(
                "connections from bases that the bases closed ({peers} still open on their side)"
            ));
        }
        if now.conn("apiserver") > start.conn("apiserver") + APISERVER_POOL {
            bad.push("connections to the apiserver beyond the controller's concurrency".into());
        }
        bad
    };
    let t9 = Instant::now();
    let (end, peers, bad) = loop {
        let now = size(&ctl, &ports).await;
        let peers = held_by_bases(tunnel);
        let bad = verdict(&now, peers);
        if bad.is_empty() || t9.elapsed() > Duration::from_secs(20) {
            break (now, peers, bad);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let leases = count_leases(&env).await;
    let rss2 = ctl.rss_kib();
    eprintln!(
        "end, {:.1} s after the silent bases stopped: {end:?}; the bases keep {peers} connections to the HTTP tunnel open; Leases left {leases}; controller RSS {rss0} → {rss1} → {rss2} KiB; total {:.0} s",
        expired.as_secs_f64(),
        test_started.elapsed().as_secs_f64()
    );
    assert!(
        bad.is_empty(),
        "per-base state is not back to its starting size ({}): {end:?}, started at {start:?}, peak {peak:?}",
        bad.join("; ")
    );
    assert_eq!(leases, 0, "Leases of departed bases left behind");
}
