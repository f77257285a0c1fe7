#!/usr/bin/env bash
# The GPU suite: CUDA IPC, device memory over TCP and the copy kernel, between two processes on one GPU,
# then the GPU benchmark; where the machine has two GPUs or more, the transfer tests and the benchmark again
# with the decode process on GPU 1 (cross-GPU, peer copies). GPU machines often have CUDA but no Rust, so it runs in two halves:
#
#   bash .ci/gpu-tests.sh build   # here (Rust, Node.js, npm): the test and bench binaries into .carry/gpu/,
#                                 # Node.js with the built package and ava into .carry/node/
#   bash .ci/gpu-tests.sh run     # on the GPU machine, in a copy of this tree that has .carry/gpu/
#   bash .ci/gpu-tests.sh run gpu_transfer gpu_copy   # only those parts (unit gpu_memory gpu_transfer
#                                                     # shm_transfer gpu_copy node)
#   bash .ci/gpu-tests.sh         # both, on a GPU machine that has Rust
#   bash .ci/gpu-tests.sh wheels  # here: the peers' wheels for that machine (no registry there) into
#                                 # .carry/peer-wheels/; `run peers` then runs NIXL's cuda_ipc on the same
#                                 # workload as gpu_copy (carry both folders: .carry/gpu and .carry/peer-wheels)
#
# The part `node` is the package as a user runs it there: this machine's Node.js binary, the built package and
# ava travel in .carry/node/node.tar.xz (the GPU machine has no Node.js and reaches no registry); it runs the
# DeviceBuffer tests and `kvtransfer bench` (CUDA IPC beside one device copy, and the host transports), on GPU 0
# and, with two GPUs, into GPU 1; NIXL beside it where .carry/peer-wheels came too. What can be carried at once
# is 64 MiB: .carry/gpu (14 MB) for the Rust parts, .carry/node (27 MB) and .carry/peer-wheels (31 MB) for `node`.
#
# `run` writes the logs and the benchmark table to $OUT (default: .carry/gpu/results) and exits non-zero
# when a test fails or no GPU is found.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=.carry/gpu

build() {
  rm -rf "$dir" && mkdir -p "$dir"
  cargo test --release -j2 -p kvtransfer --no-run --message-format=json 2>/dev/null \
    | python3 -c '
import json, sys
wanted = {"kvtransfer": "unit", "gpu_transfer": "gpu_transfer", "gpu_memory": "gpu_memory", "shm_transfer": "shm_transfer"}
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in wanted:
        print(m["executable"], wanted[m["target"]["name"]])' \
    | while read -r exe name; do cp "$exe" "$dir/$name"; done
  cargo bench -j2 -p kvtransfer --bench gpu_copy --no-run 2>/dev/null
  cp "$(ls -t target/release/deps/gpu_copy-* | grep -v '\.d$' | head -1)" "$dir/gpu_copy"
  ls -la "$dir"
  node_bundle
}

# Node.js, the built package (its JavaScript, native binary and CLI) and ava with what it needs, as one archive.
node_bundle() {
  npm run --silent build >/dev/null
  local stage nodedir=.carry/node
  rm -rf "$nodedir" && mkdir -p "$nodedir"
  stage=$(mktemp -d)
  mkdir -p "$stage/.carry/node/bin"
  cp "$(command -v node)" "$stage/.carry/node/bin/node"
  cp -r lib binding.js index.js cli.js prometheus.js kvtransfer.*.node "$stage/"
  node -e '
    const path = require("path"), fs = require("fs"), seen = new Set()
    const find = (name, from) => { for (let d = from; ; d = path.dirname(d)) { const p = path.join(d, "node_modules", name); if (fs.existsSync(path.join(p, "package.json"))) return p; if (d === path.dirname(d)) return null } }
    const walk = (dir) => { if (seen.has(dir)) return; seen.add(dir); const pj = require(path.join(dir, "package.json")); for (const n of Object.keys({ ...pj.dependencies, ...pj.optionalDependencies })) { const r = find(n, dir); if (r) walk(r) } }
    walk(path.resolve("node_modules/ava"))
    for (const d of seen) console.log(path.relative(process.cwd(), d))' | while read -r d; do mkdir -p "$stage/$(dirname "$d")" && cp -r "$d" "$stage/$d"; done
  # Its entries, not `.`: unpacking must not change the mode of the folder it is unpacked in.
  (cd "$stage" && tar -cf - .carry binding.js cli.js index.js prometheus.js kvtransfer.*.node lib node_modules) | xz -T2 -6 >"$nodedir/node.tar.xz"
  rm -rf "$stage"
  ls -la "$nodedir"
}

