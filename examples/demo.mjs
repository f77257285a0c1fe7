// The demo: a decode process and a prefill process move a real KV cache and check every byte.
//
//   node examples/demo.mjs            # runs both processes on this machine
//   node examples/demo.mjs decode     # one side only, on two machines: the decode listens on DEMO_PORT and
//   DECODE_HOST=<decode ip> node examples/demo.mjs prefill   # DEMO_PORT + 1 (where the prefill says "done")
//
// The transport comes from the environment as in any engine: KVCACHE_TRANSPORT=rdma, KVCACHE_RDMA_NICS, ...
import { fork } from 'node:child_process'
import { createHash } from 'node:crypto'
import net from 'node:net'
import { fileURLToPath } from 'node:url'
import { RDMACommunicator, HostBuffer } from 'kvtransfer'

const LAYERS = 8
const BLOCKS = 512
const BLOCK_BYTES = 16 * 1024
const PORT = Number(process.env.DEMO_PORT ?? 23456)
const HOST = process.env.DECODE_HOST ?? '127.0.0.1'

// Both processes derive the prefill cache's contents from the layer, tensor and block, so the decode
// side can check what arrived without being told.
function fillBlock(buf, layer, tensor, block) {
  let x = (layer * 7919 + tensor * 104729 + block * 1299709) >>> 0
  for (let i = 0; i < buf.length; i += 4) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    buf.writeUInt32LE(x, i)
  }
}

function allocCache() {
  const keys = Array.from({ length: LAYERS }, () => HostBuffer.alloc(BLOCKS * BLOCK_BYTES))
  const values = Array.from({ length: LAYERS }, () => HostBuffer.alloc(BLOCKS * BLOCK_BYTES))
  return { keys, values }
}

const sha = (b) => createHash('sha256').update(b).digest('hex')

// The prefill engine finishes requests whose KV blocks sit scattered in its cache; the decode engine
// allocated other scattered blocks for them.
function assignment() {
  const local = [], remote = []
  for (let i = 0; i < BLOCKS / 2; i++) {
    local.push((i * 37) % BLOCKS)
    remote.push((i * 101 + 5) % BLOCKS)
  }
  return { local, remote }
}

async function decode() {
  const cache = allocCache()
  const comm = new RDMACommunicator('decode', 0, PORT, cache.keys.map((b) => b.ptr), cache.values.map((b) => b.ptr), BLOCKS, BLOCK_BYTES)
  console.log(`[decode] listening on port ${comm.port} (${comm.transport}), ${LAYERS} layers × ${BLOCKS} blocks × ${BLOCK_BYTES} B`)
  process.send?.({ ready: comm.port })
  // The prefill's "done" (over IPC, or on DEMO_PORT + 1 from another machine) only asks for the verdict: the
  // decode learns that each layer has arrived from kvtransfer itself, and checks it then.
  const done = process.send ? new Promise((resolve) => process.once('message', () => resolve(null))) : waitForRemoteDone(PORT + 1)
  const { local, remote } = assignment()
  const expected = Buffer.alloc(BLOCK_BYTES)
  let bad = 0
  for (let layer = 0; layer < LAYERS; layer++) {
    await comm.waitFor('demo-request', { layers: [layer], timeoutMs: 120_000 })
    for (const [tensor, bufs] of [[0, cache.keys], [1, cache.values]]) {
      local.forEach((l, i) => {
        fillBlock(expected, layer, tensor, l)
        const got = bufs[layer].buffer.subarray(remote[i] * BLOCK_BYTES, (remote[i] + 1) * BLOCK_BYTES)
        if (sha(got) !== sha(expected)) bad++
      })
    }
  }
  const reply = await done
  const checked = LAYERS * 2 * local.length
  const verdict = bad === 0 ? `verified: all ${checked} blocks match, byte for byte, each layer as its notification came` : `${bad} of ${checked} blocks differ`
  console.log(`[decode] ${verdict}`)
  reply?.(verdict)
  comm.close()
  process.exitCode = bad === 0 ? 0 : 1
}

// Resolves with a function that answers the prefill, once it connects to `port` and says "done".
function waitForRemoteDone(port) {
  return new Promise((resolve) => {
    const server = net.createServer((socket) => {
      socket.once('data', () => {
        server.close()
        resolve((verdict) => socket.end(verdict + '\n'))
      })
    })
    server.listen(port)
  })
}

// Tells a decode on another machine that the writes are done; resolves with its verdict.
function tellRemoteDone(host, port) {
  return new Promise((resolve, reject) => {
    let answer = ''
    const socket = net.connect(port, host, () => socket.write('done\n'))
    socket.on('data', (d) => (answer += d))
    socket.on('end', () => resolve(answer.trim()))
    socket.on('error', reject)
  })
}

async function prefill(port) {
  const cache = allocCache()
  for (let layer = 0; layer < LAYERS; layer++) {
    for (let b = 0; b < BLOCKS; b++) {
      fillBlock(cache.keys[layer].buffer.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES), layer, 0, b)
      fillBlock(cache.values[layer].buffer.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES), layer, 1, b)
    }
  }
  // On two machines the decode may still be starting: connect tries again for about half a minute.
  const reconnect = { retries: 10, backoffMs: 200 }
  const comm = new RDMACommunicator('prefill', 0, port, cache.keys.map((b) => b.ptr), cache.values.map((b) => b.ptr), BLOCKS, BLOCK_BYTES, 1, 0, { reconnect })
  await comm.connectAsync(HOST, port)
  const { local, remote } = assignment()
  const start = process.hrtime.bigint()
  // Layer by layer, as a prefill engine hands over finished layers, as one request: the decode is notified of
  // each layer once its bytes are there.
  for (let layer = 0; layer < LAYERS; layer++) await comm.writeCacheAsync(HOST, port, local, remote, layer, { requestId: 'demo-request' })
  const seconds = Number(process.hrtime.bigint() - start) / 1e9
  const bytes = LAYERS * 2 * local.length * BLOCK_BYTES
  console.log(`[prefill] wrote ${LAYERS} layers, ${local.length} scattered blocks each (keys and values), ${(bytes / 2 ** 20).toFixed(0)} MiB in ${(seconds * 1000).toFixed(1)} ms over ${comm.connectedTransport(HOST, port)}${comm.rdmaDevice ? ` (${comm.rdmaDevice})` : ''}`)
  comm.close()
}

const role = process.argv[2]
if (role === 'decode') await decode()
else if (role === 'prefill') {
  await prefill(PORT)
  const verdict = await tellRemoteDone(HOST, PORT + 1)
  console.log(`[prefill] the decode side says: ${verdict}`)
  process.exitCode = verdict.startsWith('verified') ? 0 : 1
}
else {
  const self = fileURLToPath(import.meta.url)
  const child = fork(self, ['decode'], { env: { ...process.env, DEMO_PORT: '0' } })
  const port = await new Promise((resolve) => child.once('message', (m) => resolve(m.ready)))
  await prefill(port)
  child.send('done')
  const code = await new Promise((resolve) => child.once('exit', resolve))
  console.log(code === 0 ? 'demo: OK' : 'demo: FAILED')
  process.exitCode = code
}
