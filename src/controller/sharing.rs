//! Several replicas share the bases (`IS_CLUSTER=true`): the loop's side of [`crate::shard`].
//! Ownership Leases are watched and written here; tasks hear whether they drive or observe
//! their base; HTTP heartbeats reaching a replica that does not own the base go to the owner.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher;
use tracing::info;

use crate::base::BaseMsg;
use crate::controller::tasks::Tasks;
use crate::metrics::ShardMetrics;
use crate::shard::writer::{LeaseWriter, Written};
use crate::shard::{ShardOut, Shards};
use crate::tunnel::http::Forwarding;
use crate::vnode::shape;

/// How long a leaving replica lets its tasks finish the writes they are doing before it
/// releases their bases.
const LEAVE_GRACE: Duration = Duration::from_millis(500);

/// Which replica's HTTP tunnel owns each VNode (for forwarded heartbeats).
#[derive(Debug, Default)]
pub struct OwnerDirectory {
    env: String,
    owners: RwLock<HashMap<String, String>>,
}

impl OwnerDirectory {
    /// An empty directory for env `env`.
    pub fn new(env: &str) -> Self {
        OwnerDirectory {
            env: env.to_string(),
            owners: RwLock::new(HashMap::new()),
        }
    }

    fn set(&self, node: &str, endpoint: Option<String>) {
        let mut o = self.owners.write().unwrap_or_else(|p| p.into_inner());
        match endpoint {
            Some(e) => o.insert(node.to_string(), e),
            None => o.remove(node),
        };
    }
}

impl Forwarding for OwnerDirectory {
    fn owner_endpoint(&self, base_id: &str) -> Option<String> {
        let node = shape::node_name(base_id, &self.env);
        self.owners
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .cloned()
    }
}

/// The loop's sharing state.
pub struct Sharing {
    /// Whether this replica leads the replica-wide chores.
    pub leader: Arc<std::sync::atomic::AtomicBool>,
    shards: Shards,
    writer: LeaseWriter,
    directory: Arc<OwnerDirectory>,
    metrics: ShardMetrics,
}

impl Sharing {
    /// Sharing with `shards`, writing through `writer`.
    pub fn new(
        shards: Shards,
        writer: LeaseWriter,
        directory: Arc<OwnerDirectory>,
        metrics: ShardMetrics,
        leader: Arc<std::sync::atomic::AtomicBool>,
    ) -> Self {
        Sharing {
            leader,
            shards,
            writer,
            directory,
            metrics,
        }
    }

    /// A Lease watch event.
    pub fn on_lease(&mut self, ev: watcher::Event<Lease>, now: Instant) {
        let name = match &ev {
            watcher::Event::Apply(l) | watcher::Event::Delete(l) | watcher::Event::InitApply(l) => {
                l.metadata.name.clone()
            }
            _ => None,
        };
        self.shards.on_lease_event(ev, now);
        if let Some(n) = name {
            self.directory.set(&n, self.shards.owner_endpoint(&n, now));
        }
    }

    /// A Lease write was answered.
    pub fn on_written(&mut self, (claim, result): Written, tasks: &Tasks, now: Instant) {
        let was_mine = self.shards.owned().contains(&claim.name);
        let claiming = claim.holder.as_deref() == Some(self.shards.settings().me.as_str());
        if result.is_err() && claiming && was_mine {
            self.metrics.renewal_failures.inc();
        }
        if result.is_ok() && claiming && !was_mine && claim.transitions > 0 {
            self.metrics.takeovers.inc();
        }
        if result.is_ok() && claim.holder.is_none() {
            self.metrics.handovers.inc();
        }
        let out = self.shards.on_written(&claim, result, now);
        self.apply(out, tasks);
    }

    /// Time passed.
    pub fn tick(&mut self, tasks: &Tasks, now: Instant) {
        let out = self.shards.tick(now);
        self.apply(out, tasks);
        self.leader
            .store(self.shards.leads(now), std::sync::atomic::Ordering::Relaxed);
    }

    /// A base task started (as an observer until this replica owns the base).
    pub fn base_seen(&mut self, node: &str) {
        self.shards.base_seen(node);
    }

    /// A base task ended.
    pub fn base_gone(&mut self, node: &str, tasks: &Tasks) {
        let out = self.shards.base_gone(node);
        self.apply(out, tasks);
    }

    fn apply(&mut self, out: Vec<ShardOut>, tasks: &Tasks) {
        for o in out {
            match o {
                ShardOut::Owned(node, owned) => {
                    info!(%node, owned, "base ownership changed");
                    tasks.send(&node, BaseMsg::Ownership(owned));
                }
                ShardOut::Write(claim) => self.writer.write(claim),
                ShardOut::Delete(name) => self.writer.delete(name),
            }
        }
        self.metrics.owned.set(self.shards.owned().len() as i64);
    }

    /// Shutdown: the tasks stop driving their bases, finish what they are writing, then every
    /// Lease of this replica is released so that the others take over in seconds.
    pub async fn leave(&mut self, tasks: &Tasks) {
        let out = self.shards.leave();
        let mut writes = Vec::new();
        let mut deletes = Vec::new();
        for o in out {
            match o {
                ShardOut::Owned(node, owned) => tasks.send(&node, BaseMsg::Ownership(owned)),
                ShardOut::Write(c) => writes.push(c),
                ShardOut::Delete(n) => deletes.push(n),
            }
        }
        tokio::time::sleep(LEAVE_GRACE).await;
        let released = futures::future::join_all(writes.iter().map(|c| self.writer.write_now(c)))
            .await
            .into_iter()
            .filter(|ok| *ok)
            .count();
        self.metrics.handovers.inc_by(released as u64);
        for n in deletes {
            self.writer.delete_now(&n).await;
        }
        info!(released, "bases handed over");
    }
}
