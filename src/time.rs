//! Kubernetes timestamps from the clock and from the epoch milliseconds bases report.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

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
