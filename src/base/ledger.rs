//! What the controller knows of the modules on one base and of its own commands to it: the
//! latest module list, commands in flight, install failures, modules kept for a hand-over, and
//! when to ask the base again. Pure bookkeeping; the base task feeds it and reads it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::base::plan::{self, Failure, InFlight, Plan, Retention};
use crate::model::{
    BaseCommand, BizState, ModuleKey, ModuleSpec, ModuleStatus, OperationKind, OperationResult,
};

/// A list query unanswered for this long is sent again even before the resync period.
const QUERY_LOST_AFTER: Duration = Duration::from_secs(3);
/// After answering a baseline, give the base this long before asking what it runs.
const AFTER_BASELINE: Duration = Duration::from_secs(1);
/// After a base restarts, give it this long before asking what it runs.
const AFTER_RESTART: Duration = Duration::from_millis(500);

/// The module ledger of one base.
#[derive(Debug)]
pub struct ModuleLedger {
    /// Modules the base reported in its latest full list; `None` until a fresh list arrived.
    pub reported: Option<HashMap<ModuleKey, ModuleStatus>>,
    /// Commands sent and not yet settled.
    pub inflight: HashMap<(OperationKind, ModuleKey), InFlight>,
    /// Install failures the base reported.
    pub failures: HashMap<ModuleKey, Failure>,
    /// Modules kept for a hand-over (their pods are gone).
    pub retained: HashMap<ModuleKey, Retention>,
    next_query_at: Instant,
    last_query_at: Option<Instant>,
    health_known: bool,
}

impl ModuleLedger {
    /// An empty ledger that queries the base at once.
    pub fn new(now: Instant) -> Self {
        ModuleLedger {
            reported: None,
            inflight: HashMap::new(),
            failures: HashMap::new(),
            retained: HashMap::new(),
            next_query_at: now,
            last_query_at: None,
            health_known: false,
        }
    }

    /// A base that (re)started forgets what it ran: wait for a fresh list before judging pods.
    pub fn base_restarted(&mut self, now: Instant) {
        self.reported = None;
        self.inflight.clear();
        self.next_query_at = now + AFTER_RESTART;
    }

    /// A base that was silent may run something else now: ask again at once.
    pub fn base_returned(&mut self, now: Instant) {
        self.reported = None;
        self.next_query_at = now;
    }

    /// The base reported health.
    pub fn health_received(&mut self) {
        self.health_known = true;
    }

    /// A full module list arrived.
    pub fn on_module_list(&mut self, list: Vec<ModuleStatus>, now: Instant, timeout: Duration) {
        let map: HashMap<ModuleKey, ModuleStatus> =
            list.into_iter().map(|m| (m.key(), m)).collect();
        self.inflight.retain(|(kind, key), _| match kind {
            OperationKind::Install => !map
                .get(key)
                .is_some_and(|m| matches!(m.state, BizState::Activated | BizState::Broken)),
            OperationKind::Uninstall => map.contains_key(key),
        });
        for (key, m) in &map {
            match m.state {
                BizState::Activated => {
                    self.failures.remove(key);
                }
                BizState::Broken if !self.failures.contains_key(key) => {
                    let f = plan::next_failure(
                        None,
                        m.reason.as_deref(),
                        m.message.as_deref().unwrap_or("install failed"),
                        now,
                        timeout,
                    );
                    self.failures.insert(key.clone(), f);
                }
                _ => {}
            }
        }
        self.retained.retain(|k, _| map.contains_key(k));
        self.reported = Some(map);
    }

    /// The outcome of an install or uninstall arrived.
    pub fn on_operation(&mut self, r: &OperationResult, now: Instant, timeout: Duration) {
        let key = ModuleKey::new(&r.name, &r.version);
        // A success is confirmed by the module list queried next; until then the command stays
        // in flight (clock restarted), or a list published before the operation would re-send it.
        if r.success {
            if let Some(f) = self.inflight.get_mut(&(r.kind, key.clone())) {
                f.sent_at = now;
            }
        } else {
            self.inflight.remove(&(r.kind, key.clone()));
        }
        match (r.kind, r.success) {
            (OperationKind::Install, false) => {
                let prev = self.failures.get(&key).cloned();
                let f = plan::next_failure(
                    prev.as_ref(),
                    r.error_code.as_deref(),
                    &r.message,
                    now,
                    timeout,
                );
                self.failures.insert(key, f);
            }
            (OperationKind::Install, true) => {
                self.failures.remove(&key);
            }
            (OperationKind::Uninstall, _) => {}
        }
        // Real bases do not publish their module list unasked: ask now.
        self.next_query_at = now;
    }

    /// The queries due now (module list, and health when unknown or at each resync).
    pub fn queries_due(&mut self, now: Instant, resync: Duration) -> Vec<BaseCommand> {
        let query_lost = self.reported.is_none()
            && self
                .last_query_at
                .is_some_and(|t| now.saturating_duration_since(t) > QUERY_LOST_AFTER);
        if now < self.next_query_at && !query_lost {
            return Vec::new();
        }
        let mut out = vec![BaseCommand::QueryAllModules];
        if !self.health_known
            || self
                .last_query_at
                .is_none_or(|t| now.saturating_duration_since(t) >= resync)
        {
            out.push(BaseCommand::QueryHealth);
        }
        self.last_query_at = Some(now);
        self.next_query_at = now + resync;
        out
    }

    /// The baseline was sent: its installs are in flight.
    pub fn baseline_sent(&mut self, specs: &[ModuleSpec], now: Instant) {
        for s in specs {
            self.inflight.insert(
                (OperationKind::Install, s.key()),
                InFlight {
                    sent_at: now,
                    attempts: 1,
                },
            );
        }
        self.next_query_at = now + AFTER_BASELINE;
    }

