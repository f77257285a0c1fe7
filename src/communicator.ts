/**
 * The async-first API: a {@link Communicator} per engine rank; the {@link Peer} per decode it writes to is in
 * `peer.ts`.
 *
 * ```ts
 * const decode = Communicator.decode({ port: 12345, keyPtrs, valuePtrs, blockNumber, blockBytes })
 * const prefill = Communicator.prefill({ keyPtrs, valuePtrs, blockNumber, blockBytes })
 * const peer = await prefill.connect('10.0.0.2', 12345)
 * await peer.write([0, 1, 2], [7, 8, 9], layer)
 * ```
 */
import type { NativeCommunicator } from '../binding.js'
import { call, invalid, KVTransferError, settled } from './errors.js'
import { native } from './loader.js'
import {
  type CacheOptions,
  type Port,
  type Role,
  type Settings,
  type Transport,
  toCount,
  toHost,
  toNativeInit,
  toPort,
  toSettings,
} from './options.js'
import { Peer } from './peer.js'
import { type Notification, notificationsOf, toRequestId, type WaitOptions, waitWith } from './requests.js'

/** A prefill communicator's options: its cache, its tensor-parallel rank, and settings. */
export interface PrefillOptions extends CacheOptions, Settings {
  /** This rank's tensor-parallel size (default 1). */
  tpSize?: number
  /** This rank's tensor-parallel index (default 0). */
  tpIdx?: number
}

/** A decode communicator's options: its cache, the port it listens on, and settings. */
export interface DecodeOptions extends CacheOptions, Settings {
  /** The control port to listen on; 0 (the default) picks a free one, see {@link Communicator.port}. */
  port?: number
}

/** What {@link Communicator.connect} takes besides the address. */
export interface ConnectOptions {
  /** The decode's tensor-parallel size (default 1): each decode block holds `tpSize / dstTpSize` slices. */
  dstTpSize?: number
}

const PREFILL_KEYS = new Set(['keyPtrs', 'valuePtrs', 'keyScalePtrs', 'valueScalePtrs', 'blockNumber', 'blockBytes', 'scaleBlockBytes', 'gpuIdx', 'tpSize', 'tpIdx'])
const DECODE_KEYS = new Set(['keyPtrs', 'valuePtrs', 'keyScalePtrs', 'valueScalePtrs', 'blockNumber', 'blockBytes', 'scaleBlockBytes', 'gpuIdx', 'port'])

/**
 * One side of KV-cache transfers. A decode communicator registers its cache and listens; a prefill communicator
 * connects to decodes ({@link Communicator.connect}) and writes blocks through the {@link Peer} it gets.
 *
 * Each peer's work runs on a thread of the library's own, never on libuv's pool, and nothing here waits on a
 * transfer in flight.
 */
export class Communicator {
  /** The role. */
  readonly role: Role
  /** The port a decode communicator listens on (the one given, or the one picked for port 0); 0 for prefill. */
  readonly port: number
  /** @internal */
  readonly native: NativeCommunicator

  private constructor(role: Role, native: NativeCommunicator) {
    this.role = role
    this.native = native
    this.port = native.port
  }

  /**
   * A prefill communicator over `options`' cache.
   * @throws {KVTransferError} `INVALID_ARGUMENT` or `CONFIG` for a bad cache or setting, `UNAVAILABLE` for a
   * transport that cannot be used here.
   */
  static prefill(options: PrefillOptions): Communicator {
    const settings = toSettings(options, PREFILL_KEYS)
    const init = toNativeInit('prefill', options, 0, options.tpSize ?? 1, options.tpIdx ?? 0, settings)
    return new Communicator('prefill', call(() => new native.NativeCommunicator(init)))
  }

  /**
   * A decode communicator over `options`' cache, listening on `options.port`. Without `authToken` it listens
   * only where no other host reaches it (`socketIfname: 'lo'`), unless `insecure: true`.
   * @throws {KVTransferError} as {@link Communicator.prefill}, `TRANSPORT` when the port cannot be listened on,
   * and `CONFIG` when it would listen beyond loopback without `authToken` (and without `insecure: true`).
   */
  static decode(options: DecodeOptions): Communicator {
    const settings = toSettings(options, DECODE_KEYS)
    const init = toNativeInit('decode', options, toPort(options.port ?? 0, true), 1, 0, settings)
    // Secure by default: no token and a port beyond loopback is refused unless `insecure` (see Settings).
    return new Communicator('decode', call(() => new native.NativeCommunicator({ ...init, secureDefault: true })))
  }

