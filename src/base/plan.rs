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
    /// Status as last seen from the apiserver.
    pub status: Option<PodStatus>,
    /// The object itself (for Events).
    pub pod: Arc<Pod>,
}

impl PodInfo {
    /// Valid module specs of this pod.
    pub fn specs(&self) -> impl Iterator<Item = &ModuleSpec> {
        self.modules.iter().filter_map(|m| m.as_ref().ok())
    }
}

/// A command sent and not yet answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InFlight {
    /// When it was (last) sent.
    pub sent_at: Instant,
    /// How many times it was sent.
    pub attempts: u32,
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
}

/// Resend delay after `attempts` sends: timeout, 2×, 4× … capped at 16×.
pub fn retry_delay(timeout: Duration, attempts: u32) -> Duration {
    timeout * 2u32.pow(attempts.saturating_sub(1).min(4))
}

fn due(inflight: Option<&InFlight>, now: Instant, timeout: Duration) -> bool {
    inflight.is_none_or(|f| {
        now.saturating_duration_since(f.sent_at) >= retry_delay(timeout, f.attempts)
    })
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
                continue;
            }
            if i.held.contains_key(uid) {
                out.held_installs.push((uid.clone(), spec.clone()));
                continue;
            }
            if i.failures.get(&key).is_some_and(|f| f.retry_at > i.now) {
                continue;
            }
            if due(
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
            let mut orphans: Vec<&ModuleKey> = reported
                .keys()
                .filter(|k| !keep.contains(k) && !retained(k))
                .collect();
            orphans.sort();
            for key in orphans {
                if due(
                    i.inflight.get(&(OperationKind::Uninstall, key.clone())),
                    i.now,
                    i.command_timeout,
                ) {
                    out.uninstalls.push(key.clone());
                }
            }
        }
    }

    // Deleting pods leave once none of their modules is still on the base.
    for p in i.pods.values().filter(|p| p.deleting) {
        let gone = match (i.alive, i.reported) {
            (false, _) => true,
            (true, None) => false,
            (true, Some(r)) => p.specs().all(|s| {
                let k = s.key();
                keep.contains(&k) || !r.contains_key(&k) || retain_now.contains_key(&k)
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
    // controller or a returning base never flaps a pod).
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
            if status::differs(p.status.as_ref(), &st) {
                status::carry_times(p.status.as_ref(), &mut st);
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
    if reported.is_none()
        && let Some(f) = i.failures.get(&key)
    {
        return Some(Note {
            reason: f.reason.clone(),
            message: f.message.clone(),
        });
    }
    if let Some(f) = i.inflight.get(&(OperationKind::Install, key))
        && f.attempts > 1
    {
        return Some(Note {
            reason: "ModuleController.InstallModuleTimedOut".into(),
            message: format!(
                "no outcome from the base after {} install attempts; retrying",
                f.attempts - 1
            ),
        });
    }
    None
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
            status: None,
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
            })
        }
    }

    #[test]
    fn installs_missing_module_once_until_timeout() {
        let mut fx = Fx::new(vec![pod("a", 1, "1", false)], Some(HashMap::new()));
        assert_eq!(fx.plan(true, true).installs, vec![spec("1")]);
        fx.inflight.insert(
            (OperationKind::Install, spec("1").key()),
            InFlight {
                sent_at: fx.now,
                attempts: 1,
            },
        );
        assert!(fx.plan(true, true).installs.is_empty());
        fx.now += Duration::from_secs(11);
        assert_eq!(fx.plan(true, true).installs, vec![spec("1")]);
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
        let fx = Fx::new(vec![], Some(reported(&[("9", BizState::Activated)])));
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
        assert_eq!(w.reason.as_deref(), Some("Arklet.InstallBizFailed"));
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
        fx.pods.get_mut("a").expect("pod").status = Some(p.statuses[0].1.clone());
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
