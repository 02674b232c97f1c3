//! Plugin metrics: one [`PluginMetrics`] per host, registered in the registry the caller owns.

use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::kind::PluginKind;

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: String,
}

type LatencyFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 µs .. ~260 ms: plugin calls are micro- to milli-seconds, budgets tens of ms.
    Histogram::new(exponential_buckets(1e-6, 4.0, 10))
}

/// The plugin host's metric families. Clones share the same series; the default is a set that
/// counts but that no registry exposes (for the CLI and tests that do not scrape).
#[derive(Clone)]
pub struct PluginMetrics {
    calls: Family<CallLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    latency: LatencyFamily,
    reloads: Family<ResultLabels, Counter>,
    loaded: Family<KindLabels, Gauge>,
    pool_overloaded: Counter,
    pool_queued: Gauge,
    cache_errors: Family<OpLabels, Counter>,
}

impl Default for PluginMetrics {
    fn default() -> Self {
        PluginMetrics {
            calls: Family::default(),
            failures: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            reloads: Family::default(),
            loaded: Family::default(),
            pool_overloaded: Counter::default(),
            pool_queued: Gauge::default(),
            cache_errors: Family::default(),
        }
    }
}

impl std::fmt::Debug for PluginMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginMetrics").finish_non_exhaustive()
    }
}

impl PluginMetrics {
    /// Registers the plugin host's families in `registry` (names as `<prefix>_plugin_…`) and
    /// returns the handle to put in [`PluginConfig::metrics`](super::PluginConfig::metrics).
    pub fn register(registry: &mut Registry) -> PluginMetrics {
        let m = PluginMetrics::default();
        // Series without a per-plugin label exist from the first scrape, at zero, so
        // dashboards and alerts see them before anything happened.
        for kind in PluginKind::ALL {
            m.loaded.get_or_create(&kind_labels(kind)).set(0);
            drop(m.latency.get_or_create(&kind_labels(kind)));
        }
        for result in ["ok", "failed"] {
            m.reloads
                .get_or_create(&ResultLabels {
                    result: result.to_string(),
                })
                .inc_by(0);
        }
        for op in ["read", "write"] {
            m.cache_errors
                .get_or_create(&OpLabels { op: op.to_string() })
                .inc_by(0);
        }
        registry.register("plugin_calls", "Plugin hook calls", Listed(m.calls.clone()));
        registry.register(
            "plugin_failures",
            "Plugin hook calls and loads that failed, by reason",
            Listed(m.failures.clone()),
        );
        registry.register(
            "plugin_call_duration_seconds",
            "Latency of plugin hook calls, including instantiation",
            Listed(m.latency.clone()),
        );
        registry.register(
            "plugin_reloads",
            "Plugin versions compiled and validated (ok) or refused (failed)",
            Listed(m.reloads.clone()),
        );
        registry.register(
            "plugins_loaded",
            "Plugins currently loaded",
            Listed(m.loaded.clone()),
        );
        registry.register(
            "plugin_pool_overloaded",
            "Plugin calls refused because the plugin call queue was full",
            Listed(m.pool_overloaded.clone()),
        );
        registry.register(
            "plugin_pool_queued",
            "Plugin calls waiting for a pool worker",
            Listed(m.pool_queued.clone()),
        );
        registry.register(
            "plugin_cache_errors",
            "Precompiled-artefact cache reads and writes that failed (loading goes on without the cache)",
            Listed(m.cache_errors.clone()),
        );
        m
    }

    /// Records one hook call and its latency.
    pub(crate) fn call(&self, plugin: &str, kind: PluginKind, elapsed: Duration) {
        self.calls
            .get_or_create(&CallLabels {
                plugin: plugin.to_string(),
                kind: kind.to_string(),
            })
            .inc();
        self.latency
            .get_or_create(&kind_labels(kind))
            .observe(elapsed.as_secs_f64());
    }

    /// Records one failure.
    pub(crate) fn failure(&self, plugin: &str, kind: PluginKind, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                plugin: plugin.to_string(),
                kind: kind.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// Records one reload attempt of a plugin version.
    pub(crate) fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "failed" }.to_string(),
            })
            .inc();
    }

    /// Sets the number of loaded plugins of `kind`.
    pub(crate) fn loaded(&self, kind: PluginKind, count: usize) {
        self.loaded
            .get_or_create(&kind_labels(kind))
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Records a call refused by a full pool queue.
    pub(crate) fn pool_overloaded(&self) {
        self.pool_overloaded.inc();
    }

    /// Moves the number of queued pool calls by `delta`.
    pub(crate) fn pool_queued(&self, delta: i64) {
        self.pool_queued.inc_by(delta);
    }

    /// Records a failed artefact-cache operation (`read` or `write`).
    pub(crate) fn cache_error(&self, op: &str) {
        self.cache_errors
            .get_or_create(&OpLabels { op: op.to_string() })
            .inc();
    }
}

/// A family that is listed (HELP and TYPE) even before it has a series: the text encoder omits
/// empty families, and a family keyed by plugin name is empty until a plugin is called.
#[derive(Debug)]
struct Listed<M>(M);

impl<M: EncodeMetric> EncodeMetric for Listed<M> {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

fn kind_labels(kind: PluginKind) -> KindLabels {
    KindLabels {
        kind: kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::text::encode;

    use super::*;

    fn scrape(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).expect("encoding metrics");
        out
    }

    #[test]
    fn every_family_exists_from_the_first_scrape() {
        let mut registry = Registry::with_prefix("module_controller");
        let _m = PluginMetrics::register(&mut registry);
        let text = scrape(&registry);
        for family in [
            "module_controller_plugin_calls",
            "module_controller_plugin_failures",
            "module_controller_plugin_call_duration_seconds",
            "module_controller_plugin_reloads",
            "module_controller_plugins_loaded",
            "module_controller_plugin_pool_overloaded",
            "module_controller_plugin_pool_queued",
            "module_controller_plugin_cache_errors",
        ] {
            assert!(
                text.contains(&format!("# TYPE {family} ")),
                "{family} missing:\n{text}"
            );
        }
        assert!(text.contains("module_controller_plugins_loaded{kind=\"batch-policy\"} 0"));
        assert!(text.contains("module_controller_plugin_reloads_total{result=\"failed\"} 0"));
        assert!(text.contains("module_controller_plugin_pool_overloaded_total 0"));
    }

    #[test]
    fn two_hosts_count_in_their_own_registries() {
        let (mut a, mut b) = (Registry::default(), Registry::default());
        let (ma, _mb) = (
            PluginMetrics::register(&mut a),
            PluginMetrics::register(&mut b),
        );
        ma.failure("p", PluginKind::StatusOrdering, "PluginTrapped");
        assert!(scrape(&a).contains("reason=\"PluginTrapped\"} 1"));
        assert!(!scrape(&b).contains("PluginTrapped"));
    }
}
