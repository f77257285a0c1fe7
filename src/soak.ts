/**
 * `kvtransfer soak`: mixed traffic for a while, checked and watched. A decode here and `peers` prefill
 * communicators in a second process run requests of `layers` layers into it, one after another per peer:
 * most complete, some are aborted by their prefill part-way, some lose their connection mid-request (the peer
 * connects again), and the decode revokes some after their first layer. Every layer of a request that
 * completes is checked byte for byte against what the prefill computed; every other request must end in a
 * rejected `waitFor`, and is revoked before its blocks are used again. Every interval, and at the end: requests
 * by how they ended, calls and bytes, errors by code, write latency (p50, p99), and each process's memory
 * (RSS and its peak), threads and descriptors. The run fails on any byte that does not check, any request that
 * neither completes nor ends within its deadline, and any growth of memory, threads or descriptors past a
 * bound once warmed up.
 */
import { fork } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { Communicator, type DecodeCommunicator } from './communicator.js'
import { KVTransferError } from './errors.js'
import { HostBuffer } from './host-buffer.js'
import type { Transport } from './options.js'

/** What a soak runs. */
export interface SoakOptions {
  /** How long the prefills start new requests (default 60 s). */
  durationMs?: number
  /** Prefill communicators writing into the decode at once (default 4). */
  peers?: number
  /** How often a line is printed (default 10 s). */
  intervalMs?: number
  /** The transport (default: the decode's automatic choice). */
  transport?: Transport
  /** Layers of a request, blocks of a request, bytes of a block (default 4, 32, 16 KiB). */
  layers?: number
  blocksPerRequest?: number
  blockBytes?: number
  /** Shares of requests aborted by their prefill, whose connection is closed mid-request, revoked by the decode. */
  abortRate?: number
  reconnectRate?: number
  revokeRate?: number
  /** Seeds the run's choices (default: from the clock). */
  seed?: number
  /** Told each interval's figures, and the last. */
  onSample?: (s: SoakSample) => void
}

/** One process's footprint. */
export interface Footprint {
  rssBytes: number
  peakRssBytes: number
  threads: number
  descriptors: number
}

/** One interval's figures (the counts are of that interval). */
export interface SoakSample {
  elapsedMs: number
  requests: Record<string, number>
  calls: number
  bytes: number
  errors: Record<string, number>
  latencyUs: { p50: number; p99: number } | null
  decode: Footprint
  prefill: Footprint | null
}

/** A whole run: every interval, the totals, and what failed it. */
export interface SoakResult {
  samples: SoakSample[]
  requests: Record<string, number>
  calls: number
  bytes: number
  errors: Record<string, number>
  /** Layers whose bytes did not check, requests that never ended, growth past the bounds, a crashed prefill. */
  failures: string[]
}

/** @internal What the soak sends the prefill process. */
export interface SoakPlan {
  port: number
  peers: number
  layers: number
  blocksPerPeer: number
  blocksPerRequest: number
  blockBytes: number
  transport?: Transport
  durationMs: number
  abortRate: number
  reconnectRate: number
  seed: number
}

/** @internal What a request's prefill means to do with it: complete it, abort it, or lose its connection. */
export type RequestPlan = 'complete' | 'abort' | 'reconnect'

/** @internal What the prefill process reports. */
export type PrefillReport =
  | { type: 'start'; request: string; peer: number; blocks: number[]; plan: RequestPlan }
  | { type: 'end'; request: string; peer: number; end: string }
  | { type: 'sample'; seq: number; calls: number; bytes: number; errors: Record<string, number>; latencies: number[] }
  | { type: 'finished' }
  | { type: 'crashed'; error: string }

/**
 * @internal Stands in for the model: the bytes of block `i` (in request order) of one layer's keys (`tensor`
 * 0) or values (1) of `request`. Both sides compute it, so the decode knows what the prefill wrote.
 */
export function modelBlock(request: string, layer: number, tensor: number, i: number, out: Buffer): void {
  let x = createHash('sha1').update(`${request}/${layer}/${tensor}/${i}`).digest().readUInt32LE(0) || 1
  for (let o = 0; o + 4 <= out.length; o += 4) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    out.writeUInt32LE(x, o)
  }
}

/** How a request ended, by the code its `waitFor` rejected with. */
const ENDS: Record<string, string> = { TRANSPORT: 'failed', ABORTED: 'aborted', REVOKED: 'revoked', EXPIRED: 'expired' }

/** How long a request may take, from its start to its end, before the run calls it hung. */
const REQUEST_DEADLINE_MS = 30_000

