//! The VNode of one base: what the base says about itself (heartbeat, health, liveness) and
//! which Node, Node status and Lease writes are due. Pure: the base task performs the writes
//! and reports back what succeeded.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::model::{BaseHealth, BaseHeartbeat, BaseLifecycle};
use crate::time::now_time;
use crate::vnode::liveness::{Liveness, LivenessPolicy};
use crate::vnode::shape::{self, NodeReadiness, NodeShapeInput};

/// Node status is rewritten at least this often while nothing changes, as the kubelet does
/// (its `nodeStatusReportFrequency`): the node lifecycle controller may overwrite the Ready
/// condition, and nodes are not watched. The Lease is the heartbeat in between.
const NODE_STATUS_REFRESH: Duration = Duration::from_secs(300);
/// First wait after a failed VNode write before the next attempt.
const RETRY_FIRST: Duration = Duration::from_millis(500);
/// Longest wait between attempts: far inside the node-monitor grace period (40 s by default),
/// so that the Lease is renewed within seconds once the apiserver answers again.
const RETRY_CAP: Duration = Duration::from_secs(5);

/// What a base task should do about its base's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Keep serving; `true` while the base is alive.
    Serve(bool),
    /// The base announced its shutdown: drain the VNode.
    Drain,
    /// The base stayed silent beyond the VNode TTL: remove the VNode.
    Expire,
}

/// Writes due for the VNode.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeWrites {
    /// Apply the Node's metadata and spec.
    pub apply: Option<Node>,
    /// Write the Node status (after a successful apply, when one is due).
    pub status: Option<NodeStatus>,
    /// Renew the Lease.
    pub lease: bool,
}

/// What the VNode of a base is made from, besides what the base says.
#[derive(Debug, Clone, Copy)]
pub struct VNodeParams<'a> {
    /// Controller env.
    pub env: &'a str,
    /// The tunnel (adapter) the base speaks.
    pub tunnel: &'a str,
    /// Add the env taint.
    pub env_taint: bool,
    /// Lease renewal period.
    pub lease_every: Duration,
    /// The module URLs to record on the VNode.
    pub module_urls: &'a str,
}

/// A base's VNode state.
#[derive(Debug)]
pub struct NodeSync {
    /// Latest heartbeat.
    pub heartbeat: Option<BaseHeartbeat>,
    /// Latest health report.
    health: Option<BaseHealth>,
    /// Something the Node or its status is made of changed since the last writes.
    dirty: bool,
    last_seen: Instant,
    draining: bool,
    liveness: Liveness,
    ready_since: Time,
    node_uid: Option<String>,
    /// What the last applied Node was made of (labels, annotations, spec), as a fingerprint:
    /// the Node itself, kept for the comparison, was some 4 KB a base.
    applied: Option<u64>,
    status: Option<NodeStatus>,
    status_at: Option<Instant>,
    lease_at: Option<Instant>,
    /// Failed VNode writes in a row, and when the next attempt may start. A write that fails
    /// at once (an apiserver known to be down) would otherwise be retried in a busy loop.
    retry: Option<(u32, Instant)>,
}

impl NodeSync {
    /// A base first heard of (or adopted) at `now`.
    pub fn new(now: Instant) -> Self {
        NodeSync {
            heartbeat: None,
            health: None,
            dirty: true,
            last_seen: now,
            draining: false,
            liveness: Liveness::Alive,
            ready_since: now_time(),
            node_uid: None,
            applied: None,
            status: None,
            status_at: None,
            lease_at: None,
            retry: None,
        }
    }

    /// The base said something: it is alive.
    pub fn seen(&mut self, now: Instant) {
        self.last_seen = now;
    }

    /// Whether the base was considered silent (or expired) until now.
    pub fn was_silent(&self) -> bool {
        self.liveness != Liveness::Alive
    }

    /// A heartbeat arrived; a `deactivated` one starts the drain. True when it says something
    /// the last one did not.
    pub fn on_heartbeat(&mut self, hb: BaseHeartbeat, now: Instant) -> bool {
        self.seen(now);
        if hb.lifecycle == BaseLifecycle::Deactivated {
            self.draining = true;
        }
        let changed = self.heartbeat.as_ref() != Some(&hb);
        if changed {
            self.dirty = true;
            self.heartbeat = Some(hb);
        }
        changed
    }

