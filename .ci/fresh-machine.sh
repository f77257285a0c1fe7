#!/usr/bin/env bash
# The README's quick start on a machine that has never seen the project: a fresh Debian 12 root (debootstrap,
# minbase: no compiler, cmake, make or libclang), with only what a user brings beforehand, Rust from rustup and
# Node.js, lent read-only from this machine. Inside it:
#   1. `npm run build` must stop at once with one line naming what is missing (never a build-script panic);
#   2. the quick start's first command, taken from README.md, must install, build and run the demo.
# Needs root (debootstrap, chroot, mounts). The base root is cached in ~/.cache; every run unpacks a new copy,
# works in its own mount namespace (nothing stays mounted) and deletes it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "fresh-machine: needs root (debootstrap and chroot)" >&2; exit 1; }

cache=${HOME:-/root}/.cache/kvtransfer-fresh-machine
base=$cache/bookworm-minbase.tar
log() { echo "fresh-machine: $*" >&2; }

if [ ! -f "$base" ]; then
  command -v debootstrap >/dev/null || {
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  log "making a Debian 12 minbase root (once)"
  mkdir -p "$cache"
  tmp=$(mktemp -d /var/tmp/kvtransfer-base.XXXXXX)
  debootstrap --variant=minbase --include=ca-certificates bookworm "$tmp" http://deb.debian.org/debian >/dev/null
  tar -C "$tmp" -cf "$base.new" .
  rm -rf "$tmp"
  mv "$base.new" "$base"
fi

root=$(mktemp -d /var/tmp/kvtransfer-fresh.XXXXXX)
chmod 755 "$root"   # apt downloads as _apt
trap 'rm -rf "$root"' EXIT
tar -C "$root" -xf "$base"
# How this machine reaches the package registries, which every machine of its site has before any project: its
# DNS, local CA certificates (a proxy may sign the registries' certificates), apt settings and npm settings.
cp /etc/resolv.conf "$root/etc/resolv.conf"
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates >/dev/null 2>&1
fi
cp /etc/apt/apt.conf.d/* "$root/etc/apt/apt.conf.d/" 2>/dev/null || true
[ -f "${HOME:-/root}/.npmrc" ] && cp "${HOME:-/root}/.npmrc" "$root/root/.npmrc"
for tool in cmake make cc c++ g++; do
  if chroot "$root" sh -c "command -v $tool" >/dev/null; then log "the base root unexpectedly has $tool"; exit 1; fi
done
if ls "$root"/usr/lib/llvm-*/lib/libclang* >/dev/null 2>&1; then log "the base root unexpectedly has libclang"; exit 1; fi

# The project as committed or staged here (what a clone would hold, plus uncommitted edits).
mkdir -p "$root/src/kvtransfer"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -C "$root/src/kvtransfer" -xf -

# What a user installs before the quick start: Rust (rustup's toolchain) and Node.js with npm (lent as one
# self-contained binary, as Node.js's own builds and NodeSource's packages are).
rust=$(rustc --print sysroot)
node_bin=$(command -v node)
npm_dir=$(cd "$(dirname "$(readlink -f "$(command -v npm)")")/.." && pwd)
mkdir -p "$root/opt/rust" "$root/usr/local/lib/node_modules/npm"
touch "$root/usr/local/bin/node"
ln -s ../lib/node_modules/npm/bin/npm-cli.js "$root/usr/local/bin/npm"
ln -s ../lib/node_modules/npm/bin/npx-cli.js "$root/usr/local/bin/npx"

quick_start=$(awk '/^## Quick start/{q=1} q && /^```sh/{getline; print; exit}' README.md | sed 's/[[:space:]]*#.*$//')
[ -n "$quick_start" ] || { log "README.md has no quick start command"; exit 1; }
log "quick start: $quick_start"

started=$(date +%s)
unshare -m --propagation private bash -euo pipefail -c '
  root=$1 rust=$2 node_bin=$3 npm_dir=$4 quick_start=$5
  mount --bind -o ro "$rust" "$root/opt/rust"
  mount --bind -o ro "$node_bin" "$root/usr/local/bin/node"
  mount --bind -o ro "$npm_dir" "$root/usr/local/lib/node_modules/npm"
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev"
  mount --rbind /sys "$root/sys"
  mount -t tmpfs tmpfs "$root/dev/shm"
  mount -t tmpfs tmpfs "$root/tmp"
  export PATH=/opt/rust/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root CARGO_BUILD_JOBS=2 CI=true
  unset LIBCLANG_PATH CC CXX RUSTUP_HOME CARGO_HOME
  run() { chroot "$root" /usr/bin/env -C /src/kvtransfer bash -c "$1" </dev/null; }

  echo "== 1. building before setup: one line, no panic =="
  run "npm ci --ignore-scripts --no-audit --no-fund >/dev/null"
  if out=$(run "npm run --silent build:native" 2>&1); then
    echo "$out"; echo "fresh-machine: the build went ahead without its prerequisites" >&2; exit 1
  fi
  echo "$out" | tail -3
  # (grep reads a here-string: `echo | grep -q` under pipefail fails when grep stops reading early)
  grep -q "kvtransfer: the build needs .*cmake.*libclang" <<<"$out" ||
    { echo "fresh-machine: the refusal did not name cmake and libclang" >&2; exit 1; }
  if grep -q "panicked" <<<"$out"; then echo "fresh-machine: a build script panicked" >&2; exit 1; fi

  echo "== 2. the quick start: $quick_start =="
  run "$quick_start"
' fresh "$root" "$rust" "$node_bin" "$npm_dir" "$quick_start"
log "passed in $(( $(date +%s) - started )) s"
