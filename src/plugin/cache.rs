//! Precompiled plugin artefacts, keyed by the wasm content hash plus the Engine's
//! compatibility hash, written atomically (temp file + rename) into a directory the
//! controller owns (never the mounted plugins directory). The cache is an optimisation only:
//! when it cannot be read or written, plugins still load (compiled each time) and the failure
//! is logged and counted.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tracing::{debug, warn};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::telemetry::PluginMetrics;

/// Hex SHA-256 of a plugin file.
pub(crate) fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Feeds `Hash` output into SHA-256 so the key is stable across processes.
struct ShaHasher(Sha256);

impl Hasher for ShaHasher {
    fn finish(&self) -> u64 {
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// Short hex digest of the Engine settings that precompiled code depends on.
pub(crate) fn engine_key(engine: &Engine) -> String {
    let mut h = ShaHasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut h);
    hex::encode(&h.0.finalize()[..8])
}

/// Where compiled components are kept.
#[derive(Debug, Clone)]
pub(crate) struct ArtefactCache {
    dir: PathBuf,
    engine_key: String,
    metrics: PluginMetrics,
}

impl ArtefactCache {
    /// A cache in `dir` (created on first write) for `engine`.
    pub(crate) fn new(dir: &Path, engine: &Engine, metrics: PluginMetrics) -> Self {
        ArtefactCache {
            dir: dir.to_path_buf(),
            engine_key: engine_key(engine),
            metrics,
        }
    }

    fn path_for(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}-{}.cwasm", self.engine_key))
    }

    /// The cached compiled component for content `hash`, when present and usable.
    pub(crate) fn lookup(&self, engine: &Engine, hash: &str) -> Option<Component> {
        let path = self.path_for(hash);
        if !path.is_file() {
            return None;
        }
        // SAFETY: files in this directory are written only by `store` below, from
        // `Component::serialize` of this process's Engine settings (the name carries the
        // compatibility hash), and the directory is private to the controller. wasmtime
        // also checks the artefact header and refuses mismatched engines.
        match unsafe { Component::deserialize_file(engine, &path) } {
            Ok(c) => {
                debug!(path = %path.display(), "plugin artefact loaded from cache");
                Some(c)
            }
            Err(e) => {
                self.metrics.cache_error("read");
                warn!(path = %path.display(), error = %format!("{e:#}"), "discarding unusable cached plugin artefact");
                let _ = std::fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `component` for content `hash`; failures are logged and counted, never fatal.
    pub(crate) fn store(&self, hash: &str, component: &Component) {
        let result = component
            .serialize()
            .map_err(|e| format!("{e:#}"))
            .and_then(|bytes| {
                self.write(&self.path_for(hash), &bytes)
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = result {
            self.metrics.cache_error("write");
            warn!(dir = %self.dir.display(), error = %e, "cannot write plugin artefact cache; continuing without it");
        }
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}
