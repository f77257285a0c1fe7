// A bad network between two hosts (the two-VM pair of `.ci/rdma-tests.sh`): the prefill's host degrades its
// own link with `tc netem` (delay with jitter, 5% loss, reordering, duplication), then cuts it for 5 s and
// for 20 s (longer than the stall timeout and than RDMA's retry budget at the default KVCACHE_IB_TIMEOUT), and
// heals it. For each case, one request of four layers: every write either completes or fails with a clear
// error within its deadline; the decode sees the request complete with every byte checked where the prefill's
// writes all did, and `failed` (never complete, never hung) where one did not; after the long cut, the next
// request reconnects and completes. Each side prints what it saw and when, and exits non-zero on anything else.
//
//   PAIR_PORT=23480 node __test__/helpers/pair-faults.mjs decode
//   PAIR_PORT=23480 DECODE_HOST=<decode ip> node __test__/helpers/pair-faults.mjs prefill   (root: runs tc)
//
// The transport comes from the environment (KVCACHE_TRANSPORT=tcp or rdma, ...). The prefill tells the decode
// how its writes went over a plain TCP connection to PAIR_PORT + 1, once the link is healed.
import { execFileSync } from 'node:child_process'
import { createServer, connect } from 'node:net'
import { createInterface } from 'node:readline'
import { codeOf, failer, fillBlock, pairCache } from './pair-cache.mjs'

const LAYERS = 4
const BLOCKS = 256
const PORT = Number(process.env.PAIR_PORT ?? 23480)
const HOST = process.env.DECODE_HOST ?? '127.0.0.1'
const DEV = process.env.FAULT_DEV ?? 'eth0'
const TRANSPORT = process.env.KVCACHE_TRANSPORT ?? 'auto'
// 2 MiB a call over TCP: split in two pieces over a link's two connections (KVCACHE_TCP_CONNECTIONS=2), each
// under the one stall timeout. 1 MiB over RDMA: the emulated Soft-RoCE link moves 2 MiB under 10 ms of delay in
// more than the stall timeout.
const BLOCK_BYTES = TRANSPORT === 'tcp' ? 8192 : 4096
// The longest any request may take to end at the decode before it counts as hung.
const HUNG_MS = 90_000
// The stall timeout (the default), a write's deadline once the link stops taking bytes.
const STALL_MS = 10_000

const CASES = [
  { name: 'delay', netem: ['delay', '10ms', '5ms', 'distribution', 'normal'] },
  { name: 'loss', netem: ['loss', '5%'] },
  { name: 'reorder', netem: ['delay', '5ms', 'reorder', '25%', '50%'] },
  { name: 'duplicate', netem: ['duplicate', '5%'] },
  { name: 'partition-5s', cutMs: 5_000 },
  { name: 'partition-20s', cutMs: 20_000 },
  { name: 'after-partition' },
]

// The decode may still be starting, or the link healing: the policy reconnects for about half a minute.
// FAULTS_BREAK=deadline takes the deadline away (a minute's stall timeout: the long cut heals first), to watch
// this script fail without it.
const cache = () =>
  pairCache(LAYERS, BLOCKS, BLOCK_BYTES, { reconnect: { retries: 12, backoffMs: 250 }, ...(process.env.FAULTS_BREAK === 'deadline' ? { stallTimeoutMs: 60_000 } : {}) })

// Case k moves prefill blocks 0..127 (shifted by k) into decode blocks 128..255 reversed: scattered both ways.
const ids = (k) => ({ local: [...Array(128).keys()].map((i) => (i * 7 + k) % 128), remote: [...Array(128).keys()].map((i) => 255 - i) })
const requestOf = (name) => `${TRANSPORT}-${name}`
const seconds = (ms) => `${(ms / 1000).toFixed(1)} s`
const fail = failer('faults')

