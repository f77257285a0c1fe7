// What only the RDMA transport does: device selection, the flush read, negotiation with auto, rebuilding a
// broken queue pair. Needs an RDMA device (KVTRANSFER_TEST_RDMA_NIC); `npm run test:rdma` runs it inside a
// Soft-RoCE VM. Elsewhere the device-free checks run and the rest skip, saying so.
import test from 'ava'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { RDMACommunicator, KVTransferError, rdmaDevices } from 'kvtransfer'
import { makeCache } from './helpers/cache.mjs'
import { startDecode } from './helpers/peer.mjs'
import { scratchDir } from './helpers/scratch.mjs'
import { transportOptions } from './helpers/transport.mjs'

const HOST = '127.0.0.1'
const NIC = process.env.KVTRANSFER_TEST_RDMA_NIC
const rdmaTest = NIC ? test : test.skip
if (!NIC) console.log('SKIPPED rdma.test.mjs device tests: no RDMA device given (set KVTRANSFER_TEST_RDMA_NIC, or run `npm run test:rdma`)')

const shape = { layers: 3, blocks: 64, blockBytes: 2048 }

function prefill(cache, options = {}, gpuIdx = 0) {
  return new RDMACommunicator('prefill', gpuIdx, 0, cache.keyPtrs, cache.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, {
    ...transportOptions,
    ...options,
  })
}

async function expectLanded(t, decode, src, layer, local, remote) {
  for (const tensor of ['key', 'value']) {
    t.deepEqual(await decode.blockHashes(tensor, layer, remote), local.map((id) => src.blockHash(tensor, layer, id)), `${tensor} of layer ${layer}`)
  }
}

test('rdmaDevices lists devices or says why it cannot', (t) => {
  let devices
  try {
    devices = rdmaDevices()
  } catch (err) {
    t.true(err instanceof KVTransferError)
    t.is(err.code, 'UNAVAILABLE')
    return
  }
  t.true(Array.isArray(devices))
  if (NIC) {
    const dev = devices.find((d) => d.name === NIC)
    t.truthy(dev, `${NIC} is listed`)
    t.is(dev.ports[0].state, 'ACTIVE')
    t.true(dev.ports[0].gids.some((g) => g.index === transportOptions.gidIndex))
  }
})

test('transport rdma without a usable device is a clear error; auto falls back to TCP and logs why', (t) => {
  const src = makeCache(shape)
  const err = t.throws(() => prefill(src, { transport: 'rdma', rdmaNics: 'no-such-nic', errorFile: '/dev/null' }))
  t.is(err.code, 'UNAVAILABLE')
  t.regex(err.message, /KVCACHE_TRANSPORT=rdma/)
  const dir = scratchDir(t)
  const debugFile = join(dir, 'debug.log')
  const auto = prefill(src, { transport: 'auto', rdmaNics: 'no-such-nic', debug: true, debugFile })
  t.is(auto.transport, 'shm', 'same-host peers first')
  t.is(auto.rdmaDevice, null)
  auto.close()
  t.regex(readFileSync(debugFile, 'utf8'), /transport auto: RDMA is not usable .*no-such-nic.*using shm and tcp/)
})

rdmaTest('with the flush read on, every layer lands (the read itself is checked by the Rust RDMA tests)', async (t) => {
  const decode = await startDecode(shape, { options: transportOptions })
  t.teardown(decode.stop)
  t.is(decode.transport, 'rdma')
  const src = makeCache(shape)
  const comm = prefill(src, { gdrcopyFlushEnable: true })
  t.teardown(() => comm.close())
  t.is(comm.transport, 'rdma')
  t.is(comm.rdmaDevice, NIC)
  await comm.connectAsync(HOST, decode.port)
  const local = [63, 0, 7, 8, 9, 31]
  const remote = [1, 2, 40, 41, 42, 63]
  for (let layer = 0; layer < shape.layers; layer++) {
    await comm.writeCacheAsync(HOST, decode.port, local, remote, layer)
  }
  for (let layer = 0; layer < shape.layers; layer++) await expectLanded(t, decode, src, layer, local, remote)
})

