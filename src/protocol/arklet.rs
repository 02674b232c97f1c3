//! Serde types for the Koupleless Arklet wire protocol (see `shared/design/protocol.md`).
//!
//! These are edge types: they are parsed once, here, and converted into the canonical
//! [`crate::model`] types. Field names are exact; unknown fields are ignored because real
//! bases send more than we read.

use serde::{Deserialize, Deserializer, Serialize};

use crate::model::{
    BaseHealth, BaseHeartbeat, BaseLifecycle, BaseMetadata, BizState, ModuleSpec, ModuleStatus,
    OperationKind, OperationResult, Outcome,
};

/// Envelope of every base → controller MQTT message.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// Epoch milliseconds at which the base published the message.
    #[serde(rename = "publishTimestamp")]
    pub publish_timestamp: i64,
    /// The payload.
    pub data: T,
}

/// `baseMetadata` of a heartbeat, and the payload of `queryBaseline`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBaseMetadata {
    #[serde(default)]
    pub identity: String,
    #[serde(default)]
    pub version: String,
    #[serde(default, rename = "clusterName")]
    pub cluster_name: String,
    #[serde(default)]
    pub name: String,
}

/// Heartbeat payload (`base/heart` over MQTT, `POST /heartbeat` over HTTP).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireHeartbeat {
    #[serde(rename = "baseMetadata")]
    pub base_metadata: WireBaseMetadata,
    #[serde(default, rename = "localIP")]
    pub local_ip: String,
    #[serde(default, rename = "localHostName")]
    pub local_host_name: String,
    /// Arklet HTTP port; only the HTTP tunnel needs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub state: String,
}

/// `base/health` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireHealth {
    #[serde(default)]
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub data: Option<WireHealthData>,
}

/// `data` of a health payload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireHealthData {
    #[serde(default, rename = "healthData")]
    pub health_data: WireHealthInner,
}

/// `healthData` of a health payload.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireHealthInner {
    #[serde(default)]
    pub jvm: WireJvm,
    #[serde(default)]
    pub cpu: serde_json::Value,
    #[serde(default, rename = "masterBizInfo")]
    pub master_biz_info: serde_json::Value,
}

/// JVM figures of a health payload; Arklet names them with spaces.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireJvm {
    #[serde(
        default,
        rename = "java max metaspace",
        deserialize_with = "lenient_i64"
    )]
    pub max_metaspace: Option<i64>,
    #[serde(
        default,
        rename = "java committed metaspace",
        deserialize_with = "lenient_i64"
    )]
    pub committed_metaspace: Option<i64>,
    #[serde(
        default,
        rename = "java used metaspace",
        deserialize_with = "lenient_i64"
    )]
    pub used_metaspace: Option<i64>,
}

/// A state-change record (`latestStateRecord`, `bizStateRecords[]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireStateRecord {
    #[serde(default, rename = "changeTime", deserialize_with = "lenient_time")]
    pub change_time: Option<i64>,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// One entry of `base/simpleBiz` (the current Arklet's answer to `queryAllBiz`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireSimpleBiz {
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub state: String,
    #[serde(default, rename = "latestStateRecord")]
    pub latest_state_record: Option<WireStateRecord>,
}

/// A `BizInfo`: one entry of the legacy MQTT `base/biz` answer and of the HTTP `queryAllBiz`
/// answer. Arklet builds have called the record list `bizStateRecords` and (briefly)
/// `bizStateChangeLogs`; states come in any case; other fields (a class loader…) are ignored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireBizInfo {
    #[serde(rename = "bizName")]
    pub biz_name: String,
    #[serde(default, rename = "bizVersion")]
    pub biz_version: String,
    #[serde(default, rename = "bizState")]
    pub biz_state: String,
    #[serde(default, rename = "mainClass")]
    pub main_class: Option<String>,
    #[serde(default, rename = "webContextPath")]
    pub web_context_path: Option<String>,
    #[serde(default, rename = "bizStateRecords", alias = "bizStateChangeLogs")]
    pub biz_state_records: Vec<WireStateRecord>,
}

