/**
 * What a communicator counts ({@link Communicator.stats}): per peer, writes, blocks and bytes, failures by code,
 * connections, requests by their end, queues, and latency histograms; and, for a decode, refusals by reason.
 * Counted in the native core with atomics (no lock, no allocation on the write path); a snapshot is cheap
 * enough to take every second.
 */
import type { NativeCount, NativeHistogram, NativeStats } from '../binding.js'
import type { ErrorCode } from './errors.js'
import type { Role, Transport } from './options.js'

/**
 * A latency histogram with power-of-two buckets (1 ns, 2 ns, 4 ns … as upper bounds): a quantile read from it is
 * at most twice the true value.
 */
export interface HistogramStats {
  /** Samples. */
  count: number
  /** Their sum, in seconds. */
  sum: number
  /** `[upperBoundSeconds, samples]` per bucket with any (exclusive bound, not cumulative), in order. */
  buckets: Array<[number, number]>
}

/** A decode's requests by what became of them, counted by the prefill host that started each. */
export interface RequestCounts {
  /** Started (its first `Start` from the prefill). Those still open, or open when the decode closed, have no end. */
  started: number
  /** Every layer arrived. */
  done: number
  /** A write failed, or a link that had started it ended first. */
  failed: number
  /** Its prefill aborted it. */
  aborted: number
  /** This decode revoked it. */
  revoked: number
  /** No progress for the time to live (`requestTtlMs`). */
  expired: number
}

/**
 * One peer's counts. A prefill counts per decode (`host:port`, as given to `connect`); a decode per prefill host
 * (the address its links come from, an IPv6 /64 as one; `127.0.0.1` for this host's processes). At most 256
 * peers are told apart: past that a peer with no connection left is forgotten (the oldest first), and where
 * every one is connected, newcomers are counted together as `'other'`.
 */
export interface PeerStats {
  /** A prefill's decode (`host:port`), or a decode's prefill host. */
  peer: string
  /** The transport of its latest connection, `null` before any. */
  transport: Transport | null
  /**
   * Prefill: write calls whose bytes are in the decode's memory. Decode: notifications of a request's layer (a
   * decode does not see what RDMA, shm or CUDA IPC put in its memory: it counts what the prefill's notifications
   * name, so writes without a `requestId` are counted by the prefill only).
   */
  writes: number
  /**
   * The blocks those moved: a prefill's own blocks, and on a decode the blocks the notifications name, once per
   * prefill rank under hetero TP (each rank writes one slice of a block). A decode counts what the prefill says.
   */
  blocks: number
  /** The bytes those moved. */
  bytes: number
  /** Prefill: calls to this peer that failed (connect and write), by code; codes without failures are left out. */
  failures: Partial<Record<ErrorCode, number>>
  /** Prefill: connections made (first and rebuilt). Decode: links admitted from this host. */
  connects: number
  /** Prefill: connections rebuilt by the `reconnect` policy. */
  reconnects: number
  /** Decode: requests this host started, by their end. */
  requests: RequestCounts
  /** Prefill: asynchronous writes waiting behind this peer's earlier calls. */
  queued: number
  /** Prefill: write calls to this peer under way (running, or waiting for the one before). */
  inFlight: number
  /** Prefill: each write call, from its start to its bytes being in the decode's memory (or its failure). */
  writeSeconds: HistogramStats
  /** Prefill: each connection made (handshake, data link, request channel). */
  handshakeSeconds: HistogramStats
  /** Decode: each layer of a request, from the prefill's start of the request to the layer's notification. */
  layerSeconds: HistogramStats
}

/** Writes, blocks and bytes over one transport, all peers together (what {@link PeerStats} counts per peer). */
export interface TransportStats {
  /** The transport. */
  transport: Transport
  /** Prefill: write calls whose bytes are in the decode. Decode: notifications of a request's layer. */
  writes: number
  /** The blocks those moved. */
  blocks: number
  /** The bytes those moved. */
  bytes: number
}

