//! The peer replica sync task: watches VNodes and peer Deployments, and rescales.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::Api as KubeApi;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Debounce, PEER_STRATEGY, RETRY, STRATEGY_LABEL, Written, plan};
use crate::apiserver::events::Notice;
use crate::apiserver::watch::{self, WatchHealth, WatchMetrics};
use crate::apiserver::{self, Api};
use crate::vnode::shape::{COMPONENT_LABEL, ENV_LABEL};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// Peer sync counters.
#[derive(Clone, Debug, Default)]
pub struct PeerMetrics {
    outcomes: Family<OutcomeLabel, Counter>,
}

impl PeerMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = PeerMetrics::default();
        registry.register(
            "peer_replica_sync",
            "Peer deployment replica sync: rescales done, write errors",
            m.outcomes.clone(),
        );
        for outcome in ["rescaled", "error"] {
            let _ = m.outcomes.get_or_create(&OutcomeLabel { outcome });
        }
        m
    }

    fn count(&self, outcome: &'static str) {
        self.outcomes.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// How often the sync ended with `outcome` (`rescaled`, `error`).
    pub fn total(&self, outcome: &'static str) -> u64 {
        self.outcomes.get_or_create(&OutcomeLabel { outcome }).get()
    }
}

/// Keeps peer Deployments at one replica per matching Ready VNode of `env` until cancelled.
/// Errors are logged, counted and retried; nothing here is fatal.
pub async fn run(
    api: Api,
    env: String,
    metrics: PeerMetrics,
    watches: (WatchHealth, WatchMetrics),
    leader: Option<Arc<std::sync::atomic::AtomicBool>>,
    cancel: CancellationToken,
) {
    let node_cfg =
        watcher::Config::default().labels(&format!("{COMPONENT_LABEL}=vnode,{ENV_LABEL}={env}"));
    let dep_cfg = watcher::Config::default().labels(&format!("{STRATEGY_LABEL}={PEER_STRATEGY}"));
    let (health, wm) = watches;
    let mut node_rx = watch::spawn(
        "peer-nodes",
        KubeApi::<Node>::all(api.client.clone()),
        node_cfg,
        health.clone(),
        wm.clone(),
        cancel.clone(),
    );
    let mut dep_rx = watch::spawn(
        "peer-deployments",
        KubeApi::<Deployment>::all(api.client.clone()),
        dep_cfg,
        health,
        wm,
        cancel.clone(),
    );
    let (nodes, mut node_writer) = reflector::store::<Node>();
    let (deployments, mut dep_writer) = reflector::store::<Deployment>();
    let mut synced = [false; 2];
    let mut schedule = Debounce::default();
    let mut written = Written::default();
    info!(env = %env, "peer deployment replica sync started");
    loop {
        let deadline = schedule.deadline();
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(ev) = node_rx.recv() => {
                node_writer.apply_watcher_event(&ev);
                synced[0] |= matches!(ev, watcher::Event::InitDone);
                schedule.touch(Instant::now());
            }
            Some(ev) = dep_rx.recv() => {
                dep_writer.apply_watcher_event(&ev);
                synced[1] |= matches!(ev, watcher::Event::InitDone);
                schedule.touch(Instant::now());
            }
            _ = sleep_until(deadline) => {
                schedule.clear();
                // With several replicas, one rescales (the others would only repeat it).
                let leads = leader
                    .as_ref()
                    .is_none_or(|l| l.load(std::sync::atomic::Ordering::Relaxed));
                let done = leads
                    && synced.iter().all(|s| *s)
                    && sync_once(&api, &metrics, &env, &nodes, &deployments, &mut written).await;
                if !done {
                    schedule.retry(Instant::now() + RETRY);
                }
            }
        }
    }
    info!(env = %env, "peer deployment replica sync stopped");
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Applies one plan; false when some write failed (the caller retries).
async fn sync_once(
    api: &Api,
    metrics: &PeerMetrics,
    env: &str,
    nodes: &Store<Node>,
    deployments: &Store<Deployment>,
    written: &mut Written,
) -> bool {
    let node_state = nodes.state();
    let node_refs: Vec<&Node> = node_state.iter().map(Arc::as_ref).collect();
    let dep_state = deployments.state();
    let rescales = plan(dep_state.iter().map(Arc::as_ref), &node_refs, env);
    debug!(
        env,
        nodes = node_refs.len(),
        deployments = dep_state.len(),
        rescales = rescales.len(),
        "peer sync pass"
    );
    let mut ok = true;
    for r in &rescales {
        if written.already(r) {
            continue;
        }
        let deployment = format!("{}/{}", r.namespace, r.name);
        match api.scale_deployment(&r.namespace, &r.name, r.to).await {
            Ok(()) => {
                metrics.count("rescaled");
                written.record(r);
                info!(%deployment, from = r.from, to = r.to, "peer deployment rescaled to its Ready bases");
                if let Some(d) = dep_state.iter().find(|d| {
                    d.namespace().as_deref() == Some(&r.namespace) && d.name_any() == r.name
                }) {
                    // Distinct actions keep ups and downs apart: the recorder folds repeats of
                    // one (reason, action) into a single Event series.
                    let action = if r.to > r.from {
                        "ScaleUp"
                    } else {
                        "ScaleDown"
                    };
                    let notice = Notice {
                        warning: false,
                        reason: "PeerReplicasSynced".into(),
                        action: action.into(),
                        note: format!(
                            "replicas {} -> {}: {} Ready base(s) of env {env} match the pod template",
                            r.from, r.to, r.to
                        ),
                    };
                    api.event(&apiserver::object_ref(d.as_ref()), notice).await;
                }
            }
            Err(e) => {
                ok = false;
                metrics.count("error");
                warn!(%deployment, from = r.from, to = r.to, error = %e, "peer deployment rescale failed; retrying");
            }
        }
    }
    ok
}
