// How an inference engine uses kvtransfer: the prefill engine hands each layer of a request's KV cache over
// as soon as that layer is computed, naming the request; the decode engine awaits each layer with `waitFor`
// before its own work on that layer starts, and checks by SHA-256 that the layer holds exactly the bytes the
// prefill computed. Nothing says "layer ready" but kvtransfer itself: the decode learns that a layer landed
// from the library only, which tells it once the bytes are in its memory and never before.
//
// Three requests show what an engine meets:
//   req-1  streamed layer by layer and complete.
//   req-2  its client disconnects at the prefill after two layers: the prefill aborts it (`peer.abort`), and
//          the decode's `waitFor` rejects with ABORTED.
//   req-3  its client leaves the decode after one layer: the decode revokes it (`revoke`) and reuses its blocks
//          at once for req-4; the prefill's next write of req-3 rejects with REVOKED, and req-4's bytes are
//          still intact after the prefill's last write.
// The decode also reads the notifications of every request (`notifications()`), as a scheduler would.
//
// The engines' scheduler (here the IPC channel of a child process stands in for it) only says where the
// decode listens, which decode blocks each request gets, and at the end that the prefill is finished.
//
//   npm run demo                      (builds and runs this after the demo)
//   node examples/dist/engine.js      (once built: `tsc -p examples`)
// The transport comes from the environment, as in any engine: KVCACHE_TRANSPORT=tcp node examples/dist/engine.js
import { fork } from 'node:child_process'
import { createHash } from 'node:crypto'
import { setTimeout as sleep } from 'node:timers/promises'
import { Communicator, HostBuffer, KVTransferError, type CacheOptions, type Notification, type Peer } from 'kvtransfer'

const LAYERS = 6
const BLOCKS = 256
const BLOCK_BYTES = 8192
const HOST = '127.0.0.1'
/** How long the decode waits for anything before it calls the run failed. */
const WAIT_MS = 10_000

/** A request and the decode blocks its scheduler reserved for it. */
interface Job {
  request: string
  blocks: number[]
}

/** What the decode's scheduler tells the prefill engine: where to connect, and each request's decode blocks. */
interface Hello {
  port: number
  jobs: Job[]
}

/** The prefill's clients that disconnect: request → the layer being computed when it happens. */
const PREFILL_CLIENT_LEAVES: Record<string, number> = { 'req-2': 2 }
/** The decode's clients that leave: request → the layers the decode has had by then. */
const DECODE_CLIENT_LEAVES: Record<string, number> = { 'req-3': 1 }
/** The request the decode engine runs itself in the blocks of the one whose client left. */
const REUSED_BY: Record<string, string> = { 'req-3': 'req-4' }

/**
 * Stands in for the model: the bytes of block `i` (in request order) of one layer's keys (`tensor` 0) or
 * values (1). Both engines run this same code, so the decode knows what the prefill computed without being
 * told anything about the layer.
 */
function kvBlock(request: string, layer: number, tensor: number, i: number, out: Buffer): void {
  let x = createHash('sha256').update(`${request}/${layer}/${tensor}/${i}`).digest().readUInt32LE(0)
  for (let o = 0; o < out.length; o += 4) {
    x = (Math.imul(x, 1664525) + 1013904223) >>> 0
    out.writeUInt32LE(x, o)
  }
}

/** SHA-256 of a layer of `request` over `n` blocks, keys then values, as the model computes it. */
function modelDigest(request: string, layer: number, n: number): string {
  const h = createHash('sha256')
  const block = Buffer.alloc(BLOCK_BYTES)
  for (const tensor of [0, 1]) {
    for (let i = 0; i < n; i++) {
      kvBlock(request, layer, tensor, i, block)
      h.update(block)
    }
  }
  return h.digest('hex')
}

/** A cache's free blocks, scattered as paged attention leaves them. */
function freeList(stride: number, offset: number): number[] {
  return Array.from({ length: BLOCKS }, (_, i) => (i * stride + offset) % BLOCKS)
}

