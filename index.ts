/**
 * kvtransfer: move an LLM's KV cache from a prefill engine into a decode engine's memory.
 *
 * ```ts
 * import { RDMACommunicator, HostBuffer } from 'kvtransfer'
 *
 * // decode process: register the cache and listen on port 12345
 * const keys = HostBuffer.alloc(1024 * 4096), values = HostBuffer.alloc(1024 * 4096)
 * const decode = new RDMACommunicator('decode', 0, 12345, [keys.ptr], [values.ptr], 1024, 4096)
 *
 * // prefill process: connect and write blocks 0..2 of layer 0 into the decode's blocks 3..5
 * const prefill = new RDMACommunicator('prefill', 0, 12345, [k.ptr], [v.ptr], 1024, 4096)
 * await prefill.connectAsync('10.0.0.2', 12345)
 * await prefill.writeCacheAsync('10.0.0.2', 12345, [0, 1, 2], [3, 4, 5], 0)
 * ```
 *
 * @packageDocumentation
 */
import type * as Native from './binding.js'

/** The platforms kvtransfer ships a native binary for. */
const SHIPPED_PLATFORMS = ['linux-x64-gnu', 'linux-arm64-gnu']

/** The native addon of this platform, or an error that names the platform and the package it needs. */
const native: typeof Native = loadNative()

function loadNative(): typeof Native {
  try {
    return require('./binding.js')
  } catch (err) {
    const target = platform()
    const why = SHIPPED_PLATFORMS.includes(target)
      ? `its package kvtransfer-${target} is not installed or cannot load (reinstall kvtransfer with optional dependencies enabled)`
      : `kvtransfer ships binaries for ${SHIPPED_PLATFORMS.join(' and ')} only (build it from source with \`npm run build\`)`
    throw new Error(`kvtransfer: no native binary for this platform, ${target}: ${why}`, { cause: err })
  }
}

/** This machine's platform as the per-platform packages name it: `linux-x64-gnu`, `linux-arm64-musl`, ... */
export function platform(): string {
  const base = `${process.platform}-${process.arch}`
  if (process.platform !== 'linux') return base
  const report = process.report?.getReport() as { header?: { glibcVersionRuntime?: string } } | undefined
  return `${base}-${report?.header?.glibcVersionRuntime ? 'gnu' : 'musl'}`
}

/** Which side of the transfer a communicator is. */
export type Role = 'prefill' | 'decode'

/** A raw address of device or host memory: a `bigint`, or a `number` that is a safe integer. */
export type Pointer = bigint | number

/** Block ids: whole numbers in `[0, blockNumber)`. A `Uint32Array` is passed without conversion. */
export type BlockIds = readonly number[] | Uint32Array

/** A port: a number, or a numeric string as the original API takes (`"12345"`). */
export type Port = number | string

/**
 * A transport that moves bytes: `'cuda-ipc'` (GPU caches, both processes on one host), `'shm'` (host caches,
 * one host), `'rdma'` (RC `RDMA_WRITE`) or `'tcp'` (anywhere).
 */
export type Transport = 'cuda-ipc' | 'shm' | 'rdma' | 'tcp'

/** The transports `options.transport` / `KVCACHE_TRANSPORT` can name: one of them, or `'auto'`. */
export type TransportName = 'auto' | Transport

/** The stable codes of {@link KVTransferError}. */
export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'CONFIG'
  | 'NOT_CONNECTED'
  | 'PROTOCOL'
  | 'REJECTED'
  | 'TIMEOUT'
  | 'TRANSPORT'
  | 'UNAVAILABLE'
  | 'CLOSED'

const ERROR_CODES: ReadonlySet<string> = new Set<ErrorCode>([
  'INVALID_ARGUMENT',
  'CONFIG',
  'NOT_CONNECTED',
  'PROTOCOL',
  'REJECTED',
  'TIMEOUT',
  'TRANSPORT',
  'UNAVAILABLE',
  'CLOSED',
])

/** Every failure of kvtransfer: a stable `code` for programs and a message for people. */
export class KVTransferError extends Error {
  /** What kind of failure this is. */
  readonly code: ErrorCode

  constructor(code: ErrorCode, message: string) {
    super(message)
    this.name = 'KVTransferError'
    this.code = code
  }

