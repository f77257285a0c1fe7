/**
 * The async-first API: a {@link PrefillCommunicator} or a {@link DecodeCommunicator} per engine rank, made with
 * {@link Communicator.prefill} and {@link Communicator.decode}; the {@link Peer} per decode a prefill writes to
 * is in `peer.ts`.
 *
 * ```ts
 * const decode = Communicator.decode({ port: 12345, keys, values, blockNumber, blockBytes })
 * const prefill = Communicator.prefill({ keys, values, blockNumber, blockBytes })
 * const peer = await prefill.connect('10.0.0.2', 12345)
 * await peer.write([0, 1, 2], [7, 8, 9], layer)
 * await prefill.close()
 * ```
 */
import { EventEmitter } from 'node:events'
import type { NativeCommunicator, NativePeerEvent } from '../binding.js'
import { call, fromFailure, invalid, KVTransferError, type NativeFailure, settled } from './errors.js'
import { native } from './loader.js'
import {
  type CacheOptions,
  MEMORY_KEYS,
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
import { type LogOptions, toLogListener } from './logging.js'
import { Peer } from './peer.js'
import { type Stats, toStats } from './stats.js'
import { abortable, connectWith, type Notification, NotificationHub, toRequestId, toSignal, type WaitOptions, waitWith } from './requests.js'

/** A prefill communicator's options: its cache, its tensor-parallel rank, and settings. */
export interface PrefillOptions extends CacheOptions, Settings, LogOptions {
  /** This rank's tensor-parallel size (default 1). */
  tpSize?: number
  /** This rank's tensor-parallel index (default 0). */
  tpIdx?: number
}

/** A decode communicator's options: its cache, the port it listens on, and settings. */
export interface DecodeOptions extends CacheOptions, Settings, LogOptions {
  /** The control port to listen on; 0 (the default) picks a free one, see {@link DecodeCommunicator.port}. */
  port?: number
}

/** A prefill link of a decode ({@link DecodeCommunicator.peers}). */
export interface PeerSummary {
  /** `prefill tp i/n at <address>`. */
  name: string
  /** The transport its data path took. */
  transport: Transport
}

/** What {@link PrefillCommunicator.connect} takes besides the address. */
export interface ConnectOptions {
  /** The decode's tensor-parallel size (default 1): each decode block holds `tpSize / dstTpSize` slices. */
  dstTpSize?: number
  /**
   * Cancels the connect while it has not started (it waits behind the peer's earlier calls): it then makes no
   * connection and rejects with `ABORTED`. A connect that has started runs to its end, as a write does.
   */
  signal?: AbortSignal
}

/**
 * What may stop waiting for a call: {@link Communicator.close}, {@link DecodeCommunicator.revoke},
 * {@link Peer.close}, {@link Peer.abort}.
 */
export interface SignalOptions {
  /**
   * Aborted already: the call does nothing and rejects with `ABORTED`. Aborted later: the call rejects with
   * `ABORTED` at once, and what it started goes on to its end.
   */
  signal?: AbortSignal
}

/** A connection to a decode peer came up ({@link PrefillCommunicator.on}). */
export interface PeerConnectedEvent {
  /** `host:port`, as given to `connect`. */
  peer: string
  /** The transport it took. */
  transport: Transport
  /** Whether it replaces one that ended (by the reconnect policy), rather than coming from `connect`. */
  reconnected: boolean
}

/**
 * A connection to a decode peer ended: the decode closed or went away, a write failed on it, or it broke. Told
 * once per connection, without a call (the request channel sees it), and never for one this side ended
 * (`Peer.close`, `close`). The next call that needs it reconnects by the `reconnect` policy.
 */
export interface PeerDisconnectedEvent {
  /** `host:port`. */
  peer: string
  /** Why. */
  cause: KVTransferError
}

/** An attempt to rebuild a decode peer's connection starts. */
export interface PeerReconnectingEvent {
  /** `host:port`. */
  peer: string
  /** This attempt (from 1). */
  attempt: number
  /** Attempts in all (`1 + reconnect.retries`). */
  attempts: number
  /** Why the connection ended, or why the attempt before this one failed. */
  cause: KVTransferError
}

/** The events of a {@link PrefillCommunicator}, each with its payload. */
export interface PrefillEvents {
  /** A connection came up. */
  connected: [PeerConnectedEvent]
  /** A connection ended. */
  disconnected: [PeerDisconnectedEvent]
  /** An attempt to rebuild a connection starts. */
  reconnecting: [PeerReconnectingEvent]
}

const CACHE_KEYS = [...MEMORY_KEYS, 'blockNumber', 'blockBytes', 'scaleBlockBytes', 'gpuIdx', 'onLog']
const PREFILL_KEYS = new Set([...CACHE_KEYS, 'tpSize', 'tpIdx'])
const DECODE_KEYS = new Set([...CACHE_KEYS, 'port'])

/**
 * Communicators not yet closed. An open communicator is never collected (as an open socket is not), so the
 * memory objects it holds are not either, whatever the caller keeps.
 */
const OPEN = new Set<Communicator>()

/**
 * The memory of communicators whose close could not stop every link (a same-host link of a process that lives
 * on may still write there): held for the life of the process.
 */
const QUARANTINE: unknown[] = []

/** A native communicator made off the event loop; what held its memory stays referenced by the caller meanwhile. */
async function opened(init: Parameters<typeof native.openCommunicator>[0], onLog: unknown): Promise<NativeCommunicator> {
  const made = await call(() => native.openCommunicator(init, toLogListener(onLog)))
  if (made instanceof native.NativeCommunicator) return made
  throw fromFailure(made as NativeFailure)
}

/** The address of a `Buffer`'s first byte. */
const addressOf = (view: Buffer): bigint => native.bufferAddress(view)

/**
 * One side of KV-cache transfers: what both roles have. Made by {@link Communicator.prefill} (a
 * {@link PrefillCommunicator}: it connects to decodes and writes) or {@link Communicator.decode} (a
 * {@link DecodeCommunicator}: it registers its cache and listens); each has only its role's methods.
 *
 * Each peer's work runs on a thread of the library's own, never on libuv's pool, and nothing here waits on a
 * transfer in flight. An open communicator keeps the memory it was given referenced; {@link Communicator.close}
 * lets go of it.
 */
export abstract class Communicator {
  /** The role. */
  abstract readonly role: Role
  /** @internal */
  readonly native: NativeCommunicator
  /** The objects that hold the cache's memory, until closed: referenced, never read. */
  protected held: unknown[]
  #closing: Promise<void> | undefined

  /** @internal */
  protected constructor(nativeCommunicator: NativeCommunicator, held: unknown[]) {
    this.native = nativeCommunicator
    this.held = held
    OPEN.add(this)
  }

  /**
   * A prefill communicator over `options`' cache.
   * @throws {KVTransferError} `INVALID_ARGUMENT` or `CONFIG` for a bad cache or setting, `UNAVAILABLE` for a
   * transport that cannot be used here.
   */
  static prefill(options: PrefillOptions): PrefillCommunicator {
    const settings = toSettings(options, PREFILL_KEYS)
    const { init, held } = call(() => toNativeInit('prefill', options, 0, options.tpSize ?? 1, options.tpIdx ?? 0, settings, addressOf))
    return new PrefillCommunicator(call(() => new native.NativeCommunicator(init, toLogListener(options.onLog))), held)
  }

  /**
   * A decode communicator over `options`' cache, listening on `options.port`. Without `authToken` it listens
   * only where no other host reaches it (`socketIfname: 'lo'`), unless `insecure: true`.
   * @throws {KVTransferError} as {@link Communicator.prefill}, `TRANSPORT` when the port cannot be listened on,
   * and `CONFIG` when it would listen beyond loopback without `authToken` (and without `insecure: true`).
   */
  static decode(options: DecodeOptions): DecodeCommunicator {
    const settings = toSettings(options, DECODE_KEYS)
    const port = call(() => toPort(options.port ?? 0, true))
    const { init, held } = call(() => toNativeInit('decode', options, port, 1, 0, settings, addressOf))
    // Secure by default: no token and a port beyond loopback is refused unless `insecure` (see Settings).
    return new DecodeCommunicator(call(() => new native.NativeCommunicator({ ...init, secureDefault: true }, toLogListener(options.onLog))), held)
  }

  /**
   * {@link Communicator.prefill}, with its memory registered off the event loop (an RDMA NIC or a GPU driver
   * can take seconds over a large cache): the options are checked at once, the rest on a thread of its own.
   * @throws {KVTransferError} (as a rejection) as {@link Communicator.prefill}.
   */
  static async prefillAsync(options: PrefillOptions): Promise<PrefillCommunicator> {
    const settings = toSettings(options, PREFILL_KEYS)
    const { init, held } = call(() => toNativeInit('prefill', options, 0, options.tpSize ?? 1, options.tpIdx ?? 0, settings, addressOf))
    return new PrefillCommunicator(await opened(init, options.onLog), held)
  }

  /**
   * {@link Communicator.decode}, with its memory registered and its ports opened off the event loop.
   * @throws {KVTransferError} (as a rejection) as {@link Communicator.decode}.
   */
  static async decodeAsync(options: DecodeOptions): Promise<DecodeCommunicator> {
    const settings = toSettings(options, DECODE_KEYS)
    const port = call(() => toPort(options.port ?? 0, true))
    const { init, held } = call(() => toNativeInit('decode', options, port, 1, 0, settings, addressOf))
    return new DecodeCommunicator(await opened({ ...init, secureDefault: true }, options.onLog), held)
  }

  /**
   * @internal The seed API's communicator (`RDMACommunicator`): from its positional arguments as options, with
   * the original's behaviour (a decode listens without a token, with a warning, and does not keep the process
   * alive).
   */
  static seed(role: Role, options: CacheOptions & Settings & LogOptions, port: number, tpSize: number, tpIdx: number, allowed: ReadonlySet<string>): PrefillCommunicator | DecodeCommunicator {
    const settings = toSettings(options, new Set([...CACHE_KEYS, ...allowed]))
    const { init, held } = call(() => toNativeInit(role, options, port, tpSize, tpIdx, settings, addressOf))
    const made = call(() => new native.NativeCommunicator(init, toLogListener(options.onLog)))
    if (role === 'prefill') return new PrefillCommunicator(made, held)
    return new DecodeCommunicator(made, held).unref()
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
   * What this communicator has counted, per peer and in all (see {@link Stats}): cheap enough to call every
   * second, and still readable after close. `kvtransfer/prometheus` exports the same counts to Prometheus.
   */
  stats(): Stats {
    return toStats(call(() => this.native.stats()))
  }

  /**
   * Closes every connection, off the event loop. Resolves once a decode communicator has stopped listening and
   * every link has confirmed that it stopped writing or was cut off: nothing more lands in its cache, and the
   * memory it was given is let go. Rejects with `TIMEOUT`, naming them, where links on this host (shared
   * memory, CUDA IPC) neither confirmed nor can be cut off: the communicator is closed, but do not reuse its
   * memory until those processes end. Later calls of other methods fail with `CLOSED`; calling it again waits
   * for the same close. `options.signal` stops this call's wait (`ABORTED`); the close goes on.
   */
  close(options: SignalOptions = {}): Promise<void> {
    const signal = call(() => toSignal(options?.signal))
    if (signal?.aborted) return Promise.reject(new KVTransferError('ABORTED', 'the close was aborted before it started'))
    return signal === undefined ? this.#close() : abortable(this.#close(), signal, 'waiting for the close')
  }

  #close(): Promise<void> {
    this.#closing ??= (async () => {
      try {
        await settled(call(() => this.native.closeAsync()))
      } catch (err) {
        this.#released(err)
        throw err
      }
      this.#released(null)
    })()
    return this.#closing
  }

  /** @internal Closes on the calling thread (the seed API's `close`). */
  closeNow(): void {
    try {
      call(() => this.native.close())
    } catch (err) {
      this.#released(err)
      throw err
    }
    this.#released(null)
  }

  #released(failure: unknown): void {
    if (failure instanceof KVTransferError && failure.code === 'TIMEOUT') QUARANTINE.push(...this.held)
    this.held = []
    OPEN.delete(this)
    this.onClosed()
  }

  /** @internal What a role lets go of once closed. */
  protected onClosed(): void {}

  /** `await using comm = Communicator.decode(...)` awaits {@link Communicator.close} at the end of the scope. */
  async [Symbol.asyncDispose](): Promise<void> {
    await this.close()
  }
}

