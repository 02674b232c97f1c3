//! Test and demo support for the module controller, kept out of the product binary: a private
//! local control plane and MQTT brokers ([`localenv`]) and the quick start ([`demo`]). The
//! benchmarks are binaries of this crate. Bases are the independent Arklet double
//! (`arklet_double`), which shares no code with the controller.

pub mod demo;
pub mod localenv;
