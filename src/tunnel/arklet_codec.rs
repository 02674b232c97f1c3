//! The built-in codec for Koupleless Arklet bases over MQTT (protocol.md, byte for byte).

use crate::model::{BaseCommand, BaseEvent, TunnelEvent};
use crate::protocol::arklet::{
    Envelope, UNINSTALL_THEN_INSTALL, WireBaseMetadata, WireBatchInstallResponse,
    WireBizInfoResponse, WireBizOperation, WireHealth, WireHeartbeat, WireInstallBiz,
    WireSimpleBiz, WireUninstallBiz,
};
use crate::protocol::mqtt_topics::{self, UpTopic, down};
use crate::tunnel::codec::{DecodeError, EncodeError, MessageCodec, OutMessage};

/// Messages older than this (by `publishTimestamp`) are stale.
pub const STALE_AFTER_MS: i64 = 10_000;

/// Codec for Arklet bases of one env.
#[derive(Debug, Clone)]
pub struct ArkletCodec {
    env: String,
    observe_commands: bool,
}

impl ArkletCodec {
    /// Codec for bases of `env` (lowercased, as in topic names).
    pub fn new(env: &str) -> Self {
        ArkletCodec {
            env: env.to_ascii_lowercase(),
            observe_commands: false,
        }
    }

    /// Also decodes the install/uninstall commands controller replicas publish, so that
    /// replicas sharing the bases know what the owner of a base has asked of it.
    pub fn observing_commands(mut self) -> Self {
        self.observe_commands = true;
        self
    }

    fn decode_command(
        &self,
        base_id: String,
        suffix: &str,
        payload: &[u8],
    ) -> Result<Vec<BaseEvent>, DecodeError> {
        let body: WireInstallBiz = match suffix {
            down::INSTALL_BIZ => parse(payload)?,
            _ => {
                let u: WireUninstallBiz = parse(payload)?;
                let key = crate::model::ModuleKey::new(&u.biz_name, &u.biz_version);
                return Ok(vec![BaseEvent {
                    base_id,
                    event: TunnelEvent::CommandSeen(BaseCommand::Uninstall(key)),
                }]);
            }
        };
        let replace = body.install_strategy.as_deref() == Some(UNINSTALL_THEN_INSTALL);
        let spec = crate::model::ModuleSpec {
            name: body.biz_name,
            version: body.biz_version,
            url: body.biz_url,
        };
        let cmd = if replace {
            BaseCommand::Reinstall(spec)
        } else {
            BaseCommand::Install(spec)
        };
        Ok(vec![BaseEvent {
            base_id,
            event: TunnelEvent::CommandSeen(cmd),
        }])
    }
}

fn parse<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(payload).map_err(|e| DecodeError::Malformed(e.to_string()))
}

fn fresh<T>(env: Envelope<T>, kind: UpTopic, now_ms: i64) -> Result<T, DecodeError> {
    let age_ms = now_ms - env.publish_timestamp;
    if kind.staleness_checked() && age_ms > STALE_AFTER_MS {
        return Err(DecodeError::Stale { age_ms });
    }
    Ok(env.data)
}

fn json(v: &impl serde::Serialize) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}

impl MessageCodec for ArkletCodec {
    fn name(&self) -> &str {
        "mqtt"
    }

    fn subscriptions(&self) -> Vec<String> {
        let mut subs: Vec<String> = UpTopic::ALL
            .iter()
            .map(|k| mqtt_topics::subscription(&self.env, *k))
            .collect();
        if self.observe_commands {
            for c in [down::INSTALL_BIZ, down::UNINSTALL_BIZ] {
                subs.push(format!("{}/+/{c}", mqtt_topics::prefix(&self.env)));
            }
        }
        subs
    }

    fn handles(&self, topic: &str) -> bool {
        mqtt_topics::parse_up(&self.env, topic).is_some()
            || (self.observe_commands && mqtt_topics::parse_command(&self.env, topic).is_some())
    }

    fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Vec<BaseEvent>, DecodeError> {
        if self.observe_commands
            && let Some((base_id, suffix)) = mqtt_topics::parse_command(&self.env, topic)
        {
            return self.decode_command(base_id, suffix, payload);
        }
        let (base_id, kind) =
            mqtt_topics::parse_up(&self.env, topic).ok_or(DecodeError::UnknownTopic)?;
        let event = match kind {
            UpTopic::Heart => {
                let hb: WireHeartbeat = fresh(parse(payload)?, kind, now_ms)?;
                let mut hb = hb.to_model();
                // The topic names the base; a payload that disagrees must not hijack another base.
                if hb.metadata.identity.is_empty() {
                    hb.metadata.identity = base_id.clone();
                } else if hb.metadata.identity != base_id {
                    return Err(DecodeError::Malformed(format!(
                        "heartbeat identity {:?} does not match topic id {:?}",
                        hb.metadata.identity, base_id
                    )));
                }
                TunnelEvent::Heartbeat(hb)
            }
            UpTopic::QueryBaseline => {
                let md: WireBaseMetadata = fresh(parse(payload)?, kind, now_ms)?;
                TunnelEvent::QueryBaseline((&md).into())
            }
            UpTopic::Health => {
                let h: WireHealth = fresh(parse(payload)?, kind, now_ms)?;
                let health = h
                    .to_model()
                    .ok_or_else(|| DecodeError::Ignored(format!("health code {:?}", h.code)))?;
                TunnelEvent::Health(health)
            }
            UpTopic::SimpleBiz => {
                let list: Vec<WireSimpleBiz> = fresh(parse(payload)?, kind, now_ms)?;
                TunnelEvent::ModuleList(list.iter().map(WireSimpleBiz::to_model).collect())
            }
            UpTopic::Biz => {
                let resp: WireBizInfoResponse = fresh(parse(payload)?, kind, now_ms)?;
                if !resp.code.eq_ignore_ascii_case("SUCCESS") {
                    return Err(DecodeError::Ignored(format!("biz code {:?}", resp.code)));
                }
                TunnelEvent::ModuleList(resp.data.iter().map(|b| b.to_model()).collect())
            }
            UpTopic::BizOperation => {
                let op: WireBizOperation = fresh(parse(payload)?, kind, now_ms)?;
                let result = op.to_model().ok_or_else(|| {
                    DecodeError::Ignored(format!("unknown command {:?}", op.command))
                })?;
                TunnelEvent::Operation(result)
            }
            UpTopic::BatchInstallResponse => {
                // The per-module outcome arrives through the module list we query afterwards.
                let _: WireBatchInstallResponse = fresh(parse(payload)?, kind, now_ms)?;
                return Err(DecodeError::Ignored(
                    "batch install response (module list is queried instead)".into(),
                ));
            }
        };
        Ok(vec![BaseEvent { base_id, event }])
    }

