/**
 * `kvtransfer soak`: mixed traffic for a while, checked and watched. This process runs the others and judges:
 * a decode process holds the decodes (one, or `decodes`, each a cache of its own), and `peers` prefill
 * communicators in each of `prefills` prefill processes (one by default) run requests of `layers` layers into
 * them, one after another per peer, each peer's requests going to the decodes in turn:
 * most complete, some are aborted by their prefill part-way, some lose their connection mid-request (the peer
 * connects again), and the decode revokes some after their first layer. Every layer of a request that
 * completes is checked byte for byte against what the prefill computed; every other request must end in a
 * rejected `waitFor`, and is revoked before its blocks are used again. Every interval, and at the end: requests
 * by how they ended, calls and bytes, errors by code, write latency (p50, p99), and each process's memory
 * (RSS and its peak), threads and descriptors. The run fails on any byte that does not check, any request that
 * neither completes nor ends within its deadline, and any growth of memory, threads or descriptors past a
 * bound once warmed up, or any queue pair, registered region or data connection the decodes still hold once every
 * prefill has gone.
 */
import { type ChildProcess, fork } from 'node:child_process'
import { createHash } from 'node:crypto'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import type { Transport } from './options.js'
import type { Resources } from './system.js'

/** What a soak runs. */
export interface SoakOptions {
  /** How long the prefills start new requests (default 60 s). */
  durationMs?: number
  /** Prefill communicators in each prefill process (default 4). */
  peers?: number
  /** Prefill processes at once (default 1; from 1 to 32). Chaos kills and stops one process, so it needs one. */
  prefills?: number
  /** Decode communicators, each with a cache of its own, in the decode process (default 1; from 1 to 16). */
  decodes?: number
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
   * Chaos: about this often (ms, at random between half and one and a half times it), the prefill process or
   * the decode process is killed (SIGKILL; a new one takes its place, a decode on the same ports) or stopped for
   * up to 2 s (SIGSTOP, then SIGCONT), at a random moment of its requests: in rounds of six (the prefill killed,
   * the decode killed, the prefill stopped, the decode stopped, the prefill killed, stopped), the decode only until
   * three intervals before the end (so that the one serving last is sampled twice). Off by default.
   */
  chaosMs?: number
  /** Told each interval's figures, and the last. */
  onSample?: (s: SoakSample) => void
}

/** One process's footprint (or the prefill processes' together: their sums). */
export interface Footprint {
  rssBytes: number
  peakRssBytes: number
  threads: number
  descriptors: number
  /** What it held through kvtransfer (null where it did not say). */
  resources: Resources | null
}

/** One interval's figures (the counts are of that interval). */
export interface SoakSample {
  elapsedMs: number
  requests: Record<string, number>
  calls: number
  bytes: number
  errors: Record<string, number>
  latencyUs: { p50: number; p99: number } | null
  /** The decode process (null where it did not answer). */
  decode: Footprint | null
  /** The prefill processes, together. */
  prefill: Footprint | null
}

