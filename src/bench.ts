/**
 * `kvtransfer bench`: the original's benchmark (1538 scattered blocks per `writeCache` call, one thread, block
 * sizes 1 KiB to 256 KiB) on every transport usable here, with a decode in a process of its own: host memory on
 * TCP, shm and RDMA, GPU memory on CUDA IPC (the prefill's cache on GPU 0, the decode's on `decodeGpu`). Per transport
 * and size: warm-up calls, then timed calls, each writing 1538 scattered blocks of a larger pool (keys and
 * values, the layers in turn); the median, p10 and p90 of GB/s and of µs per call; and once per size the bytes
 * themselves, checked (the decode's blocks cleared, written once more, and hashed on both sides in call order).
 */
import { fork, spawn, spawnSync, type SpawnSyncReturns } from 'node:child_process'
import { createHash, randomFillSync } from 'node:crypto'
import { cpus, freemem, totalmem } from 'node:os'
import { dirname, join } from 'node:path'
import { PEERS, preparePeers, runPeer, type PeerSetup } from './bench-peers.js'
import { RDMACommunicator } from './compat.js'
import { DeviceBuffer } from './device-buffer.js'
import { HostBuffer } from './host-buffer.js'
import { native } from './loader.js'

/** What {@link runBench} measures. */
export interface BenchOptions {
  /** Transports to measure (default: every transport usable here: `shm`, `rdma`, `tcp`, and `cuda-ipc` on a GPU machine). */
  transports?: string[]
  /** The decode's GPU in CUDA IPC rows (default 0, the prefill's): another GPU measures copies between GPUs. */
  decodeGpu?: number
  /** Block sizes in bytes (default 1 KiB, 2 KiB … 256 KiB). */
  sizes?: number[]
  /** Blocks per call (default 1538, as the original's table). */
  batch?: number
  /** Layers, written in turn (default 2). */
  layers?: number
  /**
   * Timed calls per transport and size (default 20), after `warmup` (default 3) untimed ones, which go on until
   * {@link WARMUP_MS} have passed (none with `warmup` 0): a thread a transport starts at connect may share its
   * first CPU with the writer until the scheduler moves it, and that is not the steady state a row measures.
   */
  iterations?: number
  warmup?: number
  /** Keys only (an MLA cache); default keys and values. */
  keyOnly?: boolean
  /**
   * Prefills writing into the one decode at once (default 1: the original's one thread, synchronous
   * `writeCache`); more each connect on their own and write through `writeCacheAsync`, and a row's call is one
   * round of all of them. Peers and ceilings run with one writer.
   */
  writers?: number
  /**
   * Peers to run on the same workload beside kvtransfer: `mooncake`, `nixl` (their drivers under
   * `benches/peers/`, in a Python environment made and filled on first use; see {@link PeerSetup}).
   */
  peers?: string[]
  peerSetup?: PeerSetup
  /** Told before each step (a transport at a size, a peer) starts, for a progress display. */
  onProgress?: (what: string, done: number, total: number) => void
}

/** Median, 10th and 90th percentile of a measure over the timed calls. */
export interface Spread {
  median: number
  p10: number
  p90: number
}

/** One transport of one system (kvtransfer, or a peer) at one block size. */
export interface BenchRow {
  /** `kvtransfer`, `mooncake` or `nixl`. */
  system: string
  /** The transport, and for a peer the settings it ran with (`ucx-tcp-no-progress-thread`). */
  transport: string
  /** A peer's row: which of kvtransfer's transports it stands beside (`tcp`, `shm`), and how it was run. */
  compares?: string
  detail?: string
  blockBytes: number
  /** Blocks per call of each writer, the writers (prefills writing at once), and bytes per call (all tensors, all writers). */
  batch: number
  writers?: number
  bytesPerCall: number
  calls: number
  /** GB/s (1e9 bytes per second) and µs per call over the timed calls. */
  gbps: Spread
  usPerCall: Spread
  /** Whether the bytes of a write, hashed on both sides, matched. */
  verified: boolean
}

/**
 * What the machine does without kvtransfer, on the same bytes: one TCP stream over loopback (`tcp-stream`, the
 * ceiling of our TCP), `memcpy` of the same scattered blocks on one thread (`memcpy`) and split over threads as
 * the shm transport splits a write (`memcpy-N-threads`, the ceiling of our shm), `ib_write_bw` (RDMA's), and one
 * device copy of a call's bytes from the prefill's GPU to the decode's (`device-copy`, the ceiling of CUDA IPC).
 */
export interface CeilingRow {
  name: string
  blockBytes: number
  bytesPerCall: number
  calls: number
  gbps: Spread
  usPerCall: Spread
}

