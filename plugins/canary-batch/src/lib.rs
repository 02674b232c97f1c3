//! Canary-then-percentage batch policy.
//!
//! 1. Batch 1 is exactly one install (the oldest pending pod): the canary.
//! 2. Once the canary is Ready, everything waits until the owning Deployment carries the
//!    approval annotation (`module-controller.koupleless.io/approved: "true"` by default).
//! 3. Then the rest goes in waves of `percent` of the desired replicas (at least one), each
//!    wave opening `soakSeconds` after the previous one became Ready.
//!
//! Config (JSON, every field optional):
//! `{"approvalAnnotation": "...", "approvalValue": "true", "percent": 25, "soakSeconds": 30}`.

use batch_sdk::{Batch, Decision, Metadata, PendingInstall, PluginInfo, RolloutView};
use serde::Deserialize;

/// How often to ask again while waiting for something the policy cannot see change.
const POLL_MS: u64 = 10_000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct Config {
    approval_annotation: String,
    approval_value: String,
    percent: u32,
    soak_seconds: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            approval_annotation: "module-controller.koupleless.io/approved".into(),
            approval_value: "true".into(),
            percent: 25,
            soak_seconds: 30,
        }
    }
}

impl Config {
    fn parse(s: &str) -> Result<Config, String> {
        if s.trim().is_empty() {
            return Ok(Config::default());
        }
        let c: Config = serde_json::from_str(s).map_err(|e| format!("invalid config: {e}"))?;
        if c.percent == 0 || c.percent > 100 {
            return Err(format!("percent must be in 1..=100, got {}", c.percent));
        }
        if c.approval_annotation.is_empty() {
            return Err("approvalAnnotation must not be empty".into());
        }
        Ok(c)
    }
}

/// Inputs of a decision, so the logic is testable without the host.
struct Facts<'a> {
    view: &'a RolloutView,
    approved: bool,
}

/// Size of every wave after the canary.
fn step(desired: u32, percent: u32) -> u32 {
    (desired * percent).div_ceil(100).max(1)
}

/// Number of batches for `desired` replicas: the canary plus the percentage waves.
fn batch_count(desired: u32, percent: u32) -> u32 {
    1 + desired.saturating_sub(1).div_ceil(step(desired, percent))
}

/// Index (1-based) of the batch the next admitted install belongs to, given `started` installs.
fn batch_of(started: u32, desired: u32, percent: u32) -> u32 {
    if started == 0 {
        1
    } else {
        2 + (started - 1) / step(desired, percent)
    }
}

fn hold(reason: String, recheck_after_ms: Option<u64>) -> Decision {
    Decision {
        admit: Vec::new(),
        hold_reason: Some(reason),
        recheck_after_ms,
    }
}

/// The oldest `n` pending installs.
fn oldest(pending: &[PendingInstall], n: u32) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..pending.len() as u32).collect();
    idx.sort_by_key(|&i| (pending[i as usize].creation_ts, i));
    idx.truncate(n as usize);
    idx
}

fn decide(cfg: &Config, facts: &Facts<'_>, pending: &[PendingInstall]) -> Decision {
    let v = facts.view;
    if pending.is_empty() {
        return Decision {
            admit: Vec::new(),
            hold_reason: None,
            recheck_after_ms: None,
        };
    }
    let desired = v.desired.max(1);
    let total = batch_count(desired, cfg.percent);
    let started = v.updated_ready + v.updated_installing;
    let next = batch_of(started, desired, cfg.percent);
    if v.updated_installing > 0 {
        let current = batch_of(started - 1, desired, cfg.percent);
        return hold(
            format!("batch {current} of {total} is installing"),
            Some(POLL_MS),
        );
    }
    if started == 0 {
        let admit = oldest(pending, 1);
        return Decision {
            admit,
            hold_reason: Some(format!("waiting for the canary (batch 1 of {total})")),
            recheck_after_ms: None,
        };
    }
    if !facts.approved {
        return hold(
            format!(
                "waiting for approval: annotate the Deployment with {}={} (batch {next} of {total})",
                cfg.approval_annotation, cfg.approval_value
            ),
            Some(POLL_MS),
        );
    }
    let soak_ms = cfg.soak_seconds.saturating_mul(1000);
    let since = v.since_last_ready_ms.unwrap_or(u64::MAX);
    if since < soak_ms {
        let wait_ms = soak_ms - since;
        return hold(
            format!(
                "batch {next} of {total} opens in {}s",
                wait_ms.div_ceil(1000)
            ),
            Some(wait_ms),
        );
    }
    let admit = oldest(pending, step(desired, cfg.percent));
    let rest = pending.len() - admit.len();
    Decision {
        admit,
        hold_reason: (rest > 0).then(|| format!("waiting for batch {} of {total}", next + 1)),
        recheck_after_ms: None,
    }
}

