//! Watches in their own tasks: each backs off on errors by itself (kube's `default_backoff`),
//! forwards events over a bounded channel, and reports its health, so that a failing watch
//! never stalls the tunnels or the base tasks.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::Resource;
use kube::api::Api as KubeApi;
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a watch keeps of an object: only what the controller reads. Watched objects live as
/// long as they exist, so at thousands of pods every field kept is memory held.
pub trait Slim {
    /// Drops the fields the controller never reads (`managedFields` is dropped for all kinds).
    fn slim(&mut self) {}
}

impl Slim for k8s_openapi::api::core::v1::Pod {
    /// A module pod's containers are modules: their volumes (the service-account token that
    /// admission adds to every pod), mounts, probes, hooks, resources and env other than the
    /// module's version mean nothing to a base, nor does the pod's affinity once it is bound
    /// (the scheduler has read it). Only watches see the trimmed pod; the controller writes
    /// pods by status patches only.
    fn slim(&mut self) {
        let Some(spec) = self.spec.as_mut() else {
            return;
        };
        spec.volumes = None;
        spec.affinity = None;
        spec.topology_spread_constraints = None;
        for c in spec
            .containers
            .iter_mut()
            .chain(spec.init_containers.iter_mut().flatten())
        {
            if let Some(env) = c.env.as_mut() {
                env.retain(|e| e.name == crate::vpod::spec::BIZ_VERSION_ENV);
            }
            c.env_from = None;
            c.resources = None;
            c.ports = None;
            c.command = None;
            c.args = None;
            c.volume_mounts = None;
            c.volume_devices = None;
            c.liveness_probe = None;
            c.readiness_probe = None;
            c.startup_probe = None;
            c.lifecycle = None;
            c.security_context = None;
        }
    }
}

impl Slim for k8s_openapi::api::apps::v1::Deployment {}
impl Slim for k8s_openapi::api::core::v1::Node {}
impl Slim for k8s_openapi::api::coordination::v1::Lease {}

/// Health of one watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchState {
    /// Started, initial list not complete yet.
    Starting,
    /// Listed and watching.
    Synced,
    /// The last attempt failed (the watch retries with backoff).
    Failing(String),
}

/// The health of every watch, for `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct WatchHealth(Arc<Mutex<BTreeMap<String, WatchState>>>);

impl WatchHealth {
    fn set(&self, name: &str, state: WatchState) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), state);
    }

    /// Every watch and its state.
    pub fn states(&self) -> BTreeMap<String, WatchState> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `None` when every watch is synced, else why not.
    pub fn problem(&self) -> Option<String> {
        let states = self.states();
        let bad: Vec<String> = states
            .iter()
            .filter_map(|(n, s)| match s {
                WatchState::Synced => None,
                WatchState::Starting => Some(format!("{n}: not synced yet")),
                WatchState::Failing(e) => Some(format!("{n}: {e}")),
            })
            .collect();
        (!bad.is_empty()).then(|| bad.join("; "))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WatchLabel {
    watch: String,
}

/// Watch counters.
#[derive(Clone, Debug, Default)]
pub struct WatchMetrics {
    events: Family<WatchLabel, Counter>,
    errors: Family<WatchLabel, Counter>,
}

impl WatchMetrics {
    /// Registers the families in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = WatchMetrics::default();
        registry.register(
            "watch_events",
            "Watch events received, by watch",
            m.events.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch errors (each followed by a backed-off retry), by watch",
            m.errors.clone(),
        );
        m
    }

    /// Errors of watch `name` so far.
    pub fn errors(&self, name: &str) -> u64 {
        self.errors
            .get_or_create(&WatchLabel {
                watch: name.to_string(),
            })
            .get()
    }
}

