/**
 * @internal The decode process of `kvtransfer bench` ({@link runBench}): it owns a cache, listens on loopback,
 * and answers the bench over IPC (`start`, `clear`, `digest`) until the bench disconnects.
 */
import { cache, digest } from './bench.js'
import { RDMACommunicator } from './compat.js'
import { HostBuffer } from './host-buffer.js'

interface Start {
  transport: string
  blockBytes: number
  pool: number
  layers: number
  tensors: number
}

let comm: RDMACommunicator | undefined
let tensors: HostBuffer[][] = []
let blockBytes = 0

const handlers: Record<string, (args: never) => unknown> = {
  start(a: Start): number {
    blockBytes = a.blockBytes
    // Zeros, touched before any write (first-touch faults are not the transport's cost).
    tensors = cache(a.tensors, a.layers, a.pool, a.blockBytes, false)
    const ptrs = (t: number) => (tensors[t] ?? []).map((hb) => hb.ptr)
    comm = new RDMACommunicator('decode', 0, 0, ptrs(0), ptrs(1), a.pool, a.blockBytes, 1, 0, { transport: a.transport as 'tcp', socketIfname: 'lo' })
    return comm.port
  },
  clear(a: { layer: number; ids: number[] }): boolean {
    for (const t of tensors) for (const id of a.ids) t[a.layer].buffer.fill(0, id * blockBytes, (id + 1) * blockBytes)
    return true
  },
  digest(a: { layer: number; ids: number[] }): string {
    return digest(tensors, a.layer, a.ids, blockBytes)
  },
}

process.on('message', (m: { id: number; op: string; args: never }) => {
  try {
    process.send?.({ id: m.id, result: handlers[m.op](m.args) })
  } catch (e) {
    process.send?.({ id: m.id, error: e instanceof Error ? e.message : String(e) })
  }
})
process.on('disconnect', () => {
  comm?.close()
  process.exit(0)
})
