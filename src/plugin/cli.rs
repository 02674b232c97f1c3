//! `module-controller plugin …`: check and dry-run plugins without a cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::model::BaseCommand;
use crate::rollout::batch::{
    BatchDecision, BatchPolicy, OnFailure, PendingInstall, RolloutView, decide_with,
};
use crate::rollout::ordering::{OrderingRule, StatusChange, order_with};
use crate::tunnel::codec::MessageCodec;

use super::batch::WasmBatch;
use super::codec::WasmCodec;
use super::config::PluginConfig;
use super::faults::{FaultSink, Reporter};
use super::kind::PluginKind;
use super::limits::Limits;
use super::loader::{self, API_VERSION, Hook, LoadLimits, LoadRequest, PluginVersion, Runtime};
use super::ordering::WasmOrdering;
use super::telemetry::PluginMetrics;

/// Plugin subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PluginCommand {
    /// Validate a plugin component: load it under the sandbox policy, report its kind and API
    /// version, run its self-check and one sample decision checked by the host.
    Check {
        /// The `.wasm` component.
        file: PathBuf,
        /// Config string passed to `init` (as in the manifest's `config`).
        #[arg(long, default_value = "")]
        config: String,
        /// Time budget per call, in milliseconds.
        #[arg(long, default_value_t = 50)]
        budget_ms: u64,
    },
    /// Feed a plugin sample input (a JSON file, `-` for stdin, or a built-in sample) and print
    /// its decision, after the same validation and fallback the controller applies.
    Test {
        /// The `.wasm` component.
        file: PathBuf,
        /// Input JSON; see plugins/README.md for the shape per kind.
        #[arg(long)]
        input: Option<PathBuf>,
        /// Config string passed to `init` and `host.config`.
        #[arg(long, default_value = "")]
        config: String,
        /// Time budget per call, in milliseconds.
        #[arg(long, default_value_t = 50)]
        budget_ms: u64,
    },
}

/// Runs a plugin subcommand, printing to stdout.
pub fn run(cmd: PluginCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    run_to(cmd, &mut out)
}

/// Runs a plugin subcommand, printing to `out`.
pub fn run_to(cmd: PluginCommand, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    match cmd {
        PluginCommand::Check {
            file,
            config,
            budget_ms,
        } => check(&file, &config, budget_ms, out),
        PluginCommand::Test {
            file,
            input,
            config,
            budget_ms,
        } => test(&file, input.as_deref(), &config, budget_ms, out),
    }
}

fn load(file: &Path, config: &str, budget_ms: u64) -> anyhow::Result<Arc<PluginVersion>> {
    // The controller's defaults, so `check` refuses what the controller would.
    let defaults = PluginConfig::new(".");
    let limits = Limits {
        budget: Duration::from_millis(budget_ms),
        memory_bytes: defaults.memory_limit_bytes,
    };
    let load_limits = LoadLimits {
        max_file_bytes: defaults.max_file_bytes,
        compile_budget: defaults.compile_budget,
    };
    let rt = Runtime::new(None, limits, load_limits, &defaults.metrics)?;
    let bytes = loader::read(file, load_limits.max_file_bytes)
        .with_context(|| format!("{} refused", file.display()))?;
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let req = LoadRequest {
        name: &name,
        file,
        bytes: &bytes,
        config,
        expected: None,
    };
    let v = loader::load(&rt, req).with_context(|| format!("{} refused", file.display()))?;
    Ok(Arc::new(v))
}

fn sample_changes() -> Vec<StatusChange> {
    (0..8u32)
        .map(|i| StatusChange {
            pod_index: i,
            creation_ts: 1_700_000_000 + i64::from(i * 7 % 8),
            revision: i64::from(1 + i % 2),
            from_ready: i % 3 == 0,
            to_ready: i % 2 == 0,
            deleting: i == 5,
        })
        .collect()
}

fn sample_batch() -> (RolloutView, Vec<PendingInstall>) {
    let view = RolloutView {
        owner: "default/sample".into(),
        module: "sample-module".into(),
        new_version: "2.0.0".into(),
        old_version: Some("1.0.0".into()),
        desired: 4,
        updated_ready: 0,
        updated_installing: 0,
        old_ready: 4,
        elapsed_ms: 0,
        since_last_ready_ms: None,
        annotations: BTreeMap::new(),
    };
    let pending = (0..4)
        .map(|i| PendingInstall {
            base_id: format!("base-{i}"),
            pod: format!("default/sample-{i}"),
            creation_ts: 1_700_000_000 + i,
        })
        .collect();
    (view, pending)
}

