//! Message codecs for message-bus tunnels: the host owns the MQTT connection; a codec says what
//! to subscribe to and translates messages both ways. The Arklet codec is built in; WASM tunnel
//! adapters implement the same trait.

use thiserror::Error;

use crate::model::{BaseCommand, BaseEvent};

/// An outgoing message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    /// Topic.
    pub topic: String,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// Why an incoming message was dropped.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The topic is not one this codec handles.
    #[error("topic not handled")]
    UnknownTopic,
    /// The payload is not what the topic promises.
    #[error("malformed payload: {0}")]
    Malformed(String),
    /// Older than the staleness window.
    #[error("stale message ({age_ms} ms old)")]
    Stale {
        /// Age of the message.
        age_ms: i64,
    },
    /// Well-formed but deliberately ignored (e.g. a failed health report).
    #[error("ignored: {0}")]
    Ignored(String),
    /// The codec itself failed (plugin trap, timeout, ...).
    #[error("codec failed: {0}")]
    CodecFailed(String),
}

impl DecodeError {
    /// Label for the drop counter.
    pub fn label(&self) -> &'static str {
        match self {
            DecodeError::UnknownTopic => "unknown_topic",
            DecodeError::Malformed(_) => "malformed",
            DecodeError::Stale { .. } => "stale",
            DecodeError::Ignored(_) => "ignored",
            DecodeError::CodecFailed(_) => "codec_failed",
        }
    }
}

/// Why a command could not be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("cannot encode {command}: {reason}")]
pub struct EncodeError {
    /// Command kind.
    pub command: &'static str,
    /// Why.
    pub reason: String,
}

/// A codec between a base agent's message format and canonical events/commands.
pub trait MessageCodec: Send + Sync {
    /// Name (recorded on the VNode as its tunnel label).
    fn name(&self) -> &str;
    /// Topic filters to subscribe to (QoS 1).
    fn subscriptions(&self) -> Vec<String>;
    /// Whether this codec handles messages on `topic`.
    fn handles(&self, topic: &str) -> bool;
    /// Decodes one message received at `now_ms`.
    fn decode(
        &self,
        topic: &str,
        payload: &[u8],
        now_ms: i64,
    ) -> Result<Vec<BaseEvent>, DecodeError>;
    /// Encodes one command for a base.
    fn encode(&self, base_id: &str, cmd: &BaseCommand) -> Result<Vec<OutMessage>, EncodeError>;
}

/// The set of plugin codecs a tunnel serves beside its built-in one; swapped atomically by the
/// plugin host through a `tokio::sync::watch` channel.
pub type CodecSet = std::sync::Arc<Vec<std::sync::Arc<dyn MessageCodec>>>;

/// Whether an MQTT topic filter (with `+` and `#`) matches a topic.
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn filters_match_like_mqtt() {
        assert!(topic_matches("a/+/c", "a/b/c"));
        assert!(topic_matches("a/#", "a/b/c"));
        assert!(!topic_matches("a/+/c", "a/b/d"));
        assert!(!topic_matches("a/+", "a/b/c"));
        assert!(topic_matches(
            "koupleless_dev/+/base/heart",
            "koupleless_dev/1.2.3.4/base/heart"
        ));
    }
}