/**
 * A prefill communicator: it connects to decode communicators and writes blocks into them, and tells how each
 * connection fares ({@link PrefillCommunicator.on}).
 */
export class PrefillCommunicator extends Communicator {
  /** The role: `'prefill'`. */
  readonly role = 'prefill' as const
  readonly #events = new EventEmitter<PrefillEvents>()

  /** @internal */
  constructor(nativeCommunicator: NativeCommunicator, held: unknown[]) {
    super(nativeCommunicator, held)
    // The native side calls this from the event loop; it does not keep the process alive.
    call(() => nativeCommunicator.onPeerEvents((e) => this.#tell(e)))
  }

  #tell(e: NativePeerEvent): void {
    const cause = e.cause == null ? undefined : fromFailure(e.cause, { peer: e.peer })
    if (e.kind === 'connected') this.#events.emit('connected', { peer: e.peer, transport: e.transport as Transport, reconnected: e.reconnected === true })
    else if (e.kind === 'disconnected' && cause !== undefined) this.#events.emit('disconnected', { peer: e.peer, cause })
    else if (e.kind === 'reconnecting' && cause !== undefined)
      this.#events.emit('reconnecting', { peer: e.peer, attempt: e.attempt ?? 0, attempts: e.attempts ?? 0, cause })
  }

  /**
   * Calls `listener` with each `'connected'`, `'disconnected'` or `'reconnecting'` event of this communicator's
   * decode peers ({@link PrefillEvents}), from the event loop, until it is closed. Returns this communicator.
   * A listener that throws is an uncaught exception, as with any `EventEmitter`.
   */
  on<E extends keyof PrefillEvents>(event: E, listener: (...payload: PrefillEvents[E]) => void): this {
    this.#events.on(event, listener as never)
    return this
  }

  /** As {@link PrefillCommunicator.on}, for the next such event only. */
  once<E extends keyof PrefillEvents>(event: E, listener: (...payload: PrefillEvents[E]) => void): this {
    this.#events.once(event, listener as never)
    return this
  }

  /** Removes a listener added with {@link PrefillCommunicator.on} or {@link PrefillCommunicator.once}. */
  off<E extends keyof PrefillEvents>(event: E, listener: (...payload: PrefillEvents[E]) => void): this {
    this.#events.off(event, listener as never)
    return this
  }

  /**
   * Connects to the decode communicator at `ip:port` (a connected peer is returned as it is), by the
   * `reconnect` policy: an address where nothing listens rejects with `UNREACHABLE`, naming it, once the
   * policy's attempts are spent.
   * @throws {KVTransferError} (as a rejection) when the handshake fails or the decode refuses.
   */
  async connect(ip: string, port: Port, options: ConnectOptions = {}): Promise<Peer> {
    if (typeof options !== 'object' || options === null) throw invalid('connect options must be an object, e.g. { dstTpSize: 2 }')
    const unknown = Object.keys(options).filter((k) => k !== 'dstTpSize' && k !== 'signal')
    if (unknown.length > 0) throw new KVTransferError('CONFIG', `unknown connect option ${JSON.stringify(unknown[0])}`)
    const [host, p, dst] = call(() => [toHost(ip), toPort(port, false), toCount('dstTpSize', options.dstTpSize ?? 1, 1)] as const)
    await connectWith(this.native, host, p, dst, call(() => toSignal(options.signal)))
    return new Peer(this, host, p)
  }

  /** Tells the decode at `ip:port` that `requestId` will not complete ({@link Peer.abort}). */
  async abortRequest(ip: string, port: Port, requestId: string, reason = '', options: SignalOptions = {}): Promise<void> {
    await this.peer(ip, port).abort(requestId, reason, options)
  }

  /** The peer at `ip:port`, whether or not it is connected (its writes say `NOT_CONNECTED` if it is not). */
  peer(ip: string, port: Port): Peer {
    return call(() => new Peer(this, toHost(ip), toPort(port, false)))
  }
}

/** A decode communicator: it registers its cache, listens, and sees the requests written into it. */
export class DecodeCommunicator extends Communicator {
  /** The role: `'decode'`. */
  readonly role = 'decode' as const
  /** The port it listens on (the one given, or the one picked for port 0). */
  readonly port: number
  readonly #hub: NotificationHub
  /** Keeps the process alive while listening, as a listening server does ({@link DecodeCommunicator.unref}). */
  readonly #listening: NodeJS.Timeout