    fn encode(&self, base_id: &str, cmd: &BaseCommand) -> Result<Vec<OutMessage>, EncodeError> {
        let err = |reason: String| EncodeError {
            command: cmd.kind(),
            reason,
        };
        let (suffix, payload) = match cmd {
            BaseCommand::Install(spec) => (down::INSTALL_BIZ, json(&WireInstallBiz::from(spec))),
            BaseCommand::Reinstall(spec) => (
                down::INSTALL_BIZ,
                json(&WireInstallBiz {
                    install_strategy: Some(UNINSTALL_THEN_INSTALL.into()),
                    ..WireInstallBiz::from(spec)
                }),
            ),
            BaseCommand::Uninstall(key) => (
                down::UNINSTALL_BIZ,
                json(&WireUninstallBiz {
                    biz_name: key.name.clone(),
                    biz_version: key.version.clone(),
                }),
            ),
            BaseCommand::QueryAllModules => (down::QUERY_ALL_BIZ, Ok(b"{}".to_vec())),
            BaseCommand::QueryHealth => (down::HEALTH, Ok(b"{}".to_vec())),
            BaseCommand::Baseline(specs) => (
                down::BASELINE,
                json(&specs.iter().map(WireInstallBiz::from).collect::<Vec<_>>()),
            ),
        };
        Ok(vec![OutMessage {
            topic: mqtt_topics::topic(&self.env, base_id, suffix),
            payload: payload.map_err(err)?,
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BizState, ModuleKey, ModuleSpec};

    const NOW: i64 = 1_700_000_010_000;

    fn decode(topic: &str, payload: &str) -> Result<Vec<BaseEvent>, DecodeError> {
        ArkletCodec::new("dev").decode(topic, payload.as_bytes(), NOW)
    }

    #[test]
    fn heartbeat_decodes_and_checks_identity() {
        let ok = r#"{"publishTimestamp":1700000009000,"data":{"baseMetadata":{"identity":"b1","version":"1.0.0","clusterName":"c","name":"base"},"localIP":"1.2.3.4","localHostName":"h","state":"ACTIVATED"}}"#;
        let ev = decode("koupleless_dev/b1/base/heart", ok).expect("decodes");
        assert_eq!(ev[0].base_id, "b1");
        assert!(matches!(&ev[0].event, TunnelEvent::Heartbeat(h) if h.local_ip == "1.2.3.4"));
        let err = decode("koupleless_dev/other/base/heart", ok).expect_err("hijack");
        assert_eq!(err.label(), "malformed");
    }

    #[test]
    fn stale_messages_are_dropped_but_operations_are_not() {
        let hb = r#"{"publishTimestamp":1699999999000,"data":{"baseMetadata":{"identity":"b1"},"state":"ACTIVATED"}}"#;
        assert!(matches!(
            decode("koupleless_dev/b1/base/heart", hb),
            Err(DecodeError::Stale { age_ms: 10_000.. })
        ));
        let op = r#"{"publishTimestamp":1600000000000,"data":{"command":"installBiz","bizName":"m","bizVersion":"1","response":{"code":"SUCCESS"}}}"#;
        assert!(decode("koupleless_dev/b1/base/bizOperation", op).is_ok());
    }

    #[test]
    fn garbage_is_malformed_and_other_envs_unknown() {
        assert_eq!(
            decode("koupleless_dev/b1/base/heart", "{not json")
                .expect_err("bad")
                .label(),
            "malformed"
        );
        assert_eq!(
            decode(
                "koupleless_dev/b1/base/simpleBiz",
                r#"{"publishTimestamp":1700000009000,"data":{"x":1}}"#
            )
            .expect_err("bad")
            .label(),
            "malformed"
        );
        assert_eq!(
            decode("koupleless_prod/b1/base/heart", "{}")
                .expect_err("env")
                .label(),
            "unknown_topic"
        );
    }

    #[test]
    fn simple_biz_becomes_module_list() {
        let p = r#"{"publishTimestamp":1700000009000,"data":[{"name":"m","version":"1","state":"activated"}]}"#;
        let ev = decode("koupleless_dev/b1/base/simpleBiz", p).expect("decodes");
        match &ev[0].event {
            TunnelEvent::ModuleList(l) => assert_eq!(l[0].state, BizState::Activated),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn commands_encode_to_exact_topics_and_bodies() {
        let c = ArkletCodec::new("dev");
        let spec = ModuleSpec {
            name: "m".into(),
            version: "1".into(),
            url: "file:///m.jar".into(),
        };
        let out = c
            .encode("b1", &BaseCommand::Install(spec.clone()))
            .expect("enc");
        assert_eq!(out[0].topic, "koupleless_dev/b1/installBiz");
        assert_eq!(
            String::from_utf8_lossy(&out[0].payload),
            r#"{"bizName":"m","bizVersion":"1","bizUrl":"file:///m.jar"}"#
        );
        let out = c
            .encode("b1", &BaseCommand::Uninstall(ModuleKey::new("m", "1")))
            .expect("enc");
        assert_eq!(out[0].topic, "koupleless_dev/b1/uninstallBiz");
        let out = c
            .encode("b1", &BaseCommand::Baseline(vec![spec]))
            .expect("enc");
        assert_eq!(out[0].topic, "koupleless_dev/b1/base/baseline");
        assert!(String::from_utf8_lossy(&out[0].payload).starts_with("[{\"bizName\""));
        let out = c.encode("b1", &BaseCommand::QueryAllModules).expect("enc");
        assert_eq!(
            (out[0].topic.as_str(), out[0].payload.as_slice()),
            ("koupleless_dev/b1/queryAllBiz", b"{}".as_slice())
        );
    }
}