    /// Records the plan's hand-overs; returns the ones that start now (for the log).
    pub fn retain(&mut self, plan: &Plan, now: Instant) -> Vec<(ModuleKey, String)> {
        let mut started = Vec::new();
        for (key, owner) in &plan.retain {
            if !self.retained.contains_key(key) {
                self.retained.insert(
                    key.clone(),
                    Retention {
                        owner: owner.clone(),
                        since: now,
                    },
                );
                started.push((key.clone(), owner.clone()));
            }
        }
        started
    }

    /// The commands of a plan, recorded as in flight; each comes with its attempt number.
    pub fn commands(&mut self, plan: &Plan, now: Instant) -> Vec<(BaseCommand, u32)> {
        let installs = plan.installs.iter().map(|s| {
            (
                OperationKind::Install,
                s.key(),
                BaseCommand::Install(s.clone()),
            )
        });
        let uninstalls = plan.uninstalls.iter().map(|k| {
            (
                OperationKind::Uninstall,
                k.clone(),
                BaseCommand::Uninstall(k.clone()),
            )
        });
        let mut out = Vec::new();
        for (kind, key, cmd) in installs.chain(uninstalls) {
            let attempts = self
                .inflight
                .get(&(kind, key.clone()))
                .map(|f| f.attempts + 1)
                .unwrap_or(1);
            self.inflight.insert(
                (kind, key),
                InFlight {
                    sent_at: now,
                    attempts,
                },
            );
            out.push((cmd, attempts));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(name: &str, version: &str, state: BizState) -> ModuleStatus {
        ModuleStatus {
            name: name.into(),
            version: version.into(),
            state,
            change_time_ms: None,
            reason: None,
            message: None,
        }
    }

    fn op(kind: OperationKind, success: bool) -> OperationResult {
        OperationResult {
            kind,
            name: "biz".into(),
            version: "1".into(),
            success,
            error_code: (!success).then(|| "InstallBizFailed".into()),
            message: "boom".into(),
        }
    }

    fn spec() -> ModuleSpec {
        ModuleSpec {
            name: "biz".into(),
            version: "1".into(),
            url: "https://x/biz.jar".into(),
        }
    }

    const T: Duration = Duration::from_secs(3);

    #[test]
    fn a_command_counts_its_attempts_and_settles_with_the_module_list() {
        let now = Instant::now();
        let mut l = ModuleLedger::new(now);
        let plan = Plan {
            installs: vec![spec()],
            ..Default::default()
        };
        assert_eq!(l.commands(&plan, now)[0].1, 1);
        assert_eq!(l.commands(&plan, now)[0].1, 2);
        l.on_module_list(vec![status("biz", "1", BizState::Resolved)], now, T);
        assert_eq!(
            l.inflight.len(),
            1,
            "a starting module keeps its install in flight"
        );
        l.on_module_list(vec![status("biz", "1", BizState::Activated)], now, T);
        assert!(l.inflight.is_empty());
    }

    #[test]
    fn a_success_waits_for_the_list_and_a_failure_is_remembered() {
        let now = Instant::now();
        let mut l = ModuleLedger::new(now);
        let plan = Plan {
            installs: vec![spec()],
            ..Default::default()
        };
        l.commands(&plan, now);
        let later = now + Duration::from_secs(1);
        l.on_operation(&op(OperationKind::Install, true), later, T);
        let f = l.inflight.values().next().expect("still in flight");
        assert_eq!(
            f.sent_at, later,
            "clock restarted until the list confirms it"
        );
        l.on_operation(&op(OperationKind::Install, false), later, T);
        assert!(l.inflight.is_empty());
        let failure = l
            .failures
            .get(&ModuleKey::new("biz", "1"))
            .expect("failure");
        assert_eq!(failure.reason, "Arklet.InstallBizFailed");
        assert_eq!(failure.count, 1);
    }

    #[test]
    fn queries_follow_the_resync_period_and_a_lost_answer() {
        let now = Instant::now();
        let resync = Duration::from_secs(30);
        let mut l = ModuleLedger::new(now);
        assert_eq!(
            l.queries_due(now, resync),
            vec![BaseCommand::QueryAllModules, BaseCommand::QueryHealth]
        );
        assert!(
            l.queries_due(now + Duration::from_secs(1), resync)
                .is_empty()
        );
        // No list yet after 4 s: the query was lost; ask again (health still unknown).
        assert_eq!(l.queries_due(now + Duration::from_secs(4), resync).len(), 2);
        l.health_received();
        l.on_module_list(vec![], now, T);
        let later = now + Duration::from_secs(10);
        assert!(l.queries_due(later, resync).is_empty());
        l.on_operation(&op(OperationKind::Uninstall, true), later, T);
        assert_eq!(
            l.queries_due(later, resync),
            vec![BaseCommand::QueryAllModules],
            "an operation outcome makes the list due at once"
        );
    }

    #[test]
    fn a_restart_forgets_the_list_and_commands() {
        let now = Instant::now();
        let mut l = ModuleLedger::new(now);
        l.on_module_list(vec![status("biz", "1", BizState::Activated)], now, T);
        l.commands(
            &Plan {
                uninstalls: vec![ModuleKey::new("biz", "1")],
                ..Default::default()
            },
            now,
        );
        l.base_restarted(now);
        assert!(l.reported.is_none());
        assert!(l.inflight.is_empty());
        assert!(l.queries_due(now, Duration::from_secs(30)).is_empty());
        assert!(
            !l.queries_due(now + AFTER_RESTART, Duration::from_secs(30))
                .is_empty()
        );
    }
}
