//! Plugin template: a status-ordering plugin that keeps the input order in one wave (the
//! host still moves every NotReady write before the Ready ones). Copy this crate, rename it
//! in its Cargo.toml and in the workspace members, and replace `order` with your rule. For a
//! batch policy or a tunnel adapter depend on `batch-sdk` / `tunnel-sdk` instead.

use ordering_sdk::host::{self, LogLevel};
use ordering_sdk::{Metadata, Ordering, PluginInfo, StatusChange};

struct Template;

impl Metadata for Template {
    fn info() -> PluginInfo {
        ordering_sdk::info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
    }

    fn init(config: String) -> Result<(), String> {
        // Validate the manifest's config here: an error refuses this version of the plugin
        // and the previous one (or the built-in default) keeps serving.
        host::log(
            LogLevel::Debug,
            &format!("init with {} bytes of config", config.len()),
        );
        Ok(())
    }

    fn self_check() -> Result<(), String> {
        let got = <Template as Ordering>::order(Vec::new())?;
        if got.iter().flatten().count() != 0 {
            return Err("empty input must give no indices".into());
        }
        Ok(())
    }
}

impl Ordering for Template {
    fn order(changes: Vec<StatusChange>) -> Result<Vec<Vec<u32>>, String> {
        Ok(vec![(0..changes.len() as u32).collect()])
    }
}

ordering_sdk::export_plugin!(Template);
