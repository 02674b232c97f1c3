//! The pure state machine of one base: the SOFAArk biz registry plus Arklet's per-biz command
//! lock. No I/O and no clock: every operation takes `now_ms`, and the transports decide how
//! long a module takes to start (they call [`Registry::begin_install`], wait, then
//! [`Registry::finish_install`]).
//!
//! Behaviour and the exact texts come from the real sources (koupleless/runtime at
//! `3edfa911`, 2025-05; sofastack/sofa-ark `v2.2.16`, the version that runtime pins):
//! - per-identity lock and the conflict text:
//!   `arklet-core/.../command/CommandServiceImpl.java` (`process`, sync branch) and
//!   `arklet-core/.../command/coordinate/BizOpsCommandCoordinator.java`;
//! - validation texts: `arklet-core/.../handler/InstallBizHandler.java` (`validateInput`) and
//!   `UninstallBizHandler.java` (`validate`);
//! - REPEAT_BIZ / NOT_FOUND_BIZ and their messages, and that a start failure is *thrown*
//!   (not returned): `sofa-ark/core/api/.../ArkClient.java` (`doInstallBiz`, `uninstallBiz`);
//! - states, reasons and records: `sofa-ark/core/spi/.../model/BizState.java`,
//!   `BizInfo.java` (`BizStateRecord`, `StateChangeReason`);
//! - RESOLVED on creation, activation rules, stop sequence:
//!   `sofa-ark/core-impl/container/.../BizFactoryServiceImpl.java` (`createBiz`),
//!   `.../model/BizModel.java` (`doStart`, `stop`);
//! - `uninstallThenInstall` uninstalls *every* version of the name first:
//!   `arklet-core/.../ops/strategy/UninstallThenInstallStrategy.java`; unknown strategy
//!   names fall back to install-only: `arklet-core/.../common/model/InstallRequest.java`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A biz identity: name and version (SOFAArk `BizIdentityUtils`: `name:version`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BizId {
    /// Biz name.
    pub name: String,
    /// Biz version.
    pub version: String,
}

impl BizId {
    /// Builds an identity.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> BizId {
        BizId {
            name: name.into(),
            version: version.into(),
        }
    }
}

impl fmt::Display for BizId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.version)
    }
}

/// SOFAArk `BizState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BizState {
    /// Not yet parsed (never reported by a live base; kept for completeness).
    Unresolved,
    /// Registered and starting.
    Resolved,
    /// Started and serving.
    Activated,
    /// Started but not serving (another version of the name is active).
    Deactivated,
    /// Start (or stop) failed.
    Broken,
    /// Stopped and unregistered.
    Stopped,
}

impl BizState {
    /// `BizState.getBizState()` / `toString()`: lowercase (`activated`).
    pub fn lower(self) -> &'static str {
        match self {
            BizState::Unresolved => "unresolved",
            BizState::Resolved => "resolved",
            BizState::Activated => "activated",
            BizState::Deactivated => "deactivated",
            BizState::Broken => "broken",
            BizState::Stopped => "stopped",
        }
    }

    /// `BizState.name()`: uppercase (`ACTIVATED`), what fastjson writes by default.
    pub fn upper(self) -> &'static str {
        match self {
            BizState::Unresolved => "UNRESOLVED",
            BizState::Resolved => "RESOLVED",
            BizState::Activated => "ACTIVATED",
            BizState::Deactivated => "DEACTIVATED",
            BizState::Broken => "BROKEN",
            BizState::Stopped => "STOPPED",
        }
    }
}

/// SOFAArk `BizInfo.StateChangeReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeReason {
    /// The biz was created (RESOLVED).
    Created,
    /// The biz started.
    Started,
    /// The start failed.
    InstallFailed,
    /// The stop failed.
    UninstallFailed,
    /// Switched between ACTIVATED and DEACTIVATED.
    Switched,
    /// Being stopped.
    Killing,
    /// Stopped.
    Stopped,
    /// Default.
    Undefine,
}

impl ChangeReason {
    /// Enum constant name (`INSTALL_FAILED`), what fastjson writes by default.
    pub fn name(self) -> &'static str {
        match self {
            ChangeReason::Created => "CREATED",
            ChangeReason::Started => "STARTED",
            ChangeReason::InstallFailed => "INSTALL_FAILED",
            ChangeReason::UninstallFailed => "UN_INSTALL_FAILED",
            ChangeReason::Switched => "SWITCHED",
            ChangeReason::Killing => "KILLING",
            ChangeReason::Stopped => "STOPPED",
            ChangeReason::Undefine => "UNDEFINE",
        }
    }

    /// `toString()` (`Install Failed`), what the HTTP tunnel writes (WriteEnumUsingToString).
    pub fn display(self) -> &'static str {
        match self {
            ChangeReason::Created => "Created",
            ChangeReason::Started => "Started",
            ChangeReason::InstallFailed => "Install Failed",
            ChangeReason::UninstallFailed => "Uninstall Failed",
            ChangeReason::Switched => "Switched",
            ChangeReason::Killing => "Killing",
            ChangeReason::Stopped => "Stopped",
            ChangeReason::Undefine => "Undefine",
        }
    }
}

