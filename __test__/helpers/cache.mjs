// A KV cache in host memory for tests: random bytes, per-block hashes, snapshots.
import { createHash, randomFillSync } from 'node:crypto'
import { HostBuffer } from 'kvtransfer'

export const TENSORS = ['key', 'value', 'keyScale', 'valueScale']

/**
 * @param {{layers:number, blocks:number, blockBytes:number, keyOnly?:boolean, scaleBlockBytes?:number}} shape
 */
export function makeCache({ layers, blocks, blockBytes, keyOnly = false, scaleBlockBytes = 0 }) {
  const tensors = {}
  const sizes = { key: blockBytes, value: blockBytes, keyScale: scaleBlockBytes, valueScale: scaleBlockBytes }
  for (const t of TENSORS) {
    if ((t === 'value' && keyOnly) || (t.endsWith('Scale') && !scaleBlockBytes) || (t === 'valueScale' && keyOnly)) continue
    tensors[t] = Array.from({ length: layers }, () => {
      const hb = HostBuffer.alloc(blocks * sizes[t])
      randomFillSync(hb.buffer)
      return hb
    })
  }
  const ptrs = (t) => (tensors[t] ?? []).map((hb) => hb.ptr)
  return {
    layers,
    blocks,
    sizes,
    tensors,
    keyPtrs: ptrs('key'),
    valuePtrs: ptrs('value'),
    scaleOptions: scaleBlockBytes
      ? { keyScalePtrs: ptrs('keyScale'), valueScalePtrs: ptrs('valueScale'), scaleBlockBytes }
      : {},
    /** The bytes of one block (or of a part of it). */
    block(t, layer, id, from = 0, len = sizes[t]) {
      const start = id * sizes[t] + from
      return tensors[t][layer].buffer.subarray(start, start + len)
    },
    /** sha256 of one block, hex. */
    blockHash(t, layer, id) {
      return createHash('sha256').update(this.block(t, layer, id)).digest('hex')
    },
    /** sha256 of everything. */
    digest() {
      const h = createHash('sha256')
      for (const t of Object.keys(tensors)) for (const hb of tensors[t]) h.update(hb.buffer)
      return h.digest('hex')
    },
    free() {
      for (const t of Object.keys(tensors)) for (const hb of tensors[t]) hb.free()
    },
  }
}

export function hash(bytes) {
  return createHash('sha256').update(bytes).digest('hex')
}
