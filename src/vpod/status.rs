//! Module state → Pod status (protocol.md, "Module state → container status"). Pure.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::model::{BizState, ModuleSpec, ModuleStatus};
use crate::time::time_from_ms;
use crate::vpod::spec::SpecError;

/// Reason shown while a module waits for its install.
pub const PENDING_INSTALL: &str = "PendingInstall";
/// Reason shown for a pod spec that cannot be a module.
pub const INVALID_SPEC: &str = "User.InvalidParameter";
/// Reason while the base starts a module (reports it RESOLVED, or has not answered yet).
pub const INSTALL_EXECUTING: &str = "Arklet.InstallModuleExecuting";
/// Reason when a module has not started within the install deadline.
pub const INSTALL_TIMED_OUT: &str = "Arklet.InstallModuleTimedOut";
/// Reason when the base failed to install the module.
pub const INSTALL_FAILED: &str = "Arklet.InstallModuleFailed";
/// Reason when the module itself is at fault (SOFAArk's user error codes).
pub const USER_INSTALL_FAILED: &str = "User.InstallModuleFailed";
/// Reason of an Event when the base failed to uninstall a module.
pub const UNINSTALL_FAILED: &str = "Arklet.UninstallBizFailed";
/// Reason of the modules of a base that stopped sending heartbeats.
pub const BASE_NOT_READY: &str = "ModuleController.BaseInstanceNotReady";
/// Reason of a module a newer version took over on its base (not a failure).
pub const DEACTIVATED: &str = "BizDeactivated";

/// An explanation the controller attaches to a container that is not running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Waiting reason.
    pub reason: String,
    /// Waiting message.
    pub message: String,
}

/// What is known about one container of a module pod.
// Short-lived, built per reconcile in a small Vec: boxing would only add allocations.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerView {
    /// The container is not a valid module.
    Invalid(SpecError),
    /// A module.
    Module {
        /// What the pod asks for.
        spec: ModuleSpec,
        /// What the base reports for exactly this name and version.
        reported: Option<ModuleStatus>,
        /// The controller's explanation when it is not running (held, failed, superseded...).
        note: Option<Note>,
    },
}

/// The catalogue reason of a failed install (protocol.md, "Error codes"): the module's own
/// fault (SOFAArk's user error codes) is `User.InstallModuleFailed`, anything else
/// `Arklet.InstallModuleFailed`; a code that is already two-level is kept. Never a raw
/// `FAILED`.
pub fn qualified_reason(code: Option<&str>) -> String {
    // Arklet catalogue types more telling than "the install failed".
    const SPECIFIC: [&str; 4] = [
        "PullBizError",
        "PullBizTimeOut",
        "MetaspaceFull",
        "InstallationRequirementNotMet",
    ];
    match code.map(str::trim).filter(|c| !c.is_empty()) {
        Some(c) if c.contains('.') => c.into(),
        Some(c) if c.to_ascii_lowercase().contains("user") => USER_INSTALL_FAILED.into(),
        Some(c) if SPECIFIC.contains(&c) => format!("Arklet.{c}"),
        _ => INSTALL_FAILED.into(),
    }
}

fn waiting(reason: &str, message: Option<String>) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.to_string()),
            message,
        }),
        ..Default::default()
    }
}

fn container_status(view: &ContainerView, now: &Time) -> ContainerStatus {
    let (name, image, state, ready) = match view {
        ContainerView::Invalid(e) => (
            e.container.clone(),
            String::new(),
            waiting(INVALID_SPEC, Some(e.message.clone())),
            false,
        ),
        ContainerView::Module {
            spec,
            reported,
            note,
        } => {
            let note_state = |default_reason: &str, default_msg: String| match note {
                Some(n) => waiting(&n.reason, Some(n.message.clone())),
                None => waiting(default_reason, Some(default_msg)),
            };
            let (state, ready) = match reported.as_ref().map(|r| (&r.state, r)) {
                Some((BizState::Activated, r)) => (
                    ContainerState {
                        running: Some(ContainerStateRunning {
                            started_at: r
                                .change_time_ms
                                .and_then(time_from_ms)
                                .or_else(|| Some(now.clone())),
                        }),
                        ..Default::default()
                    },
                    true,
                ),
                Some((BizState::Broken, r)) => {
                    (
                        match note {
                            Some(n) => waiting(&n.reason, Some(n.message.clone())),
                            None => waiting(
                                &qualified_reason(r.reason.as_deref()),
                                Some(r.message.clone().unwrap_or_else(|| {
                                    "the base reports the module BROKEN".into()
                                })),
                            ),
                        },
                        false,
                    )
                }
                Some((BizState::Resolved, _)) => (
                    note_state(
                        INSTALL_EXECUTING,
                        format!("the base is starting {}@{}", spec.name, spec.version),
                    ),
                    false,
                ),
                Some((BizState::Deactivated, r)) => (
                    note_state(
                        DEACTIVATED,
                        r.message.clone().unwrap_or_else(|| {
                            format!(
                                "{}@{} is installed but not serving (a newer version took over)",
                                spec.name, spec.version
                            )
                        }),
                    ),
                    false,
                ),
                Some((BizState::Stopped, r)) => (
                    ContainerState {
                        terminated: Some(ContainerStateTerminated {
                            exit_code: 1,
                            reason: Some("STOPPED".into()),
                            message: r.message.clone(),
                            finished_at: r.change_time_ms.and_then(time_from_ms),
                            ..Default::default()
                        }),
                        ..Default::default()
                    },
                    false,
                ),
                _ => (
                    note_state(
                        PENDING_INSTALL,
                        format!(
                            "waiting for the base to install {}@{}",
                            spec.name, spec.version
                        ),
                    ),
                    false,
                ),
            };
            (spec.name.clone(), spec.url.clone(), state, ready)
        }
    };
    ContainerStatus {
        name,
        image,
        image_id: String::new(),
        ready,
        restart_count: 0,
        started: Some(ready),
        state: Some(state),
        ..Default::default()
    }
}