/** A whole run: what it ran on and with, and its rows. */
export interface BenchResult {
  date: string
  machine: { cpus: number; cpuModel: string; memoryBytes: number; platform: string; node: string; gpus: string[] }
  batch: number
  pool: number
  layers: number
  tensors: number
  warmup: number
  /** The least time a row's (and a peer's, and a ceiling's) untimed calls took, where there were any. */
  warmupMs?: number
  iterations: number
  /** Prefills writing at once in kvtransfer's rows (1: the original's one thread). */
  writers: number
  /** The GPUs of CUDA IPC rows, where there are any: the prefill's (always 0) and the decode's. */
  gpus?: { prefill: number; decode: number }
  rows: BenchRow[]
  ceilings: CeilingRow[]
  /** Transports (and sizes) asked for that were not measured, and why. */
  skipped: Array<{ transport: string; blockBytes?: number; why: string }>
  /** Rows that failed, with the error. */
  failed: Array<{ transport: string; blockBytes: number; error: string }>
  /** The goals this run can judge, each as its worst ratio over the sizes measured. */
  goals: Goal[]
}

/**
 * A goal of the product, judged on this run: the worst ratio over the sizes it covers (`sizes`: those where the
 * row it is compared with was measured and checked), and at which size. Where that row was measured but ours
 * failed or its bytes did not match, the ratio at that size is 0.
 */
export interface Goal {
  goal: string
  target: number
  worst: number
  blockBytes: number
  sizes: number[]
  met: boolean
}

const HOST = '127.0.0.1'
const KIB = 1024
export const DEFAULT_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256].map((k) => k * KIB)
/** The least time the untimed calls of a row take (the peers' drivers and the ceilings warm up by the same rule). */
export const WARMUP_MS = 200

/** `n` distinct ids of `[0, pool)` in a scattered order, the same for the same seed. */
export function scattered(n: number, pool: number, seed: number): Uint32Array {
  const ids = Uint32Array.from({ length: pool }, (_, i) => i)
  let x = seed >>> 0
  for (let i = pool - 1; i > 0; i--) {
    x = (Math.imul(x, 1103515245) + 12345) >>> 0
    const j = x % (i + 1)
    ;[ids[i], ids[j]] = [ids[j], ids[i]]
  }
  return ids.slice(0, n)
}

/** One tensor of one layer of a bench cache: host memory, or a GPU's. */
export type CacheBuffer = HostBuffer | DeviceBuffer

/**
 * The cache of one side: per tensor, per layer, one buffer of `pool` blocks (on GPU `gpu` where given), every
 * page touched before timing (first-touch faults would be timed otherwise): random bytes for the source (every
 * block and every offset differs, so a block from the wrong place or a shifted range is seen), zeros for the decode.
 */
export function cache(tensors: number, layers: number, pool: number, blockBytes: number, random: boolean, gpu?: number): CacheBuffer[][] {
  const made: CacheBuffer[] = []
  const chunk = 64 << 20
  try {
    return Array.from({ length: tensors }, () =>
      Array.from({ length: layers }, () => {
        if (gpu !== undefined) {
          // Zeroed by the driver; random bytes copied in a chunk at a time.
          const db = DeviceBuffer.alloc(gpu, pool * blockBytes)
          made.push(db)
          for (let at = 0; random && at < db.byteLength; at += chunk) db.write(randomFillSync(Buffer.allocUnsafe(Math.min(chunk, db.byteLength - at))), at)
          return db
        }
        const hb = HostBuffer.alloc(pool * blockBytes)
        made.push(hb)
        if (random) for (let at = 0; at < hb.buffer.length; at += 1 << 30) randomFillSync(hb.buffer, at, Math.min(1 << 30, hb.buffer.length - at))
        else hb.buffer.fill(0)
        return hb
      }),
    )
  } catch (e) {
    for (const b of made) b.free()
    throw e
  }
}

/** Block `id` of a cache buffer: a view of host memory, a copy of device memory. */
export function block(b: CacheBuffer, id: number, blockBytes: number): Buffer {
  return b instanceof HostBuffer ? b.buffer.subarray(id * blockBytes, (id + 1) * blockBytes) : b.read(id * blockBytes, blockBytes)
}

/** The hash of `ids`' blocks of one layer, in that order, every tensor. */
export function digest(tensors: CacheBuffer[][], layer: number, ids: ArrayLike<number>, blockBytes: number): string {
  const h = createHash('sha1')
  for (const t of tensors) for (let i = 0; i < ids.length; i++) h.update(block(t[layer], ids[i], blockBytes))
  return h.digest('hex')
}

/**
 * Runs `call` (given its number from 0) `calls` times at least and, where that is more than none, until `ms` have
 * passed; resolves with how many it ran.
 */
export async function warmUp(calls: number, ms: number, call: (i: number) => Promise<void>): Promise<number> {
  const since = process.hrtime.bigint()
  const passed = () => Number(process.hrtime.bigint() - since) / 1e6 >= ms
  let i = 0
  for (; i < calls || (calls > 0 && !passed()); i++) await call(i)
  return i
}

