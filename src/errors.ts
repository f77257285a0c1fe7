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
 * decode revoked the request.
 */
export class KVTransferError extends Error {
  /** What kind of failure this is. */
  readonly code: ErrorCode

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options)
    this.name = 'KVTransferError'
    this.code = code
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

/** Awaits a native asynchronous call and rejects with a {@link KVTransferError} when it reports a failure. */
export async function settled(pending: Promise<NativeFailure | null>): Promise<void> {
  const failure = await pending
  if (failure === null) return
  throw new KVTransferError(isErrorCode(failure.code) ? failure.code : 'INTERNAL', failure.message)
}