/** What chaos did, and how the requests of a killed process ended. */
export interface SoakChaos {
  /** Kills and stops of the prefill process. */
  kills: number
  stops: number
  /** Kills and stops of the decode process. */
  decodeKills: number
  decodeStops: number
  /**
   * Requests of a killed prefill, by their end at the decode: `failed` (the decode was told its link ended),
   * `complete`, `aborted` or `revoked` (as planned, before the kill), `unheard` (it never reached the decode;
   * the soak revoked it).
   */
  killedRequests: Record<string, number>
  /** From a kill to the decode holding none of the killed prefill's requests open (ms): p50 and max. */
  endedAfterKillMs: { p50: number; max: number } | null
  /**
   * Requests a killed decode was following, by how their prefill ended them: `complete` (every write had
   * returned), or the code of the write that failed (`transport`, `timeout`, `unreachable`, …).
   */
  lostRequests: Record<string, number>
  /** From a decode's kill to its prefill having ended every request the decode was following (ms): p50 and max. */
  prefillEndedAfterDecodeKillMs: { p50: number; max: number } | null
  /** From a decode's kill to a request completing on the decode that replaced it (ms): p50 and max. */
  servingAgainAfterDecodeKillMs: { p50: number; max: number } | null
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
  /** The decodes' ports. */
  ports: number[]
  peers: number
  /** The index of its first peer among all the prefill processes' (its range of each decode's blocks). */
  firstPeer: number
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

/** @internal What the soak sends the decode process. */
export interface DecodePlan {
  /** One per decode: 0 for any free port (the first process), the same ones again for a process that replaces a killed one. */
  ports: number[]
  layers: number
  blockNumber: number
  blockBytes: number
  transport?: Transport
  requestDeadlineMs: number
}

/** @internal What the soak asks of the decode process. */
export type DecodeOrder =
  | { type: 'plan'; plan: DecodePlan }
  | { type: 'follow'; request: string; at: number; blocks: number[]; revoke: boolean }
  | { type: 'revoke'; request: string; at: number }
  | { type: 'open'; seq: number }
  | { type: 'sample'; seq: number }
  | { type: 'let-go'; ms: number }

/** @internal What the decode process reports. */
export type DecodeReport =
  | { type: 'ready'; ports: number[] }
  | { type: 'ended'; request: string; how: string; failures: string[]; revokeFailed?: { askedAt: number; message: string } }
  | { type: 'open'; seq: number; open: number }
  | { type: 'sample'; seq: number; footprint: Footprint | null }
  | { type: 'let-go'; left: string[] }
  | { type: 'crashed'; error: string }

/** @internal What a request's prefill means to do with it: complete it, abort it, or lose its connection. */
export type RequestPlan = 'complete' | 'abort' | 'reconnect'

/** @internal What the prefill process reports. */
export type PrefillReport =
  | { type: 'start'; request: string; peer: number; decode: number; blocks: number[]; plan: RequestPlan }
  | { type: 'end'; request: string; peer: number; end: string }
  | { type: 'sample'; seq: number; calls: number; bytes: number; errors: Record<string, number>; latencies: number[]; resources: Resources }
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

/** A child process of the run: the decode process, or a prefill process. */
interface Child {
  /** Names it in the chaos log (a prefill's also names its requests: a new one after each kill). */
  name: string
  child: ChildProcess
  /** Killed by chaos (its exit is no failure). */
  killed: boolean
  /** Resolves once it ended and every message it sent was heard. */
  closed: Promise<void>
}

/** One prefill process of the run. */
interface Prefill extends Child {
  /** Which of the run's prefill processes it is (a process that replaces a killed one takes its slot). */
  slot: number
  /** A request it started completed. */
  completed: boolean
  /** It ran its last request. */
  served: boolean
  /** Its requests the decode follows, each until the decode process says how it ended (or is killed). */
  following: Map<string, Promise<void>>
  /** Its answer to the sample asked last. */
  sample?: Extract<PrefillReport, { type: 'sample' }>
}

/** The decode process of the run (a new one, on the same ports, after each kill). */
interface Decode extends Child {
  /** Resolves with the decodes' ports once they listen. */
  ready: Promise<number[]>
}

/** A request's end on either side, and what was due. */
interface End {
  /** The prefill process that started it, the decode it went to, and the decode process that followed it. */
  by: Prefill
  at: number
  followedBy?: Decode
  expected: (typeof EXPECTED)[keyof typeof EXPECTED]
  decode?: string
  prefill?: string
  /** Its prefill was killed (which may also lose the notifications of writes that returned). */
  killed?: boolean
  /** Its prefill was killed before the decode heard of it: the soak revoked it. */
  unheard?: boolean
  /** The decode process following it was killed. */
  lost?: boolean
  /** It started while the decode process was being replaced: its prefill may have found no decode. */
  outage?: boolean
  /** Ends the soak's wait for it. */
  settle: () => void
}

/** The footprint of process `pid` (Linux: from /proc), or null where it cannot be read. */
export function footprint(pid: number | 'self', held: Resources | null = null): Footprint | null {
  try {
    const status = readFileSync(`/proc/${pid}/status`, 'utf8')
    const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? NaN)
    return { rssBytes: field('VmRSS') * 1024, peakRssBytes: field('VmHWM') * 1024, threads: field('Threads'), descriptors: readdirSync(`/proc/${pid}/fd`).length, resources: held }
  } catch {
    return null
  }
}