  /** Turns whatever the native layer threw into a `KVTransferError`. */
  static from(err: unknown): KVTransferError {
    if (err instanceof KVTransferError) return err
    const text = err instanceof Error ? err.message : String(err)
    const m = /^([A-Z_]+): ([\s\S]*)$/.exec(text)
    if (m && ERROR_CODES.has(m[1])) return new KVTransferError(m[1] as ErrorCode, m[2])
    return new KVTransferError('TRANSPORT', text)
  }
}

/**
 * Settings of one communicator. Each configuration option overrides its environment variable;
 * a bad value is a `CONFIG` error that names the variable.
 */
export interface CommunicatorOptions {
  /** Per-layer key scale tensors of a quantised cache; each block's scales move with it. */
  keyScalePtrs?: readonly Pointer[]
  /** Per-layer value scale tensors of a quantised cache. */
  valueScalePtrs?: readonly Pointer[]
  /** Bytes of one block's scales. Required with scale pointers. */
  scaleBlockBytes?: number
  /** `KVCACHE_RDMA_GID_INDEX` (default 3). */
  gidIndex?: number
  /** `KVCACHE_RDMA_NICS`: the NIC of GPU `i` is `rdmaNics[i % n]`. */
  rdmaNics?: string | readonly string[]
  /** `KVCACHE_IB_TIMEOUT` (default 18, 14–31): QP timeout 4.096 µs · 2^v. */
  ibTimeout?: number
  /** `KVCACHE_RELAX_ORDERING` (default false). */
  relaxOrdering?: boolean
  /** `KVCACHE_SOCKET_IFNAME`: the interface a decode communicator listens on (default: all). */
  socketIfname?: string
  /** `KVCACHE_DEBUG` (default false). */
  debug?: boolean
  /** `KVCACHE_DEBUG_FILE` (default: standard error). */
  debugFile?: string
  /** `KVCACHE_ERROR_FILE` (default: standard error). */
  errorFile?: string
  /** `KVCACHE_GDRCOPY_FLUSH_ENABLE` (default false). */
  gdrcopyFlushEnable?: boolean
  /** `KVCACHE_TRANSPORT` (default `'auto'`). */
  transport?: TransportName
  /** Longest a handshake or socket operation may go without progress, in ms (default 10 000). */
  timeoutMs?: number
}

const SETTING_OPTIONS = [
  'gidIndex',
  'rdmaNics',
  'ibTimeout',
  'relaxOrdering',
  'socketIfname',
  'debug',
  'debugFile',
  'errorFile',
  'gdrcopyFlushEnable',
  'transport',
  'timeoutMs',
] as const
const CACHE_OPTIONS = ['keyScalePtrs', 'valueScalePtrs', 'scaleBlockBytes'] as const

function invalid(message: string): KVTransferError {
  return new KVTransferError('INVALID_ARGUMENT', message)
}

function toPointers(name: string, list: readonly Pointer[] | undefined): bigint[] {
  if (list === undefined) return []
  if (!Array.isArray(list)) throw invalid(`${name} must be an array of addresses`)
  return list.map((p, i) => {
    if (typeof p === 'bigint' && p >= 0n) return p
    if (typeof p === 'number' && Number.isSafeInteger(p) && p >= 0) return BigInt(p)
    throw invalid(`${name}[${i}] is not an address (a non-negative bigint or safe integer)`)
  })
}

function toPort(port: Port, allowZero: boolean): number {
  const n = typeof port === 'string' && /^\s*\d+\s*$/.test(port) ? Number(port) : port
  if (typeof n !== 'number' || !Number.isInteger(n) || n < (allowZero ? 0 : 1) || n > 65535) {
    throw invalid(`port ${JSON.stringify(String(port))} is not a port number (${allowZero ? 0 : 1}–65535)`)
  }
  return n
}

function toHost(ip: unknown): string {
  if (typeof ip !== 'string' || ip.trim() === '') throw invalid(`ip must be a host name or address, not ${String(ip)}`)
  return ip.trim()
}

function toCount(name: string, v: unknown, min: number, max = 0xffffffff): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw invalid(`${name} must be a whole number from ${min} to ${max}, not ${String(v)}`)
  }
  return v
}

