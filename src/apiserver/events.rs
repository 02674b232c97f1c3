//! Kubernetes Events (events.k8s.io/v1), where users look when something goes wrong.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tracing::{debug, warn};

use super::Api;

/// Longest Event reason the apiserver accepts.
const MAX_REASON: usize = 128;
/// Longest Event note the apiserver accepts (1 kB).
const MAX_NOTE: usize = 1000;

/// Publishes Events as this controller instance.
#[derive(Clone)]
pub struct EventSink {
    recorder: Recorder,
}

impl EventSink {
    /// A sink reporting as `module-controller`, instance `instance`.
    pub fn new(client: kube::Client, instance: &str) -> Self {
        EventSink {
            recorder: Recorder::new(
                client,
                Reporter {
                    controller: "module-controller".into(),
                    instance: Some(instance.to_string()),
                },
            ),
        }
    }
}

/// An Event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Warning (true) or Normal.
    pub warning: bool,
    /// Reason (CamelCase, no dots).
    pub reason: String,
    /// What the controller was doing.
    pub action: String,
    /// The text users read.
    pub note: String,
}

impl Api {
    /// Publishes an Event about `object`; a failure is logged and counted, never fatal.
    pub async fn event(&self, object: &ObjectReference, notice: Notice) -> bool {
        let ev = Event {
            type_: if notice.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: truncate(&notice.reason, MAX_REASON),
            note: Some(truncate(&notice.note, MAX_NOTE)),
            action: truncate(&notice.action, MAX_REASON),
            secondary: None,
        };
        let _permit = self.module_permit().await;
        match self.timed(self.events.recorder.publish(&ev, object)).await {
            Ok(()) => {
                self.metrics.count("event", true);
                debug!(reason = %notice.reason, name = ?object.name, "event published");
                true
            }
            Err(e) => {
                self.metrics.count("event", false);
                warn!(reason = %notice.reason, name = ?object.name, error = %e, "event could not be published");
                false
            }
        }
    }
}

/// Truncates to at most `max` bytes on a char boundary.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
    }
}
