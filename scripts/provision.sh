#!/usr/bin/env bash
# Installs and caches everything the tests and the quick start need on a fresh machine:
# Debian packages (etcd, Go, mosquitto, openssl), a Kubernetes v1.20.2 control plane built
# from Debian's source package, and the wasm32-wasip2 Rust target. Idempotent: a second run
# takes about a second.
#
# Escape hatches (like envtest):
#   MC_K8S_BIN_DIR=/dir   use kube-apiserver/kube-scheduler/kube-controller-manager from /dir
#   MC_USE_EXISTING_CLUSTER=1  tests use $KUBECONFIG; nothing is built
set -euo pipefail

CACHE_ROOT="${MC_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/module-controller}"
K8S_VERSION="1.20.2"
K8S_CACHE="$CACHE_ROOT/k8s-v$K8S_VERSION"
log() { printf '[provision] %s\n' "$*" >&2; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

need_pkgs=()
for pair in etcd:etcd-server mosquitto:mosquitto openssl:openssl rsync:rsync; do
  bin="${pair%%:*}"; pkg="${pair#*:}"
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || need_pkgs+=("$pkg")
done

k8s_needed=1
if [ "${MC_USE_EXISTING_CLUSTER:-}" = 1 ]; then k8s_needed=0; fi
if [ -n "${MC_K8S_BIN_DIR:-}" ]; then k8s_needed=0; fi
if [ -x "$K8S_CACHE/bin/kube-apiserver" ] && [ -x "$K8S_CACHE/bin/kube-scheduler" ] \
   && [ -x "$K8S_CACHE/bin/kube-controller-manager" ]; then k8s_needed=0; fi
if [ "$k8s_needed" = 1 ] && ! command -v go >/dev/null 2>&1; then need_pkgs+=(golang-go); fi

if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi
# The Debian mosquitto package starts a system broker on 1883; tests never rely on it.

if [ "$k8s_needed" = 1 ]; then
  log "building Kubernetes v$K8S_VERSION from Debian's source package (once per machine, ~8 min on 2 cores)"
  work="$CACHE_ROOT/k8s-build"
  rm -rf "$work"; mkdir -p "$work"
  if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/ && ! grep -qs '^deb-src' /etc/apt/sources.list; then
    $SUDO tee /etc/apt/sources.list.d/module-controller-src.sources >/dev/null <<SRC
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $SUDO apt-get update -qq
  fi
  (cd "$work" && apt-get source --download-only kubernetes >/dev/null)
  tarball="$(ls "$work"/kubernetes_*.orig.tar.gz | head -1)"
  mkdir -p "$work/src"
  tar -xzf "$tarball" -C "$work/src" --strip-components=1
  tree="$work/src"
  mkdir -p "$tree/.go/src/k8s.io" "$work/home"
  ln -sfn "$tree" "$tree/.go/src/k8s.io/kubernetes"
  (
    cd "$tree/.go/src/k8s.io/kubernetes"
    export CGO_ENABLED=0 GOPATH="$tree/.go" HOME="$work/home" GOFLAGS=-mod=vendor GO111MODULE=on
    make WHAT="cmd/kube-apiserver cmd/kube-scheduler cmd/kube-controller-manager" >"$work/build.log" 2>&1 \
      || { tail -50 "$work/build.log" >&2; exit 1; }
  )
  mkdir -p "$K8S_CACHE/bin.tmp"
  for b in kube-apiserver kube-scheduler kube-controller-manager; do
    cp "$(find "$tree/_output" -type f -name "$b" | head -1)" "$K8S_CACHE/bin.tmp/$b"
  done
  rm -rf "$K8S_CACHE/bin"; mv "$K8S_CACHE/bin.tmp" "$K8S_CACHE/bin"
  rm -rf "$work"
  log "Kubernetes binaries cached in $K8S_CACHE/bin"
fi

if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -q wasm32-wasip2; then
  log "adding Rust target wasm32-wasip2"
  rustup target add wasm32-wasip2 >/dev/null
fi

log "ready"
