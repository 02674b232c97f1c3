//! Configuration: environment variables compatible with the reference Module Controller
//! deployment, each overridable by a CLI flag. Value names equal the variable names so that
//! every error names the variable to fix.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::builder::BoolishValueParser;
use thiserror::Error;

/// A configuration value that cannot work.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("invalid configuration {variable}: {reason}")]
pub struct ConfigError {
    /// The environment variable (and flag) at fault.
    pub variable: &'static str,
    /// What is wrong.
    pub reason: String,
}

/// `module-controller run` options.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Environment name; bases publish on `koupleless_<ENV>/...` and VNodes are `vnode.<id>.<ENV>`.
    #[arg(long = "env", env = "ENV", value_name = "ENV", default_value = "dev")]
    pub env: String,

    /// Identity of this controller instance (default: POD_NAME, else a random id).
    #[arg(long = "client-id", env = "CLIENT_ID", value_name = "CLIENT_ID")]
    pub client_id: Option<String>,

    /// Enable the MQTT tunnel.
    #[arg(long = "enable-mqtt-tunnel", env = "ENABLE_MQTT_TUNNEL", value_name = "ENABLE_MQTT_TUNNEL",
          default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub enable_mqtt_tunnel: bool,

    /// MQTT broker host.
    #[arg(
        long = "mqtt-broker",
        env = "MQTT_BROKER",
        value_name = "MQTT_BROKER",
        default_value = ""
    )]
    pub mqtt_broker: String,

    /// MQTT broker port.
    #[arg(
        long = "mqtt-port",
        env = "MQTT_PORT",
        value_name = "MQTT_PORT",
        default_value_t = 1883
    )]
    pub mqtt_port: u16,

    /// MQTT username.
    #[arg(
        long = "mqtt-username",
        env = "MQTT_USERNAME",
        value_name = "MQTT_USERNAME"
    )]
    pub mqtt_username: Option<String>,

    /// MQTT password.
    #[arg(
        long = "mqtt-password",
        env = "MQTT_PASSWORD",
        value_name = "MQTT_PASSWORD",
        hide_env_values = true
    )]
    pub mqtt_password: Option<String>,

    /// Prefix of the controller's MQTT client id (`<prefix>@@@<CLIENT_ID>`).
    #[arg(
        long = "mqtt-client-prefix",
        env = "MQTT_CLIENT_PREFIX",
        value_name = "MQTT_CLIENT_PREFIX",
        default_value = "koupleless"
    )]
    pub mqtt_client_prefix: String,

    /// CA bundle (PEM) to verify the broker; setting it enables TLS.
    #[arg(
        long = "mqtt-ca-path",
        env = "MQTT_CA_PATH",
        value_name = "MQTT_CA_PATH"
    )]
    pub mqtt_ca_path: Option<PathBuf>,

    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        long = "mqtt-client-crt-path",
        env = "MQTT_CLIENT_CRT_PATH",
        value_name = "MQTT_CLIENT_CRT_PATH"
    )]
    pub mqtt_client_crt_path: Option<PathBuf>,

    /// Client key (PEM) for mutual TLS.
    #[arg(
        long = "mqtt-client-key-path",
        env = "MQTT_CLIENT_KEY_PATH",
        value_name = "MQTT_CLIENT_KEY_PATH"
    )]
    pub mqtt_client_key_path: Option<PathBuf>,

    /// Enable the HTTP tunnel.
    #[arg(long = "enable-http-tunnel", env = "ENABLE_HTTP_TUNNEL", value_name = "ENABLE_HTTP_TUNNEL",
          default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub enable_http_tunnel: bool,

    /// Port of the HTTP tunnel (bases POST /heartbeat and /queryBaseline here).
    #[arg(
        long = "http-tunnel-listen-port",
        env = "HTTP_TUNNEL_LISTEN_PORT",
        value_name = "HTTP_TUNNEL_LISTEN_PORT",
        default_value_t = 7777
    )]
    pub http_tunnel_listen_port: u16,

    /// Shared token bases (or the proxy in front of them) must send as
    /// `Authorization: Bearer <token>` to the HTTP tunnel; unset: no authentication.
    #[arg(
        long = "http-tunnel-token",
        env = "HTTP_TUNNEL_TOKEN",
        value_name = "HTTP_TUNNEL_TOKEN",
        hide_env_values = true
    )]
    pub http_tunnel_token: Option<String>,

    /// Connect to a TLS broker without verifying its certificate (as the reference did). Off
    /// by default; only for brokers whose certificate cannot be verified.
    #[arg(long = "mqtt-tls-insecure-skip-verify", env = "MQTT_TLS_INSECURE_SKIP_VERIFY",
          value_name = "MQTT_TLS_INSECURE_SKIP_VERIFY", default_value = "false",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub mqtt_tls_insecure_skip_verify: bool,

    /// Module writes (pod statuses, pod removals) in flight at once per VNode, as the
    /// reference's per-VNode workers.
    #[arg(
        long = "vnode-worker-num",
        env = "VNODE_WORKER_NUM",
        value_name = "VNODE_WORKER_NUM",
        default_value_t = 8
    )]
    pub vnode_worker_num: usize,

    /// Expected base heartbeat period in seconds (Arklet default 10).
    #[arg(
        long = "heartbeat-period-secs",
        env = "HEARTBEAT_PERIOD_SECS",
        value_name = "HEARTBEAT_PERIOD_SECS",
        default_value_t = 10.0
    )]
    pub heartbeat_period_secs: f64,

    /// Missed heartbeat periods after which a base is NotReady.
    #[arg(
        long = "heartbeat-misses",
        env = "HEARTBEAT_MISSES",
        value_name = "HEARTBEAT_MISSES",
        default_value_t = 3
    )]
    pub heartbeat_misses: u32,

    /// Seconds after which a VNode whose base never came back is deleted.
    #[arg(
        long = "vnode-ttl-secs",
        env = "VNODE_TTL_SECS",
        value_name = "VNODE_TTL_SECS",
        default_value_t = 600
    )]
    pub vnode_ttl_secs: u64,

    /// Taint VNodes with `schedule.koupleless.io/node-env=<ENV>:NoExecute`.
    #[arg(long = "enable-env-taint", env = "ENABLE_ENV_TAINT", value_name = "ENABLE_ENV_TAINT",
          default_value = "true", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub enable_env_taint: bool,

    /// Seconds between full module-list queries to each live base.
    #[arg(
        long = "resync-secs",
        env = "RESYNC_SECS",
        value_name = "RESYNC_SECS",
        default_value_t = 30.0
    )]
    pub resync_secs: f64,

    /// Seconds to wait for an install/uninstall outcome before re-sending the command.
    #[arg(
        long = "command-timeout-secs",
        env = "COMMAND_TIMEOUT_SECS",
        value_name = "COMMAND_TIMEOUT_SECS",
        default_value_t = 15.0
    )]
    pub command_timeout_secs: f64,

    /// Address of the /metrics, /healthz and /readyz endpoint (empty to disable).
    #[arg(
        long = "metrics-addr",
        env = "METRICS_ADDR",
        value_name = "METRICS_ADDR",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_addr: String,

    /// Longest a base keeps a module's last instance, during a rollout, waiting for its replacement.
    #[arg(
        long = "module-handover-timeout-secs",
        env = "MODULE_HANDOVER_TIMEOUT_SECS",
        value_name = "MODULE_HANDOVER_TIMEOUT_SECS",
        default_value_t = 600
    )]
    pub module_handover_timeout_secs: u64,

    /// Seconds a module may take to start on its base before it shows
    /// `Arklet.InstallModuleTimedOut` (the install is not sent again while the base works on it).
    #[arg(
        long = "module-install-timeout-secs",
        env = "MODULE_INSTALL_TIMEOUT_SECS",
        value_name = "MODULE_INSTALL_TIMEOUT_SECS",
        default_value_t = 600
    )]
    pub module_install_timeout_secs: u64,

    /// Seconds a module no pod asks for (e.g. on a base returning after its pods were evicted)
    /// is kept before it is uninstalled, so that replacement pods find it still running.
    #[arg(
        long = "module-orphan-grace-secs",
        env = "MODULE_ORPHAN_GRACE_SECS",
        value_name = "MODULE_ORPHAN_GRACE_SECS",
        default_value_t = 120
    )]
    pub module_orphan_grace_secs: u64,

    /// Directory of WASM plugins (and their manifest); empty for built-in behaviour only.
    #[arg(long = "plugins-dir", env = "PLUGINS_DIR", value_name = "PLUGINS_DIR")]
    pub plugins_dir: Option<PathBuf>,

    /// Writable directory for precompiled plugins (never the mounted plugins directory).
    #[arg(
        long = "plugin-cache-dir",
        env = "PLUGIN_CACHE_DIR",
        value_name = "PLUGIN_CACHE_DIR"
    )]
    pub plugin_cache_dir: Option<PathBuf>,

    /// CPU-time budget of one plugin call, in milliseconds.
    #[arg(
        long = "plugin-call-budget-ms",
        env = "PLUGIN_CALL_BUDGET_MS",
        value_name = "PLUGIN_CALL_BUDGET_MS",
        default_value_t = 50
    )]
    pub plugin_call_budget_ms: u64,

    /// Memory cap of one plugin instance (all its memories and tables), in MiB.
    #[arg(
        long = "plugin-memory-limit-mb",
        env = "PLUGIN_MEMORY_LIMIT_MB",
        value_name = "PLUGIN_MEMORY_LIMIT_MB",
        default_value_t = 64
    )]
    pub plugin_memory_limit_mb: u64,

    /// Largest plugin file accepted, in MiB.
    #[arg(
        long = "plugin-max-file-mb",
        env = "PLUGIN_MAX_FILE_MB",
        value_name = "PLUGIN_MAX_FILE_MB",
        default_value_t = 16
    )]
    pub plugin_max_file_mb: u64,

    /// Longest a plugin may take to compile, in seconds.
    #[arg(
        long = "plugin-compile-budget-secs",
        env = "PLUGIN_COMPILE_BUDGET_SECS",
        value_name = "PLUGIN_COMPILE_BUDGET_SECS",
        default_value_t = 10
    )]
    pub plugin_compile_budget_secs: u64,

    /// Threads that run plugin calls (never the async runtime's).
    #[arg(
        long = "plugin-workers",
        env = "PLUGIN_WORKERS",
        value_name = "PLUGIN_WORKERS",
        default_value_t = 2
    )]
    pub plugin_workers: usize,

    /// Several replicas share the bases through per-VNode Leases (the reference's cluster mode).
    #[arg(long = "is-cluster", env = "IS_CLUSTER", value_name = "IS_CLUSTER",
          default_value = "false", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub is_cluster: bool,

    /// How strongly a replica's load delays its claims of new bases (0: no delay).
    #[arg(
        long = "workload-max-level",
        env = "WORKLOAD_MAX_LEVEL",
        value_name = "WORKLOAD_MAX_LEVEL",
        default_value_t = 3
    )]
    pub workload_max_level: u32,

    /// Namespace of the ownership Leases (default: POD_NAMESPACE, else `default`).
    #[arg(long = "namespace", env = "NAMESPACE", value_name = "NAMESPACE")]
    pub namespace: Option<String>,

    /// Seconds an ownership Lease lasts without renewal: the longest a dead replica's bases
    /// wait for another replica.
    #[arg(
        long = "owner-lease-secs",
        env = "OWNER_LEASE_SECS",
        value_name = "OWNER_LEASE_SECS",
        default_value_t = 15
    )]
    pub owner_lease_secs: u64,

    /// This replica's IP, where the others forward HTTP heartbeats of bases it owns.
    #[arg(long = "pod-ip", env = "POD_IP", value_name = "POD_IP")]
    pub pod_ip: Option<String>,

    /// Keep module Deployments labelled `virtual-kubelet.koupleless.io/strategy=peer` at one replica per Ready base of their cluster.
    #[arg(long = "enable-module-replicas-sync-with-base", env = "ENABLE_MODULE_REPLICAS_SYNC_WITH_BASE",
          value_name = "ENABLE_MODULE_REPLICAS_SYNC_WITH_BASE", default_value = "false",
          value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub enable_module_replicas_sync_with_base: bool,
}

