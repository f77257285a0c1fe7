/**
 * @internal A prefill process of `kvtransfer soak` ({@link runSoak}): `peers` prefill communicators, each
 * connected to every decode and running requests one after another into its own range of their blocks until the
 * deadline, each request to the next decode in turn, its layers written in turn under its id. Now and then a
 * request is aborted part-way (its client left), or its peer's connection is closed and made again mid-request. Tells the soak over IPC when a request
 * starts and ends, and what its calls did, and starts the next request of a peer only once the decode has
 * released the last one's blocks.
 */
import { Communicator, type PrefillCommunicator } from './communicator.js'
import type { Peer } from './peer.js'
import { KVTransferError } from './errors.js'
import { HostBuffer } from './host-buffer.js'
import { resources } from './system.js'
import { modelBlock, type PrefillReport, type RequestPlan, type SoakPlan } from './soak.js'

const HOST = '127.0.0.1'

let plan: SoakPlan | undefined
const released = new Map<string, () => void>()
let calls = 0
let bytes = 0
let errors: Record<string, number> = {}
let latencies: number[] = []

/** A random number of [0, 1) from a seeded generator, so that a run can be told again. */
function random(seed: number): () => number {
  let x = seed >>> 0 || 1
  return () => {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    return (x >>> 0) / 2 ** 32
  }
}

/** One prefill engine: its own cache of `blocksPerPeer` blocks a layer, keys and values. */
async function peerLoop(p: SoakPlan, index: number, deadline: number): Promise<void> {
  const tensors = [0, 1].map(() => Array.from({ length: p.layers }, () => HostBuffer.alloc(p.blocksPerPeer * p.blockBytes)))
  const comm: PrefillCommunicator = await Communicator.prefillAsync({
    keys: tensors[0],
    values: tensors[1],
    blockNumber: p.blocksPerPeer,
    blockBytes: p.blockBytes,
    transport: p.transport,
    instanceId: `soak-${p.name}-prefill-${index}`,
  })
  const rand = random(p.seed * 7919 + index)
  const peers: Peer[] = []
  /** Connects to decode `at` (again), retrying while it is away: chaos may be replacing the decode process. */
  const connect = async (at: number) => {
    for (;;) {
      try {
        peers[at] = await comm.connect(HOST, p.ports[at])
        return
      } catch (e) {
        count(e)
        if (Date.now() > deadline + 30_000) throw e
        await new Promise((resolve) => setTimeout(resolve, 200))
      }
    }
  }
  try {
    for (let at = 0; at < p.ports.length; at++) await connect(at)
    for (let n = 0; Date.now() < deadline; n++) {
      const request = `${p.name}-p${index}-r${n}`
      const at = (index + n) % p.ports.length
      const peer = peers[at]
      // Its blocks on both sides, scattered: the decode's are this peer's range, shuffled.
      const local = shuffle(Array.from({ length: p.blocksPerRequest }, (_, i) => i), rand)
      const first = (p.firstPeer + index) * p.blocksPerPeer
      const remote = shuffle(Array.from({ length: p.blocksPerPeer }, (_, i) => first + i), rand).slice(0, p.blocksPerRequest)
      const roll = rand()
      const leaveAt = roll < p.abortRate ? 1 + Math.floor(rand() * (p.layers - 1)) : -1
      const reconnectAt = roll >= p.abortRate && roll < p.abortRate + p.reconnectRate ? 1 + Math.floor(rand() * (p.layers - 1)) : -1
      const freed = new Promise<void>((resolve) => released.set(request, resolve))
      const plan: RequestPlan = leaveAt >= 0 ? 'abort' : reconnectAt >= 0 ? 'reconnect' : 'complete'
      process.send?.({ type: 'start', request, peer: index, decode: at, blocks: remote, plan } satisfies PrefillReport)
      let end = 'complete'
      for (let layer = 0; layer < p.layers; layer++) {
        if (layer === leaveAt) {
          end = 'aborted'
          await peer.abort(request, 'the soak client left').catch((e: unknown) => count(e))
          break
        }
        if (layer === reconnectAt) {
          // The connection goes away mid-request (as a restarted link would); the request cannot complete.
          end = 'reconnected'
          await peer.close().catch((e: unknown) => count(e))
          await connect(at)
          break
        }
        for (const t of [0, 1]) local.forEach((id, i) => modelBlock(request, layer, t, i, tensors[t][layer].buffer.subarray(id * p.blockBytes, (id + 1) * p.blockBytes)))
        const start = process.hrtime.bigint()
        try {
          await peer.write(local, remote, layer, { requestId: request })
          calls++
          bytes += 2 * local.length * p.blockBytes
          latencies.push(Number(process.hrtime.bigint() - start) / 1e3)
        } catch (e) {
          count(e)
          end = e instanceof KVTransferError ? e.code.toLowerCase() : 'error'
          break
        }
      }
      process.send?.({ type: 'end', request, peer: index, end } satisfies PrefillReport)
      // Its decode went away and could not be reached again within the reconnect policy: connect anew (once the
      // request's end is told).
      if (end === 'not_connected') await connect(at)
      await freed
    }
  } finally {
    await comm.close()
    for (const t of tensors) for (const hb of t) hb.free()
  }
}

function count(e: unknown): void {
  const code = e instanceof KVTransferError ? e.code : 'ERROR'
  errors[code] = (errors[code] ?? 0) + 1
}

function shuffle<T>(a: T[], rand: () => number): T[] {
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1))
    ;[a[i], a[j]] = [a[j], a[i]]
  }
  return a
}

process.on('message', (m: { type: 'plan'; plan: SoakPlan } | { type: 'released'; request: string } | { type: 'sample'; seq: number }) => {
  if (m.type === 'released') {
    released.get(m.request)?.()
    released.delete(m.request)
  } else if (m.type === 'sample') {
    process.send?.({ type: 'sample', seq: m.seq, calls, bytes, errors, latencies, resources: resources() } satisfies PrefillReport)
    calls = 0
    bytes = 0
    errors = {}
    latencies = []
  } else if (m.type === 'plan' && plan === undefined) {
    plan = m.plan
    const p = plan
    const deadline = Date.now() + p.durationMs
    Promise.all(Array.from({ length: p.peers }, (_, i) => peerLoop(p, i, deadline))).then(
      () => process.send?.({ type: 'finished' } satisfies PrefillReport),
      (e: unknown) => process.send?.({ type: 'crashed', error: e instanceof Error ? e.stack ?? e.message : String(e) } satisfies PrefillReport),
    )
  }
})
process.on('disconnect', () => process.exit(0))
