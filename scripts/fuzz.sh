#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time (FUZZ_SECONDS each, default 20).
# Works on stable Rust with `-s none` (coverage-guided libFuzzer, no sanitizer).
# A crash leaves its input under fuzz/artifacts/<target>/ and fails this script.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-20}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
cargo fuzz build -s none -O
for target in $(cargo fuzz list); do
  echo "fuzz: $target for ${seconds}s"
  cargo fuzz run -s none -O "$target" -- -max_total_time="$seconds" -print_final_stats=0 2>&1 | grep -E "^Done|ERROR|panicked" || true
  if [ "${PIPESTATUS[0]}" -ne 0 ]; then
    echo "fuzz: $target failed; see fuzz/artifacts/$target" >&2
    exit 1
  fi
done
