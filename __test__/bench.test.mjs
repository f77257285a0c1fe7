// `kvtransfer bench` as a user runs it: rows for the transport asked for, numbers that mean something, the
// bytes of a write checked, JSON and CSV that parse, refusals of bad options.
import test from 'ava'
import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { HostBuffer } from 'kvtransfer'
import { digest, warmUp } from '../lib/bench.js'
import { transportName } from './helpers/transport.mjs'

const cli = fileURLToPath(new URL('../cli.js', import.meta.url))
const run = (args) =>
  new Promise((resolve) => execFile(process.execPath, [cli, 'bench', ...args], { timeout: 120_000 }, (e, stdout, stderr) => resolve({ code: e?.code ?? 0, stdout, stderr })))

// RDMA runs in the Soft-RoCE VM through its own suite; here the host transports.
const transport = transportName === 'rdma' ? 'tcp' : transportName

test('bench --json measures each size, checks the bytes, and says why a transport cannot run', async (t) => {
  const { code, stdout, stderr } = await run(['--transports', `${transport},bogus`, '--sizes', '1,4', '--batch', '64', '--iterations', '3', '--warmup', '1', '--json'])
  t.is(code, 0, stderr)
  const r = JSON.parse(stdout)
  t.like(r, { batch: 64, pool: 80, failed: [], layers: 2, tensors: 2, iterations: 3, warmup: 1 })
  t.deepEqual(r.rows.map((x) => [x.transport, x.blockBytes, x.calls, x.verified]), [[transport, 1024, 3, true], [transport, 4096, 3, true]])
  for (const x of r.rows) {
    t.is(x.bytesPerCall, 64 * x.blockBytes * 2)
    t.true(x.gbps.p10 <= x.gbps.median && x.gbps.median <= x.gbps.p90 && x.gbps.p10 > 0, JSON.stringify(x.gbps))
    // µs per call and GB/s say the same thing, call for call (the fastest calls are GB/s's p90).
    t.true(Math.abs(x.bytesPerCall / (x.usPerCall.median * 1e3) - x.gbps.median) / x.gbps.median < 1e-9)
    t.true(Math.abs(x.bytesPerCall / (x.usPerCall.p10 * 1e3) - x.gbps.p90) / x.gbps.p90 < 1e-9)
  }
  t.deepEqual(r.failed, [])
  // The ceilings, on the same bytes: a stream, and the copy on one thread (and as many as shm splits over).
  for (const size of [1024, 4096]) {
    const names = r.ceilings.filter((c) => c.blockBytes === size).map((c) => c.name)
    t.deepEqual(names.slice(0, 2), ['tcp-stream', 'memcpy'])
    t.true(names.length <= 3 && names.slice(2).every((n) => /^memcpy-\d+-threads$/.test(n)), names.join())
  }
  for (const c of r.ceilings) t.like(c, { calls: 3, bytesPerCall: 64 * c.blockBytes * 2 })
  t.true(r.ceilings.every((c) => c.gbps.median > 0))
  t.deepEqual(r.skipped.find((s) => s.transport === 'bogus'), { transport: 'bogus', why: 'not a transport of this version' })
  t.is(stderr, '', 'quiet with --json')
})

test('bench --csv writes one line per row; the table names what it ran', async (t) => {
  const csv = await run(['--transports', transport, '--sizes', '2', '--batch', '32', '--iterations', '2', '--warmup', '0', '--key-only', '--csv'])
  t.is(csv.code, 0, csv.stderr)
  const [head, ...lines] = csv.stdout.trim().split('\n')
  t.is(head.split(',').length, 12)
  const ours = lines.filter((l) => l.startsWith('kvtransfer,'))
  t.is(ours.length, 1)
  t.regex(ours[0], new RegExp(`^kvtransfer,${transport},2048,32,2,`))
  t.true(ours[0].endsWith(',true'))
  t.true(lines.some((l) => l.startsWith('ceiling,tcp-stream,2048,32,2,')))
  const table = await run(['--transports', transport, '--sizes', '1', '--batch', '16', '--iterations', '1'])
  t.is(table.code, 0, table.stderr)
  t.regex(table.stdout, /16 scattered blocks per call from a pool of 20, keys and values/)
  t.regex(table.stdout, new RegExp(`\\| 1 KiB \\| kvtransfer \\| ${transport} \\| [0-9.]+ \\|.*\\| [0-9.]+ of (tcp-stream|memcpy[-a-z0-9]*) \\|  \\| yes \\|`))
  t.regex(table.stdout, /\| 1 KiB \| ceiling \| tcp-stream \| [0-9.]+ \|/)
  t.regex(table.stderr, /\[1\/1\]/, 'progress on standard error')
})

test('bench --writers: prefills writing at once, each into blocks of its own, every byte checked', async (t) => {
  const { code, stdout, stderr } = await run(['--transports', transport, '--sizes', '1', '--batch', '32', '--iterations', '2', '--warmup', '1', '--writers', '3', '--json'])
  t.is(code, 0, stderr)
  const r = JSON.parse(stdout)
  t.is(r.writers, 3)
  t.like(r.rows[0], { writers: 3, batch: 32, bytesPerCall: 3 * 32 * 1024 * 2, verified: true })
  t.deepEqual(r.goals, [], 'a round of three is judged against nothing that ran one')
})

test('bench refuses bad options', async (t) => {
  for (const args of [['--sizes', '0'], ['--batch', 'many'], ['--iterations', '1.5'], ['--warmup', '0x10'], ['--layers', '1e3']]) {
    const { code, stderr } = await run(args)
    t.is(code, 2, args.join(' '))
    t.regex(stderr, /must be a whole number/)
  }
  for (const [args, why] of [[['--json', '--csv'], /give one/], [['--transports', ','], /names none/]]) {
    const { code, stderr } = await run(args)
    t.is(code, 2, args.join(' '))
    t.regex(stderr, why)
  }
  // Nothing usable: said, and a failure.
  const none = await run(['--transports', 'bogus', '--sizes', '1'])
  t.is(none.code, 1)
  t.regex(none.stderr, /nothing was measured/)
  const peer = await run(['--transports', transport, '--sizes', '1', '--peers', 'mooncake,bogus'])
  t.is(peer.code, 2)
  t.regex(peer.stderr, /unknown peer "bogus": the bench knows mooncake, nixl/)
})

test("the bench's check tells one byte apart", (t) => {
  const a = [[HostBuffer.alloc(4096)]]
  const b = [[HostBuffer.alloc(4096)]]
  t.is(digest(a, 0, [0, 1, 2, 3], 1024), digest(b, 0, [0, 1, 2, 3], 1024))
  b[0][0].buffer[3000] = 1
  t.not(digest(a, 0, [0, 1, 2, 3], 1024), digest(b, 0, [0, 1, 2, 3], 1024))
  t.is(digest(a, 0, [0, 1], 1024), digest(b, 0, [0, 1], 1024), 'only the blocks named')
})

test('a warm-up makes its calls and lasts its time; none makes none', async (t) => {
  const count = async (calls, ms) => {
    let n = 0
    t.is(await warmUp(calls, ms, async () => void n++), n)
    return n
  }
  t.is(await count(0, 10_000), 0, 'no calls asked: no time either')
  t.is(await count(3, 0), 3)
  const started = process.hrtime.bigint()
  t.true((await count(1, 30)) > 1)
  t.true(Number(process.hrtime.bigint() - started) / 1e6 >= 30)
})
