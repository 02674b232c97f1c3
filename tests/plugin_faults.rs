//! Faulty plugins are contained, reported and counted, and the safe default decides: the
//! built-in order for ordering rules, the binding's failure policy (hold unless it says admit)
//! for batch policies; the host keeps serving. Every fault test has a control that shows the
//! limit or fallback is what made the difference. Tests that measure CPU time are in
//! `plugin_limits.rs`, where nothing else runs beside them.

mod plugin_support;

use std::collections::BTreeMap;
use std::time::Duration;

use module_controller::plugin::{PluginHost, PluginKind, PluginMetrics, PluginPolicies, reasons};
use module_controller::rollout::PolicySource;
use module_controller::rollout::batch::{BatchError, PendingInstall, RolloutView, decide_with};
use module_controller::rollout::ordering::{
    OrderingError, default_waves, enforce_invariant, order_with,
};
use plugin_support::{PluginDir, drain, sample, scrape, status_changes, wait_for};
use serde_json::json;

const MIB: usize = 1 << 20;

/// A host serving `fixture` as its ordering rule, with the given memory cap and metrics.
async fn host_with_ordering(
    d: &PluginDir,
    fixture: &str,
    memory: usize,
    metrics: PluginMetrics,
) -> PluginHost {
    d.install(plugin_support::dist(), fixture, "rule.wasm");
    d.manifest(&json!({"plugins": {"rule": {"file": "rule.wasm"}}, "ordering": "rule"}));
    let mut cfg = d.config();
    // Generous: these tests are about memory and output, not time (see plugin_limits.rs).
    cfg.call_budget = Duration::from_millis(500);
    cfg.memory_limit_bytes = memory;
    cfg.metrics = metrics;
    let host = PluginHost::start(cfg).await.expect("host starts");
    assert!(
        host.load_errors().is_empty(),
        "{fixture} must load: {:?}",
        host.load_errors()
    );
    assert_eq!(host.ordering_rule().name(), "rule");
    host
}