struct Canary;

impl Metadata for Canary {
    fn info() -> PluginInfo {
        batch_sdk::info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
    }

    fn init(config: String) -> Result<(), String> {
        Config::parse(&config).map(|_| ())
    }

    fn self_check() -> Result<(), String> {
        let cfg = Config::default();
        let check = |got: u32, want: u32, what: &str| {
            if got == want {
                Ok(())
            } else {
                Err(format!("{what}: got {got}, want {want}"))
            }
        };
        check(batch_count(4, 25), 4, "batches for 4 at 25%")?;
        check(batch_count(10, 25), 4, "batches for 10 at 25%")?;
        check(batch_count(1, 25), 1, "batches for 1 at 25%")?;
        let pending: Vec<PendingInstall> = (0..4)
            .map(|i| PendingInstall {
                base_id: format!("b{i}"),
                pod: format!("ns/p{i}"),
                creation_ts: 10 - i64::from(i),
            })
            .collect();
        let mut view = RolloutView {
            owner: "ns/d".into(),
            module: "m".into(),
            new_version: "2".into(),
            old_version: Some("1".into()),
            desired: 4,
            updated_ready: 0,
            updated_installing: 0,
            old_ready: 4,
            elapsed_ms: 0,
            since_last_ready_ms: None,
        };
        let d = decide(
            &cfg,
            &Facts {
                view: &view,
                approved: false,
            },
            &pending,
        );
        if d.admit != [3] {
            return Err(format!(
                "canary must be the oldest pending install, got {:?}",
                d.admit
            ));
        }
        view.updated_ready = 1;
        view.since_last_ready_ms = Some(1_000);
        let d = decide(
            &cfg,
            &Facts {
                view: &view,
                approved: false,
            },
            &pending[..3],
        );
        if !d.admit.is_empty()
            || !d
                .hold_reason
                .unwrap_or_default()
                .starts_with("waiting for approval")
        {
            return Err("without approval nothing may proceed after the canary".into());
        }
        let d = decide(
            &cfg,
            &Facts {
                view: &view,
                approved: true,
            },
            &pending[..3],
        );
        if d.hold_reason.as_deref() != Some("batch 2 of 4 opens in 29s")
            || d.recheck_after_ms != Some(29_000)
        {
            return Err(format!(
                "soak: got {:?} / {:?}",
                d.hold_reason, d.recheck_after_ms
            ));
        }
        view.since_last_ready_ms = Some(31_000);
        let d = decide(
            &cfg,
            &Facts {
                view: &view,
                approved: true,
            },
            &pending[..3],
        );
        if d.admit != [2] {
            return Err(format!("batch 2 must admit one install, got {:?}", d.admit));
        }
        Ok(())
    }
}

impl Batch for Canary {
    fn decide(view: RolloutView, pending: Vec<PendingInstall>) -> Result<Decision, String> {
        let cfg = Config::parse(&batch_sdk::host::config())?;
        let approved = batch_sdk::rollout_context::annotation(&cfg.approval_annotation)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(&cfg.approval_value));
        Ok(decide(
            &cfg,
            &Facts {
                view: &view,
                approved,
            },
            &pending,
        ))
    }
}

batch_sdk::export_plugin!(Canary);
