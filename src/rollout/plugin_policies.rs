//! Moved to [`crate::plugin::PluginPolicies`] (so that `rollout` does not depend on `plugin`).
//! This re-export only keeps `src/main.rs` and `tests/e2e_canary.rs` building until they
//! import the new path; then delete this file and its `pub mod` line.

pub use crate::plugin::PluginPolicies;