    /// A health report arrived.
    pub fn on_health(&mut self, health: BaseHealth) {
        if self.health != Some(health) {
            self.dirty = true;
            self.health = Some(health);
        }
    }

    /// Decides the base's fate now; a liveness change is returned for the log.
    pub fn assess(
        &mut self,
        policy: &LivenessPolicy,
        now: Instant,
    ) -> (Verdict, Option<(Liveness, Liveness)>) {
        if self.draining {
            return (Verdict::Drain, None);
        }
        let liveness = policy.assess(self.last_seen, now);
        if liveness == Liveness::Expired {
            return (Verdict::Expire, None);
        }
        let mut changed = None;
        if liveness != self.liveness {
            changed = Some((self.liveness, liveness));
            self.liveness = liveness;
            self.ready_since = now_time();
            self.dirty = true;
        }
        (Verdict::Serve(liveness == Liveness::Alive), changed)
    }

    /// The base's IP, the pods' podIP.
    pub fn base_ip(&self) -> &str {
        self.heartbeat
            .as_ref()
            .map(|h| h.local_ip.as_str())
            .unwrap_or_default()
    }

    /// The writes due now.
    pub fn due(&self, vnode: &VNodeParams<'_>, alive: bool, now: Instant) -> NodeWrites {
        let VNodeParams {
            env,
            tunnel,
            env_taint,
            lease_every,
            module_urls,
        } = *vnode;
        let lease = alive
            && self
                .lease_at
                .is_none_or(|t| now.saturating_duration_since(t) >= lease_every);
        let stale = self
            .status_at
            .is_none_or(|t| now.saturating_duration_since(t) >= NODE_STATUS_REFRESH);
        if !self.dirty && !stale && self.node_uid.is_some() {
            // Steady state: only the Lease, when due.
            return NodeWrites {
                lease,
                ..Default::default()
            };
        }
        let Some(hb) = &self.heartbeat else {
            // An adopted VNode whose base has not spoken since we started: only mark it NotReady.
            let status = (!alive && self.status.is_none()).then(not_ready_minimal);
            return NodeWrites {
                status,
                ..Default::default()
            };
        };
        let input = NodeShapeInput {
            heartbeat: hb,
            health: self.health.as_ref(),
            env,
            tunnel,
            env_taint,
            module_urls: Some(module_urls),
        };
        let desired = shape::node(&input);
        let apply = (self.node_uid.is_none() || self.applied != Some(fingerprint(&desired)))
            .then_some(desired);
        let readiness = if alive {
            NodeReadiness::Ready
        } else {
            NodeReadiness::NotReady
        };
        let status = shape::status(&input, readiness, self.ready_since.clone(), now_time());
        // A Node being created (or re-created) needs its status; an apply that only changes
        // metadata (e.g. the module URLs annotation) leaves the status as it was.
        let status = (self.node_uid.is_none()
            || stale
            || self
                .status
                .as_ref()
                .is_none_or(|w| shape::status_differs(w, &status)))
        .then_some(status);
        NodeWrites {
            apply,
            status,
            lease,
        }
    }

    /// Whether the Node was ever applied by this task.
    pub fn applied_once(&self) -> bool {
        self.applied.is_some()
    }

    /// The uid of the Node, once applied.
    pub fn node_uid(&self) -> Option<&str> {
        self.node_uid.as_deref()
    }

    /// The Node was applied.
    pub fn node_applied(&mut self, node: Node, uid: Option<String>) {
        // Another object (first apply, or re-created after a deletion): its status is unknown.
        if uid.is_none() || uid != self.node_uid {
            self.status = None;
        }
        self.node_uid = uid;
        self.applied = Some(fingerprint(&node));
    }

    /// The Node status was written.
    pub fn status_written(&mut self, status: NodeStatus, now: Instant) {
        self.status = Some(status);
        self.status_at = Some(now);
        self.dirty = false;
    }

    /// The writes due were checked and none was needed: nothing to compute until a change.
    pub fn settled(&mut self) {
        if self.status.is_some() && self.node_uid.is_some() {
            self.dirty = false;
        }
    }

    /// The base's health, when reported.
    pub fn health(&self) -> Option<&BaseHealth> {
        self.health.as_ref()
    }

    /// The Node is gone (deleted by someone else): apply it again.
    pub fn node_missing(&mut self) {
        self.node_uid = None;
        self.dirty = true;
    }

