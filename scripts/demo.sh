#!/usr/bin/env bash
# Installs everything, builds, and brings up a 3-node flanneld-rs cluster in network
# namespaces (real etcd, pods through our CNI plugin, pings across nodes). Extra arguments go
# to the demo, e.g. `--hold` to keep the cluster up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "demo.sh: needs root (it installs packages and makes network namespaces): run it as root, or sudo $0" >&2
  exit 1
fi
bash scripts/install-deps.sh
cargo build --workspace --bins
exec target/debug/demo "$@"
