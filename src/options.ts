/**
 * What a communicator is built from: its cache (raw addresses, one per layer) and its settings, checked here
 * for their JavaScript types and passed on typed; the native layer checks their values by the same rules as
 * the `KVCACHE_*` variables.
 */
import type { NativeInit, NativeSettings } from '../binding.js'
import { invalid, KVTransferError } from './errors.js'
import type { DeviceBuffer } from './device-buffer.js'
import type { HostBuffer } from './host-buffer.js'
import type { LogOptions } from './logging.js'

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

/**
 * Settings of one communicator. Each overrides its environment variable; a bad value is a `CONFIG` error that
 * names the variable and the option.
 */
export interface Settings {
  /** `KVCACHE_RDMA_GID_INDEX` (default 3). */
  gidIndex?: number
  /** `KVCACHE_RDMA_NICS`: the NIC of GPU `i` is `rdmaNics[i % n]`. */
  rdmaNics?: string | readonly string[]
  /** `KVCACHE_IB_TIMEOUT` (default 18, 14–31): QP timeout 4.096 µs · 2^v. */
  ibTimeout?: number
  /** `KVCACHE_RELAX_ORDERING` (default false). */
  relaxOrdering?: boolean
  /**
   * `KVCACHE_SOCKET_IFNAME`: the interface a decode communicator listens on (default: the first usable one, and
   * loopback).
   */
  socketIfname?: string
  /** `KVCACHE_DEBUG` (default false). */
  debug?: boolean
  /** `KVCACHE_DEBUG_FILE` (default: standard error). */
  debugFile?: string
  /** `KVCACHE_ERROR_FILE` (default: standard error). */
  errorFile?: string
  /**
   * `KVCACHE_LOG_FORMAT` (default `'text'`): `'json'` writes each line as a JSON object with its fields (`comm`,
   * `pid`, and where they apply `peer`, `request`, `layer`, `code`). `onLog` routes lines elsewhere.
   */
  logFormat?: 'text' | 'json'

  /** `KVCACHE_GDRCOPY_FLUSH_ENABLE` (default false). */
  gdrcopyFlushEnable?: boolean
  /** `KVCACHE_TRANSPORT` (default `'auto'`). */
  transport?: TransportName
  /**
   * `KVCACHE_AUTH_TOKEN`: a random shared secret (at least 32 characters: `openssl rand -hex 32`) that both sides
   * prove they hold at connect,
   * without sending it; a peer without it gets no session and learns nothing about the cache. Unset: no
   * authentication (a decode listening beyond loopback then logs a warning).
   */
  authToken?: string
  /**
   * One attempt to make a connection, in ms (default 10 000): the handshake, then its request channel and data
   * connection opening (a decode answers a handshake's connection for at most 5 s of it).
   */
  connectTimeoutMs?: number
  /**
   * The longest a transfer or a socket operation of a working connection may go without progress, in ms
   * (default 10 000): a TCP read or write, an RDMA completion. Then it fails with `TIMEOUT` and the connection
   * is dropped. A request channel that hears nothing for this long (and at least 3 s) has ended.
   */
  stallTimeoutMs?: number
  /**
   * How long a decode's `revoke` and `close` wait for each prefill link to confirm it stopped writing before
   * cutting it off, in ms (default 10 000).
   */
  confirmTimeoutMs?: number
  /**
   * Sets `connectTimeoutMs`, `stallTimeoutMs` and `confirmTimeoutMs` at once (each of them, given too, wins).
   * @deprecated Give the one that says what it times.
   */
  timeoutMs?: number
  /**
   * `KVCACHE_MAX_PEERS` (default 4096, 1–65 536): the most prefill links a decode keeps at once, and the most
   * admitted ones waiting to open; past that new connections are closed.
   */
  maxPeers?: number
  /**
   * `KVCACHE_TCP_CONNECTIONS` (default 4, or the CPUs the process may use where fewer; 1–16): the data
   * connections of a TCP link. A write is split over as many of them as give each piece about 1 MiB or more, each
   * piece sent by a thread of its own; the two sides use the lower of their settings.
   */
  tcpConnections?: number
  /**
   * `KVCACHE_REQUEST_TTL_MS` (default 300 000, 1 000–86 400 000), on a decode: a request that makes no progress
   * for this long (no layer arrives) ends `'expired'` (its `waitFor` rejects with `EXPIRED`, a notification says
   * so), and an ended request is remembered for a late `waitFor` for as long.
   */
  requestTtlMs?: number
  /**
   * `KVCACHE_INSTANCE_ID` (1 to 128 bytes), on a prefill: the engine instance this communicator is a rank of.
   * A request belongs to the instance that started it: its ranks (the same id) write it together, and what any
   * other prefill says of it is refused. Without an id, each communicator is an instance of its own. Give the
   * tensor-parallel ranks of one engine the same id, and different engines different ids.
   */
  instanceId?: string
  /**
   * `KVCACHE_INSECURE` (default false): lets {@link Communicator.decode} listen beyond loopback without
   * `authToken`. Without a token any host that reaches the port can write into the cache, so
   * `Communicator.decode` refuses that (`CONFIG`) unless told `insecure: true`; listening on loopback only
   * (`socketIfname: 'lo'`) needs no token. `RDMACommunicator` keeps the original's behaviour: it listens, and
   * logs a warning.
   */
  insecure?: boolean
  /**
   * `KVCACHE_ANSWERS_TO` (comma-separated `address:port`s; default none), on a decode: the addresses prefills
   * dial it by, besides the ones it listens on, where a NAT or a forwarded port stands between them (e.g.
   * `'203.0.113.7:9000'` for a port published by a container). With `authToken`, a prefill's signed hello names
   * the address it dialed, and a decode admits it only at the address the connection came to or one of these: a
   * relay cannot steer a prefill to another decode that shares the token (the prefill's `connect` rejects with
   * `REJECTED`, naming both addresses).
   */
  answersTo?: string | readonly string[]
  /**
   * How a prefill (re)connects, the same for every call that needs a connection it does not have: `connect`,
   * and any call after the connection ended. See {@link ReconnectPolicy}.
   */
  reconnect?: ReconnectPolicy
}

