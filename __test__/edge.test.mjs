// The edge where a Node program meets the library: memory it holds, a close that never blocks the event loop
// and says what it could not stop, and notifications that every consumer sees.
import test from 'ava'
import { fork } from 'node:child_process'
import { setImmediate as tick } from 'node:timers/promises'
import { fileURLToPath } from 'node:url'
import v8 from 'node:v8'
import vm from 'node:vm'
import { Communicator, HostBuffer, KVTransferError, RDMACommunicator } from 'kvtransfer'
import { makeCache } from './helpers/cache.mjs'
import { pair } from './helpers/pair.mjs'
import { transportOptions } from './helpers/transport.mjs'

const HOST = '127.0.0.1'
v8.setFlagsFromString('--expose-gc')
const gc = vm.runInNewContext('gc')


/** Collects what JavaScript let go of, and lets the finalisers run. */
async function collect() {
  for (let i = 0; i < 4; i++) {
    gc()
    await tick()
  }
}

test.serial('memory handed over by address is held: nothing but the cache is ever written', async (t) => {
  const blocks = 16
  const blockBytes = 64 << 10
  const bytes = blocks * blockBytes
  // The pattern of the seed API and of many scripts: the decode's HostBuffers are not kept, only their addresses.
  const decode = Communicator.decode({ keyPtrs: [HostBuffer.alloc(bytes).ptr], valuePtrs: [HostBuffer.alloc(bytes).ptr], blockNumber: blocks, blockBytes, ...transportOptions })
  t.teardown(() => decode.close())
  await collect()
  // New memory of the same size, where the cache's would be reused had it been given back.
  const victims = Array.from({ length: 32 }, () => HostBuffer.alloc(bytes))
  const src = [HostBuffer.alloc(bytes), HostBuffer.alloc(bytes)]
  for (const s of src) s.buffer.fill(0x5a)
  // The prefill's cache as objects it holds: not kept here either.
  const prefill = Communicator.prefill({ keys: [src[0]], values: [src[1]], blockNumber: blocks, blockBytes, ...transportOptions })
  t.teardown(() => prefill.close())
  src.length = 0
  await collect()
  const peer = await prefill.connect(HOST, decode.port)
  const all = [...Array(blocks).keys()]
  for (let i = 0; i < 3; i++) await peer.write(all, all, 0)
  const hit = victims.filter((v) => v.buffer.includes(0x5a)).length
  t.is(hit, 0, `${hit} unrelated buffers were written into`)
})

test.serial('a HostBuffer an open communicator uses cannot be freed; after close it can', async (t) => {
  const shape = { blockNumber: 4, blockBytes: 256 }
  const [a, b] = [HostBuffer.alloc(1024), HostBuffer.alloc(1024)]
  const decode = Communicator.decode({ keys: [a], ...shape, ...transportOptions })
  const seed = new RDMACommunicator('decode', 0, 0, [b.ptr], [], shape.blockNumber, shape.blockBytes, 1, 0, transportOptions)
  for (const hb of [a, b]) {
    const err = t.throws(() => hb.free(), { instanceOf: KVTransferError })
    t.is(err.code, 'IN_USE')
    t.false(hb.freed)
    t.is(hb.buffer.length, 1024, 'still readable')
  }
  await decode.close()
  seed.close()
  a.free()
  b.free()
  t.true(a.freed && b.freed)
  // Memory too small for the cache, or freed, is refused before anything listens.
  const small = t.throws(() => Communicator.decode({ keys: [Buffer.alloc(512)], ...shape, ...transportOptions }))
  t.regex(small.message, /keys\[0\] has 512 bytes; the cache needs 1024/)
  t.regex(t.throws(() => Communicator.decode({ keys: [a], ...shape, ...transportOptions })).message, /freed/)
  const c = HostBuffer.alloc(1024)
  const past = t.throws(() => new RDMACommunicator('decode', 0, 0, [c.ptr + 512n], [], shape.blockNumber, shape.blockBytes, 1, 0, transportOptions))
  t.regex(past.message, /runs 512 bytes past the end of its HostBuffer/)
  t.regex(t.throws(() => Communicator.decode({ keys: [c], keyPtrs: [c.ptr], ...shape })).message, /not both/)
  c.free()
})