/// The legacy `base/biz` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireBizInfoResponse {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub data: Vec<WireBizInfo>,
}

/// Generic Arklet reply: `{code, message, data, errorStackTrace, baseIdentity}`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireResponse<T> {
    #[serde(default)]
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    #[serde(
        default,
        rename = "errorStackTrace",
        skip_serializing_if = "Option::is_none"
    )]
    pub error_stack_trace: Option<String>,
    #[serde(
        default,
        rename = "baseIdentity",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_identity: Option<String>,
}

/// `data` of an install/uninstall reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireOperationData {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "bizInfos")]
    pub biz_infos: Option<serde_json::Value>,
    #[serde(default, rename = "elapsedSpace")]
    pub elapsed_space: Option<i64>,
}

/// `base/bizOperation` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireBizOperation {
    pub command: String,
    #[serde(rename = "bizName")]
    pub biz_name: String,
    #[serde(default, rename = "bizVersion")]
    pub biz_version: String,
    pub response: WireResponse<WireOperationData>,
}

/// `base/batchInstallBizResponse` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireBatchInstallResponse {
    pub command: String,
    pub response: WireResponse<WireBatchInstallData>,
}

/// `data` of a batch-install reply.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireBatchInstallData {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "elapsedSpace")]
    pub elapsed_space: Option<i64>,
    #[serde(default, rename = "bizUrlToResponse")]
    pub biz_url_to_response: std::collections::BTreeMap<String, WireOperationData>,
}

/// `installBiz` command body (MQTT and HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireInstallBiz {
    #[serde(rename = "bizName")]
    pub biz_name: String,
    #[serde(rename = "bizVersion")]
    pub biz_version: String,
    #[serde(rename = "bizUrl")]
    pub biz_url: String,
    /// `uninstallThenInstall` to replace an installed module of the same name and version.
    #[serde(
        default,
        rename = "installStrategy",
        skip_serializing_if = "Option::is_none"
    )]
    pub install_strategy: Option<String>,
}

/// `installStrategy` that replaces an installed module of the same identity.
pub const UNINSTALL_THEN_INSTALL: &str = "uninstallThenInstall";

/// `uninstallBiz` command body (MQTT and HTTP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireUninstallBiz {
    #[serde(rename = "bizName")]
    pub biz_name: String,
    #[serde(rename = "bizVersion")]
    pub biz_version: String,
}

/// Accepts a number, a numeric string, or null.
fn lenient_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok().map(|f| f as i64),
        _ => None,
    })
}

/// Accepts epoch millis (number or string), RFC 3339, or Arklet's `yyyy-MM-dd HH:mm:ss` (UTC).
fn lenient_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => parse_time_str(&s),
        _ => None,
    })
}

fn parse_time_str(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp_millis());
    }
    for fmt in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d %H:%M:%S"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, fmt) {
            return Some(t.and_utc().timestamp_millis());
        }
    }
    None
}

impl From<&WireBaseMetadata> for BaseMetadata {
    fn from(w: &WireBaseMetadata) -> Self {
        BaseMetadata {
            identity: w.identity.clone(),
            name: w.name.clone(),
            version: w.version.clone(),
            cluster_name: w.cluster_name.clone(),
        }
    }
}

impl From<&BaseMetadata> for WireBaseMetadata {
    fn from(m: &BaseMetadata) -> Self {
        WireBaseMetadata {
            identity: m.identity.clone(),
            version: m.version.clone(),
            cluster_name: m.cluster_name.clone(),
            name: m.name.clone(),
        }
    }
}

impl WireHeartbeat {
    /// Canonical form of this heartbeat.
    pub fn to_model(&self) -> BaseHeartbeat {
        BaseHeartbeat {
            metadata: (&self.base_metadata).into(),
            local_ip: self.local_ip.clone(),
            local_host_name: self.local_host_name.clone(),
            port: self.port,
            lifecycle: BaseLifecycle::parse(&self.state),
        }
    }

