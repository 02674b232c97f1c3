//! WASM plugin host (being written).
