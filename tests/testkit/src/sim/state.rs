//! The pure state machine of a simulated base: installed modules, the SOFAArk
//! one-active-version rule, scripted failures, and what the base has been asked.
//!
//! No I/O and no clock here: callers pass the time, so every rule is unit-testable.

use std::collections::BTreeMap;

use module_controller::model::{BaseCommand, BizState, ModuleKey, ModuleSpec, ModuleStatus};

/// The set of active modules after one change of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSnapshot {
    /// When the active set changed (epoch ms).
    pub at_ms: i64,
    /// The modules active from then on, sorted.
    pub active: Vec<ModuleKey>,
}

/// A command the base received, in arrival order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedCommand {
    /// Arrival time (epoch ms).
    pub at_ms: i64,
    /// What was asked.
    pub command: BaseCommand,
    /// True when the base was silent and ignored it.
    pub dropped: bool,
}

/// A failure scripted by a test: installs matching it end `broken`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ScriptedFailure {
    name: String,
    /// `None` matches every version of `name`.
    version: Option<String>,
    reason: String,
    message: String,
}

/// What an install did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstallOutcome {
    /// The module is now active; `deactivated` lists the versions it replaced.
    Activated {
        /// Other versions of the same bizName that were active before.
        deactivated: Vec<ModuleKey>,
    },
    /// That exact name+version was already active: nothing changed.
    AlreadyActive,
    /// A scripted failure: the module is recorded `broken`.
    Failed {
        /// Arklet error code, e.g. `InstallBizFailed`.
        reason: String,
        /// Human-readable message.
        message: String,
    },
}

impl InstallOutcome {
    /// Whether the base reports success.
    pub fn is_success(&self) -> bool {
        !matches!(self, InstallOutcome::Failed { .. })
    }
}

/// Everything a simulated base knows.
#[derive(Debug, Default)]
pub struct SimState {
    modules: BTreeMap<ModuleKey, ModuleStatus>,
    history: Vec<ActiveSnapshot>,
    commands: Vec<ReceivedCommand>,
    failures: Vec<ScriptedFailure>,
    malformed: u64,
}

impl SimState {
    /// An empty base.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a module, applying scripted failures and the SOFAArk rule: activating a
    /// version deactivates (but keeps installed) every other active version of that name.
    pub fn install(&mut self, spec: &ModuleSpec, now_ms: i64) -> InstallOutcome {
        let key = spec.key();
        if self
            .modules
            .get(&key)
            .is_some_and(|m| m.state == BizState::Activated)
        {
            return InstallOutcome::AlreadyActive;
        }
        if let Some(f) = self.failure_for(&key).cloned() {
            let before = self.active_modules();
            self.modules.insert(
                key.clone(),
                status(&key, BizState::Broken, now_ms, &f.reason, &f.message),
            );
            self.note_active_change(before, now_ms);
            return InstallOutcome::Failed {
                reason: f.reason,
                message: f.message,
            };
        }
        let before = self.active_modules();
        let mut deactivated = Vec::new();
        for (k, m) in self.modules.iter_mut() {
            if k.name == key.name && k.version != key.version && m.state == BizState::Activated {
                *m = status(
                    k,
                    BizState::Deactivated,
                    now_ms,
                    "",
                    &format!("deactivated by activation of {key}"),
                );
                deactivated.push(k.clone());
            }
        }
        self.modules.insert(
            key.clone(),
            status(&key, BizState::Activated, now_ms, "", "install success"),
        );
        self.note_active_change(before, now_ms);
        InstallOutcome::Activated { deactivated }
    }

    /// Removes exactly that name+version; returns whether it was installed.
    pub fn uninstall(&mut self, key: &ModuleKey, now_ms: i64) -> bool {
        let before = self.active_modules();
        let removed = self.modules.remove(key).is_some();
        self.note_active_change(before, now_ms);
        removed
    }

    /// Forgets every module, as a JVM restart does.
    pub fn clear_modules(&mut self, now_ms: i64) {
        let before = self.active_modules();
        self.modules.clear();
        self.note_active_change(before, now_ms);
    }

    /// Scripts installs of `name` (every version, or only `version`) to fail.
    pub fn fail_installs(
        &mut self,
        name: &str,
        version: Option<&str>,
        reason: &str,
        message: &str,
    ) {
        let version = version.map(str::to_string);
        self.failures
            .retain(|f| !(f.name == name && f.version == version));
        self.failures.push(ScriptedFailure {
            name: name.to_string(),
            version,
            reason: reason.to_string(),
            message: message.to_string(),
        });
    }

