#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints, unit tests and the root-only namespace tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "test.sh: the namespace tests need root (e.g. sudo $0)" >&2
  exit 1
fi
bash scripts/install-deps.sh   # quick when everything is there
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The namespace tests run the daemon and CNI plugin binaries: build them first.
cargo build --workspace --bins
log="$(mktemp)"
cargo test --workspace -- --test-threads=2 2>&1 | tee "$log"
# One closing line for all test binaries (cargo prints one per binary, the last often a
# doc-test run with 0 tests): kept in target/ for .ci/run to print last.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) s += $i } }
     END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, s }' "$log" | tee target/test-summary.txt
rm -f "$log"
