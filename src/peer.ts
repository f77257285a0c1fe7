/** A decode peer of a prefill {@link Communicator}: the handle its writes go through. */
import type { PrefillCommunicator, SignalOptions } from './communicator.js'
import { call, invalid, KVTransferError, settled } from './errors.js'
import { type BlockIds, type Transport, toBlockIds, toCount } from './options.js'
import { emptyPeerStats, type PeerStats } from './stats.js'
import { abortable, toRequestId, toSignal, type WriteOptions, writeWith } from './requests.js'

/** A decode peer of a prefill communicator. */
export class Peer {
  /** The communicator that writes to this peer. */
  readonly communicator: PrefillCommunicator
  /** The decode's host, as given to {@link PrefillCommunicator.connect}. */
  readonly ip: string
  /** The decode's port. */
  readonly port: number

  /** @internal */
  constructor(communicator: PrefillCommunicator, ip: string, port: number) {
    this.communicator = communicator
    this.ip = ip
    this.port = port
  }

  /**
   * Whether the connection works (one that ended is rebuilt by the next write, by the `reconnect` policy).
   * Never waits for a transfer.
   */
  get connected(): boolean {
    return this.communicator.native.isConnected(this.ip, this.port)
  }

  /**
   * What the communicator has counted about this peer: its entry of {@link PrefillCommunicator.stats}, or, where
   * more than 256 peers are connected and it came late, the entry it is counted in (`peer: 'other'`); all zeros
   * before anything was counted.
   */
  stats(): PeerStats {
    const key = `${this.ip}:${this.port}`
    const peers = this.communicator.stats().peers
    return peers.find((p) => p.peer === key) ?? (this.connected ? peers.find((p) => p.peer === 'other') : undefined) ?? emptyPeerStats(key)
  }

  /** The transport the connection uses, or `null` when there is none (or it broke). */
  get transport(): Transport | null {
    return (this.communicator.native.connectedTransport(this.ip, this.port) as Transport | null) ?? null
  }

  /**
   * Writes blocks `localBlockIds[i]` of layer `layerIdx` (keys, values and any scales) into blocks
   * `remoteBlockIds[i]` of this peer. Resolves once every byte is in the peer's memory. Writes to one peer
   * happen in the order they were made.
   *
   * With `options.requestId`, the decode is notified once the bytes are there (never before), in the order of
   * this peer's writes; a request the decode revoked rejects with `REVOKED` and moves nothing.
   * @throws {KVTransferError} (as a rejection) on refusal (nothing moves) or failure.
   */
  async write(localBlockIds: BlockIds, remoteBlockIds: BlockIds, layerIdx: number, options: WriteOptions = {}): Promise<void> {
    const [local, remote, layer] = call(
      () => [toBlockIds('localBlockIds', localBlockIds), toBlockIds('remoteBlockIds', remoteBlockIds), toCount('layerIdx', layerIdx, 0)] as const,
    )
    await writeWith(this.communicator.native, this.ip, this.port, local, remote, layer, options)
  }

  /**
   * Ends the connection to this decode, after the calls made before (the decode sees the link go, with its
   * goodbye); no `'disconnected'` event is told of it. Later writes reject with `NOT_CONNECTED` until
   * {@link PrefillCommunicator.connect} makes a new one.
   * @throws {KVTransferError} (as a rejection) `NOT_CONNECTED` where there is no connection.
   */
  async close(options: SignalOptions = {}): Promise<void> {
    const peer = `${this.ip}:${this.port}`
    const signal = call(() => toSignal(options?.signal))
    if (signal?.aborted) throw new KVTransferError('ABORTED', 'the close of the connection was aborted before it started', { peer })
    await abortable(settled(call(() => this.communicator.native.disconnectAsync(this.ip, this.port)), { peer }), signal, 'waiting for the close of the connection', { peer })
  }

  /**
   * Tells the decode that `requestId` will not complete (after the writes queued before): its `waitFor` rejects
   * with `ABORTED` and it gets an `'aborted'` notification. Later writes of the request reject with `ABORTED`.
   */
  async abort(requestId: string, reason = '', options: SignalOptions = {}): Promise<void> {
    const id = call(() => toRequestId(requestId))
    if (typeof reason !== 'string') throw invalid('reason must be a string')
    const context = { peer: `${this.ip}:${this.port}`, requestId: id }
    const signal = call(() => toSignal(options?.signal))
    if (signal?.aborted) throw new KVTransferError('ABORTED', `the abort of request ${JSON.stringify(id)} was aborted before it started`, context)
    const pending = settled(call(() => this.communicator.native.abortRequestAsync(this.ip, this.port, id, reason)), context)
    await abortable(pending, signal, `waiting for the abort of request ${JSON.stringify(id)}`, context)
  }
}