function toBlockIds(name: string, ids: BlockIds): Uint32Array {
  if (ids instanceof Uint32Array) return ids
  if (!Array.isArray(ids)) throw invalid(`${name} must be an array of block ids`)
  const out = new Uint32Array(ids.length)
  for (let i = 0; i < ids.length; i++) {
    const id = ids[i]
    if (!Number.isInteger(id) || id < 0 || id > 0xffffffff) {
      throw invalid(`${name}[${i}] = ${String(id)} is not a block id (a non-negative whole number)`)
    }
    out[i] = id
  }
  return out
}

function toSettings(options: CommunicatorOptions): Record<string, string> {
  const settings: Record<string, string> = {}
  for (const [key, value] of Object.entries(options)) {
    if (value === undefined || (CACHE_OPTIONS as readonly string[]).includes(key)) continue
    if (!(SETTING_OPTIONS as readonly string[]).includes(key)) {
      throw new KVTransferError('CONFIG', `unknown option ${JSON.stringify(key)}`)
    }
    settings[key] =
      typeof value === 'boolean' ? (value ? '1' : '0') : Array.isArray(value) ? value.join(',') : String(value)
  }
  return settings
}

function call<T>(f: () => T): T {
  try {
    return f()
  } catch (err) {
    throw KVTransferError.from(err)
  }
}

/**
 * One side of KV-cache transfers, with the original's constructor and methods (`connect`,
 * `isConnected`, `writeCache`) and their semantics, plus a Promise-based API beside them.
 *
 * A `'decode'` communicator registers its cache and listens on `port`; a `'prefill'` one connects to
 * decode peers and writes blocks into them.
 */
export class RDMACommunicator {
  /** The role given at construction. */
  readonly role: Role
  /** The port a decode communicator listens on (the one given, or the one picked for port 0). */
  readonly port: number
  /** The last failure of the synchronous API (which reports failures as `false` / `-1`). */
  lastError: KVTransferError | undefined
  readonly #native: Native.NativeCommunicator

