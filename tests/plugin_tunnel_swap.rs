//! Swapping the tunnel adapter while simulated bases of its protocol are connected, against a
//! real mosquitto and the controller's MQTT tunnel: no dropped base, no lost command, no
//! broker reconnect.

mod plugin_support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use module_controller::model::{BaseCommand, BaseEvent, ModuleSpec, TunnelEvent};
use module_controller::plugin::{PluginHost, reasons};
use module_controller::tunnel::arklet_codec::ArkletCodec;
use module_controller::tunnel::mqtt::{MqttSettings, MqttTunnel};
use module_controller::tunnel::{Tunnel, TunnelMetrics};
use plugin_support::agent::SimpleAgent;
use plugin_support::{PluginDir, drain, plugin_bytes, with_custom_section};
use serde_json::json;
use testkit::localenv::broker::Mosquitto;
use tokio::sync::mpsc;

const BASES: [&str; 3] = ["node-a", "node-b", "node-c"];
const HEARTBEAT: Duration = Duration::from_millis(100);
/// A base counts as dropped when the controller hears nothing from it for this long.
const MAX_SILENCE: Duration = Duration::from_millis(1500);

#[derive(Default)]
struct Seen {
    first: HashMap<String, Instant>,
    last: HashMap<String, Instant>,
    max_gap: HashMap<String, Duration>,
    installs_ok: HashMap<String, Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapter_swap_keeps_bases_and_commands() {
    let dist = plugin_support::dist();
    let broker = Mosquitto::start().await.expect("mosquitto starts");
    let adapter = plugin_bytes(dist, "simple-agent-adapter");
    let d = PluginDir::new();
    d.write("adapter.wasm", &adapter);
    d.manifest(&json!({
        "plugins": {"simple": {"file": "adapter.wasm", "config": {"prefix": "simple-agent"}}},
        "tunnelAdapters": ["simple"]
    }));
    // This test is about swapping adapters, not CPU budgets (plugin_limits covers those): a
    // generous budget keeps a starved machine from failing it.
    let mut config = d.config();
    config.call_budget = Duration::from_millis(500);
    let host = PluginHost::start(config).await.expect("host starts");
    let mut faults = host.faults();
    assert_eq!(host.codecs().borrow().len(), 1);

    let (tx, mut rx) = mpsc::channel::<BaseEvent>(10_000);
    let settings = MqttSettings {
        host: broker.host().to_string(),
        port: broker.port(),
        client_id: format!("mc-plugin-swap-{}", std::process::id()),
        username: None,
        password: None,
        ca_path: None,
        client_cert_path: None,
        client_key_path: None,
        keep_alive: Duration::from_secs(5),
        insecure_skip_verify: false,
    };
    let mqtt_metrics = TunnelMetrics::default();
    let tunnel = Arc::new(
        MqttTunnel::start(
            &settings,
            Arc::new(ArkletCodec::new("test")),
            host.codecs(),
            tx,
            mqtt_metrics.clone(),
            Some(std::sync::Arc::new(host.pool().clone()) as module_controller::offload::Pool),
        )
        .expect("tunnel starts"),
    );

    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    let collector = tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let now = Instant::now();
            let mut s = s.lock().expect("seen lock");
            if let Some(prev) = s.last.insert(ev.base_id.clone(), now) {
                let gap = now.duration_since(prev);
                let g = s.max_gap.entry(ev.base_id.clone()).or_default();
                *g = (*g).max(gap);
            }
            s.first.entry(ev.base_id.clone()).or_insert(now);
            if let TunnelEvent::Operation(op) = &ev.event
                && op.outcome == module_controller::model::Outcome::Succeeded
            {
                s.installs_ok
                    .entry(ev.base_id.clone())
                    .or_default()
                    .push(op.version.clone());
            }
        }
    });

    // Let the tunnel subscribe before the agents say hello.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut agents = Vec::new();
    for b in BASES {
        agents.push(
            SimpleAgent::start(broker.host(), broker.port(), "simple-agent", b, HEARTBEAT).await,
        );
    }
    let all_seen = async {
        loop {
            if BASES
                .iter()
                .all(|b| seen.lock().expect("seen lock").first.contains_key(*b))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), all_seen)
        .await
        .expect("every base seen through the adapter");
    for b in BASES {
        assert_eq!(
            tunnel.label_for(b),
            "simple",
            "{b} is spoken to through the adapter"
        );
    }
    let reconnects_before = mqtt_metrics.reconnects.get();

    // Commands flow continuously while the adapter is swapped.
    let sent: Arc<Mutex<BTreeMap<String, Vec<String>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (t, st, sn) = (tunnel.clone(), stop.clone(), sent.clone());
    let sender = tokio::spawn(async move {
        let mut k = 0u32;
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            for b in BASES {
                // One module upgraded again and again: each command is told apart by its version.
                let version = format!("1.0.{k}");
                let cmd = BaseCommand::Install(ModuleSpec {
                    name: "svc".into(),
                    version: version.clone(),
                    url: format!("http://repo/svc-{version}.jar"),
                });
                t.send(b, &cmd).await.expect("command handed to the tunnel");
                sn.lock()
                    .expect("sent lock")
                    .entry(b.to_string())
                    .or_default()
                    .push(version);
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    });

    let mut hashes = vec![host.status()[0].content_hash.clone()];
    for round in 1..=6 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        if round == 3 {
            // A broken adapter version: refused, the old one keeps serving.
            d.write("adapter.wasm", &adapter[..adapter.len() / 3]);
            let f = wait_fault(&mut faults).await;
            assert_eq!(f.reason, reasons::LOAD_FAILED);
            continue;
        }
        let version =
            with_custom_section(&adapter, "swap-test", format!("round {round}").as_bytes());
        d.write("adapter.wasm", &version);
        let mut codecs = host.codecs();
        tokio::time::timeout(Duration::from_secs(2), codecs.changed())
            .await
            .expect("adapter swapped within 2 s")
            .expect("codec channel open");
        let h = host.status()[0].content_hash.clone();
        assert!(!hashes.contains(&h), "round {round}: a new version serves");
        hashes.push(h);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sender.await.expect("sender task");

    // Every command reaches its agent, in order, and every install result comes back.
    let sent = sent.lock().expect("sent lock").clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let complete = agents.iter().all(|a| {
            let got: Vec<String> = a
                .commands()
                .iter()
                .filter(|c| c["op"] == "install")
                .filter_map(|c| c["version"].as_str().map(str::to_string))
                .collect();
            let ok = seen
                .lock()
                .expect("seen lock")
                .installs_ok
                .get(&a.node)
                .cloned()
                .unwrap_or_default();
            got == sent[&a.node] && ok == sent[&a.node]
        });
        if complete {
            break;
        }
        if Instant::now() > deadline {
            for a in &agents {
                let got = a.commands().iter().filter(|c| c["op"] == "install").count();
                let ok = seen
                    .lock()
                    .expect("seen lock")
                    .installs_ok
                    .get(&a.node)
                    .map_or(0, Vec::len);
                let names: Vec<String> = a
                    .commands()
                    .iter()
                    .filter_map(|c| c["version"].as_str().map(str::to_string))
                    .collect();
                let missing: Vec<&String> = sent[&a.node]
                    .iter()
                    .filter(|n| !names.contains(n))
                    .collect();
                eprintln!(
                    "{}: sent {} received {got} results {ok}; missing {missing:?}; agent errors {:?}",
                    a.node,
                    sent[&a.node].len(),
                    a.connection_errors().first()
                );
            }
            panic!("commands or results lost across adapter swaps");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total: usize = sent.values().map(Vec::len).sum();
    assert!(total > 100, "enough commands crossed the swaps: {total}");

    {
        let s = seen.lock().expect("seen lock");
        for b in BASES {
            let gap = s.max_gap.get(b).copied().unwrap_or_default();
            assert!(
                gap < MAX_SILENCE,
                "{b} went silent for {gap:?} during the swaps"
            );
            assert!(s.last[b].elapsed() < MAX_SILENCE, "{b} is no longer heard");
        }
    }
    assert_eq!(
        mqtt_metrics.reconnects.get(),
        reconnects_before,
        "the broker connection must not drop"
    );
    assert_eq!(
        hashes.len(),
        6,
        "five good versions swapped in after the first"
    );

    tunnel.stop().await;
    for a in agents {
        a.stop().await;
    }
    collector.abort();
    drop(broker);
}

async fn wait_fault(
    faults: &mut tokio::sync::broadcast::Receiver<module_controller::plugin::PluginFault>,
) -> module_controller::plugin::PluginFault {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Some(f) = drain(faults).into_iter().next() {
            return f;
        }
        assert!(Instant::now() < deadline, "no fault for the broken adapter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
