#!/usr/bin/env bash
# shellcheck disable=SC2317  # the step functions are called through step()
# Proves the README's setup works on a fresh Debian 12 machine: bootstraps a minimal bookworm
# root with debootstrap, copies this checkout in, and inside a chroot runs
# scripts/install-deps.sh and `cargo build --workspace --bins`, then checks that the binaries
# built and that every tool the tests use is there. Reports the packages install-deps had to
# install, anything still missing and any failing step; exits non-zero if any step failed.
# It does not run the namespace tests or the demo (no network namespaces inside the chroot).
#
# What comes from the host, and why:
# - the Debian mirror that /etc/apt/sources.list(.d) already uses (often the only reachable one);
# - the Rust toolchain: a fresh Debian 12 has no Rust >= 1.85 and rustup's download host may be
#   unreachable, so the host's toolchain (`rustc --print sysroot`) is bind-mounted read-only at
#   /opt/rust and put first on the PATH (the README asks for "a Rust toolchain on the PATH");
# - crates: by default downloaded from crates.io into an empty CARGO_HOME inside the root, as on
#   a fresh machine; `--host-registry` copies the host's ~/.cargo/registry in instead (a copy,
#   not a bind mount, so the chroot's cargo cannot write to the host's cache);
# - the CA certificates in /usr/local/share/ca-certificates (an intercepting HTTPS proxy's CA,
#   say): they only take effect if install-deps installs ca-certificates, as a fresh machine would.
# Daemons that packages would start in the chroot (etcd) are held back with a policy-rc.d.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/fresh-root.sh [options]      (as root)

Bootstraps a minimal Debian 12 (bookworm) root with debootstrap, copies this checkout in
(`git ls-files -co --exclude-standard`: tracked and untracked-but-not-ignored files as they are
in the working tree; never target/), and in a chroot runs scripts/install-deps.sh and
`nice -n 19 cargo build --workspace --bins`, then checks the binaries and every tool the tests
need. Prints the packages install-deps installed, what is missing, and one summary line;
exits 0 only if every step passed.

Options:
  --dir DIR          parent directory of the temporary root (default: /var/tmp)
  --keep             keep the root afterwards (default: unmount everything and delete it)
  --mirror URL       Debian mirror (default: the one this machine's apt sources use)
  --variant NAME     debootstrap variant: minbase (default, the smallest root) or standard
  --host-registry    copy the host's ~/.cargo/registry in instead of downloading crates
  --jobs N           cargo build -j N (default: cargo's own choice)
  -h, --help         this text

Takes a while: debootstrap plus a cold build of the workspace.
EOF
}

say() { printf 'fresh-root: %s\n' "$*"; }
die() { printf 'fresh-root: error: %s\n' "$*" >&2; exit 2; }

parent=/var/tmp keep=0 mirror="" variant=minbase host_registry=0 jobs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) [ $# -ge 2 ] || die "--dir needs a directory"; parent="$2"; shift 2 ;;
    --keep) keep=1; shift ;;
    --mirror) [ $# -ge 2 ] || die "--mirror needs a URL"; mirror="$2"; shift 2 ;;
    --variant) [ $# -ge 2 ] || die "--variant needs a name"; variant="$2"; shift 2 ;;
    --host-registry) host_registry=1; shift ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a number"; jobs="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
case "$variant" in minbase|standard) ;; *) die "--variant: minbase or standard, not '$variant'" ;; esac
[ -z "$jobs" ] || [[ "$jobs" =~ ^[1-9][0-9]*$ ]] || die "--jobs: a positive number, not '$jobs'"

[ "$(id -u)" -eq 0 ] || die "needs root for debootstrap, chroot and mounts (run it as root, or with sudo)"
repo="$(cd "$(dirname "$0")/.." && pwd)"
git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1 || die "$repo is not a git checkout"
[ -d "$parent" ] || die "--dir $parent: no such directory"
parent="$(cd "$parent" && pwd)"
[[ "$parent" =~ ^[A-Za-z0-9/._-]+$ ]] || die "--dir: use a path without spaces or odd characters"

# --- host prerequisites ----------------------------------------------------------------------

t_start=$SECONDS
host_installed=()
if ! command -v debootstrap >/dev/null; then
  say "installing debootstrap on the host (apt-get)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; } \
    || die "could not install debootstrap"
  host_installed+=(debootstrap)
fi

