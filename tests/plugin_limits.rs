//! Time limits of plugins: the CPU budget of a call and the compile budget of a load.
//!
//! These tests measure time, so they live in their own test binary and run one at a time
//! (`SERIAL`): cargo runs test binaries one after another, so nothing else of this suite runs
//! beside them. Budgets are checked in CPU time of the calling thread (what the host charges),
//! wall time only against generous caps, and each limit comes with a control that changes only
//! that limit and shows the outcome changes with it.

mod plugin_support;

use std::time::{Duration, Instant};

use module_controller::plugin::{PluginHost, reasons};
use module_controller::rollout::ordering::{OrderingError, default_waves, order_with};
use plugin_support::{PluginDir, drain, status_changes};
use serde_json::json;

/// One test at a time: a test that loads the machine must not starve another's timing.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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

async fn looping_host(d: &PluginDir, budget: Duration) -> PluginHost {
    d.install(plugin_support::dist(), "fixture-loop-forever", "rule.wasm");
    d.manifest(&json!({"plugins": {"rule": {"file": "rule.wasm"}}, "ordering": "rule"}));
    let mut cfg = d.config();
    cfg.call_budget = budget;
    let host = PluginHost::start(cfg).await.expect("host starts");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    host
}

/// One call of the looping rule on the host's pool: (CPU time, wall time, outcome).
async fn timed_call(host: &PluginHost) -> (Duration, Duration, Option<OrderingError>) {
    let rule = host.ordering_rule();
    let c = status_changes(20);
    host.pool()
        .run(move || {
            let (start, cpu_start) = (Instant::now(), thread_cpu());
            let (waves, err) = order_with(rule.as_ref(), &c);
            assert_eq!(waves, default_waves(&c), "the default decides");
            (thread_cpu() - cpu_start, start.elapsed(), err)
        })
        .await
        .expect("pool runs the call")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_is_cut_at_its_cpu_budget() {
    let _serial = SERIAL.lock().await;
    const SHORT: Duration = Duration::from_millis(50);
    const LONG: Duration = Duration::from_millis(250);
    // The epoch ticker and the trap unwinding add a little to the budget.
    const SLACK: Duration = Duration::from_millis(50);

    let d = PluginDir::new();
    let host = looping_host(&d, SHORT).await;
    let mut faults = host.faults();
    let mut short_cpu = Duration::ZERO;
    for _ in 0..3 {
        let (cpu, wall, err) = timed_call(&host).await;
        assert!(
            matches!(&err, Some(OrderingError::RuleFailed(m)) if m.starts_with(reasons::TIMED_OUT)),
            "{err:?}"
        );
        assert!(
            cpu <= SHORT + SLACK,
            "used {cpu:?} of CPU, budget {SHORT:?}"
        );
        // Wall time is capped at 4 budgets; the rest is room for a loaded machine.
        assert!(wall <= SHORT * 4 + Duration::from_secs(1), "took {wall:?}");
        short_cpu = short_cpu.max(cpu);
    }
    let got = drain(&mut faults);
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.iter().all(|f| f.reason == reasons::TIMED_OUT));

    // Control: the same plugin with a budget five times larger runs longer before it is cut
    // off, so the budget (not the plugin or the machine) decides when the call ends.
    let d = PluginDir::new();
    let host = looping_host(&d, LONG).await;
    let (cpu, _, err) = timed_call(&host).await;
    assert!(
        matches!(&err, Some(OrderingError::RuleFailed(m)) if m.starts_with(reasons::TIMED_OUT)),
        "{err:?}"
    );
    assert!(
        cpu > short_cpu + SLACK,
        "with a {LONG:?} budget the call used {cpu:?}, with {SHORT:?} up to {short_cpu:?}"
    );
    assert!(cpu <= LONG + SLACK, "used {cpu:?} of CPU, budget {LONG:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_endless_loops_do_not_hurt_the_host() {
    let _serial = SERIAL.lock().await;
    let d = PluginDir::new();
    let host = looping_host(&d, Duration::from_millis(50)).await;
    let c = status_changes(10);
    let start = Instant::now();
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let rule = host.ordering_rule();
            let c = c.clone();
            let pool = host.pool().clone();
            tokio::spawn(async move {
                pool.run(move || order_with(rule.as_ref(), &c).0 == default_waves(&c))
                    .await
            })
        })
        .collect();
    for call in calls {
        assert_eq!(
            call.await.expect("caller task"),
            Ok(true),
            "every call falls back to the default"
        );
    }
    // 20 calls of 50 ms CPU on the pool's 2 workers: ~0.5 s; bounded even on a loaded machine.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    // The host still serves a healthy version.
    d.install(plugin_support::dist(), "default-ordering", "rule.wasm");
    let served = plugin_support::wait_for(Duration::from_secs(5), || {
        host.ordering_rule().order(&c).ok()
    });
    assert_eq!(served, Some(default_waves(&c)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_that_compiles_too_slowly_is_refused() {
    let _serial = SERIAL.lock().await;
    let dist = plugin_support::dist();
    let d = PluginDir::new();
    d.install(dist, "default-ordering", "rule.wasm");
    d.manifest(&json!({"plugins": {"rule": {"file": "rule.wasm"}}, "ordering": "rule"}));

    // Compiling this component takes tens of milliseconds: 1 ms is too little.
    let mut cfg = d.config();
    cfg.compile_budget = Duration::from_millis(1);
    let host = PluginHost::start(cfg).await.expect("host starts");
    let errors = host.load_errors();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].reason, reasons::LOAD_FAILED);
    assert!(
        errors[0]
            .message
            .contains("longer than the 1 ms compile budget"),
        "{errors:?}"
    );
    assert_eq!(host.ordering_rule().name(), "builtin-default");
    let cached = std::fs::read_dir(d.cache.path()).map_or(0, |r| r.count());
    assert_eq!(cached, 0, "an abandoned compile is never cached");
    drop(host);

    // Control: the same file with the default budget compiles and serves.
    let host = PluginHost::start(d.config()).await.expect("host starts");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    assert_eq!(host.ordering_rule().name(), "rule");
    assert!(!host.status()[0].from_cache);
    drop(host);

    // The budget is for compiling: a precompiled artefact loads under the 1 ms budget.
    let mut cfg = d.config();
    cfg.compile_budget = Duration::from_millis(1);
    let host = PluginHost::start(cfg).await.expect("host starts");
    assert!(host.load_errors().is_empty(), "{:?}", host.load_errors());
    assert!(host.status()[0].from_cache);
}
