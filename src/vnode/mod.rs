//! Bases as Kubernetes Nodes: the node shape and liveness. Pure.

pub mod liveness;
pub mod shape;
