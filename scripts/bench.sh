#!/usr/bin/env bash
# Builds in release mode and runs the benchmark, writing the table to BENCHMARKS.md.
# Extra arguments go to the benchmark (e.g. --seconds 10, --modes routing,kernel-vxlan,udp).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build --release --workspace --bins
exec target/release/bench --write BENCHMARKS.md "$@"