/// One SOFAArk `BizStateRecord`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateRecord {
    /// `changeTime` (epoch millis; fastjson writes a `Date` as a number).
    pub change_time_ms: u64,
    /// State entered.
    pub state: BizState,
    /// Why.
    pub reason: ChangeReason,
    /// Free text; the stack trace on INSTALL_FAILED.
    pub message: String,
}

/// A module as the base knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Biz {
    /// Biz name.
    pub name: String,
    /// Biz version.
    pub version: String,
    /// Current state.
    pub state: BizState,
    /// The package URL it was installed from.
    pub url: String,
    /// Reason of the latest state record.
    pub reason: Option<ChangeReason>,
    /// Message of the latest state record.
    pub message: Option<String>,
    /// Every state record, oldest first.
    pub records: Vec<StateRecord>,
}

impl Biz {
    /// This biz's identity.
    pub fn id(&self) -> BizId {
        BizId::new(&self.name, &self.version)
    }

    /// The latest state record.
    pub fn latest(&self) -> Option<&StateRecord> {
        self.records.last()
    }

    fn set_state(&mut self, state: BizState, reason: ChangeReason, message: &str, now_ms: u64) {
        self.state = state;
        self.reason = Some(reason);
        self.message = Some(message.to_string());
        self.records.push(StateRecord {
            change_time_ms: now_ms,
            state,
            reason,
            message: message.to_string(),
        });
    }
}

/// The set of ACTIVATED modules after a change of that set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSnapshot {
    /// When (epoch millis).
    pub at_ms: u64,
    /// ACTIVATED identities, sorted.
    pub active: Vec<BizId>,
}

/// What happens when a second version of an already ACTIVATED name finishes starting
/// (`BizModel.doStart`, cases 1-3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MultiVersionPolicy {
    /// `-Dactivate.new.module=true`: the old one becomes DEACTIVATED (SWITCHED), the new one
    /// ACTIVATED. The rule protocol.md assumes ("a newer version took over").
    #[default]
    ActivateNew,
    /// SOFAArk's default (no property set): the new one comes up DEACTIVATED
    /// ("start but is deactivated") and the old one stays ACTIVATED.
    KeepOld,
    /// `sofa.ark.activate.multi.biz.version.enable=true`: both ACTIVATED.
    ActivateAll,
}

/// The Arklet biz-operation commands (`BuiltinCommand` ids) that take the per-biz lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// `installBiz`.
    Install,
    /// `uninstallBiz`.
    Uninstall,
    /// `batchInstallBiz` (the MQTT baseline playback).
    BatchInstall,
}

impl OpKind {
    /// The command id as Arklet spells it.
    pub fn id(self) -> &'static str {
        match self {
            OpKind::Install => "installBiz",
            OpKind::Uninstall => "uninstallBiz",
            OpKind::BatchInstall => "batchInstallBiz",
        }
    }
}

/// A Java exception as Arklet reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thrown {
    /// `Throwable.getMessage()` of the exception the tunnel caught (None = Java null).
    pub message: Option<String>,
    /// `ExceptionUtils.getStackTraceAsString` of it (abbreviated, frames illustrative).
    pub stack: String,
    /// `getMessage()` of the exception `ArkClient` threw, before Arklet's handler wrapped it
    /// (the batch path reports this one: "internal exception: <it>").
    pub inner_message: Option<String>,
}

/// The result of one install or uninstall, in Arklet terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// `ArkClient` returned SUCCESS.
    Success {
        /// `ClientResponse.message`.
        message: String,
        /// The biz after the operation (for `bizInfos`), None for uninstall.
        biz: Option<Biz>,
    },
    /// `ArkClient` returned another code (REPEAT_BIZ, NOT_FOUND_BIZ, a scripted code):
    /// Arklet answers `Output.ofFailed(data, "install biz not success!")`.
    NotSuccess {
        /// `ClientResponse.code`.
        data_code: String,
        /// `ClientResponse.message`.
        data_message: String,
    },
    /// Rejected by the per-biz lock: `Output.ofFailed(message)`, data null.
    Conflict {
        /// The full conflict text.
        message: String,
    },
    /// An exception escaped the handler (start failure, validation, illegal state).
    Thrown(Thrown),
}

/// An install request as Arklet's `InstallBizHandler.Input` holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InstallReq {
    /// `bizName` (None or "" = blank).
    pub name: Option<String>,
    /// `bizVersion`.
    pub version: Option<String>,
    /// `bizUrl`.
    pub url: Option<String>,
    /// `installStrategy` (`installOnly` default, `uninstallThenInstall`).
    pub strategy: Option<String>,
}

/// A scripted install failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `data.code`. `"FAILED"` models the real thing: the module's start throws, the biz goes
    /// BROKEN, and the tunnel reports the exception. Any other code models `ArkClient`
    /// *returning* that code (as it does for REPEAT_BIZ): nothing is registered.
    pub data_code: String,
    /// For `"FAILED"`: the root cause's `toString()`, used verbatim in the `Caused by:` line
    /// (e.g. `java.lang.IllegalStateException: port 8080 in use`). Otherwise `data.message`.
    pub message: String,
}

