/**
 * Prometheus metrics through `prom-client` (an optional peer dependency): {@link register} adds a communicator's
 * counts ({@link Communicator.stats}) to a prom-client `Registry`, which serves them with everything else the
 * engine exports.
 *
 * ```ts
 * import { register as registry } from 'prom-client'
 * import { register } from 'kvtransfer/prometheus'
 * register(prefill, { registry, labels: { rank: '0' } })
 * // GET /metrics: res.end(await registry.metrics())
 * ```
 *
 * Names follow Prometheus' conventions: the `kvtransfer_` prefix, base units (`_bytes`, `_seconds`), `_total` for
 * counters. Labels: `role`, the communicator's own `labels`, and per family `peer`, `transport`, `code`,
 * `reason` or `end`, each from a bounded set (at most 256 peers, then `peer="other"`). A counter's labels never
 * change over its life: per-peer families have no `transport` (`kvtransfer_peer_transport` says a peer's), and
 * the `kvtransfer_transport_*` families count by transport. The README's metrics table lists every family.
 *
 * prom-client's own `Counter` and `Histogram` count in JavaScript; these counts live in the native core, so each
 * family here is a read-only metric (the `name`, `help`, `type` and `get()` that a prom-client `Registry` reads),
 * filled from one snapshot per scrape.
 */
import type { Registry } from 'prom-client'
import type { Communicator } from './communicator.js'
import { invalid, KVTransferError } from './errors.js'
import type { HistogramStats, PeerStats, Stats, TransportStats } from './stats.js'

/** What {@link register} takes besides the communicator. */
export interface PrometheusOptions {
  /** The registry to add to (default: prom-client's global `register`). */
  registry?: Registry
  /**
   * Labels on every series of this communicator, e.g. `{ rank: '0' }`: communicators of one role that share a
   * registry must differ in them.
   */
  labels?: Record<string, string>
}

type Labels = Record<string, string>
interface Value {
  value: number
  labels: Labels
  metricName?: string
}

/** One registered communicator, and its snapshot of the scrape under way. */
interface Source {
  communicator: Communicator
  labels: Labels
  snapshot?: { stats: Stats; at: number }
}

/**
 * Bucket bounds of the exported histograms, in seconds: every other power of two nanoseconds from 2^10 (1 µs) to
 * 2^34 (17 s). The native histograms have every power of two; each exported bucket sums the native ones below
 * its bound.
 */
const BOUNDS_NS = Array.from({ length: 13 }, (_, i) => 2 ** (10 + 2 * i))

/** A snapshot this recent is the scrape's own: every family of one scrape reads the same one. */
const SCRAPE_MS = 100

function stats(source: Source): Stats {
  const now = Date.now()
  if (!source.snapshot || now - source.snapshot.at > SCRAPE_MS) source.snapshot = { stats: source.communicator.stats(), at: now }
  return source.snapshot.stats
}

type Read = (stats: Stats, base: Labels) => Value[]
type Kind = 'counter' | 'gauge' | 'histogram'

/** One metric family over every communicator registered on a registry. */
class Family {
  readonly aggregator = 'sum'
  /**
   * The name it is registered under. `name` may differ once the registry has served OpenMetrics (prom-client
   * then renames counters without `_total`, and adds it back when writing).
   */
  readonly key: string
  constructor(
    public name: string,
    readonly help: string,
    readonly type: Kind,
    private readonly sources: Set<Source>,
    private readonly read: Read,
  ) {
    this.key = name
  }

  async get(): Promise<{ name: string; help: string; type: Kind; aggregator: string; values: Value[] }> {
    const values = [...this.sources].flatMap((s) => this.read(stats(s), { role: s.communicator.role, ...s.labels }))
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values }
  }

  /** Nothing to reset: the counts are the native core's. */
  reset(): void {}
}

const perPeer = (f: (p: PeerStats) => number): Read => (s, base) => s.peers.map((p) => ({ value: f(p), labels: { ...base, peer: p.peer } }))
const perTransport = (f: (t: TransportStats) => number): Read => (s, base) =>
  s.transports.map((t) => ({ value: f(t), labels: { ...base, transport: t.transport } }))
const prefill = (read: Read): Read => (s, base) => (s.role === 'prefill' ? read(s, base) : [])
const decode = (read: Read): Read => (s, base) => (s.role === 'decode' ? read(s, base) : [])