/** Why a decode refused a prefill before any of its bytes could land. */
export type RefusalReason = 'authentication' | 'address' | 'mismatch' | 'transport' | 'protocol' | 'limit' | 'other'

/** A communicator's counts, as read at one moment ({@link Communicator.stats}). */
export interface Stats {
  /** The communicator's role. */
  role: Role
  /** Per peer, in the order they were first counted. */
  peers: PeerStats[]
  /** Per transport (every transport, zeros included). */
  transports: TransportStats[]
  /**
   * Decode: prefills refused, by reason: `authentication` (no proof of the token), `address` (dialed another
   * address; see `answersTo`), `mismatch` (its cache does not fit), `transport` (no transport in common),
   * `protocol` (garbage, another version), `limit` (past `maxPeers`), `other`.
   */
  refusals: Record<RefusalReason, number>
  /** Decode: revokes asked for. */
  revokes: number
  /** Decode: links cut off because they did not confirm a revoke in time. */
  revokeCutoffs: number
  /** Decode: requests kept now (open, and ended ones remembered). */
  requestsHeld: number
  /** Decode: notifications dropped because the engine did not take them. */
  notificationsDropped: number
}

function counts<K extends string>(list: NativeCount[]): Record<K, number> {
  return Object.fromEntries(list.map((c) => [c.name, c.count])) as Record<K, number>
}

function histogram(h: NativeHistogram): HistogramStats {
  const buckets: Array<[number, number]> = h.boundsSeconds.map((b, i) => [b, h.counts[i]])
  return { count: h.count, sum: h.sumSeconds, buckets: buckets.filter(([, n]) => n > 0) }
}

/** @internal */
export function toStats(s: NativeStats): Stats {
  return {
    role: s.role as Role,
    peers: s.peers.map((p) => ({
      peer: p.peer,
      transport: (p.transport as Transport | undefined) ?? null,
      writes: p.writes,
      blocks: p.blocks,
      bytes: p.bytes,
      failures: counts<ErrorCode>(p.failures),
      connects: p.connects,
      reconnects: p.reconnects,
      requests: counts<keyof RequestCounts>(p.requests),
      queued: p.queued,
      inFlight: p.inFlight,
      writeSeconds: histogram(p.writeTime),
      handshakeSeconds: histogram(p.handshakeTime),
      layerSeconds: histogram(p.layerTime),
    })),
    transports: s.transports.map((t) => ({ transport: t.transport as Transport, writes: t.writes, blocks: t.blocks, bytes: t.bytes })),
    refusals: counts<RefusalReason>(s.refusals),
    revokes: s.revokes,
    revokeCutoffs: s.revokeCutoffs,
    requestsHeld: s.requestsHeld,
    notificationsDropped: s.notificationsDropped,
  }
}

/** @internal A peer's counts before anything was counted. */
export function emptyPeerStats(peer: string): PeerStats {
  const none = (): HistogramStats => ({ count: 0, sum: 0, buckets: [] })
  return {
    peer,
    transport: null,
    writes: 0,
    blocks: 0,
    bytes: 0,
    failures: {},
    connects: 0,
    reconnects: 0,
    requests: { started: 0, done: 0, failed: 0, aborted: 0, revoked: 0, expired: 0 },
    queued: 0,
    inFlight: 0,
    writeSeconds: none(),
    handshakeSeconds: none(),
    layerSeconds: none(),
  }
}

/**
 * The upper bound, in seconds, of the bucket that holds quantile `q` (0 to 1) of `h`: at most twice the true
 * value; `null` without samples.
 */
export function quantile(h: HistogramStats, q: number): number | null {
  const total = h.buckets.reduce((n, [, c]) => n + c, 0)
  if (total === 0) return null
  const rank = Math.max(1, Math.ceil(Math.min(1, Math.max(0, q)) * total))
  let seen = 0
  for (const [bound, c] of h.buckets) {
    seen += c
    if (seen >= rank) return bound
  }
  return h.buckets[h.buckets.length - 1][0]
}
