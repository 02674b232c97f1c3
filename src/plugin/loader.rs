//! Loading one plugin version: compile (or take from the artefact cache), check its imports
//! against the sandbox policy and its exports against the API version this host speaks, link,
//! then validate it by calling `info`, `init(config)` and `self-check` within budget.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use thiserror::Error;
use wasmtime::Engine;
use wasmtime::component::{Component, InstancePre, Linker};

use super::bindings::{wit_batch, wit_metadata, wit_ordering, wit_tunnel, wit_types};
use super::cache::{ArtefactCache, content_hash};
use super::kind::PluginKind;
use super::limits::{CallContext, CallFailure, CallState, CallStats, Limits, base_linker, invoke};
use super::telemetry::PluginMetrics;

/// The plugin API version (WIT package `koupleless:plugin`) this host speaks.
pub const API_VERSION: &str = "1.0.0";

const PACKAGE: &str = "koupleless:plugin/";

/// Import prefixes refused at load: plugins get no network.
const FORBIDDEN_IMPORTS: [&str; 2] = ["wasi:sockets/", "wasi:http/"];

/// Host interfaces a plugin may import (at [`API_VERSION`]).
const HOST_INTERFACES: [&str; 3] = ["host", "rollout-context", "types"];

/// Why a plugin version was refused.
#[derive(Debug, Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Larger than the configured maximum plugin file size.
    #[error("is {size} bytes, larger than the {limit}-byte limit for plugin files")]
    TooLarge {
        /// Size of the file (at least; reading stopped past the limit).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Not a valid component for this host.
    #[error("cannot compile the component: {0}")]
    Compile(String),
    /// Compiling took longer than the compile budget.
    #[error(
        "compiling took longer than the {} ms compile budget; refused (a component this costly to compile is not loaded)",
        .0.as_millis()
    )]
    CompileTimeout(Duration),
    /// Imports a network interface.
    #[error(
        "imports `{0}`: plugins get no network access (wasi:sockets and wasi:http are refused)"
    )]
    ForbiddenImport(String),
    /// Imports something the host does not provide.
    #[error(
        "imports `{0}`, which this host does not provide (plugins may import koupleless:plugin/{{host,rollout-context}}@{API_VERSION} and inert wasi:* interfaces)"
    )]
    UnknownImport(String),
    /// Built for another plugin API version.
    #[error(
        "built for plugin API {found}; this controller speaks {API_VERSION}: rebuild it with the current SDK"
    )]
    ApiVersion {
        /// Version found in the component's exports or declared by `info`.
        found: String,
    },
    /// Exports none of the plugin interfaces.
    #[error("not a module-controller plugin: exports no koupleless:plugin/metadata interface")]
    NotAPlugin,
    /// Exports no hook, or several.
    #[error(
        "must export exactly one of koupleless:plugin/{{ordering,batch,tunnel}}@{API_VERSION}, exports {0}"
    )]
    Kind(String),
    /// `info` names another kind than the exported hook.
    #[error("info() says it is a {declared} plugin but it exports the {exported} interface")]
    KindMismatch {
        /// Kind from `info`.
        declared: PluginKind,
        /// Kind from the exports.
        exported: PluginKind,
    },
    /// Linking failed.
    #[error("cannot link: {0}")]
    Link(String),
    /// A validation call failed.
    #[error("{call}() failed: {failure}")]
    Call {
        /// Which call.
        call: &'static str,
        /// How.
        failure: CallFailure,
    },
    /// `init` refused the config.
    #[error("init() refused its config: {0}")]
    Init(String),
    /// `self-check` failed.
    #[error("self-check failed: {0}")]
    SelfCheck(String),
    /// A tunnel adapter's subscriptions are unusable.
    #[error("invalid subscriptions: {0}")]
    Subscriptions(String),
    /// The manifest bound the plugin to a use of another kind.
    #[error("bound as a {expected} plugin in the manifest but it is a {actual} plugin")]
    WrongUse {
        /// Kind the manifest binding needs.
        expected: PluginKind,
        /// Kind of the plugin.
        actual: PluginKind,
    },
}

