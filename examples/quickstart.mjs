import { Communicator, HostBuffer } from 'kvtransfer'

// A cache: one key and one value tensor per layer, each `blockNumber` blocks of `blockBytes`.
const [layers, blockNumber, blockBytes] = [2, 64, 16 << 10]
const tensors = () => Array.from({ length: layers }, () => HostBuffer.alloc(blockNumber * blockBytes))
const cache = () => ({ keys: tensors(), values: tensors(), blockNumber, blockBytes })

// Decode engine: the communicator holds its cache until it is closed. On loopback no token is needed;
// beyond it, give both sides the same `authToken` (openssl rand -hex 32).
const decodeCache = cache()
const decode = Communicator.decode({ ...decodeCache, port: 0, socketIfname: 'lo' })
const notifications = decode.notifications()

// Prefill engine (another process, usually another host: connect to the decode's address).
const prefillCache = cache()
prefillCache.keys[1].buffer.fill(7, 0, blockBytes) // block 0 of layer 1, as the model computed it
const prefill = Communicator.prefill({ ...prefillCache, instanceId: 'prefill-0' })
const peer = await prefill.connect('127.0.0.1', decode.port)

// Each layer of a request as soon as it is computed: blocks 0..2 land in the decode's blocks 10..12.
for (let layer = 0; layer < layers; layer++) await peer.write([0, 1, 2], [10, 11, 12], layer, { requestId: 'req-1' })
await decode.waitFor('req-1') // every layer is in the decode's memory
console.log('req-1 arrived:', decodeCache.keys[1].buffer[10 * blockBytes] === 7)

// A request the prefill gives up on: the decode's wait rejects with ABORTED.
await peer.write([3], [20], 0, { requestId: 'req-2' })
await peer.abort('req-2', 'the client went away')
await decode.waitFor('req-2').catch((err) => console.log('req-2:', err.code))

for await (const n of notifications) {
  console.log(n.requestId, n.status, n.layerIdx ?? '')
  if (n.status === 'aborted') break
}
await prefill.close()
await decode.close() // resolves once nothing more can land in its cache