/// The status a module pod should have.
pub fn compute(
    views: &[ContainerView],
    base_ip: &str,
    install_attempted: bool,
    now: &Time,
) -> PodStatus {
    let containers: Vec<ContainerStatus> = views.iter().map(|v| container_status(v, now)).collect();
    let all_ready = !containers.is_empty() && containers.iter().all(|c| c.ready);
    let all_terminated = !containers.is_empty()
        && containers
            .iter()
            .all(|c| c.state.as_ref().is_some_and(|s| s.terminated.is_some()));
    let any_reported = views.iter().any(|v| {
        matches!(
            v,
            ContainerView::Module {
                reported: Some(_),
                ..
            }
        )
    });
    let phase = if all_terminated {
        "Succeeded"
    } else if install_attempted || any_reported {
        "Running"
    } else {
        "Pending"
    };
    let cond = |type_: &str, ok: bool| PodCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: (!ok).then(|| "ContainersNotReady".to_string()),
        message: (!ok).then(|| {
            let names: Vec<&str> = containers
                .iter()
                .filter(|c| !c.ready)
                .map(|c| c.name.as_str())
                .collect();
            format!("containers with unready status: [{}]", names.join(" "))
        }),
        last_transition_time: Some(now.clone()),
        last_probe_time: None,
        ..Default::default()
    };
    // The apiserver refuses a podIP that is not an IP; a base reporting a host name (or
    // nothing) gets pods without one rather than status writes that fail forever.
    let ip = base_ip
        .parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string());
    PodStatus {
        phase: Some(phase.into()),
        conditions: Some(vec![
            cond("PodScheduled", true),
            cond("Initialized", true),
            cond("ContainersReady", all_ready),
            cond("Ready", all_ready),
        ]),
        container_statuses: Some(containers),
        host_ip: ip.clone(),
        pod_ip: ip.clone(),
        pod_ips: ip.map(|ip| vec![PodIP { ip }]),
        start_time: Some(now.clone()),
        ..Default::default()
    }
}

