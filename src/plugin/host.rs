//! The plugin host: the current snapshot of loaded plugins and their bindings, swapped
//! atomically on reload, and the handles the controller calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::{broadcast, watch};
use tracing::info;

use crate::rollout::batch::{AdmitAll, BatchPolicy, OnFailure};
use crate::rollout::ordering::{DefaultOrdering, OrderingRule};
use crate::tunnel::codec::{CodecSet, MessageCodec};

use super::batch::{UnloadedBatch, WasmBatch};
use super::cache::content_hash;
use super::codec::WasmCodec;
use super::config::PluginConfig;
use super::faults::{FaultSink, PluginFault, Reporter, reasons};
use super::kind::PluginKind;
use super::limits::Limits;
use super::loader::{self, LoadLimits, LoadRequest, PluginVersion, Runtime};
use super::manifest::{BUILTIN_BATCH, MANIFEST_FILE, Manifest};
use super::ordering::WasmOrdering;
use super::pool::PluginPool;
use super::reload::{self, Rescan, WatchTiming};

/// A loaded plugin version, as reported by [`PluginHost::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPlugin {
    /// Name in the manifest.
    pub name: String,
    /// Kind.
    pub kind: PluginKind,
    /// Name the plugin gives itself.
    pub plugin_name: String,
    /// Version the plugin gives itself.
    pub version: String,
    /// Plugin API version it was built for.
    pub api_version: String,
    /// SHA-256 of the component file.
    pub content_hash: String,
    /// Where it was loaded from.
    pub file: PathBuf,
    /// When this version was loaded.
    pub loaded_at: SystemTime,
    /// Time from reading the file to a validated version (compile or cache load included).
    pub load_time: Duration,
    /// Whether the compiled code came from the artefact cache.
    pub from_cache: bool,
    /// Largest size (all memories and tables) one instance of this version has reached so far.
    pub peak_instance_memory: usize,
}

/// What was refused for a plugin, so an unchanged broken file is not retried and re-reported.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refused {
    hash: String,
    config: String,
    expected: Option<PluginKind>,
    /// The load error, to tell an unchanged unreadable file from a newly unreadable one.
    error: String,
    fault: PluginFault,
}

/// What became of one plugin entry in a rescan.
enum Outcome {
    /// A new version, validated.
    Loaded(Box<PluginVersion>),
    /// Refused now, with this error.
    Refused(String),
    /// Refused before for the same content and settings: not retried, not re-reported.
    StillRefused(Refused),
}

/// Everything the host serves, swapped whole.
#[derive(Default)]
struct Snapshot {
    manifest: Manifest,
    manifest_error: Option<PluginFault>,
    versions: BTreeMap<String, Arc<PluginVersion>>,
    refused: BTreeMap<String, Refused>,
    ordering: Option<Arc<WasmOrdering>>,
    batch_default: Option<Arc<dyn BatchPolicy>>,
    batch_selectable: BTreeMap<String, Arc<dyn BatchPolicy>>,
    codecs: Vec<Arc<WasmCodec>>,
}

impl Snapshot {
    fn load_errors(&self) -> Vec<PluginFault> {
        self.manifest_error
            .iter()
            .cloned()
            .chain(self.refused.values().map(|r| r.fault.clone()))
            .collect()
    }
}

struct Inner {
    cfg: PluginConfig,
    rt: Runtime,
    reporter: Reporter,
    pool: PluginPool,
    state: RwLock<Arc<Snapshot>>,
    codecs: watch::Sender<CodecSet>,
    reload_lock: Mutex<()>,
    default_ordering: Arc<dyn OrderingRule>,
    admit_all: Arc<dyn BatchPolicy>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

/// The WASM plugin host. Cheap to clone; the watcher and the call pool stop when the last
/// clone is dropped.
#[derive(Clone)]
pub struct PluginHost {
    inner: Arc<Inner>,
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
    /// cannot run (no directory, no Engine, no threads); broken plugins are reported as faults,
    /// which [`PluginHost::faults`] replays to subscribers that come after this returns.
    pub async fn start(cfg: PluginConfig) -> anyhow::Result<PluginHost> {
        let host = PluginHost::new(cfg)?;
        // Compiling takes tens of milliseconds per plugin: never on an async worker.
        let h = host.clone();
        tokio::task::spawn_blocking(move || h.inner.rescan())
            .await
            .context("initial plugin load panicked")?;
        let timing = WatchTiming {
            debounce: host.inner.cfg.debounce,
            resync: host.inner.cfg.resync_interval,
        };
        let watcher = reload::watch(&host.inner.cfg.dir, timing, Arc::downgrade(&host.inner))
            .context("watching the plugins directory")?;
        *host.inner.watcher.lock().unwrap_or_else(|p| p.into_inner()) = Some(watcher);
        Ok(host)
    }