    /// Wire form of a canonical heartbeat.
    pub fn from_model(hb: &BaseHeartbeat) -> Self {
        WireHeartbeat {
            base_metadata: (&hb.metadata).into(),
            local_ip: hb.local_ip.clone(),
            local_host_name: hb.local_host_name.clone(),
            port: hb.port,
            state: match hb.lifecycle {
                BaseLifecycle::Activated => "ACTIVATED".into(),
                BaseLifecycle::Deactivated => "DEACTIVATED".into(),
            },
        }
    }
}

impl WireHealth {
    /// Canonical health, or `None` when the base did not report success.
    pub fn to_model(&self) -> Option<BaseHealth> {
        if !self.code.eq_ignore_ascii_case("SUCCESS") {
            return None;
        }
        let jvm = self
            .data
            .as_ref()
            .map(|d| d.health_data.jvm.clone())
            .unwrap_or_default();
        Some(BaseHealth {
            max_metaspace: jvm.max_metaspace,
            committed_metaspace: jvm.committed_metaspace,
            used_metaspace: jvm.used_metaspace,
        })
    }
}

impl WireSimpleBiz {
    /// Canonical module status.
    pub fn to_model(&self) -> ModuleStatus {
        let rec = self.latest_state_record.clone().unwrap_or_default();
        ModuleStatus {
            name: self.name.clone(),
            version: self.version.clone(),
            state: BizState::parse(&self.state),
            change_time_ms: rec.change_time,
            reason: rec.reason.filter(|s| !s.is_empty()),
            message: rec.message.as_deref().and_then(real_reason),
        }
    }
}

impl WireBizInfo {
    /// Canonical module status; the latest record is the one with the greatest change time.
    pub fn to_model(&self) -> ModuleStatus {
        let latest = self
            .biz_state_records
            .iter()
            .max_by_key(|r| r.change_time.unwrap_or(i64::MIN))
            .cloned()
            .unwrap_or_default();
        ModuleStatus {
            name: self.biz_name.clone(),
            version: self.biz_version.clone(),
            state: BizState::parse(&self.biz_state),
            change_time_ms: latest.change_time,
            reason: latest.reason.filter(|s| !s.is_empty()),
            message: latest.message.as_deref().and_then(real_reason),
        }
    }
}

impl WireBizOperation {
    /// Canonical operation result, or `None` for a command we do not know.
    pub fn to_model(&self) -> Option<OperationResult> {
        let kind = OperationKind::parse(&self.command)?;
        Some(operation_result(
            kind,
            &self.biz_name,
            &self.biz_version,
            &self.response,
        ))
    }
}

/// Canonical result of an Arklet install/uninstall reply (MQTT `bizOperation` or HTTP reply).
pub fn operation_result(
    kind: OperationKind,
    name: &str,
    version: &str,
    resp: &WireResponse<WireOperationData>,
) -> OperationResult {
    let data = resp.data.clone().unwrap_or_default();
    let outcome = classify(
        kind,
        resp.code.eq_ignore_ascii_case("SUCCESS"),
        data.code.as_deref().or(Some(resp.code.as_str())),
        &[
            data.message.as_deref(),
            resp.error_stack_trace.as_deref(),
            resp.message.as_deref(),
        ],
    );
    OperationResult {
        kind,
        name: name.to_string(),
        version: version.to_string(),
        outcome,
    }
}