/**
 * A call that needs a connection makes one attempt and, where that fails in a way another attempt can mend
 * (`UNREACHABLE`, `TIMEOUT`, `TRANSPORT`), up to `retries` more, pausing `backoffMs` before the first of them and
 * twice as long before each next one (at most 10 s). Then it rejects with the last attempt's error, and a peer
 * whose connection had ended is forgotten (`NOT_CONNECTED` until `connect`). Each attempt to rebuild a connection
 * is a `'reconnecting'` event ({@link PrefillCommunicator.on}).
 */
export interface ReconnectPolicy {
  /** `KVCACHE_RECONNECT_RETRIES` (default 3, 0–100): attempts after the first. */
  retries?: number
  /** `KVCACHE_RECONNECT_BACKOFF_MS` (default 200, 1–60 000): the pause before the second attempt. */
  backoffMs?: number
}

/** A quantised cache's scales: each block's scales move with it. */
export interface ScaleOptions {
  /** Per-layer key scale tensors, as memory the communicator holds (or give `keyScalePtrs`). */
  keyScales?: readonly CacheMemory[]
  /** Per-layer value scale tensors, as memory the communicator holds (or give `valueScalePtrs`). */
  valueScales?: readonly CacheMemory[]
  /** Per-layer key scale tensors. */
  keyScalePtrs?: readonly Pointer[]
  /** Per-layer value scale tensors. */
  valueScalePtrs?: readonly Pointer[]
  /** Bytes of one block's scales. Required with scale pointers. */
  scaleBlockBytes?: number
}

/** The constructor options of {@link RDMACommunicator}: scales and settings. */
export interface CommunicatorOptions extends ScaleOptions, Settings, LogOptions {}

/**
 * Memory of one cache tensor, given as an object: a `Buffer` or any other `ArrayBufferView`, an `ArrayBuffer`, a
 * {@link HostBuffer}, a {@link DeviceBuffer}, or `{ ptr, byteLength }` for other memory JavaScript cannot hold (a GPU
 * allocation). The communicator keeps the object referenced until it is closed; a `HostBuffer` or `DeviceBuffer`
 * cannot be freed meanwhile (`IN_USE`). A resizable buffer is refused; do not transfer or detach an `ArrayBuffer` a communicator uses (its
 * memory would go while the communicator still writes there): a `HostBuffer` cannot be.
 */
export type CacheMemory = ArrayBufferView | ArrayBuffer | MemoryDescriptor

