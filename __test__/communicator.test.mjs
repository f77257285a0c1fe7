// The async-first API: Communicator and Peer, errors with native codes, panics that become INTERNAL, and calls
// that run on the library's own threads.
import test from 'ava'
import { createRequire } from 'node:module'
import { networkInterfaces } from 'node:os'
import { Communicator, KVTransferError, Peer, RDMACommunicator } from 'kvtransfer'
import { makeCache } from './helpers/cache.mjs'
import { startDecode } from './helpers/peer.mjs'
import { transportOptions } from './helpers/transport.mjs'

const require = createRequire(import.meta.url)
const HOST = '127.0.0.1'

function prefill(cache, shape, extra = {}) {
  return Communicator.prefill({
    keyPtrs: cache.keyPtrs,
    valuePtrs: cache.valuePtrs,
    blockNumber: shape.blocks,
    blockBytes: shape.blockBytes,
    ...transportOptions,
    ...extra,
  })
}

test('connect gives a peer whose writes land, in order, every byte checked', async (t) => {
  const shape = { layers: 2, blocks: 64, blockBytes: 4096 }
  const decode = await startDecode(shape, { options: transportOptions })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  const comm = prefill(src, shape)
  t.teardown(() => comm.close())
  t.is(comm.role, 'prefill')
  const peer = await comm.connect(HOST, decode.port)
  t.true(peer instanceof Peer)
  t.true(peer.connected)
  t.is(peer.transport, transportOptions.transport)
  // Many writes in flight at once: each resolves when its bytes are there; later ones overwrite earlier ones.
  const ids = Array.from({ length: 64 }, (_, i) => i)
  const writes = []
  for (let round = 0; round < 8; round++) {
    for (let layer = 0; layer < shape.layers; layer++) writes.push(peer.write(ids, ids.map((i) => (i + round) % 64), layer))
  }
  await Promise.all(writes)
  for (let layer = 0; layer < shape.layers; layer++) {
    const got = await decode.blockHashes('value', layer, ids)
    t.deepEqual(got, ids.map((i) => src.blockHash('value', layer, (i + 64 - 7) % 64)), `the last round wins in layer ${layer}`)
  }
  const refused = await t.throwsAsync(peer.write([1], [64], 0))
  t.true(refused instanceof KVTransferError)
  t.is(refused.code, 'INVALID_ARGUMENT')
  t.regex(refused.message, /remote block id 64/)
  t.like(refused, { peer: `${HOST}:${decode.port}`, layer: 0 }, 'the error says which call it was')
  t.is((await t.throwsAsync(comm.peer(HOST, 1).write([0], [0], 0))).code, 'NOT_CONNECTED')
})

test('a decode communicator from options; connect failures reject with their code', async (t) => {
  const shape = { layers: 1, blocks: 8, blockBytes: 256 }
  const dst = makeCache(shape)
  const decode = Communicator.decode({ keyPtrs: dst.keyPtrs, valuePtrs: dst.valuePtrs, blockNumber: 8, blockBytes: 256, ...transportOptions })
  t.teardown(() => decode.close())
  t.is(decode.role, 'decode')
  t.true(decode.port > 0)
  const src = makeCache({ ...shape, layers: 2 })
  const comm = prefill(src, shape)
  t.teardown(() => comm.close())
  const err = await t.throwsAsync(comm.connect(HOST, decode.port))
  t.is(err.code, 'INVALID_ARGUMENT')
  t.regex(err.message, /layer count mismatch/)
  t.is(t.throws(() => Communicator.decode({ keyPtrs: dst.keyPtrs, blockNumber: 8, blockBytes: 256, tpSize: 2 })).code, 'CONFIG')
  await decode.close()
  t.is((await t.throwsAsync(decode.waitFor('x'))).code, 'CLOSED')
  await decode.close()
})

test('Communicator.decode is secure by default: beyond loopback it needs a token, or insecure: true', async (t) => {
  const dst = makeCache({ layers: 1, blocks: 8, blockBytes: 256 })
  const cache = { keyPtrs: dst.keyPtrs, valuePtrs: dst.valuePtrs, blockNumber: 8, blockBytes: 256 }
  const open = [
    Communicator.decode({ ...cache, socketIfname: 'lo' }),
    Communicator.decode({ ...cache, authToken: 'x'.repeat(32) }),
    Communicator.decode({ ...cache, insecure: true }),
    // The seed API keeps the original's behaviour (it listens, with a warning).
    new RDMACommunicator('decode', 0, 0, dst.keyPtrs, dst.valuePtrs, 8, 256),
  ]
  await Promise.all(open.map((comm) => comm.close()))
  // A decode listens on the first usable interface besides loopback, where there is one.
  const beyond = Object.values(networkInterfaces()).flat().some((a) => a.family === 'IPv4' && !a.internal)
  if (!beyond || process.env.KVCACHE_SOCKET_IFNAME || process.env.KVCACHE_AUTH_TOKEN || process.env.KVCACHE_INSECURE) {
    t.log('no interface beyond loopback here (or the environment sets one): the refusal cannot be shown')
    t.pass()
    return
  }
  const err = t.throws(() => Communicator.decode(cache))
  t.is(err.code, 'CONFIG')
  t.regex(err.message, /without KVCACHE_AUTH_TOKEN.*insecure: true/s)
})