/** The footprints of several processes as one: their sums (null where none could be read). */
function together(each: Footprint[]): Footprint | null {
  if (each.length === 0) return null
  const sum = (f: (x: Footprint) => number) => each.reduce((n, x) => n + f(x), 0)
  const held = each.every((x) => x.resources) ? each.map((x) => x.resources as Resources) : null
  return {
    rssBytes: sum((x) => x.rssBytes),
    peakRssBytes: sum((x) => x.peakRssBytes),
    threads: sum((x) => x.threads),
    descriptors: sum((x) => x.descriptors),
    resources: held && {
      rdmaQueuePairs: held.reduce((n, r) => n + r.rdmaQueuePairs, 0),
      rdmaMemoryRegions: held.reduce((n, r) => n + r.rdmaMemoryRegions, 0),
      tcpDataConnections: held.reduce((n, r) => n + r.tcpDataConnections, 0),
      shmRings: held.reduce((n, r) => n + r.shmRings, 0),
    },
  }
}

function quantile(sorted: number[], q: number): number {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))]
}

function spread(values: number[]): { p50: number; max: number } | null {
  const sorted = [...values].sort((a, b) => a - b)
  return sorted.length ? { p50: quantile(sorted, 0.5), max: sorted[sorted.length - 1] } : null
}

function add(into: Record<string, number>, from: Record<string, number>): void {
  for (const [k, v] of Object.entries(from)) into[k] = (into[k] ?? 0) + v
}

/** How long the decodes may take, once every prefill has gone, to let go of what their links held. */
const LET_GO_MS = 10_000
/** How long a request that started while its decode was being replaced may stay open after its prefill ended it. */
const OUTAGE_GRACE_MS = 2_000

