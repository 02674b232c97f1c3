//! Every JSON message the double sends, built with `json!` from the Arklet source (never from
//! the controller's types), and the parsing of what it receives.
//!
//! Serialization rules that shape these messages (all fastjson 1.x, which Arklet uses):
//! - nulls are omitted unless `WriteMapNullValue` is passed; only the MQTT `simpleBiz` answer
//!   passes it (`MqttMessageHandler.handleQueryAllBizCommand`), so only there a missing
//!   `latestStateRecord` appears as `null`;
//! - enums are written with `name()` (`ACTIVATED`, `STARTED`, `SUCCESS`) by default; the HTTP
//!   tunnel passes `WriteEnumUsingToString` (`NettyHttpServer.returnResponse`), so there
//!   `BizState` reads `activated` and `StateChangeReason` reads `Started` (response codes have
//!   no `toString` override and stay `SUCCESS`);
//! - a `java.util.Date` is written as epoch millis; primitive fields are always written (so
//!   the MQTT heartbeat carries `"port": 0`, `BaseStatus.port` being an `int`).

use serde_json::{Map, Value, json};

use crate::config::{BaseConfig, HttpEnumStyle, StateRecordsField};
use crate::registry::{Biz, BizState, ChangeReason, InstallReq, OpKind, OpOutcome, StateRecord};

/// Enum spelling for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// `name()`: fastjson's default (all MQTT messages).
    Name,
    /// `toString()`: HTTP since 2024-08.
    ToString,
}

impl From<HttpEnumStyle> for Style {
    fn from(s: HttpEnumStyle) -> Style {
        match s {
            HttpEnumStyle::Name => Style::Name,
            HttpEnumStyle::ToString => Style::ToString,
        }
    }
}

fn state(s: BizState, style: Style) -> &'static str {
    match style {
        Style::Name => s.upper(),
        Style::ToString => s.lower(),
    }
}

fn reason(r: ChangeReason, style: Style) -> &'static str {
    match style {
        Style::Name => r.name(),
        Style::ToString => r.display(),
    }
}

/// Metaspace growth reported for an install (`InstallBizHandler`: used-after minus
/// used-before); any number will do, a client must not interpret it.
const ELAPSED_SPACE: i64 = 8_388_608;

/// `MqttResponse.withData`: the envelope of every base→controller MQTT message (the
/// controller→base messages, `baseline` included, are bare JSON).
pub fn envelope(publish_ts_ms: u64, data: Value) -> Value {
    json!({"publishTimestamp": publish_ts_ms, "data": data})
}

/// `BaseMetadata` (`arklet-core/.../common/model/BaseMetadata.java`).
pub fn base_metadata(cfg: &BaseConfig) -> Value {
    json!({
        "identity": cfg.identity,
        "name": cfg.name,
        "version": cfg.version,
        "clusterName": cfg.cluster_name,
    })
}

/// `BaseStatus` sent by `HeartBeatScheduledTask` (MQTT): `port` is a primitive `int` never
/// set there, so it is `0`. `state` is `BizState.ACTIVATED.getBizState()` = `activated`.
pub fn mqtt_heartbeat(cfg: &BaseConfig, state: &str) -> Value {
    json!({
        "baseMetadata": base_metadata(cfg),
        "localIP": cfg.local_ip,
        "localHostName": cfg.host_name,
        "port": 0,
        "state": state,
    })
}

/// `BaseStatus` POSTed by `HeartBeatScheduledMission` (HTTP), no envelope, with the Arklet
/// HTTP port.
pub fn http_heartbeat(cfg: &BaseConfig, port: u16, state: &str) -> Value {
    json!({
        "baseMetadata": base_metadata(cfg),
        "localIP": cfg.local_ip,
        "localHostName": cfg.host_name,
        "port": port,
        "state": state,
    })
}

/// The `base/queryBaseline` payload (`MqttMessageHandler.onConnectCompleted`).
pub fn query_baseline(cfg: &BaseConfig) -> Value {
    let mut v = base_metadata(cfg);
    if !cfg.query_baseline_with_name
        && let Some(m) = v.as_object_mut()
    {
        m.remove("name");
    }
    v
}