# The mirror this machine's apt already uses for bookworm (one-line and deb822 sources).
detect_mirror() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" { i = 2
           if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
           if ($(i + 1) == "bookworm") { print $i; exit } }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'BEGIN { RS = ""; FS = "\n" }
         { uri = ""; deb = 0; suite = 0; on = 1
           for (i = 1; i <= NF; i++) {
             if ($i ~ /^#/) continue
             if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
             if ($i ~ /^Suites:/ && $i ~ /[ \t]bookworm([ \t]|$)/) suite = 1
             if ($i ~ /^Enabled:[ \t]*no/) on = 0
             if ($i ~ /^URIs:/) { split($i, w, /[ \t]+/); uri = w[2] } }
           if (deb && suite && on && uri != "") { print uri; exit } }' "$f"
  done
}
if [ -z "$mirror" ]; then
  mirror="$(detect_mirror | head -n1)"
  [ -n "$mirror" ] || { mirror=http://deb.debian.org/debian; say "no bookworm mirror in this machine's apt sources: using $mirror"; }
fi
mirror="${mirror%/}"
security="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
  | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]*/debian-security' | head -n1 || true)"
[ -n "$security" ] || security="${mirror%/debian}/debian-security"

# The host's Rust toolchain (the sysroot of the rustc on the PATH).
command -v rustc >/dev/null || die "no rustc on the PATH: the chroot borrows the host's Rust toolchain"
toolchain="$(rustc --print sysroot)"
if [ ! -x "$toolchain/bin/cargo" ] || [ ! -x "$toolchain/bin/rustc" ]; then die "no cargo/rustc in $toolchain/bin"; fi
rust_version="$("$toolchain/bin/rustc" --version)"
IFS=. read -r rmaj rmin _ <<<"$(awk '{ print $2 }' <<<"$rust_version")"
if [ "$rmaj" -lt 1 ] || { [ "$rmaj" -eq 1 ] && [ "$rmin" -lt 85 ]; }; then
  die "host toolchain is $rust_version: the workspace needs 1.85 or newer"
fi
cargo_home_host="${CARGO_HOME:-$HOME/.cargo}"
if [ "$host_registry" -eq 1 ] && [ ! -d "$cargo_home_host/registry" ]; then
  die "--host-registry: no $cargo_home_host/registry"
fi

# --- the temporary root and its cleanup ------------------------------------------------------

work="$(mktemp -d "$parent/fresh-root.XXXXXX")"
root="$work/root"
mkdir "$root"

# Mount points at or under $root, deepest first (/proc/self/mounts escapes spaces; $root has none).
mounts_under_root() {
  awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print length($2), $2 }' /proc/self/mounts \
    | sort -rn | cut -d' ' -f2-
}
unmount_all() {
  local m _
  for _ in 1 2 3; do
    while read -r m; do
      [ -n "$m" ] || continue
      umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done < <(mounts_under_root)
    [ -z "$(mounts_under_root)" ] && return 0
    sleep 1
  done
  return 1
}
descendants() {
  local c
  for c in $(pgrep -P "$1"); do descendants "$c"; echo "$c"; done
}
chrooted_pids() {
  local p
  for p in /proc/[0-9]*; do
    if [ "$(readlink "$p/root" 2>/dev/null)" = "$root" ]; then echo "${p#/proc/}"; fi
  done
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ "$rc" -eq 130 ] || [ "$rc" -eq 143 ]; then echo "fresh-root: interrupted: cleaning up" >&2; fi
  # An interrupted step: its processes (debootstrap, apt, cargo), then anything still running
  # chrooted in the root.
  local p _
  if [ -n "$step_pid" ]; then
    # shellcheck disable=SC2046
    kill -TERM "$step_pid" $(descendants "$step_pid") 2>/dev/null || true
  fi
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    [ -n "$(chrooted_pids)" ] || break
    # shellcheck disable=SC2046
    kill -TERM $(chrooted_pids) 2>/dev/null || true
    sleep 1
  done
  if ! unmount_all; then
    echo "fresh-root: warning: could not unmount: $(mounts_under_root | tr '\n' ' '); leaving $work in place" >&2
  elif [ "$keep" -eq 1 ]; then
    say "kept the root, unmounted, in $root (the build is in $root/var/tmp/target)"
  else
    rm -rf --one-file-system "$work" || echo "fresh-root: warning: could not delete $work" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Mounts made under $root stay private to it, whatever the host's propagation is.
mount --bind "$root" "$root"
mount --make-rprivate "$root"

# --- steps -----------------------------------------------------------------------------------

