//! Configuration of a double base. Defaults follow the current Arklet source; where Arklet
//! releases differ, or protocol.md asks for something Arklet does not do, a field picks the
//! variant (each field says which is which).

use std::time::Duration;

pub use crate::registry::MultiVersionPolicy;

/// The list field of a `BizInfo` in the HTTP `/queryAllBiz` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StateRecordsField {
    /// `bizStateRecords`: every Arklet since 2024-03-30 (`arklet-core/.../model/BizInfo.java`,
    /// commit c315f764 "modify biz record type").
    #[default]
    BizStateRecords,
    /// `bizStateChangeLogs`: the Arklet of 2024-03-29 (commit be14a4d1), renamed a day later.
    BizStateChangeLogs,
}

impl StateRecordsField {
    /// The JSON key.
    pub fn key(self) -> &'static str {
        match self {
            StateRecordsField::BizStateRecords => "bizStateRecords",
            StateRecordsField::BizStateChangeLogs => "bizStateChangeLogs",
        }
    }
}

/// How enums (`bizState`, record `state`/`reason`) are spelled in HTTP answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpEnumStyle {
    /// `toString()`: `activated`, `Started`. Arklet since 2024-08-07 serializes HTTP replies
    /// with `SerializerFeature.WriteEnumUsingToString` (`NettyHttpServer.returnResponse`,
    /// commit 54d290a8).
    #[default]
    ToString,
    /// `name()`: `ACTIVATED`, `STARTED`: fastjson's default, Arklet before 2024-08-07.
    Name,
}

/// What the base publishes after playing back a `base/baseline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaselineReply {
    /// Current Arklet (v1.4.1+/2.1.x, `PlaybackBaselineHandler`, commit 029ce763, 2025-01):
    /// one `batchInstallBiz` (entries in parallel), then `base/batchInstallBizResponse`.
    #[default]
    BatchInstallResponse,
    /// Arklet of 2024-11-08..2025-01 (commit cf168110): installs one by one through
    /// `installBiz` (per-biz lock), then publishes `base/simpleBiz`. What protocol.md says.
    SimpleBiz,
    /// Arklet v1.3.x (Dec 2024): installs one by one and publishes nothing.
    Nothing,
}

/// How the base reaches the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// MQTT broker at host:port (plain TCP).
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
    },
    /// HTTP: heartbeats to `controller_url`, Arklet API served on `listen_port` (0 = pick a
    /// free one; the pick is kept across restarts).
    Http {
        /// Base URL of the controller, e.g. `http://127.0.0.1:7777`.
        controller_url: String,
        /// Arklet HTTP port of the base.
        listen_port: u16,
    },
}

