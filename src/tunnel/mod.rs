//! Tunnels: how the controller talks to bases.

pub mod codec;