    /// Something the Node is made of changed outside the base (e.g. module URLs to record).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// The Lease was renewed.
    pub fn lease_renewed(&mut self, now: Instant) {
        self.lease_at = Some(now);
    }

    /// Whether VNode writes wait out the backoff of a failure.
    pub fn backing_off(&self, now: Instant) -> bool {
        self.retry.is_some_and(|(_, at)| now < at)
    }

    /// A VNode write failed at `now`: the next attempt waits (doubling, capped). Returns the
    /// failures in a row, so that the caller logs the first one of a streak only.
    pub fn write_failed(&mut self, now: Instant) -> u32 {
        let failures = self.retry.map_or(0, |(n, _)| n) + 1;
        let wait = RETRY_FIRST
            .saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(16)))
            .min(RETRY_CAP);
        self.retry = Some((failures, now + wait));
        failures
    }

    /// The VNode writes went through: the failure streak (its length returned) ends.
    pub fn writes_succeeded(&mut self) -> Option<u32> {
        self.retry.take().map(|(n, _)| n)
    }
}

fn not_ready_minimal() -> NodeStatus {
    NodeStatus {
        conditions: Some(vec![NodeCondition {
            type_: "Ready".into(),
            status: "False".into(),
            reason: Some("BaseUnreachable".into()),
            message: Some("base has not sent a heartbeat since the controller started".into()),
            last_heartbeat_time: Some(now_time()),
            last_transition_time: Some(now_time()),
        }]),
        ..Default::default()
    }
}