  /**
   * @param role `'prefill'` or `'decode'`.
   * @param gpuIdx GPU index; picks the RDMA NIC (`KVCACHE_RDMA_NICS[gpuIdx % n]`).
   * @param port Decode: the port to listen on (0 picks a free one, see {@link RDMACommunicator.port}).
   * @param keyPtrs One key cache address per layer.
   * @param valuePtrs One value cache address per layer, or `[]` for key-only (MLA) caches.
   * @param blockNumber Blocks per layer tensor.
   * @param blockBytes Bytes per block.
   * @param prefillTpSize This prefill rank's tensor-parallel size (default 1).
   * @param prefillTpIdx This prefill rank's tensor-parallel index (default 0).
   * @param options Scales of quantised caches and configuration overrides.
   * @throws {KVTransferError} on any invalid argument or configuration.
   */
  constructor(
    role: Role,
    gpuIdx: number,
    port: Port,
    keyPtrs: readonly Pointer[],
    valuePtrs: readonly Pointer[],
    blockNumber: number,
    blockBytes: number,
    prefillTpSize = 1,
    prefillTpIdx = 0,
    options: CommunicatorOptions = {},
  ) {
    if (role !== 'prefill' && role !== 'decode') throw invalid(`role must be 'prefill' or 'decode', not ${String(role)}`)
    if (typeof options !== 'object' || options === null) throw invalid('options must be an object')
    this.role = role
    this.#native = call(
      () =>
        new native.NativeCommunicator({
          role,
          gpuIdx: toCount('gpuIdx', gpuIdx, 0),
          port: toPort(port, true),
          keyPtrs: toPointers('keyPtrs', keyPtrs),
          valuePtrs: toPointers('valuePtrs', valuePtrs),
          keyScalePtrs: toPointers('keyScalePtrs', options.keyScalePtrs),
          valueScalePtrs: toPointers('valueScalePtrs', options.valueScalePtrs),
          blockNumber: toCount('blockNumber', blockNumber, 1),
          blockBytes: toCount('blockBytes', blockBytes, 1, Number.MAX_SAFE_INTEGER),
          scaleBlockBytes: toCount('scaleBlockBytes', options.scaleBlockBytes ?? 0, 0, Number.MAX_SAFE_INTEGER),
          prefillTpSize: toCount('prefillTpSize', prefillTpSize, 1),
          prefillTpIdx: toCount('prefillTpIdx', prefillTpIdx, 0),
          settings: toSettings(options),
        }),
    )
    this.port = this.#native.port
  }

  /**
   * The preferred transport. With `transport: 'auto'`: `'cuda-ipc'` for a cache in GPU memory or `'shm'` for
   * one in host memory (taken by peers on this host), else `'rdma'` when the NIC is usable, else `'tcp'`; each
   * connection takes the first one both sides have ({@link RDMACommunicator.connectedTransport}).
   */
  get transport(): Transport {
    return this.#native.transport as Transport
  }

  /** The transport the connection to `ip:port` uses, or `null` when there is none (or it broke). */
  connectedTransport(ip: string, port: Port): Transport | null {
    try {
      return (this.#native.connectedTransport(toHost(ip), toPort(port, false)) as Transport | null) ?? null
    } catch {
      return null
    }
  }

  /** The RDMA device in use (`'mlx5_0'`, `'rxe0'`), or `null` when RDMA is not used. */
  get rdmaDevice(): string | null {
    return this.#native.rdmaDevice ?? null
  }

  /**
   * Connects to the decode communicator at `ip:port`, whose tensor-parallel size is `dstTpSize`.
   * @returns `true` when connected (also when already connected); `false` on failure, with the reason
   * in the error log and in {@link RDMACommunicator.lastError}.
   */
  connect(ip: string, port: Port, dstTpSize = 1): boolean {
    return this.#sync(() => {
      this.#native.connect(toHost(ip), toPort(port, false), toCount('dstTpSize', dstTpSize, 1))
      return true
    }, false)
  }

  /** Whether a connection to `ip:port` exists. */
  isConnected(ip: string, port: Port): boolean {
    try {
      return this.#native.isConnected(toHost(ip), toPort(port, false))
    } catch {
      return false
    }
  }

  /**
   * Writes blocks `localBlockIds[i]` of layer `layerIdx` (keys, values and any scales) into blocks
   * `remoteBlockIds[i]` of the peer. Blocks the calling thread until the bytes are in the peer's memory.
   * @returns `0` on success; `-1` if anything was refused or failed (nothing moves on refusal), with
   * the reason in the error log and in {@link RDMACommunicator.lastError}.
   */
  writeCache(ip: string, port: Port, localBlockIds: BlockIds, remoteBlockIds: BlockIds, layerIdx: number): 0 | -1 {
    return this.#sync(() => {
      this.#native.writeCache(...this.#writeArgs(ip, port, localBlockIds, remoteBlockIds, layerIdx))
      return 0 as const
    }, -1 as const)
  }

  /**
   * Connects without blocking the event loop.
   * @throws {KVTransferError} (as a rejection) when the connection fails.
   */
  async connectAsync(ip: string, port: Port, dstTpSize = 1): Promise<void> {
    const [host, p, dst] = call(() => [toHost(ip), toPort(port, false), toCount('dstTpSize', dstTpSize, 1)] as const)
    await this.#native.connectAsync(host, p, dst).catch((err: unknown) => {
      throw KVTransferError.from(err)
    })
  }

  /**
   * Like {@link RDMACommunicator.writeCache}, off the event loop: resolves once the bytes are in the
   * peer's memory.
   * @throws {KVTransferError} (as a rejection) on refusal or failure; nothing moves on refusal.
   */
  async writeCacheAsync(
    ip: string,
    port: Port,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
  ): Promise<void> {
    let args: [string, number, Uint32Array, Uint32Array, number]
    try {
      args = this.#writeArgs(ip, port, localBlockIds, remoteBlockIds, layerIdx)
    } catch (err) {
      throw this.#refused(err)
    }
    await this.#native.writeCacheAsync(...args).catch((err: unknown) => {
      throw KVTransferError.from(err)
    })
  }

  /**
   * Closes every connection. A decode communicator stops listening and writes nothing more into its
   * cache once this returns. Later calls fail with `CLOSED`. Safe to call twice.
   */
  close(): void {
    this.#native.close()
  }

  /** `await using comm = new RDMACommunicator(...)` closes it at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.close()
  }

  #writeArgs(
    ip: string,
    port: Port,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
  ): [string, number, Uint32Array, Uint32Array, number] {
    return [
      toHost(ip),
      toPort(port, false),
      toBlockIds('localBlockIds', localBlockIds),
      toBlockIds('remoteBlockIds', remoteBlockIds),
      toCount('layerIdx', layerIdx, 0),
    ]
  }

  /** A refusal made here, before the native layer: logged like the native ones. */
  #refused(err: unknown): KVTransferError {
    const e = KVTransferError.from(err)
    this.#native.logError(`${e.code}: ${e.message}`)
    return e
  }

  #sync<T>(f: () => T, failed: T): T {
    try {
      const v = f()
      this.lastError = undefined
      return v
    } catch (err) {
      const e = KVTransferError.from(err)
      // Native failures are in the error log already; refusals made here are logged now.
      if (!(err instanceof Error) || err instanceof KVTransferError) this.#native.logError(`${e.code}: ${e.message}`)
      this.lastError = e
      return failed
    }
  }
}

