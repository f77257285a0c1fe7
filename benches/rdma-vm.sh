#!/usr/bin/env bash
# RDMA throughput inside a Soft-RoCE VM, beside perftest's ib_write_bw with the same block size (`kvtransfer bench`
# with its NIC ceiling).
# Soft-RoCE is software: the numbers prove the ratio, not the speed of a NIC.
#
#   npm run build && npm run bench:rdma          # BENCH_SIZES (KiB, comma-separated; default 1,64,256)
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=${BENCH_SIZES:-1,64,256}
batch=1538
if [ "${RXE_VM_HOST-}" = "" ] && [ ! -e /sys/class/infiniband/rxe0 ]; then
  exec env RXE_VM_MEM=${RXE_VM_MEM:-6144} BENCH_SIZES="$sizes" .ci/rxe-vm/run-in-rxe-vm.sh -- bash benches/rdma-vm.sh
fi

# One run of the bench: kvtransfer over RDMA and, as its ceiling in the same run, perftest's ib_write_bw on the
# same device and GID with writes of one block (the table's "of its ceiling" column).
KVCACHE_RDMA_NICS=rxe0 KVCACHE_RDMA_GID_INDEX=1 node cli.js bench --transports rdma --key-only --sizes "$sizes" --batch "$batch" \
  --iterations 5 --warmup 1   # Soft-RoCE moves tens of MB/s: a 256 KiB call takes seconds
