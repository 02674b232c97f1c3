//! The plugin host: the current snapshot of loaded plugins and their bindings, swapped
//! atomically on reload, and the handles the controller calls.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use tokio::sync::{broadcast, watch};
use tracing::info;

use crate::rollout::batch::{AdmitAll, BatchPolicy};
use crate::rollout::ordering::{DefaultOrdering, OrderingRule};
use crate::tunnel::codec::{CodecSet, MessageCodec};

use super::batch::WasmBatch;
use super::cache::content_hash;
use super::codec::WasmCodec;
use super::faults::{FaultSink, PluginFault, reasons};
use super::limits::Limits;
use super::loader::{self, LoadRequest, PluginVersion, Runtime};
use super::manifest::{BUILTIN_BATCH, MANIFEST_FILE, Manifest};
use super::ordering::WasmOrdering;
use super::{LoadedPlugin, PluginConfig, PluginKind, telemetry};

/// What was refused for a plugin, so an unchanged broken file is not retried and re-reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refused {
    hash: String,
    config: String,
    expected: Option<PluginKind>,
    fault: PluginFault,
}

/// Everything the host serves, swapped whole.
#[derive(Default)]
struct Snapshot {
    manifest: Manifest,
    manifest_error: Option<PluginFault>,
    versions: BTreeMap<String, Arc<PluginVersion>>,
    refused: BTreeMap<String, Refused>,
    ordering: Option<Arc<WasmOrdering>>,
    batch_default: Option<Arc<WasmBatch>>,
    batch_selectable: BTreeMap<String, Arc<WasmBatch>>,
    codecs: Vec<Arc<WasmCodec>>,
}

pub(crate) struct Inner {
    pub(crate) cfg: PluginConfig,
    rt: Runtime,
    faults: Arc<FaultSink>,
    state: RwLock<Arc<Snapshot>>,
    codecs: watch::Sender<CodecSet>,
    reload_lock: Mutex<()>,
    default_ordering: Arc<dyn OrderingRule>,
    admit_all: Arc<dyn BatchPolicy>,
    pub(crate) watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

/// The WASM plugin host. Cheap to clone; the watcher stops when the last clone is dropped.
#[derive(Clone)]
pub struct PluginHost {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for PluginHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginHost")
            .field("dir", &self.inner.cfg.dir)
            .finish_non_exhaustive()
    }
}

impl PluginHost {
    /// Loads the plugins directory and starts watching it. Fails only when the host itself
    /// cannot run (no directory, no Engine); broken plugins are reported as faults.
    pub async fn start(cfg: PluginConfig) -> anyhow::Result<PluginHost> {
        let host = PluginHost::new(cfg)?;
        let h = host.clone();
        tokio::task::spawn_blocking(move || h.inner.rescan())
            .await
            .context("initial plugin load panicked")?;
        super::reload::watch(&host).context("watching the plugins directory")?;
        Ok(host)
    }

    /// A host with nothing loaded and no watcher (for the CLI and `start`).
    pub(crate) fn new(cfg: PluginConfig) -> anyhow::Result<PluginHost> {
        anyhow::ensure!(
            cfg.dir.is_dir(),
            "plugins directory {} does not exist or is not a directory",
            cfg.dir.display()
        );
        let limits = Limits {
            budget: cfg.call_budget,
            memory_bytes: cfg.memory_limit_bytes,
        };
        let rt = Runtime::new(Some(&cfg.cache_dir), limits)?;
        let empty: CodecSet = Arc::new(Vec::new());
        let (codecs, _) = watch::channel(empty);
        Ok(PluginHost {
            inner: Arc::new(Inner {
                faults: Arc::new(FaultSink::new(256, cfg.fault_interval)),
                cfg,
                rt,
                state: RwLock::new(Arc::new(Snapshot::default())),
                codecs,
                reload_lock: Mutex::new(()),
                default_ordering: Arc::new(DefaultOrdering),
                admit_all: Arc::new(AdmitAll),
                watcher: Mutex::new(None),
            }),
        })
    }

    /// The current status-ordering rule (the built-in default when none is bound). Call it
    /// per decision: it is one lock read and an Arc clone, and a call in flight keeps the
    /// version it started on.
    pub fn ordering_rule(&self) -> Arc<dyn OrderingRule> {
        match &self.inner.snapshot().ordering {
            Some(o) => o.clone(),
            None => self.inner.default_ordering.clone(),
        }
    }

