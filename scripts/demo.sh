#!/usr/bin/env bash
# Quick start on a fresh machine: provisions what is missing (once), builds the controller, then
# runs the quick start (tests/testkit, `demo` binary): a local control plane, an embedded MQTT broker, the controller,
# three simulated bases, and examples/module-deployment.yaml becoming Ready.
# Extra arguments go to the demo (e.g. --exit-when-ready, --bases 5).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/module-controller/target}"
bash scripts/provision.sh </dev/null
cargo build --locked -p testkit --bin demo
exec "$CARGO_TARGET_DIR/debug/demo" "$@"
