// A decode engine in its own process, driven over IPC by a test: it owns a cache, listens, and answers
// questions about what landed in its memory.
import { RDMACommunicator } from 'kvtransfer'
import { makeCache } from './cache.mjs'

let cache
let comm

const handlers = {
  start({ shape, options = {}, port = 0 }) {
    cache = makeCache(shape)
    comm = new RDMACommunicator('decode', 0, port, cache.keyPtrs, cache.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, {
      ...cache.scaleOptions,
      ...options,
    })
    return { port: comm.port, transport: comm.transport }
  },
  blockHashes({ tensor, layer, ids }) {
    return ids.map((id) => cache.blockHash(tensor, layer, id))
  },
  digest() {
    return cache.digest()
  },
  close() {
    comm.close()
    return true
  },
}

process.on('message', ({ id, op, args }) => {
  try {
    process.send({ id, ok: handlers[op](args) })
  } catch (err) {
    process.send({ id, error: { message: err.message, code: err.code } })
  }
})
process.on('disconnect', () => process.exit(0))