    /// Removes every scripted failure.
    pub fn clear_failures(&mut self) {
        self.failures.clear();
    }

    /// Records a received command.
    pub fn record_command(&mut self, command: BaseCommand, dropped: bool, now_ms: i64) {
        self.commands.push(ReceivedCommand {
            at_ms: now_ms,
            command,
            dropped,
        });
    }

    /// Counts a command the base could not parse.
    pub fn record_malformed(&mut self) {
        self.malformed += 1;
    }

    /// How many malformed commands arrived.
    pub fn malformed_count(&self) -> u64 {
        self.malformed
    }

    /// Every installed module with its state, sorted by name then version.
    pub fn modules(&self) -> Vec<ModuleStatus> {
        self.modules.values().cloned().collect()
    }

    /// The active modules, sorted.
    pub fn active_modules(&self) -> Vec<ModuleKey> {
        self.modules
            .values()
            .filter(|m| m.state == BizState::Activated)
            .map(ModuleStatus::key)
            .collect()
    }

    /// One snapshot per change of the active set.
    pub fn history(&self) -> &[ActiveSnapshot] {
        &self.history
    }

    /// Every command received, in arrival order.
    pub fn commands(&self) -> &[ReceivedCommand] {
        &self.commands
    }

    fn failure_for(&self, key: &ModuleKey) -> Option<&ScriptedFailure> {
        // A version-specific script is more precise than a name-wide one, so it wins.
        self.failures
            .iter()
            .find(|f| f.name == key.name && f.version.as_deref() == Some(key.version.as_str()))
            .or_else(|| {
                self.failures
                    .iter()
                    .find(|f| f.name == key.name && f.version.is_none())
            })
    }

    fn note_active_change(&mut self, before: Vec<ModuleKey>, now_ms: i64) {
        let after = self.active_modules();
        if after != before {
            self.history.push(ActiveSnapshot {
                at_ms: now_ms,
                active: after,
            });
        }
    }
}