/// A fingerprint of what an apply of `node` sets: its labels, annotations and spec.
fn fingerprint(node: &Node) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node.metadata.labels.hash(&mut h);
    node.metadata.annotations.hash(&mut h);
    // The spec's types do not implement Hash; their JSON is deterministic (fields in order).
    serde_json::to_string(&node.spec)
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BaseHealth;

    use crate::base::testing::heartbeat as hb;

    const POLICY: LivenessPolicy = LivenessPolicy {
        timeout: Duration::from_secs(3),
        ttl: Duration::from_secs(60),
    };
    const LEASE: Duration = Duration::from_secs(1);
    const P: VNodeParams<'static> = VNodeParams {
        env: "dev",
        tunnel: "mqtt",
        env_taint: true,
        lease_every: LEASE,
        module_urls: "{}",
    };

    #[test]
    fn failed_writes_back_off_doubling_up_to_the_cap_and_a_success_ends_the_streak() {
        let t0 = Instant::now();
        let mut n = NodeSync::new(t0);
        assert!(!n.backing_off(t0));
        assert_eq!(n.write_failed(t0), 1);
        assert!(n.backing_off(t0));
        assert!(n.backing_off(t0 + RETRY_FIRST - Duration::from_millis(1)));
        assert!(!n.backing_off(t0 + RETRY_FIRST));
        let mut t = t0;
        for _ in 0..10 {
            n.write_failed(t);
            t += RETRY_CAP;
        }
        assert!(n.backing_off(t - Duration::from_millis(1)));
        assert!(!n.backing_off(t), "the wait is capped at {RETRY_CAP:?}");
        assert_eq!(n.writes_succeeded(), Some(11));
        assert!(!n.backing_off(t0));
        assert_eq!(n.writes_succeeded(), None);
    }

    #[test]
    fn a_new_base_applies_writes_status_and_renews_then_nothing_until_due() {
        let t0 = Instant::now();
        let mut n = NodeSync::new(t0);
        n.on_heartbeat(hb(BaseLifecycle::Activated), t0);
        let w = n.due(&P, true, t0);
        let node = w.apply.clone().expect("apply");
        assert!(w.status.is_some() && w.lease);
        n.node_applied(node, Some("uid".into()));
        n.status_written(w.status.expect("status"), t0);
        n.lease_renewed(t0);
        let w = n.due(&P, true, t0 + Duration::from_millis(500));
        assert_eq!(w, NodeWrites::default(), "nothing changed, nothing due");
        let w = n.due(&P, true, t0 + LEASE);
        assert!(w.lease && w.apply.is_none() && w.status.is_none());
    }

    #[test]
    fn a_metadata_change_applies_the_node_without_rewriting_its_status() {
        let t0 = Instant::now();
        let mut n = NodeSync::new(t0);
        n.on_heartbeat(hb(BaseLifecycle::Activated), t0);
        let w = n.due(&P, true, t0);
        n.node_applied(w.apply.expect("apply"), Some("uid".into()));
        n.status_written(w.status.expect("status"), t0);
        n.lease_renewed(t0);
        // New module URLs to record: the Node is applied again, its status is unchanged.
        n.touch();
        let urls = VNodeParams {
            module_urls: r#"{"biz1@1.0.0":"https://x/biz1.jar"}"#,
            ..P
        };
        let t1 = t0 + Duration::from_millis(100);
        let w = n.due(&urls, true, t1);
        assert!(w.apply.is_some() && w.status.is_none() && !w.lease, "{w:?}");
        n.node_applied(w.apply.expect("apply"), Some("uid".into()));
        n.settled();
        assert_eq!(n.due(&urls, true, t1), NodeWrites::default());
        // The Node was re-created by someone else (new uid): its status is written again.
        n.touch();
        let w = n.due(&P, true, t1);
        n.node_applied(w.apply.expect("apply"), Some("uid2".into()));
        assert!(n.due(&P, true, t1).status.is_some());
    }

    #[test]
    fn silence_makes_the_node_not_ready_and_stops_the_lease() {
        let t0 = Instant::now();
        let mut n = NodeSync::new(t0);
        n.on_heartbeat(hb(BaseLifecycle::Activated), t0);
        let w = n.due(&P, true, t0);
        n.node_applied(w.apply.expect("apply"), Some("uid".into()));
        n.status_written(w.status.expect("status"), t0);
        let later = t0 + Duration::from_secs(4);
        let (v, changed) = n.assess(&POLICY, later);
        assert_eq!(v, Verdict::Serve(false));
        assert_eq!(changed, Some((Liveness::Alive, Liveness::Silent)));
        let w = n.due(&P, false, later);
        assert!(!w.lease);
        let st = w.status.expect("status changes");
        let ready = st.conditions.expect("conditions");
        assert_eq!(ready[0].status, "False");
        assert_eq!(
            n.assess(&POLICY, t0 + Duration::from_secs(61)).0,
            Verdict::Expire
        );
    }

    #[test]
    fn a_deactivated_heartbeat_drains() {
        let t0 = Instant::now();
        let mut n = NodeSync::new(t0);
        n.on_heartbeat(hb(BaseLifecycle::Deactivated), t0);
        assert_eq!(n.assess(&POLICY, t0).0, Verdict::Drain);
    }

    #[test]
    fn an_adopted_node_without_heartbeat_is_only_marked_not_ready_once() {
        let t0 = Instant::now();
        let mut n = NodeSync::new(t0);
        let w = n.due(&P, false, t0);
        assert!(w.apply.is_none() && !w.lease);
        n.status_written(w.status.expect("minimal status"), t0);
        assert_eq!(n.due(&P, false, t0), NodeWrites::default());
    }

    #[test]
    fn steady_state_writes_only_the_lease_and_small_health_moves_write_nothing() {
        let t0 = Instant::now();
        let mut n = NodeSync::new(t0);
        n.on_heartbeat(hb(BaseLifecycle::Activated), t0);
        let health = |committed: i64| BaseHealth {
            max_metaspace: Some(1 << 30),
            committed_metaspace: Some(committed),
            used_metaspace: Some(committed / 2),
        };
        n.on_health(health(100 << 20));
        let w = n.due(&P, true, t0);
        n.node_applied(w.apply.expect("apply"), Some("uid".into()));
        n.status_written(w.status.expect("status"), t0);
        n.lease_renewed(t0);
        // The same heartbeat again, and metaspace growing by 1 MiB: nothing to write.
        n.on_heartbeat(hb(BaseLifecycle::Activated), t0);
        n.on_health(health(101 << 20));
        let w = n.due(&P, true, t0 + Duration::from_millis(100));
        assert!(w.apply.is_none() && w.status.is_none(), "{w:?}");
        n.settled();
        let w = n.due(&P, true, t0 + LEASE);
        assert_eq!(
            w,
            NodeWrites {
                lease: true,
                ..Default::default()
            }
        );
        // Half the metaspace committed: a real change.
        n.on_health(health(512 << 20));
        assert!(n.due(&P, true, t0 + LEASE).status.is_some());
    }
}
