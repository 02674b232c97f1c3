//! The process-wide wasmtime [`Engine`] and its epoch ticker.
//!
//! One Engine per process: wasmtime 48 leaks memory with an Engine per plugin, and the
//! precompiled-artefact cache is only valid for the settings fixed here.

use std::sync::OnceLock;
use std::time::Duration;

use wasmtime::{Config, Engine, OptLevel};

/// Period of the epoch ticker; call budgets are rounded up to whole ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Cap on the wasm stack of a call; deep recursion traps instead of exhausting the host stack.
pub(crate) const MAX_WASM_STACK: usize = 256 * 1024;

/// The shared Engine, created (with its ticker thread) on first use.
pub(crate) fn engine() -> Result<&'static Engine, String> {
    static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let engine = Engine::new(&config()).map_err(|e| format!("wasmtime engine: {e:#}"))?;
            start_ticker(engine.clone()).map_err(|e| format!("epoch ticker thread: {e}"))?;
            Ok(engine)
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn config() -> Config {
    let mut c = Config::new();
    c.wasm_component_model(true);
    // Time budgets: the ticker bumps the epoch, each Store gets a deadline in ticks.
    c.epoch_interruption(true);
    c.max_wasm_stack(MAX_WASM_STACK);
    c.cranelift_opt_level(OptLevel::Speed);
    c.parallel_compilation(true);
    c
}

fn start_ticker(engine: Engine) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("plugin-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })
        .map(|_| ())
}

/// Number of epoch ticks that covers `budget` (at least one, plus one for the tick in progress).
pub(crate) fn budget_ticks(budget: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos().max(1);
    let ticks = budget.as_nanos().div_ceil(tick);
    u64::try_from(ticks).unwrap_or(u64::MAX).saturating_add(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_rounds_up_to_ticks() {
        assert_eq!(budget_ticks(Duration::from_millis(50)), 51);
        assert_eq!(budget_ticks(Duration::from_micros(1)), 2);
        assert_eq!(budget_ticks(Duration::ZERO), 1);
    }
}
