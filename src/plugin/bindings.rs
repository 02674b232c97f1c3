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

/// Bindings of a world that shares `types` and `host` with the `status-ordering` world, so
/// every world's host imports are one implementation.
macro_rules! world_sharing_host {
    ($world:tt) => {
        wasmtime::component::bindgen!({
            path: "wit",
            world: $world,
            with: {
                "koupleless:plugin/types": super::ordering_world::koupleless::plugin::types,
                "koupleless:plugin/host": super::ordering_world::koupleless::plugin::host,
            },
        });
    };
}

/// The `batch-policy` world.
pub(crate) mod batch_world {
    world_sharing_host!("batch-policy");
}

/// The `tunnel-adapter` world.
pub(crate) mod tunnel_world {
    world_sharing_host!("tunnel-adapter");
}

pub(crate) use batch_world::exports::koupleless::plugin::batch as wit_batch;
pub(crate) use batch_world::koupleless::plugin::rollout_context as wit_rollout_context;
pub(crate) use ordering_world::exports::koupleless::plugin::metadata as wit_metadata;
pub(crate) use ordering_world::exports::koupleless::plugin::ordering as wit_ordering;
pub(crate) use ordering_world::koupleless::plugin::host as wit_host;
pub(crate) use ordering_world::koupleless::plugin::types as wit_types;
pub(crate) use tunnel_world::exports::koupleless::plugin::tunnel as wit_tunnel;
