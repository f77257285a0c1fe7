import { call } from './errors.js'
import { native } from './loader.js'
import { toCount } from './options.js'

/**
 * Page-aligned host memory with its address, for demos, tests and host-memory caches.
 *
 * ```ts
 * const hb = HostBuffer.alloc(1 << 20)
 * hb.buffer.fill(7)            // a Node Buffer over the same memory
 * hb.ptr                       // its address, for RDMACommunicator
 * hb.free()                    // the Buffer reads as empty from here on
 * ```
 *
 * The memory lives as long as the `HostBuffer` (or its `buffer`) is referenced, or a communicator uses it:
 * a communicator given this memory (as the `HostBuffer`, or by its address) keeps it allocated until it is
 * closed, and {@link HostBuffer.free} is refused meanwhile.
 */
export class HostBuffer {
  /** A Node `Buffer` viewing the memory (empty after {@link HostBuffer.free}). */
  readonly buffer: Buffer
  /** The address of the first byte. */
  readonly ptr: bigint
  /** The size in bytes, as allocated. */
  readonly byteLength: number
  #freed = false

  private constructor(buffer: Buffer) {
    this.buffer = buffer
    this.ptr = native.bufferAddress(buffer)
    this.byteLength = buffer.length
  }

  /**
   * Allocates `bytes` (at least 1) of zero-filled, page-aligned memory.
   * @throws {KVTransferError} `INVALID_ARGUMENT` for a bad size or when the memory is not available.
   */
  static alloc(bytes: number): HostBuffer {
    const n = call(() => toCount('bytes', bytes, 1, Number.MAX_SAFE_INTEGER))
    return new HostBuffer(call(() => native.hostAlloc(n)))
  }

  /** Whether {@link HostBuffer.free} was called. */
  get freed(): boolean {
    return this.#freed
  }

  /**
   * Gives the memory back. The `buffer` is detached at once (it reads as empty, so no JavaScript can
   * touch freed memory). Safe to call twice.
   * @throws {KVTransferError} `IN_USE` while an open communicator uses the memory (given as this `HostBuffer`
   * or by its address): close the communicator first.
   */
  free(): void {
    if (this.#freed) return
    call(() => native.hostFree(this.buffer))
    this.#freed = true
  }
}
