/**
 * Requests: what a write with a `requestId` tells the decode, and how the decode waits for it. Shared by
 * {@link Communicator}, {@link Peer} and {@link RDMACommunicator}.
 */
import type { NativeCommunicator } from '../binding.js'
import { call, invalid, KVTransferError, settled } from './errors.js'
import { toCount } from './options.js'

/** What a write may carry besides its blocks. */
export interface WriteOptions {
  /**
   * The request the write belongs to (1 to 256 bytes). Once every byte is in the decode's memory, the decode
   * gets a {@link Notification} and its `waitFor(requestId)` sees the layer.
   */
  requestId?: string
  /**
   * Cancels the write if it has not started yet (it waits behind this peer's earlier writes): it then moves
   * nothing and rejects with `ABORTED`. A write that has started is never abandoned halfway: it completes or
   * fails within the transport's own timeout, so a rejection always means nothing of it lands later.
   */
  signal?: AbortSignal
  /** As `signal`, after this many milliseconds: rejects with `TIMEOUT` if the write has not started by then. */
  timeoutMs?: number
}

/** What {@link Communicator.waitFor} takes besides the request. */
export interface WaitOptions {
  /** The layers to wait for (default: every layer of the cache). */
  layers?: readonly number[]
  /** Rejects with `TIMEOUT` after this many milliseconds. */
  timeoutMs?: number
  /** Rejects with `ABORTED` when it aborts. */
  signal?: AbortSignal
}

/** What became of a write (`'done'`) or of a request (`'failed'`, `'aborted'`). */
export type NotificationStatus = 'done' | 'failed' | 'aborted'

/** One event of a request, delivered to the decode ({@link Communicator.notifications}). */
export interface Notification {
  requestId: string
  /** The layer written (`'done'` only, else `null`). */
  layerIdx: number | null
  /** The decode's blocks that the write filled (`'done'` only, else empty). */
  blockIds: number[]
  /** The prefill link it came from (`'prefill tp 0/1 at 10.0.0.1'`). */
  peer: string
  status: NotificationStatus
  /** Why the request failed or was aborted. */
  reason?: string
}

let nextTicket = 0
/** A number naming one call of this process for its cancellation (never 0). */
function ticket(): number {
  nextTicket = (nextTicket % 0xffff_fffe) + 1
  return nextTicket
}

function checkKeys(what: string, options: object, keys: readonly string[]): void {
  if (typeof options !== 'object' || options === null) throw invalid(`${what} options must be an object`)
  const unknown = Object.keys(options).filter((k) => !keys.includes(k))
  if (unknown.length > 0) throw new KVTransferError('CONFIG', `unknown ${what} option ${JSON.stringify(unknown[0])}`)
}

/** Checks a request id's type; its length is checked natively. */
export function toRequestId(id: unknown): string {
  if (typeof id !== 'string') throw invalid(`a request id must be a string, not ${typeof id}`)
  return id
}

function toSignal(signal: unknown): AbortSignal | undefined {
  if (signal === undefined) return undefined
  if (!(signal instanceof AbortSignal)) throw invalid('signal must be an AbortSignal')
  return signal
}

/**
 * Runs a native call that `cancel` can end early, given `options`' signal and timeout; `late` names what a
 * cancellation rejects with.
 */
async function cancellable(
  pending: Promise<{ code: string; message: string } | null>,
  cancel: (code: 'ABORTED' | 'TIMEOUT') => void,
  signal: AbortSignal | undefined,
  timeoutMs: number | undefined,
): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  let timedOut = false
  const onAbort = () => cancel('ABORTED')
  signal?.addEventListener('abort', onAbort, { once: true })
  if (timeoutMs !== undefined) {
    timer = setTimeout(() => {
      timedOut = true
      cancel('TIMEOUT')
    }, timeoutMs)
  }
  try {
    await settled(pending)
  } catch (err) {
    if (timedOut && err instanceof KVTransferError && err.code === 'ABORTED') {
      throw new KVTransferError('TIMEOUT', `it did not start within ${timeoutMs} ms: nothing was written`)
    }
    throw err
  } finally {
    clearTimeout(timer)
    signal?.removeEventListener('abort', onAbort)
  }
}

/** A write on the peer's thread, with `options` checked and applied. */
export async function writeWith(
  native: NativeCommunicator,
  ip: string,
  port: number,
  local: Uint32Array,
  remote: Uint32Array,
  layer: number,
  options: WriteOptions,
): Promise<void> {
  checkKeys('write', options, ['requestId', 'signal', 'timeoutMs'])
  const requestId = options.requestId === undefined ? null : toRequestId(options.requestId)
  const signal = toSignal(options.signal)
  const timeoutMs = options.timeoutMs === undefined ? undefined : toCount('timeoutMs', options.timeoutMs, 1, 0x7fffffff)
  if (signal?.aborted) throw new KVTransferError('ABORTED', 'the write was aborted before it started: nothing was written')
  const t = signal !== undefined || timeoutMs !== undefined ? ticket() : 0
  const pending = call(() => native.writeCacheAsync(ip, port, local, remote, layer, requestId, t))
  await cancellable(pending, () => native.cancelWrite(t), signal, timeoutMs)
}

/** The decode's wait for a request, with `options` checked and applied. */
export async function waitWith(native: NativeCommunicator, requestId: string, options: WaitOptions): Promise<void> {
  checkKeys('waitFor', options, ['layers', 'timeoutMs', 'signal'])
  const id = toRequestId(requestId)
  const signal = toSignal(options.signal)
  const timeoutMs = options.timeoutMs === undefined ? undefined : toCount('timeoutMs', options.timeoutMs, 1, 0x7fffffff)
  let layers: number[] | null = null
  if (options.layers !== undefined) {
    if (!Array.isArray(options.layers)) throw invalid('layers must be an array of layer indices')
    layers = options.layers.map((l, i) => toCount(`layers[${i}]`, l, 0))
  }
  if (signal?.aborted) throw new KVTransferError('ABORTED', `the wait for request ${JSON.stringify(id)} was aborted`)
  const t = ticket()
  const pending = call(() => native.waitFor(t, id, layers))
  const cancel = (code: 'ABORTED' | 'TIMEOUT') =>
    native.cancelWait(
      t,
      code,
      code === 'TIMEOUT'
        ? `request ${JSON.stringify(id)} did not arrive within ${timeoutMs} ms`
        : `the wait for request ${JSON.stringify(id)} was aborted`,
    )
  await cancellable(pending, cancel, signal, timeoutMs)
}

/**
 * The decode's notifications, batch by batch, until the communicator closes. Collecting starts now, not at the
 * first `next()`.
 */
export function notificationsOf(native: NativeCommunicator): AsyncGenerator<Notification, void, undefined> {
  const first = call(() => native.nextNotifications())
  return (async function* () {
    let pending = first
    for (;;) {
      const batch = await pending
      if (batch.length === 0) return
      for (const n of batch) {
        const out: Notification = {
          requestId: n.requestId,
          layerIdx: n.layerIdx ?? null,
          blockIds: n.blockIds,
          peer: n.peer,
          status: n.status as NotificationStatus,
        }
        if (n.reason != null) out.reason = n.reason
        yield out
      }
      pending = call(() => native.nextNotifications())
    }
  })()
}
