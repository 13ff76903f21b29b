#!/usr/bin/env bash
# Packs the benchmark for a machine with no package registry (the many-core run of BENCHMARKS.md):
# release builds of bench, flanneld-rs and the CNI plugin, stripped, beside the tools the
# namespace cluster runs (etcd, etcdctl, the bridge/host-local/loopback CNI plugins, iproute2's
# ip/ss/bridge, ping, sysctl, iperf3) and the shared libraries those need beyond glibc, in one
# gzip'd tarball (Go binaries are large: ~60 MB unpacked, ~25 MB packed).
#
#   scripts/bench-bundle.sh [OUT.tar.gz]          # here; default target/bench-bundle.tar.gz
#   tar -xzf bench-bundle.tar.gz -C /tmp && /tmp/bench-bundle/run.sh --streams 1,4,8 ...   # there
#
# run.sh puts the bundle's tools/ first on the PATH and runs bench with the arguments given. The
# bench finds the daemons and CNI plugins next to itself in bin/ (which is also the CNI_PATH, so
# iproute2's `bridge` lives apart from the CNI plugin of that name, in tools/). Carried tools that
# need libraries run through small wrappers that set LD_LIBRARY_PATH for themselves alone, so the
# other machine's own programs never load our libraries. Everything needs glibc >= 2.34 on the other machine (the
# newest symbol version any of them uses, checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/bench-bundle.tar.gz}"
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
b="$stage/bench-bundle"
mkdir -p "$b/bin" "$b/tools" "$b/real" "$b/lib"

cargo build --release --workspace --bins
for f in bench flanneld-rs flannel; do
  install -m 755 -s "target/release/$f" "$b/bin/$f"
done

# Go programs (static but for libc): CNI plugins beside ours, etcd among the tools.
for f in /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback /usr/bin/etcd /usr/bin/etcdctl; do
  [ -x "$f" ] || { echo "bench-bundle: $f missing (run scripts/install-deps.sh)" >&2; exit 1; }
  case "$f" in
    /usr/lib/cni/*) install -m 755 "$f" "$b/bin/" ;;
    *) install -m 755 "$f" "$b/tools/" ;;
  esac
done

# C tools: the binary in real/, its libraries beyond glibc in lib/, a wrapper in tools/.
glibc='^(libc|libm|libdl|libpthread|librt|libresolv|libgcc_s|ld-linux-x86-64)\.so'
for tool in ip ss bridge ping sysctl iperf3; do
  path="$(command -v "$tool" || true)"
  [ -n "$path" ] || { echo "bench-bundle: $tool missing (run scripts/install-deps.sh)" >&2; exit 1; }
  install -m 755 "$(readlink -f "$path")" "$b/real/$tool"
  ldd "$path" | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }' | while read -r name lib; do
    if ! [[ "$name" =~ $glibc ]]; then
      cp -L "$lib" "$b/lib/$name"
    fi
  done
  cat >"$b/tools/$tool" <<EOF
#!/bin/sh
d="\$(dirname "\$(readlink -f "\$0")")/.."
LD_LIBRARY_PATH="\$d/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "\$d/real/$tool" "\$@"
EOF
  chmod 755 "$b/tools/$tool"
done

cat >"$b/run.sh" <<'EOF'
#!/bin/sh
# Runs the benchmark with the bundle's tools first on the PATH (as root: it makes namespaces).
d="$(dirname "$(readlink -f "$0")")"
PATH="$d/tools:$PATH" exec "$d/bin/bench" "$@"
EOF
chmod 755 "$b/run.sh"

newest="$(find "$b/bin" "$b/tools" "$b/real" -type f -exec objdump -T {} \; 2>/dev/null |
  grep -oE 'GLIBC_[0-9.]+' | sort -uV | tail -1)"
echo "$newest" >"$b/NEEDS"
mkdir -p "$(dirname "$out")"
tar -czf "$out" -C "$stage" bench-bundle
echo "bench-bundle: $out ($(du -h "$out" | cut -f1); unpacked $(du -sh "$b" | cut -f1); needs $newest)"
