//! Several replicas share the bases: each VNode is driven by exactly one replica at a time,
//! recorded in an ownership Lease in the controller's namespace (holder = the replica's
//! `CLIENT_ID`). Replicas announce themselves with a membership Lease, claim unowned or expired
//! bases so that they carry similar numbers, hand surplus bases over gradually, and release all
//! theirs on shutdown. This module is the pure decision part; [`writer`] performs the writes.
//!
//! Expiry is judged from each replica's own clock: a Lease whose version has not changed for
//! its duration is expired (as client-go's leader election does), so clock skew between
//! replicas does not matter.

pub mod writer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::watcher;

use crate::apiserver::leases::{OwnerClaim, OwnerLease};

/// Label on every ownership and membership Lease: the controller env they belong to.
pub const ENV_LABEL: &str = "module-controller.koupleless.io/env";
/// Label saying what a Lease is: `vnode` (owns a VNode) or `replica` (a replica is alive).
pub const KIND_LABEL: &str = "module-controller.koupleless.io/lease";
/// At most one surplus base is handed over per this period, so rebalancing never churns.
const REBALANCE_EVERY: Duration = Duration::from_secs(2);
/// A replica claims nothing until its membership is written and this long has passed, so it
/// sees the other replicas before judging its fair share.
const JOIN_SETTLE: Duration = Duration::from_secs(1);
/// A base beyond this replica's fair share is claimed only after staying unowned this long
/// (scaled by `WORKLOAD_MAX_LEVEL`): the replicas below their share go first.
const SURPLUS_WAIT: Duration = Duration::from_secs(2);

/// Settings of the shard logic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSettings {
    /// This replica's identity (`CLIENT_ID`).
    pub me: String,
    /// Controller env.
    pub env: String,
    /// Namespace of the Leases.
    pub namespace: String,
    /// Lease duration.
    pub lease: Duration,
    /// `WORKLOAD_MAX_LEVEL`: how strongly load delays claims (0 disables the delay).
    pub max_level: u32,
    /// Where this replica's HTTP tunnel can be reached by the others, if any.
    pub endpoint: Option<String>,
}

impl ShardSettings {
    /// Renewal period: a third of the Lease duration.
    pub fn renew_every(&self) -> Duration {
        self.lease / 3
    }

    fn duration_secs(&self) -> i32 {
        self.lease.as_secs().clamp(1, i32::MAX as u64) as i32
    }

    fn labels(&self, kind: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ENV_LABEL.to_string(), self.env.clone()),
            (KIND_LABEL.to_string(), kind.to_string()),
        ])
    }

    /// Label selector of this env's Leases.
    pub fn selector(&self) -> String {
        format!("{ENV_LABEL}={}", self.env)
    }

    /// Name of this replica's membership Lease.
    pub fn membership_name(&self) -> String {
        membership_name(&self.me)
    }
}

