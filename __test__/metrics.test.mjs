// What a communicator counts, read through stats() and through Prometheus: exact counts of what happened on both
// sides (bytes that arrived, checked), failures by code, one histogram sample per call, and the Prometheus text
// as prom-client serves it, parsed, with the names the README documents.
import test from 'ava'
import { readFileSync } from 'node:fs'
import { Counter, Registry } from 'prom-client'
import { Communicator, KVTransferError, quantile, resources } from 'kvtransfer'
import { METRIC_NAMES, register } from 'kvtransfer/prometheus'
import { makeCache } from './helpers/cache.mjs'
import { transportName, transportOptions } from './helpers/transport.mjs'

const HOST = '127.0.0.1'
const LAYERS = 2
const BLOCKS = 32
const BLOCK_BYTES = 4096

function caches() {
  const shape = { layers: LAYERS, blocks: BLOCKS, blockBytes: BLOCK_BYTES }
  return [makeCache(shape), makeCache(shape)]
}

function open(t, src, dst, extra = {}) {
  const options = (c) => ({ keyPtrs: c.keyPtrs, valuePtrs: c.valuePtrs, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES, ...transportOptions, ...extra })
  const decode = Communicator.decode(options(dst))
  const prefill = Communicator.prefill(options(src))
  t.teardown(async () => {
    await prefill.close()
    await decode.close()
  })
  return { decode, prefill }
}

async function until(what, f) {
  const deadline = Date.now() + 10_000
  while (!f()) {
    if (Date.now() > deadline) throw new Error(`timed out: ${what}`)
    await new Promise((r) => setTimeout(r, 10))
  }
}

/**
 * Parses Prometheus' text format (version 0.0.4) strictly: every line is a `# HELP`, a `# TYPE` or a sample of
 * the family typed last (a histogram's `_bucket`, `_sum`, `_count`), with quoted, escaped label values and a
 * number. Returns the families by name: `{ type, help, samples: [{ name, labels, value }] }`.
 */
function parsePrometheus(text) {
  const families = new Map()
  let family
  const label = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\["\\n])*)"(,|$)/
  for (const line of text.split('\n')) {
    if (line === '') continue
    let m
    if ((m = /^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line))) {
      family = { name: m[1], help: m[2], type: undefined, samples: [] }
      if (families.has(m[1])) throw new Error(`family ${m[1]} twice`)
      families.set(m[1], family)
    } else if ((m = /^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$/.exec(line))) {
      if (family?.name !== m[1]) throw new Error(`TYPE of ${m[1]} outside its family`)
      family.type = m[2]
    } else if ((m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line))) {
      const suffixes = family?.type === 'histogram' ? ['_bucket', '_sum', '_count'] : ['']
      if (!family || !suffixes.some((s) => m[1] === family.name + s)) throw new Error(`sample ${m[1]} outside its family: ${line}`)
      const labels = {}
      let rest = m[2] ?? ''
      while (rest !== '') {
        const l = label.exec(rest)
        if (!l) throw new Error(`bad labels: ${line}`)
        labels[l[1]] = l[2]
        rest = rest.slice(l[0].length)
      }
      const value = m[3] === '+Inf' ? Infinity : Number(m[3])
      if (Number.isNaN(value)) throw new Error(`bad value: ${line}`)
      family.samples.push({ name: m[1], labels, value })
    } else {
      throw new Error(`not Prometheus text: ${line}`)
    }
  }
  return families
}

const decodePeer = (decode) => decode.stats().peers.find((p) => p.peer === HOST)