/// How replicas share the bases (`IS_CLUSTER=true`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// Namespace of the ownership Leases.
    pub namespace: String,
    /// Ownership Lease duration.
    pub lease: Duration,
    /// `WORKLOAD_MAX_LEVEL`.
    pub max_level: u32,
    /// Host (IP) the other replicas reach this one's HTTP tunnel at.
    pub advertise_host: Option<String>,
}

/// Budgets of the plugin host (`PLUGIN_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginLimits {
    /// Where precompiled plugins are cached (`None`: the user's cache directory).
    pub cache_dir: Option<PathBuf>,
    /// CPU-time budget of one call.
    pub call_budget: Duration,
    /// Memory cap of one instance, bytes.
    pub memory_bytes: usize,
    /// Largest plugin file, bytes.
    pub max_file_bytes: u64,
    /// Longest compile.
    pub compile_budget: Duration,
    /// Threads running plugin calls.
    pub workers: usize,
}

impl Default for PluginLimits {
    fn default() -> Self {
        PluginLimits {
            cache_dir: None,
            call_budget: Duration::from_millis(50),
            memory_bytes: 64 << 20,
            max_file_bytes: 16 << 20,
            compile_budget: Duration::from_secs(10),
            workers: 2,
        }
    }
}

/// Validated settings the controller runs with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Lowercase env name.
    pub env: String,
    /// Controller identity.
    pub client_id: String,
    /// MQTT tunnel settings, when enabled.
    pub mqtt: Option<crate::tunnel::mqtt::MqttSettings>,
    /// HTTP tunnel port, when enabled.
    pub http_port: Option<u16>,
    /// Shared token of the HTTP tunnel, when required.
    pub http_token: Option<String>,
    /// Concurrent apiserver writes.
    pub workers: usize,
    /// Expected heartbeat period.
    pub heartbeat_period: Duration,
    /// Silence after which a base is NotReady.
    pub liveness_timeout: Duration,
    /// Silence after which a VNode is deleted.
    pub vnode_ttl: Duration,
    /// Whether VNodes get the env taint.
    pub env_taint: bool,
    /// Period of full module-list queries.
    pub resync: Duration,
    /// Wait for a command outcome before re-sending.
    pub command_timeout: Duration,
    /// Metrics/health endpoint.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Plugins directory.
    pub plugins_dir: Option<PathBuf>,
    /// Budgets of the plugin host.
    pub plugin_limits: PluginLimits,
    /// Peer-deployment replica sync.
    pub replicas_sync: bool,
    /// Several replicas share the bases (`None`: this replica drives every base).
    pub cluster: Option<ClusterSettings>,
    /// Longest hand-over retention of a module on a base during a rollout.
    pub retention_timeout: Duration,
    /// Longest a module may take to start before it shows as timed out.
    pub install_timeout: Duration,
    /// How long a module no pod asks for is kept before it is uninstalled.
    pub orphan_grace: Duration,
}