/// Limits applied when loading a plugin file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LoadLimits {
    /// Larger files are refused unread.
    pub max_file_bytes: u64,
    /// Longer compilations are refused.
    pub compile_budget: Duration,
}

/// The shared machinery of loading and calling plugins.
pub(crate) struct Runtime {
    pub engine: &'static Engine,
    linker: Linker<CallState>,
    cache: Option<ArtefactCache>,
    pub limits: Limits,
    pub load_limits: LoadLimits,
}

impl Runtime {
    /// A runtime on the process Engine; `cache_dir` None disables the artefact cache.
    pub(crate) fn new(
        cache_dir: Option<&Path>,
        limits: Limits,
        load_limits: LoadLimits,
        metrics: &PluginMetrics,
    ) -> anyhow::Result<Runtime> {
        let engine = super::engine::engine().map_err(anyhow::Error::msg)?;
        let linker = base_linker(engine).map_err(|e| anyhow::anyhow!("plugin linker: {e:#}"))?;
        Ok(Runtime {
            engine,
            linker,
            cache: cache_dir.map(|d| ArtefactCache::new(d, engine, metrics.clone())),
            limits,
            load_limits,
        })
    }
}

/// The hook a version implements, with its export indices resolved once.
pub(crate) enum Hook {
    /// Status ordering.
    Ordering(wit_ordering::GuestIndices),
    /// Batch policy.
    Batch(wit_batch::GuestIndices),
    /// Tunnel adapter, with the subscriptions it asked for at load.
    Tunnel {
        /// Export indices.
        indices: wit_tunnel::GuestIndices,
        /// Topic filters.
        subscriptions: Vec<String>,
    },
}

/// One loaded, validated version of a plugin.
pub(crate) struct PluginVersion {
    /// Name in the manifest.
    pub name: Arc<str>,
    /// Kind.
    pub kind: PluginKind,
    /// `info().name`.
    pub plugin_name: String,
    /// `info().version`.
    pub version: String,
    /// `info().api-version`.
    pub api_version: String,
    /// SHA-256 of the file.
    pub hash: String,
    /// Config string passed to `init` and `host.config`.
    pub config: Arc<str>,
    /// Where it was loaded from.
    pub file: PathBuf,
    /// When.
    pub loaded_at: SystemTime,
    /// Whether the compiled code came from the artefact cache.
    pub from_cache: bool,
    /// Time from bytes to validated version.
    pub load_time: Duration,
    /// Largest size (memories and tables) an instance of this version reached (validation and
    /// calls).
    pub peak_memory: std::sync::atomic::AtomicUsize,
    /// The hook.
    pub hook: Hook,
    pre: InstancePre<CallState>,
    engine: &'static Engine,
    limits: Limits,
}

impl PluginVersion {
    /// Runs `f` on a fresh instance within the limits.
    pub(crate) fn call<R>(
        &self,
        annotations: Option<Arc<std::collections::BTreeMap<String, String>>>,
        f: impl FnOnce(
            &mut wasmtime::Store<CallState>,
            &wasmtime::component::Instance,
        ) -> wasmtime::Result<R>,
    ) -> (Result<R, CallFailure>, CallStats) {
        let ctx = CallContext {
            plugin: self.name.clone(),
            config: self.config.clone(),
            annotations,
        };
        let (result, stats) = invoke(self.engine, &self.pre, self.limits, ctx, f);
        self.peak_memory
            .fetch_max(stats.peak_memory, std::sync::atomic::Ordering::Relaxed);
        (result, stats)
    }
}