test.serial('close never blocks the event loop, and says which links it could not stop', async (t) => {
  const shape = { layers: 1, blocks: 16, blockBytes: 1024 }
  const dst = makeCache(shape)
  const decode = Communicator.decode({ keyPtrs: dst.keyPtrs, valuePtrs: dst.valuePtrs, blockNumber: 16, blockBytes: 1024, ...transportOptions, confirmTimeoutMs: 1000 })
  const child = fork(fileURLToPath(new URL('./helpers/prefill-peer.mjs', import.meta.url)), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  t.teardown(() => child.kill('SIGKILL'))
  const written = new Promise((resolve) => child.once('message', resolve))
  child.send({ port: decode.port, shape, options: transportOptions, requestId: 'r' })
  await written
  // The prefill process stops answering (frozen, not gone).
  child.kill('SIGSTOP')
  let longest = 0
  let last = performance.now()
  const ticker = setInterval(() => {
    longest = Math.max(longest, performance.now() - last)
    last = performance.now()
  }, 5)
  const started = performance.now()
  const closing = decode.close()
  const err = await closing.then(() => null, (e) => e)
  clearInterval(ticker)
  const took = performance.now() - started
  t.log(`close took ${took.toFixed(0)} ms; the event loop's longest gap meanwhile ${longest.toFixed(1)} ms`)
  t.true(took >= 900, `close waited ${took.toFixed(0)} ms for the frozen link`)
  t.true(longest < 200, `the event loop stalled for ${longest.toFixed(1)} ms`)
  if (decode.transport === 'shm') {
    // A same-host link that neither confirms nor can be cut off: the promise says so.
    t.true(err instanceof KVTransferError, String(err))
    t.is(err.code, 'TIMEOUT')
    t.regex(err.message, /prefill tp 0\/1 .*\(shm\)/)
  } else {
    t.is(err, null, 'a TCP or RDMA link is cut off')
  }
  t.is(decode.close(), closing, 'closing again is the same promise')
  child.kill('SIGKILL')
  await (await import('node:events')).once(child, 'exit')
  if (err === null) {
    dst.free()
  } else {
    // The link it could not stop might still write there: that memory is never given back.
    t.is(t.throws(() => dst.free()).code, 'IN_USE')
  }
})

test('every consumer sees every notification, from its creation on', async (t) => {
  const shape = { layers: 2, blocks: 8, blockBytes: 1024 }
  const { src, dst, decode, prefill } = pair(t, shape)
  const a = decode.notifications()
  const b = decode.notifications()
  // A consumer nothing references but its own loop, waiting: collection does not stop it.
  const seen = []
  ;(async () => {
    for await (const n of decode.notifications()) seen.push(n.requestId)
  })()
  await collect()
  const peer = await prefill.connect(HOST, decode.port)
  for (let i = 0; i < 6; i++) await peer.write([i], [i], 0, { requestId: `r${i}` })
  const take = async (it, n) => {
    const got = []
    for (let i = 0; i < n; i++) {
      const { value } = await it.next()
      if (!Object.isFrozen(value)) throw new Error('a notification every consumer shares must be frozen')
      got.push(value.requestId)
    }
    return got
  }
  const all = ['r0', 'r1', 'r2', 'r3', 'r4', 'r5']
  t.deepEqual(await take(a, 6), all)
  t.deepEqual(await take(b, 6), all)
  t.deepEqual(seen, all, 'the unreferenced consumer saw them all')
  // One that leaves (break) does not take anything from the others; one made later sees what comes later.
  await b.return()
  const c = decode.notifications()
  await peer.write([7], [7], 1, { requestId: 'r7' })
  t.deepEqual(await take(a, 1), ['r7'])
  t.deepEqual(await take(c, 1), ['r7'])
  t.true((await b.next()).done)
  // Closing ends them all.
  await decode.close()
  t.true((await a.next()).done)
  t.true((await c.next()).done)
})

test('a decode lists its peers; Peer.close() ends one, and the decode sees it go', async (t) => {
  const shape = { layers: 1, blocks: 8, blockBytes: 1024 }
  const { src, dst, decode, prefill } = pair(t, shape)
  t.deepEqual(decode.peers(), [])
  const peer = await prefill.connect(HOST, decode.port)
  const listed = decode.peers()
  t.is(listed.length, 1)
  t.regex(listed[0].name, /^prefill tp 0\/1 at 127\.0\.0\.1$/)
  t.is(listed[0].transport, peer.transport)
  await peer.close()
  t.false(peer.connected)
  const deadline = Date.now() + 5000
  while (decode.peers().length > 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20))
  t.deepEqual(decode.peers(), [], 'the decode saw the link go')
  t.is((await t.throwsAsync(peer.write([0], [0], 0))).code, 'NOT_CONNECTED')
  t.is((await t.throwsAsync(peer.close())).code, 'NOT_CONNECTED')
  // A new connection works as before.
  const again = await prefill.connect(HOST, decode.port)
  await again.write([1], [1], 0)
  t.is(dst.blockHash('key', 0, 1), src.blockHash('key', 0, 1))
  t.is(decode.peers().length, 1)
})