/// Everything that describes one double base.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseConfig {
    /// `baseMetadata.identity`; also the topic segment.
    pub identity: String,
    /// `baseMetadata.name`.
    pub name: String,
    /// `baseMetadata.version`.
    pub version: String,
    /// `baseMetadata.clusterName`.
    pub cluster_name: String,
    /// Topic environment (lowercased as Arklet does; empty = `dev`).
    pub env: String,
    /// `localIP`; the HTTP API binds here.
    pub local_ip: String,
    /// `localHostName`.
    pub host_name: String,
    /// Heartbeat period. Arklet: 10 s over MQTT (`MqttMessageHandler.onConnectCompleted`),
    /// 12 s over HTTP (`HttpTunnel.init`); the double uses this value for both.
    pub heartbeat_interval: Duration,
    /// How long a module stays RESOLVED before it is ACTIVATED (or BROKEN).
    pub install_time: Duration,
    /// How long an uninstall runs (the biz shows DEACTIVATED meanwhile).
    pub uninstall_time: Duration,
    /// `java max metaspace` in the health answer (bytes; -1 = unbounded).
    pub max_metaspace: i64,
    /// `java committed metaspace`.
    pub committed_metaspace: i64,
    /// `java used metaspace`.
    pub used_metaspace: i64,
    /// MQTT client id prefix (`<prefix>@@@<identity>`).
    pub client_prefix: String,
    /// MQTT username.
    pub mqtt_username: Option<String>,
    /// MQTT password.
    pub mqtt_password: Option<String>,
    /// Answer `queryAllBiz` on `base/biz` with the pre-2024-10-17 full `Output` instead of
    /// `base/simpleBiz`.
    pub legacy_biz_topic: bool,
    /// List field of HTTP `BizInfo`s.
    pub http_state_records_field: StateRecordsField,
    /// Enum spelling in HTTP answers.
    pub http_enum_style: HttpEnumStyle,
    /// Add `baseIdentity` to HTTP answers (Arklet since 2024-10-22, commit 0056bb60; named
    /// `baseID` until 2024-11-20).
    pub http_base_identity: bool,
    /// Multi-version activation rule.
    pub multi_version: MultiVersionPolicy,
    /// Keep a module whose start failed as BROKEN. Arklet/SOFAArk default is to stop and
    /// unregister it (`sofa.ark.auto.uninstall.when.failed.enable=true`); true here matches
    /// a base run with that property false, which is what lets a controller show the reason.
    pub keep_failed_modules: bool,
    /// What follows a baseline playback.
    pub baseline_reply: BaselineReply,
    /// Include `name` in `base/queryBaseline`. Arklet does since 2024-12-05 (commit 5b693bc5);
    /// protocol.md says it does not.
    pub query_baseline_with_name: bool,
    /// Send a `deactivated` heartbeat on [`crate::Base::shutdown_graceful`]. Required by
    /// protocol.md; *no Arklet release sends it* (its MQTT tunnel just disconnects, the HTTP
    /// tunnel just stops), so set false to behave exactly like Arklet.
    pub deactivated_heartbeat_on_shutdown: bool,
    /// POST `/queryBaseline` to the controller at start (HTTP). From protocol.md; Arklet's
    /// HTTP tunnel never does this.
    pub http_query_baseline: bool,
    /// Worker threads for MQTT commands: Arklet hands every message to a pool of 5 core
    /// threads with a queue (`arklet-tunnel-mqtt/.../executor/ExecutorServiceManager.java`).
    pub mqtt_workers: usize,
    /// Arklet's MQTT heartbeat is a `scheduleAtFixedRate` task that throws when a publish
    /// fails, which silently cancels all later heartbeats. true = mimic that bug (a
    /// heartbeat due while disconnected stops heartbeats for good).
    pub heartbeat_stops_after_publish_failure: bool,
    /// MQTT keep-alive.
    pub mqtt_keep_alive: Duration,
    /// Disable Nagle's algorithm on the MQTT socket. Paho, Arklet's client, leaves it on
    /// (`TCPNetworkModule.start` sets no TCP_NODELAY): a reply published right after the
    /// PUBACK of a QoS 1 command waits for the broker's (delayed) ACK, ~40 ms on Linux.
    pub tcp_nodelay: bool,
}

impl BaseConfig {
    /// Defaults for a base with this identity.
    pub fn new(identity: impl Into<String>) -> BaseConfig {
        let identity = identity.into();
        BaseConfig {
            host_name: identity.clone(),
            identity,
            name: "base".to_string(),
            version: "1.0.0".to_string(),
            cluster_name: "default".to_string(),
            env: "dev".to_string(),
            local_ip: "127.0.0.1".to_string(),
            heartbeat_interval: Duration::from_secs(10),
            install_time: Duration::ZERO,
            uninstall_time: Duration::ZERO,
            max_metaspace: 1 << 30,
            committed_metaspace: 128 << 20,
            used_metaspace: 120 << 20,
            client_prefix: "koupleless".to_string(),
            mqtt_username: None,
            mqtt_password: None,
            legacy_biz_topic: false,
            http_state_records_field: StateRecordsField::default(),
            http_enum_style: HttpEnumStyle::default(),
            http_base_identity: true,
            multi_version: MultiVersionPolicy::default(),
            keep_failed_modules: true,
            baseline_reply: BaselineReply::default(),
            query_baseline_with_name: true,
            deactivated_heartbeat_on_shutdown: true,
            http_query_baseline: true,
            mqtt_workers: 5,
            heartbeat_stops_after_publish_failure: false,
            mqtt_keep_alive: Duration::from_secs(60),
            tcp_nodelay: false,
        }
    }

    /// The topic environment as Arklet uses it (`MqttMessageHandler` constructor).
    pub fn topic_env(&self) -> String {
        if self.env.is_empty() {
            "dev".to_string()
        } else {
            self.env.to_lowercase()
        }
    }

    /// `koupleless_<env>/<identity>`.
    pub fn topic_prefix(&self) -> String {
        format!("koupleless_{}/{}", self.topic_env(), self.identity)
    }

    /// The MQTT client id.
    pub fn client_id(&self) -> String {
        format!("{}@@@{}", self.client_prefix, self.identity)
    }
}