/// What a manifest entry asks to load.
pub(crate) struct LoadRequest<'a> {
    /// Name in the manifest.
    pub name: &'a str,
    /// File (for status and messages).
    pub file: &'a Path,
    /// File content.
    pub bytes: &'a [u8],
    /// Config string.
    pub config: &'a str,
    /// Kind the manifest binding needs, when bound.
    pub expected: Option<PluginKind>,
}

/// Reads `file` for a [`LoadRequest`], refusing files larger than `max_bytes` without reading
/// more than one byte past the limit (the file may grow while it is read).
pub(crate) fn read(file: &Path, max_bytes: u64) -> Result<Vec<u8>, LoadError> {
    let read_err = |source| LoadError::Read {
        path: file.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(file).map_err(read_err)?;
    let size = f.metadata().map_err(read_err)?.len();
    if size > max_bytes {
        return Err(LoadError::TooLarge {
            size,
            limit: max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    f.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let read = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if read > max_bytes {
        return Err(LoadError::TooLarge {
            size: read,
            limit: max_bytes,
        });
    }
    Ok(bytes)
}

/// The compiled component for `bytes`: from the artefact cache when present, else compiled
/// on a thread of its own within the compile budget. Compilation cannot be interrupted, so a
/// compile past the budget is abandoned (it finishes in the background, is never cached and
/// never used) and the file refused; the host does not retry unchanged content.
fn compile(rt: &Runtime, bytes: &[u8], hash: &str) -> Result<(Component, bool), LoadError> {
    if let Some(c) = rt.cache.as_ref().and_then(|c| c.lookup(rt.engine, hash)) {
        return Ok((c, true));
    }
    let engine = rt.engine;
    let owned = bytes.to_vec();
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("plugin-compile".into())
        .spawn(move || {
            let _ = tx.send(Component::new(engine, &owned));
        })
        .map_err(|e| LoadError::Compile(format!("cannot start a compile thread: {e}")))?;
    let budget = rt.load_limits.compile_budget;
    let component = match rx.recv_timeout(budget) {
        Ok(r) => r.map_err(|e| LoadError::Compile(format!("{e:#}")))?,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            return Err(LoadError::CompileTimeout(budget));
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            return Err(LoadError::Compile("the compile thread panicked".into()));
        }
    };
    if let Some(cache) = &rt.cache {
        cache.store(hash, &component);
    }
    Ok((component, false))
}

/// Splits `koupleless:plugin/<iface>@<version>`.
fn plugin_interface(name: &str) -> Option<(&str, &str)> {
    name.strip_prefix(PACKAGE)?.split_once('@')
}

/// Checks imports; returns the WASI imports to stub.
fn check_imports(engine: &Engine, component: &Component) -> Result<(), LoadError> {
    for (name, _) in component.component_type().imports(engine) {
        if FORBIDDEN_IMPORTS.iter().any(|p| name.starts_with(p)) {
            return Err(LoadError::ForbiddenImport(name.to_string()));
        }
        if let Some((iface, version)) = plugin_interface(name) {
            if version != API_VERSION {
                return Err(LoadError::ApiVersion {
                    found: version.to_string(),
                });
            }
            if !HOST_INTERFACES.contains(&iface) {
                return Err(LoadError::UnknownImport(name.to_string()));
            }
            continue;
        }
        if !name.starts_with("wasi:") {
            return Err(LoadError::UnknownImport(name.to_string()));
        }
    }
    Ok(())
}

/// Determines the kind from the exports, refusing other API versions.
fn exported_kind(engine: &Engine, component: &Component) -> Result<PluginKind, LoadError> {
    let mut metadata = None;
    let mut kinds = Vec::new();
    for (name, _) in component.component_type().exports(engine) {
        let Some((iface, version)) = plugin_interface(name) else {
            continue;
        };
        if iface == "metadata" {
            metadata = Some(version.to_string());
        }
        if version != API_VERSION {
            continue;
        }
        match iface {
            "ordering" => kinds.push(PluginKind::StatusOrdering),
            "batch" => kinds.push(PluginKind::BatchPolicy),
            "tunnel" => kinds.push(PluginKind::TunnelAdapter),
            _ => {}
        }
    }
    match metadata {
        None => return Err(LoadError::NotAPlugin),
        Some(v) if v != API_VERSION => return Err(LoadError::ApiVersion { found: v }),
        Some(_) => {}
    }
    match kinds.as_slice() {
        [k] => Ok(*k),
        [] => Err(LoadError::Kind("none".into())),
        many => Err(LoadError::Kind(
            many.iter()
                .map(|k| k.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )),
    }
}

/// Defines the WASI imports a Rust std guest carries: random as a fixed-seed generator (so
/// `HashMap` works), everything else as functions that trap when called.
fn stub_wasi(
    linker: &mut Linker<CallState>,
    engine: &Engine,
    component: &Component,
) -> wasmtime::Result<()> {
    for (name, _) in component.component_type().imports(engine) {
        let Some(rest) = name.strip_prefix("wasi:random/") else {
            continue;
        };
        let mut inst = linker.instance(name)?;
        // Deterministic on purpose: decisions must be pure functions of their inputs.
        const SEED: u64 = 0x9e37_79b9_7f4a_7c15;
        if rest.starts_with("random@") {
            inst.func_wrap("get-random-bytes", |_, (len,): (u64,)| {
                Ok((fill(len.min(1 << 16)),))
            })?;
            inst.func_wrap("get-random-u64", |_, (): ()| Ok((SEED,)))?;
        } else if rest.starts_with("insecure@") {
            inst.func_wrap("get-insecure-random-bytes", |_, (len,): (u64,)| {
                Ok((fill(len.min(1 << 16)),))
            })?;
            inst.func_wrap("get-insecure-random-u64", |_, (): ()| Ok((SEED,)))?;
        } else if rest.starts_with("insecure-seed@") {
            inst.func_wrap("insecure-seed", |_, (): ()| {
                Ok(((SEED, SEED.rotate_left(32)),))
            })?;
        }
    }
    linker.define_unknown_imports_as_traps(component)
}

fn fill(len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(151).wrapping_add(7))
        .collect()
}

fn kind_of(k: wit_types::PluginKind) -> PluginKind {
    match k {
        wit_types::PluginKind::TunnelAdapter => PluginKind::TunnelAdapter,
        wit_types::PluginKind::StatusOrdering => PluginKind::StatusOrdering,
        wit_types::PluginKind::BatchPolicy => PluginKind::BatchPolicy,
    }
}

fn call_err(call: &'static str) -> impl FnOnce(CallFailure) -> LoadError {
    move |failure| LoadError::Call { call, failure }
}

fn link_err(e: wasmtime::Error) -> LoadError {
    LoadError::Link(format!("{e:#}"))
}

/// Compiles, checks, links and validates one plugin version.
pub(crate) fn load(rt: &Runtime, req: LoadRequest<'_>) -> Result<PluginVersion, LoadError> {
    let start = Instant::now();
    let hash = content_hash(req.bytes);
    let engine = rt.engine;
    let (component, from_cache) = compile(rt, req.bytes, &hash)?;
    check_imports(engine, &component)?;
    let kind = exported_kind(engine, &component)?;
    if let Some(expected) = req.expected
        && expected != kind
    {
        return Err(LoadError::WrongUse {
            expected,
            actual: kind,
        });
    }
    let mut linker = rt.linker.clone();
    stub_wasi(&mut linker, engine, &component).map_err(link_err)?;
    let pre = linker.instantiate_pre(&component).map_err(link_err)?;
    let meta = wit_metadata::GuestIndices::new(&pre).map_err(link_err)?;
    let hook = match kind {
        PluginKind::StatusOrdering => {
            Hook::Ordering(wit_ordering::GuestIndices::new(&pre).map_err(link_err)?)
        }
        PluginKind::BatchPolicy => {
            Hook::Batch(wit_batch::GuestIndices::new(&pre).map_err(link_err)?)
        }
        PluginKind::TunnelAdapter => Hook::Tunnel {
            indices: wit_tunnel::GuestIndices::new(&pre).map_err(link_err)?,
            subscriptions: Vec::new(),
        },
        PluginKind::Unknown => return Err(LoadError::Kind("unknown".into())),
    };
    let mut version = PluginVersion {
        name: Arc::from(req.name),
        kind,
        plugin_name: String::new(),
        version: String::new(),
        api_version: String::new(),
        hash,
        config: Arc::from(req.config),
        file: req.file.to_path_buf(),
        loaded_at: SystemTime::now(),
        from_cache,
        load_time: Duration::ZERO,
        peak_memory: std::sync::atomic::AtomicUsize::new(0),
        hook,
        pre,
        engine,
        limits: rt.limits,
    };

    let (info, _) = version.call(None, |s, i| meta.load(&mut *s, i)?.call_info(&mut *s));
    let info = info.map_err(call_err("info"))?;
    if info.api_version != API_VERSION {
        return Err(LoadError::ApiVersion {
            found: info.api_version,
        });
    }
    let declared = kind_of(info.kind);
    if declared != kind {
        return Err(LoadError::KindMismatch {
            declared,
            exported: kind,
        });
    }
    let config = req.config.to_string();
    let (init, _) = version.call(None, |s, i| {
        meta.load(&mut *s, i)?.call_init(&mut *s, &config)
    });
    init.map_err(call_err("init"))?.map_err(LoadError::Init)?;
    let (check, _) = version.call(None, |s, i| meta.load(&mut *s, i)?.call_self_check(&mut *s));
    check
        .map_err(call_err("self-check"))?
        .map_err(LoadError::SelfCheck)?;
    if let Hook::Tunnel { indices, .. } = &version.hook {
        let indices = indices.clone();
        let (subs, _) = version.call(None, |s, i| {
            indices.load(&mut *s, i)?.call_subscriptions(&mut *s)
        });
        let subs = subs.map_err(call_err("subscriptions"))?;
        validate_subscriptions(&subs).map_err(LoadError::Subscriptions)?;
        version.hook = Hook::Tunnel {
            indices,
            subscriptions: subs,
        };
    }
    version.plugin_name = info.name;
    version.version = info.version;
    version.api_version = info.api_version;
    version.load_time = start.elapsed();
    Ok(version)
}

/// Topic filters must be non-empty, valid MQTT filters.
fn validate_subscriptions(subs: &[String]) -> Result<(), String> {
    if subs.is_empty() {
        return Err("a tunnel adapter must subscribe to at least one topic filter".into());
    }
    for s in subs {
        let levels: Vec<&str> = s.split('/').collect();
        let bad_hash = levels
            .iter()
            .enumerate()
            .any(|(i, l)| l.contains('#') && (*l != "#" || i + 1 != levels.len()));
        let bad_plus = levels.iter().any(|l| l.contains('+') && *l != "+");
        if s.is_empty() || bad_hash || bad_plus || s == "#" {
            return Err(format!("{s:?} is not an acceptable MQTT topic filter"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_split() {
        assert_eq!(
            plugin_interface("koupleless:plugin/ordering@1.0.0"),
            Some(("ordering", "1.0.0"))
        );
        assert_eq!(plugin_interface("wasi:io/streams@0.2.6"), None);
    }

    #[test]
    fn subscription_filters_are_checked() {
        assert!(validate_subscriptions(&["a/+/b".into(), "a/#".into()]).is_ok());
        assert!(validate_subscriptions(&[]).is_err());
        assert!(
            validate_subscriptions(&["#".into()]).is_err(),
            "everything is too much"
        );
        assert!(validate_subscriptions(&["a/#/b".into()]).is_err());
        assert!(validate_subscriptions(&["a/b+".into()]).is_err());
    }
}
