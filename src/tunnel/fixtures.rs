//! The codecs against the golden fixtures in `tests/fixtures/`: messages exactly as real
//! Arklet bases send them, written from the Arklet source independently of this crate.

use serde_json::Value;

use crate::model::{BaseCommand, BizState, ModuleKey, OperationKind, Outcome, TunnelEvent};
use crate::protocol::arklet::{
    WireBaseMetadata, WireBizInfo, WireHealth, WireHealthData, WireHeartbeat, WireOperationData,
    WireResponse, now_ms, operation_result,
};
use crate::tunnel::arklet_codec::ArkletCodec;
use crate::tunnel::codec::{DecodeError, MessageCodec};

macro_rules! fixture {
    ($path:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/",
            $path
        ))
    };
}

/// Decodes an MQTT fixture on its topic, restamped as just published.
fn decode(kind: &str, raw: &str) -> Result<Vec<TunnelEvent>, DecodeError> {
    let mut v: Value = serde_json::from_str(raw).expect("fixture is JSON");
    v["publishTimestamp"] = now_ms().into();
    let payload = serde_json::to_vec(&v).expect("json");
    let id = "192.168.1.10";
    ArkletCodec::new("dev")
        .decode(
            &format!("koupleless_dev/{id}/base/{kind}"),
            &payload,
            now_ms(),
        )
        .map(|evs| evs.into_iter().map(|e| e.event).collect())
}

fn one(kind: &str, raw: &str) -> TunnelEvent {
    let mut evs = decode(kind, raw).expect("decodes");
    assert_eq!(evs.len(), 1);
    evs.remove(0)
}

fn outcome(kind: &str, raw: &str) -> (OperationKind, Outcome) {
    match one(kind, raw) {
        TunnelEvent::Operation(r) => (r.kind, r.outcome),
        other => panic!("{other:?}"),
    }
}

#[test]
fn mqtt_heartbeats() {
    let TunnelEvent::Heartbeat(hb) = one("heart", fixture!("mqtt/heart.json")) else {
        panic!("heartbeat")
    };
    assert_eq!(hb.metadata.identity, "192.168.1.10");
    assert_eq!(hb.metadata.name, "base");
    assert_eq!(hb.lifecycle, crate::model::BaseLifecycle::Activated);
    let TunnelEvent::Heartbeat(hb) = one("heart", fixture!("mqtt/heart-deactivated.json")) else {
        panic!("heartbeat")
    };
    assert_eq!(hb.lifecycle, crate::model::BaseLifecycle::Deactivated);
}

#[test]
fn mqtt_query_baseline_and_health() {
    let TunnelEvent::QueryBaseline(md) = one("queryBaseline", fixture!("mqtt/query-baseline.json"))
    else {
        panic!("queryBaseline")
    };
    assert_eq!(
        (md.identity.as_str(), md.version.as_str()),
        ("192.168.1.10", "1.0.0")
    );
    let TunnelEvent::Health(h) = one("health", fixture!("mqtt/health.json")) else {
        panic!("health")
    };
    assert_eq!(h.max_metaspace, Some(1_073_741_824));
    assert_eq!(h.committed_metaspace, Some(134_217_728));
}

#[test]
fn mqtt_module_lists_current_and_legacy() {
    let TunnelEvent::ModuleList(list) = one("simpleBiz", fixture!("mqtt/simple-biz.json")) else {
        panic!("list")
    };
    let state = |n: &str, v: &str| {
        list.iter()
            .find(|m| m.key() == ModuleKey::new(n, v))
            .map(|m| m.state.clone())
    };
    assert_eq!(state("biz1", "0.0.1"), Some(BizState::Deactivated));
    assert_eq!(state("biz1", "0.0.2"), Some(BizState::Activated));
    assert_eq!(state("biz2", "1.0.0"), Some(BizState::Resolved));
    assert_eq!(state("biz3", "1.0.0"), Some(BizState::Broken));
    let broken = list.iter().find(|m| m.name == "biz3").expect("biz3");
    let reason = broken.message.clone();
    assert_eq!(
        reason.as_deref(),
        Some("org.springframework.boot.web.server.PortInUseException: Port 8080 is already in use")
    );
    let TunnelEvent::ModuleList(legacy) = one("biz", fixture!("mqtt/biz-legacy.json")) else {
        panic!("legacy list")
    };
    assert_eq!(legacy.len(), 2);
    assert_eq!(legacy[0].state, BizState::Activated);
    assert_eq!(legacy[0].change_time_ms, Some(1_735_718_401_500));
}

