//! One bounded call into a plugin: a fresh Store per call from the version's `InstancePre`,
//! a time budget (epoch deadline), a memory cap (resource limiter) and the stack cap set on
//! the Engine; failures are classified for faults and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, error, info, trace, warn};
use wasmtime::component::{HasSelf, InstancePre, Linker};
use wasmtime::{Engine, ResourceLimiter, Store, Trap, UpdateDeadline};

use super::bindings::{wit_host, wit_rollout_context};
use super::engine::budget_ticks;
use super::faults::reasons;

/// However starved of CPU a call is, it is interrupted after this many budgets of wall time.
const WALL_CAP_FACTOR: u32 = 4;

/// What one table element costs against the memory cap: wasmtime keeps a pointer per element.
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

/// Per-call resource caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// CPU-time budget of one call, instantiation included (wall time is capped at
    /// `WALL_CAP_FACTOR` budgets).
    pub budget: Duration,
    /// Cap on one instance: all its linear memories and tables together.
    pub memory_bytes: usize,
}

/// Refuses memory and table growth that would take the instance (every memory and table of
/// the Store, which holds exactly one component instance) past the cap, remembering that it
/// did. A cap per memory would let a component with several memories, or huge tables, use a
/// multiple of it.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    limit: usize,
    used: usize,
    peak: usize,
    exceeded: bool,
}

impl MemoryLimiter {
    fn new(limit: usize) -> Self {
        MemoryLimiter {
            limit,
            used: 0,
            peak: 0,
            exceeded: false,
        }
    }

    /// Accounts one memory or table going from `current` to `desired` bytes. Growth that
    /// wasmtime then fails for another reason stays counted: conservative, it can only make the
    /// cap bite earlier.
    fn grow(&mut self, what: &str, current: usize, desired: usize) -> wasmtime::Result<bool> {
        let next = self.used.saturating_sub(current).saturating_add(desired);
        if next > self.limit {
            self.exceeded = true;
            // An error traps right at the growth, so the cause is precise.
            wasmtime::bail!(
                "instance memory limit exceeded: growing a {what} to {desired} bytes would take \
                 the instance to {next} bytes, cap is {}",
                self.limit
            );
        }
        self.used = next;
        self.peak = self.peak.max(next);
        Ok(true)
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow("memory", current, desired)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(
            "table",
            current.saturating_mul(TABLE_ELEMENT_BYTES),
            desired.saturating_mul(TABLE_ELEMENT_BYTES),
        )
    }

    fn instances(&self) -> usize {
        64
    }

    fn tables(&self) -> usize {
        64
    }

    fn memories(&self) -> usize {
        4
    }
}

/// Data of one call's Store: what the host imports answer.
pub(crate) struct CallState {
    plugin: Arc<str>,
    config: Arc<str>,
    annotations: Option<Arc<BTreeMap<String, String>>>,
    limiter: MemoryLimiter,
}

impl wit_host::Host for CallState {
    fn log(&mut self, level: wit_host::LogLevel, message: String) {
        let plugin = &*self.plugin;
        match level {
            wit_host::LogLevel::Trace => trace!(plugin, "{message}"),
            wit_host::LogLevel::Debug => debug!(plugin, "{message}"),
            wit_host::LogLevel::Info => info!(plugin, "{message}"),
            wit_host::LogLevel::Warn => warn!(plugin, "{message}"),
            wit_host::LogLevel::Error => error!(plugin, "{message}"),
        }
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }
}

impl wit_rollout_context::Host for CallState {
    fn annotation(&mut self, key: String) -> Option<String> {
        self.annotations.as_ref()?.get(&key).cloned()
    }
}

/// A linker with every host import plugins may use.
pub(crate) fn base_linker(engine: &Engine) -> wasmtime::Result<Linker<CallState>> {
    let mut linker = Linker::new(engine);
    wit_host::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)?;
    wit_rollout_context::add_to_linker::<CallState, HasSelf<CallState>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// What one call is for.
pub(crate) struct CallContext {
    /// Plugin name (logs).
    pub plugin: Arc<str>,
    /// Plugin config string.
    pub config: Arc<str>,
    /// Annotations of the owning Deployment (batch calls only).
    pub annotations: Option<Arc<BTreeMap<String, String>>>,
}

/// Why a plugin call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallFailure {
    /// One of the fault [`reasons`](super::reasons).
    pub reason: &'static str,
    /// Detail.
    pub message: String,
}

