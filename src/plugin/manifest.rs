//! The plugins manifest (`plugins.json` in the plugins directory): which plugin files exist,
//! their config, and which plugin serves which use.
//!
//! ```json
//! {
//!   "plugins": {
//!     "ordering":     { "file": "default-ordering.wasm" },
//!     "canary":       { "file": "canary-batch.wasm", "config": { "percent": 25 } },
//!     "simple-agent": { "file": "simple-agent-adapter.wasm", "config": { "prefix": "simple-agent" } }
//!   },
//!   "ordering": "ordering",
//!   "tunnelAdapters": ["simple-agent"],
//!   "batch": { "default": null, "selectable": ["canary"], "onFailure": { "canary": "hold" } }
//! }
//! ```
//!
//! `batch.onFailure` gives each bound batch policy its failure policy: what happens to the
//! pending installs of a rollout when the policy traps, times out, runs out of memory, answers
//! nonsense or is not loaded at all. `"hold"` (the default, also for policies not listed) admits
//! nothing until the policy works again — a broken canary must not release a rollout;
//! `"admit"` admits every pending install, as if no policy were bound.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::rollout::batch::OnFailure;

use super::kind::PluginKind;

/// File name of the manifest inside the plugins directory.
pub const MANIFEST_FILE: &str = "plugins.json";

/// Default Deployment annotation that selects a batch policy by plugin name.
pub const DEFAULT_BATCH_ANNOTATION: &str = "module-controller.koupleless.io/batch-policy";

/// Annotation value that selects the built-in admit-all policy explicitly.
pub const BUILTIN_BATCH: &str = "builtin";

/// One plugin file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginEntry {
    /// Path of the component, relative to the plugins directory.
    pub file: PathBuf,
    /// Config passed to `init` and `host.config`: a JSON string is passed as is, any other
    /// JSON value as its JSON text, none as the empty string.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
}

impl PluginEntry {
    /// The config string the plugin sees.
    pub fn config_string(&self) -> String {
        match &self.config {
            None | Some(serde_json::Value::Null) => String::new(),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
        }
    }
}

/// Batch policy bindings.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BatchBinding {
    /// Policy for Deployments that select none (None: the built-in admit-all).
    #[serde(default)]
    pub default: Option<String>,
    /// Policies a Deployment may select by annotation.
    #[serde(default)]
    pub selectable: Vec<String>,
    /// The selecting annotation.
    #[serde(default = "default_annotation")]
    pub annotation: String,
    /// Failure policy per bound batch policy (`"hold"` or `"admit"`); unlisted ones hold.
    #[serde(default)]
    pub on_failure: BTreeMap<String, String>,
}

/// Spelling of the failure policies in the manifest.
const FAILURE_POLICIES: [(&str, OnFailure); 2] =
    [("hold", OnFailure::Hold), ("admit", OnFailure::Admit)];

fn parse_on_failure(text: &str) -> Option<OnFailure> {
    FAILURE_POLICIES
        .iter()
        .find(|(name, _)| *name == text)
        .map(|(_, p)| *p)
}

impl BatchBinding {
    /// The failure policy of batch policy `name` (hold unless the manifest says admit).
    pub fn on_failure(&self, name: &str) -> OnFailure {
        self.on_failure
            .get(name)
            .and_then(|t| parse_on_failure(t))
            .unwrap_or_default()
    }

    fn is_bound(&self, name: &str) -> bool {
        self.default
            .iter()
            .chain(&self.selectable)
            .any(|n| n == name)
    }
}

fn default_annotation() -> String {
    DEFAULT_BATCH_ANNOTATION.to_string()
}

impl Default for BatchBinding {
    fn default() -> Self {
        BatchBinding {
            default: None,
            selectable: Vec::new(),
            annotation: default_annotation(),
            on_failure: BTreeMap::new(),
        }
    }
}

/// The whole manifest.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Manifest {
    /// Plugins by name.
    #[serde(default)]
    pub plugins: BTreeMap<String, PluginEntry>,
    /// The status-ordering plugin (None: built-in).
    #[serde(default)]
    pub ordering: Option<String>,
    /// Tunnel adapters served beside the built-in Arklet codec.
    #[serde(default)]
    pub tunnel_adapters: Vec<String>,
    /// Batch policies.
    #[serde(default)]
    pub batch: BatchBinding,
}

/// Why a manifest was refused.
#[derive(Debug, Error)]
pub enum ManifestError {
    /// Unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid JSON for a manifest.
    #[error("invalid {MANIFEST_FILE}: {0}")]
    Parse(#[from] serde_json::Error),
    /// Inconsistent.
    #[error("invalid {MANIFEST_FILE}: {0}")]
    Invalid(String),
}

impl Manifest {
    /// Reads `dir/plugins.json`; a missing manifest means no plugins.
    pub fn load(dir: &Path) -> Result<Manifest, ManifestError> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        Manifest::parse(&text)
    }