test('a peer that goes and comes back is told as events, and the next write reconnects by the policy', async (t) => {
  const shape = { layers: 1, blocks: 8, blockBytes: 1024 }
  const src = makeCache(shape)
  const [first, second] = [makeCache(shape), makeCache(shape)]
  const cacheOf = (c) => ({ keyPtrs: c.keyPtrs, valuePtrs: c.valuePtrs, blockNumber: shape.blocks, blockBytes: shape.blockBytes, ...transportOptions })
  const decode = Communicator.decode(cacheOf(first))
  const port = decode.port
  const prefill = Communicator.prefill({ ...cacheOf(src), reconnect: { retries: 30, backoffMs: 20 } })
  let back
  t.teardown(async () => {
    await prefill.close()
    await decode.close()
    await back?.close()
    for (const c of [src, first, second]) c.free()
  })
  const told = []
  for (const kind of ['connected', 'disconnected', 'reconnecting']) prefill.on(kind, (e) => told.push({ kind, ...e }))
  // Events come on the event loop, in order among themselves, but not in step with the calls' promises.
  const connected = new Promise((resolve) => prefill.once('connected', resolve))
  const reconnected = new Promise((resolve) => prefill.on('connected', (e) => e.reconnected && resolve(e)))
  const peer = await prefill.connect(HOST, port)
  await connected
  await peer.write([0], [0], 0)
  const gone = new Promise((resolve) => prefill.once('disconnected', resolve))
  await decode.close()
  // Told without a call: the request channel saw the decode go.
  const { cause } = await gone
  t.true(cause instanceof KVTransferError)
  t.is(cause.peer, `${HOST}:${port}`)
  t.regex(cause.message, /the connection to 127\.0\.0\.1:\d+ ended/)
  // The decode comes back on the same port while the next write tries again: that write lands.
  setTimeout(() => {
    back = Communicator.decode({ ...cacheOf(second), port })
  }, 300)
  await peer.write([2, 3], [5, 6], 0)
  t.is(second.blockHash('key', 0, 6), src.blockHash('key', 0, 3))
  await reconnected
  const kinds = told.map((e) => (e.kind === 'connected' ? `connected${e.reconnected ? ' again' : ''}` : e.kind))
  t.is(kinds[0], 'connected')
  t.is(kinds[1], 'disconnected')
  t.is(kinds.at(-1), 'connected again', kinds.join(', '))
  const attempts = told.filter((e) => e.kind === 'reconnecting')
  t.true(attempts.length >= 2, kinds.join(', '))
  t.deepEqual([attempts[0].attempt, attempts[0].attempts], [1, 31])
  t.is(attempts[1].cause.code, 'UNREACHABLE', 'while nothing listened there')
  t.is(told.at(-1).transport, peer.transport)
})

test('an address where nothing listens is UNREACHABLE at once, naming it; the policy is checked', async (t) => {
  const { createServer } = await import('node:net')
  const server = createServer().listen(0, HOST)
  await new Promise((r) => server.once('listening', r))
  const port = server.address().port
  await new Promise((r) => server.close(r))
  const shape = { layers: 1, blocks: 4, blockBytes: 256 }
  const src = makeCache(shape)
  const options = { keyPtrs: src.keyPtrs, blockNumber: 4, blockBytes: 256, ...transportOptions }
  const prefill = Communicator.prefill({ ...options, reconnect: { retries: 0 } })
  t.teardown(async () => {
    await prefill.close()
    src.free()
  })
  const started = Date.now()
  const err = await t.throwsAsync(prefill.connect(HOST, port), { instanceOf: KVTransferError })
  t.is(err.code, 'UNREACHABLE')
  t.is(err.peer, `${HOST}:${port}`)
  t.regex(err.message, new RegExp(`127\\.0\\.0\\.1:${port}.*refused`))
  t.true(Date.now() - started < 2000, `${Date.now() - started} ms`)
  const config = (reconnect) => t.throws(() => Communicator.prefill({ ...options, reconnect }), { instanceOf: KVTransferError })
  t.regex(config({ retries: 101 }).message, /KVCACHE_RECONNECT_RETRIES \(option reconnect\.retries\)=101/)
  t.regex(config({ backoffMs: '5' }).message, /option reconnect\.backoffMs must be a number/)
  t.regex(config({ tries: 1 }).message, /unknown option reconnect\.tries/)
  t.regex(config(3).message, /option reconnect must be an object/)
})