#[test]
fn mqtt_operation_answers() {
    use Outcome::*;
    let ok = outcome(
        "bizOperation",
        fixture!("mqtt/biz-operation-install-success.json"),
    );
    assert_eq!(ok, (OperationKind::Install, Succeeded));
    let (_, failed) = outcome(
        "bizOperation",
        fixture!("mqtt/biz-operation-install-failure.json"),
    );
    assert_eq!(
        failed,
        Failed {
            code: Some("FAILED".into()),
            message: "org.springframework.boot.web.server.PortInUseException: Port 8080 is \
                      already in use"
                .into()
        },
        "the root cause, not the InvocationTargetException wrapper"
    );
    let conflict = outcome(
        "bizOperation",
        fixture!("mqtt/biz-operation-install-conflict.json"),
    );
    assert_eq!(conflict, (OperationKind::Install, Busy));
    let repeat = outcome(
        "bizOperation",
        fixture!("mqtt/biz-operation-install-repeat-biz.json"),
    );
    assert_eq!(repeat, (OperationKind::Install, AlreadyInstalled));
    let un = outcome(
        "bizOperation",
        fixture!("mqtt/biz-operation-uninstall-success.json"),
    );
    assert_eq!(un, (OperationKind::Uninstall, Succeeded));
    let nf = outcome(
        "bizOperation",
        fixture!("mqtt/biz-operation-uninstall-not-found.json"),
    );
    assert_eq!(nf, (OperationKind::Uninstall, NotInstalled));
}

#[test]
fn mqtt_batch_install_answer_is_recognised_and_left_to_the_list() {
    let r = decode(
        "batchInstallBizResponse",
        fixture!("mqtt/batch-install-response.json"),
    );
    assert!(matches!(r, Err(DecodeError::Ignored(_))), "{r:?}");
}

fn http_op(kind: OperationKind, raw: &str) -> Outcome {
    let resp: WireResponse<WireOperationData> = serde_json::from_str(raw).expect("reply");
    operation_result(kind, "biz1", "0.0.1", &resp).outcome
}

#[test]
fn http_operation_answers() {
    use Outcome::*;
    assert_eq!(
        http_op(
            OperationKind::Install,
            fixture!("http/install-success.json")
        ),
        Succeeded
    );
    let Failed { code, message } = http_op(
        OperationKind::Install,
        fixture!("http/install-failure.json"),
    ) else {
        panic!("failure")
    };
    assert_eq!(code.as_deref(), Some("CMD_PROCESS_INTERNAL_ERROR"));
    assert!(message.contains("Port 8080 is already in use"), "{message}");
    assert_eq!(
        http_op(
            OperationKind::Install,
            fixture!("http/install-conflict.json")
        ),
        Busy
    );
    assert_eq!(
        http_op(
            OperationKind::Install,
            fixture!("http/install-repeat-biz.json")
        ),
        AlreadyInstalled
    );
    assert_eq!(
        http_op(
            OperationKind::Uninstall,
            fixture!("http/uninstall-success.json")
        ),
        Succeeded
    );
    assert_eq!(
        http_op(
            OperationKind::Uninstall,
            fixture!("http/uninstall-not-found.json")
        ),
        NotInstalled
    );
}

#[test]
fn http_module_lists_in_both_field_spellings() {
    for raw in [
        fixture!("http/query-all-biz-change-logs.json"),
        fixture!("http/query-all-biz-state-records.json"),
    ] {
        let resp: WireResponse<Vec<WireBizInfo>> = serde_json::from_str(raw).expect("reply");
        assert!(resp.code.eq_ignore_ascii_case("SUCCESS"));
        let list: Vec<_> = resp
            .data
            .expect("data")
            .iter()
            .map(WireBizInfo::to_model)
            .collect();
        assert!(!list.is_empty());
        assert!(
            list.iter()
                .all(|m| !matches!(m.state, BizState::Unknown(_))),
            "{list:?}"
        );
        assert!(list.iter().all(|m| m.change_time_ms.is_some()), "{list:?}");
    }
}

#[test]
fn http_heartbeat_baseline_query_and_health() {
    let hb: WireHeartbeat =
        serde_json::from_str(fixture!("http/heartbeat.json")).expect("heartbeat");
    let hb = hb.to_model();
    assert_eq!(hb.port, Some(1238));
    assert_eq!(hb.local_ip, "192.168.1.10");
    let md: WireBaseMetadata =
        serde_json::from_str(fixture!("http/query-baseline.json")).expect("metadata");
    assert_eq!(md.identity, "192.168.1.10");
    let h: WireResponse<WireHealthData> =
        serde_json::from_str(fixture!("http/health.json")).expect("health");
    let h = WireHealth {
        code: h.code,
        message: h.message,
        data: h.data,
    };
    assert!(h.to_model().and_then(|h| h.max_metaspace).is_some());
}

#[test]
fn commands_are_what_arklet_reads() {
    let spec = crate::model::ModuleSpec {
        name: "biz1".into(),
        version: "0.0.1".into(),
        url: "http://repo/biz1.jar".into(),
    };
    let codec = ArkletCodec::new("dev");
    let out = codec
        .encode("b1", &BaseCommand::Reinstall(spec))
        .expect("encodes");
    assert_eq!(out[0].topic, "koupleless_dev/b1/installBiz");
    let body: Value = serde_json::from_slice(&out[0].payload).expect("json");
    assert_eq!(
        body,
        serde_json::json!({"bizName": "biz1", "bizVersion": "0.0.1",
            "bizUrl": "http://repo/biz1.jar", "installStrategy": "uninstallThenInstall"})
    );
}
