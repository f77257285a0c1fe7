/**
 * Routing a communicator's log lines into the engine's own logger: the `onLog` option gets every line the
 * communicator writes (errors and warnings always, debug lines with `debug: true`) as a {@link LogRecord} with
 * its fields, in place of standard error (a `debugFile` or `errorFile`, where set, still gets them).
 *
 * ```ts
 * import pino from 'pino'
 * const logger = pino()
 * const decode = Communicator.decode({ ...cache, onLog: (r) => logger[r.level]({ ...r.fields, time: r.time }, r.message) })
 * ```
 */
import type { NativeLogRecord } from '../binding.js'
import type { ErrorCode } from './errors.js'
import { invalid } from './errors.js'

/** How severe a log line is: `error` and `warn` are always written, `debug` only with `debug: true`. */
export type LogLevel = 'error' | 'warn' | 'debug'

/** One log line of a communicator. */
export interface LogRecord {
  /** How severe it is. */
  level: LogLevel
  /** What happened, in words. */
  message: string
  /** When it was logged, in milliseconds since the epoch. */
  time: number
  /** What it is about: a field is there only where it applies. */
  fields: LogFields
}

/** The fields of a {@link LogRecord}. */
export interface LogFields {
  /** The communicator: its role and GPU index (`decode:0`). */
  comm: string
  /** Its process. */
  pid: number
  /** A prefill's decode (`host:port`), or a decode's prefill (its host). */
  peer?: string
  /** The request. */
  request?: string
  /** The layer. */
  layer?: number
  /** The error's code. */
  code?: ErrorCode
}

/** What every communicator takes besides its cache and settings. */
export interface LogOptions {
  /**
   * Gets every log line of the communicator (see {@link LogRecord}), on the event loop, in place of standard
   * error, until the communicator is closed. It must not throw (what it throws is turned into a process
   * warning); it does not keep the process alive. At most 4096 lines wait for the event loop (past that, while
   * it is blocked, lines are dropped), and lines still waiting when the process exits are lost: an engine that
   * must keep every error sets `errorFile` too. `logFormat` and the log files are unaffected.
   */
  onLog?: (record: LogRecord) => void
}

/** @internal The native constructor's log listener for `options.onLog`, checked. */
export function toLogListener(onLog: unknown): ((record: NativeLogRecord) => void) | undefined {
  if (onLog === undefined || onLog === null) return undefined
  if (typeof onLog !== 'function') throw invalid('onLog must be a function')
  return (r: NativeLogRecord) => {
    const { comm, pid, peer, request, layer, code } = r.fields
    const fields: LogFields = { comm, pid: Number(pid) }
    if (peer !== undefined) fields.peer = peer
    if (request !== undefined) fields.request = request
    if (layer !== undefined) fields.layer = Number(layer)
    if (code !== undefined) fields.code = code as ErrorCode
    try {
      onLog({ level: r.level as LogLevel, message: r.message, time: r.time, fields })
    } catch (e) {
      process.emitWarning(`kvtransfer: onLog threw: ${e instanceof Error ? e.message : String(e)}`, { code: 'KVTRANSFER_ON_LOG' })
    }
  }
}