async function decode() {
  const c = cache()
  const comm = c.comm('decode', PORT)
  console.log(`[decode] listening on ${comm.port} (${comm.transport})`)
  const verdicts = []
  let heard = () => {}
  let reporter
  let gone = false
  const server = createServer((socket) => {
    reporter = socket
    socket.once('close', () => {
      gone = true
      heard()
    })
    createInterface({ input: socket }).on('line', (line) => {
      verdicts.push(JSON.parse(line))
      heard()
    })
  }).listen(PORT + 1)
  const verdict = async (request) => {
    for (;;) {
      const v = verdicts.find((x) => x.request === request)
      if (v) return v
      if (gone) fail(`the prefill went away before it told how ${request} went`)
      await new Promise((resolve) => (heard = resolve))
    }
  }
  const expected = Buffer.alloc(BLOCK_BYTES)
  for (const [k, { name }] of CASES.entries()) {
    const request = requestOf(name)
    const started = Date.now()
    const first = await codeOf(comm.waitFor(request, { layers: [0], timeoutMs: HUNG_MS }))
    const firstAt = Date.now()
    const end = first === 'OK' ? await codeOf(comm.waitFor(request, { timeoutMs: HUNG_MS })) : first
    const endedAt = Date.now()
    if (end === 'TIMEOUT') fail(`${request}: neither complete nor ended within ${seconds(HUNG_MS)}`)
    if (end === 'OK') {
      const { local, remote } = ids(k)
      for (let layer = 0; layer < LAYERS; layer++) {
        for (const [tensor, bufs] of [[0, c.keys], [1, c.values]]) {
          local.forEach((l, i) => {
            fillBlock(expected, layer, tensor, l, k)
            if (!bufs[layer].buffer.subarray(remote[i] * BLOCK_BYTES, (remote[i] + 1) * BLOCK_BYTES).equals(expected)) fail(`${request}: layer ${layer} block ${remote[i]} does not hold the prefill's bytes`)
          })
        }
      }
    }
    const v = await verdict(request)
    const seen = end === 'OK' ? 'complete, every byte checked' : `ended ${end}`
    console.log(`[faults] ${TRANSPORT} ${name}: prefill ${v.outcome}${v.code ? ` (${v.code})` : ''} after ${seconds(v.ms)}${v.failedAfterMs !== undefined ? `, its failing write ended ${seconds(v.failedAfterMs)} after the cut` : ''}; decode ${seen}, ${seconds(endedAt - firstAt)} after layer 0 arrived (${seconds(endedAt - started)} after it began waiting)`)
    if (v.outcome === 'complete' && end !== 'OK') fail(`${request}: every write of the prefill completed, but the decode saw ${end}`)
    if (v.outcome !== 'complete' && end === 'OK') fail(`${request}: a write of the prefill failed (${v.code}), but the decode saw the request complete`)
    if (v.outcome !== 'complete' && end !== 'TRANSPORT') fail(`${request}: the decode was not told the request failed (${end})`)
    if (name.startsWith('partition-20') && v.outcome === 'complete') fail(`${request}: a 20 s cut was expected to fail the request`)
    // Its deadline is the stall timeout, counted from the last byte the link took (about the cut), once: not
    // once per socket call or per piece of a split write.
    if (v.failedAfterMs !== undefined && v.failedAfterMs > STALL_MS + 2_000) fail(`${request}: its failing write ended ${seconds(v.failedAfterMs)} after the cut, past its deadline (the ${seconds(STALL_MS)} stall timeout)`)
    if (name === 'after-partition' && end !== 'OK') fail(`${request}: the request after the long cut did not complete`)
    if (!name.startsWith('partition') && end !== 'OK') fail(`${request}: ${name} alone must not fail a request`)
    // The next case writes the same blocks: only once these are checked.
    reporter.write('next\n')
  }
  server.close()
  comm.close()
  console.log(`[decode] faults over ${TRANSPORT}: OK`)
}

async function prefill() {
  const tc = (action, ...netem) => execFileSync('tc', ['qdisc', action, 'dev', DEV, 'root', 'netem', ...netem], { stdio: 'inherit' })
  const heal = () => {
    try {
      execFileSync('tc', ['qdisc', 'del', 'dev', DEV, 'root'], { stdio: 'ignore' })
    } catch {}
  }
  heal()
  process.on('exit', heal)
  const c = cache()
  const comm = c.comm('prefill', 0)
  await comm.connectAsync(HOST, PORT)
  console.log(`[prefill] connected over ${comm.connectedTransport(HOST, PORT)}`)
  const report = connect(PORT + 1, HOST)
  await new Promise((resolve, reject) => report.once('connect', resolve).once('error', reject))
  const answers = createInterface({ input: report })[Symbol.asyncIterator]()
  for (const [k, kase] of CASES.entries()) {
    const request = requestOf(kase.name)
    for (let layer = 0; layer < LAYERS; layer++) {
      for (let b = 0; b < BLOCKS; b++) {
        fillBlock(c.keys[layer].buffer.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES), layer, 0, b, k)
        fillBlock(c.values[layer].buffer.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES), layer, 1, b, k)
      }
    }
    const { local, remote } = ids(k)
    if (kase.netem) tc('add', ...kase.netem)
    const started = Date.now()
    let outcome = 'complete'
    let code
    let cutAt
    let healed = Promise.resolve()
    let failedAfterMs
    for (let layer = 0; layer < LAYERS; layer++) {
      if (kase.cutMs && layer === 1) {
        // Cut after the first layer, while the rest are on their way; healed on a timer of its own.
        tc('add', 'loss', '100%')
        cutAt = Date.now()
        healed = new Promise((resolve) => setTimeout(() => (heal(), resolve()), kase.cutMs))
      }
      const t = Date.now()
      code = await codeOf(comm.writeCacheAsync(HOST, PORT, local, remote, layer, { requestId: request }))
      if (code !== 'OK') {
        outcome = 'failed'
        failedAfterMs = cutAt !== undefined ? Date.now() - cutAt : undefined
        console.log(`[prefill] ${kase.name}: layer ${layer} failed with ${code} after ${seconds(Date.now() - t)}`)
        break
      }
    }
    const ms = Date.now() - started
    await healed
    if (kase.netem) heal()
    console.log(`[prefill] ${kase.name}: ${outcome} in ${seconds(ms)}`)
    report.write(`${JSON.stringify({ request, outcome, code: outcome === 'complete' ? undefined : code, ms, failedAfterMs })}\n`)
    if ((await answers.next()).value !== 'next') fail(`the decode did not go on after ${kase.name}`)
  }
  report.end()
  comm.close()
}

const role = process.argv[2]
if (role === 'decode') await decode()
else if (role === 'prefill') await prefill()
else fail('usage: pair-faults.mjs decode|prefill')
