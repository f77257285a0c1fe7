/**
 * Requests: what a write with a `requestId` tells the decode, and how the decode waits for it. Shared by
 * {@link Communicator}, {@link Peer} and {@link RDMACommunicator}.
 */
import type { NativeCommunicator, NativeNotification } from '../binding.js'
import { call, type ErrorContext, invalid, KVTransferError, settled } from './errors.js'
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
   * nothing and rejects with `ABORTED` at once. A write that has started is never abandoned halfway: it
   * completes or fails within the transport's own timeout, so a rejection always means nothing of it lands later.
   */
  signal?: AbortSignal
  /** As `signal`, after this many milliseconds: rejects with `TIMEOUT` if the write has not started by then. */
  timeoutMs?: number
}

/** What {@link DecodeCommunicator.waitFor} takes besides the request. */
export interface WaitOptions {
  /** The layers to wait for (default: every layer of the cache). */
  layers?: readonly number[]
  /** Rejects with `TIMEOUT` after this many milliseconds. */
  timeoutMs?: number
  /** Rejects with `ABORTED` when it aborts. */
  signal?: AbortSignal
}

/** What became of a write (`'done'`) or of a request (`'failed'`, `'aborted'`, `'expired'`). */
export type NotificationStatus = 'done' | 'failed' | 'aborted' | 'expired'

