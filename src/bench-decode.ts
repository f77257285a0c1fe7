/**
 * @internal The decode process of `kvtransfer bench` ({@link runBench}): it owns a cache, listens on loopback,
 * and answers the bench over IPC (`start`, `clear`, `digest`) until the bench disconnects.
 */
import { cache, digest, type CacheBuffer } from './bench.js'
import { RDMACommunicator } from './compat.js'
import { HostBuffer } from './host-buffer.js'

interface Start {
  transport: string
  blockBytes: number
  pool: number
  layers: number
  tensors: number
  /** The GPU of a cache in GPU memory (CUDA IPC rows); host memory without it. */
  gpu?: number
}

let comm: RDMACommunicator | undefined
let tensors: CacheBuffer[][] = []
let blockBytes = 0

const handlers: Record<string, (args: never) => unknown> = {
  start(a: Start): number {
    blockBytes = a.blockBytes
    // Zeros, touched before any write (first-touch faults are not the transport's cost).
    tensors = cache(a.tensors, a.layers, a.pool, a.blockBytes, false, a.gpu)
    const ptrs = (t: number) => (tensors[t] ?? []).map((b) => b.ptr)
    comm = new RDMACommunicator('decode', a.gpu ?? 0, 0, ptrs(0), ptrs(1), a.pool, a.blockBytes, 1, 0, { transport: a.transport as 'tcp', socketIfname: 'lo' })
    return comm.port
  },
  clear(a: { layer: number; ids: number[] }): boolean {
    const zeros = Buffer.alloc(blockBytes)
    for (const t of tensors) {
      const b = t[a.layer]
      for (const id of a.ids) {
        if (b instanceof HostBuffer) b.buffer.fill(0, id * blockBytes, (id + 1) * blockBytes)
        else b.write(zeros, id * blockBytes)
      }
    }
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
