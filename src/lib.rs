//! Module controller: runs Koupleless modules on bases as Kubernetes pods on virtual nodes.
//!
//! Data flows one way:
//! [`tunnel`] (wire messages → [`model`] events) → [`controller`] (the loop; [`controller::index`]
//! turns watches into per-base news) → [`base`] (one task per base: pure decisions in
//! [`base::plan`], [`base::ledger`], [`base::node_sync`], using [`vnode`], [`vpod`], [`rollout`])
//! → effects: commands back through the [`tunnel`], writes through [`apiserver`] (the only
//! module that talks to the apiserver). See `ARCHITECTURE.md`.

pub mod apiserver;
pub mod base;
pub mod config;
pub mod controller;
pub mod metrics;
pub mod model;
pub mod offload;
pub mod peer;
pub mod plugin;
pub mod protocol;
pub mod rollout;
pub mod server;
pub mod shard;
pub mod time;
pub mod tunnel;
pub mod vnode;
pub mod vpod;