test.serial('stats() counts each write, block and byte on both sides, and the bytes are there', async (t) => {
  const [src, dst] = caches()
  const { decode, prefill } = open(t, src, dst)
  const peer = await prefill.connect(HOST, decode.port)
  // 3 requests of every layer, 5 blocks a write, then 2 writes without a request (which the decode cannot see).
  const writes = []
  for (let r = 0; r < 3; r++) {
    for (let layer = 0; layer < LAYERS; layer++) {
      const local = [0, 1, 2, 3, 4].map((i) => r * 5 + i)
      const remote = [0, 1, 2, 3, 4].map((i) => 31 - (r * 5 + i))
      writes.push([local, remote, layer])
      await peer.write(local, remote, layer, { requestId: `req-${r}` })
    }
  }
  await peer.write([20], [0], 0)
  await peer.write([21, 22], [1, 2], 1)
  for (const [local, remote, layer] of writes) {
    local.forEach((l, i) => t.is(dst.blockHash('key', layer, remote[i]), src.blockHash('key', layer, l)))
  }
  const block = 2 * BLOCK_BYTES
  const ours = peer.stats()
  t.is(ours.peer, `${HOST}:${decode.port}`)
  t.is(ours.transport, transportName)
  t.deepEqual([ours.writes, ours.blocks, ours.bytes], [8, 33, 33 * block])
  t.deepEqual([ours.connects, ours.reconnects, ours.queued, ours.inFlight], [1, 0, 0, 0])
  t.deepEqual(ours.failures, {})
  t.is(ours.writeSeconds.count, 8)
  t.is(ours.writeSeconds.buckets.reduce((n, [, c]) => n + c, 0), 8)
  t.is(ours.handshakeSeconds.count, 1)
  t.true(quantile(ours.writeSeconds, 0.5) > 0)
  t.deepEqual(prefill.stats().peers, [ours])
  t.deepEqual(prefill.stats().transports.filter((x) => x.writes > 0), [{ transport: transportName, writes: 8, blocks: 33, bytes: 33 * block }])

  await until('the decode counts every request', () => decodePeer(decode)?.requests.done === 3)
  const stats = decode.stats()
  t.is(stats.role, 'decode')
  const theirs = decodePeer(decode)
  t.deepEqual([theirs.writes, theirs.blocks, theirs.bytes], [6, 30, 30 * block], 'what the notifications named')
  t.deepEqual(theirs.requests, { started: 3, done: 3, failed: 0, aborted: 0, revoked: 0, expired: 0 })
  t.is(theirs.layerSeconds.count, 3 * LAYERS)
  t.is(theirs.connects, 1)
  t.is(stats.requestsHeld, 3)
})

test.serial('resources() counts the data connections, shared rings, queue pairs and registered regions this process holds, and they go back', async (t) => {
  const [src, dst] = caches()
  const none = resources()
  const options = (c) => ({ keyPtrs: c.keyPtrs, valuePtrs: c.valuePtrs, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES, ...transportOptions, tcpConnections: 2 })
  const decode = Communicator.decode(options(dst))
  const prefill = Communicator.prefill(options(src))
  const opened = resources()
  const peer = await prefill.connect(HOST, decode.port)
  await peer.write([1, 2], [3, 4], 0)
  const linked = resources()
  const more = (k) => linked[k] - opened[k]
  if (transportName === 'tcp') t.deepEqual([more('tcpDataConnections'), more('shmRings'), more('rdmaQueuePairs')], [4, 0, 0], "two connections, both ends in this process")
  if (transportName === 'shm') {
    t.deepEqual([more('tcpDataConnections'), more('shmRings'), more('rdmaQueuePairs')], [0, 2, 0], 'one ring, mapped by both ends')
    // Blocks too large for the ring to take a call: no ring is asked for, none made.
    const big = { layers: LAYERS, blocks: 4, blockBytes: 64 * 1024 }
    const [a, b] = [makeCache(big), makeCache(big)]
    const bigOptions = (c) => ({ keyPtrs: c.keyPtrs, valuePtrs: c.valuePtrs, blockNumber: 4, blockBytes: 64 * 1024, ...transportOptions })
    const bigDecode = Communicator.decode(bigOptions(b))
    const bigPrefill = Communicator.prefill(bigOptions(a))
    await (await bigPrefill.connect(HOST, bigDecode.port)).write([1], [2], 0)
    t.is(resources().shmRings, linked.shmRings, 'no ring for 64 KiB blocks')
    await bigPrefill.close()
    await bigDecode.close()
  }
  if (transportName === 'rdma') {
    t.is(more('tcpDataConnections'), 0)
    t.true(more('rdmaQueuePairs') >= 2, `the link's queue pair and the decode's: ${JSON.stringify([opened, linked])}`)
    t.true(opened.rdmaMemoryRegions > none.rdmaMemoryRegions, 'the caches are registered')
  }
  await prefill.close()
  await decode.close()
  await until('every link let go', () => JSON.stringify(resources()) === JSON.stringify(none))
  t.deepEqual(resources(), none)
})