/// Calls the faulty rule three times; each call must fall back to the default, return the
/// failure to the caller, leave a fault with `reason` and count it. Then the control: a
/// healthy plugin in the same place serves without faults.
async fn assert_contained(fixture: &str, reason: &str) -> PluginHost {
    let d = PluginDir::new();
    let (registry, metrics) = plugin_support::metrics();
    let host = host_with_ordering(&d, fixture, 16 * MIB, metrics).await;
    let mut faults = host.faults();
    let c = status_changes(20);
    for _ in 0..3 {
        let rule = host.ordering_rule();
        let c2 = c.clone();
        // As the controller calls plugins: on the host's pool, never on an async worker.
        let (own, (waves, err)) = host
            .pool()
            .run(move || (rule.order(&c2), order_with(rule.as_ref(), &c2)))
            .await
            .expect("pool runs the call");
        // The fallback is what made the difference: the rule's own answer is an error...
        assert!(own.is_err(), "{fixture}: the rule itself fails: {own:?}");
        // ...and the built-in default decided instead.
        assert_eq!(waves, default_waves(&c), "{fixture}: the default decides");
        let err = err.unwrap_or_else(|| panic!("{fixture}: the failure reaches the caller"));
        if reason != reasons::INVALID_OUTPUT {
            assert!(
                matches!(&err, OrderingError::RuleFailed(m) if m.starts_with(reason)),
                "{fixture}: {err:?}"
            );
        }
    }
    let got = drain(&mut faults);
    assert_eq!(got.len(), 6, "{fixture}: a fault per failed call: {got:?}");
    for f in &got {
        assert_eq!(f.reason, reason, "{fixture}: {f:?}");
        assert_eq!(f.plugin, "rule");
        assert_eq!(f.kind, PluginKind::StatusOrdering);
    }
    let text = scrape(&registry);
    let series = format!(
        "module_controller_plugin_failures_total{{plugin=\"rule\",kind=\"status-ordering\",reason=\"{reason}\"}}"
    );
    assert_eq!(sample(&text, &series), 6.0, "{fixture}:\n{text}");

    // Control: a healthy version in the same place serves, without faults.
    d.install(plugin_support::dist(), "default-ordering", "rule.wasm");
    let served = wait_for(Duration::from_secs(5), || {
        (host.status()[0].plugin_name == "default-ordering").then_some(())
    });
    assert!(served.is_some(), "{fixture}: replacement loads");
    drain(&mut faults);
    for _ in 0..3 {
        let (waves, err) = order_with(host.ordering_rule().as_ref(), &c);
        assert!(err.is_none(), "{fixture}: replacement fails: {err:?}");
        assert_eq!(waves, default_waves(&c));
    }
    let after = drain(&mut faults);
    assert!(
        after.is_empty(),
        "{fixture}: healthy calls fault: {after:?}"
    );
    host
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_is_contained() {
    assert_contained("fixture-trap", reasons::TRAPPED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_permutation_is_refused() {
    assert_contained("fixture-non-permutation", reasons::INVALID_OUTPUT).await;

    // Control: an ordering that differs from the default but is a permutation is applied as
    // the plugin says (so the refusal above is the permutation check, not distrust).
    let d = PluginDir::new();
    let host = host_with_ordering(
        &d,
        "fixture-newest-first",
        16 * MIB,
        PluginMetrics::default(),
    )
    .await;
    let c = status_changes(20);
    let own = host.ordering_rule().order(&c).expect("a permutation");
    let (waves, err) = order_with(host.ordering_rule().as_ref(), &c);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(waves, enforce_invariant(&c, own));
    assert_ne!(
        waves,
        default_waves(&c),
        "the plugin's order, not the default"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_allocation_hits_the_instance_memory_cap() {
    let host = assert_contained("fixture-alloc-unbounded", reasons::OUT_OF_MEMORY).await;
    drop(host);

    // Control: the cap, nothing else, stops the plugin. Under a 16 MiB cap the instance peaks
    // at or below 16 MiB; under 48 MiB the same plugin grows past 16 MiB (and is stopped at 48).
    let mut peaks = Vec::new();
    for cap in [16 * MIB, 48 * MIB] {
        let d = PluginDir::new();
        let host =
            host_with_ordering(&d, "fixture-alloc-unbounded", cap, PluginMetrics::default()).await;
        let mut faults = host.faults();
        let (_, err) = order_with(host.ordering_rule().as_ref(), &status_changes(4));
        assert!(
            matches!(&err, Some(OrderingError::RuleFailed(m)) if m.starts_with(reasons::OUT_OF_MEMORY)),
            "cap {cap}: {err:?}"
        );
        let f = drain(&mut faults);
        assert!(
            f.iter()
                .any(|f| f.message.contains(&format!("cap is {cap}"))),
            "{f:?}"
        );
        let peak = host.status()[0].peak_instance_memory;
        assert!(peak <= cap, "peak {peak} above the cap {cap}");
        peaks.push(peak);
    }
    assert!(
        peaks[1] > 16 * MIB,
        "with a larger cap the plugin grows further: {peaks:?}"
    );
}

fn rollout(owner: &str, selector: &str, policy: &str) -> RolloutView {
    RolloutView {
        owner: owner.into(),
        module: "m".into(),
        new_version: "2".into(),
        old_version: Some("1".into()),
        desired: 3,
        updated_ready: 0,
        updated_installing: 0,
        old_ready: 3,
        elapsed_ms: 0,
        since_last_ready_ms: None,
        annotations: BTreeMap::from([(selector.to_string(), policy.to_string())]),
    }
}

fn pending(n: usize) -> Vec<PendingInstall> {
    (0..n)
        .map(|i| PendingInstall {
            base_id: format!("b{i}"),
            pod: format!("ns/p{i}"),
            creation_ts: i as i64,
        })
        .collect()
}

const SELECT: &str = "module-controller.koupleless.io/batch-policy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_batch_policy_holds_the_rollout() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "fixture-broken-batch", "batch.wasm");
    let modes = [
        ("trap", reasons::TRAPPED),
        ("loop", reasons::TIMED_OUT),
        ("alloc", reasons::OUT_OF_MEMORY),
        ("out-of-range", reasons::INVALID_OUTPUT),
        ("error", reasons::RETURNED_ERROR),
    ];
    // Each failure mode twice: bound with the default failure policy (hold), and bound with
    // "admit" (the control: the failure policy alone makes the difference). And the fixture
    // working ("ok"), the control that the host does not refuse a policy that works.
    let mut plugins = serde_json::Map::new();
    let mut selectable = Vec::new();
    let mut on_failure = serde_json::Map::new();
    for (mode, _) in modes.iter().chain(&[("ok", "")]) {
        for admit in [false, true] {
            let name = format!("{mode}{}", if admit { "-admit" } else { "" });
            plugins.insert(name.clone(), json!({"file": "batch.wasm", "config": mode}));
            if admit {
                on_failure.insert(name.clone(), json!("admit"));
            }
            selectable.push(name);
        }
    }
    d.manifest(&json!({
        "plugins": plugins,
        "batch": {"selectable": selectable, "onFailure": on_failure}
    }));
    let (registry, metrics) = plugin_support::metrics();
    let mut cfg = d.config();
    cfg.memory_limit_bytes = 16 * MIB;
    cfg.metrics = metrics;
    let host = PluginHost::start(cfg).await.expect("host starts");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    let mut faults = host.faults();
    let p = pending(3);

    for (mode, reason) in modes {
        let owner = format!("ns/{mode}");
        let held = host.batch_policy_for(&rollout(&owner, SELECT, mode).annotations);
        assert_eq!(held.name(), mode);
        let (d1, err) = decide_with(held.as_ref(), &rollout(&owner, SELECT, mode), &p);
        let err = err.unwrap_or_else(|| panic!("{mode}: the failure reaches the caller"));
        assert!(
            d1.admit.is_empty(),
            "{mode}: a broken policy admits nothing"
        );
        let why = d1.hold_reason.unwrap_or_default();
        assert!(
            why.contains(&format!("batch policy {mode} is broken")),
            "{mode}: {why}"
        );
        match reason {
            // The host's own check refused the output (and reported the fault).
            reasons::INVALID_OUTPUT => {
                assert!(matches!(err, BatchError::OutOfRange(..)), "{mode}: {err}")
            }
            _ => assert!(err.to_string().contains(reason), "{mode}: {err}"),
        }

        let admitting = format!("{mode}-admit");
        let policy = host.batch_policy_for(&rollout(&owner, SELECT, &admitting).annotations);
        let (d2, err) = decide_with(policy.as_ref(), &rollout(&owner, SELECT, &admitting), &p);
        assert!(err.is_some(), "{mode}-admit fails the same way");
        assert_eq!(d2.admit, vec![0, 1, 2], "{mode}-admit: bound to admit");

        let got = drain(&mut faults);
        assert_eq!(got.len(), 2, "{mode}: {got:?}");
        assert!(
            got.iter()
                .all(|f| f.reason == reason && f.subject.as_deref() == Some(owner.as_str())),
            "{mode}: faults name the Deployment: {got:?}"
        );
        let text = scrape(&registry);
        let series = format!(
            "module_controller_plugin_failures_total{{plugin=\"{mode}\",kind=\"batch-policy\",reason=\"{reason}\"}}"
        );
        assert_eq!(sample(&text, &series), 1.0, "{mode}:\n{text}");
    }

    // Control: the same component, working, decides (and holds with its own reason).
    let ok = host.batch_policy_for(&rollout("ns/ok", SELECT, "ok").annotations);
    let (d, err) = decide_with(ok.as_ref(), &rollout("ns/ok", SELECT, "ok"), &p);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(d.hold_reason.as_deref(), Some("fixture holds"));
    assert!(drain(&mut faults).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_binding_without_a_loaded_plugin_holds() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.write("broken.wasm", b"\0asm not a component");
    d.manifest(&json!({
        "plugins": {
            "canary": {"file": "canary.wasm"},
            "broken": {"file": "broken.wasm"},
            "lenient": {"file": "broken.wasm"}
        },
        "batch": {"default": "canary", "selectable": ["broken", "lenient"],
                  "onFailure": {"lenient": "admit"}}
    }));
    let host = PluginHost::start(d.config()).await.expect("host starts");
    let mut faults = host.faults();
    let startup = drain(&mut faults);
    assert_eq!(startup.len(), 3, "the three load failures: {startup:?}");
    assert!(
        startup
            .iter()
            .any(|f| f.plugin == "canary" && f.message.contains("hold their pending installs")),
        "{startup:?}"
    );
    let p = pending(2);

    // The default binding's file is missing: a policy that fails, not admit-all.
    let none = BTreeMap::new();
    let policy = host.batch_policy_for(&none);
    assert_eq!(policy.name(), "canary");
    let policies = PluginPolicies(host.clone());
    assert!(
        policies.batch_policy(&none).is_some(),
        "the controller gates with it"
    );
    let view = rollout("ns/d", "unused", "");
    let (dec, err) = decide_with(policy.as_ref(), &view, &p);
    assert!(dec.admit.is_empty(), "{dec:?}");
    let err = err.expect("the failure reaches the caller").to_string();
    assert!(
        err.contains("not loaded") && err.contains("cannot read"),
        "{err}"
    );
    let f = drain(&mut faults);
    assert_eq!(f.len(), 1, "{f:?}");
    assert_eq!(f[0].subject.as_deref(), Some("ns/d"));
    assert_eq!(f[0].reason, reasons::LOAD_FAILED);

    // A refused file, selected: hold too; bound with "admit" (the control): admit.
    for (name, admitted) in [("broken", vec![]), ("lenient", vec![0, 1])] {
        let view = rollout("ns/d", SELECT, name);
        let policy = host.batch_policy_for(&view.annotations);
        assert_eq!(policy.name(), name);
        let (dec, err) = decide_with(policy.as_ref(), &view, &p);
        assert_eq!(dec.admit, admitted, "{name}");
        assert!(
            err.is_some_and(|e| e.to_string().contains("cannot compile")),
            "{name}"
        );
    }

    // Control: once the file is there, the same binding decides.
    d.install(dist, "canary-batch", "canary.wasm");
    let decided = wait_for(Duration::from_secs(5), || {
        let (dec, err) = decide_with(host.batch_policy_for(&none).as_ref(), &view, &p);
        err.is_none().then_some(dec)
    })
    .expect("the canary serves once loaded");
    assert_eq!(decided.admit.len(), 1, "one canary: {decided:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_load_failures_reach_a_later_subscriber() {
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "fixture-old-api", "old.wasm");
    d.install(dist, "default-ordering", "good.wasm");
    d.manifest(&json!({
        "plugins": {"old": {"file": "old.wasm"}, "gone": {"file": "gone.wasm"},
                    "good": {"file": "good.wasm"}},
        "ordering": "good"
    }));
    let host = PluginHost::start(d.config()).await.expect("host starts");
    // Subscribed after start, as the controller does: the startup failures still arrive.
    let mut first = host.faults();
    let mut second = host.faults();
    for rx in [&mut first, &mut second] {
        let mut got: Vec<String> = drain(rx)
            .into_iter()
            .inspect(|f| assert_eq!(f.reason, reasons::LOAD_FAILED))
            .map(|f| f.plugin)
            .collect();
        got.sort();
        assert_eq!(got, ["gone", "old"]);
    }
    // Then live faults, once each.
    d.write("plugins.json", b"{\"plugins\": ");
    let live = wait_for(Duration::from_secs(5), || {
        let f = drain(&mut first);
        (!f.is_empty()).then_some(f)
    })
    .expect("the manifest error arrives");
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].plugin, "plugins.json");

    // Control: once the problems are fixed, a new subscriber is told nothing old.
    d.manifest(&json!({"plugins": {"good": {"file": "good.wasm"}}, "ordering": "good"}));
    wait_for(Duration::from_secs(5), || {
        host.load_errors().is_empty().then_some(())
    })
    .expect("problems resolved");
    let mut third = host.faults();
    assert!(drain(&mut third).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_plugin_files_are_refused_unread() {
    let dist = plugin_support::dist();
    let size = plugin_support::plugin_bytes(dist, "default-ordering").len() as u64;
    for (limit, loads) in [(size - 1, false), (size, true)] {
        let d = PluginDir::new();
        d.install(dist, "default-ordering", "rule.wasm");
        d.manifest(&json!({"plugins": {"rule": {"file": "rule.wasm"}}, "ordering": "rule"}));
        let mut cfg = d.config();
        cfg.max_file_bytes = limit;
        let host = PluginHost::start(cfg).await.expect("host starts");
        if loads {
            // Control: at exactly the limit the same file loads.
            assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
            assert_eq!(host.ordering_rule().name(), "rule");
        } else {
            let errors = host.load_errors();
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].message.contains(&format!(
                    "is {size} bytes, larger than the {limit}-byte limit"
                )),
                "{errors:?}"
            );
            assert_eq!(host.ordering_rule().name(), "builtin-default");
        }
    }
}