/// Orders bases differently for each replica (a cheap FNV hash of both names).
fn spread_key(me: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in me.bytes().chain([0]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Name of a replica's membership Lease (a valid object name whatever the identity).
pub fn membership_name(me: &str) -> String {
    crate::vnode::shape::node_name(me, "replica").replacen("vnode.", "module-controller.", 1)
}

/// What the shard logic asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardOut {
    /// This replica now drives (true) or only observes (false) the base of this VNode.
    Owned(String, bool),
    /// Write this Lease (claim, renew, release).
    Write(OwnerClaim),
    /// Delete this Lease (the base is gone, or this replica leaves).
    Delete(String),
}

#[derive(Debug, Clone)]
struct Seen {
    lease: OwnerLease,
    /// When this replica last saw the Lease change.
    changed: Instant,
}

/// The shard state of one replica.
#[derive(Debug)]
pub struct Shards {
    cfg: ShardSettings,
    leases: HashMap<String, Seen>,
    /// VNodes this replica knows a base for.
    bases: BTreeSet<String>,
    /// VNodes whose ownership this replica has announced (to its tasks).
    owned: BTreeSet<String>,
    /// When each unowned base was first noticed unowned.
    unowned_since: HashMap<String, Instant>,
    /// Writes in flight (no second write for a Lease until the first is answered).
    writing: BTreeSet<String>,
    /// Last successful renewal of each owned Lease.
    renewed: HashMap<String, Instant>,
    last_release: Option<Instant>,
    joined_at: Option<Instant>,
    synced: bool,
    leaving: bool,
}

impl Shards {
    /// No Leases known yet.
    pub fn new(cfg: ShardSettings) -> Self {
        Shards {
            cfg,
            leases: HashMap::new(),
            bases: BTreeSet::new(),
            owned: BTreeSet::new(),
            unowned_since: HashMap::new(),
            writing: BTreeSet::new(),
            renewed: HashMap::new(),
            last_release: None,
            joined_at: None,
            synced: false,
            leaving: false,
        }
    }

    /// The settings.
    pub fn settings(&self) -> &ShardSettings {
        &self.cfg
    }

    /// VNodes this replica drives.
    pub fn owned(&self) -> &BTreeSet<String> {
        &self.owned
    }

    /// The HTTP endpoint of the replica that owns `node`, when another one does.
    pub fn owner_endpoint(&self, node: &str, now: Instant) -> Option<String> {
        let s = self.leases.get(node)?;
        let holder = s.lease.holder.as_deref()?;
        (holder != self.cfg.me && !self.expired(s, now))
            .then(|| s.lease.endpoint.clone())
            .flatten()
    }

    /// A Lease watch event.
    pub fn on_lease_event(&mut self, ev: watcher::Event<Lease>, now: Instant) {
        match ev {
            watcher::Event::Init => {}
            watcher::Event::InitApply(l) | watcher::Event::Apply(l) => self.observe(&l, now),
            watcher::Event::Delete(l) => {
                if let Some(name) = l.metadata.name {
                    self.leases.remove(&name);
                }
            }
            watcher::Event::InitDone => self.synced = true,
        }
    }

    fn observe(&mut self, l: &Lease, now: Instant) {
        let Some(lease) = OwnerLease::from_lease(l) else {
            return;
        };
        let changed = match self.leases.get(&lease.name) {
            Some(s) if s.lease.resource_version == lease.resource_version => s.changed,
            _ => now,
        };
        self.leases
            .insert(lease.name.clone(), Seen { lease, changed });
    }

    /// A base is known (its task runs here, owned or not).
    pub fn base_seen(&mut self, node: &str) {
        self.bases.insert(node.to_string());
    }

    /// A base is gone (drained or expired); its ownership Lease goes with it.
    pub fn base_gone(&mut self, node: &str) -> Vec<ShardOut> {
        self.bases.remove(node);
        self.unowned_since.remove(node);
        let mut out = Vec::new();
        if self.owned.remove(node) {
            self.renewed.remove(node);
            out.push(ShardOut::Delete(node.to_string()));
        }
        out
    }

    /// The answer to a write.
    pub fn on_written(
        &mut self,
        claim: &OwnerClaim,
        result: Result<Option<String>, String>,
        now: Instant,
    ) -> Vec<ShardOut> {
        self.writing.remove(&claim.name);
        let mut out = Vec::new();
        match result {
            Ok(version) => {
                let lease = OwnerLease {
                    name: claim.name.clone(),
                    holder: claim.holder.clone(),
                    duration_secs: claim.duration_secs,
                    resource_version: version,
                    endpoint: claim.endpoint.clone(),
                    transitions: claim.transitions,
                };
                self.leases.insert(
                    claim.name.clone(),
                    Seen {
                        lease,
                        changed: now,
                    },
                );
                let mine = claim.holder.as_deref() == Some(self.cfg.me.as_str());
                if mine && claim.name == self.cfg.membership_name() {
                    self.joined_at.get_or_insert(now);
                }
                if mine {
                    self.renewed.insert(claim.name.clone(), now);
                    if self.bases.contains(&claim.name) && self.owned.insert(claim.name.clone()) {
                        out.push(ShardOut::Owned(claim.name.clone(), true));
                    }
                }
            }
            Err(_) => {
                // Someone else wrote first (or the apiserver is away): the watch tells the rest.
            }
        }
        out
    }

    fn expired(&self, s: &Seen, now: Instant) -> bool {
        s.lease.holder.is_none()
            || now.saturating_duration_since(s.changed)
                >= Duration::from_secs(s.lease.duration_secs.max(1) as u64)
    }

    /// Whether this replica leads the replica-wide chores (peer replica sync): the live replica
    /// with the smallest identity.
    pub fn leads(&self, now: Instant) -> bool {
        !self.leaving && self.replicas(now).iter().next() == Some(&self.cfg.me)
    }

    /// Live replicas (with a fresh membership Lease), this one included.
    fn replicas(&self, now: Instant) -> BTreeSet<String> {
        let mut r: BTreeSet<String> = self
            .leases
            .values()
            .filter(|s| s.lease.name.starts_with("module-controller.") && !self.expired(s, now))
            .filter_map(|s| s.lease.holder.clone())
            .collect();
        r.insert(self.cfg.me.clone());
        r
    }

    /// Bases owned per live replica, by valid ownership Leases.
    fn loads(&self, now: Instant) -> BTreeMap<String, usize> {
        let mut loads: BTreeMap<String, usize> =
            self.replicas(now).into_iter().map(|r| (r, 0)).collect();
        for node in &self.bases {
            if let Some(s) = self.leases.get(node)
                && !self.expired(s, now)
                && let Some(h) = &s.lease.holder
                && let Some(n) = loads.get_mut(h)
            {
                *n += 1;
            }
        }
        loads
    }

    fn claim(&self, name: &str, holder: Option<String>, kind: &str) -> OwnerClaim {
        let prev = self.leases.get(name).map(|s| &s.lease);
        let changes_holder = prev.and_then(|l| l.holder.clone()) != holder;
        OwnerClaim {
            name: name.to_string(),
            holder,
            duration_secs: self.cfg.duration_secs(),
            resource_version: prev.and_then(|l| l.resource_version.clone()),
            endpoint: self.cfg.endpoint.clone(),
            labels: self.cfg.labels(kind),
            transitions: prev.map_or(0, |l| l.transitions) + i32::from(changes_holder),
        }
    }

    /// Decides what to do now.
    pub fn tick(&mut self, now: Instant) -> Vec<ShardOut> {
        let mut out = Vec::new();
        if !self.synced {
            return out;
        }
        let me = self.cfg.me.clone();
        let renew_every = self.cfg.renew_every();
        // Membership: renew this replica's own Lease (released when leaving).
        let membership = self.cfg.membership_name();
        if !self.leaving
            && !self.writing.contains(&membership)
            && self
                .renewed
                .get(&membership)
                .is_none_or(|t| now.saturating_duration_since(*t) >= renew_every)
        {
            self.writing.insert(membership.clone());
            out.push(ShardOut::Write(self.claim(
                &membership,
                Some(me.clone()),
                "replica",
            )));
        }
        // Lost ownership: another holder, or renewals failing for too long.
        let lost: Vec<String> = self
            .owned
            .iter()
            .filter(|node| {
                let taken = self
                    .leases
                    .get(*node)
                    .is_some_and(|s| s.lease.holder.as_deref() != Some(me.as_str()));
                let stale = self.renewed.get(*node).is_none_or(|t| {
                    now.saturating_duration_since(*t) + renew_every >= self.cfg.lease
                });
                taken || stale
            })
            .cloned()
            .collect();
        for node in lost {
            self.owned.remove(&node);
            out.push(ShardOut::Owned(node, false));
        }
        if self.leaving {
            return out;
        }
        // Renew what this replica owns.
        let due: Vec<String> = self
            .owned
            .iter()
            .filter(|n| {
                !self.writing.contains(*n)
                    && self
                        .renewed
                        .get(*n)
                        .is_none_or(|t| now.saturating_duration_since(*t) >= renew_every)
            })
            .cloned()
            .collect();
        for node in due {
            self.writing.insert(node.clone());
            out.push(ShardOut::Write(self.claim(
                &node,
                Some(me.clone()),
                "vnode",
            )));
        }
        // Claim unowned or expired bases: up to this replica's fair share at once (each replica
        // in its own order, so that they pick different bases), beyond it only after the
        // replicas below their share had their chance.
        let loads = self.loads(now);
        let mine = loads.get(&me).copied().unwrap_or(0);
        let replicas = loads.len().max(1);
        let fair = self.bases.len().div_ceil(replicas);
        let settled = self
            .joined_at
            .is_some_and(|t| now.saturating_duration_since(t) >= JOIN_SETTLE);
        let surplus_wait = SURPLUS_WAIT.mul_f64(f64::from(self.cfg.max_level) / 3.0);
        let mut free: Vec<String> = self
            .bases
            .iter()
            .filter(|n| !self.owned.contains(*n) && !self.writing.contains(*n))
            .filter(|n| {
                // A Lease still held under this identity is this replica's own from before
                // a restart: take it back at once.
                self.leases.get(*n).is_none_or(|s| {
                    self.expired(s, now) || s.lease.holder.as_deref() == Some(me.as_str())
                })
            })
            .cloned()
            .collect();
        self.unowned_since
            .retain(|n, _| free.contains(n) || !self.bases.contains(n));
        free.sort_by_key(|n| spread_key(&me, n));
        let claiming = self
            .writing
            .iter()
            .filter(|n| self.bases.contains(*n))
            .count();
        let mut budget = fair.saturating_sub(mine + claiming);
        for node in free {
            let since = *self.unowned_since.entry(node.clone()).or_insert(now);
            let own_before = self
                .leases
                .get(&node)
                .is_some_and(|s| s.lease.holder.as_deref() == Some(me.as_str()));
            let go = own_before
                || (settled && budget > 0)
                || (settled && now.saturating_duration_since(since) >= surplus_wait);
            if go {
                budget = budget.saturating_sub(1);
                self.writing.insert(node.clone());
                out.push(ShardOut::Write(self.claim(
                    &node,
                    Some(me.clone()),
                    "vnode",
                )));
            }
        }
        // Hand a surplus base over, one at a time (stop driving it now, release it), while this
        // replica carries two more than the least-loaded one.
        let least = loads.values().copied().min().unwrap_or(0);
        if mine >= least + 2
            && replicas > 1
            && self
                .last_release
                .is_none_or(|t| now.saturating_duration_since(t) >= REBALANCE_EVERY)
            && let Some(node) = self.owned.iter().next_back().cloned()
        {
            self.last_release = Some(now);
            out.extend(self.release(&node));
        }
        out
    }

    fn release(&mut self, node: &str) -> Vec<ShardOut> {
        self.owned.remove(node);
        self.renewed.remove(node);
        self.writing.insert(node.to_string());
        vec![
            ShardOut::Owned(node.to_string(), false),
            ShardOut::Write(self.claim(node, None, "vnode")),
        ]
    }

    /// Shutdown: stop claiming, stop driving, release every owned Lease and the membership.
    pub fn leave(&mut self) -> Vec<ShardOut> {
        self.leaving = true;
        let owned: Vec<String> = self.owned.iter().cloned().collect();
        let mut out = Vec::new();
        for node in owned {
            out.extend(self.release(&node));
        }
        out.push(ShardOut::Delete(self.cfg.membership_name()));
        out
    }
}

#[cfg(test)]
mod tests;