failed=()
durations=()
fmt_time() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
# step NAME COMMAND...: runs it in a subshell with `set -e` (so any failing command inside ends
# the step), records its time and whether it failed in step_rc; never exits itself. Called as a
# plain command: under `||` or `if`, bash would ignore `set -e` inside.
step_rc=0 step_pid=""
step() {
  local name="$1" t0=$SECONDS
  shift
  say "--- $name"
  set +e
  # In the background, so that a signal to this script runs its trap at once, not after the step.
  (set -e; "$@") &
  step_pid=$!
  wait "$step_pid"
  step_rc=$?
  step_pid=""
  set -e
  durations+=("$name $(fmt_time $((SECONDS - t0)))")
  if [ "$step_rc" -ne 0 ]; then
    failed+=("$name")
    say "--- $name FAILED (exit $step_rc, after $(fmt_time $((SECONDS - t0))))"
  else
    say "--- $name done in $(fmt_time $((SECONDS - t0)))"
  fi
}
# Runs a command in the chroot with a clean environment: the borrowed toolchain first on the
# PATH, CARGO_HOME in the root, the build in /var/tmp/target inside the root.
in_root() {
  chroot "$root" /usr/bin/env -i \
    HOME=/root USER=root LOGNAME=root LANG=C.UTF-8 TERM=dumb \
    PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/root/.cargo CARGO_TARGET_DIR=/var/tmp/target CARGO_TERM_COLOR=never \
    "$@"
}

debootstrap_root() {
  local log="$work/debootstrap.log" opts=()
  say "debootstrap ($variant) bookworm from $mirror (log: $log)"
  if [ "$variant" = minbase ]; then opts=(--variant=minbase); fi
  if ! debootstrap "${opts[@]}" bookworm "$root" "$mirror" >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    return 1
  fi
  # A fresh Debian 12 machine has updates and security in its sources as well.
  cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
  say "root has $(chroot "$root" dpkg-query -W -f='.\n' | wc -l) packages"
}

