//! Bases as Kubernetes Nodes: the node shape (pure), its Lease, and liveness.

pub mod lease;
pub mod liveness;
pub mod shape;