fn secs(variable: &'static str, v: f64) -> Result<Duration, ConfigError> {
    if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
        return Err(ConfigError {
            variable,
            reason: format!("{v} is not a number of seconds in (0, 86400]"),
        });
    }
    Ok(Duration::from_secs_f64(v))
}

impl Settings {
    /// The product defaults for env `env`, with no tunnel and no metrics endpoint: the one
    /// starting point for local runs (quick start, tests, benchmarks), which then set what they
    /// need (`with_mqtt`, `with_heartbeat`, fields).
    pub fn local(env: &str) -> Settings {
        let period = Duration::from_secs(10);
        Settings {
            env: env.to_ascii_lowercase(),
            client_id: format!("local-{env}"),
            mqtt: None,
            http_port: None,
            http_token: None,
            workers: 8,
            heartbeat_period: period,
            liveness_timeout: period * 3,
            vnode_ttl: Duration::from_secs(600),
            env_taint: true,
            resync: Duration::from_secs(30),
            command_timeout: Duration::from_secs(15),
            metrics_addr: None,
            plugins_dir: None,
            plugin_limits: PluginLimits::default(),
            replicas_sync: false,
            cluster: None,
            retention_timeout: Duration::from_secs(600),
            install_timeout: Duration::from_secs(600),
            orphan_grace: Duration::from_secs(120),
        }
    }

