#!/usr/bin/env bash
# Run a command inside a small emulated Linux VM that has Soft-RoCE (rdma_rxe) devices.
#
#   run-in-rxe-vm.sh [--pair] [--] COMMAND [ARGS...]
#
# The guest sees the host's / read-only (same programs and libraries, so build on the host first),
# the current directory read-write at the same path, a fresh /tmp, and two RDMA devices:
#   rxe0 on dummy0 (10.99.0.1), rxe1 on dummy1 (10.99.1.1); RoCE v2 GID index 1 on both.
# The command runs as root in the current directory; its output streams to this terminal and its
# exit status becomes this script's. The VM is emulated (no KVM), so it is slow: use it for
# correctness, not for speed.
#
# --pair boots two VMs, "a" (10.99.0.1) and "b" (10.99.0.2), joined by one virtual Ethernet link (eth0, with
# rxe0 on it in each), and runs COMMAND in both with RXE_VM_HOST=a or b and RXE_VM_PEER set to the other's
# address: two real hosts, so traffic crosses a network that `tc qdisc ... netem` can degrade. Exit status: a's,
# or b's if a succeeded and b failed.
#
# Environment: RXE_VM_MEM (MiB, default 2048), RXE_VM_CPUS (default 2),
#              RXE_VM_TIMEOUT (seconds, default 1800), RXE_VM_CACHE (default ~/.cache/rxe-vm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${RXE_VM_CACHE:-${HOME:-/root}/.cache/kvtransfer-rxe-vm}
mem=${RXE_VM_MEM:-2048}
cpus=${RXE_VM_CPUS:-2}
limit=${RXE_VM_TIMEOUT:-1800}
pair=0
[ "${1:-}" = "--pair" ] && { pair=1; shift; }
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "usage: $0 [--] COMMAND [ARGS...]" >&2; exit 2; }

log() { echo "rxe-vm: $*" >&2; }

