//! What the controller knows of the modules on one base and of its own commands to it: the
//! latest module list, commands in flight, install failures, modules kept for a hand-over, and
//! when to ask the base again. Pure bookkeeping; the base task feeds it and reads it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::base::plan::{self, Failure, InFlight, Plan, Retention};
use crate::model::{
    BaseCommand, BizState, ModuleKey, ModuleSpec, ModuleStatus, OperationKind, OperationResult,
    Outcome,
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
    /// Uninstall failures the base reported (retried with backoff).
    pub uninstall_failures: HashMap<ModuleKey, Failure>,
    /// The package URL each module was installed from (bases do not report it); kept on the
    /// VNode so that a restarted controller knows it too.
    pub urls: HashMap<ModuleKey, String>,
    /// Since when each module no pod asks for has been so.
    pub orphan_since: HashMap<ModuleKey, Instant>,
    /// How often each parked version was reinstalled to activate it.
    pub reactivations: HashMap<ModuleKey, u32>,
    /// The last plan kept a module only because something outside this base wants it.
    kept_for_elsewhere: bool,
    urls_version: u64,
    next_query_at: Instant,
    last_query_at: Option<Instant>,
    health_known: bool,
    /// Set when this replica took the base over: the list it observed may predate what the
    /// previous owner did last, so no command leaves until the base answers again.
    awaiting_list: bool,
}