    /// A host with nothing loaded and no watcher.
    fn new(cfg: PluginConfig) -> anyhow::Result<PluginHost> {
        anyhow::ensure!(
            cfg.dir.is_dir(),
            "plugins directory {} does not exist or is not a directory",
            cfg.dir.display()
        );
        let limits = Limits {
            budget: cfg.call_budget,
            memory_bytes: cfg.memory_limit_bytes,
        };
        let load_limits = LoadLimits {
            max_file_bytes: cfg.max_file_bytes,
            compile_budget: cfg.compile_budget,
        };
        let rt = Runtime::new(Some(&cfg.cache_dir), limits, load_limits, &cfg.metrics)?;
        let pool = PluginPool::new(cfg.pool_workers, cfg.pool_queue, cfg.metrics.clone())
            .context("starting the plugin call pool")?;
        let reporter = Reporter {
            faults: Arc::new(FaultSink::new(256, cfg.fault_interval)),
            metrics: cfg.metrics.clone(),
        };
        let empty: CodecSet = Arc::new(Vec::new());
        let (codecs, _) = watch::channel(empty);
        Ok(PluginHost {
            inner: Arc::new(Inner {
                cfg,
                rt,
                reporter,
                pool,
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
    /// A bound policy whose plugin is not loaded still resolves, as a policy that fails every
    /// decision (so its failure policy, hold by default, decides). Call it per decision, like
    /// [`PluginHost::ordering_rule`].
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
        self.inner.reporter.fail(
            wanted,
            PluginKind::BatchPolicy,
            None,
            reasons::NOT_FOUND,
            format!(
                "annotation {}={wanted:?} is not a selectable batch policy; using the default policy",
                snap.manifest.batch.annotation
            ),
        );
        default()
    }

    /// The tunnel adapters to serve beside the built-in codec; changes on every swap of the
    /// adapter set (and only then).
    pub fn codecs(&self) -> watch::Receiver<CodecSet> {
        self.inner.codecs.subscribe()
    }

    /// Faults: first the load problems current when subscribing (so failures of the initial
    /// load reach a subscriber attached after [`PluginHost::start`]), then every fault from now
    /// on (lossy under bursts: a lagging receiver skips; metrics count all).
    pub fn faults(&self) -> broadcast::Receiver<PluginFault> {
        self.inner.reporter.faults.subscribe()
    }

    /// The bounded blocking pool to run plugin calls on (ordering, batch, codec), so that they
    /// never run on an async worker or the MQTT event loop.
    pub fn pool(&self) -> &PluginPool {
        &self.inner.pool
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

    /// Current load problems (refused plugin files, an invalid manifest).
    pub fn load_errors(&self) -> Vec<PluginFault> {
        self.inner.snapshot().load_errors()
    }

    /// Rescans the directory now (also done on change notifications and periodically).
    pub async fn rescan(&self) -> anyhow::Result<()> {
        let h = self.clone();
        tokio::task::spawn_blocking(move || h.inner.rescan())
            .await
            .context("plugin rescan panicked")
    }
}

impl Rescan for Inner {
    fn rescan(&self) {
        Inner::rescan(self);
    }
}

impl Inner {
    fn snapshot(&self) -> Arc<Snapshot> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts and reports a load problem; it is retained for later subscribers.
    fn load_fault(&self, plugin: &str, kind: PluginKind, message: String) -> PluginFault {
        let reason = reasons::LOAD_FAILED;
        self.reporter.metrics.failure(plugin, kind, reason);
        let f = PluginFault {
            plugin: plugin.to_string(),
            kind,
            reason: reason.to_string(),
            message,
            subject: None,
        };
        self.reporter.faults.emit_load(f.clone());
        f
    }

    /// Re-reads the manifest and every plugin file; loads what changed; swaps.
    fn rescan(&self) {
        let _serial = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.snapshot();
        let dir = &self.cfg.dir;
        let metrics = &self.reporter.metrics;
        let manifest = match Manifest::load(dir) {
            Ok(m) => m,
            Err(e) => {
                let message = format!("{e}; keeping the previous configuration");
                let fault = match &old.manifest_error {
                    Some(f) if f.message == message => f.clone(),
                    _ => {
                        metrics.reload(false);
                        self.load_fault(MANIFEST_FILE, PluginKind::Unknown, message)
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
            let (hash, outcome) = match loader::read(&file, self.rt.load_limits.max_file_bytes) {
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
                    // An unchanged refused file is neither compiled nor reported again.
                    let unchanged = old
                        .refused
                        .get(name)
                        .filter(|r| r.hash == hash && r.config == config && r.expected == expected);
                    let outcome = match unchanged {
                        Some(r) => Outcome::StillRefused(r.clone()),
                        None => {
                            let req = LoadRequest {
                                name,
                                file: &file,
                                bytes: &bytes,
                                config: &config,
                                expected,
                            };
                            match loader::load(&self.rt, req) {
                                Ok(v) => Outcome::Loaded(Box::new(v)),
                                Err(e) => Outcome::Refused(e.to_string()),
                            }
                        }
                    };
                    (hash, outcome)
                }
                // Unreadable (missing, too large...): no content hash, so the same error text
                // tells a repeat from a new problem.
                Err(e) => {
                    let error = e.to_string();
                    let hash = "unreadable".to_string();
                    let unchanged = old.refused.get(name).filter(|r| {
                        r.hash == hash
                            && r.config == config
                            && r.expected == expected
                            && r.error == error
                    });
                    match unchanged {
                        Some(r) => (hash, Outcome::StillRefused(r.clone())),
                        None => (hash, Outcome::Refused(error)),
                    }
                }
            };
            let error = match outcome {
                Outcome::Loaded(v) => {
                    metrics.reload(true);
                    info!(
                        plugin = %name,
                        kind = %v.kind,
                        version = %v.version,
                        sha256 = %&v.hash[..12],
                        from_cache = v.from_cache,
                        load_ms = v.load_time.as_millis() as u64,
                        "plugin version loaded"
                    );
                    versions.insert(name.clone(), Arc::from(v));
                    continue;
                }
                Outcome::StillRefused(r) => {
                    refused.insert(name.clone(), r);
                    if let Some(p) = previous {
                        versions.insert(name.clone(), p.clone());
                    }
                    continue;
                }
                Outcome::Refused(error) => error,
            };
            metrics.reload(false);
            let keeping = match previous {
                Some(p) => format!("keeping version {} (sha256 {})", p.version, &p.hash[..12]),
                None if expected == Some(PluginKind::BatchPolicy) => match manifest
                    .batch
                    .on_failure(name)
                {
                    OnFailure::Hold => "not loaded; rollouts using it hold their pending installs",
                    OnFailure::Admit => "not loaded; rollouts using it admit every pending install",
                }
                .to_string(),
                None => "not loaded; the built-in default serves its uses".to_string(),
            };
            let short = &hash[..hash.len().min(12)];
            let message = format!("{} (sha256 {short}): {error}; {keeping}", rel(dir, &file));
            let kind = expected
                .or(previous.map(|p| p.kind))
                .unwrap_or(PluginKind::Unknown);
            let fault = self.load_fault(name, kind, message);
            refused.insert(
                name.clone(),
                Refused {
                    hash,
                    config,
                    expected,
                    error,
                    fault,
                },
            );
            if let Some(p) = previous {
                versions.insert(name.clone(), p.clone());
            }
        }
        let next = self.bind(manifest, versions, refused, &old);
        self.swap(next);
    }

    /// Builds the bindings, reusing wrappers whose version did not change (the tunnel swaps
    /// only when the adapter set really changed).
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
                _ => Arc::new(WasmOrdering::new(v, self.reporter.clone())),
            });
        let batch = |name: &String| -> Arc<dyn BatchPolicy> {
            let on_failure = manifest.batch.on_failure(name);
            let reporter = self.reporter.clone();
            match of_kind(name, PluginKind::BatchPolicy) {
                Some(v) => Arc::new(WasmBatch::new(v, on_failure, reporter)),
                None => {
                    let why = refused
                        .get(name)
                        .map(|r| r.error.clone())
                        .unwrap_or_else(|| "it has no loaded version of this kind".to_string());
                    Arc::new(UnloadedBatch::new(name, why, on_failure, reporter))
                }
            }
        };
        let batch_default = manifest.batch.default.as_ref().map(batch);
        let batch_selectable = manifest
            .batch
            .selectable
            .iter()
            .map(|n| (n.clone(), batch(n)))
            .collect();
        let codecs = manifest
            .tunnel_adapters
            .iter()
            .filter_map(|n| of_kind(n, PluginKind::TunnelAdapter))
            .map(
                |v| match old.codecs.iter().find(|c| Arc::ptr_eq(c.version(), &v)) {
                    Some(c) => c.clone(),
                    None => Arc::new(WasmCodec::new(v, self.reporter.clone())),
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
            let count = next.versions.values().filter(|v| v.kind == kind).count();
            self.reporter.metrics.loaded(kind, count);
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
        // What later fault subscribers are told first: the problems of the new snapshot.
        self.reporter.faults.retain(next.load_errors());
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
