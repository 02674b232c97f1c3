//! What to do on one base, decided from what is known: the pods bound to its VNode, the modules
//! it reports, and the commands in flight. Pure; the actor performs the plan.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::model::{BizState, ModuleKey, ModuleSpec, ModuleStatus, OperationKind};
use crate::vpod::spec::ContainerModule;
use crate::vpod::status::{self, ContainerView, Note, qualified_reason};

/// A pod bound to the base's VNode, as the planner needs it.
#[derive(Debug, Clone)]
pub struct PodInfo {
    /// Pod uid.
    pub uid: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Creation time, epoch seconds.
    pub creation_ts: i64,
    /// Owner revision (`deployment.kubernetes.io/revision` is not on pods; pod-template-hash order is unknown) — 0.
    pub revision: i64,
    /// Has a deletion timestamp.
    pub deleting: bool,
    /// Owning workload (`namespace/Kind/name`), if any.
    pub owner: Option<String>,
    /// One entry per container.
    pub modules: Vec<ContainerModule>,
    /// The status this controller wrote since `pod` was seen, if any (newer than `pod`'s; a
    /// copy only then: at 5,000 pods a copy of every status was some 10 MB, 2 KB each). Boxed:
    /// inline it made every entry of a base's pod map 400 bytes larger, written or not.
    pub written: Option<Box<PodStatus>>,
    /// The object itself (its status, and Events about it).
    pub pod: Arc<Pod>,
}

impl PodInfo {
    /// The pod's status as last known: written by this controller or seen from the apiserver.
    pub fn status(&self) -> Option<&PodStatus> {
        self.written.as_deref().or(self.pod.status.as_ref())
    }

    /// Valid module specs of this pod.
    pub fn specs(&self) -> impl Iterator<Item = &ModuleSpec> {
        self.modules.iter().filter_map(|m| m.as_ref().ok())
    }
}

/// A command sent and not yet settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// When it was (last) sent.
    pub sent_at: Instant,
    /// When it was first sent (the install deadline counts from here).
    pub first_sent: Instant,
    /// How many times it was sent.
    pub attempts: u32,
    /// Install: the package URL asked for.
    pub url: Option<String>,
    /// A module list asked for after the command was sent does not show the module: the base
    /// never got the command (or dropped it), so it may be sent again.
    pub lost: bool,
    /// Install: replaces the installed module of the same name and version.
    pub replace: bool,
}

impl InFlight {
    /// A command sent now for the first time.
    pub fn new(now: Instant, url: Option<String>) -> Self {
        InFlight {
            sent_at: now,
            first_sent: now,
            attempts: 1,
            url,
            lost: false,
            replace: false,
        }
    }
}

/// A failed install as the base reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Qualified reason (`Arklet.InstallBizFailed`).
    pub reason: String,
    /// The base's message.
    pub message: String,
    /// Do not retry before this.
    pub retry_at: Instant,
    /// Consecutive failures.
    pub count: u32,
}

/// A module kept on a base after its last pod left, because its owner is mid-rollout and the
/// base would otherwise run no instance of the module until its replacement arrives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retention {
    /// The owner whose rollout this waits for.
    pub owner: String,
    /// Since when.
    pub since: Instant,
}

/// Everything the planner looks at.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// Pods bound to the VNode, by uid.
    pub pods: &'a BTreeMap<String, PodInfo>,
    /// Whether the pod list is complete (the watch has synced).
    pub pods_synced: bool,
    /// Modules the base reported in its latest full list; `None` until a fresh list arrived.
    pub reported: Option<&'a HashMap<ModuleKey, ModuleStatus>>,
    /// Commands in flight.
    pub inflight: &'a HashMap<(OperationKind, ModuleKey), InFlight>,
    /// Install failures.
    pub failures: &'a HashMap<ModuleKey, Failure>,
    /// Pods whose installs the batch policy holds, with the reason.
    pub held: &'a HashMap<String, Note>,
    /// Whether the base is alive.
    pub alive: bool,
    /// Base IP (pod IP).
    pub base_ip: &'a str,
    /// Now.
    pub now: Instant,
    /// Now, for timestamps in statuses.
    pub now_time: Time,
    /// How long to wait for an outcome before re-sending (doubles per attempt).
    pub command_timeout: Duration,
    /// Owners with a rollout in progress (more than one template revision among live pods).
    pub rollouts: &'a HashSet<String>,
    /// Modules kept for a hand-over.
    pub retained: &'a HashMap<ModuleKey, Retention>,
    /// Longest a retained module waits for its replacement.
    pub retention_timeout: Duration,
    /// Hand-over protection on (off only in tests that show what it prevents).
    pub lossless: bool,
    /// The package URL each module was installed from (bases do not report it).
    pub urls: &'a HashMap<ModuleKey, String>,
    /// Modules that pods not bound here may still want (pending pods, peer Deployments that
    /// select this base): not uninstalled while wanted.
    pub wanted: &'a HashSet<ModuleKey>,
    /// Since when each module no pod asks for has been so.
    pub orphan_since: &'a HashMap<ModuleKey, Instant>,
    /// How long such a module is kept before it is uninstalled.
    pub orphan_grace: Duration,
    /// How long a module may take to start before it shows as timed out.
    pub install_timeout: Duration,
    /// Uninstall failures, with their backoff.
    pub uninstall_failures: &'a HashMap<ModuleKey, Failure>,
    /// How often each parked version was reinstalled to activate it.
    pub reactivations: &'a HashMap<ModuleKey, u32>,
}