fn status(
    key: &ModuleKey,
    state: BizState,
    now_ms: i64,
    reason: &str,
    message: &str,
) -> ModuleStatus {
    ModuleStatus {
        name: key.name.clone(),
        version: key.version.clone(),
        state,
        change_time_ms: Some(now_ms),
        reason: Some(reason.to_string()).filter(|s| !s.is_empty()),
        message: Some(message.to_string()).filter(|s| !s.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, version: &str) -> ModuleSpec {
        ModuleSpec {
            name: name.into(),
            version: version.into(),
            url: format!("file:///tmp/{name}-{version}.jar"),
        }
    }

    fn key(name: &str, version: &str) -> ModuleKey {
        ModuleKey::new(name, version)
    }

    fn state_of(s: &SimState, name: &str, version: &str) -> Option<BizState> {
        s.modules()
            .into_iter()
            .find(|m| m.name == name && m.version == version)
            .map(|m| m.state)
    }

    #[test]
    fn install_activates_and_new_version_deactivates_old_one() {
        let mut s = SimState::new();
        assert_eq!(
            s.install(&spec("biz1", "1"), 10),
            InstallOutcome::Activated {
                deactivated: vec![]
            }
        );
        assert_eq!(
            s.install(&spec("biz1", "2"), 20),
            InstallOutcome::Activated {
                deactivated: vec![key("biz1", "1")]
            }
        );
        assert_eq!(state_of(&s, "biz1", "1"), Some(BizState::Deactivated));
        assert_eq!(state_of(&s, "biz1", "2"), Some(BizState::Activated));
        assert_eq!(s.active_modules(), vec![key("biz1", "2")]);
        assert_eq!(s.modules().len(), 2, "the old version stays installed");
    }

    #[test]
    fn other_names_are_untouched_by_the_sofaark_rule() {
        let mut s = SimState::new();
        s.install(&spec("a", "1"), 1);
        s.install(&spec("b", "1"), 2);
        s.install(&spec("a", "2"), 3);
        assert_eq!(s.active_modules(), vec![key("a", "2"), key("b", "1")]);
    }

    #[test]
    fn reinstalling_active_is_noop_and_deactivated_is_reactivated() {
        let mut s = SimState::new();
        s.install(&spec("biz1", "1"), 10);
        assert_eq!(
            s.install(&spec("biz1", "1"), 11),
            InstallOutcome::AlreadyActive
        );
        assert_eq!(s.history().len(), 1);
        s.install(&spec("biz1", "2"), 20);
        let back = s.install(&spec("biz1", "1"), 30);
        assert_eq!(
            back,
            InstallOutcome::Activated {
                deactivated: vec![key("biz1", "2")]
            }
        );
        assert_eq!(state_of(&s, "biz1", "2"), Some(BizState::Deactivated));
        assert_eq!(s.active_modules(), vec![key("biz1", "1")]);
    }

    #[test]
    fn scripted_failure_marks_broken_and_keeps_the_active_version() {
        let mut s = SimState::new();
        s.install(&spec("biz1", "1"), 10);
        s.fail_installs("biz1", None, "InstallBizFailed", "jar not found");
        let out = s.install(&spec("biz1", "2"), 20);
        assert_eq!(
            out,
            InstallOutcome::Failed {
                reason: "InstallBizFailed".into(),
                message: "jar not found".into()
            }
        );
        assert!(!out.is_success());
        let broken = s
            .modules()
            .into_iter()
            .find(|m| m.version == "2")
            .expect("broken module recorded");
        assert_eq!(broken.state, BizState::Broken);
        assert_eq!(broken.reason.as_deref(), Some("InstallBizFailed"));
        assert_eq!(broken.message.as_deref(), Some("jar not found"));
        assert_eq!(broken.change_time_ms, Some(20));
        assert_eq!(s.active_modules(), vec![key("biz1", "1")]);

        s.clear_failures();
        assert!(s.install(&spec("biz1", "2"), 30).is_success());
        assert_eq!(state_of(&s, "biz1", "2"), Some(BizState::Activated));
    }

    #[test]
    fn version_specific_failure_wins_and_spares_other_versions() {
        let mut s = SimState::new();
        s.fail_installs("biz1", Some("2"), "MetaspaceFull", "full");
        s.fail_installs("other", None, "InstallBizFailed", "x");
        assert!(s.install(&spec("biz1", "1"), 1).is_success());
        assert_eq!(
            s.install(&spec("biz1", "2"), 2),
            InstallOutcome::Failed {
                reason: "MetaspaceFull".into(),
                message: "full".into()
            }
        );
        s.fail_installs("biz1", None, "InstallBizFailed", "name-wide");
        assert_eq!(
            s.install(&spec("biz1", "2"), 3),
            InstallOutcome::Failed {
                reason: "MetaspaceFull".into(),
                message: "full".into()
            }
        );
        assert!(!s.install(&spec("biz1", "3"), 4).is_success());
    }

    #[test]
    fn uninstall_removes_exactly_that_version_and_is_idempotent() {
        let mut s = SimState::new();
        s.install(&spec("biz1", "1"), 1);
        s.install(&spec("biz1", "2"), 2);
        assert!(s.uninstall(&key("biz1", "1"), 3));
        assert_eq!(s.modules().len(), 1);
        assert_eq!(s.active_modules(), vec![key("biz1", "2")]);
        assert!(!s.uninstall(&key("biz1", "1"), 4));
        assert!(s.uninstall(&key("biz1", "2"), 5));
        assert!(s.modules().is_empty());
    }

    #[test]
    fn history_has_one_entry_per_change_of_the_active_set() {
        let mut s = SimState::new();
        s.install(&spec("a", "1"), 1);
        s.install(&spec("a", "1"), 2); // no change
        s.uninstall(&key("zzz", "1"), 3); // absent: no change
        s.install(&spec("a", "2"), 4);
        s.uninstall(&key("a", "1"), 5); // deactivated one: active set unchanged
        s.clear_modules(6);
        let h: Vec<(i64, Vec<ModuleKey>)> = s
            .history()
            .iter()
            .map(|h| (h.at_ms, h.active.clone()))
            .collect();
        assert_eq!(
            h,
            vec![
                (1, vec![key("a", "1")]),
                (4, vec![key("a", "2")]),
                (6, vec![]),
            ]
        );
    }

    #[test]
    fn commands_and_malformed_are_recorded() {
        let mut s = SimState::new();
        s.record_command(BaseCommand::QueryHealth, false, 1);
        s.record_command(BaseCommand::QueryAllModules, true, 2);
        s.record_malformed();
        assert_eq!(s.commands().len(), 2);
        assert!(s.commands()[1].dropped);
        assert_eq!(s.commands()[0].command, BaseCommand::QueryHealth);
        assert_eq!(s.malformed_count(), 1);
    }
}