/// Starts a watch of `api` named `name` in its own task; events arrive on the returned channel.
/// The task ends when `cancel` fires or the receiver is dropped.
pub fn spawn<K>(
    name: &str,
    api: KubeApi<K>,
    config: watcher::Config,
    health: WatchHealth,
    metrics: WatchMetrics,
    cancel: CancellationToken,
) -> mpsc::Receiver<watcher::Event<K>>
where
    K: Resource + Slim + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (tx, rx) = mpsc::channel(1024);
    let name = name.to_string();
    health.set(&name, WatchState::Starting);
    let label = WatchLabel {
        watch: name.clone(),
    };
    tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().boxed();
        let mut failing = false;
        loop {
            let item = tokio::select! {
                _ = cancel.cancelled() => return,
                item = stream.next() => item,
            };
            match item {
                Some(Ok(mut ev)) => {
                    metrics.events.get_or_create(&label).inc();
                    // Who wrote which field is of no use here and is often the largest part of
                    // an object: at 5,000 pods it was most of the controller's memory.
                    if let watcher::Event::Apply(o)
                    | watcher::Event::InitApply(o)
                    | watcher::Event::Delete(o) = &mut ev
                    {
                        o.meta_mut().managed_fields = None;
                        o.slim();
                    }
                    if failing {
                        info!(watch = %name, "watch recovered");
                        failing = false;
                        health.set(&name, WatchState::Synced);
                    }
                    if matches!(ev, watcher::Event::InitDone) {
                        health.set(&name, WatchState::Synced);
                    }
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                Some(Err(e)) => {
                    metrics.errors.get_or_create(&label).inc();
                    // Logged once per failure streak: the backoff retries quietly.
                    if !failing {
                        warn!(watch = %name, error = %e, "watch failing; retrying with backoff");
                        failing = true;
                    }
                    health.set(&name, WatchState::Failing(e.to_string()));
                }
                None => {
                    warn!(watch = %name, "watch stream ended");
                    health.set(&name, WatchState::Failing("stream ended".into()));
                    return;
                }
            }
        }
    });
    rx
}

/// Watches that stall without an error (a frozen apiserver keeps its connections open) look
/// healthy; this probe asks the apiserver for its version every `every` and reports it as
/// the `apiserver` entry of `health`.
pub fn spawn_probe(
    client: kube::Client,
    health: WatchHealth,
    reachable: std::sync::Arc<std::sync::atomic::AtomicBool>,
    every: std::time::Duration,
    cancel: CancellationToken,
) {
    health.set("apiserver", WatchState::Synced);
    tokio::spawn(async move {
        let mut failing = false;
        loop {
            let answer = tokio::time::timeout(every, client.apiserver_version()).await;
            match answer {
                Ok(Ok(_)) => {
                    reachable.store(true, std::sync::atomic::Ordering::Relaxed);
                    if failing {
                        info!("apiserver reachable again");
                        failing = false;
                    }
                    health.set("apiserver", WatchState::Synced);
                }
                Ok(Err(e)) => {
                    reachable.store(true, std::sync::atomic::Ordering::Relaxed);
                    if !failing {
                        warn!(error = %e, "apiserver unreachable");
                        failing = true;
                    }
                    health.set("apiserver", WatchState::Failing(e.to_string()));
                }
                Err(_) => {
                    // An answer, even an error, means writes reach it; silence means they
                    // would wait out their deadline.
                    reachable.store(false, std::sync::atomic::Ordering::Relaxed);
                    if !failing {
                        warn!("apiserver not answering");
                        failing = true;
                    }
                    health.set(
                        "apiserver",
                        WatchState::Failing(format!("no answer within {} s", every.as_secs())),
                    );
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    #[test]
    fn a_slim_pod_keeps_what_makes_it_a_module_and_where_it_may_run() {
        let mut pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "biz1-a", "namespace": "default", "uid": "u1",
                "labels": {"virtual-kubelet.koupleless.io/component": "module"}},
            "spec": {
                "nodeName": "vnode.b1.dev",
                "nodeSelector": {"base.koupleless.io/name": "base"},
                "tolerations": [{"key": "schedule.koupleless.io/virtual-node", "operator": "Exists"}],
                "volumes": [{"name": "kube-api-access-x", "projected": {"sources": []}}],
                "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                    {"weight": 1, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}]}},
                "containers": [{"name": "biz1", "image": "https://repo/biz1.jar",
                    "env": [{"name": "JAVA_OPTS", "value": "-Xmx1g"},
                        {"name": "BIZ_VERSION", "value": "1.0.0"}],
                    "resources": {"requests": {"cpu": "100m"}},
                    "volumeMounts": [{"name": "kube-api-access-x", "mountPath": "/var/run"}],
                    "readinessProbe": {"httpGet": {"path": "/", "port": 8080}}}]
            }
        }))
        .expect("pod");
        let before = crate::vpod::spec::modules_of(&pod);
        pod.slim();
        assert_eq!(crate::vpod::spec::modules_of(&pod), before);
        let spec = pod.spec.as_ref().expect("spec");
        assert_eq!(spec.node_name.as_deref(), Some("vnode.b1.dev"));
        assert!(spec.node_selector.is_some() && spec.tolerations.is_some());
        assert!(spec.volumes.is_none() && spec.affinity.is_none());
        let c = &spec.containers[0];
        assert!(c.volume_mounts.is_none() && c.readiness_probe.is_none());
        assert!(c.resources.is_none());
        assert_eq!(c.env.as_ref().map(Vec::len), Some(1));
    }
}