/** One engine's paged KV cache: per layer, one key and one value tensor of `BLOCKS` blocks. */
class PagedCache {
  readonly keys = Array.from({ length: LAYERS }, () => HostBuffer.alloc(BLOCKS * BLOCK_BYTES))
  readonly values = Array.from({ length: LAYERS }, () => HostBuffer.alloc(BLOCKS * BLOCK_BYTES))

  block(tensor: number, layer: number, id: number): Buffer {
    const t = tensor === 0 ? this.keys : this.values
    return t[layer].buffer.subarray(id * BLOCK_BYTES, (id + 1) * BLOCK_BYTES)
  }

  /** The cache, as a communicator takes it (and holds it until closed). */
  get options(): CacheOptions {
    return { keys: this.keys, values: this.values, blockNumber: BLOCKS, blockBytes: BLOCK_BYTES }
  }

  /** Runs the model for one layer of `request`, whose blocks are `ids`. */
  fill(request: string, layer: number, ids: readonly number[]): void {
    for (const tensor of [0, 1]) ids.forEach((id, i) => kvBlock(request, layer, tensor, i, this.block(tensor, layer, id)))
  }

  /** SHA-256 of what blocks `ids` of a layer hold, keys then values. */
  digest(layer: number, ids: readonly number[]): string {
    const h = createHash('sha256')
    for (const tensor of [0, 1]) for (const id of ids) h.update(this.block(tensor, layer, id))
    return h.digest('hex')
  }
}

/** The decode's record of every request's notifications, read as they come. */
class Ledger {
  readonly byRequest = new Map<string, Notification[]>()
  readonly #reading: Promise<void>
  #wake = (): void => {}

  constructor(stream: AsyncIterableIterator<Notification>) {
    this.#reading = (async () => {
      for await (const n of stream) {
        this.byRequest.set(n.requestId, [...(this.byRequest.get(n.requestId) ?? []), n])
        this.#wake()
      }
    })()
  }

  of(request: string): Notification[] {
    return this.byRequest.get(request) ?? []
  }

  /** Resolves once `ok()` holds, checked at each notification. */
  async until(ok: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + WAIT_MS
    while (!ok()) {
      if (Date.now() > deadline) throw new Error(`no notification said that ${what} within ${WAIT_MS} ms`)
      await new Promise<void>((resolve) => {
        this.#wake = resolve
        setTimeout(resolve, 100)
      })
    }
  }

  /** Resolves once the stream ended (the communicator closed). */
  async ended(): Promise<void> {
    await this.#reading
  }
}

/** How a request ended at the decode, and how many of its layers the decode awaited and checked. */
interface Outcome {
  checked: number
  end: 'complete' | 'revoked' | KVTransferError
}

/** The decode engine: owns the cache the prefill writes into, and steps through each layer once it is in. */
class DecodeEngine {
  readonly cache = new PagedCache()
  /** Listens on a free port of loopback (engines on one host need no token; across hosts, set `authToken`). */
  readonly comm = Communicator.decode({ ...this.cache.options, port: 0, socketIfname: 'lo' })
  /** Collects from now on, before any write can come. */
  readonly ledger = new Ledger(this.comm.notifications())

  /** Throws unless blocks `ids` of `layer` hold exactly the bytes the model computes for `request`. */
  check(request: string, layer: number, ids: readonly number[]): void {
    const got = this.cache.digest(layer, ids)
    const want = modelDigest(request, layer, ids.length)
    if (got !== want) throw new Error(`layer ${layer} of ${request} does not hold the prefill's bytes (sha256 ${got} ≠ ${want})`)
  }

  /** The decode's steps for one request: each layer's work starts once that layer is in this cache. */
  async steps(job: Job): Promise<Outcome> {
    for (let layer = 0; layer < LAYERS; layer++) {
      if (layer === DECODE_CLIENT_LEAVES[job.request]) {
        await this.reclaim(job, REUSED_BY[job.request])
        return { checked: layer, end: 'revoked' }
      }
      try {
        await this.comm.waitFor(job.request, { layers: [layer], timeoutMs: WAIT_MS })
      } catch (err) {
        if (err instanceof KVTransferError && err.code === 'ABORTED') return { checked: layer, end: err }
        throw err
      }
      // The layer is in: the decode's own work on it would start here. This one checks it.
      this.check(job.request, layer, job.blocks)
    }
    return { checked: LAYERS, end: 'complete' }
  }

