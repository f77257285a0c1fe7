// Requests over the transport under test: notifications that never come before their bytes (each checked by hash
// the moment it arrives, with blocks reused across requests), waits per layer, many requests at once, abort, a
// prefill process killed in the middle of a request, revocation with a writer still running, and refusals.
import test from 'ava'
import { fork, spawnSync } from 'node:child_process'
import { createRequire } from 'node:module'
import { fileURLToPath } from 'node:url'
import { Communicator, KVTransferError, RDMACommunicator } from 'kvtransfer'
import { makeCache } from './helpers/cache.mjs'
import { pair } from './helpers/pair.mjs'
import { transportOptions } from './helpers/transport.mjs'

const HOST = '127.0.0.1'
const require = createRequire(import.meta.url)


const same = (src, dst, layer, local, remote) =>
  ['key', 'value'].every((t) => local.every((l, i) => src.blockHash(t, layer, l) === dst.blockHash(t, layer, remote[i])))

test('a notification never comes before its bytes, and waitFor sees each layer', async (t) => {
  const shape = { layers: 2, blocks: 256, blockBytes: 4096 }
  const { src, dst, decode, prefill } = pair(t, shape, { ...shape, blocks: 64 })
  const peer = await prefill.connect(HOST, decode.port)
  // Every request writes other source blocks into the same 32 decode blocks.
  const remote = Array.from({ length: 32 }, (_, i) => (i * 5) % 64)
  const localOf = (k) => Array.from({ length: 32 }, (_, i) => (k * 32 + i * 3) % 256)
  const seen = []
  const reader = (async () => {
    for await (const n of decode.notifications()) {
      // Checked the moment it is handed over, before the next write starts.
      const k = Number(n.requestId.slice(4))
      seen.push({ ...n, intact: same(src, dst, n.layerIdx, localOf(k), n.blockIds) })
      if (seen.length === 16) return
    }
  })()
  for (let k = 0; k < 8; k++) {
    for (let layer = 0; layer < 2; layer++) {
      await peer.write(localOf(k), remote, layer, { requestId: `req-${k}` })
      await decode.waitFor(`req-${k}`, { layers: [layer], timeoutMs: 10_000 })
      await new Promise((r) => setImmediate(r))
    }
    await decode.waitFor(`req-${k}`)
  }
  await reader
  t.is(seen.length, 16)
  for (const n of seen) {
    t.true(n.intact, `${n.requestId} layer ${n.layerIdx} was notified before its bytes`)
    t.is(n.status, 'done')
    t.deepEqual(n.blockIds, remote)
    t.regex(n.peer, /prefill tp 0\/1 at 127\.0\.0\.1/)
  }
  t.deepEqual(
    seen.map((n) => `${n.requestId}/${n.layerIdx}`),
    Array.from({ length: 16 }, (_, i) => `req-${i >> 1}/${i & 1}`),
    'in the order of the writes',
  )
})

test('many requests in flight at once, through both APIs', async (t) => {
  const shape = { layers: 3, blocks: 128, blockBytes: 1024 }
  const src = makeCache(shape)
  const dst = makeCache(shape)
  const decode = new RDMACommunicator('decode', 0, 0, dst.keyPtrs, dst.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, transportOptions)
  const prefill = new RDMACommunicator('prefill', 0, 0, src.keyPtrs, src.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, transportOptions)
  t.teardown(async () => {
    await prefill.close()
    await decode.close()
    src.free()
    dst.free()
  })
  t.true(prefill.connect(HOST, decode.port))
  const writes = []
  for (let k = 0; k < 32; k++) {
    for (let layer = 0; layer < 3; layer++) {
      writes.push(prefill.writeCacheAsync(HOST, decode.port, [k * 2, k * 2 + 1], [64 + k * 2, 65 + k * 2], layer, { requestId: `many-${k}` }))
    }
  }
  await Promise.all([...writes, ...Array.from({ length: 32 }, (_, k) => decode.waitFor(`many-${k}`, { timeoutMs: 10_000 }))])
  for (let layer = 0; layer < 3; layer++) {
    t.true(same(src, dst, layer, [...Array(64).keys()], [...Array(64).keys()].map((b) => 64 + b)))
  }
  // The seed API's writeCache is unchanged and says nothing.
  t.is(prefill.writeCache(HOST, decode.port, [1], [1], 0), 0)
})