test.serial('calls waiting behind a peer\'s earlier ones are counted as queued until they run', async (t) => {
  const [src, dst] = caches()
  const { decode, prefill } = open(t, src, dst)
  const peer = await prefill.connect(HOST, decode.port)
  const all = [...Array(BLOCKS).keys()]
  // 64 writes of the whole cache (16 MiB) issued at once: one runs, the rest wait on the peer's thread.
  const writes = Array.from({ length: 64 }, (_, i) => peer.write(all, all, i % LAYERS))
  const during = peer.stats()
  t.true(during.queued > 0 && during.queued + during.inFlight <= 64, JSON.stringify([during.queued, during.inFlight]))
  await Promise.all(writes)
  const after = peer.stats()
  t.deepEqual([after.queued, after.inFlight, after.writes], [0, 0, 64])
})

test.serial('failures are counted by code: a refused write, an aborted request, a revoked one', async (t) => {
  const [src, dst] = caches()
  const { decode, prefill } = open(t, src, dst)
  const peer = await prefill.connect(HOST, decode.port)
  await t.throwsAsync(peer.write([99], [0], 0), { instanceOf: KVTransferError, code: 'INVALID_ARGUMENT' })
  await peer.write([1], [1], 0, { requestId: 'a' })
  await peer.abort('a')
  await t.throwsAsync(peer.write([1], [1], 1, { requestId: 'a' }), { code: 'ABORTED' })
  await peer.write([2], [2], 0, { requestId: 'r' })
  await until('the decode sees r start', () => decodePeer(decode)?.requests.started === 2)
  await decode.revoke('r')
  await t.throwsAsync(peer.write([2], [2], 1, { requestId: 'r' }), { code: 'REVOKED' })
  const ours = peer.stats()
  t.deepEqual(ours.failures, { INVALID_ARGUMENT: 1, ABORTED: 1, REVOKED: 1 })
  t.is(ours.writes, 2)
  t.is(ours.writeSeconds.count, 5, 'one sample per call, failed ones too')
  await until('the decode counts the abort', () => decodePeer(decode)?.requests.aborted === 1)
  t.like(decodePeer(decode).requests, { started: 2, aborted: 1, revoked: 1, done: 0 })
  t.like(decode.stats(), { revokes: 1, revokeCutoffs: 0 })
})