/// What an Arklet answer means. `texts` are the answer's messages, most specific first
/// (`data.message`, `errorStackTrace`, `message`).
pub fn classify(
    kind: OperationKind,
    success: bool,
    code: Option<&str>,
    texts: &[Option<&str>],
) -> Outcome {
    if success {
        return Outcome::Succeeded;
    }
    let code = code.map(str::trim).filter(|c| !c.is_empty());
    match (kind, code) {
        (OperationKind::Install, Some(c)) if c.eq_ignore_ascii_case("REPEAT_BIZ") => {
            return Outcome::AlreadyInstalled;
        }
        (OperationKind::Uninstall, Some(c)) if c.eq_ignore_ascii_case("NOT_FOUND_BIZ") => {
            return Outcome::NotInstalled;
        }
        _ => {}
    }
    // "FAILED:<name>:<version> installBiz conflict, exist unfinished command(installBiz) for
    // this biz": the base is still working on an earlier command for this module.
    if texts
        .iter()
        .flatten()
        .any(|t| t.contains("conflict") && t.contains("unfinished command"))
    {
        return Outcome::Busy;
    }
    let message = texts
        .iter()
        .flatten()
        .find_map(|t| real_reason(t))
        .unwrap_or_else(|| format!("{} failed with no message from the base", kind.command()));
    Outcome::Failed {
        code: code.map(str::to_string),
        message,
    }
}

/// The reason a user needs from an Arklet message: the root cause of a Java stack trace (its
/// last `Caused by:`), else its first line; `None` for empty texts and texts that name no
/// reason ("install biz not success!", a bare `InvocationTargetException`).
pub fn real_reason(text: &str) -> Option<String> {
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    let cause = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Caused by:"))
        .map(str::trim)
        .rfind(|c| !c.is_empty());
    let line = cause.unwrap_or_else(|| text.lines().next().unwrap_or(text).trim());
    (!is_generic(line)).then(|| line.to_string())
}

fn is_generic(line: &str) -> bool {
    const GENERIC: [&str; 3] = [
        "install biz not success!",
        "uninstall biz not success!",
        "java.lang.reflect.InvocationTargetException",
    ];
    GENERIC.iter().any(|g| line.eq_ignore_ascii_case(g))
        || line.ends_with(": java.lang.reflect.InvocationTargetException")
}

impl From<&ModuleSpec> for WireInstallBiz {
    fn from(m: &ModuleSpec) -> Self {
        WireInstallBiz {
            biz_name: m.name.clone(),
            biz_version: m.version.clone(),
            biz_url: m.url.clone(),
            install_strategy: None,
        }
    }
}

