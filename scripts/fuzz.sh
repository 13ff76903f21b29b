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
  log="$(mktemp)"
  rc=0
  cargo fuzz run -s none -O "$target" -- -max_total_time="$seconds" >"$log" 2>&1 || rc=$?
  grep -E "^Done|ERROR|panicked" "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    echo "fuzz: $target failed; see fuzz/artifacts/$target" >&2
    exit 1
  fi
  rm -f "$log"
done