fn check(
    file: &Path,
    config: &str,
    budget_ms: u64,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let v = load(file, config, budget_ms)?;
    writeln!(out, "plugin:      {} {}", v.plugin_name, v.version)?;
    writeln!(out, "file:        {} (sha256 {})", file.display(), v.hash)?;
    writeln!(out, "kind:        {}", v.kind)?;
    writeln!(
        out,
        "api version: {} (this controller speaks {API_VERSION})",
        v.api_version
    )?;
    writeln!(
        out,
        "load:        {} ms, peak memory {} KiB",
        v.load_time.as_millis(),
        v.peak_memory.load(std::sync::atomic::Ordering::Relaxed) / 1024
    )?;
    writeln!(out, "self-check:  ok")?;
    let reporter = reporter();
    match v.kind {
        PluginKind::StatusOrdering => {
            let rule = WasmOrdering::new(v.clone(), reporter);
            let changes = sample_changes();
            let waves = rule
                .order(&changes)
                .map_err(|e| anyhow::anyhow!("sample ordering refused: {e}"))?;
            writeln!(
                out,
                "sample:      ordering of {} changes is a valid permutation: {waves:?}",
                changes.len()
            )?;
        }
        PluginKind::BatchPolicy => {
            let policy = WasmBatch::new(v.clone(), OnFailure::Hold, reporter);
            let (view, pending) = sample_batch();
            let d = policy
                .decide(&view, &pending)
                .map_err(|e| anyhow::anyhow!("sample decision refused: {e}"))?;
            writeln!(
                out,
                "sample:      admits {:?} of {} pending; hold reason {:?}; recheck after {:?} ms",
                d.admit,
                pending.len(),
                d.hold_reason,
                d.recheck_after_ms
            )?;
        }
        PluginKind::TunnelAdapter => {
            let codec = WasmCodec::new(v.clone(), reporter);
            writeln!(out, "subscribes:  {}", codec.subscriptions().join(", "))?;
            let msgs = codec
                .encode("sample-base", &BaseCommand::QueryAllModules)
                .map_err(|e| anyhow::anyhow!("sample encode refused: {e}"))?;
            for m in msgs {
                writeln!(
                    out,
                    "sample:      query-all for sample-base -> {} {}",
                    m.topic,
                    String::from_utf8_lossy(&m.payload)
                )?;
            }
        }
        PluginKind::Unknown => {}
    }
    writeln!(out, "OK")?;
    Ok(())
}

/// A reporter whose faults nobody reads: the CLI prints failures as fallbacks instead.
fn reporter() -> Reporter {
    Reporter {
        faults: Arc::new(FaultSink::new(16, Duration::ZERO)),
        metrics: PluginMetrics::default(),
    }
}

// JSON input is deserialized straight into the controller's own types through serde "remote"
// definitions: serde checks each definition against its type at compile time (a field added to
// the type fails the build here), and there is no field-by-field copy to keep in step.

/// JSON shape of a [`StatusChange`]; `podIndex` is ignored (the position in the list is used).
#[derive(Deserialize)]
#[serde(remote = "StatusChange", rename_all = "camelCase", deny_unknown_fields)]
struct StatusChangeJson {
    #[serde(default)]
    pod_index: u32,
    #[serde(default)]
    creation_ts: i64,
    #[serde(default)]
    revision: i64,
    #[serde(default)]
    from_ready: bool,
    #[serde(default)]
    to_ready: bool,
    #[serde(default)]
    deleting: bool,
}

#[derive(Deserialize)]
struct ChangeIn(#[serde(with = "StatusChangeJson")] StatusChange);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OrderingIn {
    changes: Vec<ChangeIn>,
}

/// JSON shape of a [`RolloutView`].
#[derive(Deserialize)]
#[serde(remote = "RolloutView", rename_all = "camelCase", deny_unknown_fields)]
struct RolloutViewJson {
    #[serde(default)]
    owner: String,
    #[serde(default)]
    module: String,
    #[serde(default)]
    new_version: String,
    #[serde(default)]
    old_version: Option<String>,
    desired: u32,
    #[serde(default)]
    updated_ready: u32,
    #[serde(default)]
    updated_installing: u32,
    #[serde(default)]
    old_ready: u32,
    #[serde(default)]
    elapsed_ms: u64,
    #[serde(default)]
    since_last_ready_ms: Option<u64>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

/// JSON shape of a [`PendingInstall`].
#[derive(Deserialize)]
#[serde(
    remote = "PendingInstall",
    rename_all = "camelCase",
    deny_unknown_fields
)]
struct PendingInstallJson {
    base_id: String,
    #[serde(default)]
    pod: String,
    #[serde(default)]
    creation_ts: i64,
}