/** Runs the soak; see {@link SoakOptions}. */
export async function runSoak(options: SoakOptions = {}): Promise<SoakResult> {
  const peers = options.peers ?? 4
  const prefillCount = options.prefills ?? 1
  const decodeCount = options.decodes ?? 1
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
  const chaos =
    chaosMs > 0
      ? { kills: 0, stops: 0, decodeKills: 0, decodeStops: 0, killedRequests: {} as Record<string, number>, lostRequests: {} as Record<string, number>, afterKill: [] as number[], afterDecodeKill: [] as number[], servingAgain: [] as number[] }
      : undefined
  if (!(Number.isInteger(peers) && peers >= 1 && peers <= 64)) throw new Error(`peers must be from 1 to 64, not ${peers}`)
  if (!(Number.isInteger(prefillCount) && prefillCount >= 1 && prefillCount <= 32)) throw new Error(`prefills must be from 1 to 32, not ${prefillCount}`)
  if (!(Number.isInteger(decodeCount) && decodeCount >= 1 && decodeCount <= 16)) throw new Error(`decodes must be from 1 to 16, not ${decodeCount}`)
  // A kill is judged by the decodes' counts of the requests open from this host: one prefill process at a time.
  if (chaos && prefillCount > 1) throw new Error('chaos kills and stops the prefill process: it needs one (prefills 1)')
  if (!(Number.isInteger(layers) && layers >= 2 && layers <= 64)) throw new Error(`layers must be from 2 to 64, not ${layers}`)
  // Growth is judged between samples taken while traffic runs: at least two of them.
  if (intervalMs * 2 > durationMs) throw new Error(`the interval (${intervalMs} ms) must be at most half the duration (${durationMs} ms)`)
  // Each peer's range of each decode holds a request with room to scatter it.
  const blocksPerPeer = blocksPerRequest * 2
  const blockNumber = prefillCount * peers * blocksPerPeer
  const result: SoakResult = { samples: [], requests: {}, calls: 0, bytes: 0, errors: {}, failures: [] }
  let interval: Record<string, number> = {}
  const endedNow = (how: string) => {
    result.requests[how] = (result.requests[how] ?? 0) + 1
    interval[how] = (interval[how] ?? 0) + 1
  }
  let finished: (error?: string) => void = () => {}
  const done = new Promise<string | undefined>((resolve) => (finished = resolve))
  const timers = new Set<NodeJS.Timeout>()
  const sleep = (ms: number) =>
    new Promise<void>((resolve) => {
      const t = setTimeout(() => (timers.delete(t), resolve()), ms)
      timers.add(t)
    })
  // Every child process of the run; the prefill process now in each slot; the decode process now serving.
  const children: Child[] = []
  const slots: Prefill[] = []
  let decode: Decode | undefined
  // The prefill process started after the last kill (the survivors serve new peers).
  let lastStarted: Prefill | undefined
  const send = (to: Child | undefined, m: object) => {
    if (to?.child.connected) to.child.send(m, (e) => e && !to.killed && finished(`the ${to.name} process: ${e.message}`))
  }
  /** Forks `module` as a child of the run. */
  const spawn = (module: string, name: string): Child => {
    // Its own output goes to standard error: standard output may be the soak's JSON.
    const child = fork(join(__dirname, module), [], { stdio: ['ignore', 2, 2, 'ipc'] })
    const closed = new Promise<void>((resolve) => {
      child.once('close', () => resolve())
      // A child whose channel this process closed emits no 'close': its exit ends it (no message can come).
      child.once('exit', () => child.connected || resolve())
    })
    const self: Child = { name, child, killed: false, closed }
    children.push(self)
    child.once('exit', (code, signal) => self.killed || finished(`the ${name} process ended (${signal ?? `exit code ${code}`}) before the run did`))
    child.on('error', (e) => self.killed || finished(`the ${name} process: ${e.message}`))
    return self
  }
  /** Ends the child processes (each exits once disconnected; one that does not within 10 s is killed). */
  const endChildren = (which: Child[]) =>
    Promise.all(
      which.map(async (p) => {
        if (p.child.connected) p.child.disconnect()
        if (!p.killed) p.child.kill('SIGCONT')
        const t = setTimeout(() => p.child.kill('SIGKILL'), 10_000)
        await p.closed
        clearTimeout(t)
      }),
    )
  try {
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
    const chaosSince = (since: number) => {
      const during = chaosLog.filter((c) => c.at >= since - STOP_MS).map((c) => `${c.what} at ${c.at - start} ms`)
      return during.length ? `; chaos meanwhile: ${during.join(', ')}` : ''
    }
    // How each request ended on either side, judged once both have.
    const ends = new Map<string, End>()
    const judge = (request: string) => {
      const e = ends.get(request)
      if (!e || e.decode === undefined || e.prefill === undefined) return
      ends.delete(request)
      if (e.lost) {
        // Its decode died: its prefill ended it somehow (a hang is caught by the prefill's deadline), counted.
        if (chaos) chaos.lostRequests[e.prefill] = (chaos.lostRequests[e.prefill] ?? 0) + 1
        return
      }
      if (e.killed) {
        // Its prefill died: any end but a hang will do (a completed one was checked), and it is counted.
        const how = e.unheard && e.decode === 'revoked' ? 'unheard' : e.decode
        if (chaos) chaos.killedRequests[how] = (chaos.killedRequests[how] ?? 0) + 1
        if (!KILLED_ENDS.includes(e.decode)) result.failures.push(`${request}: its prefill was killed, and it ended ${e.decode} at the decode`)
        return
      }
      // A request that started while its decode was being replaced may have found none: any end but a hang.
      if (e.outage && e.decode !== e.expected.decode) return
      if (e.decode !== e.expected.decode) result.failures.push(`${request}: ended ${e.decode} at the decode, where ${e.expected.decode} was due`)
      if (!e.expected.prefill.includes(e.prefill)) result.failures.push(`${request}: ended ${e.prefill} at its prefill, where ${e.expected.prefill.join(' or ')} was due`)
    }
    /** The decode process says how a request ended: counted, judged, and its blocks released to its prefill. */
    const decodeEnded = (from: Decode, m: Extract<DecodeReport, { type: 'ended' }>) => {
      const e = ends.get(m.request)
      if (!e || e.decode !== undefined || e.followedBy !== from) return
      result.failures.push(...m.failures)
      if (m.revokeFailed) result.failures.push(`${m.request}: revoke asked at ${m.revokeFailed.askedAt - start} ms failed: ${m.revokeFailed.message}${chaosSince(m.revokeFailed.askedAt)}`)
      endedNow(m.how)
      if (m.how === 'complete') {
        e.by.completed = true
        // Only the decode that replaced the killed one serves again (the killed one's last messages may still come).
        if (chaos && decodeKilledAt !== undefined && from === decode && !from.killed) {
          chaos.servingAgain.push(Date.now() - decodeKilledAt)
          decodeKilledAt = undefined
        }
      }
      e.decode = m.how
      e.settle()
      judge(m.request)
      e.by.following.delete(m.request)
      send(e.by, { type: 'released', request: m.request })
    }
    // The decode process's answers to the soak's questions, by sequence number.
    let asked = 0
    const answers = new Map<number, (m: DecodeReport) => void>()
    /** Asks the decode process something and waits (up to 5 s) for its answer. */
    const ask = async (type: 'open' | 'sample'): Promise<DecodeReport | undefined> => {
      const seq = ++asked
      const answer = new Promise<DecodeReport>((resolve) => answers.set(seq, resolve))
      send(decode, { type, seq })
      const got = await Promise.race([answer, sleep(5_000).then(() => undefined)])
      answers.delete(seq)
      return got
    }
    let letGo: ((left: string[]) => void) | undefined
    // The prefill processes' answers to the sample asked last.
    let sampled: (() => void) | undefined
    let sampleSeq = 0
    // When the last decode kill was, until a request completes on the decode that replaced it.
    let decodeKilledAt: number | undefined
    // Until when a request that starts may find no decode (the one replacing a killed one is not yet listening).
    let outageUntil = 0
    /** Starts a decode process on `ports` (0: any free one); resolves once it listens. */
    const startDecode = (ports: number[]) => {
      const base = spawn('soak-decode.js', `decode d${children.length}`)
      let ready: (ports: number[]) => void = () => {}
      const self: Decode = Object.assign(base, { ready: new Promise<number[]>((resolve) => (ready = resolve)) })
      decode = self
      told(`started ${self.name}`)
      self.child.on('message', (m: DecodeReport) => {
        if (m.type === 'ready') ready(m.ports)
        else if (m.type === 'ended') decodeEnded(self, m)
        else if (m.type === 'open' || m.type === 'sample') answers.get(m.seq)?.(m)
        else if (m.type === 'let-go') letGo?.(m.left)
        else if (m.type === 'crashed') finished(`the decode process: ${m.error}`)
      })
      send(self, { type: 'plan', plan: { ports, layers, blockNumber, blockBytes, transport: options.transport, requestDeadlineMs: REQUEST_DEADLINE_MS } satisfies DecodePlan })
      return Promise.race([self.ready, done.then(() => [] as number[]), sleep(30_000).then(() => [] as number[])])
    }
    const ports = await startDecode(Array.from({ length: decodeCount }, () => 0))
    if (ports.length !== decodeCount) throw new Error('the decode process did not start listening within 30 s')
    /** The decode process follows a request (once it listens: after a kill, the next one may not yet). */
    const follow = (e: End, request: string, blocks: number[], revoke: boolean) => {
      const by = decode as Decode
      e.followedBy = by
      void by.ready.then(() => send(by, { type: 'follow', request, at: e.at, blocks, revoke }))
    }
    /** Starts a prefill process in `slot` for the rest of the run. */
    const startPrefill = (slot: number) => {
      const name = `g${children.length}`
      const base = spawn('soak-prefill.js', `prefill ${name}`)
      const self: Prefill = Object.assign(base, { name, slot, completed: false, served: false, following: new Map<string, Promise<void>>() })
      slots[slot] = self
      lastStarted = self
      told(`started prefill ${name}`)
      self.child.on('message', (m: PrefillReport) => {
        if (m.type === 'start') {
          const revoke = m.plan === 'complete' && rand() < revokeRate
          let settle: () => void = () => {}
          const ended = new Promise<void>((resolve) => (settle = resolve))
          const e: End = { by: self, at: m.decode, expected: EXPECTED[revoke ? 'revoke' : m.plan], outage: Date.now() < outageUntil, settle }
          ends.set(m.request, e)
          self.following.set(m.request, ended)
          follow(e, m.request, m.blocks, revoke)
        } else if (m.type === 'end') {
          const e = ends.get(m.request)
          if (!e) return
          e.prefill = m.end
          // One that may have found no decode is revoked there, if it is still open a moment after its prefill ended it.
          if (e.outage && m.end !== 'complete') {
            void sleep(OUTAGE_GRACE_MS).then(() => e.decode === undefined && e.followedBy === decode && send(decode, { type: 'revoke', request: m.request, at: e.at }))
          }
          judge(m.request)
        } else if (m.type === 'sample' && m.seq === sampleSeq && self === slots[slot]) {
          self.sample = m
          sampled?.()
        } else if (m.type === 'finished') {
          self.served = true
          if (slots.every((p) => p.served)) finished()
        } else if (m.type === 'crashed') finished(m.error)
      })
      const durationLeft = Math.max(0, start + durationMs - Date.now())
      send(self, {
        type: 'plan',
        plan: {
          name,
          ports,
          peers,
          firstPeer: slot * peers,
          layers,
          blocksPerPeer,
          blocksPerRequest,
          blockBytes,
          transport: options.transport,
          durationMs: durationLeft,
          abortRate: options.abortRate ?? 0.1,
          reconnectRate: options.reconnectRate ?? 0.05,
          seed: seed + children.length,
        } satisfies SoakPlan,
      })
    }
    /** Requests the decodes hold open (started, not yet ended), from every prefill of this host. */
    const open = async () => {
      const m = await ask('open')
      return m?.type === 'open' ? m.open : NaN
    }
    /**
     * Kills the prefill process: each of its requests must end at the decode (it is told the link is gone);
     * those that never reached it are revoked after a second. A new process starts once they all ended (it
     * writes the same blocks).
     */
    const kill = async () => {
      const victim = slots[0]
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
      let left = await open()
      while (!(left === 0) && Date.now() - killedAt < KILLED_TOLD_MS) {
        await sleep(20)
        left = await open()
      }
      chaos!.afterKill.push(Date.now() - killedAt)
      if (left > 0) result.failures.push(`the decode still held ${left} requests of a killed prefill open ${KILLED_TOLD_MS / 1000} s after the kill`)
      // The decode ended every request it heard of; the soak's own waits for them catch up. Those still waited
      // for never reached it.
      await Promise.race([Promise.all(victim.following.values()), sleep(1_000)])
      for (const request of victim.following.keys()) {
        const e = ends.get(request)
        if (!e) continue
        e.unheard = true
        send(decode, { type: 'revoke', request, at: e.at })
      }
      await Promise.race([Promise.all(victim.following.values()), sleep(REQUEST_DEADLINE_MS)])
      chaos!.kills++
      startPrefill(victim.slot)
    }
    /**
     * Kills the decode process: every request it followed is lost with it, and its prefill must end each (a
     * write fails, or it had completed) within the request deadline. A new decode process listens on the same
     * ports; the prefills' next writes reconnect to it, and requests complete there again.
     */
    const killDecode = async () => {
      const victim = decode as Decode
      victim.killed = true
      victim.child.kill('SIGKILL')
      told(`killed ${victim.name}`)
      const killedAt = Date.now()
      decodeKilledAt = killedAt
      outageUntil = Number.POSITIVE_INFINITY
      await victim.closed
      const lost: End[] = []
      for (const [request, e] of ends) {
        if (e.followedBy !== victim || e.decode !== undefined) continue
        e.lost = true
        e.decode = 'lost'
        e.settle()
        lost.push(e)
        judge(request)
        // Its blocks are in no decode's memory any more: its prefill may use them again once it ended it.
        e.by.following.delete(request)
        send(e.by, { type: 'released', request })
      }
      const again = await startDecode(ports)
      if (again.length !== decodeCount) throw new Error('the decode process that replaces a killed one did not start listening within 30 s')
      // The prefills' reconnects pause up to 1.4 s between attempts (`reconnect`'s default).
      outageUntil = Date.now() + OUTAGE_GRACE_MS
      // The prefill ends every request the killed decode followed: none hangs.
      while (lost.some((e) => e.prefill === undefined) && Date.now() - killedAt < REQUEST_DEADLINE_MS) await sleep(20)
      const hung = lost.filter((e) => e.prefill === undefined).length
      if (hung > 0) result.failures.push(`the prefill still had ${hung} requests of a killed decode under way ${REQUEST_DEADLINE_MS / 1000} s after the kill`)
      else chaos!.afterDecodeKill.push(Date.now() - killedAt)
      chaos!.decodeKills++
    }
    const stop = async (victim: Child, count: 'stops' | 'decodeStops') => {
      victim.child.kill('SIGSTOP')
      told(`stopped ${victim.name}`)
      await sleep(STOP_MS * rand())
      victim.child.kill('SIGCONT')
      told(`resumed ${victim.name}`)
      chaos![count]++
    }
    for (let slot = 0; slot < prefillCount; slot++) startPrefill(slot)
    const sample = async (): Promise<{ row: SoakSample; decodeBy: Decode | undefined }> => {
      const askedOf = [...slots]
      for (const p of askedOf) p.sample = undefined
      const all = new Promise<void>((resolve) => (sampled = () => askedOf.every((p) => p.sample) && resolve()))
      const seq = ++sampleSeq
      for (const p of askedOf) send(p, { type: 'sample', seq })
      // The decode process that took the sample, once it serves (one still starting is no warm-up to judge from).
      const decodeBy = decodeKilledAt === undefined ? decode : undefined
      const [decodeSample] = await Promise.all([ask('sample'), Promise.race([all, sleep(5_000)])])
      const decodeFootprint = decodeSample?.type === 'sample' ? decodeSample.footprint : null
      const replies = askedOf.flatMap((p) => (p.sample ? [p.sample] : []))
      const sorted = replies.flatMap((a) => a.latencies).sort((a, b) => a - b)
      const errors: Record<string, number> = {}
      for (const a of replies) add(errors, a.errors)
      const prefillFootprints = askedOf.flatMap((p) => {
        const f = p.child.pid !== undefined ? footprint(p.child.pid, p.sample?.resources ?? null) : null
        return f ? [f] : []
      })
      const row: SoakSample = {
        elapsedMs: Date.now() - start,
        requests: interval,
        calls: replies.reduce((n, a) => n + a.calls, 0),
        bytes: replies.reduce((n, a) => n + a.bytes, 0),
        errors,
        latencyUs: sorted.length ? { p50: quantile(sorted, 0.5), p99: quantile(sorted, 0.99) } : null,
        decode: decodeFootprint,
        prefill: prefillFootprints.length === askedOf.length ? together(prefillFootprints) : null,
      }
      interval = {}
      result.calls += row.calls
      result.bytes += row.bytes
      add(result.errors, row.errors)
      result.samples.push(row)
      options.onSample?.(row)
      return { row, decodeBy }
    }
    let over: string | undefined | null = null
    void done.then((e) => (over = e))
    // Chaos until shortly before the last requests start; the processes then alive finish the run. The events
    // come at random moments in a fixed round, so that a short run sees every kind: two in three hit the prefill.
    // The decode is hit only until three intervals before the end, so that the one serving last (once it serves:
    // within an interval) is sampled at least twice while traffic runs, for its growth to be judged.
    const round: Array<[onDecode: boolean, event: () => Promise<void>]> = [
      [false, kill],
      [true, killDecode],
      [false, () => stop(slots[0], 'stops')],
      [true, () => stop(decode as Decode, 'decodeStops')],
      [false, kill],
      [false, () => stop(slots[0], 'stops')],
    ]
    const chaosRun = (async () => {
      if (!chaos) return
      const until = start + durationMs - chaosMargin
      const decodeUntil = Math.min(until, start + durationMs - 3 * intervalMs)
      for (let n = 0; ; n++) {
        await Promise.race([done, sleep(chaosMs * (0.5 + rand()))])
        if (over !== null || Date.now() >= until) return
        const [onDecode, event] = round[n % round.length]
        if (onDecode && Date.now() >= decodeUntil) continue
        await event()
      }
    })().catch((e: unknown) => {
      result.failures.push(`chaos failed: ${e instanceof Error ? e.message : String(e)}`)
    })
    // The samples taken while traffic runs are the ones growth is judged on (at the end the prefill has
    // closed its communicators, and what they leaked is gone with them).
    const running: Array<{ row: SoakSample; decodeBy: Decode | undefined }> = []
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
    const following = [...ends.values()].map((e) => new Promise<void>((resolve) => {
      const settle = e.settle
      e.settle = () => (settle(), resolve())
      if (e.decode !== undefined) resolve()
    }))
    await Promise.race([Promise.all(following), sleep(2 * REQUEST_DEADLINE_MS).then(() => result.failures.push('a request was still being followed at the end'))])
    await sample()
    // A process replaced by chaos is not one that grew: the prefills are judged only without chaos, the decode
    // on the samples of the process that served last.
    const last = decode
    const judged = running.filter((r) => r.decodeBy === last).map((r) => (chaos ? { ...r.row, prefill: null } : r.row))
    result.failures.push(...growth(judged, prefillCount))
    if (chaos && judged.length < 2) result.failures.push(`the decode serving last was sampled ${judged.length} times while traffic ran: too few to judge its growth (a shorter interval)`)
    for (const [request, e] of ends) if (e.decode === undefined || e.prefill === undefined) result.failures.push(`${request}: its end was not told by both sides`)
    if ((result.requests.complete ?? 0) === 0) result.failures.push('no request completed')
    if (chaos) {
      result.chaos = {
        kills: chaos.kills,
        stops: chaos.stops,
        decodeKills: chaos.decodeKills,
        decodeStops: chaos.decodeStops,
        killedRequests: chaos.killedRequests,
        endedAfterKillMs: spread(chaos.afterKill),
        lostRequests: chaos.lostRequests,
        prefillEndedAfterDecodeKillMs: spread(chaos.afterDecodeKill),
        servingAgainAfterDecodeKillMs: spread(chaos.servingAgain),
      }
      // The survivors serve new peers: the prefill process started after the last kill completed requests,
      // and so did the decode process that replaced the last one killed.
      if (chaos.kills > 0 && !lastStarted?.completed) result.failures.push('no request of the prefill started after the last kill completed')
      if (decodeKilledAt !== undefined) result.failures.push('no request completed on the decode that replaced the last one killed')
    }
    // Once every prefill has gone, the decodes let go of every link's queue pairs and data connections.
    await endChildren(children.filter((c) => c !== decode))
    const left = await Promise.race([new Promise<string[]>((resolve) => ((letGo = resolve), send(decode, { type: 'let-go', ms: LET_GO_MS }))), sleep(LET_GO_MS + 5_000).then(() => ['no answer'])])
    if (left.length > 0) result.failures.push(`the decodes still held ${left.join(', ')} ${LET_GO_MS / 1000} s after every prefill had gone`)
    return result
  } finally {
    for (const t of timers) clearTimeout(t)
    await endChildren(children)
  }
}