function histogram(name: string, pick: (p: PeerStats) => HistogramStats): Read {
  return (s, base) =>
    s.peers.flatMap((p) => {
      const h = pick(p)
      const labels = { ...base, peer: p.peer }
      const values: Value[] = BOUNDS_NS.map((ns) => ({
        metricName: `${name}_bucket`,
        labels: { ...labels, le: String(ns / 1e9) },
        value: h.buckets.filter(([bound]) => Math.round(bound * 1e9) <= ns).reduce((n, [, c]) => n + c, 0),
      }))
      values.push({ metricName: `${name}_bucket`, labels: { ...labels, le: '+Inf' }, value: h.count })
      values.push({ metricName: `${name}_sum`, labels, value: h.sum })
      values.push({ metricName: `${name}_count`, labels, value: h.count })
      return values
    })
}

/** The families, by name: what each counts is in {@link PeerStats} and {@link Stats}. */
const FAMILIES: Array<[string, Kind, string, Read]> = [
  ['kvtransfer_writes_total', 'counter', 'Prefill: write calls whose bytes are in the decode. Decode: notifications of written layers.', perPeer((p) => p.writes)],
  ['kvtransfer_blocks_total', 'counter', 'Blocks those writes moved.', perPeer((p) => p.blocks)],
  ['kvtransfer_bytes_total', 'counter', 'Bytes those writes moved.', perPeer((p) => p.bytes)],
  ['kvtransfer_transport_writes_total', 'counter', 'Writes (as kvtransfer_writes_total) by transport, all peers together.', perTransport((t) => t.writes)],
  ['kvtransfer_transport_bytes_total', 'counter', 'Bytes (as kvtransfer_bytes_total) by transport, all peers together.', perTransport((t) => t.bytes)],
  ['kvtransfer_peer_transport', 'gauge', 'The transport of a peer\'s latest connection (1).', (s, base) =>
    s.peers.filter((p) => p.transport !== null).map((p) => ({ value: 1, labels: { ...base, peer: p.peer, transport: p.transport as string } }))],
  ['kvtransfer_failures_total', 'counter', 'Prefill: calls to a peer that failed (connect, write), by error code.', prefill((s, base) =>
    s.peers.flatMap((p) => Object.entries(p.failures).map(([code, n]) => ({ value: n ?? 0, labels: { ...base, peer: p.peer, code } }))))],
  ['kvtransfer_connects_total', 'counter', 'Prefill: connections made. Decode: links admitted.', perPeer((p) => p.connects)],
  ['kvtransfer_reconnects_total', 'counter', 'Prefill: connections rebuilt by the reconnect policy.', prefill(perPeer((p) => p.reconnects))],
  ['kvtransfer_queued_calls', 'gauge', 'Prefill: asynchronous writes waiting behind a peer\'s earlier calls.', prefill(perPeer((p) => p.queued))],
  ['kvtransfer_writes_in_flight', 'gauge', 'Prefill: write calls under way (running, or waiting for the peer).', prefill(perPeer((p) => p.inFlight))],
  ['kvtransfer_write_seconds', 'histogram', 'Prefill: each write call, from its start to its bytes being in the decode (or its failure).', prefill(histogram('kvtransfer_write_seconds', (p) => p.writeSeconds))],
  ['kvtransfer_handshake_seconds', 'histogram', 'Prefill: each connection made (handshake, data link, request channel).', prefill(histogram('kvtransfer_handshake_seconds', (p) => p.handshakeSeconds))],
  ['kvtransfer_requests_started_total', 'counter', 'Decode: requests a prefill host started.', decode(perPeer((p) => p.requests.started))],
  ['kvtransfer_requests_ended_total', 'counter', 'Decode: requests by their end (done, failed, aborted, revoked, expired).', decode((s, base) =>
    s.peers.flatMap((p) => (['done', 'failed', 'aborted', 'revoked', 'expired'] as const).map((end) => ({ value: p.requests[end], labels: { ...base, peer: p.peer, end } }))))],
  ['kvtransfer_layer_seconds', 'histogram', 'Decode: each layer of a request, from the prefill\'s start of the request to the layer\'s notification.', decode(histogram('kvtransfer_layer_seconds', (p) => p.layerSeconds))],
  ['kvtransfer_refusals_total', 'counter', 'Decode: prefills refused before any byte could land, by reason.', decode((s, base) =>
    Object.entries(s.refusals).map(([reason, n]) => ({ value: n, labels: { ...base, reason } })))],
  ['kvtransfer_revokes_total', 'counter', 'Decode: revokes asked for.', decode((s, base) => [{ value: s.revokes, labels: base }])],
  ['kvtransfer_revoke_cutoffs_total', 'counter', 'Decode: links cut off because they did not confirm a revoke in time.', decode((s, base) => [{ value: s.revokeCutoffs, labels: base }])],
  ['kvtransfer_requests_held', 'gauge', 'Decode: requests kept (open, and ended ones remembered).', decode((s, base) => [{ value: s.requestsHeld, labels: base }])],
  ['kvtransfer_notifications_dropped_total', 'counter', 'Decode: notifications dropped because the engine did not take them.', decode((s, base) => [{ value: s.notificationsDropped, labels: base }])],
]

