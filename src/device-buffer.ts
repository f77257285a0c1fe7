import { constants } from 'node:buffer'
import { call } from './errors.js'
import { native } from './loader.js'
import { toCount } from './options.js'

/**
 * Zeroed memory of one GPU with its address, for a GPU cache where no other allocator is at hand (demos, tests,
 * `kvtransfer bench` on a GPU machine). An engine that already has its tensors (PyTorch, a CUDA runtime) passes
 * their addresses instead.
 *
 * ```ts
 * const db = DeviceBuffer.alloc(0, 1 << 20)   // 1 MiB on GPU 0
 * db.write(Buffer.from('abc'), 4096)          // copied in at byte 4096
 * db.read(4096, 3)                            // a Buffer copied out: 'abc'
 * const decode = Communicator.decode({ keys: [db], blockNumber: 256, blockBytes: 4096 })   // keys only
 * ```
 *
 * The memory lives until {@link DeviceBuffer.free} (or until the `DeviceBuffer` is collected: the engine does not
 * know how much GPU memory it holds, so free it rather than wait), and while a communicator uses it: a
 * communicator given this memory (as the `DeviceBuffer`, or by its address) keeps it allocated until it is
 * closed, and `free()` is refused meanwhile. JavaScript never maps it: bytes go in and out by copies.
 */
export class DeviceBuffer {
  /** The device address of the first byte. */
  readonly ptr: bigint
  /** The size in bytes, as allocated. */
  readonly byteLength: number
  /** The GPU it lives on (as this process numbers them). */
  readonly gpu: number
  readonly #native: InstanceType<typeof native.NativeDeviceBuffer>
  #freed = false

  private constructor(gpu: number, bytes: number) {
    this.#native = call(() => new native.NativeDeviceBuffer(gpu, bytes))
    this.ptr = this.#native.ptr
    this.byteLength = bytes
    this.gpu = gpu
  }

  /**
   * Allocates `bytes` (at least 1) of zeroed memory on GPU `gpu`.
   * @throws {KVTransferError} `INVALID_ARGUMENT` for a bad size or GPU number; `UNAVAILABLE` without a CUDA
   * driver, without that GPU, or where it has not the memory.
   */
  static alloc(gpu: number, bytes: number): DeviceBuffer {
    const ordinal = call(() => toCount('gpu', gpu, 0, 1023))
    const n = call(() => toCount('bytes', bytes, 1, Number.MAX_SAFE_INTEGER))
    return new DeviceBuffer(ordinal, n)
  }

  /** Whether {@link DeviceBuffer.free} was called. */
  get freed(): boolean {
    return this.#freed
  }

  /**
   * Copies `data` into the memory from byte `offset` (default 0), returning once it is there.
   * @throws {KVTransferError} `INVALID_ARGUMENT` past the end or after `free()`.
   */
  write(data: Uint8Array, offset = 0): void {
    const at = call(() => toCount('offset', offset, 0, Number.MAX_SAFE_INTEGER))
    call(() => this.#native.write(at, data))
  }

  /**
   * A copy of `length` bytes (default: to the end) from byte `offset` (default 0).
   * @throws {KVTransferError} `INVALID_ARGUMENT` past the end, past the largest `Buffer`, or after `free()`;
   * `UNAVAILABLE` where the host memory to copy into cannot be had.
   */
  read(offset = 0, length = this.byteLength - offset): Buffer {
    const at = call(() => toCount('offset', offset, 0, Number.MAX_SAFE_INTEGER))
    // No larger than a Buffer can be: read a large buffer a part at a time.
    const n = call(() => toCount('length', length, 0, constants.MAX_LENGTH))
    return call(() => this.#native.read(at, n))
  }

  /**
   * Gives the memory back to the GPU. Safe to call twice.
   * @throws {KVTransferError} `IN_USE` while an open communicator uses the memory (given as this `DeviceBuffer`
   * or by its address): close the communicator first.
   */
  free(): void {
    if (this.#freed) return
    call(() => this.#native.free())
    this.#freed = true
  }
}