/// What to do now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Modules to install.
    pub installs: Vec<ModuleSpec>,
    /// Modules to uninstall (exact name and version).
    pub uninstalls: Vec<ModuleKey>,
    /// Deleting pods whose modules are gone: remove them (uids).
    pub delete_pods: Vec<String>,
    /// Pods whose status must change: (uid, new status).
    pub statuses: Vec<(String, PodStatus)>,
    /// Installs wanted but held by the batch policy (pod uid, module).
    pub held_installs: Vec<(String, ModuleSpec)>,
    /// Modules to keep for a hand-over from now on (their pods are removed).
    pub retain: Vec<(ModuleKey, String)>,
    /// Modules to install again from another package URL with the same name and version
    /// (in-place replacement), with the pod that asks for it.
    pub reinstalls: Vec<(ModuleSpec, String)>,
    /// Modules on the base that no pod asks for now (the ledger dates them).
    pub orphans: Vec<ModuleKey>,
    /// Modules on the base that no pod here asks for, kept because a pod not bound yet or a
    /// peer Deployment wants them: that can change without news to this base, so it plans
    /// again on the idle beat.
    pub kept_for_elsewhere: Vec<ModuleKey>,
    /// Installed-but-parked versions a pod wants again: uninstalled now, installed next.
    pub reactivate: Vec<ModuleKey>,
}

/// A parked version is reinstalled at most this often before the controller stops trying (a
/// base that keeps the old version active, SOFAArk's default without
/// `activate.new.module=true`, would park the new one forever).
pub const MAX_REACTIVATIONS: u32 = 3;

/// Resend delay after `attempts` sends: timeout, 2×, 4× … capped at 16×.
pub fn retry_delay(timeout: Duration, attempts: u32) -> Duration {
    timeout * 2u32.pow(attempts.saturating_sub(1).min(4))
}

fn due(inflight: Option<&InFlight>, now: Instant, timeout: Duration) -> bool {
    inflight.is_none_or(|f| {
        now.saturating_duration_since(f.sent_at) >= retry_delay(timeout, f.attempts)
    })
}

/// An install is sent again only when the base shows no trace of it after being asked; a base
/// that is starting the module (however long it takes) or has not answered is left alone: a
/// second install would be refused as a conflict, or install twice.
fn install_due(inflight: Option<&InFlight>, now: Instant, timeout: Duration) -> bool {
    inflight.is_none_or(|f| f.lost && due(Some(f), now, timeout))
}

/// For each module name, the version the base should run: the newest live pod's.
pub fn winners(pods: &BTreeMap<String, PodInfo>) -> HashMap<String, (ModuleSpec, String)> {
    type Rank = (i64, i64, String);
    let mut best: HashMap<String, (Rank, ModuleSpec, String)> = HashMap::new();
    for p in pods.values().filter(|p| !p.deleting) {
        for s in p.specs() {
            let rank = (p.creation_ts, p.revision, p.uid.clone());
            match best.get(&s.name) {
                Some((r, _, _)) if *r >= rank => {}
                _ => {
                    best.insert(s.name.clone(), (rank, s.clone(), p.uid.clone()));
                }
            }
        }
    }
    best.into_iter()
        .map(|(n, (_, s, uid))| (n, (s, uid)))
        .collect()
}

/// Every module key some live pod asks for.
pub fn kept_keys(pods: &BTreeMap<String, PodInfo>) -> HashSet<ModuleKey> {
    pods.values()
        .filter(|p| !p.deleting)
        .flat_map(|p| p.specs().map(ModuleSpec::key))
        .collect()
}

/// The modules a (re)starting base should run: the winners.
pub fn baseline(pods: &BTreeMap<String, PodInfo>) -> Vec<ModuleSpec> {
    let mut v: Vec<ModuleSpec> = winners(pods).into_values().map(|(s, _)| s).collect();
    v.sort();
    v
}

