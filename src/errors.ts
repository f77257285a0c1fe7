/** The stable codes of {@link KVTransferError} (the native layer's `ErrorCode` names). */
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
  | 'INTERNAL'
  | 'UNAUTHENTICATED'
  | 'ABORTED'
  | 'REVOKED'
  | 'EXPIRED'
  | 'IN_USE'
  | 'UNREACHABLE'

// Every code once: a missing one fails to compile (the record must have a key for each).
const ERROR_CODES: ReadonlySet<string> = new Set(
  Object.keys({
    INVALID_ARGUMENT: 0,
    CONFIG: 0,
    NOT_CONNECTED: 0,
    PROTOCOL: 0,
    REJECTED: 0,
    TIMEOUT: 0,
    TRANSPORT: 0,
    UNAVAILABLE: 0,
    CLOSED: 0,
    INTERNAL: 0,
    UNAUTHENTICATED: 0,
    ABORTED: 0,
    REVOKED: 0,
    EXPIRED: 0,
    IN_USE: 0,
    UNREACHABLE: 0,
  } satisfies Record<ErrorCode, 0>),
)

function isErrorCode(code: unknown): code is ErrorCode {
  return typeof code === 'string' && ERROR_CODES.has(code)
}

/**
 * Every failure of kvtransfer: a stable `code` for programs and a message for people. `INTERNAL` means a bug in
 * kvtransfer that was caught before it could take the process down: please report it. `UNAUTHENTICATED` means
 * a peer did not prove it holds `KVCACHE_AUTH_TOKEN` (or this side holds none and the peer requires one).
 * `ABORTED`: the request was aborted by its prefill, or the call by its signal before it started. `REVOKED`: the
 * decode revoked the request. `IN_USE`: memory an open communicator uses cannot be freed. `UNREACHABLE`: nothing
 * answers at the peer's address (refused: nothing listens there; or no route to it); the message names it.
 */
export class KVTransferError extends Error {
  /** What kind of failure this is. */
  readonly code: ErrorCode
  /** The decode peer (`host:port`) the call was for, where there was one. */
  peer?: string
  /** The request the call was for, where there was one. */
  requestId?: string
  /** The layer the call wrote, where it wrote one. */
  layer?: number

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown } & ErrorContext) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause })
    this.name = 'KVTransferError'
    this.code = code
    if (options !== undefined) this.#within(options)
  }

  #within(context: ErrorContext): void {
    if (context.peer !== undefined) this.peer = context.peer
    if (context.requestId !== undefined) this.requestId = context.requestId
    if (context.layer !== undefined) this.layer = context.layer
  }

  /** @internal This error, with what the call was for. */
  within(context: ErrorContext): this {
    this.#within(context)
    return this
  }

  /**
   * Turns what a call threw into a `KVTransferError`. The native layer throws errors that carry their code
   * (`err.code`); anything else (a bug in the wrapper, a JavaScript engine error) is `INTERNAL`, with the
   * original as its `cause`.
   */
  static from(err: unknown): KVTransferError {
    if (err instanceof KVTransferError) return err
    const code = (err as { code?: unknown } | null)?.code
    const message = err instanceof Error ? err.message : String(err)
    if (isErrorCode(code)) return new KVTransferError(code, message)
    return new KVTransferError('INTERNAL', message, { cause: err })
  }
}

/** An `INVALID_ARGUMENT` error: a refusal made before anything moved. */
export function invalid(message: string): KVTransferError {
  return new KVTransferError('INVALID_ARGUMENT', message)
}

/** Runs a native call, turning what it throws into a {@link KVTransferError}. */
export function call<T>(f: () => T): T {
  try {
    return f()
  } catch (err) {
    throw KVTransferError.from(err)
  }
}

/** How the native layer reports an asynchronous failure: the promise resolves with it instead of `null`. */
export interface NativeFailure {
  code: string
  message: string
}

/** What a call was for, as a {@link KVTransferError} carries it. */
export interface ErrorContext {
  /** The decode peer, `host:port`. */
  peer?: string
  /** The request. */
  requestId?: string
  /** The layer written. */
  layer?: number
}

/**
 * Awaits a native asynchronous call and rejects with a {@link KVTransferError} (carrying `context`) when it
 * reports a failure.
 */
export async function settled(pending: Promise<NativeFailure | null>, context: ErrorContext = {}): Promise<void> {
  const failure = await pending
  if (failure === null) return
  throw fromFailure(failure, context)
}

/** The {@link KVTransferError} of a failure the native layer reported, with what the call was for. */
export function fromFailure(failure: NativeFailure, context: ErrorContext = {}): KVTransferError {
  return new KVTransferError(isErrorCode(failure.code) ? failure.code : 'INTERNAL', failure.message, context)
}
