//! Plugin faults: what the controller reports (as Kubernetes Events) when a plugin traps,
//! overruns, returns nonsense or fails to load. Identical faults are rate-limited so a plugin
//! failing on every call cannot flood the channel; metrics count every occurrence.
//!
//! Load problems are also *retained*: each new subscriber first receives the load problems
//! current when it subscribed, so failures of the initial load (before the controller had a
//! chance to subscribe) still become Events.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tracing::warn;

use super::kind::PluginKind;
use super::telemetry::PluginMetrics;

/// Fault reasons (used as the Event reason and the failure metric label).
pub mod reasons {
    /// A call ran past its time budget and was interrupted.
    pub const TIMED_OUT: &str = "PluginTimedOut";
    /// A call trapped (panic, unreachable, a forbidden import called, stack overflow...).
    pub const TRAPPED: &str = "PluginTrapped";
    /// A call tried to grow memory past the cap.
    pub const OUT_OF_MEMORY: &str = "PluginOutOfMemory";
    /// A call returned output the host refuses (e.g. not a permutation).
    pub const INVALID_OUTPUT: &str = "PluginInvalidOutput";
    /// The plugin returned an error of its own.
    pub const RETURNED_ERROR: &str = "PluginReturnedError";
    /// A plugin file or the manifest could not be loaded; the previous version keeps serving
    /// (a batch policy bound without any loaded version fails every decision).
    pub const LOAD_FAILED: &str = "PluginLoadFailed";
    /// A Deployment selected a batch policy that is not loaded or not selectable.
    pub const NOT_FOUND: &str = "PluginNotFound";
}

/// Something went wrong with a plugin; the built-in default (or the previous version) decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginFault {
    /// Plugin name from the manifest (`plugins.json` for manifest errors).
    pub plugin: String,
    /// Kind of the plugin, when known.
    pub kind: PluginKind,
    /// One of [`reasons`].
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
    /// What the decision was for (e.g. `namespace/deployment`), when it was for one.
    pub subject: Option<String>,
}

type FaultKey = (String, String, Option<String>, String);

/// Beyond this many remembered faults, forget the expired ones.
const MAX_REMEMBERED: usize = 1024;

/// Sends faults to subscribers, dropping repeats of the same fault within `min_interval`.
#[derive(Debug)]
pub(crate) struct FaultSink {
    capacity: usize,
    min_interval: Duration,
    state: Mutex<SinkState>,
}

#[derive(Debug, Default)]
struct SinkState {
    /// One channel per subscriber, so each can be given the retained faults first.
    subscribers: Vec<broadcast::Sender<PluginFault>>,
    /// Current load problems, replayed to every new subscriber.
    retained: Vec<PluginFault>,
    last: HashMap<FaultKey, Instant>,
}