test('abort reaches the waiting decode, and later writes of the request are refused', async (t) => {
  const shape = { layers: 2, blocks: 16, blockBytes: 1024 }
  const { decode, prefill } = pair(t, shape)
  const peer = await prefill.connect(HOST, decode.port)
  const events = decode.notifications()
  await peer.write([1], [2], 0, { requestId: 'doomed' })
  const waiting = decode.waitFor('doomed')
  await prefill.abortRequest(HOST, decode.port, 'doomed', 'client disconnected')
  const err = await t.throwsAsync(waiting, { instanceOf: KVTransferError })
  t.is(err.code, 'ABORTED')
  t.regex(err.message, /client disconnected/)
  t.is((await t.throwsAsync(peer.write([1], [2], 1, { requestId: 'doomed' }))).code, 'ABORTED')
  t.deepEqual((await events.next()).value.status, 'done')
  const aborted = (await events.next()).value
  t.like(aborted, { requestId: 'doomed', status: 'aborted', layerIdx: null, blockIds: [] })
  t.regex(aborted.reason, /client disconnected/)
})

test('a request belongs to the prefill instance that started it: another prefill can neither complete nor abort it', async (t) => {
  const shape = { layers: 2, blocks: 16, blockBytes: 1024 }
  const { src, dst, decode, prefill } = pair(t, shape)
  const cacheOpts = { keyPtrs: src.keyPtrs, valuePtrs: src.valuePtrs, blockNumber: shape.blocks, blockBytes: shape.blockBytes }
  // A second engine: its own instance id (the same token, were there one).
  const other = Communicator.prefill({ ...cacheOpts, ...transportOptions, instanceId: 'engine-b' })
  t.teardown(() => other.close())
  const peer = await prefill.connect(HOST, decode.port)
  const stranger = await other.connect(HOST, decode.port)
  await peer.write([1], [2], 0, { requestId: 'mine' })
  await decode.waitFor('mine', { layers: [0], timeoutMs: 10_000 })
  await stranger.write([3], [4], 1, { requestId: 'mine' })
  await other.abortRequest(HOST, decode.port, 'mine', 'hijacked')
  const err = await t.throwsAsync(decode.waitFor('mine', { timeoutMs: 500 }))
  t.is(err.code, 'TIMEOUT', 'neither complete nor aborted')
  await peer.write([5], [6], 1, { requestId: 'mine' })
  await decode.waitFor('mine', { timeoutMs: 10_000 })
  t.is(dst.blockHash('key', 1, 6), src.blockHash('key', 1, 5))
  // The stranger's own requests are served as before.
  await stranger.write([7], [8], 0, { requestId: 'theirs' })
  await decode.waitFor('theirs', { layers: [0], timeoutMs: 10_000 })
})