/** Memory named by its address and size: a {@link HostBuffer}, a {@link DeviceBuffer}, or other memory JavaScript cannot hold (GPU memory). */
export interface MemoryDescriptor {
  /** The address of the first byte. */
  readonly ptr: Pointer
  /** Its size in bytes. */
  readonly byteLength: number
  /** Whether it was given back (a freed `HostBuffer` or `DeviceBuffer` is refused). */
  readonly freed?: boolean
}

/**
 * A cache: one key tensor (and, unless key-only, one value tensor) per layer, each `blockNumber` blocks of
 * `blockBytes` bytes, in host memory or the memory of one GPU, given as objects (`keys`, `values`: the
 * communicator holds them) or as addresses (`keyPtrs`, `valuePtrs`).
 *
 * Memory given by address must stay valid, and hold `blockNumber` blocks, until the communicator is closed: a
 * decode lets peers, the kernel, a NIC or a GPU kernel write there, a prefill reads there. That is the caller's
 * promise, except for memory of a {@link HostBuffer} or {@link DeviceBuffer} (the library holds it, however it was handed over) and for
 * GPU memory, whose allocation's size the driver checks.
 */
export interface CacheOptions extends ScaleOptions {
  /** One key tensor per layer, as memory the communicator holds (or give `keyPtrs`). */
  keys?: readonly CacheMemory[]
  /** One value tensor per layer (or give `valuePtrs`); absent for key-only (MLA) caches. */
  values?: readonly CacheMemory[]
  /** One key cache address per layer (or give `keys`). */
  keyPtrs?: readonly Pointer[]
  /** One value cache address per layer; empty or absent for key-only (MLA) caches. */
  valuePtrs?: readonly Pointer[]
  /** Blocks per layer tensor. */
  blockNumber: number
  /** Bytes per block. */
  blockBytes: number
  /** The GPU index: picks the RDMA NIC (`KVCACHE_RDMA_NICS[gpuIdx % n]`). Default 0. */
  gpuIdx?: number
}

const SETTING_TYPES: Record<keyof Settings, 'number' | 'boolean' | 'string' | 'list' | 'reconnect'> = {
  gidIndex: 'number',
  rdmaNics: 'list',
  ibTimeout: 'number',
  relaxOrdering: 'boolean',
  socketIfname: 'string',
  debug: 'boolean',
  debugFile: 'string',
  errorFile: 'string',
  gdrcopyFlushEnable: 'boolean',
  transport: 'string',
  authToken: 'string',
  timeoutMs: 'number',
  connectTimeoutMs: 'number',
  stallTimeoutMs: 'number',
  confirmTimeoutMs: 'number',
  maxPeers: 'number',
  tcpConnections: 'number',
  requestTtlMs: 'number',
  instanceId: 'string',
  insecure: 'boolean',
  answersTo: 'list',
  reconnect: 'reconnect',
  logFormat: 'string',
}
/** Settings whose values are never shown, not even in an error. */
const SECRET_KEYS: ReadonlySet<string> = new Set(['authToken'])

/** The settings among `options`, type-checked; any other key (besides `allowed`) is a `CONFIG` error. */
export function toSettings(options: object, allowed: ReadonlySet<string>): NativeSettings {
  if (typeof options !== 'object' || options === null) throw invalid('options must be an object')
  const settings: Record<string, unknown> = {}
  for (const [key, value] of Object.entries(options)) {
    if (value === undefined || allowed.has(key)) continue
    const type = SETTING_TYPES[key as keyof Settings]
    if (type === undefined) throw new KVTransferError('CONFIG', `unknown option ${JSON.stringify(key)}`)
    if (type === 'reconnect') {
      Object.assign(settings, toReconnect(value))
      continue
    }
    const ok =
      type === 'list'
        ? typeof value === 'string' || (Array.isArray(value) && value.every((n) => typeof n === 'string'))
        : typeof value === type
    if (!ok) {
      const want = type === 'list' ? 'a string or an array of strings' : `a ${type}`
      const shown = SECRET_KEYS.has(key) ? `a ${typeof value}` : JSON.stringify(value)
      throw new KVTransferError('CONFIG', `option ${key} must be ${want}, not ${shown}`)
    }
    settings[key] = type === 'list' && Array.isArray(value) ? [...value] : value
  }
  return settings as NativeSettings
}

