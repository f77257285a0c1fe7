// A decode and a prefill communicator of this process over caches of `shape` (the decode's may differ), over the
// transport under test; closed, then their caches freed, when the test ends.
import { Communicator } from 'kvtransfer'
import { makeCache } from './cache.mjs'
import { transportOptions } from './transport.mjs'

export function pair(t, shape, decodeShape = shape) {
  const src = makeCache(shape)
  const dst = makeCache(decodeShape)
  const cacheOf = (c, s) => ({ keyPtrs: c.keyPtrs, valuePtrs: c.valuePtrs, blockNumber: s.blocks, blockBytes: s.blockBytes })
  const decode = Communicator.decode({ ...cacheOf(dst, decodeShape), ...transportOptions })
  const prefill = Communicator.prefill({ ...cacheOf(src, shape), ...transportOptions })
  t.teardown(async () => {
    await prefill.close()
    await decode.close()
    src.free()
    dst.free()
  })
  return { src, dst, decode, prefill }
}