# NIXL for the GPU machine's Python (3.12, CUDA 13): its wheel without nixl_ep (the expert-parallel kernels,
# three quarters of it, unused here), so that it fits what can be carried there. Mooncake's CUDA wheel (98 MB)
# does not fit; the table says so.
wheels() {
  local w="$PWD/.carry/peer-wheels" tmp whl
  rm -rf "$w" && mkdir -p "$w"
  tmp=$(mktemp -d)
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 -d "$tmp" nixl-cu13==1.5.1
  whl=$(basename "$tmp"/nixl_cu13-*.whl)
  mkdir "$tmp/x" && unzip -q "$tmp/$whl" -d "$tmp/x" && rm -rf "$tmp/x/nixl_ep_cu13"
  grep -v '^nixl_ep_cu13/' "$tmp"/x/nixl_cu13-*.dist-info/RECORD >"$tmp/RECORD" && mv "$tmp/RECORD" "$tmp"/x/nixl_cu13-*.dist-info/RECORD
  (cd "$tmp/x" && zip -q -9 -r "$w/$whl" .)
  rm -rf "$tmp"
  ls -la "$w"
}

run() {
  local out="${OUT:-$dir/results}"
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt" \
    || { echo "no GPU here (nvidia-smi failed)"; exit 1; }
  local gpus failed=0
  export KVTRANSFER_REQUIRE_GPU=1   # a GPU test that cannot reach the GPU fails rather than skips
  export KVCACHE_DEBUG=1            # the logs say which transport each side chose, and where a failure began
  gpus=$(nvidia-smi -L | grep -c '^GPU ')
  if [ "$gpus" -gt 1 ]; then nvidia-smi topo -m >>"$out/gpu.txt"; fi
  # bounded SECONDS LOG CMD...: runs CMD, appending its output to LOG; if it outlives SECONDS, the stacks of
  # its processes go into LOG (a hang is a failure to explain, not just to kill) and it is killed with every
  # process it started (a group of its own: ava's workers, a bench's decode, a driver's children).
  bounded() {
    local limit=$1 log=$2; shift 2
    setsid "$@" >>"$log" 2>&1 &
    local pid=$! waited=0
    while kill -0 "$pid" 2>/dev/null && [ "$waited" -lt "$limit" ]; do sleep 1; waited=$((waited + 1)); done
    if kill -0 "$pid" 2>/dev/null; then
      echo "HUNG after ${limit}s: $*" | tee -a "$log"
      for p in $(pgrep -g "$pid"); do
        echo "--- process $p: $(tr '\0' ' ' </proc/$p/cmdline 2>/dev/null)" >>"$log"
        for t in /proc/$p/task/*; do echo "task ${t##*/} $(cat $t/comm 2>/dev/null) wchan=$(cat $t/wchan 2>/dev/null)" >>"$log"; done
        command -v cuda-gdb >/dev/null && timeout 60 cuda-gdb -p "$p" -batch -ex 'thread apply all bt 12' >>"$log" 2>&1
      done
      kill -9 -- -"$pid" 2>/dev/null
      pkill -9 -f "\.carry/(gpu|node)/" 2>/dev/null
      wait "$pid" 2>/dev/null
      return 1
    fi
    wait "$pid"
  }
  # suite LOG BINARY: each test on its own (the GPU tests start decode processes of their own), bounded.
  suite() {
    echo "== $1" | tee -a "$out/$1.log"
    local t
    for t in $("$dir/$2" --list 2>/dev/null | sed -n 's/: test$//p'); do
      case "$t" in decode_child | prefill_child) continue ;; esac
      local limit=45
      case "$t" in *chaos*) limit=300 ;; esac   # prefill and decode processes killed and started, again and again
      if bounded "$limit" "$out/$1.log" "$dir/$2" --exact "$t" --test-threads=1 && grep -q 'test result: ok. 1 passed' <(tail -3 "$out/$1.log"); then
        echo "ok      $t"
      else
        echo "FAILED  $t"; failed=1
      fi
    done
  }
  local parts=("$@")
  if [ ${#parts[@]} -eq 0 ]; then
    parts=(unit gpu_memory gpu_transfer shm_transfer gpu_copy)
    # `node` with the whole suite only where its archive came (it does not fit beside the rest: see the top).
    if [ -f .carry/node/node.tar.xz ]; then parts+=(node); else echo "(part node not run: .carry/node was not carried)"; fi
  fi
  for part in "${parts[@]}"; do
    case "$part" in
      gpu_copy)
        echo "== gpu_copy"
        bounded 150 "$out/gpu_copy.md" "$dir/gpu_copy" || failed=1; cat "$out/gpu_copy.md"
        grep -q '^| 256 KiB' "$out/gpu_copy.md" || failed=1
        if [ "$gpus" -gt 1 ]; then
          echo "== gpu_copy, decode on GPU 1"
          KVTRANSFER_BENCH_DECODE_GPU=1 bounded 150 "$out/gpu_copy_to_gpu1.md" "$dir/gpu_copy" || failed=1
          cat "$out/gpu_copy_to_gpu1.md"
          grep -q '^| 256 KiB' "$out/gpu_copy_to_gpu1.md" || failed=1
        fi ;;
      peers)
        # NIXL (UCX cuda_ipc) on gpu_copy's workload: 1538 blocks per call, a permutation of a pool of 1538,
        # keys and values, one layer, each size's bytes checked; prefill on GPU 0, decode on 0 (and on 1).
        echo "== peers (NIXL cuda_ipc)"
        local site="${TMPDIR:-/tmp}/kvtransfer-peers" args=(--gpu --batch 1538 --pool 1538 --layers 1 --sizes 1024,4096,16384,65536,262144)
        rm -rf "$site"
        python3 -m pip install --quiet --no-index --no-deps --target "$site" .carry/peer-wheels/*.whl >"$out/peers.log" 2>&1 ||
          { echo "FAILED  installing the carried wheels (bash .ci/gpu-tests.sh wheels, then carry .carry/peer-wheels)"; cat "$out/peers.log"; failed=1; continue; }
        : >"$out/peers-gpu0.jsonl"; : >"$out/peers-gpu1.jsonl"
        for peer in nixl mooncake; do
          # A hard limit: timeout signals its whole process group, the driver's decode process included.
          local rc=0
          PYTHONPATH="$site" timeout -k 10 300 python3 "benches/peers/$peer-driver.py" "${args[@]}" >>"$out/peers-gpu0.jsonl" 2>>"$out/peers.log" || rc=$?
          if [ "$gpus" -gt 1 ] && [ "$rc" = 0 ]; then
            PYTHONPATH="$site" timeout -k 10 300 python3 "benches/peers/$peer-driver.py" "${args[@]}" --decode-gpu 1 >>"$out/peers-gpu1.jsonl" 2>>"$out/peers.log" || rc=$?
          fi
          if [ "$rc" != 0 ]; then echo "FAILED  $peer's driver (exit $rc; 124: it ran past 300 s)"; failed=1; fi
        done
        cat "$out"/peers-gpu*.jsonl
        # NIXL's rows there: every size of both its settings, every one checked; no size failed, no variant crashed.
        [ "$(grep -c '"system": "nixl".*"verified": true' "$out/peers-gpu0.jsonl")" -ge 10 ] || { echo "FAILED  fewer than 10 checked NIXL rows"; failed=1; }
        if grep -qE '"verified": false|"failed"|exit code' "$out"/peers-gpu*.jsonl; then echo "FAILED  a NIXL size or variant (above)"; failed=1; fi ;;
      node)
        # The package there: its DeviceBuffer tests under ava, then the bench, whose rows check their bytes.
        echo "== node"
        tar -xJf .carry/node/node.tar.xz || { echo "FAILED  unpacking .carry/node/node.tar.xz (bash .ci/gpu-tests.sh build, then carry .carry/node)"; failed=1; continue; }
        local node=.carry/node/bin/node
        "$node" --version >"$out/node.log" 2>&1 || { echo "FAILED  Node.js does not run here"; cat "$out/node.log"; failed=1; continue; }
        if bounded 300 "$out/node.log" "$node" node_modules/ava/entrypoints/cli.mjs --timeout 5m __test__/device-buffer.test.mjs && ! grep -q 'skipped' <(tail -5 "$out/node.log"); then
          echo "ok      ava __test__/device-buffer.test.mjs"
        else
          echo "FAILED  ava __test__/device-buffer.test.mjs"; tail -40 "$out/node.log"; failed=1
        fi
        local to
        for to in $(seq 0 $((gpus > 1 ? 1 : 0))); do
          local name=bench-gpu$to transports=cuda-ipc,shm,tcp peers=()
          [ "$to" = 0 ] || transports=cuda-ipc
          # NIXL beside it where its wheel was carried (bash .ci/gpu-tests.sh wheels), in an environment that sees
          # the machine's PyTorch; Mooncake's CUDA wheel does not fit what can be carried.
          if ls .carry/peer-wheels/*.whl >/dev/null 2>&1; then
            peers=(--peers nixl --peer-wheels .carry/peer-wheels --peers-venv "${TMPDIR:-/tmp}/kvtransfer-peers-venv")
          fi
          echo "== kvtransfer bench --transports $transports --decode-gpu $to"
          local rc=0
          timeout -k 10 540 "$node" cli.js bench --transports "$transports" --decode-gpu "$to" ${peers[@]+"${peers[@]}"} --json >"$out/$name.json" 2>"$out/$name.err" || rc=$?
          if [ "$rc" = 0 ]; then
            "$node" -e 'console.log(require("./lib/bench.js").formatTable(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8"))))' "$out/$name.json" | tee "$out/$name.md"
          else
            echo "FAILED  the bench (exit $rc; 124: it ran past 540 s)"; tail -20 "$out/$name.err"; head -c 4000 "$out/$name.json"; failed=1
          fi
        done ;;
      gpu_transfer)
        suite gpu_transfer gpu_transfer
        if [ "$gpus" -gt 1 ]; then KVTRANSFER_TEST_DECODE_GPU=1 suite gpu_transfer_to_gpu1 gpu_transfer; fi ;;
      *) suite "$part" "$part" ;;
    esac
  done
  [ "$failed" = 0 ] && echo "GPU suite passed" || { echo "GPU suite FAILED"; exit 1; }
}

case "${1:-all}" in
  build) build ;;
  run) shift; run "$@" ;;
  wheels) wheels ;;
  all) build; run ;;
  *) echo "usage: $0 [build|run|wheels]" >&2; exit 2 ;;
esac