  /** Gives up on a request whose client left, and reuses its blocks for `next`, which this engine runs itself. */
  async reclaim(job: Job, next: string): Promise<void> {
    // Once `revoke` resolves, no byte of the request can land in this cache any more: every prefill link has
    // confirmed that it stopped and drained its writes of it (or was cut off), and their later writes of it
    // reject with REVOKED and move nothing. So the blocks can be reused with certainty. Without it, a write
    // of the request already queued at the prefill could land in them later, in the middle of their new
    // owner's data. (Should it reject, with TIMEOUT, the blocks must not be reused: this run then fails.)
    await this.comm.revoke(job.request)
    for (let layer = 0; layer < LAYERS; layer++) this.cache.fill(next, layer, job.blocks)
    const err = await this.comm.waitFor(job.request, { timeoutMs: WAIT_MS }).then(() => null, (e: unknown) => e)
    if (!(err instanceof KVTransferError && err.code === 'REVOKED')) throw new Error(`waitFor(${job.request}) after revoke: ${String(err)}`)
  }
}

/** The prefill engine: computes layers and hands each over as soon as it is done. */
class PrefillEngine {
  readonly cache = new PagedCache()
  readonly comm = Communicator.prefill({ ...this.cache.options, instanceId: 'prefill-engine-0' })
  readonly #free = freeList(37, 3)
  peer: Peer | undefined

  /** Connects to the decode engine. */
  async connect(port: number): Promise<Peer> {
    this.peer = await this.comm.connect(HOST, port)
    return this.peer
  }

  /**
   * Computes `job`'s layers one by one; each is written into the decode's blocks, under the request's id, as
   * soon as it is computed, while the next one is being computed. Says how the request ended.
   */
  async serve(job: Job): Promise<string> {
    const peer = this.peer!
    const local = this.#free.splice(0, job.blocks.length)
    const layerMs = job.blocks.length / 2 // the model's time for one layer of the request
    const writes: Promise<void>[] = []
    let refused: { layer: number; err: unknown } | undefined
    for (let layer = 0; layer < LAYERS; layer++) {
      this.cache.fill(job.request, layer, local)
      await sleep(layerMs)
      if (refused) break // a refused write ends the request: its later layers are not sent
      if (layer === PREFILL_CLIENT_LEAVES[job.request]) {
        // The client went away: tell the decode that the request will not complete, and stop.
        await Promise.all(writes)
        await peer.abort(job.request, 'client disconnected')
        return `its client disconnected after ${layer} layers were handed over: aborted`
      }
      const write = peer.write(local, job.blocks, layer, { requestId: job.request })
      writes.push(write.catch((err: unknown) => void (refused ??= { layer, err })))
    }
    await Promise.all(writes)
    if (refused === undefined) return `${LAYERS} layers handed over, ${local.length} blocks each`
    const { layer, err } = refused
    if (!(err instanceof KVTransferError && err.code === 'REVOKED')) throw err
    return `the decode revoked it: the write of layer ${layer} rejected with REVOKED, so the prefill dropped it`
  }
}