/**
 * Growth past the bounds, from the first sample on (the warm-up) to the last, in either process (the prefill
 * processes together): memory by more than half and 64 MiB, threads by more than 8, descriptors, queue pairs,
 * registered regions or data connections by more than 16; each bound but the half times `prefills` (the
 * prefill processes, whose links the decodes serve).
 */
export function growth(samples: SoakSample[], prefills = 1): string[] {
  if (samples.length < 2) return []
  const [first, last] = [samples[0], samples[samples.length - 1]]
  const out: string[] = []
  for (const side of ['decode', 'prefill'] as const) {
    const a = first[side]
    const b = last[side]
    if (!a || !b) continue
    if (b.rssBytes > a.rssBytes * 1.5 + prefills * 64 * 2 ** 20) out.push(`the ${side}'s memory grew from ${(a.rssBytes / 2 ** 20).toFixed(0)} to ${(b.rssBytes / 2 ** 20).toFixed(0)} MiB`)
    if (b.threads > a.threads + prefills * 8) out.push(`the ${side}'s threads grew from ${a.threads} to ${b.threads}`)
    if (b.descriptors > a.descriptors + prefills * 16) out.push(`the ${side}'s descriptors grew from ${a.descriptors} to ${b.descriptors}`)
    const [ra, rb] = [a.resources, b.resources]
    if (ra && rb) {
      for (const [k, what] of [['rdmaQueuePairs', 'queue pairs'], ['rdmaMemoryRegions', 'registered regions'], ['tcpDataConnections', 'data connections'], ['shmRings', 'shared rings']] as const) {
        if (rb[k] > ra[k] + prefills * 16) out.push(`the ${side}'s ${what} grew from ${ra[k]} to ${rb[k]}`)
      }
    }
  }
  return out
}