need_pkgs() {
  local missing=()
  command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
  [ -x /bin/busybox ] || missing+=(busybox-static)
  command -v cpio >/dev/null || missing+=(cpio)
  command -v modprobe >/dev/null || missing+=(kmod)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v rdma >/dev/null || missing+=(iproute2)
  [ -e /usr/lib/x86_64-linux-gnu/libibverbs.so.1 ] || missing+=(libibverbs1)
  [ -e /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav34.so ] || ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so >/dev/null 2>&1 || missing+=(ibverbs-providers)
  command -v ibv_devinfo >/dev/null || missing+=(ibverbs-utils)
  command -v ib_write_bw >/dev/null || missing+=(perftest)
  [ -e /usr/lib/x86_64-linux-gnu/librdmacm.so.1 ] || missing+=(librdmacm1 rdmacm-utils)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# A Debian kernel that ships rdma_rxe as a module (the cloud flavour does not).
prepare_kernel() {
  [ -f "$cache/kernel/vmlinuz" ] && return
  log "fetching a Debian amd64 kernel (once)"
  local pkg tmp
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  [ -n "$pkg" ] || { apt-get update -qq >/dev/null; pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}'); }
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq "$pkg" >/dev/null)
  mkdir -p "$cache/kernel.new"
  dpkg-deb -x "$tmp"/*.deb "$cache/kernel.new/root"
  cp "$cache"/kernel.new/root/boot/vmlinuz-* "$cache/kernel.new/vmlinuz"
  ls "$cache/kernel.new/root/lib/modules" > "$cache/kernel.new/version"
  depmod -b "$cache/kernel.new/root" "$(cat "$cache/kernel.new/version")"
  rm -rf "$tmp" "$cache/kernel"
  mv "$cache/kernel.new" "$cache/kernel"
}

# initramfs: busybox, the modules rdma_rxe/9p/dummy need (with their dependencies), and ./init.
prepare_initrd() {
  local ver root out
  ver=$(cat "$cache/kernel/version")
  root="$cache/kernel/root"
  out="$cache/initrd.img"
  [ -f "$out" ] && [ "$out" -nt "$here/init" ] && [ "$out" -nt "$here/run-in-rxe-vm.sh" ] && return
  log "building the initramfs (once)"
  local d; d=$(mktemp -d)
  mkdir -p "$d"/{bin,sbin,proc,sys,dev,mnt,tmp,lib/modules}
  cp /bin/busybox "$d/bin/busybox"
  for m in virtio_pci virtio_net 9p 9pnet_virtio dummy rdma_rxe ib_uverbs ib_core crc32_generic sch_netem; do
    modprobe -d "$root" -S "$ver" --show-depends "$m" 2>/dev/null || true
  done | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++' > "$d/modules.order.tmp"
  : > "$d/modules.list"
  while read -r ko; do
    local rel=${ko#"$root"}
    local dst="$d/lib/modules/$(basename "$rel")"
    case "$ko" in
      *.ko.xz) xz -dc "$ko" > "${dst%.xz}"; echo "/lib/modules/$(basename "${rel%.xz}")" >> "$d/modules.list";;
      *.ko.zst) zstd -qdc "$ko" > "${dst%.zst}"; echo "/lib/modules/$(basename "${rel%.zst}")" >> "$d/modules.list";;
      *) cp "$ko" "$dst"; echo "/lib/modules/$(basename "$rel")" >> "$d/modules.list";;
    esac
  done < "$d/modules.order.tmp"
  rm "$d/modules.order.tmp"
  cp "$here/init" "$d/init"; chmod +x "$d/init"
  (cd "$d" && find . | cpio -o -H newc --quiet | gzip -1) > "$out.tmp"
  mv "$out.tmp" "$out"
  rm -rf "$d"
}

need_pkgs
mkdir -p "$cache"
prepare_kernel
prepare_initrd

# write_job DIR HOST PEER: the command, with the caller's environment, as a script for the guest.
write_job() {
  {
    printf 'cd %q\n' "$PWD"
    env -0 | while IFS= read -r -d '' kv; do
      k=${kv%%=*}
      case "$k" in ''|*[!A-Za-z0-9_]*|PWD|OLDPWD|SHLVL|_|TERM|HOSTNAME|TMPDIR) continue;; esac
      printf 'export %s=%q\n' "$k" "${kv#*=}"
    done
    [ -n "$2" ] && printf 'export RXE_VM_HOST=%s RXE_VM_PEER=%s\n' "$2" "$3"
    printf 'exec'; printf ' %q' "${@:4}"; printf '\n'
  } > "$1/cmd.sh"
}

# boot JOBDIR CPUS EXTRA_APPEND [QEMU_ARGS...]
boot() {
  local jobdir=$1 ncpu=$2 extra=$3; shift 3
  timeout --foreground --kill-after=10 "$limit" qemu-system-x86_64 \
    -machine q35,accel=tcg -cpu max -smp "$ncpu" -m "$mem" \
    -kernel "$cache/kernel/vmlinuz" -initrd "$cache/initrd.img" \
    -append "console=ttyS0 quiet loglevel=3 panic=-1 rxe_work=$PWD $extra" \
    -display none -no-reboot -nodefaults -serial stdio -monitor none \
    -virtfs local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap \
    -virtfs local,path="$PWD",mount_tag=work,security_model=none,multidevs=remap \
    -virtfs local,path="$jobdir",mount_tag=job,security_model=none \
    -device virtio-rng-pci "$@" < /dev/null
}

rc_of() { if [ -f "$1/rc" ]; then cat "$1/rc"; else echo 125; fi; }

jobs_root=$(mktemp -d /tmp/rxe-vm.XXXXXX)
trap 'rm -rf "$jobs_root"' EXIT
if [ "$pair" = 0 ]; then
  mkdir "$jobs_root/a"
  write_job "$jobs_root/a" "" "" "$@"
  boot "$jobs_root/a" "$cpus" "" || { [ $? = 124 ] && log "timed out after ${limit}s"; }
  rc=$(rc_of "$jobs_root/a")
else
  port=$((20000 + RANDOM % 20000))
  mkdir "$jobs_root/a" "$jobs_root/b"
  write_job "$jobs_root/a" a 10.99.0.2 "$@"
  write_job "$jobs_root/b" b 10.99.0.1 "$@"
  boot "$jobs_root/a" 1 "rxe_ip=10.99.0.1" -netdev socket,id=n0,listen=127.0.0.1:$port \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:99:00:01 2>&1 | sed -u 's/^/[a] /' &
  apid=$!
  sleep 1
  boot "$jobs_root/b" 1 "rxe_ip=10.99.0.2" -netdev socket,id=n0,connect=127.0.0.1:$port \
    -device virtio-net-pci,netdev=n0,mac=52:54:00:99:00:02 2>&1 | sed -u 's/^/[b] /'
  wait "$apid" || true
  rc=$(rc_of "$jobs_root/a"); rcb=$(rc_of "$jobs_root/b")
  [ "$rc" = 0 ] && rc=$rcb
fi
[ "$rc" = 125 ] && log "a VM ended without an exit status (crash or timeout)"
exit "$rc"