/// Decides what to do.
pub fn plan(i: &PlanInput<'_>) -> Plan {
    let mut out = Plan::default();
    let win = winners(i.pods);
    let keep = kept_keys(i.pods);
    let is_active = |k: &ModuleKey| {
        i.reported
            .and_then(|r| r.get(k))
            .is_some_and(|m| m.state == BizState::Activated)
    };
    // The base's only running instance of that module name.
    let sole_active = |k: &ModuleKey| {
        is_active(k)
            && i.reported.is_some_and(|r| {
                !r.values().any(|m| {
                    m.name == k.name && m.version != k.version && m.state == BizState::Activated
                })
            })
    };
    // Deleting pods whose last module instance is handed over instead of uninstalled.
    let mut retain_now: HashMap<ModuleKey, String> = HashMap::new();
    if i.lossless && i.alive {
        for p in i.pods.values().filter(|p| p.deleting) {
            let Some(owner) = p.owner.as_ref().filter(|o| i.rollouts.contains(*o)) else {
                continue;
            };
            for s in p.specs() {
                let k = s.key();
                if !keep.contains(&k) && sole_active(&k) {
                    retain_now.insert(k, owner.clone());
                }
            }
        }
    }
    let retained = |k: &ModuleKey| {
        retain_now.contains_key(k)
            || (i.lossless
                && i.retained.get(k).is_some_and(|r| {
                    i.rollouts.contains(&r.owner)
                        && i.now.saturating_duration_since(r.since) < i.retention_timeout
                })
                && sole_active(k))
    };

    if i.alive
        && let Some(reported) = i.reported
    {
        // Installs: the winning version of each module, when not active yet.
        let mut names: Vec<&String> = win.keys().collect();
        names.sort();
        for name in names {
            let (spec, uid) = &win[name];
            let key = spec.key();
            if is_active(&key) {
                // Same name and version from another package: replace it in place.
                let installed = i.urls.get(&key);
                // A replacement in flight is re-sent only when its answer is long overdue.
                let replacing = i
                    .inflight
                    .get(&(OperationKind::Install, key.clone()))
                    .is_some_and(|f| !due(Some(f), i.now, i.command_timeout));
                if installed.is_some_and(|u| *u != spec.url) && !replacing {
                    out.reinstalls.push((spec.clone(), uid.clone()));
                }
                continue;
            }
            if i.held.contains_key(uid) {
                out.held_installs.push((uid.clone(), spec.clone()));
                continue;
            }
            // Installed but not serving (a newer version took over; a rollback wants it back):
            // the base answers a new install with REPEAT_BIZ, so that exact version is
            // uninstalled first (the active version serves meanwhile) and installed again.
            let parked = i
                .reported
                .and_then(|r| r.get(&key))
                .is_some_and(|m| matches!(m.state, BizState::Deactivated | BizState::Stopped));
            if parked {
                let tries = i.reactivations.get(&key).copied().unwrap_or(0);
                let slot = (OperationKind::Uninstall, key.clone());
                if tries < MAX_REACTIVATIONS && due(i.inflight.get(&slot), i.now, i.command_timeout)
                {
                    out.reactivate.push(key);
                }
                continue;
            }
            if i.failures.get(&key).is_some_and(|f| f.retry_at > i.now) {
                continue;
            }
            if install_due(
                i.inflight.get(&(OperationKind::Install, key)),
                i.now,
                i.command_timeout,
            ) {
                out.installs.push(spec.clone());
            }
        }
        // Uninstalls: anything reported that no live pod asks for (only once the pod list is
        // complete, or a restart would uninstall everything).
        if i.pods_synced {
            // A module a deleting pod asked for goes at once (the user removed the pod); one
            // no pod here asks for waits out the grace period while nothing else wants it
            // (a base returning after its pods were evicted keeps what their replacements
            // will ask for).
            // (So does one kept for a hand-over that is over.)
            let leaving: HashSet<ModuleKey> = i
                .pods
                .values()
                .filter(|p| p.deleting)
                .flat_map(|p| p.specs().map(ModuleSpec::key))
                .chain(i.retained.keys().cloned())
                .collect();
            let (elsewhere, mut unwanted): (Vec<&ModuleKey>, Vec<&ModuleKey>) = reported
                .keys()
                .filter(|k| !keep.contains(k) && !retained(k))
                .partition(|k| i.wanted.contains(k));
            out.kept_for_elsewhere = elsewhere.into_iter().cloned().collect();
            out.kept_for_elsewhere.sort();
            unwanted.sort();
            for key in unwanted {
                let expired = leaving.contains(key)
                    || i.orphan_since
                        .get(key)
                        .is_some_and(|t| i.now.saturating_duration_since(*t) >= i.orphan_grace);
                if !leaving.contains(key) {
                    out.orphans.push(key.clone());
                }
                let backing_off = i
                    .uninstall_failures
                    .get(key)
                    .is_some_and(|f| f.retry_at > i.now);
                if expired
                    && !backing_off
                    && due(
                        i.inflight.get(&(OperationKind::Uninstall, key.clone())),
                        i.now,
                        i.command_timeout,
                    )
                {
                    out.uninstalls.push(key.clone());
                }
            }
        }
    }

    // Deleting pods leave once none of their modules is still on the base, nor on its way
    // there: an install in flight lands after the pod is gone, and nothing would ask for that
    // module's uninstall but the orphan grace period.
    for p in i.pods.values().filter(|p| p.deleting) {
        let gone = match (i.alive, i.reported) {
            (false, _) => true,
            (true, None) => false,
            (true, Some(r)) => p.specs().all(|s| {
                let k = s.key();
                let arriving = i
                    .inflight
                    .get(&(OperationKind::Install, k.clone()))
                    .is_some_and(|f| !f.lost);
                keep.contains(&k)
                    || (!r.contains_key(&k) && !arriving)
                    || retain_now.contains_key(&k)
                    || i.wanted.contains(&k)
            }),
        };
        if gone {
            out.delete_pods.push(p.uid.clone());
        }
    }

    let mut retain: Vec<(ModuleKey, String)> = retain_now.into_iter().collect();
    retain.sort();
    out.retain = retain;

    // Statuses, only while the base is alive and what it runs is known (so a restart of the
    // controller or a returning base never flaps a pod); a silent base's pods are NotReady.
    if !i.alive {
        for p in i.pods.values().filter(|p| !p.deleting) {
            let views: Vec<ContainerView> = p
                .modules
                .iter()
                .map(|m| match m {
                    Err(e) => ContainerView::Invalid(e.clone()),
                    Ok(spec) => ContainerView::Module {
                        spec: spec.clone(),
                        reported: None,
                        note: Some(Note {
                            reason: status::BASE_NOT_READY.into(),
                            message: "the base stopped sending heartbeats; the module's state \
                                      is unknown until it returns"
                                .into(),
                        }),
                    },
                })
                .collect();
            let mut st = status::compute(&views, i.base_ip, true, &i.now_time);
            if p.status().is_some() && status::differs(p.status(), &st) {
                status::carry_times(p.status(), &mut st);
                out.statuses.push((p.uid.clone(), st));
            }
        }
    }
    if i.alive {
        for p in i.pods.values().filter(|p| !p.deleting) {
            let has_invalid = p.modules.iter().any(|m| m.is_err());
            let Some(reported) = i.reported.or(if has_invalid { Some(&EMPTY) } else { None })
            else {
                continue;
            };
            let views: Vec<ContainerView> = p
                .modules
                .iter()
                .map(|m| match m {
                    Err(e) => ContainerView::Invalid(e.clone()),
                    Ok(spec) => {
                        let key = spec.key();
                        let rep = reported.get(&key).cloned();
                        ContainerView::Module {
                            spec: spec.clone(),
                            note: note_for(i, p, spec, &win, rep.as_ref()),
                            reported: rep,
                        }
                    }
                })
                .collect();
            let attempted = p.specs().any(|s| {
                let k = s.key();
                reported.contains_key(&k)
                    || i.inflight
                        .contains_key(&(OperationKind::Install, k.clone()))
                    || i.failures.contains_key(&k)
            });
            let mut st = status::compute(&views, i.base_ip, attempted, &i.now_time);
            if status::differs(p.status(), &st) {
                status::carry_times(p.status(), &mut st);
                out.statuses.push((p.uid.clone(), st));
            }
        }
    }
    out
}

