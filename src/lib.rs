//! Module controller: runs Koupleless modules on bases as Kubernetes pods on virtual nodes.
//!
//! Data flows one way: tunnel (wire → [`model`] events) → per-base state ([`base`]) →
//! Kubernetes writes ([`vnode`], [`vpod`]) and base commands (back through the tunnel).

pub mod base;
pub mod config;
pub mod controller;
pub mod demo;
pub mod kube_util;
pub mod localenv;
pub mod metrics;
pub mod model;
pub mod plugin;
pub mod protocol;
pub mod rollout;
pub mod sim;
pub mod tunnel;
pub mod vnode;
pub mod vpod;
