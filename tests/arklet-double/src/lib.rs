//! An independent test double of a Koupleless base (the Arklet agent of a SOFAArk JVM),
//! speaking the MQTT and HTTP tunnels.
//!
//! It shares no code or types with the controller: every message is literal JSON written
//! from `/work/shared/design/protocol.md` and from the Arklet/SOFAArk sources (each module
//! names the source files it follows). Where Arklet releases differ, or the source
//! contradicts protocol.md, [`BaseConfig`] selects the variant; its defaults follow the
//! current Arklet source except where noted there.
//!
//! Layout: [`registry`] is the pure state machine (modules, locks, REPEAT/NOT_FOUND,
//! scripted failures, history); [`wire`] builds and parses JSON; `mqtt` and `http` are the
//! tunnels; [`Base`] is the test-facing handle and [`Fleet`] many of them.

#![warn(missing_docs)]

mod base;
pub mod config;
mod fleet;
mod http;
mod mqtt;
pub mod registry;
pub mod wire;

pub use base::{Base, BaselineEntry, Command, Received, SentReply, now_ms};
pub use config::{BaseConfig, BaselineReply, HttpEnumStyle, StateRecordsField, Transport};
pub use fleet::Fleet;
pub use mqtt::probe as probe_broker;
pub use registry::{
    ActiveSnapshot, Biz, BizId, BizState, ChangeReason, Failure, MultiVersionPolicy, StateRecord,
};
