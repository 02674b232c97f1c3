//! Tunnel adapter for the "simple agent" protocol: a base agent that is not Arklet.
//!
//! Agent → controller, on `<prefix>/<node>/…` (prefix from config, default `simple-agent`):
//! - `status`: `{"node","ip","hostname","app","version","cluster","state":"up"|"down","ts",
//!   "modules":[{"name","version","state","reason"?,"message"?}]}` → heartbeat + module list,
//! - `hello`: `{"node","app","version","cluster"}` → the base asks for its baseline,
//! - `result`: `{"op":"install"|"uninstall","name","version","ok","code"?,"message"?}`,
//! - `health`: `{"metaspace":{"max","committed","used"}}`.
//!
//! Controller → agent, on `<prefix>/<node>/cmd`: `{"op":"install","name","version","url"}`,
//! `{"op":"uninstall","name","version"}`, `{"op":"list"}`, `{"op":"health"}`,
//! `{"op":"baseline","modules":[{"name","version","url"}]}`.
//!
//! Config (JSON, optional): `{"prefix": "simple-agent", "staleMs": 60000}`.

use serde::{Deserialize, Serialize};
use tunnel_sdk::{
    BaseEvent, BaseMetadata, Command, DecodeError, Health, Heartbeat, Lifecycle, Metadata,
    ModuleSpec, ModuleStatus, OperationKind, OperationResult, OutMessage, PluginInfo, Tunnel,
    TunnelEvent,
};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
struct Config {
    prefix: String,
    stale_ms: i64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            prefix: "simple-agent".into(),
            stale_ms: 60_000,
        }
    }
}

impl Config {
    fn parse(s: &str) -> Result<Config, String> {
        if s.trim().is_empty() {
            return Ok(Config::default());
        }
        let c: Config = serde_json::from_str(s).map_err(|e| format!("invalid config: {e}"))?;
        if c.prefix.is_empty() || c.prefix.contains(['+', '#']) {
            return Err(format!("prefix {:?} is not a plain topic prefix", c.prefix));
        }
        Ok(c)
    }