/** One line of figures. */
export function formatSample(s: SoakSample): string {
  const held = (r: Resources | null) => (r ? `, ${r.tcpDataConnections} data connections, ${r.shmRings} shm rings, ${r.rdmaQueuePairs} QPs, ${r.rdmaMemoryRegions} MRs` : '')
  const mib = (f: Footprint | null) =>
    f ? `${(f.rssBytes / 2 ** 20).toFixed(0)} MiB (peak ${(f.peakRssBytes / 2 ** 20).toFixed(0)}), ${f.threads} threads, ${f.descriptors} fds${held(f.resources)}` : '-'
  const counts = (r: Record<string, number>) => Object.entries(r).map(([k, v]) => `${k} ${v}`).join(', ') || 'none'
  return [
    `${(s.elapsedMs / 1000).toFixed(0)} s: requests ${counts(s.requests)}; ${s.calls} calls, ${(s.bytes / 1e9).toFixed(2)} GB; errors ${counts(s.errors)}`,
    `  write p50 ${s.latencyUs ? s.latencyUs.p50.toFixed(0) : '-'} µs, p99 ${s.latencyUs ? s.latencyUs.p99.toFixed(0) : '-'} µs; decode ${mib(s.decode)}; prefill ${mib(s.prefill)}`,
  ].join('\n')
}