/** The names of every family {@link register} adds. */
export const METRIC_NAMES: readonly string[] = FAMILIES.map(([name]) => name)

/** Per registry: its communicators and the families that read them. */
const REGISTERED = new WeakMap<Registry, { sources: Set<Source>; families: Family[] }>()

const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/
const RESERVED = new Set(['role', 'peer', 'transport', 'code', 'reason', 'end', 'le'])

/**
 * Adds `communicator`'s counts to a prom-client registry (the global one by default). Returns a function that
 * takes them out again (the families go once no communicator is left on the registry). A closed communicator's
 * counts stay readable until then.
 * @throws {KVTransferError} `INVALID_ARGUMENT` for a label name Prometheus refuses or one of this module's own,
 * or where a communicator of the same role and labels is on the registry already; `UNAVAILABLE` without
 * prom-client.
 */
export function register(communicator: Communicator, options: PrometheusOptions = {}): () => void {
  const registry = options.registry ?? globalRegistry()
  const labels: Labels = { ...(options.labels ?? {}) }
  for (const [name, value] of Object.entries(labels)) {
    if (!LABEL_NAME.test(name) || name.startsWith('__') || RESERVED.has(name)) throw invalid(`labels: ${JSON.stringify(name)} is not a label name this module can add`)
    if (typeof value !== 'string') throw invalid(`labels.${name} must be a string`)
  }
  let entry = REGISTERED.get(registry)
  // A registry cleared since (`registry.clear()`), or whose families were taken out, is registered again.
  if (entry && entry.families.some((f) => registry.getSingleMetric(f.key) !== (f as unknown))) {
    for (const f of entry.families) if (registry.getSingleMetric(f.key) === (f as unknown)) registry.removeSingleMetric(f.key)
    REGISTERED.delete(registry)
    entry = undefined
  }
  const same = (s: Source) => s.communicator.role === communicator.role && JSON.stringify(sorted(s.labels)) === JSON.stringify(sorted(labels))
  if (entry && [...entry.sources].some(same)) {
    throw invalid(`a ${communicator.role} communicator with these labels is on this registry already: give each its own labels (e.g. { rank: '0' })`)
  }
  if (!entry) {
    const sources = new Set<Source>()
    const families = FAMILIES.map(([name, type, help, read]) => new Family(name, help, type, sources, read))
    // All or nothing: a name taken by another metric leaves the registry as it was.
    const taken = families.find((f) => registry.getSingleMetric(f.key) !== undefined)
    if (taken) throw invalid(`this registry has a metric named ${taken.key} already, which is not kvtransfer's`)
    // A registry holds prom-client's own metric classes; these have the same shape (see the module's comment).
    for (const family of families) registry.registerMetric(family as unknown as Parameters<Registry['registerMetric']>[0])
    entry = { sources, families }
    REGISTERED.set(registry, entry)
  }
  const source: Source = { communicator, labels }
  entry.sources.add(source)
  const registered = entry
  return () => {
    if (!registered.sources.delete(source) || registered.sources.size > 0) return
    for (const family of registered.families) {
      if (registry.getSingleMetric(family.key) === (family as unknown)) registry.removeSingleMetric(family.key)
    }
    if (REGISTERED.get(registry) === registered) REGISTERED.delete(registry)
  }
}

function sorted(labels: Labels): Array<[string, string]> {
  return Object.entries(labels).sort(([a], [b]) => (a < b ? -1 : 1))
}

function globalRegistry(): Registry {
  try {
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    return (require('prom-client') as typeof import('prom-client')).register
  } catch {
    throw new KVTransferError('UNAVAILABLE', 'kvtransfer/prometheus needs prom-client (an optional peer dependency): npm install prom-client')
  }
}