/// One `BizStateRecord`.
pub fn record(r: &StateRecord, style: Style) -> Value {
    json!({
        "changeTime": r.change_time_ms,
        "state": state(r.state, style),
        "reason": reason(r.reason, style),
        "message": r.message,
    })
}

fn main_class(biz: &Biz) -> String {
    let pkg: String = biz
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("com.example.{pkg}.Application")
}

/// Koupleless modules default their web context path to the biz name.
fn web_context_path(biz: &Biz) -> String {
    biz.name.clone()
}

/// `SimpleBizInfo.constructFromBizInfo` list (MQTT `base/simpleBiz`): `state` is
/// `getBizState()` (lowercase) while the record's enums use `name()`.
pub fn simple_biz(bizs: &[Biz]) -> Value {
    Value::Array(
        bizs.iter()
            .map(|b| {
                json!({
                    "name": b.name,
                    "version": b.version,
                    "state": b.state.lower(),
                    "latestStateRecord": b.latest().map(|r| record(r, Style::Name)),
                })
            })
            .collect(),
    )
}

/// The legacy `base/biz` payload (Arklet before 2024-10-17, commit cc163821): the whole
/// `Output<List<BizInfo>>` with default enum names. The class loader the BizInfo carried is
/// left out: what fastjson made of it is not knowable from the source.
pub fn legacy_biz(bizs: &[Biz]) -> Value {
    let data: Vec<Value> = bizs
        .iter()
        .map(|b| {
            json!({
                "bizName": b.name,
                "bizVersion": b.version,
                "bizState": b.state.upper(),
                "mainClass": main_class(b),
                "webContextPath": web_context_path(b),
                "bizStateRecords": b.records.iter().map(|r| record(r, Style::Name)).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"code": "SUCCESS", "data": data})
}

/// One Arklet `BizInfo` as HTTP `/queryAllBiz` sends it, including the `classLoader` object
/// (`QueryAllBizHandler` sets it; its exact serialization is approximate) that a client must
/// ignore.
pub fn http_biz_info(b: &Biz, field: StateRecordsField, style: Style) -> Value {
    let mut m = Map::new();
    m.insert("bizName".into(), json!(b.name));
    m.insert("bizVersion".into(), json!(b.version));
    m.insert("bizState".into(), json!(state(b.state, style)));
    m.insert("mainClass".into(), json!(main_class(b)));
    m.insert("webContextPath".into(), json!(web_context_path(b)));
    m.insert(
        "classLoader".into(),
        json!({
            "bizIdentity": format!("{}:{}", b.name, b.version),
            "uRLs": [format!("file:/tmp/sofa-ark/{}-{}/", b.name, b.version)],
            "definedPackages": [],
            "registeredAsParallelCapable": true,
        }),
    );
    m.insert(
        field.key().into(),
        Value::Array(b.records.iter().map(|r| record(r, style)).collect()),
    );
    Value::Object(m)
}

/// A SOFAArk `BizModel` as fastjson writes it inside `ClientResponse.bizInfos`: its getters
/// (`sofa-ark/.../container/model/BizModel.java`) except the class loader, whose
/// serialization is not knowable from the source. Clients treat the object as opaque.
pub fn ark_biz_model(b: &Biz, style: Style) -> Value {
    let file = format!("file:/home/admin/sofa-ark/{}-{}", b.name, b.version);
    json!({
        "attributes": {},
        "bizName": b.name,
        "bizState": state(b.state, style),
        "bizStateRecords": b.records.iter().map(|r| record(r, style)).collect::<Vec<_>>(),
        "bizUrl": file,
        "bizVersion": b.version,
        "classPath": [file],
        "declaredMode": false,
        "denyImportClasses": [],
        "denyImportPackageNodes": [],
        "denyImportPackageStems": [],
        "denyImportPackages": [],
        "denyImportResources": [],
        "denyPrefixImportResourceStems": [],
        "denySuffixImportResourceStems": [],
        "identity": format!("{}:{}", b.name, b.version),
        "injectExportPackages": [],
        "injectPluginDependencies": [],
        "mainClass": main_class(b),
        "priority": 100,
        "webContextPath": web_context_path(b),
    })
}

/// The `Output` of an install/uninstall (`Output.java`: `code`, `message`, `data`; nulls
/// omitted). A thrown exception becomes what `MqttMessageHandler.handleBizOperation`'s catch
/// builds: `Output.ofFailed(ClientResponse{FAILED, stack}, t.getMessage())`.
pub fn op_output(kind: OpKind, outcome: &OpOutcome, style: Style) -> Value {
    let install = kind == OpKind::Install;
    match outcome {
        OpOutcome::Success { message, biz } => {
            let mut data = json!({"code": "SUCCESS", "message": message});
            if install {
                let infos: Vec<Value> = biz.iter().map(|b| ark_biz_model(b, style)).collect();
                data["bizInfos"] = Value::Array(infos);
                data["elapsedSpace"] = json!(ELAPSED_SPACE);
            }
            json!({"code": "SUCCESS", "data": data})
        }
        OpOutcome::NotSuccess {
            data_code,
            data_message,
        } => {
            let mut data = json!({"code": data_code, "message": data_message});
            if install {
                data["elapsedSpace"] = json!(0);
            }
            let message = if install {
                "install biz not success!"
            } else {
                "uninstall biz not success!"
            };
            json!({"code": "FAILED", "message": message, "data": data})
        }
        OpOutcome::Conflict { message } => json!({"code": "FAILED", "message": message}),
        OpOutcome::Thrown(t) => {
            let mut out = json!({
                "code": "FAILED",
                "data": {"code": "FAILED", "message": t.stack},
            });
            if let Some(m) = &t.message {
                out["message"] = json!(m);
            }
            out
        }
    }
}

/// The `base/bizOperation` payload: `{command, bizName, bizVersion, response}` where the
/// names are echoed from the request map (absent in the request = absent here).
pub fn biz_operation(
    kind: OpKind,
    biz_name: Option<&Value>,
    biz_version: Option<&Value>,
    response: Value,
) -> Value {
    let mut m = Map::new();
    m.insert("command".into(), json!(kind.id()));
    if let Some(n) = biz_name.filter(|v| !v.is_null()) {
        m.insert("bizName".into(), n.clone());
    }
    if let Some(v) = biz_version.filter(|v| !v.is_null()) {
        m.insert("bizVersion".into(), v.clone());
    }
    m.insert("response".into(), response);
    Value::Object(m)
}

/// One entry of `bizUrlToResponse` (a SOFAArk `ClientResponse`). A thrown install becomes
/// `UnifiedOperationServiceImpl.safeBatchInstall`'s `FAILED` + `internal exception: <msg>`.
fn batch_entry(outcome: &OpOutcome) -> Value {
    match outcome {
        OpOutcome::Success { message, biz } => json!({
            "code": "SUCCESS",
            "message": message,
            "bizInfos": biz.iter().map(|b| ark_biz_model(b, Style::Name)).collect::<Vec<_>>(),
        }),
        OpOutcome::NotSuccess {
            data_code,
            data_message,
        } => json!({"code": data_code, "message": data_message}),
        OpOutcome::Conflict { message } => json!({"code": "FAILED", "message": message}),
        OpOutcome::Thrown(t) => json!({
            "code": "FAILED",
            "message": format!("internal exception: {}", t.inner_message.as_deref().unwrap_or("null")),
        }),
    }
}

/// The `Output` of a batch install: `BatchInstallBizHandler.handle` over
/// `UnifiedOperationServiceImpl.batchInstall`.
pub fn batch_output(results: &[(String, OpOutcome)]) -> Value {
    let failed = results
        .iter()
        .any(|(_, o)| !matches!(o, OpOutcome::Success { .. }));
    let mut by_url = Map::new();
    for (url, o) in results {
        by_url.insert(url.clone(), batch_entry(o));
    }
    let data = json!({
        "code": if failed { "FAILED" } else { "SUCCESS" },
        "message": if failed { "batch install failed" } else { "batch install success" },
        "bizUrlToResponse": by_url,
        "elapsedSpace": ELAPSED_SPACE,
    });
    if failed {
        json!({"code": "FAILED", "message": "install biz not success!", "data": data})
    } else {
        json!({"code": "SUCCESS", "data": data})
    }
}

/// The `base/batchInstallBizResponse` payload (`PlaybackBaselineHandler`).
pub fn batch_install_response(output: Value) -> Value {
    json!({"command": "batchInstallBiz", "response": output})
}

/// The `Health` answer (`HealthHandler` with no type: master biz, every indicator, and the
/// biz and plugin lists; `JvmIndicator`, `CpuIndicator`, `BizHealthMeta`).
pub fn health_output(cfg: &BaseConfig, bizs: &[Biz], style: Style) -> Value {
    let master = json!({
        "bizName": cfg.name,
        "bizVersion": cfg.version,
        "bizState": state(BizState::Activated, style),
        "webContextPath": "/",
    });
    let mut list = vec![master.clone()];
    list.extend(bizs.iter().map(|b| {
        json!({
            "bizName": b.name,
            "bizVersion": b.version,
            "bizState": state(b.state, style),
            "webContextPath": web_context_path(b),
        })
    }));
    json!({
        "code": "SUCCESS",
        "data": {"healthData": {
            "masterBizInfo": master,
            "jvm": {
                "java version": "17.0.10",
                "java home": "/usr/lib/jvm/java-17/jre",
                "total memory(M)": 512.0,
                "max memory(M)": 2048.0,
                "free memory(M)": 201.5,
                "run time(s)": 3600.25,
                "init heap memory(M)": 512.0,
                "used heap memory(M)": 310.5,
                "committed heap memory(M)": 512.0,
                "max heap memory(M)": 2048.0,
                "init non heap memory(M)": 7.3125,
                "used non heap memory(M)": 180.25,
                "committed non heap memory(M)": 190.0,
                "max non heap memory(M)": -9.5367431640625e-7,
                "loaded class count": 21000,
                "unload class count": 120,
                "total class count": 21120,
                "java used metaspace": cfg.used_metaspace,
                "java committed metaspace": cfg.committed_metaspace,
                "java max metaspace": cfg.max_metaspace,
            },
            "cpu": {
                "count": 4,
                "type": "Intel(R) Xeon(R) Platinum 8269CY CPU @ 2.50GHz",
                "total used (%)": 1234.0,
                "user used (%)": 12.5,
                "system used (%)": 3.25,
                "free (%)": 84.25,
            },
            "bizListInfo": list,
            "pluginListInfo": [],
        }},
    })
}

/// `Response.fromCommandOutput`: the output plus `baseIdentity` (None = an Arklet from
/// before that field).
pub fn http_response(output: Value, base_identity: Option<&str>) -> Value {
    let mut v = output;
    if let (Some(m), Some(id)) = (v.as_object_mut(), base_identity) {
        m.insert("baseIdentity".into(), json!(id));
    }
    v
}

/// `Response.internalError("Internal Error: " + e.getMessage(), stack)`: what the HTTP tunnel
/// answers when a command throws (no data, no baseIdentity).
pub fn http_internal_error(message: Option<&str>, stack: &str) -> Value {
    json!({
        "code": "CMD_PROCESS_INTERNAL_ERROR",
        "message": format!("Internal Error: {}", message.unwrap_or("null")),
        "errorStackTrace": stack,
    })
}

/// `Response.notFound()`.
pub fn http_not_found() -> Value {
    json!({"code": "CMD_NOT_FOUND", "message": "please follow the doc"})
}

/// A field of a fastjson-parsed request as the bean setter would get it: strings as they are,
/// numbers and booleans as their text, anything else absent.
pub fn text_field(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// An `installBiz` request body.
pub fn parse_install(v: &Value) -> InstallReq {
    InstallReq {
        name: text_field(v, "bizName"),
        version: text_field(v, "bizVersion"),
        url: text_field(v, "bizUrl"),
        strategy: text_field(v, "installStrategy"),
    }
}
