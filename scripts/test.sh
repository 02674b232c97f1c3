#!/usr/bin/env bash
# The whole test suite on a fresh machine (this is what CI runs via .ci/run):
#   1. scripts/provision.sh  (Debian packages, Kubernetes v1.20.2 control plane, wasm target)
#   2. plugins/build.sh      (the WASM plugins, when that script exists)
#   3. cargo fmt --check, cargo clippy --all-targets -D warnings
#   4. cargo test --all-targets (all test binaries run, then a summary is printed)
#
# Environment:
#   CARGO_TARGET_DIR  build cache (default ~/.cache/module-controller/target, outside the repo)
#   MC_TEST_THREADS   test threads per test binary (default 2: each control-plane test runs
#                     four server processes, more than two at once starve a 2-core machine)
#   MC_SKIP_PROVISION=1  skip step 1 (the machine is already provisioned)
#   plus the MC_* escape hatches of scripts/provision.sh and src/localenv.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/module-controller/target}"
FMT_COLOR=auto
if [ "${CI:-}" = true ] || [ ! -t 1 ]; then export CARGO_TERM_COLOR=never; FMT_COLOR=never; fi
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"
THREADS="${MC_TEST_THREADS:-2}"
LOG_DIR="$CARGO_TARGET_DIR/test-logs"
mkdir -p "$LOG_DIR"
START=$SECONDS

step() { printf '\n==> [%4ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
fail() { printf '\ntest.sh: FAILED at step "%s" after %ds\n' "$1" "$((SECONDS - START))" >&2; exit 1; }

command -v cargo >/dev/null 2>&1 || { echo "test.sh: cargo not found; install Rust (https://rustup.rs)" >&2; exit 1; }
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      rustup component add "$component" >/dev/null || fail "rustup component add $component"
    else
      echo "test.sh: cargo ${component/rustfmt/fmt} is missing and rustup is not available" >&2; exit 1
    fi
  fi
done

if [ "${MC_SKIP_PROVISION:-}" != 1 ]; then
  step "provisioning (scripts/provision.sh)"
  bash scripts/provision.sh </dev/null || fail "provision"
fi

if [ -f plugins/build.sh ]; then
  step "building WASM plugins (plugins/build.sh)"
  bash plugins/build.sh </dev/null || fail "plugins/build.sh"
fi

step "cargo fmt --check"
cargo fmt --all -- --check --color="$FMT_COLOR" || fail "cargo fmt --check (run 'cargo fmt' to fix)"

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings || fail "cargo clippy"

step "building tests"
cargo test --workspace --all-targets --locked --no-run || fail "building tests"

step "running tests (--test-threads=$THREADS)"
TEST_LOG="$LOG_DIR/cargo-test.log"
set +e
cargo test --workspace --all-targets --locked --no-fail-fast -- --test-threads="$THREADS" 2>&1 | tee "$TEST_LOG"
status=${PIPESTATUS[0]}
set -e

printf '\n==> summary (full log: %s)\n' "$TEST_LOG"
grep -E '^\s+Running |^test result: ' "$TEST_LOG" | sed -E 's/^\s+Running /  /; s/ \(.*\)$//' || true
failed=$(grep -E '^test .* \.\.\. FAILED$' "$TEST_LOG" || true)
if [ -n "$failed" ]; then printf '\nfailed tests:\n%s\n' "$failed"; fi
if [ "$status" != 0 ]; then fail "cargo test (exit $status)"; fi
printf '\ntest.sh: all steps passed in %ds\n' "$((SECONDS - START))"
