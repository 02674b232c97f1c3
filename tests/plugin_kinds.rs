//! Each plugin kind with the real compiled example plugins, the manifest bindings, the
//! sandbox refusals, the artefact cache and the CLI.

mod plugin_support;

use std::collections::BTreeMap;

use module_controller::model::{BaseCommand, BizState, ModuleSpec, TunnelEvent};
use module_controller::plugin::cli::{PluginCommand, run_to};
use module_controller::plugin::{PluginHost, PluginKind, reasons};
use module_controller::rollout::batch::{PendingInstall, RolloutView, decide_with};
use module_controller::rollout::ordering::{StatusChange, default_waves, order_with};
use plugin_support::{PluginDir, drain};
use serde_json::json;

/// Deterministic pseudo-random status changes.
fn changes(n: usize, seed: u64) -> Vec<StatusChange> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n as u32)
        .map(|i| StatusChange {
            pod_index: i,
            creation_ts: 1_700_000_000 + (next() % 50) as i64,
            revision: (next() % 3) as i64,
            from_ready: next() % 2 == 0,
            to_ready: next() % 2 == 0,
            deleting: next() % 7 == 0,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordering_plugin_decides_like_the_builtin() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "default-ordering", "ordering.wasm");
    d.manifest(&json!({"plugins": {"ord": {"file": "ordering.wasm"}}, "ordering": "ord"}));
    let host = PluginHost::start(d.config()).await.expect("host starts");
    let mut faults = host.faults();

    let rule = host.ordering_rule();
    assert_eq!(rule.name(), "ord");
    // As the controller calls it: on the host's pool.
    let (r, c) = (rule.clone(), changes(100, 7));
    let (waves, err) = host
        .pool()
        .run(move || order_with(r.as_ref(), &c))
        .await
        .expect("pool runs the call");
    assert!(err.is_none());
    assert_eq!(waves, default_waves(&changes(100, 7)));
    for (n, seed) in [(1, 1), (2, 2), (10, 3), (100, 4), (1000, 5)] {
        let c = changes(n, seed);
        let got = rule.order(&c).expect("plugin orders");
        assert_eq!(
            got,
            default_waves(&c),
            "plugin and built-in differ for {n} changes"
        );
        let (waves, err) = order_with(rule.as_ref(), &c);
        assert!(err.is_none());
        assert_eq!(waves, default_waves(&c));
    }
    assert!(
        drain(&mut faults).is_empty(),
        "no faults for a healthy plugin"
    );

    let status = host.status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].kind, PluginKind::StatusOrdering);
    assert_eq!(status[0].plugin_name, "default-ordering");
    assert_eq!(status[0].api_version, "1.0.0");
    assert_eq!(status[0].content_hash.len(), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_manifest_means_builtins() {
    let d = PluginDir::new();
    let host = PluginHost::start(d.config()).await.expect("host starts");
    assert_eq!(host.ordering_rule().name(), "builtin-default");
    assert_eq!(
        host.batch_policy_for(&BTreeMap::new()).name(),
        "builtin-admit-all"
    );
    assert!(host.codecs().borrow().is_empty());
    assert!(host.status().is_empty());
}

fn view(
    desired: u32,
    ready: u32,
    installing: u32,
    since_ready_ms: Option<u64>,
    approved: bool,
) -> RolloutView {
    let mut annotations = BTreeMap::new();
    annotations.insert(
        "module-controller.koupleless.io/batch-policy".to_string(),
        "canary".to_string(),
    );
    if approved {
        annotations.insert("example.com/go".to_string(), "yes".to_string());
    }
    RolloutView {
        owner: "shop/checkout".into(),
        module: "checkout".into(),
        new_version: "2.0.0".into(),
        old_version: Some("1.0.0".into()),
        desired,
        updated_ready: ready,
        updated_installing: installing,
        old_ready: desired - ready,
        elapsed_ms: 1_000,
        since_last_ready_ms: since_ready_ms,
        annotations,
    }
}

fn pending(n: usize) -> Vec<PendingInstall> {
    (0..n)
        .map(|i| PendingInstall {
            base_id: format!("base-{i}"),
            pod: format!("shop/checkout-{i}"),
            // Newest first, so "oldest pending" is the last index.
            creation_ts: 2_000 - i as i64,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_batch_policy_paces_a_rollout() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "canary-batch", "canary.wasm");
    d.manifest(&json!({
        "plugins": {"canary": {"file": "canary.wasm",
            "config": {"approvalAnnotation": "example.com/go", "approvalValue": "yes", "percent": 50, "soakSeconds": 20}}},
        "batch": {"selectable": ["canary"]}
    }));
    let host = PluginHost::start(d.config()).await.expect("host starts");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());

    // Not selected: the default (admit-all, no manifest default).
    let plain = host.batch_policy_for(&BTreeMap::new());
    assert_eq!(plain.name(), "builtin-admit-all");

    let v = view(4, 0, 0, None, false);
    let policy = host.batch_policy_for(&v.annotations);
    assert_eq!(policy.name(), "canary");

    // Batch 1: exactly one canary, the oldest pod.
    let (d1, err) = decide_with(policy.as_ref(), &v, &pending(4));
    assert!(err.is_none(), "{err:?}");
    assert_eq!(d1.admit, vec![3]);
    assert_eq!(
        d1.hold_reason.as_deref(),
        Some("waiting for the canary (batch 1 of 3)")
    );

    // Canary installing: hold everything.
    let (d2, _) = decide_with(policy.as_ref(), &view(4, 0, 1, None, false), &pending(3));
    assert!(d2.admit.is_empty());
    assert_eq!(
        d2.hold_reason.as_deref(),
        Some("batch 1 of 3 is installing")
    );

    // Canary Ready, no approval: hold with a reason naming the annotation.
    let (d3, _) = decide_with(
        policy.as_ref(),
        &view(4, 1, 0, Some(5_000), false),
        &pending(3),
    );
    assert!(d3.admit.is_empty());
    let reason = d3.hold_reason.unwrap_or_default();
    assert!(reason.starts_with("waiting for approval"), "{reason}");
    assert!(reason.contains("example.com/go=yes"), "{reason}");

    // Approved but soaking: "batch 2 of 3 opens in 15s".
    let (d4, _) = decide_with(
        policy.as_ref(),
        &view(4, 1, 0, Some(5_000), true),
        &pending(3),
    );
    assert!(d4.admit.is_empty());
    assert_eq!(d4.hold_reason.as_deref(), Some("batch 2 of 3 opens in 15s"));
    assert_eq!(d4.recheck_after_ms, Some(15_000));

    // Soaked: 50% of 4 = 2 installs, the oldest ones.
    let (d5, _) = decide_with(
        policy.as_ref(),
        &view(4, 1, 0, Some(25_000), true),
        &pending(3),
    );
    assert_eq!(d5.admit, vec![1, 2]);
    assert_eq!(d5.hold_reason.as_deref(), Some("waiting for batch 3 of 3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_policy_selection_by_annotation_and_default() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "canary-batch", "canary.wasm");
    d.manifest(&json!({
        "plugins": {"canary": {"file": "canary.wasm"}},
        "batch": {"default": "canary", "selectable": ["canary"], "annotation": "example.com/policy"}
    }));
    let host = PluginHost::start(d.config()).await.expect("host starts");
    let mut faults = host.faults();
    let ann = |v: &str| BTreeMap::from([("example.com/policy".to_string(), v.to_string())]);
    assert_eq!(host.batch_policy_for(&BTreeMap::new()).name(), "canary");
    assert_eq!(host.batch_policy_for(&ann("canary")).name(), "canary");
    assert_eq!(
        host.batch_policy_for(&ann("builtin")).name(),
        "builtin-admit-all"
    );
    // Unknown selection: the default decides and a fault says why.
    assert_eq!(host.batch_policy_for(&ann("nope")).name(), "canary");
    let f = drain(&mut faults);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].reason, reasons::NOT_FOUND);
    assert!(f[0].message.contains("nope"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnel_adapter_translates_both_ways() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "simple-agent-adapter", "agent.wasm");
    d.manifest(&json!({
        "plugins": {"simple": {"file": "agent.wasm", "config": {"prefix": "lab/agents"}}},
        "tunnelAdapters": ["simple"]
    }));
    let host = PluginHost::start(d.config()).await.expect("host starts");
    let codecs = host.codecs();
    let set = codecs.borrow().clone();
    assert_eq!(set.len(), 1);
    let codec = &set[0];
    assert_eq!(codec.name(), "simple");
    assert!(
        codec
            .subscriptions()
            .contains(&"lab/agents/+/status".to_string())
    );
    assert!(codec.handles("lab/agents/n7/status"));
    assert!(!codec.handles("koupleless_dev/n7/base/heart"));

    let now = 1_700_000_000_000i64;
    let status = json!({"node": "n7", "ip": "10.0.0.7", "hostname": "h7", "app": "base", "version": "1.2",
        "cluster": "c", "ts": now - 10, "modules": [{"name": "m", "version": "1", "state": "activated"}]});
    let evs = codec
        .decode("lab/agents/n7/status", status.to_string().as_bytes(), now)
        .expect("status decodes");
    assert_eq!(evs.len(), 2);
    assert!(evs.iter().all(|e| e.base_id == "n7"));
    match (&evs[0].event, &evs[1].event) {
        (TunnelEvent::Heartbeat(hb), TunnelEvent::ModuleList(ms)) => {
            assert_eq!(hb.local_ip, "10.0.0.7");
            assert_eq!(hb.metadata.name, "base");
            assert_eq!(ms[0].state, BizState::Activated);
        }
        other => panic!("unexpected events {other:?}"),
    }
    let stale = codec.decode(
        "lab/agents/n7/status",
        status.to_string().as_bytes(),
        now + 120_000,
    );
    assert!(
        matches!(
            stale,
            Err(module_controller::tunnel::codec::DecodeError::Stale { .. })
        ),
        "{stale:?}"
    );
    let bad = codec.decode("lab/agents/n7/status", b"{not json", now);
    assert!(
        matches!(
            bad,
            Err(module_controller::tunnel::codec::DecodeError::Malformed(_))
        ),
        "{bad:?}"
    );

    let out = codec
        .encode(
            "n7",
            &BaseCommand::Install(ModuleSpec {
                name: "m".into(),
                version: "2".into(),
                url: "http://repo/m-2.jar".into(),
            }),
        )
        .expect("install encodes");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].topic, "lab/agents/n7/cmd");
    let payload: serde_json::Value = serde_json::from_slice(&out[0].payload).expect("json command");
    assert_eq!(
        payload,
        json!({"op": "install", "name": "m", "version": "2", "url": "http://repo/m-2.jar"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_and_api_version_refusals_are_clear() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "fixture-imports-sockets", "sockets.wasm");
    d.install(dist, "fixture-old-api", "old.wasm");
    d.install(dist, "canary-batch", "canary.wasm");
    d.install(dist, "default-ordering", "good.wasm");
    d.write("garbage.wasm", b"\0asm not really");
    d.manifest(&json!({
        "plugins": {
            "good": {"file": "good.wasm"},
            "sockets": {"file": "sockets.wasm"},
            "old": {"file": "old.wasm"},
            "wrong-kind": {"file": "canary.wasm"},
            "garbage": {"file": "garbage.wasm"},
            "missing": {"file": "missing.wasm"},
            "bad-config": {"file": "canary.wasm", "config": {"percent": 0}}
        },
        "ordering": "wrong-kind"
    }));
    let host = PluginHost::start(d.config())
        .await
        .expect("host starts despite broken plugins");
    // Control: under the same sandbox policy, a plugin without a socket import and built for
    // the current API loads; only the offenders are refused.
    let loaded: Vec<String> = host.status().into_iter().map(|p| p.name).collect();
    assert_eq!(loaded, ["good"], "only the control may load");
    assert_eq!(host.ordering_rule().name(), "builtin-default");
    let errors: BTreeMap<String, String> = host
        .load_errors()
        .into_iter()
        .inspect(|f| assert_eq!(f.reason, reasons::LOAD_FAILED))
        .map(|f| (f.plugin, f.message))
        .collect();
    let msg = |k: &str| {
        errors
            .get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no load error for {k}: {errors:?}"))
    };
    assert!(
        msg("sockets").contains("wasi:sockets/"),
        "{}",
        msg("sockets")
    );
    assert!(msg("sockets").contains("no network"), "{}", msg("sockets"));
    assert!(
        msg("old").contains("built for plugin API 0.9.0"),
        "{}",
        msg("old")
    );
    assert!(msg("old").contains("speaks 1.0.0"), "{}", msg("old"));
    assert!(
        msg("wrong-kind").contains("bound as a status-ordering plugin"),
        "{}",
        msg("wrong-kind")
    );
    assert!(
        msg("garbage").contains("cannot compile"),
        "{}",
        msg("garbage")
    );
    assert!(msg("missing").contains("cannot read"), "{}", msg("missing"));
    assert!(
        msg("bad-config").contains("init() refused its config"),
        "{}",
        msg("bad-config")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unwritable_cache_does_not_stop_loading() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "default-ordering", "ordering.wasm");
    d.manifest(&json!({"plugins": {"ord": {"file": "ordering.wasm"}}, "ordering": "ord"}));
    // A cache directory below a regular file cannot be created, even by root.
    let blocker = d.cache.path().join("a-file");
    std::fs::write(&blocker, b"not a directory").expect("writing the blocker");
    let (registry, metrics) = plugin_support::metrics();
    let mut cfg = d.config();
    cfg.cache_dir = blocker.join("cache");
    cfg.metrics = metrics;
    let host = PluginHost::start(cfg).await.expect("host starts");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    assert_eq!(host.ordering_rule().name(), "ord");
    let c = changes(10, 1);
    assert_eq!(
        host.ordering_rule().order(&c).expect("orders"),
        default_waves(&c)
    );
    let text = plugin_support::scrape(&registry);
    assert_eq!(
        plugin_support::sample(
            &text,
            "module_controller_plugin_cache_errors_total{op=\"write\"}"
        ),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_artefacts_are_cached_by_content_hash() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "default-ordering", "ordering.wasm");
    d.manifest(&json!({"plugins": {"ord": {"file": "ordering.wasm"}}, "ordering": "ord"}));
    let first = PluginHost::start(d.config()).await.expect("host starts");
    let hash = first.status()[0].content_hash.clone();
    let cached: Vec<_> = std::fs::read_dir(d.cache.path())
        .expect("cache dir exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(
        cached[0].starts_with(&hash) && cached[0].ends_with(".cwasm"),
        "{cached:?}"
    );
    assert!(
        !d.path().join(&cached[0]).exists(),
        "never written into the plugins dir"
    );
    drop(first);

    // A corrupt artefact is discarded and rebuilt, not trusted.
    let artefact = d.cache.path().join(&cached[0]);
    std::fs::write(&artefact, b"corrupt").expect("corrupting the artefact");
    let second = PluginHost::start(d.config()).await.expect("host starts");
    assert_eq!(second.ordering_rule().name(), "ord");
    assert!(
        std::fs::metadata(&artefact)
            .expect("artefact rewritten")
            .len()
            > 1000
    );
    let c = changes(10, 9);
    assert_eq!(
        second.ordering_rule().order(&c).expect("orders"),
        default_waves(&c)
    );
}

fn cli(cmd: PluginCommand) -> (anyhow::Result<()>, String) {
    let mut out = Vec::new();
    let r = run_to(cmd, &mut out);
    (r, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn cli_checks_and_dry_runs_every_example() {
    let dist = plugin_support::dist();
    for (name, kind) in [
        ("default-ordering", "status-ordering"),
        ("canary-batch", "batch-policy"),
        ("simple-agent-adapter", "tunnel-adapter"),
        ("template", "status-ordering"),
    ] {
        let (r, out) = cli(PluginCommand::Check {
            file: dist.join(format!("{name}.wasm")),
            config: String::new(),
            budget_ms: 1000,
        });
        assert!(r.is_ok(), "{name}: {r:?}\n{out}");
        assert!(out.contains(&format!("kind:        {kind}")), "{out}");
        assert!(out.contains("api version: 1.0.0"), "{out}");
        assert!(out.contains("self-check:  ok"), "{out}");
        assert!(out.trim_end().ends_with("OK"), "{out}");
    }

    let (r, out) = cli(PluginCommand::Check {
        file: dist.join("fixture-imports-sockets.wasm"),
        config: String::new(),
        budget_ms: 1000,
    });
    let err = format!("{:#}", r.expect_err("sockets fixture must be refused"));
    assert!(err.contains("wasi:sockets"), "{err}\n{out}");

    let input = tempfile::NamedTempFile::new().expect("temp input");
    std::fs::write(
        input.path(),
        json!({"changes": [
            {"creationTs": 5, "fromReady": false, "toReady": true},
            {"creationTs": 1, "fromReady": true, "toReady": false},
            {"creationTs": 3, "fromReady": false, "toReady": true}
        ]})
        .to_string(),
    )
    .expect("writing input");
    let (r, out) = cli(PluginCommand::Test {
        file: dist.join("default-ordering.wasm"),
        input: Some(input.path().to_path_buf()),
        config: String::new(),
        budget_ms: 1000,
    });
    assert!(r.is_ok(), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(v["decision"], json!([[1], [2, 0]]));
    assert_eq!(v["fallback"], serde_json::Value::Null);

    // A non-permutation is shown falling back, as the controller would.
    let (r, out) = cli(PluginCommand::Test {
        file: dist.join("fixture-non-permutation.wasm"),
        input: Some(input.path().to_path_buf()),
        config: String::new(),
        budget_ms: 1000,
    });
    assert!(r.is_ok(), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(v["decision"], json!([[1], [2, 0]]));
    assert!(
        v["fallback"]
            .as_str()
            .unwrap_or_default()
            .contains("more than once"),
        "{v}"
    );

    std::fs::write(
        input.path(),
        json!({"decode": [{"topic": "simple-agent/n1/hello", "payload": {"node": "n1", "app": "a", "version": "1"}}],
               "encode": [{"baseId": "n1", "command": "QueryHealth"}]})
        .to_string(),
    )
    .expect("writing input");
    let (r, out) = cli(PluginCommand::Test {
        file: dist.join("simple-agent-adapter.wasm"),
        input: Some(input.path().to_path_buf()),
        config: String::new(),
        budget_ms: 1000,
    });
    assert!(r.is_ok(), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(v["decoded"][0]["events"][0]["base_id"], "n1", "{v}");
    assert_eq!(
        v["encoded"][0]["messages"][0]["payload"], r#"{"op":"health"}"#,
        "{v}"
    );

    // A failing batch policy is shown holding, as the controller binds it by default.
    let (r, out) = cli(PluginCommand::Test {
        file: dist.join("fixture-broken-batch.wasm"),
        input: None,
        config: "trap".into(),
        budget_ms: 1000,
    });
    assert!(r.is_ok(), "{r:?}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(v["decision"]["admit"], json!([]), "{v}");
    assert!(
        v["decision"]["holdReason"]
            .as_str()
            .unwrap_or_default()
            .contains("is broken"),
        "{v}"
    );
    assert!(
        v["fallback"]
            .as_str()
            .unwrap_or_default()
            .contains(reasons::TRAPPED),
        "{v}"
    );
}
