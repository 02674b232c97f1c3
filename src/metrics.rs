//! Process-wide Prometheus registry. Each module registers its own metric families here.

use std::sync::{Mutex, OnceLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::registry::{Metric, Registry};

fn registry() -> &'static Mutex<Registry> {
    static REG: OnceLock<Mutex<Registry>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(Registry::with_prefix("module_controller")))
}

/// Registers a metric family (call once per family, e.g. from a `OnceLock` initialiser).
pub fn register(name: &str, help: &str, metric: impl Metric) {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.register(name, help, metric);
}

/// Text exposition of every registered metric.
pub fn render() -> String {
    let reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}