impl ModuleLedger {
    /// An empty ledger that queries the base at once.
    pub fn new(now: Instant) -> Self {
        ModuleLedger {
            reported: None,
            inflight: HashMap::new(),
            failures: HashMap::new(),
            retained: HashMap::new(),
            uninstall_failures: HashMap::new(),
            urls: HashMap::new(),
            orphan_since: HashMap::new(),
            reactivations: HashMap::new(),
            kept_for_elsewhere: false,
            urls_version: 0,
            next_query_at: now,
            last_query_at: None,
            health_known: false,
            awaiting_list: false,
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

    /// This replica takes the base over: ask what it runs at once, and send nothing before the
    /// answer. Commands the previous owner was seen sending count as sent now: a list observed
    /// before its death can still show a module it had just uninstalled.
    pub fn took_over(&mut self, now: Instant) {
        self.next_query_at = now;
        self.awaiting_list = true;
        for f in self.inflight.values_mut() {
            f.sent_at = now;
        }
    }

    /// Another replica sent the base a command: it is in flight (not to be sent again).
    pub fn command_seen(&mut self, cmd: &BaseCommand, now: Instant) {
        let (kind, key, url, replace) = match cmd {
            BaseCommand::Install(s) => {
                (OperationKind::Install, s.key(), Some(s.url.clone()), false)
            }
            BaseCommand::Reinstall(s) => {
                (OperationKind::Install, s.key(), Some(s.url.clone()), true)
            }
            BaseCommand::Uninstall(k) => (OperationKind::Uninstall, k.clone(), None, false),
            _ => return,
        };
        self.inflight.entry((kind, key)).or_insert(InFlight {
            replace,
            ..InFlight::new(now, url)
        });
    }

    /// The base reported health.
    pub fn health_received(&mut self) {
        self.health_known = true;
    }

    /// A full module list arrived.
    pub fn on_module_list(&mut self, list: Vec<ModuleStatus>, now: Instant, timeout: Duration) {
        let map: HashMap<ModuleKey, ModuleStatus> =
            list.into_iter().map(|m| (m.key(), m)).collect();
        self.awaiting_list = false;
        // The list answers a query sent at `asked`: a command sent before it and absent from
        // it never reached the base.
        let asked = self.last_query_at;
        let mut settled = Vec::new();
        self.inflight.retain(|(kind, key), f| match kind {
            OperationKind::Install if f.replace => true,
            OperationKind::Install => match map.get(key).map(|m| &m.state) {
                Some(BizState::Activated) => {
                    settled.push((key.clone(), f.url.clone()));
                    false
                }
                Some(BizState::Broken) => false,
                Some(_) => {
                    f.lost = false;
                    true
                }
                None => {
                    if asked.is_some_and(|q| q > f.sent_at) {
                        f.lost = true;
                    }
                    true
                }
            },
            OperationKind::Uninstall => map.contains_key(key),
        });
        for (key, url) in settled {
            if let Some(url) = url {
                self.set_url(key, url);
            }
        }
        // A module the base is still starting that no command of ours explains (a restarted
        // controller, a takeover): its install is in flight all the same, and a second one
        // would be refused as a conflict or install it twice.
        for (key, m) in &map {
            if m.state == BizState::Resolved {
                self.inflight
                    .entry((OperationKind::Install, key.clone()))
                    .or_insert_with(|| InFlight::new(now, self.urls.get(key).cloned()));
            }
        }
        for (key, m) in &map {
            match m.state {
                BizState::Activated => {
                    self.failures.remove(key);
                    self.reactivations.remove(key);
                }
                BizState::Broken if !self.failures.contains_key(key) => {
                    let f = plan::next_failure(
                        None,
                        m.reason.as_deref(),
                        m.message.as_deref().unwrap_or(""),
                        now,
                        timeout,
                    );
                    self.failures.insert(key.clone(), f);
                }
                _ => {}
            }
        }
        self.retained.retain(|k, _| map.contains_key(k));
        let before = self.urls.len();
        self.urls.retain(|k, _| map.contains_key(k));
        if self.urls.len() != before {
            self.urls_version += 1;
        }
        self.uninstall_failures.retain(|k, _| map.contains_key(k));
        self.orphan_since.retain(|k, _| map.contains_key(k));
        self.reported = Some(map);
    }

    /// The outcome of an install or uninstall arrived; an uninstall failure is returned for
    /// the base task to report.
    pub fn on_operation(
        &mut self,
        r: &OperationResult,
        now: Instant,
        timeout: Duration,
    ) -> Option<String> {
        let key = ModuleKey::new(&r.name, &r.version);
        let slot = (r.kind, key.clone());
        let mut reported_failure = None;
        match (&r.outcome, r.kind) {
            // A success is confirmed by the module list queried next; until then the command
            // stays in flight (clock restarted), or a list published before the operation
            // would send it again. A replacement is confirmed by its answer alone: the list
            // shows the module active before and after.
            (Outcome::Succeeded, OperationKind::Install) => {
                self.failures.remove(&key);
                if let Some(f) = self.inflight.get_mut(&slot) {
                    if f.replace {
                        if let Some(url) = f.url.clone() {
                            self.set_url(key.clone(), url);
                        }
                        self.inflight.remove(&slot);
                    } else {
                        f.sent_at = now;
                        f.lost = false;
                    }
                }
            }
            (Outcome::Succeeded, OperationKind::Uninstall) => {
                self.uninstall_failures.remove(&key);
                if let Some(f) = self.inflight.get_mut(&slot) {
                    f.sent_at = now;
                }
            }
            // Another command for the module is still running: this one was refused, the
            // first goes on. Not a failure; wait for the first.
            (Outcome::Busy, _) => {
                if let Some(f) = self.inflight.get_mut(&slot) {
                    f.sent_at = now;
                    f.lost = false;
                }
            }
            (Outcome::AlreadyInstalled, _) | (Outcome::NotInstalled, _) => {
                self.inflight.remove(&slot);
            }
            (Outcome::Failed { code, message }, OperationKind::Install) => {
                self.inflight.remove(&slot);
                let prev = self.failures.get(&key).cloned();
                let f = plan::next_failure(prev.as_ref(), code.as_deref(), message, now, timeout);
                self.failures.insert(key, f);
            }
            (Outcome::Failed { message, .. }, OperationKind::Uninstall) => {
                self.inflight.remove(&slot);
                let prev = self.uninstall_failures.get(&key).cloned();
                let mut f = plan::next_failure(prev.as_ref(), None, message, now, timeout);
                f.reason = crate::vpod::status::UNINSTALL_FAILED.into();
                self.uninstall_failures.insert(key, f);
                reported_failure = Some(message.clone());
            }
        }
        // Real bases do not publish their module list unasked: ask now.
        self.next_query_at = now;
        reported_failure
    }

    /// Dates the modules no pod asks for (the grace period counts from the first time).
    pub fn track_orphans(&mut self, plan: &Plan, now: Instant) {
        self.kept_for_elsewhere = !plan.kept_for_elsewhere.is_empty();
        let current: std::collections::HashSet<&ModuleKey> = plan.orphans.iter().collect();
        self.orphan_since.retain(|k, _| current.contains(k));
        for k in &plan.orphans {
            self.orphan_since.entry(k.clone()).or_insert(now);
        }
    }

    /// The queries due now (module list, and health when unknown or at each resync).
    pub fn queries_due(&mut self, now: Instant, resync: Duration) -> Vec<BaseCommand> {
        let query_lost = (self.reported.is_none() || self.awaiting_list)
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
                InFlight::new(now, Some(s.url.clone())),
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
        if self.awaiting_list {
            return Vec::new();
        }
        let installs = plan.installs.iter().map(|s| {
            let key = s.key();
            (
                OperationKind::Install,
                key,
                Some(s.url.clone()),
                false,
                BaseCommand::Install(s.clone()),
            )
        });
        let reinstalls = plan.reinstalls.iter().map(|(s, _)| {
            let key = s.key();
            (
                OperationKind::Install,
                key,
                Some(s.url.clone()),
                true,
                BaseCommand::Reinstall(s.clone()),
            )
        });
        for k in &plan.reactivate {
            *self.reactivations.entry(k.clone()).or_insert(0) += 1;
        }
        let uninstalls = plan.uninstalls.iter().chain(&plan.reactivate).map(|k| {
            (
                OperationKind::Uninstall,
                k.clone(),
                None,
                false,
                BaseCommand::Uninstall(k.clone()),
            )
        });
        let mut out = Vec::new();
        for (kind, key, url, replace, cmd) in installs.chain(reinstalls).chain(uninstalls) {
            let slot = (kind, key);
            let f = match self.inflight.remove(&slot) {
                Some(mut f) => {
                    f.attempts += 1;
                    f.sent_at = now;
                    f.lost = false;
                    f.url = url;
                    f.replace = replace;
                    f
                }
                None => InFlight {
                    replace,
                    ..InFlight::new(now, url)
                },
            };
            out.push((cmd, f.attempts));
            self.inflight.insert(slot, f);
        }
        out
    }

    fn set_url(&mut self, key: ModuleKey, url: String) {
        if self.urls.get(&key) != Some(&url) {
            self.urls.insert(key, url);
            self.urls_version += 1;
        }
    }

    /// Whether a plan could change with time alone: a command awaiting its answer or retry, a
    /// failure waiting out its backoff, a module kept for a hand-over, as an orphan or for a
    /// pod not bound yet (whose wish is read, not sent), or one the base is still starting (it
    /// may time out). Without any, only news changes a plan.
    pub fn waits_on_clock(&self) -> bool {
        !self.inflight.is_empty()
            || !self.failures.is_empty()
            || !self.uninstall_failures.is_empty()
            || !self.retained.is_empty()
            || !self.orphan_since.is_empty()
            || self.kept_for_elsewhere
            || self
                .reported
                .as_ref()
                .is_some_and(|r| r.values().any(|m| m.state == BizState::Resolved))
    }

    /// Changes with every change of [`Self::urls`].
    pub fn urls_version(&self) -> u64 {
        self.urls_version
    }

    /// What to keep on the VNode about this base's modules: `name@version` → package URL.
    pub fn url_annotation(&self) -> String {
        let sorted: std::collections::BTreeMap<String, &String> =
            self.urls.iter().map(|(k, u)| (k.to_string(), u)).collect();
        serde_json::to_string(&sorted).unwrap_or_default()
    }

    /// Restores what a previous controller recorded on the VNode (see [`Self::url_annotation`]).
    pub fn restore_urls(&mut self, annotation: &str) {
        let Ok(map) =
            serde_json::from_str::<std::collections::BTreeMap<String, String>>(annotation)
        else {
            return;
        };
        for (k, url) in map {
            if let Some((name, version)) = k.rsplit_once('@') {
                self.urls
                    .entry(ModuleKey::new(name, version))
                    .or_insert(url);
            }
        }
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
            outcome: if success {
                Outcome::Succeeded
            } else {
                Outcome::Failed {
                    code: Some("FAILED".into()),
                    message: "boom".into(),
                }
            },
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
    fn after_a_takeover_nothing_is_sent_before_the_base_answers_and_observed_commands_restart() {
        let t0 = Instant::now();
        let mut l = ModuleLedger::new(t0);
        l.on_module_list(vec![status("biz", "1", BizState::Activated)], t0, T);
        // The previous owner was seen uninstalling; it died before the list showed it gone.
        l.command_seen(&BaseCommand::Uninstall(ModuleKey::new("biz", "1")), t0);
        let t1 = t0 + Duration::from_secs(10);
        l.took_over(t1);
        let plan = Plan {
            uninstalls: vec![ModuleKey::new("biz", "1")],
            ..Default::default()
        };
        assert!(
            l.commands(&plan, t1).is_empty(),
            "a list observed before the takeover decides nothing"
        );
        assert_eq!(
            l.queries_due(t1, Duration::from_secs(60))[0],
            BaseCommand::QueryAllModules
        );
        let f = l
            .inflight
            .values()
            .next()
            .expect("observed uninstall in flight");
        assert_eq!(f.sent_at, t1, "its clock restarts at the takeover");
        // The base still shows it (still uninstalling): the observed command stays in flight.
        l.on_module_list(vec![status("biz", "1", BizState::Deactivated)], t1, T);
        assert_eq!(l.inflight.len(), 1);
        assert_eq!(
            l.commands(&plan, t1).len(),
            1,
            "answered: commands flow again"
        );
    }

    #[test]
    fn only_a_base_with_something_pending_waits_on_the_clock() {
        let now = Instant::now();
        let mut l = ModuleLedger::new(now);
        l.on_module_list(vec![status("biz", "1", BizState::Activated)], now, T);
        assert!(
            !l.waits_on_clock(),
            "all active, nothing asked: only news matters"
        );
        let plan = Plan {
            installs: vec![ModuleSpec {
                version: "2".into(),
                ..spec()
            }],
            ..Default::default()
        };
        l.commands(&plan, now);
        assert!(l.waits_on_clock(), "an install awaits its answer");
        l.on_module_list(
            vec![
                status("biz", "1", BizState::Activated),
                status("biz", "2", BizState::Resolved),
            ],
            now,
            T,
        );
        assert!(l.waits_on_clock(), "a starting module may time out");
        l.on_module_list(
            vec![
                status("biz", "1", BizState::Activated),
                status("biz", "2", BizState::Activated),
            ],
            now,
            T,
        );
        assert!(!l.waits_on_clock());
        l.orphan_since.insert(ModuleKey::new("biz", "1"), now);
        assert!(l.waits_on_clock(), "an orphan's grace runs out");
        l.orphan_since.clear();
        let kept = Plan {
            kept_for_elsewhere: vec![ModuleKey::new("biz", "1")],
            ..Plan::default()
        };
        l.track_orphans(&kept, now);
        assert!(l.waits_on_clock(), "what pods elsewhere want can change");
        l.track_orphans(&Plan::default(), now);
        assert!(!l.waits_on_clock());
    }

    #[test]
    fn a_module_found_starting_is_an_install_in_flight() {
        // A restarted controller finds the base still starting what its predecessor sent.
        let now = Instant::now();
        let mut l = ModuleLedger::new(now);
        l.on_module_list(vec![status("biz", "1", BizState::Resolved)], now, T);
        let f = l
            .inflight
            .get(&(OperationKind::Install, ModuleKey::new("biz", "1")))
            .expect("in flight");
        assert!(!f.lost);
        l.on_module_list(vec![status("biz", "1", BizState::Activated)], now, T);
        assert!(l.inflight.is_empty(), "settled once active");
    }

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
        assert_eq!(failure.reason, "Arklet.InstallModuleFailed");
        assert_eq!(failure.message, "boom");
        assert_eq!(failure.count, 1);
    }

    #[test]
    fn a_conflict_is_not_a_failure_and_a_list_after_the_command_without_it_means_lost() {
        let now = Instant::now();
        let mut l = ModuleLedger::new(now);
        let plan = Plan {
            installs: vec![spec()],
            ..Default::default()
        };
        l.commands(&plan, now);
        let busy = OperationResult {
            outcome: Outcome::Busy,
            ..op(OperationKind::Install, true)
        };
        l.on_operation(&busy, now, T);
        assert!(l.failures.is_empty());
        assert_eq!(l.inflight.len(), 1, "the first command goes on");
        // A list answering a query sent before the install proves nothing.
        l.on_module_list(vec![], now, T);
        assert!(!l.inflight.values().any(|f| f.lost));
        // One asked for after it does.
        let later = now + Duration::from_secs(1);
        assert!(!l.queries_due(later, Duration::from_secs(30)).is_empty());
        l.on_module_list(vec![], later, T);
        assert!(l.inflight.values().all(|f| f.lost));
    }

    #[test]
    fn settled_installs_record_their_url_and_it_survives_a_restart() {
        let now = Instant::now();
        let mut l = ModuleLedger::new(now);
        l.commands(
            &Plan {
                installs: vec![spec()],
                ..Default::default()
            },
            now,
        );
        l.on_module_list(vec![status("biz", "1", BizState::Activated)], now, T);
        assert_eq!(
            l.urls.get(&ModuleKey::new("biz", "1")).map(String::as_str),
            Some("https://x/biz.jar")
        );
        let mut restarted = ModuleLedger::new(now);
        restarted.restore_urls(&l.url_annotation());
        assert_eq!(restarted.urls, l.urls);
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
