// Throughput through the public Node API: a decode process and this (prefill) process, 1538 scattered
// blocks per writeCache call, keys and values, block sizes 1 KiB to 256 KiB.
//
//   npm run bench                      # KVCACHE_TRANSPORT picks the transport (default auto)
//   BENCH_SIZES=1,64,256 BENCH_KEY_ONLY=1 BENCH_SECONDS=3 npm run bench
//   BENCH_ASYNC=1 npm run bench        # writeCacheAsync, one call in flight at a time, instead of writeCache
//   BENCH_REQUEST=1 npm run bench      # writeCacheAsync as layers of requests (a new request id every 32 calls)
import { fork } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { RDMACommunicator, HostBuffer } from 'kvtransfer'

const BATCH = 1538
const SIZES = (process.env.BENCH_SIZES ?? '1,4,16,64,256').split(',').map((k) => Number(k) * 1024)
const KEY_ONLY = process.env.BENCH_KEY_ONLY === '1'
const SECONDS = Number(process.env.BENCH_SECONDS ?? 1.5)
const REQUEST = process.env.BENCH_REQUEST === '1'
const ASYNC = process.env.BENCH_ASYNC === '1' || REQUEST
const TENSORS = KEY_ONLY ? 1 : 2
const HOST = '127.0.0.1'

function scattered(n, seed) {
  const ids = Uint32Array.from({ length: n }, (_, i) => i)
  let x = seed
  for (let i = n - 1; i > 0; i--) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0
    const j = x % (i + 1)
    ;[ids[i], ids[j]] = [ids[j], ids[i]]
  }
  return ids
}

function cache(blockBytes) {
  const k = HostBuffer.alloc(BATCH * blockBytes)
  const v = KEY_ONLY ? null : HostBuffer.alloc(BATCH * blockBytes)
  k.buffer.fill(1)
  v?.buffer.fill(2)
  return { k, v, values: v ? [v.ptr] : [] }
}

if (process.argv[2] === 'decode') {
  const size = Number(process.argv[3])
  const { k, v, values } = cache(size)
  const comm = new RDMACommunicator('decode', 0, 0, [k.ptr], values, BATCH, size)
  process.send({ port: comm.port })
  // The buffers must outlive the communicator that writes into them: keep them referenced until close.
  process.on('message', () => {})
  process.on('disconnect', () => {
    comm.close()
    k.free()
    v?.free()
  })
} else {
  console.log(`kvtransfer bench: ${BATCH} scattered blocks per call, ${KEY_ONLY ? 'keys only' : 'keys and values'}, one thread, ${REQUEST ? 'writeCacheAsync with a request id' : ASYNC ? 'writeCacheAsync' : 'writeCache'}`)
  console.log('block     GB/s     ms/call  transport')
  for (const size of SIZES) {
    const child = fork(fileURLToPath(import.meta.url), ['decode', String(size)])
    const { port } = await new Promise((r) => child.once('message', r))
    // Both buffers stay referenced until the communicator is closed (a collected HostBuffer frees its memory).
    const { k, v, values } = cache(size)
    const comm = new RDMACommunicator('prefill', 0, port, [k.ptr], values, BATCH, size)
    await comm.connectAsync(HOST, port)
    const local = scattered(BATCH, 1)
    const remote = scattered(BATCH, 2)
    await comm.writeCacheAsync(HOST, port, local, remote, 0)
    let calls = 0
    const start = process.hrtime.bigint()
    let elapsed = 0
    while (elapsed < SECONDS || calls < 2) {
      if (REQUEST) await comm.writeCacheAsync(HOST, port, local, remote, 0, { requestId: `request-${calls >> 5}` })
      else if (ASYNC) await comm.writeCacheAsync(HOST, port, local, remote, 0)
      else if (comm.writeCache(HOST, port, local, remote, 0) !== 0) throw comm.lastError
      calls++
      elapsed = Number(process.hrtime.bigint() - start) / 1e9
    }
    const gbps = (calls * TENSORS * BATCH * size) / elapsed / 1e9
    console.log(`${String(size / 1024).padStart(4)} KiB ${gbps.toFixed(3).padStart(8)} ${((elapsed / calls) * 1000).toFixed(3).padStart(10)}  ${comm.transport}`)
    comm.close()
    k.free()
    v?.free()
    child.disconnect()
    await new Promise((r) => child.once('exit', r))
  }
}
