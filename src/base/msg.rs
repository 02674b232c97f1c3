//! What a base task is told.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use tokio::sync::{oneshot, watch};

use crate::model::{BaseMetadata, ModuleKey, ModuleSpec, TunnelEvent};
use crate::peer::PeerTemplate;
use crate::vpod::status::Note;

/// A message to a base task.
#[derive(Debug)]
pub enum BaseMsg {
    /// Something the base said (boxed, as the larger variants: every queued message takes the
    /// size of the largest, and each task's channel keeps a block of 32 of them).
    Event(Box<TunnelEvent>),
    /// A pod bound to this base's VNode was added or changed.
    PodUpsert(Arc<Pod>),
    /// A pod bound to this base's VNode is gone (uid).
    PodRemoved(String),
    /// The complete set of pods bound to this VNode (after a watch (re)list).
    PodsSynced(Vec<Arc<Pod>>),
    /// HTTP tunnel: answer a base's queryBaseline.
    Baseline {
        /// Who the base says it is (its labels select peer Deployments before any heartbeat).
        metadata: Box<BaseMetadata>,
        /// Where the answer goes.
        reply: oneshot::Sender<Vec<ModuleSpec>>,
    },
    /// Owners with a rollout in progress (replaces the previous set).
    Rollouts(Arc<HashSet<String>>),
    /// Batch-policy holds for pods on this base (replaces the previous holds of those pods;
    /// `None` releases a pod).
    Holds(Vec<(String, Option<Note>)>),
    /// The peer Deployments of this env (replaces the previous list).
    Peers(Arc<Vec<PeerTemplate>>),
    /// This replica now drives the base (`true`) or only observes it (`false`).
    Ownership(bool),
    /// The VNode existed before this task: what the previous controller recorded on it.
    Adopted {
        /// `name@version` → package URL, as recorded on the VNode.
        urls: Option<String>,
    },
}

/// Modules that pods not bound anywhere yet ask for, as the index last saw them. A task reads
/// it when it plans; a change is not sent to the tasks, as it is news to almost none of them
/// and, sent, woke every base task on every pod created or bound anywhere (at 1,000 bases and
/// 20 pod events a second, 20,000 wake-ups a second).
pub type WantedModules = watch::Receiver<Arc<HashSet<ModuleKey>>>;

/// Where the index publishes [`WantedModules`].
pub type WantedModulesTx = watch::Sender<Arc<HashSet<ModuleKey>>>;

impl From<TunnelEvent> for BaseMsg {
    fn from(ev: TunnelEvent) -> Self {
        BaseMsg::Event(Box::new(ev))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queued_message_stays_small() {
        // A task's channel holds blocks of 32 messages, kept for the task's life. Unboxed, a
        // `TunnelEvent` alone is 160 bytes: a block of more than 5 KB per base.
        assert!(
            std::mem::size_of::<BaseMsg>() <= 32,
            "{} bytes",
            std::mem::size_of::<BaseMsg>()
        );
    }
}