test('a request that makes no progress for requestTtlMs ends expired', async (t) => {
  const shape = { layers: 2, blocks: 16, blockBytes: 1024 }
  const src = makeCache(shape)
  const dst = makeCache(shape)
  const cacheOf = (c) => ({ keyPtrs: c.keyPtrs, valuePtrs: c.valuePtrs, blockNumber: shape.blocks, blockBytes: shape.blockBytes })
  const decode = Communicator.decode({ ...cacheOf(dst), ...transportOptions, requestTtlMs: 1000 })
  const prefill = Communicator.prefill({ ...cacheOf(src), ...transportOptions, instanceId: 'engine-a' })
  t.teardown(async () => {
    await prefill.close()
    await decode.close()
    src.free()
    dst.free()
  })
  t.is(t.throws(() => Communicator.decode({ ...cacheOf(dst), requestTtlMs: 10 })).code, 'CONFIG')
  const events = decode.notifications()
  const peer = await prefill.connect(HOST, decode.port)
  // Measured from before the write: the decode may take the layer (and start the clock) well before the
  // write's promise resolves here, on a slow machine.
  const started = Date.now()
  await peer.write([1], [2], 0, { requestId: 'stalled' })
  const err = await t.throwsAsync(decode.waitFor('stalled', { timeoutMs: 10_000 }))
  t.is(err.code, 'EXPIRED')
  t.regex(err.message, /KVCACHE_REQUEST_TTL_MS/)
  t.true(Date.now() - started >= 900, `expired after ${Date.now() - started} ms`)
  t.is((await events.next()).value.status, 'done')
  t.like((await events.next()).value, { requestId: 'stalled', status: 'expired', layerIdx: null })
})

