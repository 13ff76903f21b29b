#!/usr/bin/env bash
# Writes the network config that flanneld-rs (and Go Flannel) read: <prefix>/config in etcd.
#
#   etcd-config.sh [--network 10.244.0.0/16] [--backend vxlan] [--subnet-len 24]
#                  [--prefix /coreos.com/network] [--file config.json] [--force] [--dry-run]
#
# etcd is reached with etcdctl's own environment: ETCDCTL_ENDPOINTS, ETCDCTL_CACERT,
# ETCDCTL_CERT, ETCDCTL_KEY, ETCDCTL_USER (user:password). `--file` takes a whole config
# (Flannel's format) instead of the flags. An existing, different config is kept unless
# `--force` is given: changing Network under running nodes invalidates every lease.
set -euo pipefail

network=10.244.0.0/16
backend=vxlan
subnet_len=
prefix=/coreos.com/network
file=
force=false
dry_run=false

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --network) network=${2:?}; shift 2 ;;
    --backend) backend=${2:?}; shift 2 ;;
    --subnet-len) subnet_len=${2:?}; shift 2 ;;
    --prefix) prefix=${2:?}; shift 2 ;;
    --file) file=${2:?}; shift 2 ;;
    --force) force=true; shift ;;
    --dry-run) dry_run=true; shift ;;
    -h|--help) usage ;;
    *) echo "etcd-config.sh: unknown argument $1" >&2; usage ;;
  esac
done

if [ -n "$file" ]; then
  config=$(cat "$file")
else
  if ! [[ "$network" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+/[0-9]+$ ]]; then
    echo "etcd-config.sh: --network $network is not an IPv4 CIDR" >&2; exit 2
  fi
  if ! [[ "$backend" =~ ^[a-z-]+$ ]]; then
    echo "etcd-config.sh: --backend $backend is not a backend type" >&2; exit 2
  fi
  config="{\"Network\":\"$network\""
  if [ -n "$subnet_len" ]; then
    [[ "$subnet_len" =~ ^[0-9]+$ ]] || { echo "etcd-config.sh: --subnet-len $subnet_len" >&2; exit 2; }
    config="$config,\"SubnetLen\":$subnet_len"
  fi
  config="$config,\"Backend\":{\"Type\":\"$backend\"}}"
fi
# A config that is not JSON would leave every node waiting; catch it here when we can.
if command -v python3 >/dev/null; then
  printf '%s' "$config" | python3 -c 'import json,sys; json.load(sys.stdin)' \
    || { echo "etcd-config.sh: the config is not valid JSON: $config" >&2; exit 2; }
fi

key="${prefix%/}/config"
if $dry_run; then
  echo "would put $key $config"
  exit 0
fi
export ETCDCTL_API=3
current=$(etcdctl get "$key" --print-value-only)
if [ -n "$current" ] && [ "$current" != "$config" ] && ! $force; then
  echo "etcd-config.sh: $key already holds $current; use --force to replace it" >&2
  exit 1
fi
etcdctl put "$key" "$config" >/dev/null
echo "put $key $config"
