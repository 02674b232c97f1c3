//! Plugin metrics, registered once per process in [`crate::metrics`].

use std::sync::OnceLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

use super::PluginKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    plugin: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FailureLabels {
    plugin: String,
    kind: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

fn latency_histogram() -> Histogram {
    // 1 µs .. ~260 ms: plugin calls are micro- to milli-seconds, budgets tens of ms.
    Histogram::new(exponential_buckets(1e-6, 4.0, 10))
}

struct Metrics {
    calls: Family<CallLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    latency: Family<KindLabels, Histogram, fn() -> Histogram>,
    reloads: Family<ResultLabels, Counter>,
    loaded: Family<KindLabels, Gauge>,
}

fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| {
        let m = Metrics {
            calls: Family::default(),
            failures: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            reloads: Family::default(),
            loaded: Family::default(),
        };
        crate::metrics::register("plugin_calls", "Plugin hook calls", m.calls.clone());
        crate::metrics::register(
            "plugin_failures",
            "Plugin hook calls and loads that failed, by reason",
            m.failures.clone(),
        );
        crate::metrics::register(
            "plugin_call_duration_seconds",
            "Latency of plugin hook calls, including instantiation",
            m.latency.clone(),
        );
        crate::metrics::register(
            "plugin_reloads",
            "Plugin versions compiled and validated (ok) or refused (failed)",
            m.reloads.clone(),
        );
        crate::metrics::register(
            "plugins_loaded",
            "Plugins currently loaded",
            m.loaded.clone(),
        );
        m
    })
}

/// Records one hook call and its latency.
pub(crate) fn call(plugin: &str, kind: PluginKind, elapsed: Duration) {
    let m = metrics();
    m.calls
        .get_or_create(&CallLabels {
            plugin: plugin.to_string(),
            kind: kind.to_string(),
        })
        .inc();
    m.latency
        .get_or_create(&KindLabels {
            kind: kind.to_string(),
        })
        .observe(elapsed.as_secs_f64());
}

/// Records one failure.
pub(crate) fn failure(plugin: &str, kind: PluginKind, reason: &str) {
    metrics()
        .failures
        .get_or_create(&FailureLabels {
            plugin: plugin.to_string(),
            kind: kind.to_string(),
            reason: reason.to_string(),
        })
        .inc();
}

/// Records one reload attempt of a plugin version.
pub(crate) fn reload(ok: bool) {
    metrics()
        .reloads
        .get_or_create(&ResultLabels {
            result: if ok { "ok" } else { "failed" }.to_string(),
        })
        .inc();
}

/// Sets the number of loaded plugins of `kind`.
pub(crate) fn loaded(kind: PluginKind, count: usize) {
    metrics()
        .loaded
        .get_or_create(&KindLabels {
            kind: kind.to_string(),
        })
        .set(i64::try_from(count).unwrap_or(i64::MAX));
}