/// The start of an operation that takes time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// Finished at once (rejected, REPEAT/NOT_FOUND, validation).
    Done(OpOutcome),
    /// Running: the caller waits, then calls the matching `finish_*`.
    Started(BizId),
}

/// The biz registry of one base.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    bizs: BTreeMap<BizId, Biz>,
    /// Lock key (`name:version`, Java `null` spelled "null") → command holding it.
    locks: HashMap<String, OpKind>,
    /// Start time of each running install (for the "cost: N ms" text).
    started: HashMap<BizId, u64>,
    failures: Vec<(String, Option<String>, Failure)>,
    history: Vec<ActiveSnapshot>,
    /// Multi-version activation rule.
    pub policy: MultiVersionPolicy,
    /// Keep a module whose start failed, BROKEN (`sofa.ark.auto.uninstall.when.failed.enable
    /// =false`). false = SOFAArk's default: stop and unregister it at once.
    pub keep_failed: bool,
}

fn blank(s: &Option<String>) -> bool {
    s.as_deref().is_none_or(str::is_empty)
}

fn lock_key(name: Option<&str>, version: Option<&str>) -> String {
    format!("{}:{}", name.unwrap_or("null"), version.unwrap_or("null"))
}

/// `CommandServiceImpl.process`: `"FAILED:" + String.format("%s %s conflict, exist
/// unfinished command(%s) for this biz", identity, incoming, running)`.
pub fn conflict_message(key: &str, incoming: OpKind, running: OpKind) -> String {
    format!(
        "FAILED:{key} {} conflict, exist unfinished command({}) for this biz",
        incoming.id(),
        running.id()
    )
}

const VALIDATION_EXCEPTION: &str =
    "com.alipay.sofa.koupleless.arklet.core.common.exception.CommandValidationException";
const ARKLET_RUNTIME_EXCEPTION: &str =
    "com.alipay.sofa.koupleless.arklet.core.common.exception.ArkletRuntimeException";
const ITE: &str = "java.lang.reflect.InvocationTargetException";
const STOP_STATE_ASSERT: &str =
    "java.lang.IllegalArgumentException: BizState must be ACTIVATED, DEACTIVATED or BROKEN.";

/// A `CommandValidationException` thrown by a handler's `validate`.
pub fn validation_failure(message: &str, handler: &str) -> Thrown {
    Thrown {
        message: Some(message.to_string()),
        inner_message: Some(message.to_string()),
        stack: format!(
            "{VALIDATION_EXCEPTION}: {message}\n\
             \tat com.alipay.sofa.koupleless.arklet.core.command.meta.AbstractCommandHandler.notBlank(AbstractCommandHandler.java:106)\n\
             \tat com.alipay.sofa.koupleless.arklet.core.command.builtin.handler.{handler}.validate({handler}.java:85)\n\
             \tat com.alipay.sofa.koupleless.arklet.core.command.CommandServiceImpl.process(CommandServiceImpl.java:109)\n"
        ),
    }
}

/// The stack a failed module start leaves in its BROKEN state record:
/// `getStackTraceAsString(e)` of the `InvocationTargetException` from `MainMethodRunner`.
pub fn start_failure_record(root: &str) -> String {
    format!(
        "{ITE}\n\
         \tat java.base/jdk.internal.reflect.DirectMethodHandleAccessor.invoke(DirectMethodHandleAccessor.java:118)\n\
         \tat java.base/java.lang.reflect.Method.invoke(Method.java:580)\n\
         \tat com.alipay.sofa.ark.bootstrap.MainMethodRunner.run(MainMethodRunner.java:68)\n\
         \tat com.alipay.sofa.ark.container.model.BizModel.doStart(BizModel.java:364)\n\
         \tat com.alipay.sofa.ark.container.model.BizModel.start(BizModel.java:337)\n\
         \tat com.alipay.sofa.ark.api.ArkClient.doInstallBiz(ArkClient.java:195)\n\
         Caused by: {root}\n\
         \tat org.springframework.boot.SpringApplication.run(SpringApplication.java:335)\n\
         \t... 12 more\n"
    )
}

/// What the tunnel catches when a module start fails: `InstallBizHandler.handle` wraps the
/// `InvocationTargetException` in an `ArkletRuntimeException(cause)`, whose message is the
/// cause's `toString()`.
pub fn start_failure(root: &str) -> Thrown {
    Thrown {
        message: Some(ITE.to_string()),
        inner_message: None,
        stack: format!(
            "{ARKLET_RUNTIME_EXCEPTION}: {ITE}\n\
             \tat com.alipay.sofa.koupleless.arklet.core.command.builtin.handler.InstallBizHandler.handle(InstallBizHandler.java:78)\n\
             \tat com.alipay.sofa.koupleless.arklet.core.command.CommandServiceImpl.process(CommandServiceImpl.java:152)\n\
             Caused by: {}",
            start_failure_record(root)
        ),
    }
}