#[derive(Deserialize)]
struct PendingIn(#[serde(with = "PendingInstallJson")] PendingInstall);

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BatchIn {
    #[serde(with = "RolloutViewJson")]
    view: RolloutView,
    pending: Vec<PendingIn>,
}

/// JSON shape of a [`BatchDecision`] (output).
#[derive(Serialize)]
#[serde(remote = "BatchDecision", rename_all = "camelCase")]
struct BatchDecisionJson {
    admit: Vec<usize>,
    hold_reason: Option<String>,
    recheck_after_ms: Option<u64>,
}

#[derive(Serialize)]
struct DecisionOut(#[serde(with = "BatchDecisionJson")] BatchDecision);

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct DecodeIn {
    topic: String,
    /// A JSON string is sent as its text; any other JSON value as its serialization.
    payload: serde_json::Value,
    #[serde(default)]
    now_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EncodeIn {
    base_id: String,
    command: BaseCommand,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TunnelIn {
    #[serde(default)]
    decode: Vec<DecodeIn>,
    #[serde(default)]
    encode: Vec<EncodeIn>,
}

#[derive(Serialize)]
struct Outcome<T: Serialize> {
    plugin: String,
    decision: T,
    /// The plugin's output was refused and the built-in default decided.
    fallback: Option<String>,
}

fn read_input(input: Option<&Path>) -> anyhow::Result<Option<String>> {
    match input {
        None => Ok(None),
        Some(p) if p == Path::new("-") => {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                .context("reading stdin")?;
            Ok(Some(s))
        }
        Some(p) => std::fs::read_to_string(p)
            .map(Some)
            .with_context(|| format!("reading {}", p.display())),
    }
}

fn test(
    file: &Path,
    input: Option<&Path>,
    config: &str,
    budget_ms: u64,
    out: &mut dyn std::io::Write,
) -> anyhow::Result<()> {
    let v = load(file, config, budget_ms)?;
    let text = read_input(input)?;
    let reporter = reporter();
    let name = v.name.to_string();
    let json = match &v.hook {
        Hook::Ordering(_) => {
            let changes = match text {
                None => sample_changes(),
                Some(t) => {
                    let i: OrderingIn = serde_json::from_str(&t).context("ordering input")?;
                    (0u32..)
                        .zip(i.changes)
                        .map(|(n, ChangeIn(c))| StatusChange { pod_index: n, ..c })
                        .collect()
                }
            };
            let rule = WasmOrdering::new(v.clone(), reporter);
            let (waves, err) = order_with(&rule, &changes);
            serde_json::to_string_pretty(&Outcome {
                plugin: name,
                decision: waves,
                fallback: err.map(|e| e.to_string()),
            })?
        }
        Hook::Batch(_) => {
            let (view, pending) = match text {
                None => sample_batch(),
                Some(t) => {
                    let i: BatchIn = serde_json::from_str(&t).context("batch input")?;
                    let pending = i.pending.into_iter().map(|PendingIn(p)| p).collect();
                    (i.view, pending)
                }
            };
            // As the controller binds a policy by default: a failing call holds.
            let policy = WasmBatch::new(v.clone(), OnFailure::Hold, reporter);
            let (d, err) = decide_with(&policy, &view, &pending);
            serde_json::to_string_pretty(&Outcome {
                plugin: name,
                decision: DecisionOut(d),
                fallback: err.map(|e| e.to_string()),
            })?
        }
        Hook::Tunnel { .. } => {
            let input: TunnelIn = match text {
                None => TunnelIn {
                    decode: Vec::new(),
                    encode: vec![EncodeIn {
                        base_id: "sample-base".into(),
                        command: BaseCommand::QueryAllModules,
                    }],
                },
                Some(t) => serde_json::from_str(&t).context("tunnel input")?,
            };
            let codec = WasmCodec::new(v.clone(), reporter);
            let now = chrono::Utc::now().timestamp_millis();
            let decoded: Vec<serde_json::Value> = input
                .decode
                .iter()
                .map(|d| {
                    let payload = match &d.payload {
                        serde_json::Value::String(s) => s.clone().into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    let handled = codec.handles(&d.topic);
                    match codec.decode(&d.topic, &payload, d.now_ms.unwrap_or(now)) {
                        Ok(evs) => serde_json::json!({"topic": d.topic, "handled": handled, "events": evs}),
                        Err(e) => serde_json::json!({"topic": d.topic, "handled": handled, "error": e.to_string()}),
                    }
                })
                .collect();
            let encoded: Vec<serde_json::Value> = input
                .encode
                .iter()
                .map(|e| match codec.encode(&e.base_id, &e.command) {
                    Ok(msgs) => serde_json::json!({
                        "baseId": e.base_id,
                        "messages": msgs.iter().map(|m| serde_json::json!({
                            "topic": m.topic,
                            "payload": String::from_utf8_lossy(&m.payload),
                        })).collect::<Vec<_>>(),
                    }),
                    Err(err) => serde_json::json!({"baseId": e.base_id, "error": err.to_string()}),
                })
                .collect();
            serde_json::to_string_pretty(&serde_json::json!({
                "plugin": name,
                "subscriptions": codec.subscriptions(),
                "decoded": decoded,
                "encoded": encoded,
            }))?
        }
    };
    writeln!(out, "{json}")?;
    Ok(())
}
