#!/usr/bin/env bash
# RDMA throughput inside a Soft-RoCE VM, beside perftest's ib_write_bw with the same block size and count.
# Soft-RoCE is software: the numbers prove the ratio, not the speed of a NIC.
#
#   npm run build && npm run bench:rdma          # BENCH_SIZES (KiB, default 1,64,256)
set -euo pipefail
cd "$(dirname "$0")/.."
sizes=${BENCH_SIZES:-1,64,256}
batch=1538
if [ "${RXE_VM_HOST-}" = "" ] && [ ! -e /sys/class/infiniband/rxe0 ]; then
  exec env RXE_VM_MEM=${RXE_VM_MEM:-3072} BENCH_SIZES="$sizes" .ci/rxe-vm/run-in-rxe-vm.sh -- bash benches/rdma-vm.sh
fi

echo "== kvtransfer over RDMA (rxe0): $batch scattered blocks per call, keys only =="
KVCACHE_TRANSPORT=rdma KVCACHE_RDMA_NICS=rxe0 KVCACHE_RDMA_GID_INDEX=1 BENCH_KEY_ONLY=1 BENCH_SECONDS=3 \
  BENCH_SIZES="$sizes" node benches/transfer.mjs | tee /tmp/ours.txt

echo "== ib_write_bw (perftest), rxe0, one QP, same block size, $((batch * 3)) writes =="
printf 'block     GB/s\n' | tee /tmp/perftest.txt
for k in ${sizes//,/ }; do
  bytes=$((k * 1024))
  ib_write_bw -d rxe0 -x 1 -F -s "$bytes" -n $((batch * 3)) --report_gbits >/tmp/server.txt 2>&1 &
  sleep 1
  ib_write_bw -d rxe0 -x 1 -F -s "$bytes" -n $((batch * 3)) --report_gbits 10.99.0.1 >/tmp/client.txt 2>&1
  wait
  gbits=$(awk -v b="$bytes" '$1==b {print $4}' /tmp/client.txt | tail -1)
  awk -v k="$k" -v g="$gbits" 'BEGIN { printf "%4s KiB %8.3f\n", k, g / 8 }' | tee -a /tmp/perftest.txt
done

echo "== ratio (ours / ib_write_bw) =="
for k in ${sizes//,/ }; do
  ours=$(awk -v k="$k" '$1==k && $2=="KiB" {print $3}' /tmp/ours.txt)
  theirs=$(awk -v k="$k" '$1==k && $2=="KiB" {print $3}' /tmp/perftest.txt)
  awk -v k="$k" -v o="$ours" -v t="$theirs" 'BEGIN { printf "%4s KiB  ours %s GB/s  ib_write_bw %s GB/s  ratio %.2f\n", k, o, t, o / t }'
done
