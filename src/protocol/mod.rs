//! Wire protocols spoken by bases. Only edge code uses these; the rest speaks [`crate::model`].

pub mod arklet;
pub mod mqtt_topics;