/** One RDMA device of this machine, with its ports and their non-empty GID table entries. */
export interface RdmaDevice {
  /** The device name: `mlx5_0`, `rxe0`, ... (what `KVCACHE_RDMA_NICS` lists). */
  name: string
  /** Its ports (empty when the device cannot be opened). */
  ports: RdmaPort[]
}

/** One port of an {@link RdmaDevice}. */
export interface RdmaPort {
  /** The port number, from 1. */
  port: number
  /** `ACTIVE`, `DOWN`, `INIT`, ... Only an `ACTIVE` port carries traffic. */
  state: string
  /** `Ethernet` (RoCE: addressed by GID) or `InfiniBand` (addressed by LID). */
  linkLayer: string
  /** The active MTU in bytes. */
  mtu: number
  /** The port's LID (InfiniBand). */
  lid: number
  /** The non-empty GID table entries: what `KVCACHE_RDMA_GID_INDEX` picks from. */
  gids: RdmaGid[]
}

/** One entry of a port's GID table. */
export interface RdmaGid {
  /** Its index (`KVCACHE_RDMA_GID_INDEX`). */
  index: number
  /** The GID, as eight colon-separated groups of four hex digits. */
  gid: string
}

/**
 * Lists the RDMA devices this machine has: ports with state, link layer (`Ethernet` for RoCE,
 * `InfiniBand`), MTU, LID and GIDs — what `KVCACHE_RDMA_NICS` and `KVCACHE_RDMA_GID_INDEX` choose from.
 * @throws {KVTransferError} `UNAVAILABLE` where libibverbs is not installed.
 */
export function rdmaDevices(): RdmaDevice[] {
  try {
    return native.rdmaDevices()
  } catch (err) {
    throw KVTransferError.from(err)
  }
}

/**
 * Page-aligned host memory with its address, for demos, tests and host-memory caches.
 *
 * ```ts
 * const hb = HostBuffer.alloc(1 << 20)
 * hb.buffer.fill(7)            // a Node Buffer over the same memory
 * hb.ptr                       // its address, for RDMACommunicator
 * hb.free()                    // the Buffer reads as empty from here on
 * ```
 *
 * The memory lives as long as the `HostBuffer` (or its `buffer`) is referenced: keep it referenced for as
 * long as a communicator has it registered.
 */
export class HostBuffer {
  /** A Node `Buffer` viewing the memory (empty after {@link HostBuffer.free}). */
  readonly buffer: Buffer
  /** The address of the first byte. */
  readonly ptr: bigint
  /** The size in bytes, as allocated. */
  readonly byteLength: number
  #freed = false

  private constructor(buffer: Buffer) {
    this.buffer = buffer
    this.ptr = native.bufferAddress(buffer)
    this.byteLength = buffer.length
  }

  /**
   * Allocates `bytes` (at least 1) of zero-filled, page-aligned memory.
   * @throws {KVTransferError} `INVALID_ARGUMENT` for a bad size or when the memory is not available.
   */
  static alloc(bytes: number): HostBuffer {
    const n = call(() => toCount('bytes', bytes, 1, Number.MAX_SAFE_INTEGER))
    return new HostBuffer(call(() => native.hostAlloc(n)))
  }

