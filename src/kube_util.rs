//! Small Kubernetes glue shared by the writers: timestamps, object references, Events, and the
//! process-wide limit on concurrent apiserver writes.

use std::sync::{Arc, OnceLock};

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Now, as a Kubernetes `Time` (second precision on the wire).
pub fn now_time() -> Time {
    Time(Timestamp::now())
}

/// Now, as a Kubernetes `MicroTime`.
pub fn now_micro() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// Epoch milliseconds as a `Time`, if representable.
pub fn time_from_ms(ms: i64) -> Option<Time> {
    Timestamp::from_millisecond(ms).ok().map(Time)
}

/// Epoch seconds of a `Time`.
pub fn time_secs(t: &Time) -> i64 {
    t.0.as_second()
}

/// An `ObjectReference` to a pod (for Events).
pub fn pod_ref(pod: &Pod) -> ObjectReference {
    pod.object_ref(&())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WriteLabel {
    kind: String,
    result: String,
}

fn write_counter() -> &'static Family<WriteLabel, Counter> {
    static F: OnceLock<Family<WriteLabel, Counter>> = OnceLock::new();
    F.get_or_init(|| {
        let f = Family::default();
        crate::metrics::register(
            "apiserver_writes",
            "Writes to the apiserver, by object kind and result",
            f.clone(),
        );
        f
    })
}

/// Counts one apiserver write.
pub fn count_write(kind: &str, ok: bool) {
    write_counter()
        .get_or_create(&WriteLabel {
            kind: kind.to_string(),
            result: if ok { "ok" } else { "error" }.to_string(),
        })
        .inc();
}

/// Total apiserver writes of `kind` that succeeded (for benchmarks and tests).
pub fn writes_ok(kind: &str) -> u64 {
    write_counter()
        .get_or_create(&WriteLabel {
            kind: kind.to_string(),
            result: "ok".to_string(),
        })
        .get()
}

/// Shared handles every writer needs.
#[derive(Clone)]
pub struct KubeCtx {
    /// The client.
    pub client: kube::Client,
    /// Limits concurrent writes (`VNODE_WORKER_NUM`).
    pub writes: Arc<Semaphore>,
    /// Publishes Events.
    pub recorder: Recorder,
}

impl KubeCtx {
    /// Builds the context.
    pub fn new(client: kube::Client, workers: usize, instance: &str) -> Self {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "module-controller".into(),
                instance: Some(instance.to_string()),
            },
        );
        KubeCtx {
            client,
            writes: Arc::new(Semaphore::new(workers.max(1))),
            recorder,
        }
    }

    /// Publishes an Event about `object`; failures are logged, never fatal.
    pub async fn event(
        &self,
        object: &ObjectReference,
        warning: bool,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let ev = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: truncate(reason, 128),
            note: Some(truncate(&note, 1000)),
            action: truncate(action, 128),
            secondary: None,
        };
        let _permit = self.writes.acquire().await;
        match self.recorder.publish(&ev, object).await {
            Ok(()) => {
                count_write("event", true);
                debug!(reason, name = ?object.name, "event published");
            }
            Err(e) => {
                count_write("event", false);
                warn!(reason, name = ?object.name, error = %e, "event could not be published");
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
