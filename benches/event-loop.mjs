// How long the event loop is held up while a communicator closes, connects and writes, with healthy and with
// stalled peers (a peer process stopped with SIGSTOP: alive, silent). Each phase reports the event loop's
// longest delay and its p99 (perf_hooks.monitorEventLoopDelay, 1 ms resolution) and how long the call took.
// The seed API's synchronous close() runs beside the async one, as the baseline.
//
//   node benches/event-loop.mjs                 # KVCACHE_TRANSPORT picks the transport (default auto: shm)
//   KVCACHE_TRANSPORT=tcp node benches/event-loop.mjs
import { fork } from 'node:child_process'
import { once } from 'node:events'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { fileURLToPath } from 'node:url'
import { Communicator, HostBuffer, RDMACommunicator } from 'kvtransfer'

const HOST = '127.0.0.1'
const SHAPE = { blockNumber: 64, blockBytes: 64 << 10 }
const TIMEOUT_MS = 3000
const settings = { connectTimeoutMs: TIMEOUT_MS, stallTimeoutMs: TIMEOUT_MS, confirmTimeoutMs: TIMEOUT_MS, socketIfname: 'lo', errorFile: '/dev/null' }
const cache = () => ({ keys: [HostBuffer.alloc(SHAPE.blockNumber * SHAPE.blockBytes)], values: [HostBuffer.alloc(SHAPE.blockNumber * SHAPE.blockBytes)], ...SHAPE })
const ids = [...Array(SHAPE.blockNumber).keys()]

// A peer process: a prefill that connects to `port` and writes, or a decode that listens and says its port.
if (process.argv[2] === '--prefill') {
  const prefill = Communicator.prefill({ ...cache(), ...settings })
  process.on('message', async ({ port }) => {
    const peer = await prefill.connect(HOST, port)
    await peer.write(ids, ids, 0, { requestId: 'r' })
    process.send('written')
  })
} else if (process.argv[2] === '--decode') {
  const decode = Communicator.decode({ ...cache(), ...settings })
  process.send(decode.port)
} else {
  await main()
}

async function child(role) {
  const c = fork(fileURLToPath(import.meta.url), [`--${role}`], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  c.on('error', () => {})
  return c
}

async function measure(name, f) {
  const h = monitorEventLoopDelay({ resolution: 1 })
  h.enable()
  // The histogram's first sample is its base: let it take one before the call.
  await new Promise((resolve) => setTimeout(resolve, 20))
  const started = performance.now()
  let outcome = 'ok'
  try {
    await f()
  } catch (err) {
    outcome = err.code ?? String(err)
  }
  const took = performance.now() - started
  // One more turn of the loop, so that a call that blocked it is recorded as the delay it caused.
  await new Promise((resolve) => setTimeout(resolve, 20))
  h.disable()
  const ms = (ns) => (ns / 1e6).toFixed(1)
  console.log(`${name.padEnd(52)} ${took.toFixed(0).padStart(6)} ms   loop delay max ${ms(h.max).padStart(7)} ms  p99 ${ms(h.percentile(99)).padStart(6)} ms   ${outcome}`)
}

/** A decode of this process (async API or seed API) with a prefill process that wrote into it. */
async function decodeWithPeer(seed) {
  const c = cache()
  const decode = seed
    ? new RDMACommunicator('decode', 0, 0, [c.keys[0].ptr], [c.values[0].ptr], SHAPE.blockNumber, SHAPE.blockBytes, 1, 0, settings)
    : Communicator.decode({ ...c, ...settings })
  const peer = await child('prefill')
  peer.send({ port: decode.port })
  await once(peer, 'message')
  return { decode, peer, keep: c }
}

async function main() {
  const transport = Communicator.decode({ ...cache(), ...settings })
  console.log(`event loop delay, peers on this host, transport ${transport.transport} (KVCACHE_TRANSPORT), each timeout ${TIMEOUT_MS} ms`)
  await transport.close()
  for (const stalled of [false, true]) {
    for (const seed of [true, false]) {
      const { decode, peer } = await decodeWithPeer(seed)
      if (stalled) peer.kill('SIGSTOP')
      const what = `${seed ? 'RDMACommunicator.close() (sync)' : 'Communicator.close() (async)'}, ${stalled ? 'stalled' : 'healthy'} peer`
      await measure(what, async () => (seed ? decode.close() : await decode.close()))
      peer.kill('SIGKILL')
      await once(peer, 'exit')
    }
  }
  // A prefill of this process and a decode process that stops answering.
  const prefill = Communicator.prefill({ ...cache(), ...settings })
  const decode = await child('decode')
  const [port] = await once(decode, 'message')
  let peer
  await measure('connect, healthy decode', async () => (peer = await prefill.connect(HOST, port)))
  await measure('4 writes in flight, healthy decode', () => Promise.all([0, 1, 2, 3].map((l) => peer.write(ids, ids, 0, { requestId: `w${l}` }))))
  decode.kill('SIGSTOP')
  await measure('4 writes in flight, stalled decode', () => Promise.all([0, 1, 2, 3].map((l) => peer.write(ids, ids, 0, { requestId: `s${l}` }))))
  const other = Communicator.prefill({ ...cache(), ...settings })
  await measure('connect, stalled decode', () => other.connect(HOST, port))
  await measure('Communicator.close() (async), prefill, stalled decode', () => prefill.close())
  decode.kill('SIGKILL')
  await other.close()
}