  /** @internal Wraps a native communicator made elsewhere (the compatibility layer). */
  static wrap(role: Role, native: NativeCommunicator): Communicator {
    return new Communicator(role, native)
  }

  /**
   * The preferred transport. With `transport: 'auto'`: `'cuda-ipc'` for a cache in GPU memory or `'shm'` for one
   * in host memory (taken by peers on this host), else `'rdma'` when the NIC is usable, else `'tcp'`; each
   * connection takes the first one both sides have ({@link Peer.transport}).
   */
  get transport(): Transport {
    return this.native.transport as Transport
  }

  /** The RDMA device in use (`'mlx5_0'`, `'rxe0'`), or `null` when RDMA is not used. */
  get rdmaDevice(): string | null {
    return this.native.rdmaDevice ?? null
  }

  /**
   * Connects to the decode communicator at `ip:port` (a connected peer is returned as it is).
   * @throws {KVTransferError} (as a rejection) when the handshake fails or the decode refuses.
   */
  async connect(ip: string, port: Port, options: ConnectOptions = {}): Promise<Peer> {
    if (typeof options !== 'object' || options === null) throw invalid('connect options must be an object, e.g. { dstTpSize: 2 }')
    const unknown = Object.keys(options).filter((k) => k !== 'dstTpSize')
    if (unknown.length > 0) throw new KVTransferError('CONFIG', `unknown connect option ${JSON.stringify(unknown[0])}`)
    const [host, p, dst] = call(() => [toHost(ip), toPort(port, false), toCount('dstTpSize', options.dstTpSize ?? 1, 1)] as const)
    await settled(call(() => this.native.connectAsync(host, p, dst)))
    return new Peer(this, host, p)
  }

  /**
   * Prefill: tells the decode at `ip:port` that `requestId` will not complete ({@link Peer.abort}).
   */
  async abortRequest(ip: string, port: Port, requestId: string, reason = ''): Promise<void> {
    await this.peer(ip, port).abort(requestId, reason)
  }

  /**
   * Decode: the notifications of every request, in the order each prefill link made its writes, as they
   * arrive: `'done'` once a write's bytes are in this cache (never before), `'failed'` when a request can no
   * longer complete (a write failed, or its prefill went away), `'aborted'` when its prefill aborted it. Ends
   * when the communicator closes. Notifications are kept from the first call on (the most recent 65 536); one
   * consumer takes them all (two iterators would each get some).
   */
  notifications(): AsyncGenerator<Notification, void, undefined> {
    if (this.role !== 'decode') throw invalid('notifications are for decode communicators; this one is prefill')
    return notificationsOf(this.native)
  }

  /**
   * Decode: resolves once the listed layers of `requestId` (default: every layer of the cache) have arrived
   * from every prefill rank that writes into this decode. Rejects with `TRANSPORT` as soon as the request
   * fails (a write failed, or its prefill's connection ended), `ABORTED` when its prefill aborts it or
   * `options.signal` aborts, `REVOKED` once revoked, `TIMEOUT` after `options.timeoutMs`.
   */
  async waitFor(requestId: string, options: WaitOptions = {}): Promise<void> {
    await waitWith(this.native, requestId, options)
  }

  /**
   * Decode: resolves once no write of `requestId` can land in this cache any more, so that its blocks can be
   * reused. Every prefill link confirms that it stopped and drained the request's writes, or is cut off (its
   * connection closed) within the timeout; their writes of the request reject with `REVOKED` from then on.
   * Rejects with `TIMEOUT` only when a link on this host neither confirms nor can be cut off (shared memory,
   * CUDA IPC): do not reuse the blocks then.
   */
  async revoke(requestId: string): Promise<void> {
    const id = call(() => toRequestId(requestId))
    await settled(call(() => this.native.revokeAsync(id)))
  }

  /** The peer at `ip:port`, whether or not it is connected (its writes say `NOT_CONNECTED` if it is not). */
  peer(ip: string, port: Port): Peer {
    return call(() => new Peer(this, toHost(ip), toPort(port, false)))
  }

  /**
   * Closes every connection. A decode communicator stops listening and writes nothing more into its cache once
   * this returns. Later calls fail with `CLOSED`. Safe to call twice.
   */
  close(): void {
    this.native.close()
  }

  /** `await using comm = Communicator.decode(...)` closes it at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    this.close()
  }
}