/** The median, p10 and p90 of `values` (nearest rank). */
function spread(values: number[]): Spread {
  const sorted = [...values].sort((a, b) => a - b)
  const at = (q: number) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))]
  return { median: at(0.5), p10: at(0.1), p90: at(0.9) }
}

/** GB/s from µs per call, call for call: the fastest tenth of calls is GB/s's p90 and µs's p10. */
function rate(bytes: number, us: Spread): Spread {
  const gbps = (t: number) => bytes / (t * 1e3)
  return { median: gbps(us.median), p10: gbps(us.p90), p90: gbps(us.p10) }
}

/** A decode process, driven over IPC. */
class Decode {
  readonly #child = fork(join(__dirname, 'bench-decode.js'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
  #next = 0
  constructor() {
    // A child that cannot be started, or a message to one that died: the ask waiting on it fails (below).
    this.#child.on('error', () => {})
  }
  get #gone(): boolean {
    return this.#child.exitCode !== null || this.#child.signalCode !== null
  }
  ask<T>(op: string, args: object = {}): Promise<T> {
    const id = ++this.#next
    return new Promise((resolve, reject) => {
      const done = () => {
        this.#child.off('message', onMessage)
        this.#child.off('exit', onExit)
        this.#child.off('error', onError)
      }
      const onMessage = (m: { id: number; result?: T; error?: string }) => {
        if (m.id !== id) return
        done()
        if (m.error !== undefined) reject(new Error(`the decode process: ${m.error}`))
        else resolve(m.result as T)
      }
      const onExit = (code: number | null, signal: string | null) => {
        done()
        reject(new Error(`the decode process ended (${signal ?? `exit code ${code}`}) during ${op}`))
      }
      const onError = (e: Error) => {
        done()
        reject(new Error(`the decode process: ${e.message}`))
      }
      if (this.#gone || !this.#child.connected) return reject(new Error(`the decode process has ended: cannot ${op}`))
      this.#child.on('message', onMessage)
      this.#child.once('exit', onExit)
      this.#child.once('error', onError)
      this.#child.send({ id, op, args })
    })
  }
  async end(): Promise<void> {
    if (this.#gone) return
    const exited = new Promise((r) => this.#child.once('exit', r))
    if (this.#child.connected) this.#child.disconnect()
    else this.#child.kill()
    await exited
  }
}

/** The transports usable here, fastest first, the GPUs' names and the CUDA driver's major version. */
function usableTransports(): { usable: string[]; skipped: Array<{ transport: string; why: string }>; gpus: string[]; cuda: number } {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const { systemInfo } = require('./system.js') as typeof import('./system.js')
  const info = systemInfo()
  const usable: string[] = []
  const skipped: Array<{ transport: string; why: string }> = []
  for (const t of info.transports) {
    if (t.usable) usable.push(t.name)
    else skipped.push({ transport: t.name, why: t.detail })
  }
  // The CUDA driver's major version (`13.0` → 13), 0 without one: it picks a peer's CUDA build.
  return { usable, skipped, gpus: info.gpus.devices.map((g) => g.name), cuda: Number.parseInt(info.gpus.driver ?? '0', 10) || 0 }
}

/** Whether `transport` moves GPU memory in the bench (the others move host memory). */
const onGpu = (transport: string) => transport === 'cuda-ipc'

/** Runs the bench; see {@link BenchOptions}. */
export async function runBench(options: BenchOptions = {}): Promise<BenchResult> {
  const batch = options.batch ?? 1538
  const layers = options.layers ?? 2
  const iterations = options.iterations ?? 20
  const warmup = options.warmup ?? 3
  const sizes = options.sizes ?? DEFAULT_SIZES
  const tensors = options.keyOnly ? 1 : 2
  // A pool a quarter larger than a call: the call's blocks are scattered across it.
  const pool = Math.ceil(batch * 1.25)
  const writers = options.writers ?? 1
  if (!Number.isInteger(writers) || writers < 1 || writers > 64) throw new Error(`writers must be a whole number from 1 to 64, not ${writers}`)
  const decodeGpu = options.decodeGpu ?? 0
  const here = usableTransports()
  // Judged against the GPUs there are; without any, CUDA IPC is not measured (and says why), whatever the number.
  if (!Number.isInteger(decodeGpu) || decodeGpu < 0 || (here.gpus.length > 0 && decodeGpu >= here.gpus.length)) {
    throw new Error(`decodeGpu must be a GPU of this machine (0 to ${here.gpus.length - 1}), not ${options.decodeGpu}`)
  }
  const skipped: BenchResult['skipped'] = options.transports ? here.skipped.filter((s) => options.transports?.includes(s.transport)) : here.skipped.filter((s) => s.transport !== 'cuda-ipc')
  const transports = options.transports ? options.transports.filter((t) => here.usable.includes(t)) : here.usable
  for (const t of options.transports ?? []) {
    if (!here.usable.includes(t) && !skipped.some((s) => s.transport === t)) skipped.push({ transport: t, why: 'not a transport of this version' })
  }
  const rows: BenchRow[] = []
  const ceilings: CeilingRow[] = []
  const failed: BenchResult['failed'] = []
  const peers = options.peers ?? []
  for (const p of peers) if (!Object.hasOwn(PEERS, p)) throw new Error(`unknown peer ${JSON.stringify(p)}: the bench knows ${Object.keys(PEERS).join(', ')}`)
  // A peer runs once on host memory where a host transport is measured, once on GPU memory where CUDA IPC is.
  const peerRuns = [...(transports.some((t) => !onGpu(t)) ? [undefined] : []), ...(transports.some(onGpu) ? [{ decode: decodeGpu }] : [])]
  const total = transports.length * sizes.length + peers.length * peerRuns.length
  let done = 0
  for (const blockBytes of sizes) {
    // Both processes hold the whole cache: a size that would crowd this machine's free memory is left out (of
    // the host-memory transports: CUDA IPC's caches are GPU memory, and a GPU without room fails the row).
    const need = tensors * layers * (pool + Math.ceil(writers * batch * 1.25)) * blockBytes
    const roomy = need <= 0.7 * freemem()
    const runnable = transports.filter((t) => roomy || onGpu(t))
    for (const transport of transports.filter((t) => !runnable.includes(t))) {
      skipped.push({ transport, blockBytes, why: `both caches take ${(need / 2 ** 30).toFixed(1)} GiB, more than 70% of the free memory` })
    }
    for (const transport of runnable) {
      options.onProgress?.(`${transport} ${blockBytes / KIB} KiB`, done++, total)
      try {
        rows.push(await measure({ transport, blockBytes, batch, pool, layers, tensors, iterations, warmup, writers, decodeGpu }))
      } catch (e) {
        failed.push({ transport, blockBytes, error: e instanceof Error ? e.message : String(e) })
      }
    }
    if (runnable.length === 0) continue
    try {
      const host = runnable.some((t) => !onGpu(t))
      ceilings.push(...ceilingsOf({ blockBytes, batch, pool, tensors, layers, iterations, warmup }, { host, rdma: runnable.includes('rdma'), gpus: runnable.some(onGpu) ? [0, decodeGpu] : undefined }))
    } catch (e) {
      failed.push({ transport: 'ceiling', blockBytes, error: e instanceof Error ? e.message : String(e) })
    }
  }
  // The peers on the sizes measured here (on host memory, those a host transport ran at; on GPU memory, those
  // CUDA IPC ran at), one after the other (a peer's decode is a process of its own, too).
  const measured = (gpu: boolean) =>
    sizes.filter((size) => transports.some((t) => onGpu(t) === gpu && !skipped.some((s) => s.transport === t && s.blockBytes === size)))
  if (peers.length > 0 && peerRuns.some((gpu) => measured(gpu !== undefined).length > 0)) {
    let python: string | undefined
    try {
      python = preparePeers(peers, { ...options.peerSetup, cuda: here.cuda })
    } catch (e) {
      for (const p of peers) skipped.push({ transport: p, why: `cannot set up its driver: ${e instanceof Error ? e.message : String(e)}` })
    }
    for (const peer of python ? peers : []) {
      for (const gpu of peerRuns) {
        options.onProgress?.(`${peer}${gpu ? ' (GPU memory)' : ''}`, done++, total)
        if (gpu && PEERS[peer].hostOnly) {
          skipped.push({ transport: peer, why: `on GPU memory: ${PEERS[peer].hostOnly}` })
          continue
        }
        const log = join(dirname(python as string), '..', `${peer}.log`)
        const run = await runPeer(python as string, peer, { sizes: measured(gpu !== undefined), batch, pool, layers, tensors, iterations, warmup, warmupMs: WARMUP_MS, gpu }, log)
        rows.push(...run.rows)
        skipped.push(...run.skipped)
        failed.push(...run.failed)
      }
    }
  }
  options.onProgress?.('done', total, total)
  const cpu = cpus()
  const result = {
    date: new Date().toISOString(),
    machine: { cpus: cpu.length, cpuModel: cpu[0]?.model ?? 'unknown', memoryBytes: totalmem(), platform: `${process.platform}-${process.arch}`, node: process.versions.node, gpus: here.gpus },
    batch,
    pool,
    layers,
    tensors,
    warmup,
    warmupMs: warmup > 0 ? WARMUP_MS : 0,
    iterations,
    writers,
    ...(transports.some(onGpu) ? { gpus: { prefill: 0, decode: decodeGpu } } : {}),
    rows,
    ceilings,
    skipped,
    failed,
    goals: [] as Goal[],
  }
  // A failed size of a round of several writers says nothing about one writer's goals.
  result.goals = goals({ ...result, failed: writers > 1 ? [] : result.failed })
  return result
}

/**
 * The goals the run can judge (those whose rows it has): our TCP ahead of every peer's TCP (three times at
 * 1 KiB) and at 0.8 of one plain stream from 64 KiB; shm 1.5 times NIXL's best same-host path and never slower
 * than our TCP; CUDA IPC ahead of NIXL's.
 */
export function goals(r: Pick<BenchResult, 'rows' | 'ceilings'> & Partial<Pick<BenchResult, 'failed'>>): Goal[] {
  // One writer's rows only: the peers and the ceilings run one. Ours is 0 where its bytes did not check, and
  // undefined where it was not measured (a size that failed to run counts through `failed`, below).
  const failed = r.failed ?? []
  const ours = (transport: string, size: number): number | undefined => {
    const row = r.rows.find((x) => x.system === 'kvtransfer' && x.transport === transport && x.blockBytes === size && (x.writers ?? 1) === 1)
    if (row) return row.verified ? row.gbps.median : 0
    return failed.some((f) => f.transport === transport && f.blockBytes === size) ? 0 : undefined
  }
  const out: Goal[] = []
  const judge = (goal: string, target: number, ratios: Array<[number, number | undefined]>) => {
    const known = ratios.filter((x): x is [number, number] => x[1] !== undefined && Number.isFinite(x[1]))
    if (known.length === 0) return
    const [blockBytes, worst] = known.reduce((a, b) => (b[1] < a[1] ? b : a))
    out.push({ goal, target, worst, blockBytes, sizes: known.map((x) => x[0]), met: worst >= target })
  }
  const sizes = [...new Set(r.rows.map((x) => x.blockBytes))].sort((a, b) => a - b)
  // A peer's best row per size among its settings (NIXL with and without its progress thread).
  const best = (compares: string, size: number, system?: string) =>
    r.rows.filter((x) => x.system !== 'kvtransfer' && x.compares === compares && x.blockBytes === size && (!system || x.system === system) && x.verified).map((x) => x.gbps.median)
  const over = (a: number | undefined, others: number[]) => (a === undefined || others.length === 0 ? undefined : a / Math.max(...others))
  judge('kvtransfer tcp ÷ the best peer TCP', 1, sizes.map((s) => [s, over(ours('tcp', s), best('tcp', s))]))
  judge('kvtransfer tcp ÷ the best peer TCP, 1 KiB', 3, sizes.filter((s) => s === KIB).map((s) => [s, over(ours('tcp', s), best('tcp', s))]))
  const stream = (s: number) => r.ceilings.find((c) => c.name === 'tcp-stream' && c.blockBytes === s)?.gbps.median
  judge('kvtransfer tcp ÷ tcp-stream, from 64 KiB', 0.8, sizes.filter((s) => s >= 64 * KIB).map((s) => [s, over(ours('tcp', s), [stream(s) ?? NaN].filter(Number.isFinite))]))
  judge("kvtransfer shm ÷ NIXL's best same-host path", 1.5, sizes.map((s) => [s, over(ours('shm', s), best('shm', s, 'nixl'))]))
  judge('kvtransfer shm ÷ kvtransfer tcp', 1, sizes.map((s) => [s, over(ours('shm', s), [ours('tcp', s) ?? 0].filter((x) => x > 0))]))
  judge("kvtransfer cuda-ipc ÷ NIXL's cuda_ipc", 1, sizes.map((s) => [s, over(ours('cuda-ipc', s), best('cuda-ipc', s, 'nixl'))]))
  return out
}

/**
 * The ceilings at one block size (see {@link CeilingRow}): the host's where a host-memory transport ran (the NIC's
 * where RDMA did), and one device copy from GPU `gpus[0]` to GPU `gpus[1]` where CUDA IPC did.
 */
function ceilingsOf(
  s: { blockBytes: number; batch: number; pool: number; tensors: number; layers: number; iterations: number; warmup: number },
  measuring: { host: boolean; rdma: boolean; gpus?: [number, number] },
): CeilingRow[] {
  const bytesPerCall = s.batch * s.blockBytes * s.tensors
  const row = (name: string, seconds: number[]): CeilingRow => {
    const us = spread(seconds.map((t) => t * 1e6))
    return { name, blockBytes: s.blockBytes, bytesPerCall, calls: seconds.length, gbps: rate(bytesPerCall, us), usPerCall: us }
  }
  const out: CeilingRow[] = []
  if (measuring.host) {
    const local = [...scattered(s.batch, s.pool, 1)]
    const remote = [...scattered(s.batch, s.pool, 2)]
    const copy = (threads: number) => native.ceilingScatteredCopy(s.blockBytes, local, remote, s.tensors, s.layers, threads, s.warmup, WARMUP_MS, s.iterations)
    out.push(row('tcp-stream', native.ceilingTcpStream(bytesPerCall, 256 * KIB, s.warmup, WARMUP_MS, s.iterations)), row('memcpy', copy(1).seconds))
    // Split as shm splits this call: a row of its own only where that takes more than one thread.
    const split = copy(native.copyThreads())
    if (split.threads > 1) out.push(row(`memcpy-${split.threads}-threads`, split.seconds))
  }
  // The NIC's own: as many writes of one block as the timed calls make, one after another on one queue pair.
  const gbps = measuring.rdma ? ibWriteBw(s.blockBytes, s.batch * s.tensors * s.iterations) : undefined
  if (gbps !== undefined) out.push(row('ib_write_bw', [bytesPerCall / (gbps * 1e9)]))
  // The GPUs' own: a call's bytes in one device copy, as contiguous as a copy gets.
  if (measuring.gpus) out.push(row('device-copy', native.ceilingDeviceCopy(measuring.gpus[0], measuring.gpus[1], bytesPerCall, s.warmup, WARMUP_MS, s.iterations)))
  return out
}

/**
 * perftest's `ib_write_bw` on the device and GID kvtransfer uses (`KVCACHE_RDMA_NICS`, `KVCACHE_RDMA_GID_INDEX`),
 * server and client on this host: GB/s of `writes` `RDMA_WRITE`s of `blockBytes`, or undefined where perftest is
 * not installed (the table then has no NIC ceiling). Throws where it is installed and fails.
 */
function ibWriteBw(blockBytes: number, writes: number): number | undefined {
  if (spawnSync('ib_write_bw', ['--version'], { stdio: 'ignore' }).error) return undefined
  const device = (process.env.KVCACHE_RDMA_NICS ?? '').split(',')[0].trim() || undefined
  const common = [...(device ? ['-d', device] : []), '-x', process.env.KVCACHE_RDMA_GID_INDEX ?? '3', '-F', '-s', `${blockBytes}`, '-n', `${writes}`, '--report_gbits']
  const port = `${18515 + (process.pid % 1000)}`
  // The server serves one client and ends; it is bounded in time itself, and ended with this process.
  let server: ReturnType<typeof spawn> | undefined
  let serverSaid = ''
  const stopServer = () => server?.kill('SIGKILL')
  process.once('exit', stopServer)
  try {
    let client: SpawnSyncReturns<string> | undefined
    // Retried only while the server is not listening yet, for 10 s at most.
    for (const until = Date.now() + 10_000; Date.now() < until; ) {
      if (!server || server.exitCode !== null || server.signalCode !== null) {
        server = spawn('timeout', ['-k', '5', '300', 'ib_write_bw', ...common, '-p', port], { stdio: ['ignore', 'ignore', 'pipe'] })
        server.stderr?.on('data', (b: Buffer) => (serverSaid = (serverSaid + b.toString()).slice(-400)))
      }
      client = spawnSync('ib_write_bw', [...common, '-p', port, '127.0.0.1'], { encoding: 'utf8', timeout: 120_000 })
      if (client.status === 0 || !/connect|refused/i.test(`${client.stderr}${client.stdout}`)) break
      Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, 250)
    }
    if (client?.status !== 0) {
      const said = `${client?.stderr ?? ''}${client?.stdout ?? ''}`.trim().split('\n').slice(-2).join(' ')
      throw new Error(`ib_write_bw failed: ${said}${serverSaid ? ` (its server: ${serverSaid.trim().split('\n').slice(-1)[0]})` : ''}`)
    }
    // The result line: bytes, iterations, peak and average Gb/s (decimal), message rate.
    const line = client.stdout.split('\n').map((l) => l.trim().split(/\s+/)).find((f) => f[0] === `${blockBytes}` && f.length >= 4)
    const gbits = Number(line?.[3])
    if (!(gbits > 0)) throw new Error(`ib_write_bw printed no bandwidth for ${blockBytes} bytes`)
    return gbits / 8
  } finally {
    stopServer()
    process.off('exit', stopServer)
  }
}

/** The ceiling of `transport`'s rows in `r`, by name: a stream for TCP, the copy split as shm splits it, the NIC's own for RDMA, a device copy for CUDA IPC. */
function ceilingOf(r: BenchResult, transport: string, blockBytes: number): CeilingRow | undefined {
  const at = r.ceilings.filter((c) => c.blockBytes === blockBytes)
  if (transport === 'tcp') return at.find((c) => c.name === 'tcp-stream')
  if (transport === 'shm') return at.find((c) => c.name.startsWith('memcpy-')) ?? at.find((c) => c.name === 'memcpy')
  if (transport === 'rdma') return at.find((c) => c.name === 'ib_write_bw')
  if (transport === 'cuda-ipc') return at.find((c) => c.name === 'device-copy')
  return undefined
}

/** The workload of a run: blocks per call, the pool they are drawn from, layers, tensors, and calls. */
export interface Workload {
  batch: number
  pool: number
  layers: number
  tensors: number
  iterations: number
  warmup: number
}

/** One row's workload: a transport at a block size, from `writers` prefills at once. */
interface Shape extends Workload {
  transport: string
  blockBytes: number
  writers: number
  /** The decode's GPU, where the transport moves GPU memory (the prefill's is GPU 0). */
  decodeGpu: number
}

/**
 * One row: `writers` prefill communicators (one: the original's synchronous `writeCache` on one thread; more:
 * each its own connection, all writing at once through `writeCacheAsync`), each its `batch` blocks into blocks
 * of the decode's that no other writer's call touches. A call is one round of every writer's write.
 */
async function measure(s: Shape): Promise<BenchRow> {
  const decode = new Decode()
  let src: CacheBuffer[][] = []
  const prefills: RDMACommunicator[] = []
  const onDevice = onGpu(s.transport)
  try {
    src = cache(s.tensors, s.layers, s.pool, s.blockBytes, true, onDevice ? 0 : undefined)
    // The decode's pool holds every writer's blocks, scattered over it as one writer's are over its own.
    const remotePool = Math.ceil(s.writers * s.batch * 1.25)
    const start = { transport: s.transport, blockBytes: s.blockBytes, pool: remotePool, layers: s.layers, tensors: s.tensors, gpu: onDevice ? s.decodeGpu : undefined }
    const port = await decode.ask<number>('start', start)
    const ptrs = (t: number) => (src[t] ?? []).map((b) => b.ptr)
    for (let w = 0; w < s.writers; w++) {
      prefills.push(new RDMACommunicator('prefill', 0, 0, ptrs(0), ptrs(1), s.pool, s.blockBytes, 1, 0, { transport: s.transport as 'tcp' }))
      if (!prefills[w].connect(HOST, port)) throw prefills[w].lastError
    }
    const local = scattered(s.batch, s.pool, 1)
    const all = scattered(s.writers * s.batch, remotePool, 2)
    const remote = prefills.map((_, w) => all.subarray(w * s.batch, (w + 1) * s.batch))
    const round = async (layer: number) => {
      if (s.writers === 1) {
        if (prefills[0].writeCache(HOST, port, local, remote[0], layer) !== 0) throw prefills[0].lastError
      } else await Promise.all(prefills.map((p, w) => p.writeCacheAsync(HOST, port, local, remote[w], layer)))
    }
    await warmUp(s.warmup, WARMUP_MS, (i) => round(i % s.layers))
    const seconds: number[] = []
    for (let i = 0; i < s.iterations; i++) {
      const start = process.hrtime.bigint()
      await round(i % s.layers)
      seconds.push(Number(process.hrtime.bigint() - start) / 1e9)
    }
    // The bytes: the decode's blocks cleared, one more round, and both sides' hashes in call order.
    await decode.ask('clear', { layer: 0, ids: [...all] })
    await round(0)
    const theirs = await decode.ask<string>('digest', { layer: 0, ids: [...all] })
    const ours = digest(src, 0, Array.from({ length: s.writers }, () => [...local]).flat(), s.blockBytes)
    const bytesPerCall = s.writers * s.batch * s.blockBytes * s.tensors
    const us = spread(seconds.map((t) => t * 1e6))
    return {
      system: 'kvtransfer',
      transport: prefills[0].transport,
      blockBytes: s.blockBytes,
      batch: s.batch,
      writers: s.writers,
      bytesPerCall,
      calls: seconds.length,
      gbps: rate(bytesPerCall, us),
      usPerCall: us,
      verified: theirs === ours,
    }
  } finally {
    for (const p of prefills) p.close()
    await decode.end()
    for (const t of src) for (const b of t) b.free()
  }
}

/** The run as the original's table: one row per block size, system and transport. */
export function formatTable(r: BenchResult): string {
  const out = [
    `kvtransfer bench: ${r.batch} scattered blocks per call from a pool of ${r.pool}, ${r.tensors === 2 ? 'keys and values' : 'keys only'}, ` +
      `${r.layers} layers in turn, ${r.writers > 1 ? `kvtransfer's rows ${r.writers} prefills writing at once (a call: one round of them)` : 'one thread'}; ${r.warmup} warm-up calls${r.warmupMs ? ` (${r.warmupMs} ms at least)` : ''} and ${r.iterations} timed ones per row; host buffers with transparent huge pages advised (as numpy's)`,
    `${r.machine.cpuModel}, ${r.machine.cpus} CPUs, ${(r.machine.memoryBytes / 2 ** 30).toFixed(0)} GiB, ${r.machine.platform}, Node.js ${r.machine.node}, ${r.date}`,
    ...(r.gpus
      ? [`CUDA IPC rows: GPU memory, the prefill's cache on GPU ${r.gpus.prefill} (${r.machine.gpus[r.gpus.prefill] ?? '?'}), the decode's on GPU ${r.gpus.decode} (${r.machine.gpus[r.gpus.decode] ?? '?'})`]
      : []),
    '',
    '| block | system | transport | GB/s (median) | p10 | p90 | µs per call | of its ceiling | kvtransfer ÷ this | bytes checked |',
    '|---|---|---|---|---|---|---|---|---|---|',
  ]
  // Two decimals, or three significant digits below 1 GB/s (Soft-RoCE moves hundredths).
  const gb = (x: number) => (x >= 1 ? x.toFixed(2) : x.toPrecision(3))
  const line = (size: number, system: string, name: string, g: Spread, us: Spread, of: string, ratio: string, checked: string) =>
    `| ${size / KIB} KiB | ${system} | ${name} | ${gb(g.median)} | ${gb(g.p10)} | ${gb(g.p90)} | ${us.median.toFixed(0)} | ${of} | ${ratio} | ${checked} |`
  const order = (x: BenchRow) => (x.system === 'kvtransfer' ? '' : x.system)
  for (const size of [...new Set([...r.rows, ...r.ceilings].map((x) => x.blockBytes))].sort((a, b) => a - b)) {
    const at = r.rows.filter((x) => x.blockBytes === size)
    for (const row of at.sort((a, b) => order(a).localeCompare(order(b)) || a.transport.localeCompare(b.transport))) {
      const checked = row.verified ? 'yes' : 'MISMATCH'
      if (row.system === 'kvtransfer') {
        // The ceilings move one writer's bytes: no ratio for a round of several.
        const ceiling = (row.writers ?? 1) === 1 ? ceilingOf(r, row.transport, size) : undefined
        const of = ceiling ? `${(row.gbps.median / ceiling.gbps.median).toFixed(2)} of ${ceiling.name}` : '-'
        out.push(line(size, row.system, row.transport, row.gbps, row.usPerCall, of, '', checked))
      } else {
        const ours = at.find((x) => x.system === 'kvtransfer' && x.transport === row.compares && x.verified && (x.writers ?? 1) === 1)
        const ratio = ours ? `${(ours.gbps.median / row.gbps.median).toFixed(2)}× (${row.compares})` : '-'
        out.push(line(size, row.system, row.transport, row.gbps, row.usPerCall, '', ratio, checked))
      }
    }
    for (const c of r.ceilings.filter((x) => x.blockBytes === size)) out.push(line(size, 'ceiling', c.name, c.gbps, c.usPerCall, '', '', ''))
  }
  if (r.goals.length > 0) out.push('', 'goals (the worst ratio over the sizes measured):')
  for (const g of r.goals) out.push(`  ${g.met ? 'met   ' : 'MISSED'} ${g.goal} ≥ ${g.target}: ${g.worst.toFixed(2)} (at ${g.blockBytes / KIB} KiB; over ${g.sizes.length} size${g.sizes.length === 1 ? '' : 's'})`)
  const details = [...new Map(r.rows.filter((x) => x.detail).map((x) => [`${x.system} ${x.transport}`, x.detail])).entries()]
  if (details.length > 0) out.push('', 'peers, as run:', ...details.map(([k, d]) => `  ${k}: ${d}`))
  for (const f of r.failed) out.push('', `${f.transport} ${f.blockBytes / KIB} KiB: FAILED: ${f.error}`)
  for (const s of r.skipped) out.push('', `${s.transport}${s.blockBytes ? ` ${s.blockBytes / KIB} KiB` : ''}: not measured: ${s.why}`)
  return out.join('\n')
}

/** The rows as CSV, one line per row. */
export function formatCsv(r: BenchResult): string {
  const head = 'system,transport,block_bytes,batch,calls,gbps_median,gbps_p10,gbps_p90,us_per_call_median,us_per_call_p10,us_per_call_p90,verified'
  const lines = r.rows.map((x) =>
    [x.system, x.transport, x.blockBytes, x.batch, x.calls, x.gbps.median, x.gbps.p10, x.gbps.p90, x.usPerCall.median, x.usPerCall.p10, x.usPerCall.p90, x.verified].join(','),
  )
  for (const c of r.ceilings) {
    lines.push(['ceiling', c.name, c.blockBytes, r.batch, c.calls, c.gbps.median, c.gbps.p10, c.gbps.p90, c.usPerCall.median, c.usPerCall.p10, c.usPerCall.p90, ''].join(','))
  }
  return [head, ...lines].join('\n')
}
