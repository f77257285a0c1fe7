// Requests between two hosts (the two-VM pair of `.ci/rdma-tests.sh`): many at once, abort, revocation with a
// writer still running, and a prefill process killed in the middle of a request. Each side checks what it must
// see and exits non-zero otherwise.
//
//   PAIR_PORT=23460 node __test__/helpers/pair-requests.mjs decode
//   PAIR_PORT=23460 DECODE_HOST=<decode ip> node __test__/helpers/pair-requests.mjs prefill
//
// The transport comes from the environment (KVCACHE_TRANSPORT=rdma, ...).
import { fork } from 'node:child_process'
import { createHash } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { codeOf, failer, fillBlock, pairCache } from './pair-cache.mjs'

const LAYERS = 4
const BLOCKS = 256
const BLOCK_BYTES = 4096
const MANY = 8
const PORT = Number(process.env.PAIR_PORT ?? 23460)
const HOST = process.env.DECODE_HOST ?? '127.0.0.1'

// The decode may still be starting on the other host when the prefill connects: try for about half a minute.
const cache = () => pairCache(LAYERS, BLOCKS, BLOCK_BYTES, { reconnect: { retries: 10, backoffMs: 200 } })

// Request m-k moves prefill blocks 16k..16k+15 into decode blocks 128+16k..: each request its own blocks.
const manyIds = (k) => ({ local: [...Array(16).keys()].map((i) => 16 * k + i), remote: [...Array(16).keys()].map((i) => 128 + 16 * k + i) })
// The stale writer alternates two sources into decode blocks 0..31, so every write changes them.
const staleIds = (n) => ({ local: [...Array(32).keys()].map((i) => i + 32 * (n % 2)), remote: [...Array(32).keys()] })

const sha = (b) => createHash('sha256').update(b).digest('hex')
const fail = failer('pair')

async function decode() {
  const c = cache()
  const comm = c.comm('decode', PORT)
  console.log(`[decode] listening on ${comm.port} (${comm.transport})`)
  // 1. Many requests at once: every byte of each is there once its wait resolves.
  await Promise.all([...Array(MANY).keys()].map((k) => comm.waitFor(`m-${k}`, { timeoutMs: 120_000 })))
  const expected = Buffer.alloc(BLOCK_BYTES)
  for (let k = 0; k < MANY; k++) {
    const { local, remote } = manyIds(k)
    for (let layer = 0; layer < LAYERS; layer++) {
      for (const [tensor, bufs] of [[0, c.keys], [1, c.values]]) {
        local.forEach((l, i) => {
          fillBlock(expected, layer, tensor, l)
          if (!bufs[layer].buffer.subarray(remote[i] * BLOCK_BYTES, (remote[i] + 1) * BLOCK_BYTES).equals(expected)) fail(`m-${k} layer ${layer} block ${remote[i]}`)
        })
      }
    }
  }
  console.log(`[decode] ${MANY} requests at once: every block arrived`)
  // 2. Abort reaches the waiting decode.
  const aborted = await codeOf(comm.waitFor('aborted', { timeoutMs: 60_000 }))
  if (aborted !== 'ABORTED') fail(`waitFor of an aborted request: ${aborted}`)
  console.log('[decode] abort: waitFor rejected with ABORTED')
  // 3. Revocation with a writer still running: no byte changes after revoke resolves.
  await comm.waitFor('stale', { layers: [0], timeoutMs: 60_000 })
  await comm.revoke('stale')
  const after = sha(c.keys[0].buffer) + sha(c.values[0].buffer)
  await new Promise((resolve) => setTimeout(resolve, 2000))
  if (sha(c.keys[0].buffer) + sha(c.values[0].buffer) !== after) fail('bytes changed after revoke resolved')
  console.log('[decode] revoke: nothing changed after it resolved')
  // 4. A prefill process killed in the middle of a request: its wait fails within seconds, not at its timeout.
  const started = Date.now()
  const orphan = await codeOf(comm.waitFor('orphan', { timeoutMs: 60_000 }))
  if (orphan !== 'TRANSPORT') fail(`waitFor of a killed prefill's request: ${orphan}`)
  console.log(`[decode] killed prefill: waitFor rejected with TRANSPORT after ${((Date.now() - started) / 1000).toFixed(1)} s`)
  comm.close()
  console.log('[decode] pair requests: OK')
}

async function prefill() {
  const c = cache()
  for (let layer = 0; layer < LAYERS; layer++) {
    for (let b = 0; b < BLOCKS; b++) {
      fillBlock(c.keys[layer].buffer.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES), layer, 0, b)
      fillBlock(c.values[layer].buffer.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES), layer, 1, b)
    }
  }
  const comm = c.comm('prefill', 0)
  await comm.connectAsync(HOST, PORT)
  console.log(`[prefill] connected over ${comm.connectedTransport(HOST, PORT)}`)
  // 1. Many requests at once, each written layer by layer.
  await Promise.all([...Array(MANY).keys()].map(async (k) => {
    const { local, remote } = manyIds(k)
    for (let layer = 0; layer < LAYERS; layer++) await comm.writeCacheAsync(HOST, PORT, local, remote, layer, { requestId: `m-${k}` })
  }))
  // 2. One layer of a request, then abort: later writes of it are refused here too.
  await comm.writeCacheAsync(HOST, PORT, [1], [1], 0, { requestId: 'aborted' })
  await comm.abortRequest(HOST, PORT, 'aborted', 'the client went away')
  if ((await codeOf(comm.writeCacheAsync(HOST, PORT, [1], [1], 1, { requestId: 'aborted' }))) !== 'ABORTED') fail('a write of an aborted request')
  // 3. Write a request over and over until the decode revokes it.
  let writes = 0
  let code = 'OK'
  while (code === 'OK') {
    const { local, remote } = staleIds(writes)
    code = await codeOf(comm.writeCacheAsync(HOST, PORT, local, remote, 0, { requestId: 'stale' }))
    if (code === 'OK') writes++
  }
  if (code !== 'REVOKED' || writes === 0) fail(`the stale writer stopped after ${writes} writes with ${code}`)
  console.log(`[prefill] the stale writer stopped with REVOKED after ${writes} writes`)
  // 4. A child process starts a request and is killed before it finishes it.
  const child = fork(fileURLToPath(import.meta.url), ['orphan'], { env: process.env })
  await new Promise((resolve, reject) => {
    child.once('message', resolve)
    child.once('exit', (code) => reject(new Error(`the orphan process ended first (${code})`)))
  })
  child.kill('SIGKILL')
  console.log('[prefill] killed the process in the middle of request "orphan"')
  comm.close()
}

async function orphan() {
  const c = cache()
  const comm = c.comm('prefill', 0)
  await comm.connectAsync(HOST, PORT)
  // (Layer 1: the decode is still watching layer 0 for late writes of the revoked request.)
  await comm.writeCacheAsync(HOST, PORT, [2], [100], 1, { requestId: 'orphan' })
  process.send('wrote')
  await new Promise(() => {})
}

const role = process.argv[2]
if (role === 'decode') await decode()
else if (role === 'prefill') await prefill()
else if (role === 'orphan') await orphan()
else fail(`usage: pair-requests.mjs decode|prefill`)
