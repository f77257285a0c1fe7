// How an inference engine uses kvtransfer: the prefill engine hands each layer of a request's KV cache over
// as soon as that layer is computed, and tells the decode engine; the decode engine awaits each layer before
// its own work on that layer starts. kvtransfer moves the bytes; the engines' scheduler says which blocks
// and when (here the IPC channel of a child process stands in for it).
//
//   npm run demo                      (builds and runs this after the demo)
//   node examples/dist/engine.js      (once built: `tsc -p examples`)
import { fork } from 'node:child_process'
import { createHash } from 'node:crypto'
import { HostBuffer, RDMACommunicator, type BlockIds, type Role } from 'kvtransfer'

const LAYERS = 6
const BLOCKS = 256
const BLOCK_BYTES = 8192

/** What the prefill engine's scheduler tells the decode engine once a layer of a request has landed. */
interface LayerReady {
  request: string
  layer: number
  /** The decode blocks that now hold the layer. */
  blocks: number[]
  /** SHA-256 of the layer's keys then values, in block order, as the prefill engine computed them. */
  digest: string
}

/** One engine's paged KV cache: per layer, one key and one value tensor of `BLOCKS` blocks. */
class PagedCache {
  readonly keys = Array.from({ length: LAYERS }, () => HostBuffer.alloc(BLOCKS * BLOCK_BYTES))
  readonly values = Array.from({ length: LAYERS }, () => HostBuffer.alloc(BLOCKS * BLOCK_BYTES))

  block(tensor: HostBuffer[], layer: number, id: number): Buffer {
    return tensor[layer].buffer.subarray(id * BLOCK_BYTES, (id + 1) * BLOCK_BYTES)
  }

  /** This engine's communicator, with the cache registered (a decode one listens on a free port). */
  communicator(role: Role): RDMACommunicator {
    const ptrs = (tensor: HostBuffer[]) => tensor.map((b) => b.ptr)
    return new RDMACommunicator(role, 0, 0, ptrs(this.keys), ptrs(this.values), BLOCKS, BLOCK_BYTES)
  }

  digest(layer: number, ids: readonly number[]): string {
    const h = createHash('sha256')
    for (const t of [this.keys, this.values]) for (const id of ids) h.update(this.block(t, layer, id))
    return h.digest('hex')
  }
}

/** The decode engine: owns the cache the prefill writes into, and waits for layers to arrive. */
class DecodeEngine {
  readonly cache = new PagedCache()
  readonly comm = this.cache.communicator('decode')
  readonly #arrived = new Map<string, LayerReady>()
  readonly #waiting = new Map<string, (ready: LayerReady) => void>()

  /** Called by the scheduler when the prefill engine says a layer landed. */
  layerReady(ready: LayerReady): void {
    const key = `${ready.request}/${ready.layer}`
    const waiter = this.#waiting.get(key)
    this.#waiting.delete(key)
    if (waiter) waiter(ready)
    else this.#arrived.set(key, ready)
  }

  /** Resolves once layer `layer` of `request` is in this engine's cache, checked against the prefill's digest. */
  async awaitLayer(request: string, layer: number): Promise<void> {
    const key = `${request}/${layer}`
    const ready = this.#arrived.get(key) ?? (await new Promise<LayerReady>((resolve) => this.#waiting.set(key, resolve)))
    this.#arrived.delete(key)
    const got = this.cache.digest(layer, ready.blocks)
    if (got !== ready.digest) throw new Error(`layer ${layer} of ${request} arrived corrupted`)
  }
}

/** The prefill engine: computes layers and hands each over as soon as it is done. */
class PrefillEngine {
  readonly cache = new PagedCache()
  readonly comm = this.cache.communicator('prefill')

  /** Stands in for the model: fills the request's blocks of one layer. */
  computeLayer(layer: number, blocks: readonly number[]): void {
    for (const t of [this.cache.keys, this.cache.values]) {
      for (const id of blocks) this.cache.block(t, layer, id).fill((layer * 31 + id * 7 + (t === this.cache.keys ? 0 : 1)) & 0xff)
    }
  }

  /** Writes one finished layer into the decode's blocks; the scheduler is told once it has landed. */
  async handOver(host: string, port: number, layer: number, local: BlockIds, remote: BlockIds): Promise<void> {
    await this.comm.writeCacheAsync(host, port, local, remote, layer)
  }
}

async function decodeMain(): Promise<void> {
  const engine = new DecodeEngine()
  process.on('message', (m: LayerReady) => engine.layerReady(m))
  process.send!({ port: engine.comm.port })
  // The decode engine runs its steps layer by layer, each waiting only for its own layer.
  for (let layer = 0; layer < LAYERS; layer++) await engine.awaitLayer('req-1', layer)
  console.log(`[decode engine] all ${LAYERS} layers of req-1 arrived and match`)
  engine.comm.close()
  process.disconnect()
}

async function prefillMain(): Promise<void> {
  const child = fork(__filename, ['decode'], { stdio: 'inherit' })
  const { port } = await new Promise<{ port: number }>((resolve) => child.once('message', resolve))
  const engine = new PrefillEngine()
  await engine.comm.connectAsync('127.0.0.1', port)
  // The request's blocks are scattered in both caches, as paged attention leaves them.
  const local = Array.from({ length: 64 }, (_, i) => (i * 37 + 3) % BLOCKS)
  const remote = Array.from({ length: 64 }, (_, i) => (i * 101 + 5) % BLOCKS)
  for (let layer = 0; layer < LAYERS; layer++) {
    engine.computeLayer(layer, local)
    await engine.handOver('127.0.0.1', port, layer, local, remote)
    const ready: LayerReady = { request: 'req-1', layer, blocks: remote, digest: engine.cache.digest(layer, local) }
    child.send(ready)
  }
  console.log(`[prefill engine] handed over ${LAYERS} layers over ${engine.comm.connectedTransport('127.0.0.1', port)}`)
  const code = await new Promise<number | null>((resolve) => child.once('exit', resolve))
  engine.comm.close()
  if (code !== 0) throw new Error(`the decode engine failed (exit ${code})`)
}

const main = process.argv[2] === 'decode' ? decodeMain : prefillMain
main().catch((err: unknown) => {
  console.error(err)
  process.exitCode = 1
})
