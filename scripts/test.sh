#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints, unit tests and the root-only namespace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the namespace tests need root (e.g. sudo $0)" >&2
  exit 1
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The namespace tests run the daemon and CNI plugin binaries: build them first.
cargo build --workspace --bins
cargo test --workspace -- --test-threads=2