test('a signal stops the wait of connect, revoke and close; what they started goes on', async (t) => {
  const shape = { layers: 1, blocks: 8, blockBytes: 1024 }
  const { decode, prefill } = pair(t, shape)
  const aborted = AbortSignal.abort()
  const err = await t.throwsAsync(prefill.connect(HOST, decode.port, { signal: aborted }))
  t.is(err.code, 'ABORTED')
  t.false(prefill.peer(HOST, decode.port).connected, 'an aborted connect made no connection')
  t.is((await t.throwsAsync(decode.revoke('r1', { signal: aborted }))).code, 'ABORTED')
  const peer = await prefill.connect(HOST, decode.port, { signal: new AbortController().signal })
  t.true(peer.connected)
  // Aborted before it started, the revoke did nothing: the request's writes land.
  await peer.write([0], [0], 0, { requestId: 'r1' })
  // Aborted while it waits, it is revoked all the same: its writes are refused.
  const later = new AbortController()
  const revoking = decode.revoke('r1', { signal: later.signal })
  later.abort()
  t.is((await t.throwsAsync(revoking)).code, 'ABORTED')
  let refused
  for (const until = Date.now() + 5000; refused === undefined && Date.now() < until; ) {
    refused = await peer.write([0], [0], 0, { requestId: 'r1' }).then(() => undefined, (err) => err)
  }
  t.is(refused?.code, 'REVOKED', 'the revoke went on')
  // A connect queued behind another to the same peer (one that tries for a while) is cancelled at once.
  const { createServer } = await import('node:net')
  const server = createServer().listen(0, HOST)
  await new Promise((r) => server.once('listening', r))
  const nobody = server.address().port
  await new Promise((r) => server.close(r))
  const slow = prefill.connect(HOST, nobody)
  const queued = new AbortController()
  const behind = prefill.connect(HOST, nobody, { signal: queued.signal })
  const started = Date.now()
  queued.abort()
  const cancelled = await t.throwsAsync(behind)
  t.is(cancelled.code, 'ABORTED')
  t.regex(cancelled.message, /before it started: no connection was made/)
  t.true(Date.now() - started < 300, `${Date.now() - started} ms`)
  t.is((await t.throwsAsync(slow)).code, 'UNREACHABLE')
  t.is((await t.throwsAsync(peer.abort('r2', 'no', { signal: aborted }))).code, 'ABORTED')
  t.is((await t.throwsAsync(peer.close({ signal: aborted }))).code, 'ABORTED')
  t.true(peer.connected, 'a peer close aborted before it started does nothing')
  await peer.write([1], [1], 0, { requestId: 'r2' })
  t.is((await t.throwsAsync(prefill.close({ signal: aborted }))).code, 'ABORTED')
  t.true(peer.connected, 'a close aborted before it started does nothing')
  const stopping = new AbortController()
  const closing = prefill.close({ signal: stopping.signal })
  stopping.abort()
  t.is((await t.throwsAsync(closing)).code, 'ABORTED')
  await prefill.close()
  t.false(peer.connected, 'the close went on')
  t.is((await t.throwsAsync(peer.write([0], [0], 0))).code, 'CLOSED')
})

test('the async constructors open off the event loop and fail as the sync ones do', async (t) => {
  const shape = { blockNumber: 8, blockBytes: 1024 }
  const [src, dst] = [Buffer.alloc(8 * 1024, 0x3c), Buffer.alloc(8 * 1024)]
  const decode = await Communicator.decodeAsync({ keys: [dst], ...shape, ...transportOptions })
  const prefill = await Communicator.prefillAsync({ keys: [src], ...shape, ...transportOptions })
  t.teardown(async () => {
    await prefill.close()
    await decode.close()
  })
  t.is(decode.role, 'decode')
  const peer = await prefill.connect(HOST, decode.port)
  await peer.write([2], [5], 0)
  t.true(dst.subarray(5 * 1024, 6 * 1024).every((b) => b === 0x3c))
  // Refused before any thread: a bad setting; refused on it: a port in use.
  t.is((await t.throwsAsync(Communicator.prefillAsync({ keys: [src], ...shape, ibTimeout: 99 }))).code, 'CONFIG')
  const taken = await t.throwsAsync(Communicator.decodeAsync({ keys: [Buffer.alloc(8 * 1024)], ...shape, ...transportOptions, port: decode.port }))
  t.is(taken.code, 'TRANSPORT')
  t.regex(taken.message, /in use/)
})
