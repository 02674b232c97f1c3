//! Executes one command against a base's state, taking the configured latency, and
//! builds the Arklet reply. Transport-neutral; callers serialise on `Shared::exec_lock`.

use std::time::Instant;

use module_controller::model::BaseCommand;
use module_controller::protocol::arklet::now_ms;

use super::Shared;
use super::wire::{self, Reply};

/// Runs `cmd` (waiting the install latency for installs, uninstalls and baselines).
pub(super) async fn execute(shared: &Shared, cmd: &BaseCommand) -> Reply {
    let id = shared.log_id();
    match cmd {
        // The old simulator has no install strategies (the Arklet double does).
        BaseCommand::Install(spec) | BaseCommand::Reinstall(spec) => {
            let started = Instant::now();
            tokio::time::sleep(shared.latency()).await;
            let outcome = shared.update(|s| s.install(spec, now_ms()));
            tracing::info!(base = %id, module = %spec.key(), ?outcome, "install");
            let resp = wire::install_response(&outcome, elapsed_ms(started));
            Reply::Operation(wire::biz_operation("installBiz", &spec.key(), resp))
        }
        BaseCommand::Uninstall(key) => {
            let started = Instant::now();
            tokio::time::sleep(shared.latency()).await;
            let removed = shared.update(|s| s.uninstall(key, now_ms()));
            tracing::info!(base = %id, module = %key, removed, "uninstall");
            let resp = wire::uninstall_response(elapsed_ms(started));
            Reply::Operation(wire::biz_operation("uninstallBiz", key, resp))
        }
        BaseCommand::QueryAllModules => {
            let modules = shared.state().modules();
            tracing::debug!(base = %id, count = modules.len(), "queryAllBiz");
            Reply::Modules(wire::module_list(&modules))
        }
        BaseCommand::QueryHealth => {
            tracing::debug!(base = %id, "health");
            Reply::Health(wire::health(&shared.cfg))
        }
        BaseCommand::Baseline(specs) => {
            let started = Instant::now();
            // Arklet installs a baseline's modules in parallel: one latency for all.
            tokio::time::sleep(shared.latency()).await;
            let results: Vec<_> = shared.update(|s| {
                let now = now_ms();
                specs
                    .iter()
                    .map(|spec| (spec.clone(), s.install(spec, now)))
                    .collect()
            });
            let failed = results.iter().filter(|(_, o)| !o.is_success()).count();
            tracing::info!(base = %id, count = specs.len(), failed, "baseline installed");
            Reply::Batch(wire::batch_response(&results, elapsed_ms(started)))
        }
    }
}

fn elapsed_ms(started: Instant) -> i64 {
    i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX)
}