/// An `IllegalArgumentException` from `BizModel.stop()` on a biz that is still RESOLVED,
/// wrapped by the handler (`ArkletRuntimeException(cause)`).
fn stop_while_resolved(handler: &str) -> Thrown {
    Thrown {
        message: Some(STOP_STATE_ASSERT.to_string()),
        inner_message: Some("BizState must be ACTIVATED, DEACTIVATED or BROKEN.".to_string()),
        stack: format!(
            "{ARKLET_RUNTIME_EXCEPTION}: {STOP_STATE_ASSERT}\n\
             \tat com.alipay.sofa.koupleless.arklet.core.command.builtin.handler.{handler}.handle({handler}.java:78)\n\
             Caused by: {STOP_STATE_ASSERT}\n\
             \tat com.alipay.sofa.ark.common.util.AssertUtils.isTrue(AssertUtils.java:42)\n\
             \tat com.alipay.sofa.ark.container.model.BizModel.stop(BizModel.java:423)\n"
        ),
    }
}

/// `HH:mm:ss,SSS` of an epoch-millis instant, UTC (ArkClient uses the JVM's zone).
fn clock_text(ms: u64) -> String {
    let day = ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02},{:03}",
        day / 3_600_000,
        day / 60_000 % 60,
        day / 1000 % 60,
        day % 1000
    )
}

impl Registry {
    /// An empty registry with the given rules.
    pub fn new(policy: MultiVersionPolicy, keep_failed: bool) -> Registry {
        Registry {
            policy,
            keep_failed,
            ..Registry::default()
        }
    }

    /// Every registered biz, sorted by identity (SOFAArk's order is a hash order; a client
    /// must not depend on it).
    pub fn bizs(&self) -> Vec<Biz> {
        self.bizs.values().cloned().collect()
    }

    /// One biz.
    pub fn get(&self, id: &BizId) -> Option<&Biz> {
        self.bizs.get(id)
    }

    /// ACTIVATED identities, sorted.
    pub fn active(&self) -> Vec<BizId> {
        self.bizs
            .values()
            .filter(|b| b.state == BizState::Activated)
            .map(Biz::id)
            .collect()
    }

    /// One snapshot per change of the active set.
    pub fn history(&self) -> &[ActiveSnapshot] {
        &self.history
    }

    /// Whether a command holds the lock of this identity.
    pub fn is_locked(&self, id: &BizId) -> bool {
        self.locks
            .contains_key(&lock_key(Some(&id.name), Some(&id.version)))
    }

    /// Scripts a failure for every version of `name` (`version` None) or one version.
    pub fn add_failure(&mut self, name: &str, version: Option<&str>, failure: Failure) {
        self.failures
            .retain(|(n, v, _)| !(n == name && v.as_deref() == version));
        self.failures
            .push((name.to_string(), version.map(str::to_string), failure));
    }

    /// Removes every scripted failure.
    pub fn clear_failures(&mut self) {
        self.failures.clear();
    }

    fn failure_for(&self, id: &BizId) -> Option<Failure> {
        let exact = self
            .failures
            .iter()
            .find(|(n, v, _)| *n == id.name && v.as_deref() == Some(id.version.as_str()));
        let any = || {
            self.failures
                .iter()
                .find(|(n, v, _)| *n == id.name && v.is_none())
        };
        exact.or_else(any).map(|(_, _, f)| f.clone())
    }

    fn note_active(&mut self, now_ms: u64) {
        let active = self.active();
        let last = self.history.last().map(|s| &s.active[..]).unwrap_or(&[]);
        if active != last {
            self.history.push(ActiveSnapshot {
                at_ms: now_ms,
                active,
            });
        }
    }

    /// Takes the lock for a command, or returns the conflict text.
    fn lock(&mut self, key: String, kind: OpKind) -> Result<(), String> {
        if let Some(running) = self.locks.get(&key) {
            return Err(conflict_message(&key, kind, *running));
        }
        self.locks.insert(key, kind);
        Ok(())
    }

    fn unlock_id(&mut self, id: &BizId) {
        self.locks
            .remove(&lock_key(Some(&id.name), Some(&id.version)));
    }

    /// `BizModel.stop()` for a biz that may be stopped: DEACTIVATED(KILLING) if it was
    /// ACTIVATED, then STOPPED and unregistered.
    fn stop_and_remove(&mut self, id: &BizId, now_ms: u64) {
        if let Some(mut biz) = self.bizs.remove(id) {
            if biz.state == BizState::Activated {
                biz.set_state(BizState::Deactivated, ChangeReason::Killing, "", now_ms);
            }
            biz.set_state(BizState::Stopped, ChangeReason::Stopped, "", now_ms);
        }
    }