/** One event of a request, delivered to the decode ({@link DecodeCommunicator.notifications}). */
export interface Notification {
  /** The request the write belongs to, as the prefill named it. */
  requestId: string
  /** The layer written (`'done'` only, else `null`). */
  layerIdx: number | null
  /** The decode's blocks that the write filled (`'done'` only, else empty). */
  blockIds: number[]
  /** The prefill link it came from (`'prefill tp 0/1 at 10.0.0.1'`). */
  peer: string
  /**
   * What happened: a write arrived (`'done'`), or the request will not complete: a write failed or its prefill
   * went away (`'failed'`), its prefill aborted it (`'aborted'`), or it made no progress for `requestTtlMs`
   * (`'expired'`).
   */
  status: NotificationStatus
  /** Why the request failed, was aborted or expired. */
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

export function toSignal(signal: unknown): AbortSignal | undefined {
  if (signal === undefined) return undefined
  if (!(signal instanceof AbortSignal)) throw invalid('signal must be an AbortSignal')
  return signal
}

/**
 * Runs a native call that `cancel` can end early when `signal` aborts or `timeoutMs` passes. `cancel` returns the
 * error to reject with at once (the native call will settle with nothing to add), or `null` when the call can
 * no longer be cancelled and its own outcome is awaited.
 */
async function cancellable(
  pending: Promise<{ code: string; message: string } | null>,
  cancel: (code: 'ABORTED' | 'TIMEOUT') => KVTransferError | null,
  signal: AbortSignal | undefined,
  timeoutMs: number | undefined,
  context: ErrorContext,
): Promise<void> {
  let timer: NodeJS.Timeout | undefined
  let onAbort: (() => void) | undefined
  const early = new Promise<never>((_, reject) => {
    const stop = (code: 'ABORTED' | 'TIMEOUT') => {
      const err = cancel(code)
      if (err !== null) reject(err.within(context))
    }
    onAbort = () => stop('ABORTED')
    signal?.addEventListener('abort', onAbort, { once: true })
    if (timeoutMs !== undefined) timer = setTimeout(() => stop('TIMEOUT'), timeoutMs)
  })
  try {
    await Promise.race([settled(pending, context), early])
  } finally {
    clearTimeout(timer)
    if (onAbort !== undefined) signal?.removeEventListener('abort', onAbort)
  }
}

/**
 * `pending`, or a rejection with `ABORTED` (saying `what` was aborted) as soon as `signal` aborts: the caller
 * stops waiting; what `pending` does goes on.
 */
export async function abortable<T>(pending: Promise<T>, signal: AbortSignal | undefined, what: string, context: ErrorContext = {}): Promise<T> {
  if (signal === undefined) return pending
  let onAbort: (() => void) | undefined
  const aborted = new Promise<never>((_, reject) => {
    onAbort = () => reject(new KVTransferError('ABORTED', `${what} was aborted`, context))
    if (signal.aborted) onAbort()
    else signal.addEventListener('abort', onAbort, { once: true })
  })
  try {
    return await Promise.race([pending, aborted])
  } finally {
    if (onAbort !== undefined) signal.removeEventListener('abort', onAbort)
  }
}

/**
 * A connect on the peer's thread, which `signal` cancels while it has not started (it waits behind the peer's
 * earlier calls): it then makes no connection and rejects with `ABORTED`. Once started it runs to its end.
 */
export async function connectWith(native: NativeCommunicator, ip: string, port: number, dstTpSize: number, signal: AbortSignal | undefined): Promise<void> {
  const context = { peer: `${ip}:${port}` }
  if (signal?.aborted) throw new KVTransferError('ABORTED', 'the connect was aborted before it started: no connection was made', context)
  const t = signal !== undefined ? ticket() : 0
  const pending = call(() => native.connectAsync(ip, port, dstTpSize, t))
  const cancel = () => {
    if (!native.cancelCall(t)) return null
    pending.catch(() => {})
    return new KVTransferError('ABORTED', 'the connect was aborted before it started: no connection was made')
  }
  await cancellable(pending, cancel, signal, undefined, context)
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
  const context = { peer: `${ip}:${port}`, layer, ...(requestId === null ? {} : { requestId }) }
  if (signal?.aborted) throw new KVTransferError('ABORTED', 'the write was aborted before it started: nothing was written', context)
  const t = signal !== undefined || timeoutMs !== undefined ? ticket() : 0
  const pending = call(() => native.writeCacheAsync(ip, port, local, remote, layer, requestId, t))
  const cancel = (code: 'ABORTED' | 'TIMEOUT') => {
    if (!native.cancelCall(t)) return null
    // The promise of the cancelled call settles later with ABORTED; nothing waits for it.
    pending.catch(() => {})
    return code === 'TIMEOUT'
      ? new KVTransferError('TIMEOUT', `the write did not start within ${timeoutMs} ms: nothing was written`)
      : new KVTransferError('ABORTED', 'the write was aborted before it started: nothing was written')
  }
  await cancellable(pending, cancel, signal, timeoutMs, context)
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
  if (signal?.aborted) throw new KVTransferError('ABORTED', `the wait for request ${JSON.stringify(id)} was aborted`, { requestId: id })
  const t = ticket()
  const pending = call(() => native.waitFor(t, id, layers))
  // A cancelled wait settles its native promise with the error given here.
  const cancel = (code: 'ABORTED' | 'TIMEOUT') => {
    const message =
      code === 'TIMEOUT' ? `request ${JSON.stringify(id)} did not arrive within ${timeoutMs} ms` : `the wait for request ${JSON.stringify(id)} was aborted`
    native.cancelWait(t, code, message)
    return null
  }
  await cancellable(pending, cancel, signal, timeoutMs, { requestId: id })
}

/** How far one consumer of notifications may fall behind before its oldest are dropped. */
export const NOTIFICATIONS_KEPT = 65_536

/**
 * The decode's notifications for every consumer: one native stream, read from the first subscription on until
 * the communicator closes, and handed to each subscriber from its subscription on (each sees every one, in
 * order; the notifications are frozen, so no consumer changes what another sees). A subscriber more than
 * {@link NOTIFICATIONS_KEPT} behind loses its oldest. A subscriber is held strongly only while its consumer
 * waits in `next()`, weakly otherwise: an iterator its consumer dropped without `return()` is collected, and
 * stops costing memory, while a consumer that nothing else references but that waits goes on.
 */
export class NotificationHub {
  readonly #native: NativeCommunicator
  readonly #subscribers = new Set<WeakRef<Subscriber>>()
  /** The subscribers whose consumer waits: held strongly meanwhile. */
  readonly #waiting = new Set<Subscriber>()
  readonly #collected = new FinalizationRegistry<WeakRef<Subscriber>>((ref) => this.#subscribers.delete(ref))
  #pumping = false
  #ended = false