    /// The batch policy for a Deployment with these annotations: the one its selecting
    /// annotation names (`builtin` for admit-all), else the manifest default, else admit-all.
    /// Call it per decision, like [`PluginHost::ordering_rule`].
    pub fn batch_policy_for(
        &self,
        deployment_annotations: &BTreeMap<String, String>,
    ) -> Arc<dyn BatchPolicy> {
        let snap = self.inner.snapshot();
        let default = || -> Arc<dyn BatchPolicy> {
            match &snap.batch_default {
                Some(p) => p.clone(),
                None => self.inner.admit_all.clone(),
            }
        };
        let Some(wanted) = deployment_annotations.get(&snap.manifest.batch.annotation) else {
            return default();
        };
        let wanted = wanted.trim();
        if wanted == BUILTIN_BATCH {
            return self.inner.admit_all.clone();
        }
        if let Some(p) = snap.batch_selectable.get(wanted) {
            return p.clone();
        }
        let why = if snap.manifest.batch.selectable.iter().any(|s| s == wanted) {
            "is selectable but not loaded"
        } else {
            "is not a selectable batch policy"
        };
        telemetry::failure(wanted, PluginKind::BatchPolicy, reasons::NOT_FOUND);
        self.inner.faults.emit(PluginFault {
            plugin: wanted.to_string(),
            kind: PluginKind::BatchPolicy,
            reason: reasons::NOT_FOUND.to_string(),
            message: format!(
                "annotation {}={wanted:?} {why}; using the default policy",
                snap.manifest.batch.annotation
            ),
            subject: None,
        });
        default()
    }

    /// The tunnel adapters to serve beside the built-in codec; changes on every swap of the
    /// adapter set (and only then).
    pub fn codecs(&self) -> watch::Receiver<CodecSet> {
        self.inner.codecs.subscribe()
    }

    /// Faults from now on (lossy under bursts: a lagging receiver skips; metrics count all).
    pub fn faults(&self) -> broadcast::Receiver<PluginFault> {
        self.inner.faults.subscribe()
    }