    fn load() -> Config {
        // init refused invalid configs, so a parse failure here cannot happen; default anyway.
        Config::parse(&tunnel_sdk::host::config()).unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct WireModule {
    name: String,
    version: String,
    state: String,
    reason: Option<String>,
    message: Option<String>,
}

#[derive(Deserialize)]
struct WireStatus {
    node: Option<String>,
    ip: String,
    #[serde(default)]
    hostname: String,
    app: String,
    version: String,
    #[serde(default)]
    cluster: String,
    #[serde(default = "up")]
    state: String,
    ts: Option<i64>,
    #[serde(default)]
    modules: Vec<WireModule>,
}

fn up() -> String {
    "up".into()
}

#[derive(Deserialize)]
struct WireHello {
    node: Option<String>,
    app: String,
    version: String,
    #[serde(default)]
    cluster: String,
}

#[derive(Deserialize)]
struct WireResult {
    op: String,
    name: String,
    version: String,
    ok: bool,
    code: Option<String>,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct WireMetaspace {
    max: Option<i64>,
    committed: Option<i64>,
    used: Option<i64>,
}

#[derive(Deserialize)]
struct WireHealth {
    metaspace: WireMetaspace,
}

#[derive(Serialize)]
struct WireSpec<'a> {
    name: &'a str,
    version: &'a str,
    url: &'a str,
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum WireCommand<'a> {
    Install(WireSpec<'a>),
    Uninstall { name: &'a str, version: &'a str },
    List,
    Health,
    Baseline { modules: Vec<WireSpec<'a>> },
}

fn parse<'a, T: Deserialize<'a>>(payload: &'a [u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))
}

fn check_node(topic_node: &str, payload_node: Option<&str>) -> Result<(), DecodeError> {
    match payload_node {
        Some(n) if n != topic_node => Err(DecodeError::Malformed(format!(
            "payload node {n:?} does not match topic node {topic_node:?}"
        ))),
        _ => Ok(()),
    }
}

fn metadata(node: &str, app: String, version: String, cluster: String) -> BaseMetadata {
    BaseMetadata {
        identity: node.to_string(),
        name: app,
        version,
        cluster_name: cluster,
    }
}

fn event(node: &str, event: TunnelEvent) -> BaseEvent {
    BaseEvent {
        base_id: node.to_string(),
        event,
    }
}

fn decode(
    cfg: &Config,
    topic: &str,
    payload: &[u8],
    now_ms: i64,
) -> Result<Vec<BaseEvent>, DecodeError> {
    let rest = topic
        .strip_prefix(cfg.prefix.as_str())
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(DecodeError::UnknownTopic)?;
    let (node, kind) = rest.split_once('/').ok_or(DecodeError::UnknownTopic)?;
    if node.is_empty() {
        return Err(DecodeError::UnknownTopic);
    }
    match kind {
        "status" => {
            let s: WireStatus = parse(payload)?;
            check_node(node, s.node.as_deref())?;
            if let Some(ts) = s.ts {
                let age = now_ms - ts;
                if age > cfg.stale_ms {
                    return Err(DecodeError::Stale(age));
                }
            }
            let lifecycle = if s.state.eq_ignore_ascii_case("down") {
                Lifecycle::Deactivated
            } else {
                Lifecycle::Activated
            };
            let modules = s
                .modules
                .into_iter()
                .map(|m| ModuleStatus {
                    name: m.name,
                    version: m.version,
                    state: m.state.to_ascii_uppercase(),
                    change_time_ms: None,
                    reason: m.reason,
                    message: m.message,
                })
                .collect();
            let hb = Heartbeat {
                metadata: metadata(node, s.app, s.version, s.cluster),
                local_ip: s.ip,
                local_host_name: s.hostname,
                port: None,
                lifecycle,
            };
            Ok(vec![
                event(node, TunnelEvent::Heartbeat(hb)),
                event(node, TunnelEvent::ModuleList(modules)),
            ])
        }
        "hello" => {
            let h: WireHello = parse(payload)?;
            check_node(node, h.node.as_deref())?;
            let md = metadata(node, h.app, h.version, h.cluster);
            Ok(vec![event(node, TunnelEvent::QueryBaseline(md))])
        }
        "result" => {
            let r: WireResult = parse(payload)?;
            let kind = match r.op.as_str() {
                "install" => OperationKind::Install,
                "uninstall" => OperationKind::Uninstall,
                other => return Err(DecodeError::Malformed(format!("unknown op {other:?}"))),
            };
            let op = OperationResult {
                kind,
                name: r.name,
                version: r.version,
                success: r.ok,
                error_code: r.code,
                message: r.message,
            };
            Ok(vec![event(node, TunnelEvent::Operation(op))])
        }
        "health" => {
            let h: WireHealth = parse(payload)?;
            let health = Health {
                max_metaspace: h.metaspace.max,
                committed_metaspace: h.metaspace.committed,
                used_metaspace: h.metaspace.used,
            };
            Ok(vec![event(node, TunnelEvent::Health(health))])
        }
        "cmd" => Err(DecodeError::Ignored("our own command topic".into())),
        _ => Err(DecodeError::UnknownTopic),
    }
}

fn spec(m: &ModuleSpec) -> WireSpec<'_> {
    WireSpec {
        name: &m.name,
        version: &m.version,
        url: &m.url,
    }
}

fn encode(cfg: &Config, base_id: &str, cmd: &Command) -> Result<Vec<OutMessage>, String> {
    if base_id.is_empty() || base_id.contains(['/', '+', '#']) {
        return Err(format!("base id {base_id:?} cannot be a topic level"));
    }
    let wire = match cmd {
        Command::Install(m) => WireCommand::Install(spec(m)),
        Command::Uninstall(k) => WireCommand::Uninstall {
            name: &k.name,
            version: &k.version,
        },
        Command::QueryAllModules => WireCommand::List,
        Command::QueryHealth => WireCommand::Health,
        Command::Baseline(ms) => WireCommand::Baseline {
            modules: ms.iter().map(spec).collect(),
        },
    };
    let payload = serde_json::to_vec(&wire).map_err(|e| e.to_string())?;
    Ok(vec![OutMessage {
        topic: format!("{}/{base_id}/cmd", cfg.prefix),
        payload,
    }])
}

struct SimpleAgent;

impl Metadata for SimpleAgent {
    fn info() -> PluginInfo {
        tunnel_sdk::info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"))
    }

    fn init(config: String) -> Result<(), String> {
        Config::parse(&config).map(|_| ())
    }

    fn self_check() -> Result<(), String> {
        let cfg = Config::default();
        let status = br#"{"node":"n1","ip":"10.0.0.1","app":"base","version":"1.0","ts":1000,
            "modules":[{"name":"m","version":"1","state":"activated"}]}"#;
        let evs =
            decode(&cfg, "simple-agent/n1/status", status, 1500).map_err(|e| format!("{e:?}"))?;
        match evs.as_slice() {
            [
                BaseEvent {
                    event: TunnelEvent::Heartbeat(hb),
                    ..
                },
                BaseEvent {
                    event: TunnelEvent::ModuleList(ms),
                    ..
                },
            ] if hb.local_ip == "10.0.0.1" && ms.len() == 1 && ms[0].state == "ACTIVATED" => {}
            other => return Err(format!("status decoded to {other:?}")),
        }
        if !matches!(
            decode(&cfg, "simple-agent/n1/status", status, 100_000),
            Err(DecodeError::Stale(_))
        ) {
            return Err("old status must be stale".into());
        }
        let out = encode(&cfg, "n1", &Command::QueryAllModules)?;
        if out.len() != 1
            || out[0].topic != "simple-agent/n1/cmd"
            || out[0].payload != br#"{"op":"list"}"#
        {
            return Err(format!("list command encoded to {out:?}"));
        }
        Ok(())
    }
}

impl Tunnel for SimpleAgent {
    fn subscriptions() -> Vec<String> {
        let p = Config::load().prefix;
        ["status", "hello", "result", "health"]
            .iter()
            .map(|k| format!("{p}/+/{k}"))
            .collect()
    }

    fn decode(topic: String, payload: Vec<u8>, now_ms: i64) -> Result<Vec<BaseEvent>, DecodeError> {
        decode(&Config::load(), &topic, &payload, now_ms)
    }

    fn encode(base_id: String, cmd: Command) -> Result<Vec<OutMessage>, String> {
        encode(&Config::load(), &base_id, &cmd)
    }
}

tunnel_sdk::export_plugin!(SimpleAgent);
