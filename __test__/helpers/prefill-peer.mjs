// A prefill process for the tests: connects to the decode named by its message, writes layer 0 of a request,
// says so, and then stays until it is killed.
import { Communicator } from 'kvtransfer'
import { makeCache } from './cache.mjs'

// Kept referenced for the life of the process: a collected communicator closes, and a collected cache is freed.
const alive = []

process.on('message', async ({ port, shape, options, requestId }) => {
  const cache = makeCache(shape)
  const prefill = Communicator.prefill({ keyPtrs: cache.keyPtrs, valuePtrs: cache.valuePtrs, blockNumber: shape.blocks, blockBytes: shape.blockBytes, ...options })
  alive.push(cache, prefill)
  const peer = await prefill.connect('127.0.0.1', port)
  await peer.write([0, 1], [0, 1], 0, { requestId })
  process.send({ written: true })
})