/**
 * How each request must end, at the decode and at its prefill, by its plan: a request revoked by the decode
 * may also have been written whole before the revoke reached its prefill.
 */
const EXPECTED: Record<RequestPlan | 'revoke', { decode: string; prefill: string[] }> = {
  complete: { decode: 'complete', prefill: ['complete'] },
  abort: { decode: 'aborted', prefill: ['aborted'] },
  reconnect: { decode: 'failed', prefill: ['reconnected'] },
  revoke: { decode: 'revoked', prefill: ['revoked', 'complete'] },
}

/** The footprint of process `pid` (Linux: from /proc), or null where it cannot be read. */
export function footprint(pid: number | 'self'): Footprint | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? NaN)
    return { rssBytes: field('VmRSS') * 1024, peakRssBytes: field('VmHWM') * 1024, threads: field('Threads'), descriptors: readdirSync(`/proc/${pid}/fd`).length }
  } catch {
    return null
  }
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))]
}

function add(into: Record<string, number>, from: Record<string, number>): void {
  for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v
}

/** Runs the soak; see {@link SoakOptions}. */
export async function runSoak(options: SoakOptions = {}): Promise<SoakResult> {
  const peers = options.peers ?? 4
  const layers = options.layers ?? 4
  const blocksPerRequest = options.blocksPerRequest ?? 32
  const blockBytes = options.blockBytes ?? 16 * 1024
  const durationMs = options.durationMs ?? 60_000
  const intervalMs = options.intervalMs ?? 10_000
  const revokeRate = options.revokeRate ?? 0.1
  const seed = options.seed ?? Date.now() % 2 ** 31
  if (!(Number.isInteger(peers) && peers >= 1 && peers <= 64)) throw new Error(`peers must be from 1 to 64, not ${peers}`)
  if (!(Number.isInteger(layers) && layers >= 2 && layers <= 64)) throw new Error(`layers must be from 2 to 64, not ${layers}`)
  // Growth is judged between samples taken while traffic runs: at least two of them.
  if (intervalMs * 2 > durationMs) throw new Error(`the interval (${intervalMs} ms) must be at most half the duration (${durationMs} ms)`)
  // Each peer's range of the decode holds a request with room to scatter it.
  const blocksPerPeer = blocksPerRequest * 2
  const keys = Array.from({ length: layers }, () => HostBuffer.alloc(peers * blocksPerPeer * blockBytes))
  const values = Array.from({ length: layers }, () => HostBuffer.alloc(peers * blocksPerPeer * blockBytes))
  const result: SoakResult = { samples: [], requests: {}, calls: 0, bytes: 0, errors: {}, failures: [] }
  let interval: Record<string, number> = {}
  const endedNow = (how: string) => {
    result.requests[how] = (result.requests[how] ?? 0) + 1
    interval[how] = (interval[how] ?? 0) + 1
  }
  let decode: DecodeCommunicator | undefined
  // The prefill's own output goes to standard error: standard output may be the soak's JSON.
  const child = fork(join(__dirname, 'soak-prefill.js'), [], { stdio: ['ignore', 2, 2, 'ipc'] })
  let finished: (error?: string) => void = () => {}
  const done = new Promise<string | undefined>((resolve) => (finished = resolve))
  child.once('exit', (code, signal) => finished(`the prefill process ended (${signal ?? `exit code ${code}`}) before its last request`))
  child.on('error', (e) => finished(`the prefill process: ${e.message}`))
  const send = (m: object) => {
    if (child.connected) child.send(m, (e) => e && finished(`the prefill process: ${e.message}`))
  }
  const timers = new Set<NodeJS.Timeout>()
  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      const t = setTimeout(() => (timers.delete(t), resolve()), ms)
      timers.add(t)
    })
  try {
    // Ended requests are forgotten after a few seconds, so that what a request leaves behind shows as growth.
    decode = await Communicator.decodeAsync({ keys, values, blockNumber: peers * blocksPerPeer, blockBytes, port: 0, socketIfname: 'lo', transport: options.transport, requestTtlMs: 5_000 })
    const d = decode
    const start = Date.now()
    let random = seed >>> 0 || 1
    const rand = () => {
      random = (Math.imul(random, 1103515245) + 12345) >>> 0
      return random / 2 ** 32
    }
    // Requests being followed (each forgotten once it ends: a long soak holds only the live ones).
    const following = new Set<Promise<void>>()
    // How each request ended on either side, judged once both have.
    const ends = new Map<string, { expected: (typeof EXPECTED)[keyof typeof EXPECTED]; decode?: string; prefill?: string }>()
    const judge = (request: string) => {
      const e = ends.get(request)
      if (!e || e.decode === undefined || e.prefill === undefined) return
      ends.delete(request)
      if (e.decode !== e.expected.decode) result.failures.push(`${request}: ended ${e.decode} at the decode, where ${e.expected.decode} was due`)
      if (!e.expected.prefill.includes(e.prefill)) result.failures.push(`${request}: ended ${e.prefill} at its prefill, where ${e.expected.prefill.join(' or ')} was due`)
    }
    const want = Buffer.alloc(blockBytes)
    /** The blocks of `layer` that do not hold what the prefill computed for `request`. */
    const check = (request: string, layer: number, blocks: number[], when: string) => {
      for (const [t, tensor] of [keys, values].entries()) {
        blocks.forEach((id, i) => {
          modelBlock(request, layer, t, i, want)
          if (!tensor[layer].buffer.subarray(id * blockBytes, (id + 1) * blockBytes).equals(want)) {
            result.failures.push(`${request}: layer ${layer}, ${t === 0 ? 'key' : 'value'} block ${id} does not hold the prefill's bytes ${when}`)
          }
        })
      }
    }
    // The decode's side of one request: each layer awaited and checked, or its end seen; then its blocks freed.
    const follow = async (request: string, blocks: number[], revoke: boolean) => {
      const deadline = Date.now() + REQUEST_DEADLINE_MS
      let how = 'complete'
      try {
        for (let layer = 0; layer < layers; layer++) {
          await d.waitFor(request, { layers: [layer], timeoutMs: Math.max(1, deadline - Date.now()) })
          check(request, layer, blocks, 'once its layer arrived')
          if (revoke) {
            how = 'revoked'
            break
          }
        }
        // Nothing of another request landed in them meanwhile (a late write of a revoked one, say).
        if (how === 'complete') for (let layer = 0; layer < layers; layer++) check(request, layer, blocks, 'when the request ended')
      } catch (e) {
        if (e instanceof KVTransferError && e.code === 'TIMEOUT') {
          how = 'hung'
          result.failures.push(`${request}: neither complete nor ended within ${REQUEST_DEADLINE_MS / 1000} s`)
        } else how = e instanceof KVTransferError ? (ENDS[e.code] ?? e.code.toLowerCase()) : `error (${String(e)})`
      }
      // Whatever did not complete is revoked before its blocks are used again: once that resolves, none of
      // its writes can land later.
      if (how !== 'complete') {
        await d.revoke(request, { signal: AbortSignal.timeout(REQUEST_DEADLINE_MS) }).catch((e: unknown) => {
          result.failures.push(`${request}: revoke failed: ${e instanceof Error ? e.message : String(e)}`)
        })
      }
      endedNow(how)
      const e = ends.get(request)
      if (e) e.decode = how
      judge(request)
      send({ type: 'released', request })
    }
    let samples: Extract<PrefillReport, { type: 'sample' }> | undefined
    let sampled: (() => void) | undefined
    let seq = 0
    child.on('message', (m: PrefillReport) => {
      if (m.type === 'start') {
        const revoke = m.plan === 'complete' && rand() < revokeRate
        ends.set(m.request, { expected: EXPECTED[revoke ? 'revoke' : m.plan] })
        const f: Promise<void> = follow(m.request, m.blocks, revoke).finally(() => following.delete(f))
        following.add(f)
      } else if (m.type === 'end') {
        const e = ends.get(m.request)
        if (e) e.prefill = m.end
        judge(m.request)
      } else if (m.type === 'sample' && m.seq === seq) {
        samples = m
        sampled?.()
      } else if (m.type === 'finished') finished()
      else if (m.type === 'crashed') finished(m.error)
    })
    send({
      type: 'plan',
      plan: { port: d.port, peers, layers, blocksPerPeer, blocksPerRequest, blockBytes, transport: options.transport, durationMs, abortRate: options.abortRate ?? 0.1, reconnectRate: options.reconnectRate ?? 0.05, seed } satisfies SoakPlan,
    })
    const sample = async (): Promise<SoakSample> => {
      samples = undefined
      const got = new Promise<void>((resolve) => (sampled = resolve))
      send({ type: 'sample', seq: ++seq })
      await Promise.race([got, sleep(5_000)])
      const s = samples as Extract<PrefillReport, { type: 'sample' }> | undefined
      const sorted = [...(s?.latencies ?? [])].sort((a, b) => a - b)
      const row: SoakSample = {
        elapsedMs: Date.now() - start,
        requests: interval,
        calls: s?.calls ?? 0,
        bytes: s?.bytes ?? 0,
        errors: s?.errors ?? {},
        latencyUs: sorted.length ? { p50: quantile(sorted, 0.5), p99: quantile(sorted, 0.99) } : null,
        decode: footprint('self') ?? { rssBytes: NaN, peakRssBytes: NaN, threads: NaN, descriptors: NaN },
        prefill: child.pid !== undefined ? footprint(child.pid) : null,
      }
      interval = {}
      result.calls += row.calls
      result.bytes += row.bytes
      add(result.errors, row.errors)
      result.samples.push(row)
      options.onSample?.(row)
      return row
    }
    let over: string | undefined | null = null
    void done.then((e) => (over = e))
    // The samples taken while traffic runs are the ones growth is judged on (at the end the prefill has
    // closed its communicators, and what they leaked is gone with them).
    const running: SoakSample[] = []
    const limit = start + durationMs + 2 * REQUEST_DEADLINE_MS + 30_000
    while (over === null) {
      await Promise.race([done, sleep(intervalMs)])
      if (over !== null) break
      running.push(await sample())
      if (Date.now() > limit) {
        over = `the run did not end within ${((limit - start) / 1000).toFixed(0)} s`
        break
      }
    }
    if (over) result.failures.push(over)
    await Promise.race([Promise.all(following), sleep(2 * REQUEST_DEADLINE_MS).then(() => result.failures.push('a request was still being followed at the end'))])
    await sample()
    result.failures.push(...growth(running))
    for (const request of ends.keys()) result.failures.push(`${request}: its end was not told by both sides`)
    if ((result.requests.complete ?? 0) === 0) result.failures.push('no request completed')
    return result
  } finally {
    for (const t of timers) clearTimeout(t)
    if (child.connected) child.disconnect()
    const gone = new Promise((r) => (child.exitCode !== null || child.signalCode !== null ? r(null) : child.once('exit', r)))
    const t = setTimeout(() => child.kill('SIGKILL'), 10_000)
    await gone
    clearTimeout(t)
    try {
      await decode?.close()
    } finally {
      for (const hb of [...keys, ...values]) hb.free()
    }
  }
}

