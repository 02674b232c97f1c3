//! Translation between the simulator and the Arklet wire types of
//! [`module_controller::protocol::arklet`]: parsing commands, building replies.

use std::collections::BTreeMap;

use thiserror::Error;

use module_controller::model::{BaseCommand, ModuleKey, ModuleSpec, ModuleStatus};
use module_controller::protocol::arklet::{
    WireBaseMetadata, WireBatchInstallData, WireBatchInstallResponse, WireBizOperation, WireHealth,
    WireHealthData, WireHealthInner, WireHeartbeat, WireInstallBiz, WireJvm, WireOperationData,
    WireResponse, WireSimpleBiz, WireStateRecord, WireUninstallBiz,
};
use module_controller::protocol::mqtt_topics::down;

use super::SimBaseConfig;
use super::state::InstallOutcome;

/// A command body the simulator cannot act on.
#[derive(Debug, Error)]
pub enum CommandError {
    /// The body is not the JSON the command needs.
    #[error("invalid {command} body: {source}")]
    Json {
        /// Command name.
        command: String,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
    /// A required field is empty (real bases need both name and version).
    #[error("invalid {command} body: {field} is empty")]
    EmptyField {
        /// Command name.
        command: String,
        /// Field name.
        field: &'static str,
    },
    /// Not a command a base knows.
    #[error("unknown command {0}")]
    Unknown(String),
}

/// Parses a controller → base command by its topic suffix / HTTP path (`installBiz`, ...).
pub fn parse_command(command: &str, body: &[u8]) -> Result<BaseCommand, CommandError> {
    let json_err = |source| CommandError::Json {
        command: command.to_string(),
        source,
    };
    match command {
        down::INSTALL_BIZ => {
            let w: WireInstallBiz = serde_json::from_slice(body).map_err(json_err)?;
            Ok(BaseCommand::Install(install_spec(command, w)?))
        }
        down::UNINSTALL_BIZ => {
            let w: WireUninstallBiz = serde_json::from_slice(body).map_err(json_err)?;
            require(command, "bizName", &w.biz_name)?;
            require(command, "bizVersion", &w.biz_version)?;
            Ok(BaseCommand::Uninstall(ModuleKey::new(
                &w.biz_name,
                &w.biz_version,
            )))
        }
        // Arklet ignores the body of these two (the controller sends `{}`).
        down::QUERY_ALL_BIZ => Ok(BaseCommand::QueryAllModules),
        down::HEALTH => Ok(BaseCommand::QueryHealth),
        down::BASELINE => Ok(BaseCommand::Baseline(parse_baseline(body)?)),
        other => Err(CommandError::Unknown(other.to_string())),
    }
}

/// Parses the bare baseline array a controller returns from HTTP `queryBaseline`.
pub fn parse_baseline(body: &[u8]) -> Result<Vec<ModuleSpec>, CommandError> {
    let list: Vec<WireInstallBiz> =
        serde_json::from_slice(body).map_err(|source| CommandError::Json {
            command: down::BASELINE.to_string(),
            source,
        })?;
    list.into_iter()
        .map(|w| install_spec(down::BASELINE, w))
        .collect()
}

fn install_spec(command: &str, w: WireInstallBiz) -> Result<ModuleSpec, CommandError> {
    require(command, "bizName", &w.biz_name)?;
    require(command, "bizVersion", &w.biz_version)?;
    Ok(ModuleSpec {
        name: w.biz_name,
        version: w.biz_version,
        url: w.biz_url,
    })
}

fn require(command: &str, field: &'static str, value: &str) -> Result<(), CommandError> {
    if value.trim().is_empty() {
        return Err(CommandError::EmptyField {
            command: command.to_string(),
            field,
        });
    }
    Ok(())
}

/// A base's answer to one command, transport-neutral.
#[derive(Debug, Clone)]
pub enum Reply {
    /// installBiz / uninstallBiz.
    Operation(WireBizOperation),
    /// queryAllBiz.
    Modules(Vec<WireSimpleBiz>),
    /// health.
    Health(WireHealth),
    /// baseline (batch install).
    Batch(WireBatchInstallResponse),
}

/// `baseMetadata` / queryBaseline payload of a base.
pub fn metadata(cfg: &SimBaseConfig) -> WireBaseMetadata {
    WireBaseMetadata {
        identity: cfg.identity.clone(),
        version: cfg.version.clone(),
        cluster_name: cfg.cluster_name.clone(),
        name: cfg.name.clone(),
    }
}

/// Heartbeat payload; `state` is `ACTIVATED` or `DEACTIVATED`.
pub fn heartbeat(cfg: &SimBaseConfig, port: Option<u16>, state: &str) -> WireHeartbeat {
    WireHeartbeat {
        base_metadata: metadata(cfg),
        local_ip: cfg.local_ip.clone(),
        local_host_name: cfg.host_name.clone(),
        port,
        state: state.to_string(),
    }
}

/// Health payload with the configured metaspace figures.
pub fn health(cfg: &SimBaseConfig) -> WireHealth {
    WireHealth {
        code: "SUCCESS".into(),
        message: Some("get health success".into()),
        data: Some(health_data(cfg)),
    }
}

fn health_data(cfg: &SimBaseConfig) -> WireHealthData {
    WireHealthData {
        health_data: WireHealthInner {
            jvm: WireJvm {
                max_metaspace: Some(cfg.max_metaspace),
                committed_metaspace: Some(cfg.committed_metaspace),
                used_metaspace: Some(cfg.used_metaspace),
            },
            cpu: serde_json::json!({}),
            master_biz_info: serde_json::json!({
                "bizName": cfg.name,
                "bizState": "ACTIVATED",
                "bizVersion": cfg.version,
                "webContextPath": "/",
            }),
        },
    }
}

/// One `simpleBiz` entry; states are lowercase as the current Arklet sends them.
pub fn simple_biz(m: &ModuleStatus) -> WireSimpleBiz {
    let state = m.state.as_upper().to_ascii_lowercase();
    WireSimpleBiz {
        name: m.name.clone(),
        version: m.version.clone(),
        state: state.clone(),
        latest_state_record: Some(WireStateRecord {
            change_time: m.change_time_ms,
            state,
            reason: Some(m.reason.clone().unwrap_or_default()),
            message: Some(m.message.clone().unwrap_or_default()),
        }),
    }
}

/// The `queryAllBiz` answer for a set of modules.
pub fn module_list(modules: &[ModuleStatus]) -> Vec<WireSimpleBiz> {
    modules.iter().map(simple_biz).collect()
}

/// Arklet reply to one install.
pub fn install_response(
    outcome: &InstallOutcome,
    elapsed_ms: i64,
) -> WireResponse<WireOperationData> {
    match outcome {
        InstallOutcome::Activated { .. } | InstallOutcome::AlreadyActive => WireResponse {
            code: "SUCCESS".into(),
            message: Some("install biz success".into()),
            data: Some(WireOperationData {
                code: Some("SUCCESS".into()),
                message: Some("install biz success".into()),
                biz_infos: Some(serde_json::json!([])),
                elapsed_space: Some(elapsed_ms),
            }),
            error_stack_trace: None,
            base_identity: None,
        },
        InstallOutcome::Failed { reason, message } => WireResponse {
            code: "FAILED".into(),
            message: Some(message.clone()),
            data: Some(WireOperationData {
                code: Some(reason.clone()),
                message: Some(message.clone()),
                biz_infos: Some(serde_json::json!([])),
                elapsed_space: Some(elapsed_ms),
            }),
            error_stack_trace: Some(format!("{reason}: {message}")),
            base_identity: None,
        },
    }
}

/// Arklet reply to one uninstall (always success: uninstalling is idempotent).
pub fn uninstall_response(elapsed_ms: i64) -> WireResponse<WireOperationData> {
    WireResponse {
        code: "SUCCESS".into(),
        message: Some("uninstall biz success".into()),
        data: Some(WireOperationData {
            code: Some("SUCCESS".into()),
            message: Some("uninstall biz success".into()),
            biz_infos: Some(serde_json::json!([])),
            elapsed_space: Some(elapsed_ms),
        }),
        error_stack_trace: None,
        base_identity: None,
    }
}

/// `base/bizOperation` payload.
pub fn biz_operation(
    command: &str,
    key: &ModuleKey,
    response: WireResponse<WireOperationData>,
) -> WireBizOperation {
    WireBizOperation {
        command: command.to_string(),
        biz_name: key.name.clone(),
        biz_version: key.version.clone(),
        response,
    }
}

/// `base/batchInstallBizResponse` payload for a baseline; FAILED when any install failed.
pub fn batch_response(
    results: &[(ModuleSpec, InstallOutcome)],
    elapsed_ms: i64,
) -> WireBatchInstallResponse {
    let all_ok = results.iter().all(|(_, o)| o.is_success());
    let mut by_url = BTreeMap::new();
    for (spec, outcome) in results {
        let (code, message) = match outcome {
            InstallOutcome::Failed { reason, message } => (reason.clone(), message.clone()),
            _ => ("SUCCESS".to_string(), "install biz success".to_string()),
        };
        by_url.insert(
            spec.url.clone(),
            WireOperationData {
                code: Some(code),
                message: Some(message),
                biz_infos: Some(serde_json::json!([])),
                elapsed_space: None,
            },
        );
    }
    let (code, message) = if all_ok {
        ("SUCCESS", "batch install biz success")
    } else {
        ("FAILED", "batch install biz failed")
    };
    WireBatchInstallResponse {
        command: "batchInstallBiz".into(),
        response: WireResponse {
            code: code.into(),
            message: Some(message.into()),
            data: Some(WireBatchInstallData {
                code: Some(code.into()),
                message: Some(message.into()),
                elapsed_space: Some(elapsed_ms),
                biz_url_to_response: by_url,
            }),
            error_stack_trace: None,
            base_identity: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use module_controller::model::BizState;

    #[test]
    fn parses_commands_and_rejects_malformed_ones() {
        let cmd = parse_command(
            "installBiz",
            br#"{"bizName":"biz1","bizVersion":"0.0.1","bizUrl":"file:///a.jar","extra":1}"#,
        )
        .expect("valid install");
        assert_eq!(
            cmd,
            BaseCommand::Install(ModuleSpec {
                name: "biz1".into(),
                version: "0.0.1".into(),
                url: "file:///a.jar".into()
            })
        );
        assert!(parse_command("installBiz", b"{").is_err());
        assert!(parse_command("installBiz", br#"{"bizName":"a","bizUrl":"u"}"#).is_err());
        assert!(parse_command("uninstallBiz", br#"{"bizName":"a","bizVersion":" "}"#).is_err());
        assert_eq!(
            parse_command("health", b"").expect("health"),
            BaseCommand::QueryHealth
        );
        assert!(matches!(
            parse_command("nope", b"{}"),
            Err(CommandError::Unknown(_))
        ));
        let baseline = parse_baseline(
            br#"[{"bizName":"a","bizVersion":"1","bizUrl":"u1"},{"bizName":"b","bizVersion":"2","bizUrl":"u2"}]"#,
        )
        .expect("baseline");
        assert_eq!(baseline.len(), 2);
        assert!(parse_baseline(br#"{"bizName":"a"}"#).is_err());
    }

    #[test]
    fn simple_biz_is_lowercase_with_a_full_record() {
        let m = ModuleStatus {
            name: "biz1".into(),
            version: "1".into(),
            state: BizState::Activated,
            change_time_ms: Some(42),
            reason: None,
            message: Some("ok".into()),
        };
        let v = serde_json::to_value(simple_biz(&m)).expect("ser");
        assert_eq!(
            v,
            serde_json::json!({"name":"biz1","version":"1","state":"activated",
                "latestStateRecord":{"changeTime":42,"state":"activated","reason":"","message":"ok"}})
        );
    }

    #[test]
    fn failed_install_reply_carries_reason_in_data_code() {
        let r = install_response(
            &InstallOutcome::Failed {
                reason: "InstallBizFailed".into(),
                message: "boom".into(),
            },
            5,
        );
        let v = serde_json::to_value(&r).expect("ser");
        assert_eq!(v["code"], "FAILED");
        assert_eq!(v["data"]["code"], "InstallBizFailed");
        assert_eq!(v["data"]["message"], "boom");
        let ok =
            serde_json::to_value(install_response(&InstallOutcome::AlreadyActive, 0)).expect("ser");
        assert_eq!(ok["code"], "SUCCESS");
        assert_eq!(ok["data"]["bizInfos"], serde_json::json!([]));
    }

    #[test]
    fn batch_response_is_keyed_by_url() {
        let a = ModuleSpec {
            name: "a".into(),
            version: "1".into(),
            url: "u1".into(),
        };
        let b = ModuleSpec {
            name: "b".into(),
            version: "1".into(),
            url: "u2".into(),
        };
        let r = batch_response(
            &[
                (
                    a,
                    InstallOutcome::Activated {
                        deactivated: vec![],
                    },
                ),
                (
                    b,
                    InstallOutcome::Failed {
                        reason: "PullBizError".into(),
                        message: "404".into(),
                    },
                ),
            ],
            3,
        );
        let v = serde_json::to_value(&r).expect("ser");
        assert_eq!(v["command"], "batchInstallBiz");
        assert_eq!(v["response"]["code"], "FAILED");
        assert_eq!(
            v["response"]["data"]["bizUrlToResponse"]["u1"]["code"],
            "SUCCESS"
        );
        assert_eq!(
            v["response"]["data"]["bizUrlToResponse"]["u2"]["code"],
            "PullBizError"
        );
    }
}