  /** @internal */
  constructor(nativeCommunicator: NativeCommunicator, held: unknown[]) {
    super(nativeCommunicator, held)
    this.port = nativeCommunicator.port
    this.#hub = new NotificationHub(nativeCommunicator)
    this.#listening = setInterval(() => {}, 0x7fffffff)
  }

  /**
   * Lets the process exit while this communicator still listens (an open decode communicator keeps the process
   * alive until it is closed, as a listening `net.Server` does). Returns this communicator.
   */
  unref(): this {
    this.#listening.unref()
    return this
  }

  /** Undoes {@link DecodeCommunicator.unref}. */
  ref(): this {
    this.#listening.ref()
    return this
  }

  /** @internal */
  protected override onClosed(): void {
    clearInterval(this.#listening)
  }

  /** The prefill links whose request channel is open now: who they are and the transport each took. */
  peers(): PeerSummary[] {
    return call(() => this.native.peers()).map((p) => ({ name: p.name, transport: p.transport as Transport }))
  }

  /**
   * The notifications of every request, in the order each prefill link made its writes, as they arrive:
   * `'done'` once a write's bytes are in this cache (never before), `'failed'` when a request can no longer
   * complete (a write failed, or its prefill went away), `'aborted'` when its prefill aborted it, `'expired'`
   * when it made no progress for `requestTtlMs`. Ends when the communicator closes.
   *
   * Every iterator sees every notification that arrives from its creation on, in order (collecting starts at
   * the first call; the native side keeps the most recent 65 536 until then). An iterator that falls more than
   * 65 536 behind loses its oldest. Leaving one (`break`) does not affect the others.
   */
  notifications(): AsyncIterableIterator<Notification> {
    return this.#hub.subscribe()
  }

  /**
   * Resolves once the listed layers of `requestId` (default: every layer of the cache) have arrived from every
   * prefill rank that writes into this decode. Rejects with `TRANSPORT` as soon as the request fails (a write
   * failed, or its prefill's connection ended), `ABORTED` when its prefill aborts it or `options.signal`
   * aborts, `REVOKED` once revoked, `EXPIRED` when it made no progress for `requestTtlMs`, `TIMEOUT` after
   * `options.timeoutMs`.
   */
  async waitFor(requestId: string, options: WaitOptions = {}): Promise<void> {
    await waitWith(this.native, requestId, options)
  }

  /**
   * Resolves once no write of `requestId` can land in this cache any more, so that its blocks can be reused.
   * Every prefill link confirms that it stopped and drained the request's writes, or is cut off (its
   * connection closed) within the timeout; their writes of the request reject with `REVOKED` from then on.
   * Rejects with `TIMEOUT` only when a link on this host neither confirms nor can be cut off (shared memory,
   * CUDA IPC): do not reuse the blocks then.
   */
  async revoke(requestId: string, options: SignalOptions = {}): Promise<void> {
    const id = call(() => toRequestId(requestId))
    const signal = call(() => toSignal(options?.signal))
    if (signal?.aborted) throw new KVTransferError('ABORTED', `the revoke of request ${JSON.stringify(id)} was aborted before it started`, { requestId: id })
    await abortable(settled(call(() => this.native.revokeAsync(id)), { requestId: id }), signal, `waiting for the revoke of request ${JSON.stringify(id)}`, {
      requestId: id,
    })
  }
}
