//! Plugin faults: what the controller reports (as Kubernetes Events) when a plugin traps,
//! overruns, returns nonsense or fails to load. Identical faults are rate-limited so a plugin
//! failing on every call cannot flood the channel; metrics count every occurrence.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use tracing::warn;

use super::PluginKind;

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
    /// A plugin file or the manifest could not be loaded; the previous version keeps serving.
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

/// Sends faults to subscribers, dropping repeats of the same fault within `min_interval`.
#[derive(Debug)]
pub(crate) struct FaultSink {
    tx: broadcast::Sender<PluginFault>,
    min_interval: Duration,
    last: Mutex<HashMap<FaultKey, Instant>>,
}

/// Beyond this many remembered faults, forget the expired ones.
const MAX_REMEMBERED: usize = 1024;

impl FaultSink {
    /// A sink whose channel keeps `capacity` faults for slow receivers.
    pub(crate) fn new(capacity: usize, min_interval: Duration) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(1));
        FaultSink {
            tx,
            min_interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// A new receiver of faults emitted from now on.
    pub(crate) fn subscribe(&self) -> broadcast::Receiver<PluginFault> {
        self.tx.subscribe()
    }

    /// Logs and broadcasts `fault` unless the same one was sent within the interval.
    pub(crate) fn emit(&self, fault: PluginFault) {
        let key = (
            fault.plugin.clone(),
            fault.reason.clone(),
            fault.subject.clone(),
            fault.message.clone(),
        );
        let now = Instant::now();
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(at) = last.get(&key)
                && now.duration_since(*at) < self.min_interval
            {
                return;
            }
            if last.len() >= MAX_REMEMBERED {
                let window = self.min_interval;
                last.retain(|_, at| now.duration_since(*at) < window);
            }
            last.insert(key, now);
        }
        warn!(
            plugin = %fault.plugin,
            kind = %fault.kind,
            reason = %fault.reason,
            subject = fault.subject.as_deref().unwrap_or(""),
            message = %fault.message,
            "plugin fault"
        );
        // No receiver is fine: the fault is logged and counted anyway.
        let _ = self.tx.send(fault);
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

    #[test]
    fn repeats_are_rate_limited_but_distinct_faults_pass() {
        let sink = FaultSink::new(16, Duration::from_secs(60));
        let mut rx = sink.subscribe();
        sink.emit(fault("a"));
        sink.emit(fault("a"));
        sink.emit(fault("b"));
        assert_eq!(rx.try_recv().map(|f| f.message), Ok("a".to_string()));
        assert_eq!(rx.try_recv().map(|f| f.message), Ok("b".to_string()));
        assert!(rx.try_recv().is_err(), "the repeat of `a` must be dropped");
    }

    #[test]
    fn zero_interval_sends_everything() {
        let sink = FaultSink::new(16, Duration::ZERO);
        let mut rx = sink.subscribe();
        sink.emit(fault("a"));
        sink.emit(fault("a"));
        assert!(rx.try_recv().is_ok());
        assert!(rx.try_recv().is_ok());
    }
}
