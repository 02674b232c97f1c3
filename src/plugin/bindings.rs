//! Typed bindings generated from `wit/` (one module per world) and the host side of the
//! plugin imports.

#![allow(missing_docs, clippy::all)]

/// The `status-ordering` world; also owns the shared `types` and `host` interfaces.
pub(crate) mod ordering_world {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "status-ordering",
    });
}

/// The `batch-policy` world.
pub(crate) mod batch_world {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "batch-policy",
        with: {
            "koupleless:plugin/types": super::ordering_world::koupleless::plugin::types,
            "koupleless:plugin/host": super::ordering_world::koupleless::plugin::host,
        },
    });
}

/// The `tunnel-adapter` world.
pub(crate) mod tunnel_world {
    wasmtime::component::bindgen!({
        path: "wit",
        world: "tunnel-adapter",
        with: {
            "koupleless:plugin/types": super::ordering_world::koupleless::plugin::types,
            "koupleless:plugin/host": super::ordering_world::koupleless::plugin::host,
        },
    });
}

pub(crate) use batch_world::exports::koupleless::plugin::batch as wit_batch;
pub(crate) use batch_world::koupleless::plugin::rollout_context as wit_rollout_context;
pub(crate) use ordering_world::exports::koupleless::plugin::metadata as wit_metadata;
pub(crate) use ordering_world::exports::koupleless::plugin::ordering as wit_ordering;
pub(crate) use ordering_world::koupleless::plugin::host as wit_host;
pub(crate) use ordering_world::koupleless::plugin::types as wit_types;
pub(crate) use tunnel_world::exports::koupleless::plugin::tunnel as wit_tunnel;