prepare_root() {
  # Pseudo-filesystems: proc (ps, apt, cargo), sysfs read-only, a private devpts and /dev/shm.
  # debootstrap made /dev's device nodes itself, so the host's /dev is not bound in.
  mount -t proc proc "$root/proc"
  mount -t sysfs -o ro sysfs "$root/sys"
  mkdir -p "$root/dev/pts" "$root/dev/shm"
  mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$root/dev/pts"
  ln -sf pts/ptmx "$root/dev/ptmx"
  mount -t tmpfs -o mode=1777 tmpfs "$root/dev/shm"
  [ -c "$root/dev/null" ] || { echo "no /dev/null device in the root" >&2; return 1; }
  cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  # The toolchain, read-only.
  mkdir -p "$root/opt/rust"
  mount --bind "$toolchain" "$root/opt/rust"
  mount -o remount,bind,ro "$root/opt/rust"
  touch "$root/opt/rust/.rw-probe" 2>/dev/null && { rm -f "$root/opt/rust/.rw-probe"; echo "toolchain mount is writable" >&2; return 1; }
  mkdir -p "$root/root/.cargo"
  if [ "$host_registry" -eq 1 ]; then
    say "copying $cargo_home_host/registry ($(du -sh "$cargo_home_host/registry" | cut -f1))"
    cp -a "$cargo_home_host/registry" "$root/root/.cargo/registry"
  fi
  # Local CA certificates (see the header); picked up when ca-certificates is installed.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  fi
  # No daemons started by package scripts inside the chroot (etcd would bind the host's ports).
  printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
  chmod 755 "$root/usr/sbin/policy-rc.d"
  # The checkout: the working tree's tracked and untracked-but-not-ignored files, never target/.
  mkdir -p "$root/src/flanneld-rs"
  git -C "$repo" ls-files -z -co --exclude-standard \
    | while IFS= read -r -d '' f; do
        if { [ -e "$repo/$f" ] || [ -L "$repo/$f" ]; } && [[ "$f" != target/* && "$f" != */target/* ]]; then
          printf '%s\0' "$f"
        fi
      done \
    | tar -C "$repo" --null --no-recursion -T - -cf - \
    | tar -C "$root/src/flanneld-rs" -xf -
  say "copied $(find "$root/src/flanneld-rs" -type f | wc -l) files of the checkout to /src/flanneld-rs"
  say "toolchain: $rust_version (from $toolchain); crates: $([ "$host_registry" -eq 1 ] && echo "host registry copy" || echo "downloaded from crates.io")"
}

manual_before="$work/manual-before" manual_after="$work/manual-after"
all_before="$work/all-before" all_after="$work/all-after"
run_install_deps() {
  in_root apt-mark showmanual | sort >"$manual_before"
  in_root dpkg-query -W -f='${Package}\n' | sort >"$all_before"
  local rc=0 log="$work/install-deps.log"
  say "running scripts/install-deps.sh (apt's output: $log, its tail printed on failure)"
  in_root bash -c 'cd /src/flanneld-rs && bash scripts/install-deps.sh' >"$log" 2>&1 || rc=$?
  if [ "$rc" -ne 0 ]; then tail -n 40 "$log" >&2; fi
  in_root apt-mark showmanual | sort >"$manual_after"
  in_root dpkg-query -W -f='${Package}\n' | sort >"$all_after"
  return "$rc"
}

# Every program and file the tests and the demo use (optional ones only reported). Steps run in
# subshells, so what is missing goes to files for the report.
missing_tools_file="$work/missing-tools" missing_bins_file="$work/missing-bins"
check_tools() {
  local out
  out="$(in_root bash -s <<'EOF'
for t in cc protoc etcd etcdctl iperf3 ip ping nft iptables wg wireguard-go tcpdump openssl \
         sysctl ps xz python3; do
  command -v "$t" >/dev/null || echo "$t"
done
for f in /usr/lib/cni/bridge /usr/lib/cni/host-local /usr/lib/cni/loopback \
         /usr/include/google/protobuf/descriptor.proto; do
  [ -e "$f" ] || echo "$f"
done
for m in prometheus_client yaml; do
  python3 -c "import $m" 2>/dev/null || echo "python3 module $m"
done
[ -d /etc/ssl/certs ] && [ -s /etc/ssl/certs/ca-certificates.crt ] || echo "CA certificates (/etc/ssl/certs/ca-certificates.crt)"
EOF
)" || return 1
  local opt
  opt="$(in_root bash -c 'for t in perf kubectl systemd-analyze; do command -v "$t" >/dev/null || printf "%s " "$t"; done')"
  [ -z "$opt" ] || say "optional, not installed (tests skip or only the benchmark uses them): $opt"
  if [ -n "$out" ]; then
    echo "$out" | tr '\n' ' ' >"$missing_tools_file"
    say "missing after install-deps: $(cat "$missing_tools_file")"
    return 1
  fi
  say "every tool the tests need is there"
}

build_workspace() {
  local j=()
  [ -z "$jobs" ] || j=(-j "$jobs")
  in_root nice -n 19 bash -c 'cd /src/flanneld-rs && exec cargo build --workspace --bins "$@"' build "${j[@]}"
}

check_binaries() {
  local names
  names="$(in_root bash -c 'cd /src/flanneld-rs && cargo metadata --no-deps --offline --format-version 1' \
    | python3 -c 'import json, sys
m = json.load(sys.stdin)
members = set(m["workspace_members"])
for p in m["packages"]:
    if p["id"] in members:
        for t in p["targets"]:
            if "bin" in t["kind"]:
                print(t["name"])')" || return 1
  [ -n "$names" ] || { echo "cargo metadata lists no binaries" >&2; return 1; }
  local n missing_bins=()
  for n in $names; do
    if [ ! -x "$root/var/tmp/target/debug/$n" ]; then
      missing_bins+=("$n")
    elif in_root ldd "/var/tmp/target/debug/$n" | grep -q 'not found'; then
      missing_bins+=("$n (unresolved libraries)")
    else
      say "built: /var/tmp/target/debug/$n ($(du -h "$root/var/tmp/target/debug/$n" | cut -f1))"
    fi
  done
  if [ "${#missing_bins[@]}" -gt 0 ]; then
    echo "${missing_bins[*]}" >"$missing_bins_file"
    say "binaries missing: ${missing_bins[*]}"
    return 1
  fi
}

say "root: $root; mirror: $mirror; toolchain: $rust_version"
step debootstrap debootstrap_root
[ "$step_rc" -eq 0 ] || exit 1
step prepare prepare_root
[ "$step_rc" -eq 0 ] || exit 1
step install-deps run_install_deps
step tools check_tools
step build build_workspace
if [ "$step_rc" -eq 0 ]; then step binaries check_binaries; fi

# --- report ----------------------------------------------------------------------------------

echo
say "report"
[ "${#host_installed[@]}" -eq 0 ] || say "  host: installed ${host_installed[*]}"
if [ -s "$manual_after" ]; then
  requested="$(comm -13 "$manual_before" "$manual_after" | tr '\n' ' ')"
  n_all="$(comm -13 "$all_before" "$all_after" | wc -l)"
  say "  install-deps installed ${n_all} packages; asked for: ${requested:-nothing}"
fi
for d in "${durations[@]}"; do say "  step $d"; done
[ ! -s "$missing_tools_file" ] || say "  missing tools: $(cat "$missing_tools_file")"
[ ! -s "$missing_bins_file" ] || say "  missing binaries: $(cat "$missing_bins_file")"
total="$(fmt_time $((SECONDS - t_start)))"
if [ "${#failed[@]}" -eq 0 ]; then
  say "PASS: fresh Debian 12 root: install-deps, build and tool checks passed in $total"
  exit 0
fi
say "FAIL: ${failed[*]} failed (total $total)"
exit 1