/**
 * Growth past the bounds, from the first sample on (the warm-up) to the last: memory by more than half and
 * 64 MiB, threads by more than 8, descriptors by more than 16, in either process.
 */
export function growth(samples: SoakSample[]): string[] {
  if (samples.length < 2) return []
  const [first, last] = [samples[0], samples[samples.length - 1]]
  const out: string[] = []
  for (const side of ['decode', 'prefill'] as const) {
    const a = first[side]
    const b = last[side]
    if (!a || !b) continue
    if (b.rssBytes > a.rssBytes * 1.5 + 64 * 2 ** 20) out.push(`the ${side}'s memory grew from ${(a.rssBytes / 2 ** 20).toFixed(0)} to ${(b.rssBytes / 2 ** 20).toFixed(0)} MiB`)
    if (b.threads > a.threads + 8) out.push(`the ${side}'s threads grew from ${a.threads} to ${b.threads}`)
    if (b.descriptors > a.descriptors + 16) out.push(`the ${side}'s descriptors grew from ${a.descriptors} to ${b.descriptors}`)
  }
  return out
}

/** One line of figures. */
export function formatSample(s: SoakSample): string {
  const mib = (f: Footprint | null) => (f ? `${(f.rssBytes / 2 ** 20).toFixed(0)} MiB (peak ${(f.peakRssBytes / 2 ** 20).toFixed(0)}), ${f.threads} threads, ${f.descriptors} fds` : '-')
  const counts = (r: Record<string, number>) => Object.entries(r).map(([k, v]) => `${k} ${v}`).join(', ') || 'none'
  return [
    `${(s.elapsedMs / 1000).toFixed(0)} s: requests ${counts(s.requests)}; ${s.calls} calls, ${(s.bytes / 1e9).toFixed(2)} GB; errors ${counts(s.errors)}`,
    `  write p50 ${s.latencyUs ? s.latencyUs.p50.toFixed(0) : '-'} µs, p99 ${s.latencyUs ? s.latencyUs.p99.toFixed(0) : '-'} µs; decode ${mib(s.decode)}; prefill ${mib(s.prefill)}`,
  ].join('\n')
}
