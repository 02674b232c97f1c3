//! Per-base state: the decisions (pure) and the actor that carries them out.

pub mod actor;
pub mod plan;