    /// Parses and validates manifest text.
    pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
        let m: Manifest = serde_json::from_str(text)?;
        m.validate()?;
        Ok(m)
    }

    fn validate(&self) -> Result<(), ManifestError> {
        for (name, entry) in &self.plugins {
            let plain = !entry.file.as_os_str().is_empty()
                && entry
                    .file
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            if !plain {
                return Err(ManifestError::Invalid(format!(
                    "plugin {name:?}: file {:?} must be a relative path inside the plugins directory",
                    entry.file
                )));
            }
            if name == BUILTIN_BATCH || name.is_empty() {
                return Err(ManifestError::Invalid(format!(
                    "{name:?} is a reserved plugin name"
                )));
            }
        }
        let bound = self
            .ordering
            .iter()
            .chain(&self.tunnel_adapters)
            .chain(&self.batch.default)
            .chain(&self.batch.selectable);
        for name in bound {
            if !self.plugins.contains_key(name) {
                return Err(ManifestError::Invalid(format!(
                    "binds {name:?}, which is not in \"plugins\""
                )));
            }
        }
        for (name, policy) in &self.batch.on_failure {
            if !self.batch.is_bound(name) {
                return Err(ManifestError::Invalid(format!(
                    "batch.onFailure names {name:?}, which is not a bound batch policy (batch.default or batch.selectable)"
                )));
            }
            if parse_on_failure(policy).is_none() {
                return Err(ManifestError::Invalid(format!(
                    "batch.onFailure[{name:?}] is {policy:?}; a failure policy is \"hold\" (admit nothing while the policy is broken) or \"admit\" (admit every pending install)"
                )));
            }
        }
        Ok(())
    }

    /// The kind a plugin must have for the uses it is bound to (None when unbound).
    pub fn expected_kind(&self, name: &str) -> Option<PluginKind> {
        let is = |n: &String| n == name;
        if self.ordering.iter().any(is) {
            Some(PluginKind::StatusOrdering)
        } else if self.tunnel_adapters.iter().any(is) {
            Some(PluginKind::TunnelAdapter)
        } else if self.batch.is_bound(name) {
            Some(PluginKind::BatchPolicy)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_manifest_parses() {
        let m = Manifest::parse(
            r#"{"plugins":{"o":{"file":"o.wasm"},"c":{"file":"sub/c.wasm","config":{"percent":50}},
               "s":{"file":"s.wasm","config":"raw"}},
               "ordering":"o","tunnelAdapters":["s"],"batch":{"default":"c","selectable":["c"]}}"#,
        )
        .expect("valid manifest");
        assert_eq!(m.plugins["c"].config_string(), r#"{"percent":50}"#);
        assert_eq!(m.plugins["s"].config_string(), "raw");
        assert_eq!(m.plugins["o"].config_string(), "");
        assert_eq!(m.batch.annotation, DEFAULT_BATCH_ANNOTATION);
        assert_eq!(m.expected_kind("c"), Some(PluginKind::BatchPolicy));
        assert_eq!(m.expected_kind("s"), Some(PluginKind::TunnelAdapter));
        assert_eq!(m.expected_kind("x"), None);
    }

    #[test]
    fn failure_policies_default_to_hold() {
        let m = Manifest::parse(
            r#"{"plugins":{"c":{"file":"c.wasm"},"d":{"file":"d.wasm"}},
               "batch":{"default":"c","selectable":["d"],"onFailure":{"d":"admit"}}}"#,
        )
        .expect("valid manifest");
        assert_eq!(m.batch.on_failure("c"), OnFailure::Hold);
        assert_eq!(m.batch.on_failure("d"), OnFailure::Admit);
        assert_eq!(m.batch.on_failure("unbound"), OnFailure::Hold);
    }

    #[test]
    fn bad_failure_policies_are_refused_clearly() {
        let err = Manifest::parse(
            r#"{"plugins":{"c":{"file":"c.wasm"}},"batch":{"default":"c","onFailure":{"c":"allow"}}}"#,
        )
        .expect_err("unknown failure policy");
        let msg = err.to_string();
        assert!(msg.contains(r#"batch.onFailure["c"] is "allow""#), "{msg}");
        assert!(
            msg.contains(r#""hold""#) && msg.contains(r#""admit""#),
            "{msg}"
        );
        let err = Manifest::parse(
            r#"{"plugins":{"c":{"file":"c.wasm"}},"batch":{"onFailure":{"c":"hold"}}}"#,
        )
        .expect_err("policy for an unbound plugin");
        assert!(
            err.to_string().contains("not a bound batch policy"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_manifests_are_refused() {
        for bad in [
            r#"{"ordering":"missing"}"#,
            r#"{"plugins":{"o":{"file":"../o.wasm"}}}"#,
            r#"{"plugins":{"o":{"file":"/abs/o.wasm"}}}"#,
            r#"{"plugins":{"builtin":{"file":"o.wasm"}}}"#,
            r#"{"plugins":{},"unknownField":1}"#,
            r#"{"plugins": "#,
        ] {
            assert!(Manifest::parse(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn missing_manifest_means_no_plugins() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert_eq!(
            Manifest::load(dir.path()).expect("no manifest is fine"),
            Manifest::default()
        );
    }
}