test.serial('the Prometheus text parses and holds the same counts under the documented names', async (t) => {
  const [src, dst] = caches()
  const { decode, prefill } = open(t, src, dst)
  const registry = new Registry()
  const unregister = [register(prefill, { registry, labels: { rank: '0' } }), register(decode, { registry, labels: { rank: '0' } })]
  const peer = await prefill.connect(HOST, decode.port)
  for (let layer = 0; layer < LAYERS; layer++) await peer.write([1, 2, 3], [4, 5, 6], layer, { requestId: 'p' })
  await t.throwsAsync(peer.write([99], [0], 0), { code: 'INVALID_ARGUMENT' })
  await until('the decode counts the request', () => decodePeer(decode)?.requests.done === 1)

  const families = parsePrometheus(await registry.metrics())
  t.deepEqual([...families.keys()].sort(), [...METRIC_NAMES].sort(), 'every family, and only those')
  const value = (name, labels) => {
    const samples = [...families.values()].flatMap((f) => f.samples).filter((m) => m.name === name)
    const found = samples.filter((m) => Object.entries(labels).every(([k, v]) => m.labels[k] === v))
    t.is(found.length, 1, `${name} ${JSON.stringify(labels)}`)
    return found[0].value
  }
  const target = `${HOST}:${decode.port}`
  t.is(value('kvtransfer_bytes_total', { role: 'prefill', peer: target, rank: '0' }), 2 * 3 * 2 * BLOCK_BYTES)
  t.is(value('kvtransfer_transport_bytes_total', { role: 'prefill', transport: transportName }), 2 * 3 * 2 * BLOCK_BYTES)
  t.is(value('kvtransfer_peer_transport', { role: 'prefill', peer: target, transport: transportName }), 1)
  t.is(value('kvtransfer_bytes_total', { role: 'decode', peer: HOST, rank: '0' }), 2 * 3 * 2 * BLOCK_BYTES)
  t.is(value('kvtransfer_failures_total', { role: 'prefill', code: 'INVALID_ARGUMENT' }), 1)
  t.is(value('kvtransfer_requests_ended_total', { role: 'decode', end: 'done' }), 1)
  t.is(value('kvtransfer_refusals_total', { reason: 'authentication' }), 0)
  for (const f of families.values()) t.true(f.name.startsWith('kvtransfer_'), f.name)
  for (const f of families.values()) if (f.type === 'counter') t.true(f.name.endsWith('_total'), f.name)
  // Histograms: cumulative buckets that end at the sample count.
  const writes = families.get('kvtransfer_write_seconds')
  t.is(writes.type, 'histogram')
  const buckets = writes.samples.filter((m) => m.name === 'kvtransfer_write_seconds_bucket')
  const counts = buckets.map((m) => m.value)
  t.deepEqual(counts, [...counts].sort((a, b) => a - b), 'cumulative')
  t.is(buckets.at(-1).labels.le, '+Inf')
  t.is(counts.at(-1), 3)
  t.is(value('kvtransfer_write_seconds_count', {}), 3)
  t.true(value('kvtransfer_write_seconds_sum', {}) > 0)

  // Taken out again: the families go with the last communicator.
  unregister.forEach((f) => f())
  t.is((await registry.metrics()).trim(), '')
})

test.serial('a registry that served OpenMetrics, or was cleared, still registers and unregisters', async (t) => {
  const [src, dst] = caches()
  const { decode, prefill } = open(t, src, dst)
  const registry = new Registry(Registry.OPENMETRICS_CONTENT_TYPE)
  const unregister = register(prefill, { registry })
  const text = await registry.metrics()
  t.regex(text, /^kvtransfer_transport_writes_total\{role="prefill",transport="tcp"\} 0$/m, "counters end in _total in OpenMetrics too")
  t.notRegex(text, /_total_total/)
  unregister()
  t.is((await registry.metrics()).trim(), '# EOF', 'every family went')
  // Registered again, and after a clear().
  register(prefill, { registry })
  registry.clear()
  const again = register(decode, { registry })
  t.regex(await registry.metrics(), /kvtransfer_requests_held\{role="decode"\} 0/)
  again()
  t.is((await registry.metrics()).trim(), '# EOF')
})

test.serial('register refuses labels Prometheus or this module cannot take, and a second communicator of the same labels', (t) => {
  const [src, dst] = caches()
  const { decode, prefill } = open(t, src, dst)
  const registry = new Registry()
  for (const labels of [{ 'bad-name': 'x' }, { __reserved: 'x' }, { peer: 'x' }, { rank: 0 }]) {
    t.throws(() => register(prefill, { registry, labels }), { instanceOf: KVTransferError, code: 'INVALID_ARGUMENT' })
  }
  const done = register(prefill, { registry })
  t.throws(() => register(prefill, { registry }), { code: 'INVALID_ARGUMENT', message: /labels/ })
  register(decode, { registry })
  done()
  // A name taken by a metric that is not kvtransfer's: refused, and the registry left as it was.
  const taken = new Registry()
  new Counter({ name: 'kvtransfer_bytes_total', help: 'someone else\'s', registers: [taken] })
  t.throws(() => register(prefill, { registry: taken }), { code: 'INVALID_ARGUMENT', message: /kvtransfer_bytes_total/ })
  t.deepEqual(taken.getMetricsAsArray().map((m) => m.name), ['kvtransfer_bytes_total'])
})

test('the README documents every metric family', (t) => {
  const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8')
  for (const name of METRIC_NAMES) t.true(readme.includes(`\`${name}\``), `${name} is missing from the README's metrics table`)
})