    /// Starts an install. `locked` = go through `CommandServiceImpl` (the per-biz lock); the
    /// batch path (baseline) calls the operation service directly and takes no such lock.
    pub fn begin_install(&mut self, req: &InstallReq, now_ms: u64, locked: bool) -> Begin {
        // InstallBizHandler.validateInput, run before the lock is taken.
        if blank(&req.url) {
            return Begin::Done(OpOutcome::Thrown(validation_failure(
                "bizUrl should not be blank",
                "InstallBizHandler",
            )));
        }
        let (name, version) = match (&req.name, &req.version) {
            (Some(n), Some(v)) if !n.is_empty() && !v.is_empty() => (n.clone(), v.clone()),
            _ if blank(&req.name) && blank(&req.version) => {
                // The real handler downloads the jar to read its name; the double has no jar.
                return Begin::Done(OpOutcome::Thrown(validation_failure(
                    "refresh biz info from jar failed: the test double cannot read biz jars",
                    "InstallBizHandler",
                )));
            }
            _ => {
                return Begin::Done(OpOutcome::Thrown(validation_failure(
                    "bizName and bizVersion should be both blank or both not blank.",
                    "InstallBizHandler",
                )));
            }
        };
        let id = BizId::new(name, version);
        if locked
            && let Err(message) =
                self.lock(lock_key(Some(&id.name), Some(&id.version)), OpKind::Install)
        {
            return Begin::Done(OpOutcome::Conflict { message });
        }
        let release = |reg: &mut Registry, outcome: OpOutcome| {
            if locked {
                reg.unlock_id(&id);
            }
            Begin::Done(outcome)
        };
        if req.strategy.as_deref() == Some("uninstallThenInstall") {
            let same_name: Vec<BizId> = self
                .bizs
                .keys()
                .filter(|k| k.name == id.name)
                .cloned()
                .collect();
            if same_name
                .iter()
                .any(|k| self.bizs[k].state == BizState::Resolved)
            {
                return release(
                    self,
                    OpOutcome::Thrown(stop_while_resolved("InstallBizHandler")),
                );
            }
            for k in same_name {
                self.stop_and_remove(&k, now_ms);
            }
            self.note_active(now_ms);
        }
        if self.bizs.contains_key(&id) {
            let data_message = format!("Biz: {id} has been installed or registered.");
            return release(
                self,
                OpOutcome::NotSuccess {
                    data_code: "REPEAT_BIZ".to_string(),
                    data_message,
                },
            );
        }
        if let Some(f) = self.failure_for(&id).filter(|f| f.data_code != "FAILED") {
            return release(
                self,
                OpOutcome::NotSuccess {
                    data_code: f.data_code,
                    data_message: f.message,
                },
            );
        }
        let mut biz = Biz {
            name: id.name.clone(),
            version: id.version.clone(),
            state: BizState::Resolved,
            url: req.url.clone().unwrap_or_default(),
            reason: None,
            message: None,
            records: Vec::new(),
        };
        biz.set_state(BizState::Resolved, ChangeReason::Created, "", now_ms);
        self.bizs.insert(id.clone(), biz);
        self.started.insert(id.clone(), now_ms);
        Begin::Started(id)
    }

    /// Ends the start of a module begun with [`Registry::begin_install`].
    pub fn finish_install(&mut self, id: &BizId, now_ms: u64, locked: bool) -> OpOutcome {
        let started = self.started.remove(id).unwrap_or(now_ms);
        if locked {
            self.unlock_id(id);
        }
        if self
            .bizs
            .get(id)
            .is_none_or(|b| b.state != BizState::Resolved)
        {
            // Only a restart that dropped the module gets here; report what a dead JVM would
            // if it could: nothing sensible, so a thrown "not found".
            return OpOutcome::Thrown(Thrown {
                message: Some(format!("biz {id} vanished while starting")),
                inner_message: None,
                stack: String::new(),
            });
        }
        if let Some(f) = self.failure_for(id).filter(|f| f.data_code == "FAILED") {
            let record = start_failure_record(&f.message);
            if let Some(biz) = self.bizs.get_mut(id) {
                biz.set_state(
                    BizState::Broken,
                    ChangeReason::InstallFailed,
                    &record,
                    now_ms,
                );
            }
            if !self.keep_failed {
                // ArkClient.doInstallBiz: autoUninstall (default true) → biz.stop().
                self.stop_and_remove(id, now_ms);
            }
            self.note_active(now_ms);
            return OpOutcome::Thrown(start_failure(&f.message));
        }
        let current = self
            .bizs
            .values()
            .find(|b| b.name == id.name && b.state == BizState::Activated && b.id() != *id)
            .map(Biz::id);
        match (current, self.policy) {
            (None, _) | (Some(_), MultiVersionPolicy::ActivateAll) => {
                self.set(id, BizState::Activated, ChangeReason::Started, "", now_ms);
            }
            (Some(old), MultiVersionPolicy::ActivateNew) => {
                let to_new = format!("switch to new biz {id}");
                self.set(
                    &old,
                    BizState::Deactivated,
                    ChangeReason::Switched,
                    &to_new,
                    now_ms,
                );
                let from_old = format!("switch from old biz: {old}");
                self.set(
                    id,
                    BizState::Activated,
                    ChangeReason::Started,
                    &from_old,
                    now_ms,
                );
            }
            (Some(_), MultiVersionPolicy::KeepOld) => {
                let text = "start but is deactivated";
                self.set(
                    id,
                    BizState::Deactivated,
                    ChangeReason::Started,
                    text,
                    now_ms,
                );
            }
        }
        self.note_active(now_ms);
        let message = format!(
            "Install Biz: {id} success, cost: {} ms, started at: {}",
            now_ms.saturating_sub(started),
            clock_text(started)
        );
        OpOutcome::Success {
            message,
            biz: self.bizs.get(id).cloned(),
        }
    }

    fn set(&mut self, id: &BizId, state: BizState, reason: ChangeReason, msg: &str, now: u64) {
        if let Some(b) = self.bizs.get_mut(id) {
            b.set_state(state, reason, msg, now);
        }
    }

