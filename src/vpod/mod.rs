//! Module pods: what they ask for, and what their status should be. Pure.

pub mod spec;
pub mod status;
