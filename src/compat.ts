/**
 * The API users port from: `RDMACommunicator`, with the original's positional constructor, `connect → boolean`,
 * `isConnected`, `writeCache → 0 | -1` and their semantics, plus the Promise-based methods beside them. A thin
 * layer over {@link Communicator} and {@link Peer}.
 */
import { Communicator, type DecodeCommunicator, type PrefillCommunicator } from './communicator.js'
import { call, invalid, KVTransferError } from './errors.js'
import {
  type BlockIds,
  type CommunicatorOptions,
  type Pointer,
  type Port,
  type Role,
  type Transport,
  toBlockIds,
  toCount,
  toHost,
  toPort,
} from './options.js'
import type { Notification, WaitOptions, WriteOptions } from './requests.js'

const SCALE_KEYS = new Set(['keyScalePtrs', 'valueScalePtrs', 'keyScales', 'valueScales', 'scaleBlockBytes'])

/**
 * One side of KV-cache transfers, with the original's constructor and methods (`connect`, `isConnected`,
 * `writeCache`) and their semantics, plus a Promise-based API beside them.
 *
 * A `'decode'` communicator registers its cache and listens on `port`; a `'prefill'` one connects to decode
 * peers and writes blocks into them.
 */
export class RDMACommunicator {
  /** The role given at construction. */
  readonly role: Role
  /** The port a decode communicator listens on (the one given, or the one picked for port 0). */
  readonly port: number
  /** The last failure of the synchronous API (which reports failures as `false` / `-1`). */
  lastError: KVTransferError | undefined
  /** The communicator this one wraps, for the async-first API ({@link PrefillCommunicator.connect}, {@link Peer.write}). */
  readonly communicator: PrefillCommunicator | DecodeCommunicator

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
    const cache = { ...options, gpuIdx, keyPtrs, valuePtrs, blockNumber, blockBytes }
    this.role = role
    this.communicator = Communicator.seed(role, cache, call(() => toPort(port, true)), prefillTpSize, prefillTpIdx, SCALE_KEYS)
    this.port = this.communicator.native.port
  }

  /**
   * The preferred transport. With `transport: 'auto'`: `'cuda-ipc'` for a cache in GPU memory or `'shm'` for
   * one in host memory (taken by peers on this host), else `'rdma'` when the NIC is usable, else `'tcp'`; each
   * connection takes the first one both sides have ({@link RDMACommunicator.connectedTransport}).
   */
  get transport(): Transport {
    return this.communicator.transport
  }

  /** The transport the connection to `ip:port` uses, or `null` when there is none (or it broke). */
  connectedTransport(ip: string, port: Port): Transport | null {
    try {
      return this.#prefill().peer(ip, port).transport
    } catch {
      return null
    }
  }

  /** The RDMA device in use (`'mlx5_0'`, `'rxe0'`), or `null` when RDMA is not used. */
  get rdmaDevice(): string | null {
    return this.communicator.rdmaDevice
  }

  /**
   * Connects to the decode communicator at `ip:port`, whose tensor-parallel size is `dstTpSize`, by the
   * reconnect policy (`KVCACHE_RECONNECT_RETRIES`, `KVCACHE_RECONNECT_BACKOFF_MS`): where nothing listens there
   * yet, it tries again that often (about 1.4 s by default), then returns `false` (`lastError.code` is
   * `UNREACHABLE`).
   * @returns `true` when connected (also when already connected); `false` on failure, with the reason
   * in the error log and in {@link RDMACommunicator.lastError}.
   */
  connect(ip: string, port: Port, dstTpSize = 1): boolean {
    return this.#sync(() => {
      this.#native.connect(toHost(ip), toPort(port, false), toCount('dstTpSize', dstTpSize, 1))
      return true
    }, false)
  }

  /** Whether a connection to `ip:port` exists. Never waits for a transfer. */
  isConnected(ip: string, port: Port): boolean {
    try {
      return this.#prefill().peer(ip, port).connected
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
      const [local, remote, layer] = writeArgs(localBlockIds, remoteBlockIds, layerIdx)
      this.#native.writeCache(toHost(ip), toPort(port, false), local, remote, layer)
      return 0 as const
    }, -1 as const)
  }

  /**
   * Connects without blocking the event loop.
   * @throws {KVTransferError} (as a rejection) when the connection fails.
   */
  async connectAsync(ip: string, port: Port, dstTpSize = 1): Promise<void> {
    try {
      call(() => [toHost(ip), toPort(port, false), toCount('dstTpSize', dstTpSize, 1)])
    } catch (err) {
      throw KVTransferError.from(err)
    }
    await this.#prefill().connect(ip, port, { dstTpSize })
  }

  /**
   * Like {@link RDMACommunicator.writeCache}, off the event loop: resolves once the bytes are in the
   * peer's memory. With `options.requestId` the decode is notified once they are there
   * ({@link RDMACommunicator.waitFor}); `options.signal` and `options.timeoutMs` cancel a write that has not
   * started yet.
   * @throws {KVTransferError} (as a rejection) on refusal or failure; nothing moves on refusal.
   */
  async writeCacheAsync(
    ip: string,
    port: Port,
    localBlockIds: BlockIds,
    remoteBlockIds: BlockIds,
    layerIdx: number,
    options: WriteOptions = {},
  ): Promise<void> {
    let peer, args
    try {
      args = writeArgs(localBlockIds, remoteBlockIds, layerIdx)
      peer = this.#prefill().peer(ip, port)
    } catch (err) {
      throw KVTransferError.from(err)
    }
    await peer.write(...args, options)
  }

  /** Prefill: tells the decode at `ip:port` that `requestId` will not complete ({@link PrefillCommunicator.abortRequest}). */
  async abortRequest(ip: string, port: Port, requestId: string, reason = ''): Promise<void> {
    await this.#prefill().abortRequest(ip, port, requestId, reason)
  }

  /** Decode: the requests' notifications as they arrive ({@link DecodeCommunicator.notifications}). */
  notifications(): AsyncIterableIterator<Notification> {
    return this.#decode('notifications').notifications()
  }

  /** Decode: resolves once the request's layers have arrived ({@link DecodeCommunicator.waitFor}). */
  async waitFor(requestId: string, options: WaitOptions = {}): Promise<void> {
    await this.#decode('waitFor').waitFor(requestId, options)
  }

  /** Decode: resolves once no write of the request can land any more ({@link DecodeCommunicator.revoke}). */
  async revoke(requestId: string): Promise<void> {
    await this.#decode('revoke').revoke(requestId)
  }

  /**
   * Closes every connection, on the calling thread (as the rest of the synchronous API). A decode communicator
   * stops listening and writes nothing more into its cache once this returns. Later calls fail with `CLOSED`.
   * Safe to call twice. Off the event loop: `await comm.communicator.close()`. Where links on this host neither
   * confirmed nor can be cut off, {@link RDMACommunicator.lastError} is a `TIMEOUT` naming them (and the error
   * log says so): do not reuse the memory until those processes end.
   */
  close(): void {
    this.#sync(() => this.communicator.closeNow(), undefined)
  }

  /** `await using comm = new RDMACommunicator(...)` closes it at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.communicator.close()
  }

  get #native() {
    return this.communicator.native
  }

  #prefill(): PrefillCommunicator {
    if (this.communicator.role !== 'prefill') throw invalid('connections are for prefill communicators; this one is decode')
    return this.communicator
  }

  #decode(what: string): DecodeCommunicator {
    if (this.communicator.role !== 'decode') throw invalid(`${what} is for decode communicators; this one is prefill`)
    return this.communicator
  }

  /**
   * The synchronous API reports failures as `false` / `-1`, as the original does: the reason goes to the error
   * log (`KVCACHE_ERROR_FILE`) and to {@link RDMACommunicator.lastError}.
   */
  #sync<T>(f: () => T, failed: T): T {
    try {
      const v = f()
      this.lastError = undefined
      return v
    } catch (err) {
      const e = KVTransferError.from(err)
      this.#native.logError(`${e.code}: ${e.message}`)
      this.lastError = e
      return failed
    }
  }
}

function writeArgs(localBlockIds: BlockIds, remoteBlockIds: BlockIds, layerIdx: number): [Uint32Array, Uint32Array, number] {
  return [toBlockIds('localBlockIds', localBlockIds), toBlockIds('remoteBlockIds', remoteBlockIds), toCount('layerIdx', layerIdx, 0)]
}