    /// Starts an uninstall (`UninstallBizHandler` → `ArkClient.uninstallBiz`). While it runs
    /// (the caller's wait models the biz's stop handlers) an ACTIVATED biz shows DEACTIVATED.
    pub fn begin_uninstall(
        &mut self,
        name: Option<&str>,
        version: Option<&str>,
        now_ms: u64,
    ) -> Begin {
        let name = name.filter(|s| !s.is_empty());
        let version = version.filter(|s| !s.is_empty());
        let (Some(name), Some(version)) = (name, version) else {
            let text = if name.is_none() {
                "bizName should not be blank"
            } else {
                "bizVersion should not be blank"
            };
            return Begin::Done(OpOutcome::Thrown(validation_failure(
                text,
                "UninstallBizHandler",
            )));
        };
        let id = BizId::new(name, version);
        if let Err(message) = self.lock(lock_key(Some(name), Some(version)), OpKind::Uninstall) {
            return Begin::Done(OpOutcome::Conflict { message });
        }
        let outcome = match self.bizs.get(&id).map(|b| b.state) {
            None => OpOutcome::NotSuccess {
                data_code: "NOT_FOUND_BIZ".to_string(),
                data_message: format!("Uninstall biz: {id} not found."),
            },
            Some(BizState::Resolved) => {
                OpOutcome::Thrown(stop_while_resolved("UninstallBizHandler"))
            }
            Some(BizState::Activated) => {
                self.set(
                    &id,
                    BizState::Deactivated,
                    ChangeReason::Killing,
                    "",
                    now_ms,
                );
                self.note_active(now_ms);
                return Begin::Started(id);
            }
            Some(_) => return Begin::Started(id),
        };
        self.unlock_id(&id);
        Begin::Done(outcome)
    }

    /// Ends an uninstall begun with [`Registry::begin_uninstall`].
    pub fn finish_uninstall(&mut self, id: &BizId, now_ms: u64) -> OpOutcome {
        self.unlock_id(id);
        if let Some(mut biz) = self.bizs.remove(id) {
            biz.set_state(BizState::Stopped, ChangeReason::Stopped, "", now_ms);
        }
        self.note_active(now_ms);
        OpOutcome::Success {
            message: format!("Uninstall biz: {id} success."),
            biz: None,
        }
    }

    /// Takes the batch lock (`batchInstallBiz` has no biz name: its key is `null:null`).
    pub fn begin_batch(&mut self) -> Result<(), String> {
        self.lock(lock_key(None, None), OpKind::BatchInstall)
    }

    /// Releases the batch lock.
    pub fn end_batch(&mut self) {
        self.locks.remove(&lock_key(None, None));
    }

    /// A new JVM: no modules, no locks. Scripted failures survive (they belong to the test).
    pub fn reset(&mut self, now_ms: u64) {
        self.bizs.clear();
        self.locks.clear();
        self.started.clear();
        self.note_active(now_ms);
    }

    /// The tunnel restarts but modules stay (a test convenience, not a real event): locks
    /// are released and modules whose start was cut short are dropped.
    pub fn drop_unfinished(&mut self, now_ms: u64) {
        self.locks.clear();
        self.started.clear();
        self.bizs.retain(|_, b| b.state != BizState::Resolved);
        self.note_active(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, version: &str, url: &str) -> InstallReq {
        InstallReq {
            name: Some(name.into()),
            version: Some(version.into()),
            url: Some(url.into()),
            strategy: None,
        }
    }

    fn install(reg: &mut Registry, r: &InstallReq, now: u64) -> OpOutcome {
        match reg.begin_install(r, now, true) {
            Begin::Done(o) => o,
            Begin::Started(id) => reg.finish_install(&id, now + 5, true),
        }
    }

    fn uninstall(reg: &mut Registry, name: &str, version: &str, now: u64) -> OpOutcome {
        match reg.begin_uninstall(Some(name), Some(version), now) {
            Begin::Done(o) => o,
            Begin::Started(id) => reg.finish_uninstall(&id, now + 1),
        }
    }

    #[test]
    fn install_goes_resolved_then_activated() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        let Begin::Started(id) = reg.begin_install(&req("a", "1", "file:///a1.jar"), 100, true)
        else {
            panic!("should start")
        };
        assert_eq!(reg.get(&id).map(|b| b.state), Some(BizState::Resolved));
        assert!(reg.active().is_empty());
        let out = reg.finish_install(&id, 1100, true);
        let OpOutcome::Success { message, biz } = out else {
            panic!("should succeed: {out:?}")
        };
        assert!(message.starts_with("Install Biz: a:1 success, cost: 1000 ms, started at: "));
        let biz = biz.expect("biz info");
        assert_eq!(biz.state, BizState::Activated);
        assert_eq!(biz.url, "file:///a1.jar");
        let states: Vec<_> = biz.records.iter().map(|r| (r.state, r.reason)).collect();
        assert_eq!(
            states,
            vec![
                (BizState::Resolved, ChangeReason::Created),
                (BizState::Activated, ChangeReason::Started)
            ]
        );
        assert_eq!(reg.history().len(), 1);
        assert_eq!(reg.history()[0].active, vec![BizId::new("a", "1")]);
        assert!(!reg.is_locked(&id));
    }