static EMPTY: std::sync::LazyLock<HashMap<ModuleKey, ModuleStatus>> =
    std::sync::LazyLock::new(HashMap::new);

fn note_for(
    i: &PlanInput<'_>,
    p: &PodInfo,
    spec: &ModuleSpec,
    win: &HashMap<String, (ModuleSpec, String)>,
    reported: Option<&ModuleStatus>,
) -> Option<Note> {
    let key = spec.key();
    if let Some((w, _)) = win.get(&spec.name)
        && w.version != spec.version
    {
        return Some(Note {
            reason: "Superseded".into(),
            message: format!(
                "{}@{} is superseded on this base by {}@{} (newer pod)",
                spec.name, spec.version, w.name, w.version
            ),
        });
    }
    if let Some(n) = i.held.get(&p.uid) {
        return Some(n.clone());
    }
    let failure = i.failures.get(&key);
    match reported.map(|r| &r.state) {
        None | Some(BizState::Broken) if failure.is_some() => {
            // The operation's answer carries the real reason; a module list's record is often
            // empty or generic.
            let f = failure?;
            let listed = reported.and_then(|r| r.message.clone());
            return Some(Note {
                reason: f.reason.clone(),
                message: listed
                    .filter(|_| f.message.is_empty())
                    .unwrap_or_else(|| f.message.clone()),
            });
        }
        Some(BizState::Activated) | Some(BizState::Broken) | Some(BizState::Stopped) => {
            return None;
        }
        Some(BizState::Deactivated)
            if i.reactivations.get(&key).copied().unwrap_or(0) >= MAX_REACTIVATIONS =>
        {
            return Some(Note {
                reason: "ModuleController.BaseInstanceInOperation".into(),
                message: format!(
                    "the base keeps {key} installed but not active after {MAX_REACTIVATIONS} \
                     reinstalls: another version of {} stays active on it (SOFAArk activates \
                     a new version only with activate.new.module=true)",
                    key.name
                ),
            });
        }
        Some(BizState::Deactivated) => return None,
        _ => {}
    }
    // Starting (reported RESOLVED) or asked for and not answered yet.
    let started = i
        .inflight
        .get(&(OperationKind::Install, key.clone()))
        .map(|f| f.first_sent);
    let starting = reported.is_some_and(|r| r.state == BizState::Resolved);
    if started.is_none() && !starting {
        return None;
    }
    let elapsed = started
        .map(|t| i.now.saturating_duration_since(t))
        .unwrap_or_default();
    Some(if elapsed >= i.install_timeout {
        Note {
            reason: status::INSTALL_TIMED_OUT.into(),
            message: format!(
                "{key} has not started on the base within {} s; the base is still asked to run it",
                i.install_timeout.as_secs()
            ),
        }
    } else {
        // No clock in the message: a status that changes every second is written every second.
        Note {
            reason: status::INSTALL_EXECUTING.into(),
            message: format!("the base is installing {key}"),
        }
    })
}