rdmaTest('the NIC is KVCACHE_RDMA_NICS[gpuIdx % n]', async (t) => {
  const decode = await startDecode(shape, { options: transportOptions })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  // Both ends must share the device under test: GPU 1 of ["other", NIC] and GPU 3 both pick NIC.
  for (const gpuIdx of [1, 3]) {
    const comm = prefill(src, { rdmaNics: ['no-such-nic', NIC] }, gpuIdx)
    t.is(comm.rdmaDevice, NIC)
    t.true(comm.connect(HOST, decode.port), comm.lastError?.message)
    t.is(comm.writeCache(HOST, decode.port, [gpuIdx], [gpuIdx + 10], 1), 0, comm.lastError?.message)
    await expectLanded(t, decode, src, 1, [gpuIdx], [gpuIdx + 10])
    comm.close()
  }
  t.throws(() => prefill(src, { rdmaNics: ['no-such-nic', NIC], errorFile: '/dev/null' }, 2), { message: /"no-such-nic"/ })
})

rdmaTest('auto on one host takes shm; an RDMA prefill and a TCP-only prefill reach the same decode their way', async (t) => {
  const auto = { ...transportOptions, transport: 'auto' }
  const decode = await startDecode(shape, { options: auto })
  t.teardown(decode.stop)
  t.is(decode.transport, 'shm')
  const src = makeCache(shape)
  const a = prefill(src, auto)
  const r = prefill(src, transportOptions)
  const b = prefill(src, { transport: 'tcp' })
  t.teardown(() => (a.close(), r.close(), b.close()))
  t.is(a.transport, 'shm')
  t.is(a.rdmaDevice, NIC, 'auto opened the NIC too, for peers on other hosts')
  for (const c of [a, r, b]) await c.connectAsync(HOST, decode.port)
  t.deepEqual([a, r, b].map((c) => c.connectedTransport(HOST, decode.port)), ['shm', 'rdma', 'tcp'])
  await a.writeCacheAsync(HOST, decode.port, [1, 2], [3, 4], 0)
  await r.writeCacheAsync(HOST, decode.port, [9, 10], [11, 12], 0)
  await b.writeCacheAsync(HOST, decode.port, [5, 6], [7, 8], 0)
  await expectLanded(t, decode, src, 0, [1, 2, 9, 10, 5, 6], [3, 4, 11, 12, 7, 8])
})

rdmaTest('a broken queue pair is rebuilt for the next call', async (t) => {
  const first = await startDecode(shape, { options: transportOptions })
  const port = first.port
  const src = makeCache(shape)
  const comm = prefill(src, { errorFile: '/dev/null' })
  t.teardown(() => comm.close())
  await comm.connectAsync(HOST, port)
  await comm.writeCacheAsync(HOST, port, [0], [0], 0)
  await first.stop()
  const err = await t.throwsAsync(comm.writeCacheAsync(HOST, port, [1], [1], 0))
  // The decode's process ended: the write found its queue pair broken (TRANSPORT, TIMEOUT), or found the link
  // ended and tried to reconnect by the policy, where nothing listens any more (UNREACHABLE).
  t.true(['TRANSPORT', 'TIMEOUT', 'UNREACHABLE'].includes(err.code), err.message)
  t.false(comm.isConnected(HOST, port))
  const second = await startDecode(shape, { options: transportOptions, port })
  t.teardown(second.stop)
  // Connecting again rebuilds the queue pair (or makes a new peer, where the policy had given up on the old).
  await comm.connectAsync(HOST, port)
  await comm.writeCacheAsync(HOST, port, [2, 3], [5, 6], 2)
  t.true(comm.isConnected(HOST, port))
  await expectLanded(t, second, src, 2, [2, 3], [5, 6])
})