impl std::fmt::Display for CallFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// Figures of a finished call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallStats {
    /// Wall time, instantiation included.
    pub elapsed: Duration,
    /// Largest size of the instance (memories and tables) reached.
    pub peak_memory: usize,
}

/// Instantiates `pre` in a fresh Store and runs `f` on the instance, within `limits`.
pub(crate) fn invoke<R>(
    engine: &Engine,
    pre: &InstancePre<CallState>,
    limits: Limits,
    ctx: CallContext,
    f: impl FnOnce(&mut Store<CallState>, &wasmtime::component::Instance) -> wasmtime::Result<R>,
) -> (Result<R, CallFailure>, CallStats) {
    let start = Instant::now();
    let state = CallState {
        plugin: ctx.plugin,
        config: ctx.config,
        annotations: ctx.annotations,
        limiter: MemoryLimiter::new(limits.memory_bytes),
    };
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limiter);
    // The epoch deadline fires after `budget` of wall time; the callback then charges only
    // the CPU time this thread really spent, so a call preempted on a busy node is not
    // failed for time it never had, while the wall cap still bounds a starved one.
    store.set_epoch_deadline(budget_ticks(limits.budget));
    let cpu_start = thread_cpu_time();
    let budget = limits.budget;
    let wall_cap = budget.saturating_mul(WALL_CAP_FACTOR);
    store.epoch_deadline_callback(move |_| {
        let cpu_used = match (cpu_start, thread_cpu_time()) {
            (Some(a), Some(b)) => b.saturating_sub(a),
            _ => start.elapsed(),
        };
        if cpu_used >= budget || start.elapsed() >= wall_cap {
            return Ok(UpdateDeadline::Interrupt);
        }
        // Check again when either the CPU budget or the wall cap could run out.
        let next = (budget - cpu_used).min(wall_cap.saturating_sub(start.elapsed()));
        Ok(UpdateDeadline::Continue(budget_ticks(next)))
    });
    let result = pre
        .instantiate(&mut store)
        .and_then(|instance| f(&mut store, &instance));
    let limiter = &store.data().limiter;
    let stats = CallStats {
        elapsed: start.elapsed(),
        peak_memory: limiter.peak,
    };
    let result = result.map_err(|e| classify(&e, limiter.exceeded, limits, stats.elapsed));
    (result, stats)
}

/// CPU time consumed by the calling thread so far (None where the clock is unavailable).
pub(crate) fn thread_cpu_time() -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid, exclusively borrowed `ts`.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return None;
    }
    Some(Duration::new(
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    ))
}

fn classify(
    e: &wasmtime::Error,
    memory_exceeded: bool,
    limits: Limits,
    elapsed: Duration,
) -> CallFailure {
    if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        return CallFailure {
            reason: reasons::TIMED_OUT,
            message: format!(
                "interrupted after {} ms (CPU budget {} ms)",
                elapsed.as_millis(),
                limits.budget.as_millis()
            ),
        };
    }
    if memory_exceeded {
        return CallFailure {
            reason: reasons::OUT_OF_MEMORY,
            message: format!(
                "instance memory cap of {} bytes exceeded: {e:#}",
                limits.memory_bytes
            ),
        };
    }
    CallFailure {
        reason: reasons::TRAPPED,
        message: format!("{e:#}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_covers_every_memory_and_table_together() {
        let mut l = MemoryLimiter::new(10 << 20);
        // Two memories of 4 MiB each fit...
        assert!(l.memory_growing(0, 4 << 20, None).is_ok());
        assert!(l.memory_growing(0, 4 << 20, None).is_ok());
        // ...a third would be within a per-memory cap but not the instance's.
        assert!(l.memory_growing(0, 4 << 20, None).is_err());
        assert!(l.exceeded);
        // Tables count too (a pointer per element).
        let mut l = MemoryLimiter::new(10 << 20);
        assert!(l.memory_growing(0, 8 << 20, None).is_ok());
        assert!(
            l.table_growing(0, (4 << 20) / TABLE_ELEMENT_BYTES, None)
                .is_err()
        );
        // Control: growing one memory in place counts only the difference.
        let mut l = MemoryLimiter::new(10 << 20);
        for mib in 1..=10 {
            assert!(l.memory_growing((mib - 1) << 20, mib << 20, None).is_ok());
        }
        assert_eq!(l.peak, 10 << 20);
        assert!(!l.exceeded);
    }
}
