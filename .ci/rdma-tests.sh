#!/usr/bin/env bash
# The RDMA suites, inside Soft-RoCE VMs (this kernel may have no RDMA; the VM's has rdma_rxe):
#   1. one VM, both ends on rxe0: the Rust RDMA and request tests, every ava suite over RDMA, the demo over RDMA, a
#      soak with chaos and a load run over RDMA (queue pairs and registered regions watched); and shm under Yama's
#      ptrace_scope 1 (which this kernel may lack), as an unprivileged user;
#   2. two VMs joined by a virtual link (two hosts): the demo and the request scenarios across them
#      (`__test__/helpers/pair-requests.mjs`), then again with 1% packet loss;
#   3. the same pair with a bad network, over TCP and over RDMA (`__test__/helpers/pair-faults.mjs`): delay,
#      loss, reordering, duplication, and cuts of 5 s and 20 s, each then healed.
# Build first (`npm run build`); cargo builds the Rust test binary here. Where the VM cannot be booted
# (no root to install qemu) the suites are skipped with a message, unless KVTRANSFER_REQUIRE_RDMA=1.
set -euo pipefail
cd "$(dirname "$0")/.."
vm=.ci/rxe-vm/run-in-rxe-vm.sh

if ! command -v qemu-system-x86_64 >/dev/null && [ "$(id -u)" != 0 ]; then
  msg="SKIPPED the RDMA suites: booting the Soft-RoCE VM needs qemu (install qemu-system-x86, or run as root)"
  [ "${KVTRANSFER_REQUIRE_RDMA:-0}" = 1 ] && { echo "$msg" >&2; exit 1; }
  echo "$msg"; exit 0
fi

# test_binary NAME: builds the Rust integration test NAME and prints its path (relative: the VM mounts this dir).
test_binary() {
  local bin
  bin=$(cargo test --release -p kvtransfer --test "$1" --no-run --message-format=json 2>/dev/null |
    node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>{for(const l of s.split("\n")){try{const m=JSON.parse(l);if(m.executable&&m.target.name===process.argv[1])console.log(m.executable)}catch{}}})' "$1")
  [ -x "$bin" ] || { echo "could not build the test binary $1" >&2; exit 1; }
  echo "${bin#"$PWD/"}"
}
bin=$(test_binary rdma_transfer)
requests_bin=$(test_binary requests)
grant_bin=$(test_binary shm_grant)

rdma_env=(KVCACHE_TRANSPORT=rdma KVCACHE_RDMA_NICS=rxe0 KVCACHE_RDMA_GID_INDEX=1)

echo "== RDMA, one host (rxe0) =="
env KVTRANSFER_TEST_RDMA_NIC=rxe0 KVTRANSFER_TEST_RDMA_GID_INDEX=1 "$vm" -- bash -c "
  set -e
  ibv_devinfo -d rxe0 | grep -E 'hca_id|state|link_layer|active_mtu'
  echo '-- cargo: rdma_transfer'
  $bin --test-threads=1
  echo '-- cargo: requests over RDMA (revoke and close during writes, abort, a prefill that goes away)'
  $requests_bin --test-threads=1
  echo '-- ava over RDMA'
  npx ava
  echo '-- demo over RDMA'
  env ${rdma_env[*]} node examples/demo.mjs
  echo '-- soak over RDMA: chaos (the prefill process killed or stopped), then a load run of 4 prefill processes'
  env ${rdma_env[*]} node cli.js soak --duration 60s --interval 15s --peers 2 --transport rdma --seed 41 --chaos 2s
  env ${rdma_env[*]} node cli.js soak --duration 40s --interval 10s --prefills 4 --peers 1 --layers 8 --transport rdma --seed 42
  echo '-- shm under Yama ptrace_scope 1, as an unprivileged user'
  install -m 755 $grant_bin /tmp/shm_grant
  sysctl -qw kernel.yama.ptrace_scope=1
  (cd /tmp && KVTRANSFER_REQUIRE_YAMA=1 setpriv --reuid=nobody --regid=nogroup --clear-groups /tmp/shm_grant --test-threads=1)
  sysctl -qw kernel.yama.ptrace_scope=0
  echo '-- without libibverbs'
  # (libibverbs is found here, not before: the VM script installs rdma-core on a machine's first run)
  verbs=\$(ls /usr/lib/*-linux-gnu/libibverbs.so.1 | head -1)
  unshare -m sh -c \"mount --bind /dev/null \$verbs && node __test__/helpers/without-verbs.mjs\"
"

echo "== RDMA, two hosts (a: decode, b: prefill) =="
"$vm" --pair -- bash -c "
  set -e
  export ${rdma_env[*]}
  for round in clean lossy; do
    if [ \$round = lossy ]; then tc qdisc add dev eth0 root netem loss 1% delay 1ms; fi
    echo \"-- demo across the link (\$round)\"
    if [ \"\$RXE_VM_HOST\" = a ]; then
      DEMO_PORT=23456 node examples/demo.mjs decode
    else
      sleep 3
      DEMO_PORT=23456 DECODE_HOST=\$RXE_VM_PEER node examples/demo.mjs prefill
    fi
    echo \"-- requests across the link (\$round): many at once, abort, revoke with a writer, a killed prefill\"
    port=\$([ \$round = clean ] && echo 23460 || echo 23470)
    if [ \"\$RXE_VM_HOST\" = a ]; then
      PAIR_PORT=\$port node __test__/helpers/pair-requests.mjs decode
    else
      sleep 3
      PAIR_PORT=\$port DECODE_HOST=\$RXE_VM_PEER node __test__/helpers/pair-requests.mjs prefill
    fi
  done
"
echo "== a bad network between the two hosts: netem delay, loss, reordering, duplication, cuts of 5 s and 20 s =="
"$vm" --pair -- bash -c "
  set -e
  export KVCACHE_AUTH_TOKEN=pair-faults-0123456789abcdef0123456789
  for transport in tcp rdma; do
    echo \"-- faults over \$transport\"
    port=\$([ \$transport = tcp ] && echo 23480 || echo 23490)
    if [ \$transport = rdma ]; then export ${rdma_env[*]}; else export KVCACHE_TRANSPORT=tcp KVCACHE_TCP_CONNECTIONS=2; fi
    if [ \"\$RXE_VM_HOST\" = a ]; then
      PAIR_PORT=\$port timeout 600 node __test__/helpers/pair-faults.mjs decode
    else
      sleep 3
      PAIR_PORT=\$port DECODE_HOST=\$RXE_VM_PEER timeout 600 node __test__/helpers/pair-faults.mjs prefill
    fi
  done
"
if [ ! -e /sys/class/infiniband ]; then
  echo "== this host: rdma-core's libraries, no RDMA in the kernel =="
  KVTRANSFER_EXPECT_VERBS=1 npx ava __test__/api.test.mjs --match '*kernel without RDMA*'
fi
echo "RDMA suites passed"