    /// The loaded plugin versions.
    pub fn status(&self) -> Vec<LoadedPlugin> {
        self.inner
            .snapshot()
            .versions
            .values()
            .map(|v| LoadedPlugin {
                name: v.name.to_string(),
                kind: v.kind,
                plugin_name: v.plugin_name.clone(),
                version: v.version.clone(),
                api_version: v.api_version.clone(),
                content_hash: v.hash.clone(),
                file: v.file.clone(),
                loaded_at: v.loaded_at,
                load_time: v.load_time,
                from_cache: v.from_cache,
                peak_instance_memory: v.peak_memory.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect()
    }

    /// Current load problems (refused plugin files, an invalid manifest), also for faults
    /// raised before anyone subscribed.
    pub fn load_errors(&self) -> Vec<PluginFault> {
        let snap = self.inner.snapshot();
        snap.manifest_error
            .iter()
            .cloned()
            .chain(snap.refused.values().map(|r| r.fault.clone()))
            .collect()
    }

    /// Rescans the directory now (also done on change notifications and periodically).
    pub async fn rescan(&self) -> anyhow::Result<()> {
        let h = self.clone();
        tokio::task::spawn_blocking(move || h.inner.rescan())
            .await
            .context("plugin rescan panicked")
    }
}

impl Inner {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn fault(&self, plugin: &str, kind: PluginKind, reason: &str, message: String) -> PluginFault {
        telemetry::failure(plugin, kind, reason);
        let f = PluginFault {
            plugin: plugin.to_string(),
            kind,
            reason: reason.to_string(),
            message,
            subject: None,
        };
        self.faults.emit(f.clone());
        f
    }

    /// Re-reads the manifest and every plugin file; loads what changed; swaps.
    pub(crate) fn rescan(&self) {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.snapshot();
        let dir = &self.cfg.dir;
        let manifest = match Manifest::load(dir) {
            Ok(m) => m,
            Err(e) => {
                let message = format!("{e}; keeping the previous configuration");
                let fault = match &old.manifest_error {
                    Some(f) if f.message == message => f.clone(),
                    _ => {
                        telemetry::reload(false);
                        self.fault(
                            MANIFEST_FILE,
                            PluginKind::Unknown,
                            reasons::LOAD_FAILED,
                            message,
                        )
                    }
                };
                self.swap(Snapshot {
                    manifest: old.manifest.clone(),
                    manifest_error: Some(fault),
                    versions: old.versions.clone(),
                    refused: old.refused.clone(),
                    ordering: old.ordering.clone(),
                    batch_default: old.batch_default.clone(),
                    batch_selectable: old.batch_selectable.clone(),
                    codecs: old.codecs.clone(),
                });
                return;
            }
        };
        let mut versions = BTreeMap::new();
        let mut refused = BTreeMap::new();
        for (name, entry) in &manifest.plugins {
            let file = dir.join(&entry.file);
            let config = entry.config_string();
            let expected = manifest.expected_kind(name);
            let previous = old.versions.get(name);
            let (hash, outcome) = match loader::read(&file) {
                Ok(bytes) => {
                    let hash = content_hash(&bytes);
                    if let Some(p) = previous
                        && p.hash == hash
                        && *p.config == *config
                        && expected.is_none_or(|k| k == p.kind)
                    {
                        versions.insert(name.clone(), p.clone());
                        continue;
                    }
                    if let Some(r) = old.refused.get(name)
                        && r.hash == hash
                        && r.config == config
                        && r.expected == expected
                    {
                        refused.insert(name.clone(), r.clone());
                        if let Some(p) = previous {
                            versions.insert(name.clone(), p.clone());
                        }
                        continue;
                    }
                    let req = LoadRequest {
                        name,
                        file: &file,
                        bytes: &bytes,
                        config: &config,
                        expected,
                    };
                    (hash, loader::load(&self.rt, req))
                }
                Err(e) => ("unreadable".to_string(), Err(e)),
            };
            match outcome {
                Ok(v) => {
                    telemetry::reload(true);
                    info!(
                        plugin = %name,
                        kind = %v.kind,
                        version = %v.version,
                        sha256 = %&v.hash[..12],
                        from_cache = v.from_cache,
                        load_ms = v.load_time.as_millis() as u64,
                        "plugin version loaded"
                    );
                    versions.insert(name.clone(), Arc::new(v));
                }
                Err(e) => {
                    telemetry::reload(false);
                    let keeping = match previous {
                        Some(p) => {
                            format!("keeping version {} (sha256 {})", p.version, &p.hash[..12])
                        }
                        None => "not loaded; the built-in default serves its uses".to_string(),
                    };
                    let short = &hash[..hash.len().min(12)];
                    let message = format!("{} (sha256 {short}): {e}; {keeping}", rel(dir, &file));
                    let kind = expected
                        .or(previous.map(|p| p.kind))
                        .unwrap_or(PluginKind::Unknown);
                    let fault = self.fault(name, kind, reasons::LOAD_FAILED, message);
                    refused.insert(
                        name.clone(),
                        Refused {
                            hash,
                            config,
                            expected,
                            fault,
                        },
                    );
                    if let Some(p) = previous {
                        versions.insert(name.clone(), p.clone());
                    }
                }
            }
        }
        let next = self.bind(manifest, versions, refused, &old);
        self.swap(next);
    }

    /// Builds the bindings, reusing wrappers whose version did not change.
    fn bind(
        &self,
        manifest: Manifest,
        versions: BTreeMap<String, Arc<PluginVersion>>,
        refused: BTreeMap<String, Refused>,
        old: &Snapshot,
    ) -> Snapshot {
        let of_kind = |name: &String, kind: PluginKind| {
            versions.get(name).filter(|v| v.kind == kind).cloned()
        };
        let ordering = manifest
            .ordering
            .as_ref()
            .and_then(|n| of_kind(n, PluginKind::StatusOrdering))
            .map(|v| match &old.ordering {
                Some(o) if Arc::ptr_eq(o.version(), &v) => o.clone(),
                _ => Arc::new(WasmOrdering::new(v, self.faults.clone())),
            });
        let batch = |name: &String| {
            of_kind(name, PluginKind::BatchPolicy).map(|v| {
                let reuse = old
                    .batch_selectable
                    .values()
                    .chain(&old.batch_default)
                    .find(|b| Arc::ptr_eq(b.version(), &v));
                match reuse {
                    Some(b) => b.clone(),
                    None => Arc::new(WasmBatch::new(v, self.faults.clone())),
                }
            })
        };
        let batch_default = manifest.batch.default.as_ref().and_then(batch);
        let batch_selectable = manifest
            .batch
            .selectable
            .iter()
            .filter_map(|n| batch(n).map(|b| (n.clone(), b)))
            .collect();
        let codecs = manifest
            .tunnel_adapters
            .iter()
            .filter_map(|n| of_kind(n, PluginKind::TunnelAdapter))
            .map(
                |v| match old.codecs.iter().find(|c| Arc::ptr_eq(c.version(), &v)) {
                    Some(c) => c.clone(),
                    None => Arc::new(WasmCodec::new(v, self.faults.clone())),
                },
            )
            .collect();
        Snapshot {
            manifest,
            manifest_error: None,
            versions,
            refused,
            ordering,
            batch_default,
            batch_selectable,
            codecs,
        }
    }

    fn swap(&self, next: Snapshot) {
        for kind in PluginKind::ALL {
            telemetry::loaded(
                kind,
                next.versions.values().filter(|v| v.kind == kind).count(),
            );
        }
        let codecs_changed = {
            let old = self.snapshot();
            old.codecs.len() != next.codecs.len()
                || old
                    .codecs
                    .iter()
                    .zip(&next.codecs)
                    .any(|(a, b)| !Arc::ptr_eq(a, b))
        };
        let set: Option<CodecSet> = codecs_changed.then(|| {
            Arc::new(
                next.codecs
                    .iter()
                    .map(|c| c.clone() as Arc<dyn MessageCodec>)
                    .collect::<Vec<_>>(),
            )
        });
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        if let Some(set) = set {
            info!(adapters = set.len(), "tunnel adapter set changed");
            self.codecs.send_replace(set);
        }
    }
}

fn rel(dir: &Path, file: &Path) -> String {
    file.strip_prefix(dir).unwrap_or(file).display().to_string()
}