  /** Whether {@link HostBuffer.free} was called. */
  get freed(): boolean {
    return this.#freed
  }

  /**
   * Gives the memory back. The `buffer` is detached at once (it reads as empty, so no JavaScript can
   * touch freed memory); unregister the memory from communicators first. Safe to call twice.
   */
  free(): void {
    if (this.#freed) return
    this.#freed = true
    call(() => native.hostFree(this.buffer))
  }
}

/** One GPU the CUDA driver sees. */
export interface GpuInfo {
  /** Its CUDA ordinal (as this process numbers GPUs, after `CUDA_VISIBLE_DEVICES`). */
  ordinal: number
  /** The product name: `NVIDIA H100 80GB HBM3`, ... */
  name: string
  /** Its memory in bytes. */
  memoryBytes: number
  /** `major.minor`: `9.0` for Hopper. */
  computeCapability: string
}

/** One `KVCACHE_*` variable as {@link systemInfo} found it. */
export interface SettingInfo {
  /** The variable's name. */
  env: string
  /** Its value, or `null` when unset. */
  value: string | null
  /** The `CONFIG` error a communicator would raise for the value, or `null` when it is fine. */
  error: string | null
}

/** One transport as {@link systemInfo} judged it. */
export interface TransportInfo {
  /** The transport. */
  name: Transport
  /** Whether a communicator could use it on this machine. */
  usable: boolean
  /** What it would use (a NIC, an interface), or why it cannot be used. */
  detail: string
}

/** What {@link systemInfo} reports: what this machine offers kvtransfer, and what is in the way. */
export interface SystemInfo {
  /** The package's version. */
  version: string
  /** The native library's version (the same as `version` unless the install is mixed up). */
  nativeVersion: string
  /** The platform, as {@link platform} names it. */
  platform: string
  /** The path of the native binary loaded for it, or `null` when it cannot be located. */
  binary: string | null
  /** The Node.js version. */
  node: string
  /** Every `KVCACHE_*` variable, with bad values flagged. */
  settings: SettingInfo[]
  /** Every transport: whether it can be used here, and what it would use or why not. */
  transports: TransportInfo[]
  /** The RDMA devices. */
  rdma: RdmaInfo
  /** The CUDA driver and its GPUs. */
  gpus: GpusInfo
}

/** The RDMA devices as {@link systemInfo} found them. */
export interface RdmaInfo {
  /** The devices, with ports and GIDs. */
  devices: RdmaDevice[]
  /** Why they cannot be listed (e.g. libibverbs is not installed), or `null`. */
  error: string | null
}

/** The CUDA driver and GPUs as {@link systemInfo} found them. */
export interface GpusInfo {
  /** The CUDA version the driver supports (`12.8`), or `null` without a driver. */
  driver: string | null
  /** The GPUs it sees. */
  devices: GpuInfo[]
  /** Why there are none, or `null`. */
  error: string | null
}

/**
 * Reports what this machine offers: platform and binary, versions, each transport and why it cannot be used,
 * the RDMA devices with ports and GIDs, the GPUs and driver, and the `KVCACHE_*` variables in force with
 * bad values flagged. `npx kvtransfer info` prints it.
 */
export function systemInfo(): SystemInfo {
  const report = JSON.parse(call(() => native.systemReport())) as Omit<SystemInfo, 'platform' | 'binary' | 'node' | 'nativeVersion'> & {
    version: string
  }
  return {
    version: (require('./package.json') as { version: string }).version,
    nativeVersion: report.version,
    platform: platform(),
    binary: nativeBinary(),
    node: process.version,
    settings: report.settings,
    transports: report.transports,
    rdma: report.rdma,
    gpus: report.gpus,
  }
}

/** The path of the native binary this process loaded: beside this file (a source build) or its package. */
function nativeBinary(): string | null {
  const target = platform()
  for (const id of [`./kvtransfer.${target}.node`, `kvtransfer-${target}`]) {
    try {
      return require.resolve(id)
    } catch {
      // not this one
    }
  }
  return null
}
