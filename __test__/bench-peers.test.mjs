// The bench's peers and its judgement: the drivers' workload is ours (the same ids, the same hash), a driver's
// lines are taken only when they are rows (garbage and lies are dropped, a crash is said), the goals are the
// worst ratio over the sizes, and the plot draws every series.
import test from 'ava'
import { execFileSync } from 'node:child_process'
import { chmodSync, readFileSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { HostBuffer } from 'kvtransfer'
import { digest, formatTable, goals, scattered } from '../lib/bench.js'
import { DRIVERS, preparePeers, runPeer } from '../lib/bench-peers.js'
import { benchSpec, svgOf } from '../lib/plot.js'
import { scratchDir } from './helpers/scratch.mjs'


const spread = (median) => ({ median, p10: median * 0.9, p90: median * 1.1 })
const row = (system, transport, kib, gbps, extra = {}) => ({
  system,
  transport,
  blockBytes: kib * 1024,
  batch: 8,
  bytesPerCall: 16 * kib * 1024,
  calls: 3,
  gbps: spread(gbps),
  usPerCall: spread((16 * kib * 1024) / (gbps * 1e3)),
  verified: true,
  ...extra,
})

test("the peers' driver draws the same blocks and hashes them as the bench does", (t) => {
  const bytes = Array.from({ length: 64 * 48 }, (_, i) => (i * 7 + (i >> 8)) & 255)
  const py = `import sys, json; sys.path.insert(0, ${JSON.stringify(DRIVERS)}); import common
ids = common.scattered(40, 48, 2)
print(json.dumps({"ids": ids, "digest": common.digest([[bytearray(${JSON.stringify(bytes)})]], 0, ids[:7], 64)}))`
  const got = JSON.parse(execFileSync('python3', ['-B', '-c', py], { encoding: 'utf8' }))
  const ids = [...scattered(40, 48, 2)]
  t.deepEqual(got.ids, ids)
  const hb = HostBuffer.alloc(bytes.length)
  hb.buffer.set(bytes)
  t.is(got.digest, digest([[hb]], 0, ids.slice(0, 7), 64))
  hb.free()
})

test("a driver's rows are taken, its garbage and lies dropped, its failures and its crash said", async (t) => {
  const dir = scratchDir(t, 'kvt-peers-')
  const good = row('nixl', 'tcp', 1, 0.5, { compares: 'tcp', detail: 'as run' })
  const lines = [
    JSON.stringify({ row: good }),
    'not json at all',
    'null',
    JSON.stringify({ row: { ...good, usPerCall: { median: 'fast' } } }),
    // Rows in another's name, off the workload, beside no transport of ours, or told twice.
    JSON.stringify({ row: { ...good, transport: 'ucx-same-host', system: 'kvtransfer', compares: 'shm' } }),
    JSON.stringify({ row: { ...good, transport: 'big', blockBytes: 2048 } }),
    JSON.stringify({ row: { ...good, transport: 'short', calls: 2 } }),
    JSON.stringify({ row: { ...good, transport: 'nic', compares: 'rdma' } }),
    JSON.stringify({ row: { ...good, gbps: spread(1000) } }),
    JSON.stringify({ failed: { transport: 'tcp', blockBytes: 4096, error: 'RuntimeError: no' } }),
    JSON.stringify({ skipped: { transport: 'rdma', why: 'no NIC' } }),
  ]
  // A stand-in for the environment's Python: prints the lines, then dies.
  const python = join(dir, 'python')
  writeFileSync(python, `#!/bin/sh\ncat <<'EOF'\n${lines.join('\n')}\nEOF\necho "library noise" >&2\nexit 3\n`)
  chmodSync(python, 0o755)
  const log = join(dir, 'fake.log')
  const w = { sizes: [1024], batch: 8, pool: 10, layers: 1, tensors: 2, iterations: 3, warmup: 1 }
  const run = await runPeer(python, 'nixl', w, log)
  // Its rates are recomputed from its times: the second, faster "same" row is a duplicate, and dropped.
  t.deepEqual(
    run.rows.map((r) => [r.system, r.transport, r.compares, r.blockBytes]),
    [['nixl', 'tcp', 'tcp', 1024], ['nixl', 'ucx-same-host', 'shm', 1024]],
  )
  t.deepEqual(run.rows[0].gbps, { median: good.bytesPerCall / (good.usPerCall.median * 1e3), p10: good.bytesPerCall / (good.usPerCall.p90 * 1e3), p90: good.bytesPerCall / (good.usPerCall.p10 * 1e3) })
  t.deepEqual(run.failed, [{ transport: 'nixl tcp', blockBytes: 4096, error: 'RuntimeError: no' }])
  t.deepEqual(run.skipped, [
    { transport: 'nixl rdma', why: 'no NIC' },
    { transport: 'nixl', why: `its driver ended with exit code 3 (its log: ${log})` },
  ])
  t.is(readFileSync(log, 'utf8'), 'library noise\n')
  const missing = await runPeer(join(dir, 'no-such-python'), 'nixl', w, log)
  t.deepEqual(missing.rows, [])
  t.regex(missing.skipped[0].why, /its driver could not start: spawn .*ENOENT/)
  const unwritable = await runPeer(python, 'nixl', w, join(dir, 'no-such-folder', 'x.log'))
  t.regex(unwritable.skipped[0].why, /cannot write its log .*ENOENT/)
})

test('a GPU run asks the driver for GPU memory and takes its CUDA IPC rows only; a host run takes none of them', async (t) => {
  const dir = scratchDir(t, 'kvt-peers-')
  const host = row('nixl', 'tcp', 1, 0.5, { compares: 'tcp' })
  const gpu = row('nixl', 'cuda-ipc', 1, 9, { compares: 'cuda-ipc' })
  // A stand-in Python that says its arguments, then one row of each kind.
  const python = join(dir, 'python')
  writeFileSync(python, `#!/bin/sh\necho "$@" >&2\ncat <<'EOF'\n${JSON.stringify({ row: host })}\n${JSON.stringify({ row: gpu })}\nEOF\n`)
  chmodSync(python, 0o755)
  const w = { sizes: [1024], batch: 8, pool: 10, layers: 1, tensors: 2, iterations: 3, warmup: 1 }
  const onHost = await runPeer(python, 'nixl', w, join(dir, 'host.log'))
  t.deepEqual(onHost.rows.map((r) => r.transport), ['tcp'])
  t.notRegex(readFileSync(join(dir, 'host.log'), 'utf8'), /--gpu/)
  const onGpu = await runPeer(python, 'nixl', { ...w, gpu: { decode: 1 } }, join(dir, 'gpu.log'))
  t.deepEqual(onGpu.rows.map((r) => r.transport), ['cuda-ipc'])
  t.regex(readFileSync(join(dir, 'gpu.log'), 'utf8'), /--gpu --decode-gpu 1/)
})

test('a machine without Python is told so, not failed obscurely', (t) => {
  const dir = scratchDir(t, 'kvt-peers-')
  const path = process.env.PATH
  process.env.PATH = dir
  try {
    t.throws(() => preparePeers(['nixl'], { venv: join(dir, 'venv') }), { message: /python3 -m venv \(Python 3\.9 or later with its venv module is needed\) failed: .*ENOENT/ })
    // A folder that holds something else is not taken for an environment (nor installed into).
    writeFileSync(join(dir, 'notes.txt'), 'mine')
    t.throws(() => preparePeers(['nixl'], { venv: dir }), { message: /is not a Python virtual environment \(it has no pyvenv\.cfg\)/ })
  } finally {
    process.env.PATH = path
  }
})

test('each goal is its worst ratio over the sizes, judged only where the run has its rows', (t) => {
  const rows = [
    row('kvtransfer', 'tcp', 1, 3),
    row('kvtransfer', 'tcp', 64, 2.7),
    row('kvtransfer', 'shm', 1, 2.7),
    row('kvtransfer', 'shm', 64, 11),
    row('mooncake', 'tcp', 1, 0.06, { compares: 'tcp' }),
    row('mooncake', 'tcp', 64, 2, { compares: 'tcp' }),
    row('nixl', 'ucx-tcp', 64, 3, { compares: 'tcp' }),
    row('nixl', 'ucx-same-host', 64, 2, { compares: 'shm' }),
    row('nixl', 'ucx-same-host-no-progress-thread', 64, 5, { compares: 'shm' }),
    // An unverified row judges nothing.
    row('nixl', 'ucx-same-host', 1, 0.01, { compares: 'shm', verified: false }),
  ]
  const ceilings = [{ name: 'tcp-stream', blockBytes: 64 * 1024, bytesPerCall: 1, calls: 3, gbps: spread(3), usPerCall: spread(1) }]
  const g = Object.fromEntries(goals({ rows, ceilings, failed: [] }).map((x) => [x.goal, x]))
  t.deepEqual(Object.keys(g), [
    'kvtransfer tcp ÷ the best peer TCP',
    'kvtransfer tcp ÷ the best peer TCP, 1 KiB',
    'kvtransfer tcp ÷ tcp-stream, from 64 KiB',
    "kvtransfer shm ÷ NIXL's best same-host path",
    'kvtransfer shm ÷ kvtransfer tcp',
  ])
  t.like(g['kvtransfer tcp ÷ the best peer TCP'], { worst: 2.7 / 3, blockBytes: 65536, met: false })
  t.like(g['kvtransfer tcp ÷ the best peer TCP, 1 KiB'], { worst: 3 / 0.06, blockBytes: 1024, met: true, target: 3 })
  t.like(g['kvtransfer tcp ÷ tcp-stream, from 64 KiB'], { worst: 2.7 / 3, met: true })
  t.like(g["kvtransfer shm ÷ NIXL's best same-host path"], { worst: 11 / 5, blockBytes: 65536, met: true })
  t.like(g['kvtransfer shm ÷ kvtransfer tcp'], { worst: 0.9, blockBytes: 1024, met: false, sizes: [1024, 65536] })
  // Where ours failed, or its bytes did not check, and a peer ran: 0 there, not a size left out.
  const broken = goals({ rows: rows.filter((x) => !(x.system === 'kvtransfer' && x.transport === 'tcp' && x.blockBytes === 1024)), ceilings, failed: [{ transport: 'tcp', blockBytes: 1024, error: 'boom' }] })
  t.like(broken.find((x) => x.goal === 'kvtransfer tcp ÷ the best peer TCP'), { worst: 0, blockBytes: 1024, met: false, sizes: [1024, 65536] })
  const mismatched = goals({ rows: rows.map((x) => (x.system === 'kvtransfer' && x.transport === 'shm' && x.blockBytes === 65536 ? { ...x, verified: false } : x)), ceilings })
  t.like(mismatched.find((x) => x.goal === "kvtransfer shm ÷ NIXL's best same-host path"), { worst: 0, met: false })

  const table = formatTable({ date: 'now', machine: { cpus: 2, cpuModel: 'cpu', memoryBytes: 2 ** 30, platform: 'p', node: '20' }, batch: 8, pool: 10, layers: 1, tensors: 2, warmup: 1, iterations: 3, rows, ceilings, skipped: [], failed: [], goals: goals({ rows, ceilings }) })
  t.regex(table, /\| 64 KiB \| nixl \| ucx-tcp \| 3\.00 \|.*\| 0\.90× \(tcp\) \| yes \|/)
  t.regex(table, /\| 1 KiB \| nixl \| ucx-same-host \| 0\.0100 \|.*\| MISMATCH \|/, "three significant digits below 1 GB/s")
  t.regex(table, /MISSED kvtransfer tcp ÷ the best peer TCP ≥ 1: 0\.90 \(at 64 KiB; over 2 sizes\)/)
  t.regex(table, /met {4}kvtransfer tcp ÷ tcp-stream, from 64 KiB ≥ 0\.8: 0\.90/)
})

test('the plot draws every system and ceiling, the ceilings dashed', async (t) => {
  const rows = [row('kvtransfer', 'tcp', 1, 3), row('kvtransfer', 'tcp', 4, 2.5), row('nixl', 'ucx-tcp', 1, 0.2, { compares: 'tcp' })]
  const ceilings = [{ name: 'tcp-stream', blockBytes: 1024, bytesPerCall: 1, calls: 3, gbps: spread(3.3), usPerCall: spread(1) }]
  const r = { date: 'today', machine: { cpus: 2, cpuModel: 'cpu', memoryBytes: 1, platform: 'p', node: '20' }, batch: 8, pool: 10, layers: 1, tensors: 2, warmup: 1, iterations: 3, rows, ceilings, skipped: [], failed: [], goals: [] }
  t.deepEqual(
    benchSpec(r).data.values.map((p) => [p.series, p.kib, p.kind]),
    [['kvtransfer tcp', 1, 'measured'], ['kvtransfer tcp', 4, 'measured'], ['nixl ucx-tcp', 1, 'measured'], ['ceiling: tcp-stream', 1, 'ceiling']],
  )
  const svg = await svgOf(benchSpec(r))
  t.regex(svg, /^<svg /)
  for (const name of ['kvtransfer tcp', 'nixl ucx-tcp', 'ceiling: tcp-stream', 'block size (KiB)']) t.true(svg.includes(name), name)
  t.regex(svg, /stroke-dasharray="6,4"/, 'a dashed ceiling')
})

test('--plot writes the chart of the run', async (t) => {
  const dir = scratchDir(t, 'kvt-peers-')
  const file = join(dir, 'bench.svg')
  const cli = fileURLToPath(new URL('../cli.js', import.meta.url))
  execFileSync(process.execPath, [cli, 'bench', '--transports', 'tcp', '--sizes', '1', '--batch', '16', '--iterations', '1', '--warmup', '0', '--json', '--plot', file])
  const svg = readFileSync(file, 'utf8')
  t.true(svg.includes('kvtransfer tcp') && svg.includes('ceiling: memcpy'))
})
