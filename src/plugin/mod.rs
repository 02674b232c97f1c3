//! WASM plugin host: operators change how the controller talks to bases (tunnel adapters),
//! orders status writes (status ordering) and paces rollouts (batch policies) by dropping
//! WebAssembly components into a watched directory.
//!
//! - One wasmtime Engine per process; typed bindings generated from `wit/`.
//! - Every call runs in a fresh instance with a time budget (epoch interruption), a memory
//!   cap (per instance: all memories and tables) and a stack cap; callers run calls on the
//!   host's bounded [`PluginPool`], never on an async worker. Plugins get no sockets or HTTP
//!   (refused at load) and no files, environment or clock: the WASI imports a Rust guest
//!   carries are stubs that trap when called (random is a fixed-seed generator).
//! - A failing plugin is counted, logged and reported as a [`PluginFault`]; the built-in
//!   default decides that call (for a batch policy, its binding's failure policy: hold unless
//!   the manifest says admit).
//! - The directory is watched (ConfigMap `..data` symlink swaps included), changes debounced,
//!   new versions compiled and validated before an atomic swap; a broken file keeps the old
//!   version. Files are size-capped, compilation time-capped; compiled artefacts are cached
//!   by content hash.
//!
//! Dependencies go one way: `host` → (`reload`, `loader`, wrappers, `pool`, `faults`,
//! `telemetry`) and `plugin` → `rollout`/`tunnel`, never back.
//!
//! See `plugins/README.md` for the plugin author's guide and the manifest format.

mod batch;
mod bindings;
mod cache;
pub mod cli;
mod codec;
mod config;
mod engine;
mod faults;
mod host;
mod kind;
mod limits;
mod loader;
pub mod manifest;
mod ordering;
mod policies;
mod pool;
mod reload;
mod telemetry;

pub use config::{PluginConfig, default_cache_dir};
pub use faults::{PluginFault, reasons};
pub use host::{LoadedPlugin, PluginHost};
pub use kind::PluginKind;
pub use limits::CallFailure;
pub use loader::{API_VERSION, LoadError};
pub use manifest::Manifest;
pub use policies::PluginPolicies;
pub use pool::{PluginPool, PoolError};
pub use telemetry::PluginMetrics;