/** `reconnect: { retries, backoffMs }` as the native settings (the native layer checks their ranges). */
function toReconnect(value: unknown): { reconnectRetries?: number; reconnectBackoffMs?: number } {
  if (typeof value !== 'object' || value === null) throw new KVTransferError('CONFIG', 'option reconnect must be an object, e.g. { retries: 3, backoffMs: 200 }')
  const { retries, backoffMs, ...rest } = value as ReconnectPolicy
  const unknown = Object.keys(rest)
  if (unknown.length > 0) throw new KVTransferError('CONFIG', `unknown option reconnect.${unknown[0]}`)
  for (const [name, v] of [['retries', retries], ['backoffMs', backoffMs]] as const) {
    if (v !== undefined && typeof v !== 'number') throw new KVTransferError('CONFIG', `option reconnect.${name} must be a number, not ${JSON.stringify(v)}`)
  }
  return { reconnectRetries: retries, reconnectBackoffMs: backoffMs }
}

export function toPointers(name: string, list: readonly Pointer[] | undefined): bigint[] {
  if (list === undefined) return []
  if (!Array.isArray(list)) throw invalid(`${name} must be an array of addresses`)
  return list.map((p, i) => {
    if (typeof p === 'bigint' && p >= 0n) return p
    if (typeof p === 'number' && Number.isSafeInteger(p) && p >= 0) return BigInt(p)
    throw invalid(`${name}[${i}] is not an address (a non-negative bigint or safe integer)`)
  })
}

export function toPort(port: Port, allowZero: boolean): number {
  const n = typeof port === 'string' && /^\s*\d+\s*$/.test(port) ? Number(port) : port
  if (typeof n !== 'number' || !Number.isInteger(n) || n < (allowZero ? 0 : 1) || n > 65535) {
    throw invalid(`port ${JSON.stringify(String(port))} is not a port number (${allowZero ? 0 : 1}–65535)`)
  }
  return n
}

export function toHost(ip: unknown): string {
  if (typeof ip !== 'string' || ip.trim() === '') throw invalid(`ip must be a host name or address, not ${String(ip)}`)
  return ip.trim()
}

export function toCount(name: string, v: unknown, min: number, max = 0xffffffff): number {
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max) {
    throw invalid(`${name} must be a whole number from ${min} to ${max}, not ${String(v)}`)
  }
  return v
}

