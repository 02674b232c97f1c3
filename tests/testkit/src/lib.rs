//! Test and demo support for the module controller, kept out of the product binary: a private
//! local control plane and MQTT brokers ([`localenv`]), simulated bases ([`sim`]), and the quick
//! start ([`demo`]). The benchmarks are binaries of this crate.

pub mod demo;
pub mod localenv;
pub mod sim;