  constructor(native: NativeCommunicator) {
    this.#native = native
  }

  subscribe(): AsyncIterableIterator<Notification> {
    const sub = new Subscriber()
    if (this.#ended) {
      sub.end()
    } else {
      const ref = new WeakRef(sub)
      this.#subscribers.add(ref)
      this.#collected.register(sub, ref, ref)
      sub.hooks = {
        leave: () => {
          this.#subscribers.delete(ref)
          this.#collected.unregister(ref)
          this.#waiting.delete(sub)
        },
        waits: (waiting) => (waiting ? this.#waiting.add(sub) : this.#waiting.delete(sub)),
      }
    }
    this.#pump()
    return sub
  }

  #pump(): void {
    if (this.#pumping || this.#ended) return
    this.#pumping = true
    // Collecting starts now, not at the first `next()`.
    let pending = call(() => this.#native.nextNotifications())
    const loop = async () => {
      for (;;) {
        const batch = await pending
        if (batch.length === 0) break
        const out = batch.map(toNotification)
        for (const ref of this.#subscribers) ref.deref()?.push(out)
        pending = call(() => this.#native.nextNotifications())
      }
    }
    loop().then(
      () => this.#end(),
      () => this.#end(),
    )
  }

  #end(): void {
    this.#ended = true
    for (const ref of this.#subscribers) ref.deref()?.end()
    this.#subscribers.clear()
    this.#waiting.clear()
  }
}

function toNotification(n: NativeNotification): Notification {
  const out: Notification = { requestId: n.requestId, layerIdx: n.layerIdx ?? null, blockIds: Object.freeze(n.blockIds) as number[], peer: n.peer, status: n.status as NotificationStatus }
  if (n.reason != null) out.reason = n.reason
  return Object.freeze(out)
}

/** One consumer's queue of notifications: at most {@link NOTIFICATIONS_KEPT}, oldest first. */
class Subscriber implements AsyncIterableIterator<Notification> {
  #queue: Notification[] = []
  /** Where the next one is: taken ones before it are dropped in bulk (amortised O(1) per notification). */
  #head = 0
  #waiting: ((r: IteratorResult<Notification, undefined>) => void) | undefined
  #done = false
  /** What the hub hears: that this consumer left, and whether it waits. */
  hooks: { leave: () => void; waits: (waiting: boolean) => void } | undefined

  push(batch: Notification[]): void {
    if (this.#done) return
    for (const n of batch) {
      if (this.#waiting !== undefined) {
        const w = this.#waiting
        this.#waiting = undefined
        this.hooks?.waits(false)
        w({ value: n, done: false })
      } else {
        this.#queue.push(n)
      }
    }
    // Past the limit the oldest go.
    this.#head = Math.max(this.#head, this.#queue.length - NOTIFICATIONS_KEPT)
    this.#compact()
  }

  #compact(): void {
    if (this.#head > 1024 && this.#head * 2 > this.#queue.length) {
      this.#queue = this.#queue.slice(this.#head)
      this.#head = 0
    }
  }

  end(): void {
    this.#done = true
    this.#waiting?.({ value: undefined, done: true })
    this.#waiting = undefined
    this.hooks?.waits(false)
  }

  next(): Promise<IteratorResult<Notification, undefined>> {
    if (this.#head < this.#queue.length) {
      const n = this.#queue[this.#head] as Notification
      this.#head += 1
      this.#compact()
      return Promise.resolve({ value: n, done: false })
    }
    if (this.#done) return Promise.resolve({ value: undefined, done: true })
    return new Promise((resolve) => {
      this.#waiting = resolve
      this.hooks?.waits(true)
    })
  }

  /** Stops this consumer (a `break` out of `for await`): the others go on. */
  return(): Promise<IteratorResult<Notification, undefined>> {
    this.hooks?.leave()
    this.#queue = []
    this.#head = 0
    this.end()
    return Promise.resolve({ value: undefined, done: true })
  }

  [Symbol.asyncIterator](): AsyncIterableIterator<Notification> {
    return this
  }
}
