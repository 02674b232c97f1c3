//! One task per base. What the base says and which pods are bound to its VNode go in; pure
//! decisions ([`plan`], [`ledger`], [`node_sync`]) say what to do; the effects executor sends
//! commands to the base and writes to the apiserver, in a safe order.

pub mod actor;
mod backoff;
pub mod effects;
pub mod ledger;
pub mod msg;
pub mod node_sync;
pub mod plan;
#[cfg(test)]
mod testing;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

pub use actor::{ActorExit, ActorSettings, BaseActor, StatusOrder};
pub use effects::EffectsDeps;
pub use msg::{BaseMsg, WantedModules, WantedModulesTx};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CmdLabel {
    command: &'static str,
    result: &'static str,
}

/// Counters of the base tasks.
#[derive(Clone, Debug, Default)]
pub struct BaseMetrics {
    commands: Family<CmdLabel, Counter>,
    plans: Counter,
}

impl BaseMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = BaseMetrics::default();
        registry.register(
            "base_commands",
            "Commands sent to bases, by command and result (sent, retry, send_failed)",
            m.commands.clone(),
        );
        registry.register(
            "base_plans",
            "Plans the base tasks made (news from a base or its pods, or a deadline, starts one)",
            m.plans.clone(),
        );
        for command in ["install", "uninstall", "query_all", "health", "baseline"] {
            for result in ["sent", "send_failed"] {
                let _ = m.commands.get_or_create(&CmdLabel { command, result });
            }
        }
        m
    }

    /// Counts a command by result.
    pub fn count(&self, command: &'static str, result: &'static str) {
        self.commands
            .get_or_create(&CmdLabel { command, result })
            .inc();
    }

    /// Counts a plan.
    pub fn count_plan(&self) {
        self.plans.inc();
    }

    /// Plans made so far.
    pub fn plans(&self) -> u64 {
        self.plans.get()
    }

    /// Commands of `command` kind counted with `result` so far.
    pub fn commands(&self, command: &'static str, result: &'static str) -> u64 {
        self.commands
            .get_or_create(&CmdLabel { command, result })
            .get()
    }
}