async function decodeMain(): Promise<void> {
  const engine = new DecodeEngine()
  const free = freeList(101, 5)
  const jobs: Job[] = [64, 32, 96].map((n, i) => ({ request: `req-${i + 1}`, blocks: free.splice(0, n) }))
  const finished = new Promise<void>((resolve, reject) => {
    process.once('message', () => resolve())
    process.once('disconnect', () => reject(new Error('the prefill engine went away')))
  })
  process.send!({ port: engine.comm.port, jobs } satisfies Hello)

  const [r1, r2, r3] = await Promise.all(jobs.map((job) => engine.steps(job)))
  if (r1.end !== 'complete') throw new Error(`req-1 did not complete: ${String(r1.end)}`)
  if (!(r2.end instanceof KVTransferError) || !/client disconnected/.test(r2.end.message)) throw new Error(`req-2 was not aborted: ${String(r2.end)}`)
  if (r3.end !== 'revoked') throw new Error(`req-3 was not revoked: ${String(r3.end)}`)

  // Every write the prefill made has settled by now: had any byte of req-3 landed after the revoke, it would
  // show in req-4's blocks.
  await finished
  for (let layer = 0; layer < LAYERS; layer++) engine.check('req-4', layer, jobs[2].blocks)

  // The notifications tell the same story (the library hands each one over no later than the wait it settles).
  const done = (request: string) => engine.ledger.of(request).filter((n) => n.status === 'done')
  const ended = (request: string) => engine.ledger.of(request).find((n) => n.status !== 'done')
  await engine.ledger.until(() => done('req-1').length === LAYERS && ended('req-2') !== undefined && done('req-3').length >= r3.checked, 'every layer awaited landed')
  for (const [job, outcome] of jobs.map((j, i) => [j, [r1, r2, r3][i]] as const)) {
    const layers = done(job.request).map((n) => n.layerIdx)
    if (layers.some((l, i) => l !== i) || layers.length < outcome.checked) throw new Error(`${job.request}: notified layers ${layers.join(',')}`)
    if (done(job.request).some((n) => n.blockIds.join() !== job.blocks.join())) throw new Error(`${job.request}: notified other blocks`)
  }
  if (ended('req-2')?.status !== 'aborted' || ended('req-1') || ended('req-3')) throw new Error('unexpected notifications of the ends of requests')
  await engine.comm.close()
  await engine.ledger.ended()

  console.log(`[decode engine] req-1: all ${LAYERS} layers awaited, each matching the prefill's bytes (SHA-256)`)
  console.log(`[decode engine] req-2: ${r2.checked} layer${r2.checked === 1 ? '' : 's'} awaited and matching, then waitFor rejected with ${r2.end.code} (${r2.end.message})`)
  console.log(
    `[decode engine] req-3: ${r3.checked} layer awaited and matching, then its client left: revoked, its ${jobs[2].blocks.length} ` +
      `blocks reused for req-4, which still holds exactly its own bytes after the prefill's last write`,
  )
  const story = (request: string) => `${request} done ×${done(request).length}${ended(request) ? `, ${ended(request)!.status}` : ''}`
  console.log(`[decode engine] notifications: ${jobs.map((j) => story(j.request)).join('; ')}`)
  process.disconnect()
}

async function prefillMain(): Promise<void> {
  const child = fork(__filename, ['decode'], { stdio: 'inherit' })
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve))
  // The decode engine failing (it prints why) ends the run at once.
  const unlessDecodeFails = <T>(work: Promise<T>): Promise<T> =>
    Promise.race([work, exited.then((code) => Promise.reject(new Error(`the decode engine failed (exit ${code})`)))])
  try {
    const hello = await unlessDecodeFails(new Promise<Hello>((resolve) => child.once('message', resolve)))
    const engine = new PrefillEngine()
    const peer = await unlessDecodeFails(engine.connect(hello.port))
    // The requests run side by side, as in a batch; each layer is handed over as soon as it is computed.
    const outcomes = await unlessDecodeFails(Promise.all(hello.jobs.map((job) => engine.serve(job))))
    hello.jobs.forEach((job, i) => console.log(`[prefill engine] ${job.request}: ${outcomes[i]}`))
    console.log(`[prefill engine] over ${peer.transport}; every write has settled`)
    child.send({ finished: true })
    const code = await exited
    await engine.comm.close()
    if (code !== 0) throw new Error(`the decode engine failed (exit ${code})`)
  } catch (err) {
    child.kill()
    throw err
  }
}

const main = process.argv[2] === 'decode' ? decodeMain : prefillMain
main().catch((err: unknown) => {
  console.error(err)
  process.exit(1)
})