test('a prefill process killed in the middle of a request fails the wait within seconds', async (t) => {
  const shape = { layers: 2, blocks: 16, blockBytes: 1024 }
  const dst = makeCache(shape)
  const decode = Communicator.decode({ keyPtrs: dst.keyPtrs, valuePtrs: dst.valuePtrs, blockNumber: 16, blockBytes: 1024, ...transportOptions })
  t.teardown(async () => {
    await decode.close()
    dst.free()
  })
  const child = fork(fileURLToPath(new URL('./helpers/prefill-peer.mjs', import.meta.url)), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  t.teardown(() => child.kill('SIGKILL'))
  const written = new Promise((resolve) => child.once('message', resolve))
  child.send({ port: decode.port, shape, options: transportOptions, requestId: 'orphan' })
  await written
  await decode.waitFor('orphan', { layers: [0], timeoutMs: 10_000 })
  const started = Date.now()
  const waiting = decode.waitFor('orphan', { timeoutMs: 60_000 })
  child.kill('SIGKILL')
  const err = await t.throwsAsync(waiting, { instanceOf: KVTransferError })
  t.is(err.code, 'TRANSPORT', err.message)
  t.true(Date.now() - started < 5000, `took ${Date.now() - started} ms`)
})

test('after revoke resolves nothing of the request lands, and its writer sees REVOKED', async (t) => {
  const shape = { layers: 1, blocks: 128, blockBytes: 64 * 1024 }
  const { dst, decode, prefill } = pair(t, shape, { ...shape, blocks: 64 })
  const peer = await prefill.connect(HOST, decode.port)
  const remote = [...Array(64).keys()]
  let writes = 0
  const writer = (async () => {
    for (;;) {
      // Alternate the source blocks so that every write changes the bytes.
      await peer.write(remote.map((b) => b + 64 * (writes % 2)), remote, 0, { requestId: 'stale' })
      writes++
    }
  })()
  while (writes < 3) await new Promise((r) => setTimeout(r, 5))
  await decode.revoke('stale')
  const last = Buffer.from(dst.block('value', 0, 63))
  const after = dst.digest()
  const err = await t.throwsAsync(writer, { instanceOf: KVTransferError })
  t.is(err.code, 'REVOKED')
  await new Promise((r) => setTimeout(r, 200))
  t.true(last.equals(dst.block('value', 0, 63)) && dst.digest() === after, 'bytes changed after revoke resolved')
  t.is((await t.throwsAsync(decode.waitFor('stale'))).code, 'REVOKED')
  // Other requests go on.
  await peer.write([1], [1], 0, { requestId: 'fresh' })
  await decode.waitFor('fresh', { timeoutMs: 10_000 })
})

test('bad options, signals and timeouts are clear errors', async (t) => {
  const shape = { layers: 2, blocks: 16, blockBytes: 1024 }
  const { decode, prefill } = pair(t, shape)
  const peer = await prefill.connect(HOST, decode.port)
  const code = async (p) => (await t.throwsAsync(p, { instanceOf: KVTransferError })).code
  t.is(await code(peer.write([1], [1], 0, { requestId: '' })), 'INVALID_ARGUMENT')
  t.is(await code(peer.write([1], [1], 0, { requestId: 'x'.repeat(257) })), 'INVALID_ARGUMENT')
  t.is(await code(peer.write([1], [1], 0, { requestId: 7 })), 'INVALID_ARGUMENT')
  t.is(await code(peer.write([1], [1], 0, { request: 'x' })), 'CONFIG')
  t.is(await code(peer.write([1], [1], 0, { timeoutMs: -1 })), 'INVALID_ARGUMENT')
  t.is(await code(peer.write([1], [1], 0, { signal: AbortSignal.abort() })), 'ABORTED')
  t.is(await code(decode.waitFor('never', { timeoutMs: 50 })), 'TIMEOUT')
  const controller = new AbortController()
  const waiting = decode.waitFor('never')
  const aborting = decode.waitFor('never', { signal: controller.signal })
  controller.abort()
  t.is(await code(aborting), 'ABORTED')
  t.is(await code(decode.waitFor('never', { layers: [5] })), 'INVALID_ARGUMENT')
  t.is(await code(decode.waitFor('never', { layers: 'all' })), 'INVALID_ARGUMENT')
  t.is(await code(decode.revoke('')), 'INVALID_ARGUMENT')
  t.is(await code(prefill.abortRequest(HOST, 1, 'x')), 'NOT_CONNECTED')
  // A close settles the waits still pending.
  decode.close()
  t.is(await code(waiting), 'CLOSED')
})

test('a write waiting behind others is cancelled at once by its timeout or signal, and moves nothing', async (t) => {
  const shape = { layers: 2, blocks: 16, blockBytes: 1 << 20 }
  const { src, dst, decode, prefill } = pair(t, shape)
  const peer = await prefill.connect(HOST, decode.port)
  const all = [...Array(16).keys()]
  const before = dst.blockHash('key', 1, 3)
  const busy = Array.from({ length: 8 }, () => peer.write(all, all, 0))
  const started = Date.now()
  const timedOut = await t.throwsAsync(peer.write([3], [3], 1, { timeoutMs: 1, requestId: 'late' }), { instanceOf: KVTransferError })
  t.is(timedOut.code, 'TIMEOUT')
  const controller = new AbortController()
  const aborted = peer.write([3], [3], 1, { signal: controller.signal })
  controller.abort()
  t.is((await t.throwsAsync(aborted, { instanceOf: KVTransferError })).code, 'ABORTED')
  const waited = Date.now() - started
  await Promise.all(busy)
  t.true(waited < Date.now() - started, 'both rejected before the writes ahead of them were done')
  t.is(dst.blockHash('key', 1, 3), before, 'the cancelled writes moved nothing')
  t.not(dst.blockHash('key', 1, 3), src.blockHash('key', 1, 3))
  t.is((await t.throwsAsync(decode.waitFor('late', { timeoutMs: 200 }))).code, 'TIMEOUT', 'and told the decode nothing')
})

test('each role has only its own methods, and a wrong-role call does not type-check', (t) => {
  const shape = { layers: 1, blocks: 4, blockBytes: 1024 }
  const { prefill, decode } = pair(t, shape)
  for (const name of ['notifications', 'waitFor', 'revoke', 'port']) t.is(prefill[name], undefined, `prefill.${name}`)
  for (const name of ['connect', 'peer', 'abortRequest']) t.is(decode[name], undefined, `decode.${name}`)
  // __test__/types/roles.ts calls each method on the wrong role under @ts-expect-error: it compiles only if each
  // such call is an error.
  const tsc = spawnSync(process.execPath, [require.resolve('typescript/bin/tsc'), '-p', fileURLToPath(new URL('./types/tsconfig.json', import.meta.url))], { encoding: 'utf8' })
  t.is(tsc.status, 0, tsc.stdout + tsc.stderr)
})
