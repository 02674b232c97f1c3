//! Rollout decisions: in which order status changes on one base are written, and which
//! installs of a rollout may proceed. Pure logic with built-in defaults; plugins refine them.

pub mod batch;
pub mod ordering;
