//! Faulty plugins are cut off within their budget, reported, and the built-in default decides;
//! the host keeps serving.

mod plugin_support;

use std::time::{Duration, Instant};

use module_controller::plugin::{PluginHost, PluginKind, reasons};
use module_controller::rollout::ordering::{
    OrderingError, StatusChange, default_waves, order_with,
};
use plugin_support::{PluginDir, drain, wait_for};
use serde_json::json;

const BUDGET: Duration = Duration::from_millis(50);
/// Slack for the epoch tick, the trap unwinding and the fallback decision.
const SLACK: Duration = Duration::from_millis(20);
/// The host charges CPU time; wall time is capped at four budgets for a starved call, give
/// or take the scheduling delays of a machine this test itself loads with looping threads.
const WALL_CAP: Duration = Duration::from_millis(200 + 300);

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "thread CPU clock");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn changes(n: u32) -> Vec<StatusChange> {
    (0..n)
        .map(|i| StatusChange {
            pod_index: i,
            creation_ts: 100 + i64::from(i % 5),
            revision: i64::from(i % 2),
            from_ready: i % 3 == 0,
            to_ready: i % 2 == 1,
            deleting: false,
        })
        .collect()
}

async fn host_with_ordering(d: &PluginDir, dist: &std::path::Path, fixture: &str) -> PluginHost {
    d.install(dist, fixture, "rule.wasm");
    d.manifest(&json!({"plugins": {"rule": {"file": "rule.wasm"}}, "ordering": "rule"}));
    let mut cfg = d.config();
    cfg.call_budget = BUDGET;
    cfg.memory_limit_bytes = 16 << 20;
    let host = PluginHost::start(cfg).await.expect("host starts");
    assert!(
        host.load_errors().is_empty(),
        "{fixture} must load: {:?}",
        host.load_errors()
    );
    assert_eq!(host.ordering_rule().name(), "rule");
    host
}

/// Calls the faulty rule a few times; every call must be cut off in time, fall back to the
/// default and leave a fault with `reason`.
async fn assert_cut_off(fixture: &str, reason: &str) {
    let dist = require_plugins!();
    let d = PluginDir::new();
    let host = host_with_ordering(&d, dist, fixture).await;
    let mut faults = host.faults();
    let c = changes(20);
    for _ in 0..3 {
        let rule = host.ordering_rule();
        let c2 = c.clone();
        let (elapsed, cpu, waves, err) = tokio::task::spawn_blocking(move || {
            let start = Instant::now();
            let cpu_start = thread_cpu();
            let (waves, err) = order_with(rule.as_ref(), &c2);
            (start.elapsed(), thread_cpu() - cpu_start, waves, err)
        })
        .await
        .expect("call thread");
        assert!(
            cpu <= BUDGET + SLACK,
            "{fixture}: call used {cpu:?} of CPU, budget {BUDGET:?}"
        );
        assert!(
            elapsed <= WALL_CAP,
            "{fixture}: call took {elapsed:?} of wall time"
        );
        assert_eq!(
            waves,
            default_waves(&c),
            "{fixture}: the default must decide"
        );
        let err =
            err.unwrap_or_else(|| panic!("{fixture}: the failure must be reported to the caller"));
        if reason != reasons::INVALID_OUTPUT {
            assert!(
                matches!(&err, OrderingError::RuleFailed(m) if m.starts_with(reason)),
                "{fixture}: {err:?}"
            );
        }
    }
    let got = drain(&mut faults);
    assert_eq!(
        got.len(),
        3,
        "{fixture}: one fault per failed call (interval 0): {got:?}"
    );
    for f in &got {
        assert_eq!(f.reason, reason, "{fixture}: {f:?}");
        assert_eq!(f.plugin, "rule");
        assert_eq!(f.kind, PluginKind::StatusOrdering);
    }
    let metrics = module_controller::metrics::render();
    assert!(
        metrics.contains(&format!("reason=\"{reason}\"")),
        "{fixture}: failure metric missing:\n{metrics}"
    );

    // Still healthy: the plugin stays loaded (faults are per call) and a fixed version serves.
    d.install(dist, "default-ordering", "rule.wasm");
    let served = wait_for(Duration::from_secs(5), || {
        let rule = host.ordering_rule();
        rule.order(&c).ok()
    });
    assert_eq!(
        served,
        Some(default_waves(&c)),
        "{fixture}: replacement must serve"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_interrupted() {
    assert_cut_off("fixture-loop-forever", reasons::TIMED_OUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_allocation_hits_the_memory_cap() {
    assert_cut_off("fixture-alloc-unbounded", reasons::OUT_OF_MEMORY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_is_contained() {
    assert_cut_off("fixture-trap", reasons::TRAPPED).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_permutation_is_refused() {
    assert_cut_off("fixture-non-permutation", reasons::INVALID_OUTPUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_faulty_calls_do_not_hurt_the_host() {
    let dist = require_plugins!();
    let d = PluginDir::new();
    let host = host_with_ordering(&d, dist, "fixture-loop-forever").await;
    let c = changes(10);
    let mut threads = Vec::new();
    let start = Instant::now();
    for _ in 0..4 {
        let rule = host.ordering_rule();
        let c = c.clone();
        threads.push(std::thread::spawn(move || {
            (0..5).all(|_| order_with(rule.as_ref(), &c).0 == default_waves(&c))
        }));
    }
    for t in threads {
        assert!(
            t.join().expect("caller thread"),
            "every call must fall back to the default"
        );
    }
    // 20 calls of 50 ms on 4 threads: ~250 ms; far less than 20 serial budgets plus slack.
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
}