/// Whether the pod status says Ready.
pub fn is_ready(status: Option<&PodStatus>) -> bool {
    status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

type SemanticContainer = (
    String,
    bool,
    u8,
    Option<String>,
    Option<String>,
    Option<i32>,
);

type SemanticStatus = (
    Option<String>,
    Vec<(String, String)>,
    Vec<SemanticContainer>,
    Option<String>,
);

fn semantic(s: &PodStatus) -> SemanticStatus {
    let mut conds: Vec<(String, String)> = s
        .conditions
        .iter()
        .flatten()
        .filter(|c| {
            ["Ready", "ContainersReady", "PodScheduled", "Initialized"].contains(&c.type_.as_str())
        })
        .map(|c| (c.type_.clone(), c.status.clone()))
        .collect();
    conds.sort();
    let mut cs: Vec<SemanticContainer> = s
        .container_statuses
        .iter()
        .flatten()
        .map(|c| {
            let st = c.state.clone().unwrap_or_default();
            let (kind, reason, message, code) = if let Some(w) = st.waiting {
                (0, w.reason, w.message, None)
            } else if st.running.is_some() {
                (1, None, None, None)
            } else if let Some(t) = st.terminated {
                (2, t.reason, t.message, Some(t.exit_code))
            } else {
                (3, None, None, None)
            };
            (c.name.clone(), c.ready, kind, reason, message, code)
        })
        .collect();
    cs.sort();
    (s.phase.clone(), conds, cs, s.pod_ip.clone())
}

/// Whether writing `desired` over `current` would change anything a user or controller reads.
pub fn differs(current: Option<&PodStatus>, desired: &PodStatus) -> bool {
    match current {
        None => true,
        Some(c) => semantic(c) != semantic(desired),
    }
}

/// Keeps transition and start times of `current` where nothing changed, so a write carries no
/// spurious timestamps.
pub fn carry_times(current: Option<&PodStatus>, desired: &mut PodStatus) {
    let Some(current) = current else { return };
    if current.start_time.is_some() {
        desired.start_time = current.start_time.clone();
    }
    if let (Some(new), Some(old)) = (desired.conditions.as_mut(), current.conditions.as_ref()) {
        for c in new.iter_mut() {
            if let Some(o) = old
                .iter()
                .find(|o| o.type_ == c.type_ && o.status == c.status)
            {
                c.last_transition_time = o.last_transition_time.clone();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ModuleSpec {
        ModuleSpec {
            name: "m".into(),
            version: "1".into(),
            url: "file:///m.jar".into(),
        }
    }

    fn reported(state: BizState) -> ModuleStatus {
        ModuleStatus {
            name: "m".into(),
            version: "1".into(),
            state,
            change_time_ms: Some(1_000),
            reason: Some("InstallBizFailed".into()),
            message: Some("boom".into()),
        }
    }

    fn now() -> Time {
        time_from_ms(5_000).expect("t")
    }

    fn view(state: Option<BizState>) -> ContainerView {
        ContainerView::Module {
            spec: spec(),
            reported: state.map(reported),
            note: None,
        }
    }

    #[test]
    fn activated_is_running_and_ready() {
        let s = compute(&[view(Some(BizState::Activated))], "1.2.3.4", true, &now());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(is_ready(Some(&s)));
        assert_eq!(s.pod_ip.as_deref(), Some("1.2.3.4"));
        let c = &s.container_statuses.as_ref().expect("cs")[0];
        assert!(c.ready && c.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
        let s = compute(&[view(None)], "base-host.local", true, &now());
        assert_eq!(s.pod_ip, None, "not an IP: left out, never rejected");
    }

    #[test]
    fn not_reported_is_pending_until_attempted() {
        let s = compute(&[view(None)], "ip", false, &now());
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let s = compute(&[view(None)], "ip", true, &now());
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert!(!is_ready(Some(&s)));
        let w = s.container_statuses.expect("cs")[0]
            .state
            .clone()
            .expect("st")
            .waiting
            .expect("waiting");
        assert_eq!(w.reason.as_deref(), Some(PENDING_INSTALL));
    }

    #[test]
    fn broken_shows_the_base_reason() {
        let s = compute(&[view(Some(BizState::Broken))], "ip", true, &now());
        let w = s.container_statuses.expect("cs")[0]
            .state
            .clone()
            .expect("st")
            .waiting
            .expect("waiting");
        assert_eq!(w.reason.as_deref(), Some("Arklet.InstallModuleFailed"));
        assert_eq!(w.message.as_deref(), Some("boom"));
    }

    #[test]
    fn stopped_is_terminated_and_all_terminated_succeeds() {
        let s = compute(&[view(Some(BizState::Stopped))], "ip", true, &now());
        assert_eq!(s.phase.as_deref(), Some("Succeeded"));
        let t = s.container_statuses.expect("cs")[0]
            .state
            .clone()
            .expect("st")
            .terminated
            .expect("t");
        assert_eq!(t.exit_code, 1);
    }

    #[test]
    fn deactivated_waits_and_is_not_a_failure() {
        let s = compute(&[view(Some(BizState::Deactivated))], "ip", true, &now());
        let w = s.container_statuses.expect("cs")[0]
            .state
            .clone()
            .expect("st")
            .waiting
            .expect("w");
        assert_eq!(w.reason.as_deref(), Some(DEACTIVATED));
    }

    #[test]
    fn timestamps_alone_are_not_a_difference() {
        let a = compute(&[view(Some(BizState::Activated))], "ip", true, &now());
        let b = compute(
            &[view(Some(BizState::Activated))],
            "ip",
            true,
            &time_from_ms(9_000).expect("t"),
        );
        assert!(!differs(Some(&a), &b));
        let c = compute(&[view(Some(BizState::Broken))], "ip", true, &now());
        assert!(differs(Some(&a), &c));
        assert!(differs(None, &a));
    }

    #[test]
    fn qualifies_error_codes() {
        assert_eq!(
            qualified_reason(Some("PullBizError")),
            "Arklet.PullBizError"
        );
        assert_eq!(qualified_reason(Some("User.Foo")), "User.Foo");
        assert_eq!(
            qualified_reason(Some("InstallBizUserError")),
            "User.InstallModuleFailed"
        );
        assert_eq!(qualified_reason(None), "Arklet.InstallModuleFailed");
        assert_eq!(
            qualified_reason(Some("FAILED")),
            "Arklet.InstallModuleFailed"
        );
        assert_eq!(
            qualified_reason(Some("InstallBizFailed")),
            "Arklet.InstallModuleFailed"
        );
    }
}
