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
import { type ChildProcess, fork } from 'node:child_process'
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
  /**
   * Chaos: about this often (ms, at random between half and one and a half times it), the prefill process is
   * killed (SIGKILL; a new one takes its place) or stopped for up to 2 s (SIGSTOP, then SIGCONT), at a random
   * moment of its requests. Off by default.
   */
  chaosMs?: number
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

/** What chaos did, and how the requests of a killed prefill ended at the decode. */
export interface SoakChaos {
  kills: number
  stops: number
  /**
   * Requests of a killed prefill, by their end at the decode: `failed` (the decode was told its link ended),
   * `complete`, `aborted` or `revoked` (as planned, before the kill), `unheard` (it never reached the decode;
   * the soak revoked it).
   */
  killedRequests: Record<string, number>
  /** From a kill to the decode holding none of the killed prefill's requests open (ms): p50 and max. */
  endedAfterKillMs: { p50: number; max: number } | null
}

/** A whole run: every interval, the totals, and what failed it. */
export interface SoakResult {
  samples: SoakSample[]
  chaos?: SoakChaos
  requests: Record<string, number>
  calls: number
  bytes: number
  errors: Record<string, number>
  /** Layers whose bytes did not check, requests that never ended, growth past the bounds, a crashed prefill. */
  failures: string[]
}

