// What the two-host scripts (`pair-requests.mjs`, `pair-faults.mjs`) share: a cache of host buffers with the seed
// API's communicator over it, the bytes a prefill writes into a block, and how a script waits and fails.
import { RDMACommunicator, HostBuffer } from 'kvtransfer'

// Bytes derived from (layer, tensor, block, and a seed of the request's): the decode checks them without being told.
export function fillBlock(buf, layer, tensor, block, seed = 0) {
  let x = (seed * 31337 + layer * 7919 + tensor * 104729 + block * 1299709 + 17) >>> 0
  for (let i = 0; i < buf.length; i += 4) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    buf.writeUInt32LE(x, i)
  }
}

// `layers` layers of keys and values, `blocks` blocks of `blockBytes` each, and `comm(role, port)` over them.
export function pairCache(layers, blocks, blockBytes, options) {
  const keys = Array.from({ length: layers }, () => HostBuffer.alloc(blocks * blockBytes))
  const values = Array.from({ length: layers }, () => HostBuffer.alloc(blocks * blockBytes))
  const comm = (role, port) => new RDMACommunicator(role, 0, port, keys.map((b) => b.ptr), values.map((b) => b.ptr), blocks, blockBytes, 1, 0, options)
  return { keys, values, comm }
}

// 'OK', or the code the promise rejected with.
export const codeOf = (promise) => promise.then(() => 'OK', (e) => e.code ?? String(e))

// A script's failure: said with its `tag`, and the process ends with status 1.
export const failer = (tag) => (what) => {
  console.error(`[${tag}] FAILED: ${what}`)
  process.exit(1)
}
