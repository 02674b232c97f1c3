//! The base tasks: one per base, started when a base first speaks (or its VNode is adopted),
//! ended when it drains or expires. Delivers what the index and the tunnels have for them.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span};

use crate::apiserver::Api;
use crate::base::{
    ActorExit, ActorSettings, BaseActor, BaseMetrics, BaseMsg, EffectsDeps, WantedModulesTx,
};
use crate::controller::index::{Index, Out};
use crate::metrics::ControllerMetrics;
use crate::offload::Pool;
use crate::rollout::PolicySource;
use crate::tunnel::Tunnel;
use crate::vnode::shape;

/// A task that ended: (VNode name, generation, why).
pub type Exit = (String, u64, ActorExit);

struct Entry {
    tx: mpsc::UnboundedSender<BaseMsg>,
    generation: u64,
}

/// What every task is started with.
pub struct TaskDeps {
    /// Apiserver writes.
    pub api: Api,
    /// Ordering and batch rules.
    pub policies: Arc<dyn PolicySource>,
    /// Shared task settings.
    pub settings: Arc<ActorSettings>,
    /// Tunnels by name.
    pub tunnels: HashMap<String, Arc<dyn Tunnel>>,
    /// Counters of the tasks.
    pub base_metrics: BaseMetrics,
    /// Counters of the controller.
    pub metrics: ControllerMetrics,
    /// Where plugin calls run, when plugins are loaded.
    pub pool: Option<Pool>,
}

/// The running base tasks, by VNode name.
pub struct Tasks {
    deps: TaskDeps,
    tasks: HashMap<String, Entry>,
    /// Base identity of each task's VNode.
    ids: HashMap<String, String>,
    generation: u64,
    exits: mpsc::UnboundedSender<Exit>,
    /// What unbound pods want, read by every task when it plans.
    wanted: WantedModulesTx,
}

impl Tasks {
    /// No tasks yet; ended tasks report on `exits`.
    pub fn new(deps: TaskDeps, exits: mpsc::UnboundedSender<Exit>) -> Self {
        Tasks {
            deps,
            tasks: HashMap::new(),
            ids: HashMap::new(),
            generation: 0,
            exits,
            wanted: WantedModulesTx::new(Arc::default()),
        }
    }

    /// Whether a task runs for VNode `node`.
    pub fn contains(&self, node: &str) -> bool {
        self.tasks.contains_key(node)
    }

    /// The tunnels.
    pub fn tunnels(&self) -> impl Iterator<Item = &Arc<dyn Tunnel>> {
        self.deps.tunnels.values()
    }

    /// Starts the task of base `base_id` on `tunnel`, telling it `bootstrap` first. False
    /// when no tunnel runs.
    pub fn spawn(&mut self, base_id: &str, tunnel: &str, bootstrap: Vec<BaseMsg>) -> bool {
        let node = shape::node_name(base_id, &self.deps.settings.env);
        let Some(t) = self
            .deps
            .tunnels
            .get(tunnel)
            .or_else(|| self.deps.tunnels.values().next())
            .cloned()
        else {
            return false;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.generation += 1;
        let generation = self.generation;
        let actor = BaseActor::new(
            base_id,
            self.deps.settings.clone(),
            EffectsDeps {
                api: self.deps.api.clone(),
                tunnel: t,
                policies: self.deps.policies.clone(),
                metrics: self.deps.base_metrics.clone(),
                order: self.deps.settings.order,
                pool: self.deps.pool.clone(),
            },
            self.wanted.subscribe(),
        );
        let exits = self.exits.clone();
        let span = info_span!("base", id = %base_id);
        let key = node.clone();
        // The actor moves into its future here, not into the spawned block: a block that
        // captured it would hold a second, dead copy of it (4 KB a base) beside the future.
        let run = actor.run(rx);
        tokio::spawn(
            async move {
                let exit = run.await;
                let _ = exits.send((key, generation, exit));
            }
            .instrument(span),
        );
        for m in bootstrap {
            let _ = tx.send(m);
        }
        self.deps.metrics.bases.inc();
        self.ids.insert(node.clone(), base_id.to_string());
        self.tasks.insert(node, Entry { tx, generation });
        true
    }

    /// Sends `msg` to the task of VNode `node`, if it runs.
    pub fn send(&self, node: &str, msg: BaseMsg) {
        if let Some(t) = self.tasks.get(node) {
            let _ = t.tx.send(msg);
        }
    }

    /// Delivers what the index produced.
    pub fn deliver(&self, outs: Vec<Out>, index: &Index) {
        for out in outs {
            match out {
                Out::Base(node, msg) => self.send(&node, msg),
                Out::Rollouts(r) => {
                    for t in self.tasks.values() {
                        let _ = t.tx.send(BaseMsg::Rollouts(r.clone()));
                    }
                }
                Out::Wanted(w) => {
                    self.wanted.send_replace(w);
                }
                Out::Peers(p) => {
                    for t in self.tasks.values() {
                        let _ = t.tx.send(BaseMsg::Peers(p.clone()));
                    }
                }
                Out::Evaluate(job) => {
                    debug!(owner = %job.owner, "evaluation reached the tasks; dropped");
                }
                Out::Resynced => {
                    for (node, t) in &self.tasks {
                        let pods = index.pods_on(node);
                        let _ = t.tx.send(BaseMsg::PodsSynced(pods));
                    }
                }
            }
        }
    }

    /// A task ended; forgets it unless a newer task for the same base already runs. True when
    /// the base has no task any more.
    pub fn on_exit(&mut self, node: &str, generation: u64, exit: ActorExit) -> bool {
        info!(node, ?exit, "base task ended");
        self.deps.metrics.task_exited(match exit {
            ActorExit::Drained => "drained",
            ActorExit::Expired => "expired",
            ActorExit::Stopped => "stopped",
        });
        if self
            .tasks
            .get(node)
            .is_some_and(|a| a.generation == generation)
        {
            self.tasks.remove(node);
            self.deps.metrics.bases.dec();
            if let Some(id) = self.ids.remove(node) {
                for t in self.deps.tunnels.values() {
                    t.forget(&id);
                }
            }
            true
        } else {
            debug!(node, "an older task of the base ended");
            false
        }
    }

    /// Stops every task (their channels close).
    pub fn clear(&mut self) {
        self.tasks.clear();
    }
}