export function toBlockIds(name: string, ids: BlockIds): Uint32Array {
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

/** The cache option names that carry memory, by tensor: objects, then addresses. */
export const MEMORY_KEYS = ['keys', 'values', 'keyScales', 'valueScales', 'keyPtrs', 'valuePtrs', 'keyScalePtrs', 'valueScalePtrs'] as const

/**
 * The addresses of one tensor's layers, from objects (`objects`, held in `held`) or addresses (`pointers`);
 * each object must hold at least `bytes`.
 */
function toTensor(
  objectsName: string,
  objects: readonly CacheMemory[] | undefined,
  pointersName: string,
  pointers: readonly Pointer[] | undefined,
  bytes: number,
  address: (view: Buffer) => bigint,
  held: unknown[],
): bigint[] {
  if (objects === undefined) return toPointers(pointersName, pointers)
  if (pointers !== undefined) throw invalid(`give ${objectsName} or ${pointersName}, not both`)
  if (!Array.isArray(objects)) throw invalid(`${objectsName} must be an array of Buffers, ArrayBuffers, HostBuffers or { ptr, byteLength }`)
  return objects.map((m: unknown, i) => {
    const name = `${objectsName}[${i}]`
    let ptr: bigint
    let length: number
    const backing = ArrayBuffer.isView(m) ? m.buffer : m
    if (typeof backing === 'object' && backing !== null && ((backing as { resizable?: boolean }).resizable || (backing as { growable?: boolean }).growable)) {
      throw invalid(`${name} is a resizable buffer: its memory may move; give a fixed-size one (or a HostBuffer)`)
    }
    if (ArrayBuffer.isView(m)) {
      ;[ptr, length] = [address(Buffer.from(m.buffer, m.byteOffset, m.byteLength)), m.byteLength]
    } else if (m instanceof ArrayBuffer || (typeof SharedArrayBuffer !== 'undefined' && m instanceof SharedArrayBuffer)) {
      ;[ptr, length] = [address(Buffer.from(m)), m.byteLength]
    } else if (typeof m === 'object' && m !== null && 'ptr' in m && 'byteLength' in m) {
      const d = m as { ptr: unknown; byteLength: unknown; freed?: unknown }
      if (d.freed === true) throw invalid(`${name} was freed`)
      ;[ptr] = toPointers(name, [d.ptr as Pointer])
      length = toCount(`${name}.byteLength`, d.byteLength, 1, Number.MAX_SAFE_INTEGER)
    } else {
      throw invalid(`${name} is not memory: give a Buffer, an ArrayBuffer, a HostBuffer or { ptr, byteLength }`)
    }
    if (length < bytes) throw invalid(`${name} has ${length} bytes; the cache needs ${bytes} per tensor (blockNumber × block bytes)`)
    held.push(m)
    return ptr
  })
}

/**
 * The native constructor's argument for a cache, a role, a port and a TP layout, and the objects that hold the
 * cache's memory (to keep referenced until the communicator closes).
 */
export function toNativeInit(
  role: Role,
  cache: CacheOptions,
  port: number,
  tpSize: number,
  tpIdx: number,
  settings: NativeSettings,
  address: (view: Buffer) => bigint,
): { init: NativeInit; held: unknown[] } {
  const blockNumber = toCount('blockNumber', cache.blockNumber, 1)
  const blockBytes = toCount('blockBytes', cache.blockBytes, 1, Number.MAX_SAFE_INTEGER)
  const scaleBlockBytes = toCount('scaleBlockBytes', cache.scaleBlockBytes ?? 0, 0, Number.MAX_SAFE_INTEGER)
  if (cache.keys === undefined && cache.keyPtrs === undefined) throw invalid('give the cache: keys (or keyPtrs), one per layer')
  const held: unknown[] = []
  const tensor = (o: keyof CacheOptions, p: keyof CacheOptions, bytes: number) =>
    toTensor(o, cache[o] as readonly CacheMemory[] | undefined, p, cache[p] as readonly Pointer[] | undefined, blockNumber * bytes, address, held)
  const init = {
    role,
    gpuIdx: toCount('gpuIdx', cache.gpuIdx ?? 0, 0),
    port,
    keyPtrs: tensor('keys', 'keyPtrs', blockBytes),
    valuePtrs: tensor('values', 'valuePtrs', blockBytes),
    keyScalePtrs: tensor('keyScales', 'keyScalePtrs', scaleBlockBytes),
    valueScalePtrs: tensor('valueScales', 'valueScalePtrs', scaleBlockBytes),
    blockNumber,
    blockBytes,
    scaleBlockBytes,
    prefillTpSize: toCount('prefillTpSize', tpSize, 1),
    prefillTpIdx: toCount('prefillTpIdx', tpIdx, 0),
    settings,
  }
  // The native layer's words are neutral ("no key cache"); here the parameters have their JavaScript names,
  // as the caller gave them.
  const named = (o: keyof CacheOptions, p: string) => (cache[o] !== undefined ? o : p)
  const keys = named('keys', 'keyPtrs')
  if (init.keyPtrs.length === 0) throw invalid(`${keys} is empty: give one key cache address per layer`)
  const lists = [
    [named('values', 'valuePtrs'), init.valuePtrs],
    [named('keyScales', 'keyScalePtrs'), init.keyScalePtrs],
    [named('valueScales', 'valueScalePtrs'), init.valueScalePtrs],
  ] as const
  for (const [name, list] of lists) {
    if (list.length !== 0 && list.length !== init.keyPtrs.length) {
      throw invalid(`${name} has ${list.length} entries but ${keys} has ${init.keyPtrs.length}: give one per layer (or none)`)
    }
  }
  const scales = lists.slice(1).find(([, list]) => list.length > 0)
  if (scales !== undefined && scaleBlockBytes === 0) throw invalid(`${scales[0]} were given but scaleBlockBytes is 0`)
  if (scales === undefined && scaleBlockBytes !== 0) throw invalid('scaleBlockBytes was given without keyScales or valueScales')
  if (init.prefillTpIdx >= init.prefillTpSize) throw invalid(`prefillTpIdx ${init.prefillTpIdx} is outside [0, ${init.prefillTpSize})`)
  return { init, held }
}
