//! Canonical types shared by every part of the controller: what a base is, what it reports,
//! and what the controller asks of it. Tunnels translate their wire formats to and from these.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Who a base says it is (`baseMetadata`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BaseMetadata {
    /// Identity; unique per base, often its IP.
    pub identity: String,
    /// Base application name (e.g. `base`); selects modules via node affinity.
    pub name: String,
    /// Base version.
    pub version: String,
    /// Cluster the base belongs to (peer deployments are per cluster).
    pub cluster_name: String,
}

/// Whether a base is alive or announced its shutdown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BaseLifecycle {
    /// Alive.
    Activated,
    /// Shutting down gracefully: drain now.
    Deactivated,
}

impl BaseLifecycle {
    /// Case-insensitive parse; anything but `deactivated` counts as alive, as in the reference.
    pub fn parse(s: &str) -> Self {
        if s.trim().eq_ignore_ascii_case("deactivated") {
            BaseLifecycle::Deactivated
        } else {
            BaseLifecycle::Activated
        }
    }
}

/// A heartbeat from a base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseHeartbeat {
    /// Who the base is.
    pub metadata: BaseMetadata,
    /// The base's IP (InternalIP of its VNode, podIP of its modules).
    pub local_ip: String,
    /// The base's host name.
    pub local_host_name: String,
    /// Arklet HTTP port (HTTP tunnel only).
    pub port: Option<u16>,
    /// Alive or shutting down.
    pub lifecycle: BaseLifecycle,
}

/// JVM health figures; `None` when the base did not report one, `-1` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseHealth {
    /// `java max metaspace`.
    pub max_metaspace: Option<i64>,
    /// `java committed metaspace`.
    pub committed_metaspace: Option<i64>,
    /// `java used metaspace`.
    pub used_metaspace: Option<i64>,
}

/// Lifecycle state of a module (biz) on a base.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BizState {
    /// Known to the base but not yet resolved.
    Unresolved,
    /// Resolved, not started.
    Resolved,
    /// Running and serving.
    Activated,
    /// Installed but not serving (e.g. replaced by a newer version).
    Deactivated,
    /// Install failed.
    Broken,
    /// Stopped.
    Stopped,
    /// A state this controller does not know.
    Unknown(String),
}

impl BizState {
    /// Case-insensitive parse of an Arklet state string.
    pub fn parse(s: &str) -> Self {
        match s.trim().to_ascii_uppercase().as_str() {
            "UNRESOLVED" => BizState::Unresolved,
            "RESOLVED" => BizState::Resolved,
            "ACTIVATED" => BizState::Activated,
            "DEACTIVATED" => BizState::Deactivated,
            "BROKEN" => BizState::Broken,
            "STOPPED" => BizState::Stopped,
            other => BizState::Unknown(other.to_string()),
        }
    }

    /// The Arklet spelling (uppercase), as used for container waiting reasons.
    pub fn as_upper(&self) -> &str {
        match self {
            BizState::Unresolved => "UNRESOLVED",
            BizState::Resolved => "RESOLVED",
            BizState::Activated => "ACTIVATED",
            BizState::Deactivated => "DEACTIVATED",
            BizState::Broken => "BROKEN",
            BizState::Stopped => "STOPPED",
            BizState::Unknown(s) => s.as_str(),
        }
    }
}

/// A module as the base reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleStatus {
    /// bizName.
    pub name: String,
    /// bizVersion.
    pub version: String,
    /// Current state.
    pub state: BizState,
    /// When the state last changed (epoch ms), if reported.
    pub change_time_ms: Option<i64>,
    /// Failure reason (e.g. `InstallBizFailed`), if any.
    pub reason: Option<String>,
    /// Human-readable message, if any.
    pub message: Option<String>,
}

impl ModuleStatus {
    /// Key of this module instance.
    pub fn key(&self) -> ModuleKey {
        ModuleKey::new(&self.name, &self.version)
    }
}

/// A module the controller wants on a base.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleSpec {
    /// bizName (the container name).
    pub name: String,
    /// bizVersion (the container's `BIZ_VERSION`).
    pub version: String,
    /// Package URL (the container image).
    pub url: String,
}

