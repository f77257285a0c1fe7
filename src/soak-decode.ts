/**
 * @internal The decode process of `kvtransfer soak` ({@link runSoak}): `decodes` decode communicators, each with a
 * cache of its own, on the ports the soak names (any free ones the first time; after chaos killed the process
 * before it, the same ones again, so that the prefills find their decodes where they were). For each request the
 * soak tells it of, it waits for each layer and checks its bytes against what the prefill computed, revokes what
 * did not complete before its blocks are used again, and tells the soak how it ended. It answers the soak's
 * questions: how many requests its decodes hold open, what this process holds (a sample), and, at the end, whether
 * the decodes let go of everything their links took.
 */
import { Communicator, type DecodeCommunicator } from './communicator.js'
import { KVTransferError } from './errors.js'
import { HostBuffer } from './host-buffer.js'
import { type DecodeOrder, type DecodePlan, type DecodeReport, footprint, modelBlock } from './soak.js'
import { resources } from './system.js'

/** How a request ended, by the code its `waitFor` rejected with. */
const ENDS: Record<string, string> = { TRANSPORT: 'failed', ABORTED: 'aborted', REVOKED: 'revoked', EXPIRED: 'expired' }

const tell = (m: DecodeReport) => process.send?.(m)

/** The decodes and their caches, once the plan came. */
let decodes: DecodeCommunicator[] = []
let caches: Array<{ keys: HostBuffer[]; values: HostBuffer[] }> = []
let plan: DecodePlan | undefined
/** The regions the decodes registered before any prefill came (their caches', scratch pages and flush words). */
let ownRegions = 0

async function open(p: DecodePlan): Promise<void> {
  caches = p.ports.map(() => ({
    keys: Array.from({ length: p.layers }, () => HostBuffer.alloc(p.blockNumber * p.blockBytes)),
    values: Array.from({ length: p.layers }, () => HostBuffer.alloc(p.blockNumber * p.blockBytes)),
  }))
  // Ended requests are forgotten after 15 s, so that what a request leaves behind shows as growth; an open one
  // expires after as long without progress (longer than a layer takes in the emulated Soft-RoCE VM).
  for (const [i, cache] of caches.entries()) {
    decodes.push(await Communicator.decodeAsync({ ...cache, blockNumber: p.blockNumber, blockBytes: p.blockBytes, port: p.ports[i], socketIfname: 'lo', transport: p.transport, requestTtlMs: 15_000 }))
  }
  ownRegions = resources().rdmaMemoryRegions
  tell({ type: 'ready', ports: decodes.map((d) => d.port) })
}

/** The decode's side of one request: each layer awaited and checked, or its end seen; then revoked unless complete. */
async function follow(p: DecodePlan, order: Extract<DecodeOrder, { type: 'follow' }>): Promise<void> {
  const { request, at, blocks, revoke } = order
  const d = decodes[at]
  const { keys, values } = caches[at]
  const failures: string[] = []
  const want = Buffer.alloc(p.blockBytes)
  const check = (layer: number, when: string) => {
    for (const [t, tensor] of [keys, values].entries()) {
      blocks.forEach((id, i) => {
        modelBlock(request, layer, t, i, want)
        if (!tensor[layer].buffer.subarray(id * p.blockBytes, (id + 1) * p.blockBytes).equals(want)) {
          failures.push(`${request}: layer ${layer}, ${t === 0 ? 'key' : 'value'} block ${id} of decode ${at} does not hold the prefill's bytes ${when}`)
        }
      })
    }
  }
  const deadline = Date.now() + p.requestDeadlineMs
  let how = 'complete'
  try {
    for (let layer = 0; layer < p.layers; layer++) {
      await d.waitFor(request, { layers: [layer], timeoutMs: Math.max(1, deadline - Date.now()) })
      check(layer, 'once its layer arrived')
      if (revoke) {
        how = 'revoked'
        break
      }
    }
    // Nothing of another request landed in them meanwhile (a late write of a revoked one, say).
    if (how === 'complete') for (let layer = 0; layer < p.layers; layer++) check(layer, 'when the request ended')
  } catch (e) {
    if (e instanceof KVTransferError && e.code === 'TIMEOUT') {
      how = 'hung'
      failures.push(`${request}: neither complete nor ended within ${p.requestDeadlineMs / 1000} s`)
    } else how = e instanceof KVTransferError ? (ENDS[e.code] ?? e.code.toLowerCase()) : `error (${String(e)})`
  }
  // Whatever did not complete is revoked before its blocks are used again: once that resolves, none of its writes
  // can land later.
  let revokeFailed: { askedAt: number; message: string } | undefined
  if (how !== 'complete') {
    const askedAt = Date.now()
    await d.revoke(request, { signal: AbortSignal.timeout(p.requestDeadlineMs) }).catch((e: unknown) => {
      revokeFailed = { askedAt, message: e instanceof Error ? e.message : String(e) }
    })
  }
  tell({ type: 'ended', request, how, failures, revokeFailed })
}

/** Requests the decodes hold open (started, not yet ended), from every prefill of this host. */
function openRequests(): number {
  return decodes.reduce(
    (sum, d) => sum + d.stats().peers.reduce((n, q) => n + q.requests.started - q.requests.done - q.requests.failed - q.requests.aborted - q.requests.revoked - q.requests.expired, 0),
    0,
  )
}

/**
 * Waits (up to `ms`) for the decodes to hold nothing of their links: no data connection, no queue pair (a decode
 * holds neither without a link), no region but their caches'. What they still hold.
 */
async function letGo(ms: number): Promise<string[]> {
  const left = () => {
    const now = resources()
    const most = { rdmaQueuePairs: 0, rdmaMemoryRegions: ownRegions, tcpDataConnections: 0, shmRings: 0 }
    return (['rdmaQueuePairs', 'rdmaMemoryRegions', 'tcpDataConnections', 'shmRings'] as const).filter((k) => now[k] > most[k]).map((k) => `${k} ${most[k]} → ${now[k]}`)
  }
  const until = Date.now() + ms
  while (left().length > 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 50))
  return left()
}

const crashed = (e: unknown) => tell({ type: 'crashed', error: e instanceof Error ? (e.stack ?? e.message) : String(e) })

process.on('message', (m: DecodeOrder) => {
  if (m.type === 'plan' && plan === undefined) {
    plan = m.plan
    open(m.plan).catch(crashed)
  } else if (m.type === 'follow' && plan) {
    follow(plan, m).catch(crashed)
  } else if (m.type === 'revoke') {
    decodes[m.at]?.revoke(m.request, { signal: AbortSignal.timeout(plan?.requestDeadlineMs ?? 30_000) }).catch(() => {})
  } else if (m.type === 'open') {
    tell({ type: 'open', seq: m.seq, open: openRequests() })
  } else if (m.type === 'sample') {
    tell({ type: 'sample', seq: m.seq, footprint: footprint('self', resources()) })
  } else if (m.type === 'let-go') {
    letGo(m.ms).then((left) => tell({ type: 'let-go', left }), crashed)
  }
})
// Closed once the soak lets go of it: the decodes, then their caches.
process.on('disconnect', () => {
  void (async () => {
    for (const [i, d] of decodes.entries()) {
      try {
        await d.close()
        for (const hb of [...caches[i].keys, ...caches[i].values]) hb.free()
      } catch (e) {
        // A link that never confirmed may still write into this cache: it is not freed (the process ends anyway).
        console.error(`soak decode ${i}: ${e instanceof Error ? e.message : String(e)}`)
      }
    }
    process.exit(0)
  })()
})