    /// Enables the MQTT tunnel to a plain-TCP broker at `host:port` without credentials.
    pub fn with_mqtt(mut self, host: &str, port: u16) -> Settings {
        self.mqtt = Some(crate::tunnel::mqtt::MqttSettings {
            host: host.to_string(),
            port,
            client_id: format!("koupleless@@@{}", self.client_id),
            username: None,
            password: None,
            ca_path: None,
            client_cert_path: None,
            client_key_path: None,
            keep_alive: Duration::from_secs(5),
            insecure_skip_verify: false,
        });
        self
    }

    /// Expects heartbeats every `period`; NotReady after `misses` missed ones.
    pub fn with_heartbeat(mut self, period: Duration, misses: u32) -> Settings {
        self.heartbeat_period = period;
        self.liveness_timeout = period * misses.max(1);
        self
    }
}

impl RunArgs {
    /// Checks the combination of values and resolves defaults.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let env = self.env.trim().to_ascii_lowercase();
        if env.is_empty() || !env.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Err(ConfigError {
                variable: "ENV",
                reason: format!(
                    "{:?} must be non-empty lowercase letters, digits or '-'",
                    self.env
                ),
            });
        }
        if !self.enable_mqtt_tunnel && !self.enable_http_tunnel {
            return Err(ConfigError {
                variable: "ENABLE_MQTT_TUNNEL",
                reason:
                    "no tunnel enabled: set ENABLE_MQTT_TUNNEL=true and/or ENABLE_HTTP_TUNNEL=true"
                        .into(),
            });
        }
        let client_id = self
            .client_id
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| std::env::var("POD_NAME").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| format!("module-controller-{}", uuid::Uuid::new_v4().simple()));
        let mqtt = if self.enable_mqtt_tunnel {
            if self.mqtt_broker.trim().is_empty() {
                return Err(ConfigError {
                    variable: "MQTT_BROKER",
                    reason: "required when ENABLE_MQTT_TUNNEL=true".into(),
                });
            }
            if self.mqtt_port == 0 {
                return Err(ConfigError {
                    variable: "MQTT_PORT",
                    reason: "must be 1-65535".into(),
                });
            }
            if self.mqtt_client_crt_path.is_some() != self.mqtt_client_key_path.is_some() {
                return Err(ConfigError {
                    variable: "MQTT_CLIENT_CRT_PATH",
                    reason: "MQTT_CLIENT_CRT_PATH and MQTT_CLIENT_KEY_PATH must be set together"
                        .into(),
                });
            }
            for (variable, p) in [
                ("MQTT_CA_PATH", &self.mqtt_ca_path),
                ("MQTT_CLIENT_CRT_PATH", &self.mqtt_client_crt_path),
                ("MQTT_CLIENT_KEY_PATH", &self.mqtt_client_key_path),
            ] {
                if let Some(p) = p
                    && !p.is_file()
                {
                    return Err(ConfigError {
                        variable,
                        reason: format!("{} is not a readable file", p.display()),
                    });
                }
            }
            if self.mqtt_client_crt_path.is_some() && self.mqtt_ca_path.is_none() {
                return Err(ConfigError {
                    variable: "MQTT_CA_PATH",
                    reason: "required for TLS when a client certificate is given".into(),
                });
            }
            let broker = self
                .mqtt_broker
                .trim()
                .trim_start_matches("tcp://")
                .trim_start_matches("ssl://")
                .trim_start_matches("mqtt://")
                .to_string();
            Some(crate::tunnel::mqtt::MqttSettings {
                host: broker,
                port: self.mqtt_port,
                client_id: format!("{}@@@{}", self.mqtt_client_prefix, client_id),
                username: self.mqtt_username.clone().filter(|s| !s.is_empty()),
                password: self.mqtt_password.clone().filter(|s| !s.is_empty()),
                ca_path: self.mqtt_ca_path.clone(),
                client_cert_path: self.mqtt_client_crt_path.clone(),
                client_key_path: self.mqtt_client_key_path.clone(),
                keep_alive: Duration::from_secs(30),
                insecure_skip_verify: self.mqtt_tls_insecure_skip_verify,
            })
        } else {
            None
        };
        if self.vnode_worker_num == 0 || self.vnode_worker_num > 1024 {
            return Err(ConfigError {
                variable: "VNODE_WORKER_NUM",
                reason: format!("{} must be 1-1024", self.vnode_worker_num),
            });
        }
        if self.heartbeat_misses == 0 {
            return Err(ConfigError {
                variable: "HEARTBEAT_MISSES",
                reason: "must be at least 1".into(),
            });
        }
        let heartbeat_period = secs("HEARTBEAT_PERIOD_SECS", self.heartbeat_period_secs)?;
        let metrics_addr = if self.metrics_addr.trim().is_empty() {
            None
        } else {
            Some(self.metrics_addr.trim().parse().map_err(|e| ConfigError {
                variable: "METRICS_ADDR",
                reason: format!("{:?}: {e}", self.metrics_addr),
            })?)
        };
        if self.vnode_ttl_secs == 0 {
            return Err(ConfigError {
                variable: "VNODE_TTL_SECS",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(d) = &self.plugins_dir
            && !d.is_dir()
        {
            return Err(ConfigError {
                variable: "PLUGINS_DIR",
                reason: format!("{} is not a directory", d.display()),
            });
        }
        let bounded = |variable: &'static str, v: u64, max: u64| {
            if v == 0 || v > max {
                Err(ConfigError {
                    variable,
                    reason: format!("{v} must be 1-{max}"),
                })
            } else {
                Ok(v)
            }
        };
        let plugin_limits = PluginLimits {
            cache_dir: self.plugin_cache_dir.clone(),
            call_budget: Duration::from_millis(bounded(
                "PLUGIN_CALL_BUDGET_MS",
                self.plugin_call_budget_ms,
                10_000,
            )?),
            memory_bytes: (bounded("PLUGIN_MEMORY_LIMIT_MB", self.plugin_memory_limit_mb, 4096)?
                << 20) as usize,
            max_file_bytes: bounded("PLUGIN_MAX_FILE_MB", self.plugin_max_file_mb, 1024)? << 20,
            compile_budget: Duration::from_secs(bounded(
                "PLUGIN_COMPILE_BUDGET_SECS",
                self.plugin_compile_budget_secs,
                600,
            )?),
            workers: bounded("PLUGIN_WORKERS", self.plugin_workers as u64, 64)? as usize,
        };
        Ok(Settings {
            env,
            client_id,
            mqtt,
            http_port: self
                .enable_http_tunnel
                .then_some(self.http_tunnel_listen_port),
            http_token: self.http_tunnel_token.clone().filter(|t| !t.is_empty()),
            workers: self.vnode_worker_num,
            heartbeat_period,
            liveness_timeout: heartbeat_period * self.heartbeat_misses,
            vnode_ttl: Duration::from_secs(self.vnode_ttl_secs),
            env_taint: self.enable_env_taint,
            resync: secs("RESYNC_SECS", self.resync_secs)?,
            command_timeout: secs("COMMAND_TIMEOUT_SECS", self.command_timeout_secs)?,
            metrics_addr,
            plugins_dir: self.plugins_dir.clone(),
            plugin_limits,
            replicas_sync: self.enable_module_replicas_sync_with_base,
            cluster: if self.is_cluster {
                let namespace = self
                    .namespace
                    .clone()
                    .filter(|n| !n.is_empty())
                    .or_else(|| {
                        std::env::var("POD_NAMESPACE")
                            .ok()
                            .filter(|n| !n.is_empty())
                    })
                    .unwrap_or_else(|| "default".into());
                Some(ClusterSettings {
                    namespace,
                    lease: Duration::from_secs(bounded(
                        "OWNER_LEASE_SECS",
                        self.owner_lease_secs,
                        3600,
                    )?),
                    max_level: self.workload_max_level,
                    advertise_host: self.pod_ip.clone().filter(|h| !h.is_empty()),
                })
            } else {
                None
            },
            retention_timeout: Duration::from_secs(self.module_handover_timeout_secs),
            install_timeout: Duration::from_secs(bounded(
                "MODULE_INSTALL_TIMEOUT_SECS",
                self.module_install_timeout_secs,
                86_400,
            )?),
            orphan_grace: Duration::from_secs(self.module_orphan_grace_secs),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        T::try_parse_from(std::iter::once("x").chain(args.iter().copied())).map(|t| t.a)
    }

    #[test]
    fn mqtt_requires_a_broker() {
        let a = parse(&["--enable-mqtt-tunnel", "true"]).expect("parses");
        let e = a.validate().expect_err("no broker");
        assert_eq!(e.variable, "MQTT_BROKER");
    }

    #[test]
    fn no_tunnel_is_an_error_naming_the_variable() {
        let e = parse(&[])
            .expect("parses")
            .validate()
            .expect_err("no tunnel");
        assert!(e.to_string().contains("ENABLE_MQTT_TUNNEL"));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let Err(e) = parse(&["--mqtt-port", "notaport"]) else {
            panic!("bad port accepted")
        };
        assert!(e.to_string().contains("MQTT_PORT"), "{e}");
        let Err(e) = parse(&["--enable-http-tunnel", "maybe"]) else {
            panic!("bad bool accepted")
        };
        assert!(e.to_string().contains("ENABLE_HTTP_TUNNEL"), "{e}");
    }

    #[test]
    fn valid_config_resolves() {
        let a = parse(&[
            "--enable-mqtt-tunnel",
            "1",
            "--mqtt-broker",
            "tcp://b",
            "--env",
            "Prod",
            "--client-id",
            "c1",
            "--heartbeat-period-secs",
            "2",
            "--heartbeat-misses",
            "3",
        ])
        .expect("parses");
        let s = a.validate().expect("valid");
        assert_eq!(s.env, "prod");
        let m = s.mqtt.expect("mqtt");
        assert_eq!(m.host, "b");
        assert_eq!(m.client_id, "koupleless@@@c1");
        assert_eq!(s.liveness_timeout, Duration::from_secs(6));
    }
}
