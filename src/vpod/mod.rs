//! Module pods: what they ask for (pure), what their status should be (pure), and the writes.

pub mod spec;
pub mod status;
pub mod writer;