/// Current epoch milliseconds.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Wraps a payload in the base → controller envelope, stamped now.
pub fn envelope<T: Serialize>(data: T) -> Envelope<T> {
    Envelope {
        publish_timestamp: now_ms(),
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_parses_reference_payload() {
        let raw = r#"{"publishTimestamp":1700000000000,"data":{"baseMetadata":{"identity":"10.0.0.5","version":"1.0.0","clusterName":"c1","name":"base"},"localIP":"10.0.0.5","localHostName":"host-a","state":"ACTIVATED","extra":1}}"#;
        let env: Envelope<WireHeartbeat> = serde_json::from_str(raw).expect("parse");
        assert_eq!(env.publish_timestamp, 1_700_000_000_000);
        let hb = env.data.to_model();
        assert_eq!(hb.metadata.identity, "10.0.0.5");
        assert_eq!(hb.metadata.cluster_name, "c1");
        assert_eq!(hb.local_host_name, "host-a");
        assert_eq!(hb.lifecycle, BaseLifecycle::Activated);
        assert_eq!(hb.port, None);
    }

    #[test]
    fn heartbeat_state_is_case_insensitive() {
        assert_eq!(
            BaseLifecycle::parse("deactivated"),
            BaseLifecycle::Deactivated
        );
        assert_eq!(
            BaseLifecycle::parse("DEACTIVATED"),
            BaseLifecycle::Deactivated
        );
        assert_eq!(BaseLifecycle::parse("activated"), BaseLifecycle::Activated);
    }

    #[test]
    fn health_reads_metaspace_with_spaces_in_names() {
        let raw = r#"{"code":"SUCCESS","data":{"healthData":{"jvm":{"java max metaspace":-1,"java committed metaspace":"2048","java used metaspace":1024.0},"cpu":{},"masterBizInfo":{"bizName":"base"}}}}"#;
        let h: WireHealth = serde_json::from_str(raw).expect("parse");
        let m = h.to_model().expect("success");
        assert_eq!(m.max_metaspace, Some(-1));
        assert_eq!(m.committed_metaspace, Some(2048));
        assert_eq!(m.used_metaspace, Some(1024));
        let failed: WireHealth = serde_json::from_str(r#"{"code":"FAILED"}"#).expect("parse");
        assert!(failed.to_model().is_none());
    }

    #[test]
    fn simple_biz_parses_lowercase_states_and_records() {
        let raw = r#"[{"name":"biz1","version":"0.0.1","state":"activated","latestStateRecord":{"changeTime":1700000000123,"state":"activated","reason":"","message":"ok"}},
                      {"name":"biz2","version":"0.0.2","state":"broken","latestStateRecord":{"changeTime":"2024-05-01 10:00:00","state":"broken","reason":"InstallBizFailed","message":"boom"}}]"#;
        let list: Vec<WireSimpleBiz> = serde_json::from_str(raw).expect("parse");
        let a = list[0].to_model();
        assert_eq!(a.state, BizState::Activated);
        assert_eq!(a.change_time_ms, Some(1_700_000_000_123));
        assert_eq!(a.reason, None);
        let b = list[1].to_model();
        assert_eq!(b.state, BizState::Broken);
        assert_eq!(b.reason.as_deref(), Some("InstallBizFailed"));
        assert_eq!(b.change_time_ms, Some(1_714_557_600_000));
    }

    #[test]
    fn legacy_biz_takes_latest_record() {
        let raw = r#"{"code":"SUCCESS","data":[{"bizName":"b","bizVersion":"1","bizState":"ACTIVATED","bizStateRecords":[{"changeTime":5,"state":"RESOLVED"},{"changeTime":9,"state":"ACTIVATED","message":"done"}]}]}"#;
        let r: WireBizInfoResponse = serde_json::from_str(raw).expect("parse");
        let m = r.data[0].to_model();
        assert_eq!(m.state, BizState::Activated);
        assert_eq!(m.change_time_ms, Some(9));
        assert_eq!(m.message.as_deref(), Some("done"));
    }

    #[test]
    fn biz_operation_failure_carries_code_and_message() {
        let raw = r#"{"command":"installBiz","bizName":"biz1","bizVersion":"0.0.1","response":{"code":"FAILED","message":"install failed","errorStackTrace":"x","data":{"code":"InstallBizFailed","message":"jar not found"}}}"#;
        let op: WireBizOperation = serde_json::from_str(raw).expect("parse");
        let r = op.to_model().expect("known");
        assert_eq!(r.kind, OperationKind::Install);
        assert_eq!(
            r.outcome,
            Outcome::Failed {
                code: Some("InstallBizFailed".into()),
                message: "jar not found".into()
            }
        );
        let ok = r#"{"command":"uninstallBiz","bizName":"biz1","bizVersion":"0.0.1","response":{"code":"SUCCESS","data":{}}}"#;
        let op: WireBizOperation = serde_json::from_str(ok).expect("parse");
        let r = op.to_model().expect("known");
        assert!(r.outcome == Outcome::Succeeded && r.kind == OperationKind::Uninstall);
    }

    #[test]
    fn commands_serialise_exactly() {
        let spec = ModuleSpec {
            name: "biz1".into(),
            version: "0.0.1".into(),
            url: "https://x/biz1-0.0.1-ark-biz.jar".into(),
        };
        let body = serde_json::to_string(&WireInstallBiz::from(&spec)).expect("ser");
        assert_eq!(
            body,
            r#"{"bizName":"biz1","bizVersion":"0.0.1","bizUrl":"https://x/biz1-0.0.1-ark-biz.jar"}"#
        );
        let un = WireUninstallBiz {
            biz_name: "biz1".into(),
            biz_version: "0.0.1".into(),
        };
        assert_eq!(
            serde_json::to_string(&un).expect("ser"),
            r#"{"bizName":"biz1","bizVersion":"0.0.1"}"#
        );
    }
}