/** @internal What the soak sends the prefill process. */
export interface SoakPlan {
  /** Names this prefill process's requests and instances (a new one after each kill). */
  name: string
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

/** How a request may end at the decode when its prefill was killed (never hung). */
const KILLED_ENDS = ['complete', 'failed', 'aborted', 'revoked']
/** How long the decode may hold a killed prefill's requests open (it must be told they failed). */
const KILLED_TOLD_MS = 5_000
/** The longest a chaos stop lasts (well within the stall timeout: the link lives on). */
const STOP_MS = 2_000

/** How long before the end chaos stops: room for the last kill (up to `KILLED_TOLD_MS` and a second) and for the next process to serve. */
function chaosMarginMs(chaosMs: number): number {
  return Math.max(3 * chaosMs, KILLED_TOLD_MS + 7_000)
}

/** The shortest run chaos every `chaosMs` has room in. */
export function chaosMinDurationMs(chaosMs: number): number {
  return chaosMarginMs(chaosMs) + 2 * chaosMs
}

/** One prefill process of the run. */
interface Prefill {
  /** Names its requests. */
  name: string
  child: ChildProcess
  /** Killed by chaos (its exit is no failure). */
  killed: boolean
  /** Its requests the decode follows, until each ends. */
  following: Map<string, Promise<void>>
  /** Resolves once it ended and every message it sent was heard. */
  closed: Promise<void>
}

/** A request's end on either side, and what was due. */
interface End {
  /** The prefill process that started it. */
  by: Prefill
  expected: (typeof EXPECTED)[keyof typeof EXPECTED]
  decode?: string
  prefill?: string
  /** Its prefill was killed (which may also lose the notifications of writes that returned). */
  killed?: boolean
  /** Its prefill was killed before the decode heard of it: the soak revoked it. */
  unheard?: boolean
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
  // 2 MiB a write: over TCP a call is split over the link's connections (from 2 MiB).
  const blocksPerRequest = options.blocksPerRequest ?? 64
  const blockBytes = options.blockBytes ?? 16 * 1024
  const durationMs = options.durationMs ?? 60_000
  const intervalMs = options.intervalMs ?? 10_000
  const revokeRate = options.revokeRate ?? 0.1
  const seed = options.seed ?? Date.now() % 2 ** 31
  const chaosMs = options.chaosMs ?? 0
  if (!(chaosMs === 0 || chaosMs >= 100)) throw new Error(`chaos must be at least 100 ms apart, not ${chaosMs}`)
  const chaosMargin = chaosMarginMs(chaosMs)
  if (chaosMs > 0 && durationMs < chaosMinDurationMs(chaosMs)) throw new Error(`chaos needs a duration of at least ${chaosMinDurationMs(chaosMs)} ms`)
  const chaos = chaosMs > 0 ? { kills: 0, stops: 0, killedRequests: {} as Record<string, number>, afterKill: [] as number[] } : undefined
  // Whether the prefill process now alive completed a request (the survivors serve new peers).
  let completedLast = false
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
  let finished: (error?: string) => void = () => {}
  const done = new Promise<string | undefined>((resolve) => (finished = resolve))
  const timers = new Set<NodeJS.Timeout>()
  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      const t = setTimeout(() => (timers.delete(t), resolve()), ms)
      timers.add(t)
    })
  // The prefill processes: one at a time, a new one after each kill.
  const prefills: Prefill[] = []
  const current = () => prefills[prefills.length - 1]
  const send = (to: Prefill | undefined, m: object) => {
    if (to?.child.connected) to.child.send(m, (e) => e && !to.killed && finished(`the prefill process: ${e.message}`))
  }
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
    // What chaos did lately, for the message of a failure it may explain.
    const chaosLog: Array<{ at: number; what: string }> = []
    const told = (what: string) => {
      chaosLog.push({ at: Date.now(), what })
      if (chaosLog.length > 64) chaosLog.shift()
    }
    // Requests being followed (each forgotten once it ends: a long soak holds only the live ones).
    const following = new Set<Promise<void>>()
    // How each request ended on either side, judged once both have.
    const ends = new Map<string, End>()
    const judge = (request: string) => {
      const e = ends.get(request)
      if (!e || e.decode === undefined || e.prefill === undefined) return
      ends.delete(request)
      if (e.killed) {
        // Its prefill died: any end but a hang will do (a completed one was checked), and it is counted.
        const how = e.unheard && e.decode === 'revoked' ? 'unheard' : e.decode
        if (chaos) chaos.killedRequests[how] = (chaos.killedRequests[how] ?? 0) + 1
        if (!KILLED_ENDS.includes(e.decode)) result.failures.push(`${request}: its prefill was killed, and it ended ${e.decode} at the decode`)
        return
      }
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
    const follow = async (from: Prefill, request: string, blocks: number[], revoke: boolean) => {
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
        const asked = Date.now()
        await d.revoke(request, { signal: AbortSignal.timeout(REQUEST_DEADLINE_MS) }).catch((e: unknown) => {
          const during = chaosLog.filter((c) => c.at >= asked - STOP_MS).map((c) => `${c.what} at ${c.at - start} ms`)
          const meanwhile = during.length ? `; chaos meanwhile: ${during.join(', ')}` : ''
          result.failures.push(`${request}: revoke asked at ${asked - start} ms failed: ${e instanceof Error ? e.message : String(e)}${meanwhile}`)
        })
      }
      endedNow(how)
      if (how === 'complete' && from === current()) completedLast = true
      const e = ends.get(request)
      if (e) e.decode = how
      judge(request)
      from.following.delete(request)
      send(from, { type: 'released', request })
    }
    let samples: Extract<PrefillReport, { type: 'sample' }> | undefined
    let sampled: (() => void) | undefined
    let seq = 0
    /** Starts a prefill process for the rest of the run. */
    const startPrefill = () => {
      const name = `g${prefills.length}`
      // Its own output goes to standard error: standard output may be the soak's JSON.
      const child = fork(join(__dirname, 'soak-prefill.js'), [], { stdio: ['ignore', 2, 2, 'ipc'] })
      const self: Prefill = { name, child, killed: false, following: new Map(), closed: new Promise((resolve) => child.once('close', () => resolve())) }
      prefills.push(self)
      told(`started ${name}`)
      child.once('exit', (code, signal) => self.killed || finished(`the prefill process ended (${signal ?? `exit code ${code}`}) before its last request`))
      child.on('error', (e) => self.killed || finished(`the prefill process: ${e.message}`))
      child.on('message', (m: PrefillReport) => {
        if (m.type === 'start') {
          const revoke = m.plan === 'complete' && rand() < revokeRate
          ends.set(m.request, { by: self, expected: EXPECTED[revoke ? 'revoke' : m.plan] })
          const f: Promise<void> = follow(self, m.request, m.blocks, revoke).finally(() => following.delete(f))
          following.add(f)
          self.following.set(m.request, f)
        } else if (m.type === 'end') {
          const e = ends.get(m.request)
          if (e) e.prefill = m.end
          judge(m.request)
        } else if (m.type === 'sample' && m.seq === seq && self === current()) {
          samples = m
          sampled?.()
        } else if (m.type === 'finished') finished()
        else if (m.type === 'crashed') finished(m.error)
      })
      const durationLeft = Math.max(0, start + durationMs - Date.now())
      send(self, {
        type: 'plan',
        plan: { name, port: d.port, peers, layers, blocksPerPeer, blocksPerRequest, blockBytes, transport: options.transport, durationMs: durationLeft, abortRate: options.abortRate ?? 0.1, reconnectRate: options.reconnectRate ?? 0.05, seed: seed + prefills.length } satisfies SoakPlan,
      })
    }
    /**
     * Kills the prefill process: each of its requests must end at the decode (it is told the link is gone);
     * those that never reached it are revoked after a few seconds. A new process starts once they all ended
     * (it writes the same blocks).
     */
    const kill = async () => {
      const victim = current()
      victim.killed = true
      victim.child.kill('SIGKILL')
      told(`killed ${victim.name}`)
      const killedAt = Date.now()
      await victim.closed
      for (const [request, e] of ends) {
        if (e.by !== victim) continue
        e.killed = true
        e.prefill ??= 'killed'
        judge(request)
      }
      // Every request the decode heard of ends (it is told the link is gone); the rest never reached it.
      const open = () => d.stats().peers.reduce((n, p) => n + p.requests.started - p.requests.done - p.requests.failed - p.requests.aborted - p.requests.revoked - p.requests.expired, 0)
      while (open() > 0 && Date.now() - killedAt < KILLED_TOLD_MS) await sleep(20)
      const left = open()
      chaos!.afterKill.push(Date.now() - killedAt)
      if (left > 0) result.failures.push(`the decode still held ${left} requests of a killed prefill open ${KILLED_TOLD_MS / 1000} s after the kill`)
      // The decode ended every request it heard of; the soak's own waits for them catch up. Those still waited
      // for never reached it.
      await Promise.race([Promise.all(victim.following.values()), sleep(1_000)])
      for (const request of victim.following.keys()) {
        const e = ends.get(request)
        if (e) e.unheard = true
        await d.revoke(request, { signal: AbortSignal.timeout(REQUEST_DEADLINE_MS) }).catch(() => {})
      }
      await Promise.all(victim.following.values())
      chaos!.kills++
      completedLast = false
      startPrefill()
    }
    const stop = async () => {
      const victim = current()
      victim.child.kill('SIGSTOP')
      told(`stopped ${victim.name}`)
      await sleep(STOP_MS * rand())
      victim.child.kill('SIGCONT')
      told(`resumed ${victim.name}`)
      chaos!.stops++
    }
    startPrefill()
    const sample = async (): Promise<SoakSample> => {
      samples = undefined
      const got = new Promise<void>((resolve) => (sampled = resolve))
      send(current(), { type: 'sample', seq: ++seq })
      await Promise.race([got, sleep(5_000)])
      const s = samples as Extract<PrefillReport, { type: 'sample' }> | undefined
      const sorted = [...(s?.latencies ?? [])].sort((a, b) => a - b)
      const pid = current().child.pid
      const row: SoakSample = {
        elapsedMs: Date.now() - start,
        requests: interval,
        calls: s?.calls ?? 0,
        bytes: s?.bytes ?? 0,
        errors: s?.errors ?? {},
        latencyUs: sorted.length ? { p50: quantile(sorted, 0.5), p99: quantile(sorted, 0.99) } : null,
        decode: footprint('self') ?? { rssBytes: NaN, peakRssBytes: NaN, threads: NaN, descriptors: NaN },
        prefill: pid !== undefined ? footprint(pid) : null,
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
    // Chaos until shortly before the last requests start; the process then alive finishes the run.
    const chaosRun = (async () => {
      if (!chaos) return
      const until = start + durationMs - chaosMargin
      for (;;) {
        await Promise.race([done, sleep(chaosMs * (0.5 + rand()))])
        if (over !== null || Date.now() >= until) return
        await (rand() < 0.5 ? kill() : stop())
      }
    })().catch((e: unknown) => {
      result.failures.push(`chaos failed: ${e instanceof Error ? e.message : String(e)}`)
    })
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
    await chaosRun
    await Promise.race([Promise.all(following), sleep(2 * REQUEST_DEADLINE_MS).then(() => result.failures.push('a request was still being followed at the end'))])
    await sample()
    // A prefill process replaced by chaos is not one that grew: its side is judged only without chaos.
    result.failures.push(...growth(chaos ? running.map((s) => ({ ...s, prefill: null })) : running))
    for (const request of ends.keys()) result.failures.push(`${request}: its end was not told by both sides`)
    if ((result.requests.complete ?? 0) === 0) result.failures.push('no request completed')
    if (chaos) {
      const sorted = [...chaos.afterKill].sort((a, b) => a - b)
      result.chaos = {
        kills: chaos.kills,
        stops: chaos.stops,
        killedRequests: chaos.killedRequests,
        endedAfterKillMs: sorted.length ? { p50: quantile(sorted, 0.5), max: sorted[sorted.length - 1] } : null,
      }
      // The survivors serve new peers: the process started after the last kill completed requests.
      if (chaos.kills > 0 && !completedLast) result.failures.push('no request of the prefill started after the last kill completed')
    }
    return result
  } finally {
    for (const t of timers) clearTimeout(t)
    for (const p of prefills) {
      if (p.child.connected) p.child.disconnect()
      if (!p.killed) p.child.kill('SIGCONT')
    }
    const last = current()
    if (last) {
      const gone = new Promise((r) => (last.child.exitCode !== null || last.child.signalCode !== null ? r(null) : last.child.once('exit', r)))
      const t = setTimeout(() => last.child.kill('SIGKILL'), 10_000)
      await gone
      clearTimeout(t)
    }
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