test('a panic inside a native call is an INTERNAL error, and the process lives on', async (t) => {
  const binding = require('../binding.js')
  const sync = t.throws(() => binding.__panicForTests('sync'))
  t.is(sync.code, 'INTERNAL')
  t.regex(sync.message, /deliberate panic on the calling thread.*please report it/)
  const failure = await binding.__panicForTests('async')
  t.is(failure.code, 'INTERNAL')
  t.regex(failure.message, /deliberate panic on another thread/)
  // Still alive and working.
  t.is(KVTransferError.from(sync).code, 'INTERNAL')
  const alive = Communicator.decode({ keyPtrs: makeCache({ layers: 1, blocks: 1, blockBytes: 64 }).keyPtrs, blockNumber: 1, blockBytes: 64, socketIfname: 'lo' })
  t.true(alive.port > 0)
  await alive.close()
})

test('peers are served by the library\'s own threads: writes to stalled peers leave libuv\'s pool free', async (t) => {
  // Four decodes that accept the handshake, then stall: their processes are stopped mid-test.
  const shape = { layers: 1, blocks: 4, blockBytes: 1 << 20 }
  const decodes = await Promise.all([0, 1, 2, 3].map(() => startDecode(shape, { options: transportOptions })))
  t.teardown(() => Promise.all(decodes.map((d) => (d.child.kill('SIGCONT'), d.stop()))))
  const src = makeCache(shape)
  const comm = prefill(src, shape, { stallTimeoutMs: 4000 })
  t.teardown(() => comm.close())
  const peers = await Promise.all(decodes.map((d) => comm.connect(HOST, d.port)))
  for (const d of decodes) d.child.kill('SIGSTOP')
  const stalled = peers.map((p) => p.write([0, 1, 2, 3], [0, 1, 2, 3], 0).catch((e) => e))
  // libuv's pool (4 threads) does file work: it must not wait for the stalled writes.
  const { promises: fs } = await import('node:fs')
  const started = Date.now()
  await Promise.all(Array.from({ length: 8 }, () => fs.readFile(new URL(import.meta.url))))
  const fileMs = Date.now() - started
  // isConnected never waits for a transfer either.
  t.true(peers.every((p) => p.connected))
  const outcomes = await Promise.all(stalled)
  t.true(fileMs < 2000, `file reads waited ${fileMs} ms behind stalled writes`)
  for (const o of outcomes) {
    // With shm the write is one-sided and may finish while the decode is stopped; over TCP it times out.
    t.true(o === undefined || ['TIMEOUT', 'TRANSPORT'].includes(o.code), String(o?.message))
  }
})

test('RDMACommunicator keeps its seed API over the new one', async (t) => {
  const shape = { layers: 1, blocks: 8, blockBytes: 512 }
  const decode = await startDecode(shape, { options: transportOptions })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  const comm = new RDMACommunicator('prefill', 0, 0, src.keyPtrs, src.valuePtrs, 8, 512, 1, 0, { ...transportOptions, connectTimeoutMs: 1000 })
  t.teardown(() => comm.close())
  t.true(comm.communicator instanceof Communicator)
  t.false(comm.connect(HOST, 1))
  t.is(comm.lastError.code, 'UNREACHABLE', comm.lastError.message)
  t.true(comm.connect(HOST, decode.port))
  t.is(comm.writeCache(HOST, decode.port, [0], [9], 0), -1)
  t.is(comm.lastError.code, 'INVALID_ARGUMENT')
  t.is(comm.writeCache(HOST, decode.port, [3], [4], 0), 0)
  t.is(comm.lastError, undefined)
  t.deepEqual(await decode.blockHashes('key', 0, [4]), [src.blockHash('key', 0, 3)])
})

test('with KVCACHE_AUTH_TOKEN only a peer holding the token gets a session', async (t) => {
  const shape = { layers: 1, blocks: 8, blockBytes: 1024 }
  const authToken = '5b7d9f1e3c5a7e9b1d3f5c7a9e1b3d5f'
  const decode = await startDecode(shape, { options: { ...transportOptions, authToken } })
  t.teardown(decode.stop)
  const before = await decode.blockHashes('key', 0, [0, 1, 2, 3, 4, 5, 6, 7])
  const src = makeCache(shape)
  const stranger = prefill(src, shape)
  t.teardown(() => stranger.close())
  const err = await t.throwsAsync(stranger.connect(HOST, decode.port))
  t.is(err.code, 'UNAUTHENTICATED')
  t.notRegex(err.message, /layer|block/)
  const wrong = prefill(src, shape, { authToken: '0123456789abcdef0123456789abcdef' })
  t.teardown(() => wrong.close())
  t.is((await t.throwsAsync(wrong.connect(HOST, decode.port))).code, 'UNAUTHENTICATED')
  t.deepEqual(await decode.blockHashes('key', 0, [0, 1, 2, 3, 4, 5, 6, 7]), before, 'nothing landed')
  const friend = prefill(src, shape, { authToken })
  t.teardown(() => friend.close())
  const peer = await friend.connect(HOST, decode.port)
  await peer.write([5], [2], 0)
  t.deepEqual(await decode.blockHashes('key', 0, [2]), [src.blockHash('key', 0, 5)])
  t.is(t.throws(() => prefill(src, shape, { authToken: 'correct horse battery staple' })).code, 'CONFIG', 'too short to resist offline guessing')
  const notText = t.throws(() => prefill(src, shape, { authToken: Buffer.from(authToken) }))
  t.is(notText.code, 'CONFIG')
  t.false(notText.message.includes('5b7d') || notText.message.includes('53,98'), notText.message)
})

test('connect options are checked, not ignored', async (t) => {
  const src = makeCache({ layers: 1, blocks: 2, blockBytes: 64 })
  const comm = prefill(src, { blocks: 2, blockBytes: 64 })
  t.teardown(() => comm.close())
  t.is((await t.throwsAsync(comm.connect(HOST, 1, 2))).code, 'INVALID_ARGUMENT')
  t.regex((await t.throwsAsync(comm.connect(HOST, 1, { dstTPSize: 2 }))).message, /unknown connect option "dstTPSize"/)
})