impl ModuleSpec {
    /// Key of this module instance.
    pub fn key(&self) -> ModuleKey {
        ModuleKey::new(&self.name, &self.version)
    }
}

/// Name + version: what identifies one installed module instance on a base.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ModuleKey {
    /// bizName.
    pub name: String,
    /// bizVersion.
    pub version: String,
}

impl ModuleKey {
    /// Builds a key.
    pub fn new(name: &str, version: &str) -> Self {
        ModuleKey {
            name: name.to_string(),
            version: version.to_string(),
        }
    }
}

impl fmt::Display for ModuleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Install or uninstall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OperationKind {
    /// installBiz.
    Install,
    /// uninstallBiz.
    Uninstall,
}

impl OperationKind {
    /// Parses the Arklet command name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "installBiz" => Some(OperationKind::Install),
            "uninstallBiz" => Some(OperationKind::Uninstall),
            _ => None,
        }
    }

    /// The Arklet command name.
    pub fn command(&self) -> &'static str {
        match self {
            OperationKind::Install => "installBiz",
            OperationKind::Uninstall => "uninstallBiz",
        }
    }
}

/// What a base answered to an install or uninstall.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done.
    Succeeded,
    /// Another command for the same module is still running on the base: this one was
    /// refused, the first goes on. Not a failure of the module.
    Busy,
    /// Install of a name and version the base already has (Arklet `REPEAT_BIZ`).
    AlreadyInstalled,
    /// Uninstall of a name and version the base does not have (Arklet `NOT_FOUND_BIZ`): the
    /// goal is reached.
    NotInstalled,
    /// The operation failed.
    Failed {
        /// The base's error code (e.g. `FAILED`, `InstallBizUserError`), if any.
        code: Option<String>,
        /// The real reason, as users need to read it.
        message: String,
    },
}

impl Outcome {
    /// Whether the base says the goal of the command is reached.
    pub fn reached(&self) -> bool {
        matches!(
            self,
            Outcome::Succeeded | Outcome::AlreadyInstalled | Outcome::NotInstalled
        )
    }
}

/// Outcome of an install/uninstall as the base reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperationResult {
    /// Which operation.
    pub kind: OperationKind,
    /// bizName.
    pub name: String,
    /// bizVersion.
    pub version: String,
    /// What happened.
    pub outcome: Outcome,
}

/// Something a base told the controller, already parsed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TunnelEvent {
    /// Periodic heartbeat (also the first sign of a new base).
    Heartbeat(BaseHeartbeat),
    /// The base (re)connected and asks which modules it should run.
    QueryBaseline(BaseMetadata),
    /// JVM health.
    Health(BaseHealth),
    /// Full list of modules on the base (replaces what was known).
    ModuleList(Vec<ModuleStatus>),
    /// Result of an install/uninstall.
    Operation(OperationResult),
    /// The tunnel cannot reach the base (HTTP tunnel: calls fail).
    Unreachable {
        /// Why.
        reason: String,
    },
    /// A command some controller replica sent the base (seen on the broker): the replica that
    /// takes the base over later knows it is in flight.
    CommandSeen(BaseCommand),
}

/// A [`TunnelEvent`] attributed to a base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseEvent {
    /// The base's identity.
    pub base_id: String,
    /// What happened.
    pub event: TunnelEvent,
}

/// Something the controller asks of a base.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BaseCommand {
    /// installBiz.
    Install(ModuleSpec),
    /// installBiz replacing the installed module of the same name and version from another
    /// package URL (`installStrategy: uninstallThenInstall`).
    Reinstall(ModuleSpec),
    /// uninstallBiz.
    Uninstall(ModuleKey),
    /// queryAllBiz: ask for the full module list.
    QueryAllModules,
    /// health: ask for JVM health.
    QueryHealth,
    /// baseline: the modules the base should run (answer to queryBaseline).
    Baseline(Vec<ModuleSpec>),
}

impl BaseCommand {
    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            BaseCommand::Install(_) => "install",
            BaseCommand::Reinstall(_) => "reinstall",
            BaseCommand::Uninstall(_) => "uninstall",
            BaseCommand::QueryAllModules => "query_all",
            BaseCommand::QueryHealth => "health",
            BaseCommand::Baseline(_) => "baseline",
        }
    }
}
