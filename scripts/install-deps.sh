#!/usr/bin/env bash
# Installs the Debian packages flanneld-rs builds and tests with (needs root; Debian 12).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: run as root (e.g. sudo $0)" >&2
  exit 1
fi
packages=(
  build-essential pkg-config protobuf-compiler libprotobuf-dev  # building (etcd-client needs protoc and descriptor.proto)
  ca-certificates                                # cargo fetches crates over HTTPS
  etcd-server etcd-client                        # the real etcd the tests start
  containernetworking-plugins                    # bridge, host-local, loopback, portmap in /usr/lib/cni
  iproute2 iputils-ping iperf3 procps            # namespaces, traffic
  nftables iptables tcpdump                      # ip-masq, captures
  wireguard-tools wireguard-go                   # third-party WireGuard peer for interop tests
  xz-utils python3                               # unpacking Go Flannel; metrics parsing
  openssl                                        # certificates for the etcd TLS tests
  python3-prometheus-client python3-yaml         # /metrics and manifest parsing in tests
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# The tests run whichever python3 is first on the PATH: when that is not Debian's (pyenv, a
# venv), give it the same two modules with pip.
for mod in prometheus_client:prometheus_client yaml:pyyaml; do
  if ! python3 -c "import ${mod%%:*}" 2>/dev/null; then
    python3 -m pip install --quiet "${mod#*:}"
  fi
done
if ! command -v cargo >/dev/null; then
  echo "install-deps.sh: cargo not found: install a Rust toolchain (1.85 or newer, e.g. with rustup)" >&2
  exit 1
fi