/// Failure bookkeeping for a failed install.
pub fn next_failure(
    prev: Option<&Failure>,
    code: Option<&str>,
    message: &str,
    now: Instant,
    base: Duration,
) -> Failure {
    let count = prev.map(|f| f.count + 1).unwrap_or(1);
    Failure {
        reason: qualified_reason(code),
        message: message.to_string(),
        retry_at: now + retry_delay(base, count),
        count,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::time_from_ms;
    use crate::vpod::status::is_ready;

    fn spec(v: &str) -> ModuleSpec {
        ModuleSpec {
            name: "m".into(),
            version: v.into(),
            url: format!("file:///m-{v}.jar"),
        }
    }

    fn pod(uid: &str, created: i64, v: &str, deleting: bool) -> PodInfo {
        PodInfo {
            uid: uid.into(),
            namespace: "ns".into(),
            name: uid.into(),
            creation_ts: created,
            revision: 0,
            deleting,
            owner: Some("ns/Deployment/d".into()),
            modules: vec![Ok(spec(v))],
            written: None,
            pod: Arc::new(Pod::default()),
        }
    }

    fn reported(items: &[(&str, BizState)]) -> HashMap<ModuleKey, ModuleStatus> {
        items
            .iter()
            .map(|(v, s)| {
                let m = ModuleStatus {
                    name: "m".into(),
                    version: (*v).into(),
                    state: s.clone(),
                    change_time_ms: None,
                    reason: None,
                    message: None,
                };
                (m.key(), m)
            })
            .collect()
    }

    struct Fx {
        pods: BTreeMap<String, PodInfo>,
        reported: Option<HashMap<ModuleKey, ModuleStatus>>,
        inflight: HashMap<(OperationKind, ModuleKey), InFlight>,
        failures: HashMap<ModuleKey, Failure>,
        held: HashMap<String, Note>,
        rollouts: HashSet<String>,
        retained: HashMap<ModuleKey, Retention>,
        lossless: bool,
        now: Instant,
        t: Time,
        urls: HashMap<ModuleKey, String>,
        wanted: HashSet<ModuleKey>,
        orphan_since: HashMap<ModuleKey, Instant>,
        uninstall_failures: HashMap<ModuleKey, Failure>,
        reactivations: HashMap<ModuleKey, u32>,
    }

    impl Fx {
        fn new(pods: Vec<PodInfo>, reported: Option<HashMap<ModuleKey, ModuleStatus>>) -> Self {
            Fx {
                pods: pods.into_iter().map(|p| (p.uid.clone(), p)).collect(),
                reported,
                inflight: HashMap::new(),
                failures: HashMap::new(),
                held: HashMap::new(),
                rollouts: HashSet::new(),
                retained: HashMap::new(),
                lossless: true,
                now: Instant::now(),
                t: time_from_ms(0).expect("t"),
                urls: HashMap::new(),
                wanted: HashSet::new(),
                orphan_since: HashMap::new(),
                uninstall_failures: HashMap::new(),
                reactivations: HashMap::new(),
            }
        }
        fn plan(&self, alive: bool, synced: bool) -> Plan {
            plan(&PlanInput {
                pods: &self.pods,
                pods_synced: synced,
                reported: self.reported.as_ref(),
                inflight: &self.inflight,
                failures: &self.failures,
                held: &self.held,
                alive,
                base_ip: "10.0.0.1",
                now: self.now,
                now_time: self.t.clone(),
                command_timeout: Duration::from_secs(10),
                rollouts: &self.rollouts,
                retained: &self.retained,
                retention_timeout: Duration::from_secs(600),
                lossless: self.lossless,
                urls: &self.urls,
                wanted: &self.wanted,
                orphan_since: &self.orphan_since,
                orphan_grace: Duration::from_secs(60),
                install_timeout: Duration::from_secs(300),
                uninstall_failures: &self.uninstall_failures,
                reactivations: &self.reactivations,
            })
        }

        /// A command sent at `at`, `attempts` times.
        fn sent(&mut self, kind: OperationKind, key: ModuleKey, at: Instant, attempts: u32) {
            self.inflight.insert(
                (kind, key),
                InFlight {
                    attempts,
                    ..InFlight::new(at, None)
                },
            );
        }
    }

    #[test]
    fn an_install_is_sent_again_only_when_the_base_shows_no_trace_of_it() {
        let mut fx = Fx::new(vec![pod("a", 1, "1", false)], Some(HashMap::new()));
        assert_eq!(fx.plan(true, true).installs, vec![spec("1")]);
        let now = fx.now;
        fx.sent(OperationKind::Install, spec("1").key(), now, 1);
        assert!(fx.plan(true, true).installs.is_empty());
        // However long the base takes, no answer is no reason to send it again.
        fx.now += Duration::from_secs(61);
        assert!(fx.plan(true, true).installs.is_empty());
        assert_eq!(
            note(&fx, "a").map(|n| n.reason),
            Some(status::INSTALL_EXECUTING.to_string())
        );
        // A list asked for after the install does not show it: the base never got it.
        if let Some(f) = fx.inflight.values_mut().next() {
            f.lost = true;
        }
        assert_eq!(fx.plan(true, true).installs, vec![spec("1")]);
    }

    /// The waiting reason and message the plan gives pod `uid`'s first container.
    fn note(fx: &Fx, uid: &str) -> Option<Note> {
        let p = fx.plan(true, true);
        let st = p.statuses.iter().find(|(u, _)| u == uid)?.1.clone();
        let w = st.container_statuses?.first()?.state.clone()?.waiting?;
        Some(Note {
            reason: w.reason?,
            message: w.message.unwrap_or_default(),
        })
    }

    #[test]
    fn an_install_in_progress_is_written_once_however_long_it_takes() {
        let mut fx = Fx::new(
            vec![pod("a", 1, "1", false)],
            Some(reported(&[("1", BizState::Resolved)])),
        );
        let start = fx.now;
        fx.sent(OperationKind::Install, spec("1").key(), start, 1);
        let (_, first) = fx.plan(true, true).statuses.remove(0);
        if let Some(p) = fx.pods.get_mut("a") {
            p.written = Some(Box::new(first));
        }
        fx.now = start + Duration::from_secs(42);
        assert!(
            fx.plan(true, true).statuses.is_empty(),
            "nothing changed but the clock"
        );
    }

    #[test]
    fn a_starting_module_shows_executing_then_timed_out() {
        let mut fx = Fx::new(
            vec![pod("a", 1, "1", false)],
            Some(reported(&[("1", BizState::Resolved)])),
        );
        let start = fx.now;
        fx.sent(OperationKind::Install, spec("1").key(), start, 1);
        assert!(fx.plan(true, true).installs.is_empty());
        assert_eq!(
            note(&fx, "a").map(|n| n.reason),
            Some(status::INSTALL_EXECUTING.to_string())
        );
        fx.now = start + Duration::from_secs(301);
        assert_eq!(
            note(&fx, "a").map(|n| n.reason),
            Some(status::INSTALL_TIMED_OUT.to_string())
        );
        assert!(fx.plan(true, true).installs.is_empty(), "still not re-sent");
    }

    #[test]
    fn a_module_from_another_package_is_replaced_in_place() {
        let mut fx = Fx::new(
            vec![pod("a", 1, "1", false)],
            Some(reported(&[("1", BizState::Activated)])),
        );
        assert!(
            fx.plan(true, true).reinstalls.is_empty(),
            "URL unknown: left alone"
        );
        fx.urls.insert(spec("1").key(), spec("1").url);
        assert!(fx.plan(true, true).reinstalls.is_empty(), "same package");
        fx.urls.insert(spec("1").key(), "file:///old.jar".into());
        let p = fx.plan(true, true);
        assert_eq!(p.reinstalls, vec![(spec("1"), "a".to_string())]);
        assert!(p.installs.is_empty());
        let now = fx.now;
        fx.sent(OperationKind::Install, spec("1").key(), now, 1);
        assert!(fx.plan(true, true).reinstalls.is_empty(), "in flight");
    }

    #[test]
    fn modules_no_pod_asks_for_wait_out_the_grace_unless_wanted() {
        let mut fx = Fx::new(vec![], Some(reported(&[("9", BizState::Activated)])));
        let p = fx.plan(true, true);
        assert!(p.uninstalls.is_empty(), "first seen now");
        assert_eq!(p.orphans, vec![ModuleKey::new("m", "9")]);
        fx.orphan_since
            .insert(ModuleKey::new("m", "9"), fx.now - Duration::from_secs(61));
        fx.wanted.insert(ModuleKey::new("m", "9"));
        let p = fx.plan(true, true);
        assert!(
            p.uninstalls.is_empty() && p.orphans.is_empty(),
            "a pending pod wants it"
        );
        assert_eq!(p.kept_for_elsewhere, vec![ModuleKey::new("m", "9")]);
        fx.wanted.clear();
        let p = fx.plan(true, true);
        assert_eq!(p.uninstalls, vec![ModuleKey::new("m", "9")]);
        assert!(p.kept_for_elsewhere.is_empty());
    }

    #[test]
    fn a_rollback_to_a_parked_version_reinstalls_it_a_few_times_at_most() {
        // v2 took over from v1 on this base; the rollback's v1 pod is now the newest.
        let mut fx = Fx::new(
            vec![pod("new", 1, "2", false), pod("back", 2, "1", false)],
            Some(reported(&[
                ("1", BizState::Deactivated),
                ("2", BizState::Activated),
            ])),
        );
        let p = fx.plan(true, true);
        assert!(
            p.installs.is_empty(),
            "an install would only get REPEAT_BIZ"
        );
        assert_eq!(p.reactivate, vec![ModuleKey::new("m", "1")]);
        assert!(p.uninstalls.is_empty(), "v2 serves meanwhile");
        fx.reactivations
            .insert(ModuleKey::new("m", "1"), MAX_REACTIVATIONS);
        let p = fx.plan(true, true);
        assert!(p.reactivate.is_empty());
        assert_eq!(
            note(&fx, "back").map(|n| n.reason),
            Some("ModuleController.BaseInstanceInOperation".to_string())
        );
    }

    #[test]
    fn a_silent_base_makes_its_pods_not_ready() {
        let mut a = pod("a", 1, "1", false);
        a.written = Some(Box::new(PodStatus {
            conditions: Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..Default::default()
            }]),
            ..Default::default()
        }));
        let fx = Fx::new(vec![a], Some(reported(&[("1", BizState::Activated)])));
        let p = fx.plan(false, true);
        let (_, st) = p.statuses.first().expect("status written");
        assert!(!is_ready(Some(st)));
        let w = st.container_statuses.as_ref().expect("containers")[0]
            .state
            .clone()
            .and_then(|s| s.waiting)
            .expect("waiting");
        assert_eq!(w.reason.as_deref(), Some(status::BASE_NOT_READY));
    }

    #[test]
    fn nothing_is_installed_before_the_base_reports_or_while_silent() {
        let fx = Fx::new(vec![pod("a", 1, "1", false)], None);
        assert_eq!(fx.plan(true, true), Plan::default());
        let fx = Fx::new(vec![pod("a", 1, "1", false)], Some(HashMap::new()));
        assert!(fx.plan(false, true).installs.is_empty());
    }

    #[test]
    fn orphans_are_uninstalled_only_after_pods_synced() {
        let mut fx = Fx::new(vec![], Some(reported(&[("9", BizState::Activated)])));
        fx.orphan_since
            .insert(ModuleKey::new("m", "9"), fx.now - Duration::from_secs(61));
        assert!(fx.plan(true, false).uninstalls.is_empty());
        assert_eq!(
            fx.plan(true, true).uninstalls,
            vec![ModuleKey::new("m", "9")]
        );
    }

    #[test]
    fn rolling_update_on_one_base_installs_new_and_keeps_old_deactivated() {
        // Old pod v1 active; new pod v2 arrives on the same base.
        let fx = Fx::new(
            vec![pod("old", 1, "1", false), pod("new", 2, "2", false)],
            Some(reported(&[("1", BizState::Activated)])),
        );
        let p = fx.plan(true, true);
        assert_eq!(p.installs, vec![spec("2")]);
        assert!(p.uninstalls.is_empty(), "old version still has a live pod");
        // After the SOFAArk switch: v2 active, v1 deactivated. Old goes NotReady, new Ready, nothing re-installed.
        let fx = Fx::new(
            vec![pod("old", 1, "1", false), pod("new", 2, "2", false)],
            Some(reported(&[
                ("1", BizState::Deactivated),
                ("2", BizState::Activated),
            ])),
        );
        let p = fx.plan(true, true);
        assert!(
            p.installs.is_empty(),
            "must not re-activate the old version"
        );
        let by_uid: HashMap<_, _> = p.statuses.iter().cloned().collect();
        assert!(!is_ready(by_uid.get("old")));
        assert!(is_ready(by_uid.get("new")));
    }

    #[test]
    fn deleting_old_pod_uninstalls_exactly_its_version_then_pod_goes() {
        let mut fx = Fx::new(
            vec![pod("old", 1, "1", true), pod("new", 2, "2", false)],
            Some(reported(&[
                ("1", BizState::Deactivated),
                ("2", BizState::Activated),
            ])),
        );
        let p = fx.plan(true, true);
        assert_eq!(p.uninstalls, vec![ModuleKey::new("m", "1")]);
        assert!(
            p.delete_pods.is_empty(),
            "wait until the base no longer has it"
        );
        fx.reported = Some(reported(&[("2", BizState::Activated)]));
        let p = fx.plan(true, true);
        assert_eq!(p.delete_pods, vec!["old".to_string()]);
        assert!(p.uninstalls.is_empty());
    }

    #[test]
    fn a_pod_deleted_while_its_install_is_in_flight_stays_until_the_module_can_be_uninstalled() {
        // A rollback deletes the new pod right after its install went out.
        let mut fx = Fx::new(
            vec![pod("old", 1, "1", false), pod("new", 2, "2", true)],
            Some(reported(&[("1", BizState::Activated)])),
        );
        fx.inflight.insert(
            (OperationKind::Install, ModuleKey::new("m", "2")),
            InFlight::new(fx.now, Some("https://x/m-2.jar".into())),
        );
        let p = fx.plan(true, true);
        assert!(
            p.delete_pods.is_empty(),
            "the install lands after the pod would be gone"
        );
        assert!(p.uninstalls.is_empty(), "nothing to uninstall yet");
        // It landed (still starting): uninstalled at once, and the pod goes once it is gone.
        fx.inflight.clear();
        fx.reported = Some(reported(&[
            ("1", BizState::Activated),
            ("2", BizState::Resolved),
        ]));
        let p = fx.plan(true, true);
        assert_eq!(p.uninstalls, vec![ModuleKey::new("m", "2")]);
        assert!(p.delete_pods.is_empty());
        fx.reported = Some(reported(&[("1", BizState::Activated)]));
        assert_eq!(fx.plan(true, true).delete_pods, vec!["new".to_string()]);
        // Control: an install the base never saw (lost) does not hold the pod.
        let mut lost = InFlight::new(fx.now, None);
        lost.lost = true;
        fx.inflight
            .insert((OperationKind::Install, ModuleKey::new("m", "2")), lost);
        assert_eq!(fx.plan(true, true).delete_pods, vec!["new".to_string()]);
    }

    #[test]
    fn same_version_redeploy_keeps_the_module() {
        // rollout restart: old and new pod with the same version; deleting the old one uninstalls nothing.
        let fx = Fx::new(
            vec![pod("old", 1, "1", true), pod("new", 2, "1", false)],
            Some(reported(&[("1", BizState::Activated)])),
        );
        let p = fx.plan(true, true);
        assert!(p.uninstalls.is_empty());
        assert_eq!(p.delete_pods, vec!["old".to_string()]);
    }

    #[test]
    fn deleting_pods_on_a_dead_base_go_at_once() {
        let fx = Fx::new(vec![pod("a", 1, "1", true)], None);
        assert_eq!(fx.plan(false, true).delete_pods, vec!["a".to_string()]);
    }

    #[test]
    fn failures_back_off_and_show() {
        let mut fx = Fx::new(vec![pod("a", 1, "1", false)], Some(HashMap::new()));
        let f = next_failure(
            None,
            Some("InstallBizFailed"),
            "jar missing",
            fx.now,
            Duration::from_secs(10),
        );
        fx.failures.insert(spec("1").key(), f);
        let p = fx.plan(true, true);
        assert!(p.installs.is_empty());
        let st = &p.statuses[0].1;
        let w = st.container_statuses.as_ref().expect("cs")[0]
            .state
            .clone()
            .expect("st")
            .waiting
            .expect("w");
        assert_eq!(w.reason.as_deref(), Some("Arklet.InstallModuleFailed"));
        assert_eq!(w.message.as_deref(), Some("jar missing"));
    }

    #[test]
    fn unchanged_status_is_not_rewritten() {
        let mut fx = Fx::new(
            vec![pod("a", 1, "1", false)],
            Some(reported(&[("1", BizState::Activated)])),
        );
        let p = fx.plan(true, true);
        assert_eq!(p.statuses.len(), 1);
        fx.pods.get_mut("a").expect("pod").written = Some(Box::new(p.statuses[0].1.clone()));
        assert!(fx.plan(true, true).statuses.is_empty());
    }

    #[test]
    fn held_installs_are_not_sent() {
        let mut fx = Fx::new(vec![pod("a", 1, "1", false)], Some(HashMap::new()));
        fx.held.insert(
            "a".into(),
            Note {
                reason: "WaitingForBatch".into(),
                message: "batch 2 of 4 opens in 30s".into(),
            },
        );
        let p = fx.plan(true, true);
        assert!(p.installs.is_empty());
        assert_eq!(p.held_installs.len(), 1);
        let w = p.statuses[0].1.container_statuses.as_ref().expect("cs")[0]
            .state
            .clone()
            .expect("st")
            .waiting
            .expect("w");
        assert_eq!(w.message.as_deref(), Some("batch 2 of 4 opens in 30s"));
    }

    #[test]
    fn last_instance_is_handed_over_during_a_rollout() {
        // maxUnavailable > 0: the old pod on this base is deleted before any new pod lands here.
        let mut fx = Fx::new(
            vec![pod("old", 1, "1", true)],
            Some(reported(&[("1", BizState::Activated)])),
        );
        fx.rollouts.insert("ns/Deployment/d".into());
        let p = fx.plan(true, true);
        assert!(p.uninstalls.is_empty(), "the base keeps its only instance");
        assert_eq!(
            p.delete_pods,
            vec!["old".to_string()],
            "the pod leaves at once"
        );
        assert_eq!(
            p.retain,
            vec![(ModuleKey::new("m", "1"), "ns/Deployment/d".to_string())]
        );
        // Pod gone, module retained while the rollout lasts.
        fx.pods.clear();
        fx.retained.insert(
            ModuleKey::new("m", "1"),
            Retention {
                owner: "ns/Deployment/d".into(),
                since: fx.now,
            },
        );
        assert!(fx.plan(true, true).uninstalls.is_empty());
        // The replacement lands here: installed, and then the old version goes.
        fx.pods.insert("new".into(), pod("new", 2, "2", false));
        assert_eq!(fx.plan(true, true).installs, vec![spec("2")]);
        fx.reported = Some(reported(&[
            ("1", BizState::Deactivated),
            ("2", BizState::Activated),
        ]));
        assert_eq!(
            fx.plan(true, true).uninstalls,
            vec![ModuleKey::new("m", "1")]
        );
    }

    #[test]
    fn retention_ends_with_the_rollout_or_when_disabled() {
        let mut fx = Fx::new(vec![], Some(reported(&[("1", BizState::Activated)])));
        fx.retained.insert(
            ModuleKey::new("m", "1"),
            Retention {
                owner: "ns/Deployment/d".into(),
                since: fx.now,
            },
        );
        // Rollout over and no pod here: uninstall.
        assert_eq!(
            fx.plan(true, true).uninstalls,
            vec![ModuleKey::new("m", "1")]
        );
        fx.rollouts.insert("ns/Deployment/d".into());
        assert!(fx.plan(true, true).uninstalls.is_empty());
        fx.lossless = false;
        assert_eq!(
            fx.plan(true, true).uninstalls,
            vec![ModuleKey::new("m", "1")]
        );
    }

    #[test]
    fn plain_scale_down_uninstalls_at_once() {
        let mut fx = Fx::new(
            vec![pod("a", 1, "1", true)],
            Some(reported(&[("1", BizState::Activated)])),
        );
        fx.rollouts.clear();
        let p = fx.plan(true, true);
        assert_eq!(p.uninstalls, vec![ModuleKey::new("m", "1")]);
        assert!(p.delete_pods.is_empty() && p.retain.is_empty());
    }
}