    #[test]
    fn second_command_for_a_running_identity_conflicts() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        let r = req("a", "1", "file:///a.jar");
        let Begin::Started(id) = reg.begin_install(&r, 0, true) else {
            panic!()
        };
        assert_eq!(
            reg.begin_install(&r, 1, true),
            Begin::Done(OpOutcome::Conflict {
                message: "FAILED:a:1 installBiz conflict, exist unfinished command(installBiz) for this biz".into()
            })
        );
        assert_eq!(
            reg.begin_uninstall(Some("a"), Some("1"), 1),
            Begin::Done(OpOutcome::Conflict {
                message: "FAILED:a:1 uninstallBiz conflict, exist unfinished command(installBiz) for this biz".into()
            })
        );
        // Another identity is not blocked.
        assert!(matches!(
            reg.begin_install(&req("a", "2", "file:///a2.jar"), 1, true),
            Begin::Started(_)
        ));
        reg.finish_install(&id, 2, true);
        assert!(!reg.is_locked(&id));
    }

    #[test]
    fn repeat_biz_and_not_found_biz() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        let r = req("a", "1", "file:///a.jar");
        assert!(matches!(
            install(&mut reg, &r, 0),
            OpOutcome::Success { .. }
        ));
        assert_eq!(
            install(&mut reg, &r, 10),
            OpOutcome::NotSuccess {
                data_code: "REPEAT_BIZ".into(),
                data_message: "Biz: a:1 has been installed or registered.".into()
            }
        );
        assert_eq!(
            uninstall(&mut reg, "b", "1", 20),
            OpOutcome::NotSuccess {
                data_code: "NOT_FOUND_BIZ".into(),
                data_message: "Uninstall biz: b:1 not found.".into()
            }
        );
        assert_eq!(
            uninstall(&mut reg, "a", "1", 30),
            OpOutcome::Success {
                message: "Uninstall biz: a:1 success.".into(),
                biz: None
            }
        );
        assert!(reg.bizs().is_empty());
        assert_eq!(reg.history().len(), 2);
        assert!(reg.history()[1].active.is_empty());
    }

    #[test]
    fn uninstall_then_install_replaces_every_version_of_the_name() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        install(&mut reg, &req("a", "1", "file:///old.jar"), 0);
        install(&mut reg, &req("a", "2", "file:///a2.jar"), 10);
        let mut r = req("a", "1", "file:///new.jar");
        r.strategy = Some("uninstallThenInstall".into());
        assert!(matches!(
            install(&mut reg, &r, 20),
            OpOutcome::Success { .. }
        ));
        let bizs = reg.bizs();
        assert_eq!(bizs.len(), 1, "{bizs:?}");
        assert_eq!(bizs[0].url, "file:///new.jar");
        assert_eq!(bizs[0].state, BizState::Activated);
        // An unknown strategy is installOnly.
        r.strategy = Some("whatever".into());
        assert!(matches!(
            install(&mut reg, &r, 30),
            OpOutcome::NotSuccess { ref data_code, .. } if data_code == "REPEAT_BIZ"
        ));
    }

    #[test]
    fn activation_policies() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        install(&mut reg, &req("a", "1", "u1"), 0);
        install(&mut reg, &req("a", "2", "u2"), 10);
        let s: Vec<_> = reg.bizs().iter().map(|b| b.state).collect();
        assert_eq!(s, vec![BizState::Deactivated, BizState::Activated]);
        let old = &reg.bizs()[0];
        assert_eq!(old.reason, Some(ChangeReason::Switched));
        assert_eq!(old.message.as_deref(), Some("switch to new biz a:2"));

        let mut reg = Registry::new(MultiVersionPolicy::KeepOld, true);
        install(&mut reg, &req("a", "1", "u1"), 0);
        install(&mut reg, &req("a", "2", "u2"), 10);
        let s: Vec<_> = reg.bizs().iter().map(|b| b.state).collect();
        assert_eq!(s, vec![BizState::Activated, BizState::Deactivated]);
        assert_eq!(
            reg.bizs()[1].message.as_deref(),
            Some("start but is deactivated")
        );

        let mut reg = Registry::new(MultiVersionPolicy::ActivateAll, true);
        install(&mut reg, &req("a", "1", "u1"), 0);
        install(&mut reg, &req("a", "2", "u2"), 10);
        assert_eq!(reg.active().len(), 2);
    }

    #[test]
    fn scripted_start_failure_leaves_a_broken_biz_with_the_reason() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        reg.add_failure(
            "a",
            None,
            Failure {
                data_code: "FAILED".into(),
                message: "java.lang.IllegalStateException: port 8080 in use".into(),
            },
        );
        let out = install(&mut reg, &req("a", "1", "u"), 0);
        let OpOutcome::Thrown(t) = out else {
            panic!("{out:?}")
        };
        assert_eq!(
            t.message.as_deref(),
            Some("java.lang.reflect.InvocationTargetException")
        );
        assert!(
            t.stack
                .contains("Caused by: java.lang.IllegalStateException: port 8080 in use")
        );
        let biz = &reg.bizs()[0];
        assert_eq!(biz.state, BizState::Broken);
        assert_eq!(biz.reason, Some(ChangeReason::InstallFailed));
        assert!(
            biz.message
                .as_deref()
                .is_some_and(|m| m.contains("port 8080 in use"))
        );
        assert!(!reg.is_locked(&biz.id()));
        // A retry of a kept BROKEN biz is a REPEAT_BIZ, as in SOFAArk.
        assert!(matches!(
            install(&mut reg, &req("a", "1", "u"), 10),
            OpOutcome::NotSuccess { ref data_code, .. } if data_code == "REPEAT_BIZ"
        ));
    }

    #[test]
    fn failed_biz_is_removed_when_auto_uninstall_is_on() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, false);
        reg.add_failure(
            "a",
            Some("1"),
            Failure {
                data_code: "FAILED".into(),
                message: "boom".into(),
            },
        );
        assert!(matches!(
            install(&mut reg, &req("a", "1", "u"), 0),
            OpOutcome::Thrown(_)
        ));
        assert!(reg.bizs().is_empty());
        // Version-specific: another version installs.
        assert!(matches!(
            install(&mut reg, &req("a", "2", "u"), 0),
            OpOutcome::Success { .. }
        ));
        reg.clear_failures();
        assert!(matches!(
            install(&mut reg, &req("a", "1", "u"), 0),
            OpOutcome::Success { .. }
        ));
    }

    #[test]
    fn returned_failure_codes_register_nothing() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        reg.add_failure(
            "a",
            None,
            Failure {
                data_code: "ILLEGAL_STATE_BIZ".into(),
                message: "nope".into(),
            },
        );
        assert_eq!(
            install(&mut reg, &req("a", "1", "u"), 0),
            OpOutcome::NotSuccess {
                data_code: "ILLEGAL_STATE_BIZ".into(),
                data_message: "nope".into()
            }
        );
        assert!(reg.bizs().is_empty());
        assert!(!reg.is_locked(&BizId::new("a", "1")));
    }

    #[test]
    fn validation_comes_before_the_lock() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        let mut r = req("a", "1", "");
        let Begin::Done(OpOutcome::Thrown(t)) = reg.begin_install(&r, 0, true) else {
            panic!()
        };
        assert_eq!(t.message.as_deref(), Some("bizUrl should not be blank"));
        r.url = Some("u".into());
        r.version = None;
        let Begin::Done(OpOutcome::Thrown(t)) = reg.begin_install(&r, 0, true) else {
            panic!()
        };
        assert_eq!(
            t.message.as_deref(),
            Some("bizName and bizVersion should be both blank or both not blank.")
        );
        let Begin::Done(OpOutcome::Thrown(t)) = reg.begin_uninstall(Some("a"), None, 0) else {
            panic!()
        };
        assert_eq!(t.message.as_deref(), Some("bizVersion should not be blank"));
        assert!(reg.locks.is_empty());
    }

    #[test]
    fn uninstall_shows_deactivated_while_it_runs() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        install(&mut reg, &req("a", "1", "u"), 0);
        let Begin::Started(id) = reg.begin_uninstall(Some("a"), Some("1"), 10) else {
            panic!()
        };
        assert_eq!(reg.get(&id).map(|b| b.state), Some(BizState::Deactivated));
        assert!(reg.active().is_empty());
        reg.finish_uninstall(&id, 20);
        assert!(reg.get(&id).is_none());
    }

    #[test]
    fn uninstalling_a_starting_biz_of_another_command_path_throws() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        // The batch path takes no per-biz lock, so an uninstall can meet a RESOLVED biz.
        let Begin::Started(_) = reg.begin_install(&req("a", "1", "u"), 0, false) else {
            panic!()
        };
        let Begin::Done(OpOutcome::Thrown(t)) = reg.begin_uninstall(Some("a"), Some("1"), 1) else {
            panic!()
        };
        assert!(t.message.unwrap_or_default().contains("BizState must be"));
    }

    #[test]
    fn batch_lock_conflicts_with_a_second_batch() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        reg.begin_batch().expect("first batch");
        assert_eq!(
            reg.begin_batch(),
            Err("FAILED:null:null batchInstallBiz conflict, exist unfinished command(batchInstallBiz) for this biz".into())
        );
        reg.end_batch();
        assert!(reg.begin_batch().is_ok());
    }

    #[test]
    fn reset_and_drop_unfinished() {
        let mut reg = Registry::new(MultiVersionPolicy::ActivateNew, true);
        install(&mut reg, &req("a", "1", "u"), 0);
        let Begin::Started(_) = reg.begin_install(&req("b", "1", "u"), 0, true) else {
            panic!()
        };
        reg.drop_unfinished(5);
        assert_eq!(reg.bizs().len(), 1);
        assert!(reg.locks.is_empty());
        reg.reset(6);
        assert!(reg.bizs().is_empty());
        assert!(reg.history().last().is_some_and(|s| s.active.is_empty()));
    }

    #[test]
    fn clock_text_formats_like_simple_date_format() {
        assert_eq!(clock_text(3_723_004), "01:02:03,004");
    }
}