impl FaultSink {
    /// A sink whose channels keep `capacity` faults for slow receivers.
    pub(crate) fn new(capacity: usize, min_interval: Duration) -> Self {
        FaultSink {
            capacity: capacity.max(1),
            min_interval,
            state: Mutex::new(SinkState::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SinkState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver of the retained load problems, then of every fault emitted from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PluginFault> {
        let mut st = self.lock();
        // Under the lock, so a fault emitted concurrently is either retained or sent, once.
        let (tx, rx) = broadcast::channel(self.capacity + st.retained.len());
        for f in &st.retained {
            let _ = tx.send(f.clone());
        }
        st.subscribers.push(tx);
        rx
    }

    /// Logs and broadcasts `fault` unless the same one was sent within the interval.
    pub(crate) fn emit(&self, fault: PluginFault) {
        let mut st = self.lock();
        self.send(&mut st, fault);
    }

    /// Like [`FaultSink::emit`], and keeps `fault` for subscribers that come later (until
    /// [`FaultSink::retain`] replaces the set).
    pub(crate) fn emit_load(&self, fault: PluginFault) {
        let mut st = self.lock();
        st.retained.push(fault.clone());
        self.send(&mut st, fault);
    }

    /// Replaces the retained load problems with the current ones (resolved ones are dropped).
    pub(crate) fn retain(&self, current: Vec<PluginFault>) {
        self.lock().retained = current;
    }

    fn send(&self, st: &mut SinkState, fault: PluginFault) {
        let key = (
            fault.plugin.clone(),
            fault.reason.clone(),
            fault.subject.clone(),
            fault.message.clone(),
        );
        let now = Instant::now();
        if let Some(at) = st.last.get(&key)
            && now.duration_since(*at) < self.min_interval
        {
            return;
        }
        if st.last.len() >= MAX_REMEMBERED {
            let window = self.min_interval;
            st.last.retain(|_, at| now.duration_since(*at) < window);
        }
        st.last.insert(key, now);
        warn!(
            plugin = %fault.plugin,
            kind = %fault.kind,
            reason = %fault.reason,
            subject = fault.subject.as_deref().unwrap_or(""),
            message = %fault.message,
            "plugin fault"
        );
        // No receiver is fine: the fault is logged and counted anyway.
        st.subscribers.retain(|tx| tx.receiver_count() > 0);
        for tx in &st.subscribers {
            let _ = tx.send(fault.clone());
        }
    }
}

/// Counts, logs and reports a failed call of one plugin; shared by every kind's wrapper.
#[derive(Debug, Clone)]
pub(crate) struct Reporter {
    /// Where faults go.
    pub faults: Arc<FaultSink>,
    /// Where counts go.
    pub metrics: PluginMetrics,
}

impl Reporter {
    /// Reports a failure of `plugin`; returns `"<reason>: <message>"` for the caller's error.
    pub(crate) fn fail(
        &self,
        plugin: &str,
        kind: PluginKind,
        subject: Option<&str>,
        reason: &str,
        message: String,
    ) -> String {
        self.metrics.failure(plugin, kind, reason);
        let text = format!("{reason}: {message}");
        self.faults.emit(PluginFault {
            plugin: plugin.to_string(),
            kind,
            reason: reason.to_string(),
            message,
            subject: subject.map(str::to_string),
        });
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(msg: &str) -> PluginFault {
        PluginFault {
            plugin: "p".into(),
            kind: PluginKind::StatusOrdering,
            reason: reasons::TRAPPED.into(),
            message: msg.into(),
            subject: None,
        }
    }

    fn messages(rx: &mut broadcast::Receiver<PluginFault>) -> Vec<String> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(|f| f.message)
            .collect()
    }

    #[test]
    fn repeats_are_rate_limited_but_distinct_faults_pass() {
        let sink = FaultSink::new(16, Duration::from_secs(60));
        let mut rx = sink.subscribe();
        sink.emit(fault("a"));
        sink.emit(fault("a"));
        sink.emit(fault("b"));
        assert_eq!(
            messages(&mut rx),
            ["a", "b"],
            "the repeat of `a` is dropped"
        );
    }

    #[test]
    fn zero_interval_sends_everything() {
        let sink = FaultSink::new(16, Duration::ZERO);
        let mut rx = sink.subscribe();
        sink.emit(fault("a"));
        sink.emit(fault("a"));
        assert_eq!(messages(&mut rx), ["a", "a"]);
    }

    #[test]
    fn load_faults_reach_subscribers_that_come_later() {
        let sink = FaultSink::new(16, Duration::ZERO);
        let mut early = sink.subscribe();
        sink.emit_load(fault("load"));
        sink.emit(fault("call"));
        let mut late = sink.subscribe();
        // The early subscriber saw both live; the late one gets the load problem (not the
        // call fault, which is not a standing problem) and then live faults.
        assert_eq!(messages(&mut early), ["load", "call"]);
        sink.emit(fault("after"));
        assert_eq!(messages(&mut late), ["load", "after"]);
        // Control: once the problem is resolved, a new subscriber gets nothing old.
        sink.retain(Vec::new());
        let mut fresh = sink.subscribe();
        assert!(messages(&mut fresh).is_empty());
    }

    #[test]
    fn dropped_subscribers_are_forgotten() {
        let sink = FaultSink::new(16, Duration::ZERO);
        drop(sink.subscribe());
        let mut rx = sink.subscribe();
        sink.emit(fault("a"));
        assert_eq!(sink.lock().subscribers.len(), 1);
        assert_eq!(messages(&mut rx), ["a"]);
    }
}
