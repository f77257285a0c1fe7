// Blocks moved between two real processes over the public API, every byte checked by hash.
import test from 'ava'
import { RDMACommunicator } from 'kvtransfer'
import { makeCache, hash } from './helpers/cache.mjs'
import { startDecode } from './helpers/peer.mjs'
import { transportOptions } from './helpers/transport.mjs'

const HOST = '127.0.0.1'
const transport = transportOptions

function prefillFor(cache, shape, tpSize = 1, tpIdx = 0) {
  return new RDMACommunicator('prefill', 0, 0, cache.keyPtrs, cache.valuePtrs, shape.blocks, shape.blockBytes, tpSize, tpIdx, {
    ...cache.scaleOptions,
    ...transport,
  })
}

async function expectLanded(t, decode, src, tensors, layer, local, remote) {
  for (const tensor of tensors) {
    const got = await decode.blockHashes(tensor, layer, remote)
    const want = local.map((id) => src.blockHash(tensor, layer, id))
    t.deepEqual(got, want, `${tensor} of layer ${layer}`)
  }
}

test('all layers, keys and values, scattered and contiguous ids, sync and async', async (t) => {
  const shape = { layers: 4, blocks: 96, blockBytes: 1024 }
  const decode = await startDecode({ ...shape, blocks: 128 }, { options: transport })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  const comm = prefillFor(src, shape)
  t.teardown(() => comm.close())
  t.false(comm.isConnected(HOST, decode.port))
  t.is(comm.connectedTransport(HOST, decode.port), null)
  t.true(comm.connect(HOST, decode.port), comm.lastError?.message)
  t.true(comm.isConnected(HOST, String(decode.port)))
  t.is(comm.connectedTransport(HOST, decode.port), transport.transport)
  t.true(comm.connect(HOST, decode.port), 'connecting twice is fine')

  const scattered = { local: [7, 3, 90, 41, 42, 43, 0], remote: [127, 5, 64, 10, 11, 12, 99] }
  const contiguous = { local: [10, 11, 12, 13, 14, 15], remote: [20, 21, 22, 23, 24, 25] }
  const before = await decode.blockHashes('key', 0, [1, 2])
  for (let layer = 0; layer < shape.layers; layer++) {
    t.is(comm.writeCache(HOST, decode.port, scattered.local, scattered.remote, layer), 0)
    await comm.writeCacheAsync(HOST, String(decode.port), new Uint32Array(contiguous.local), contiguous.remote, layer)
  }
  for (let layer = 0; layer < shape.layers; layer++) {
    await expectLanded(t, decode, src, ['key', 'value'], layer, scattered.local, scattered.remote)
    await expectLanded(t, decode, src, ['key', 'value'], layer, contiguous.local, contiguous.remote)
  }
  t.deepEqual(await decode.blockHashes('key', 0, [1, 2]), before, 'blocks nobody wrote are untouched')
})

test('key-only caches (MLA)', async (t) => {
  const shape = { layers: 3, blocks: 32, blockBytes: 576, keyOnly: true }
  const decode = await startDecode(shape, { options: transport })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  t.deepEqual(src.valuePtrs, [])
  const comm = prefillFor(src, shape)
  t.teardown(() => comm.close())
  await comm.connectAsync(HOST, decode.port)
  await comm.writeCacheAsync(HOST, decode.port, [31, 0, 16], [0, 31, 17], 2)
  await expectLanded(t, decode, src, ['key'], 2, [31, 0, 16], [0, 31, 17])
})

test('heterogeneous TP: two prefill ranks fill the halves of each decode block', async (t) => {
  const half = { layers: 2, blocks: 16, blockBytes: 2048 }
  const decode = await startDecode({ ...half, blockBytes: 4096 }, { options: transport })
  t.teardown(decode.stop)
  const ranks = [makeCache(half), makeCache(half)]
  const comms = ranks.map((c, i) => prefillFor(c, half, 2, i))
  t.teardown(() => comms.forEach((c) => c.close()))
  const local = [0, 1, 2, 9]
  const remote = [15, 3, 4, 5]
  await Promise.all(comms.map((c) => c.connectAsync(HOST, decode.port, 1)))
  await Promise.all(comms.map((c) => c.writeCacheAsync(HOST, decode.port, local, remote, 1)))
  const got = await decode.blockHashes('value', 1, remote)
  const want = local.map((id) => hash(Buffer.concat([ranks[0].block('value', 1, id), ranks[1].block('value', 1, id)])))
  t.deepEqual(got, want)
})

test('quantised caches: scales move with their blocks', async (t) => {
  const shape = { layers: 2, blocks: 20, blockBytes: 512, scaleBlockBytes: 16 }
  const decode = await startDecode(shape, { options: transport })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  const comm = prefillFor(src, shape)
  t.teardown(() => comm.close())
  t.true(comm.connect(HOST, decode.port), comm.lastError?.message)
  t.is(comm.writeCache(HOST, decode.port, [4, 5, 19], [0, 1, 2], 1), 0)
  await expectLanded(t, decode, src, ['key', 'value', 'keyScale', 'valueScale'], 1, [4, 5, 19], [0, 1, 2])
})

test('the async API does not block the event loop', async (t) => {
  const shape = { layers: 1, blocks: 1024, blockBytes: 64 * 1024 }
  const decode = await startDecode(shape, { options: transport })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  const comm = prefillFor(src, shape)
  t.teardown(() => comm.close())
  await comm.connectAsync(HOST, decode.port)
  const ids = Array.from({ length: shape.blocks }, (_, i) => i)
  const order = []
  const write = comm.writeCacheAsync(HOST, decode.port, ids, ids.slice().reverse(), 0).then(() => order.push('written'))
  setImmediate(() => order.push('event loop ran'))
  await write
  t.deepEqual(order, ['event loop ran', 'written'])
  await expectLanded(t, decode, src, ['key'], 0, ids.slice(0, 8), ids.slice().reverse().slice(0, 8))
})
