//! Checks shared by the fault tests, written so that each returns what it found (the tests
//! assert it is empty; their controls assert it is not).

use std::collections::BTreeMap;
use std::time::Duration;

use arklet_double::{Base, Command};

/// GET `url`: (status, body), None when nothing answers within 5 s.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .ok()?;
    let resp = client.get(url).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.unwrap_or_default()))
}

/// The identity of an install or uninstall command: ("install"|"uninstall", name, version).
pub fn op_of(c: &Command) -> Option<(&'static str, String, String)> {
    match c {
        Command::Install { name, version, .. } => Some(("install", name.clone(), version.clone())),
        Command::Uninstall { name, version } => Some(("uninstall", name.clone(), version.clone())),
        _ => None,
    }
}

/// Install and uninstall commands `b` received at or after `since_ms` whose exact name and
/// version it had already received in the same kind of command (before or after): what a
/// controller re-sent. Executed and dropped commands both count.
pub fn resent_since(b: &Base, since_ms: u64) -> Vec<String> {
    let mut seen: BTreeMap<(&'static str, String, String), u32> = BTreeMap::new();
    let mut out = Vec::new();
    for r in b.commands() {
        let Some(op) = op_of(&r.command) else {
            continue;
        };
        let n = seen.entry(op.clone()).or_default();
        *n += 1;
        if *n > 1 && r.at_ms >= since_ms {
            out.push(format!(
                "{} {}@{} sent again to {} at {} (copy {n})",
                op.0,
                op.1,
                op.2,
                b.identity(),
                r.at_ms
            ));
        }
    }
    out
}

/// Count of commands of each (kind, name, version) `b` received.
pub fn op_counts(b: &Base) -> BTreeMap<(&'static str, String, String), usize> {
    let mut m = BTreeMap::new();
    for r in b.commands() {
        if let Some(op) = op_of(&r.command) {
            *m.entry(op).or_default() += 1;
        }
    }
    m
}

/// Instants (ms) at which `b` ran no version of `module` after it first ran one.
pub fn empty_instants(b: &Base, module: &str) -> Vec<u64> {
    let mut seen = false;
    let mut gaps = Vec::new();
    for snap in b.history() {
        if snap.active.iter().any(|k| k.name == module) {
            seen = true;
        } else if seen {
            gaps.push(snap.at_ms);
        }
    }
    gaps
}

/// Arrival times (ms) of the `queryAllBiz` commands `b` received in `[from_ms, to_ms]`.
pub fn queries_between(b: &Base, from_ms: u64, to_ms: u64) -> Vec<u64> {
    b.commands()
        .into_iter()
        .filter(|r| matches!(r.command, Command::QueryAllBiz))
        .map(|r| r.at_ms)
        .filter(|t| (from_ms..=to_ms).contains(t))
        .collect()
}

/// Longest stretch (ms) in `[from_ms, to_ms]` without any of `times` (sorted).
pub fn longest_gap(times: &[u64], from_ms: u64, to_ms: u64) -> u64 {
    let mut last = from_ms;
    let mut gap = 0;
    for &t in times {
        gap = gap.max(t.saturating_sub(last));
        last = last.max(t);
    }
    gap.max(to_ms.saturating_sub(last))
}

/// The value of one sample in a Prometheus text exposition: `series` is the metric name with
/// its labels exactly as rendered (e.g. `module_controller_bases` or
/// `module_controller_apiserver_writes_total{kind="pod_status",result="error"}`). None when
/// absent.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Like [`sample`], panicking with the exposition when the series is missing.
pub fn sample_of(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// A module Deployment `app` of `module@version`, one pod per base *per version* (the
/// anti-affinity selects the `version` label, so a new-version pod may join a base that still
/// runs the old one), as `examples/rolling-update.yaml`.
pub fn rolling_deployment(
    env: &super::TestEnv,
    app: &str,
    module: &str,
    version: &str,
    replicas: i32,
    surge: i32,
    unavailable: i32,
) -> k8s_openapi::api::apps::v1::Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app, "namespace": env.ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": app}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": surge, "maxUnavailable": unavailable}},
            "template": {
                "metadata": {"labels": {"app": app, "version": version, "virtual-kubelet.koupleless.io/component": "module"}},
                "spec": {
                    "containers": [{
                        "name": module,
                        "image": format!("https://example.invalid/{module}-{version}-ark-biz.jar"),
                        "env": [{"name": "BIZ_VERSION", "value": version}]
                    }],
                    "affinity": {
                        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [
                            {"key": "base.koupleless.io/name", "operator": "In", "values": [env.base_name]}
                        ]}]}},
                        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                            "labelSelector": {"matchLabels": {"app": app, "version": version}},
                            "topologyKey": "kubernetes.io/hostname"
                        }]}
                    },
                    "tolerations": [
                        {"key": "schedule.koupleless.io/virtual-node", "operator": "Equal", "value": "True", "effect": "NoExecute"},
                        {"key": "schedule.koupleless.io/node-env", "operator": "Equal", "value": env.env, "effect": "NoExecute"}
                    ]
                }
            }
        }
    }))
    .expect("deployment")
}
