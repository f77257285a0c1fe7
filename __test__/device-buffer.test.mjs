// DeviceBuffer: GPU memory for a cache where no other allocator is at hand. Bad arguments are refused before the
// driver is asked; a GPU the machine lacks is UNAVAILABLE, saying so. On a GPU machine (the GPU suite runs this
// file with KVTRANSFER_REQUIRE_GPU=1, where a missing GPU fails instead of skipping) its bytes round-trip, a
// communicator holds it, and `kvtransfer bench` moves checked bytes between two processes' DeviceBuffers over
// CUDA IPC, beside one device copy.
import test from 'ava'
import { execFile } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { Communicator, DeviceBuffer, KVTransferError, systemInfo } from 'kvtransfer'

const gpus = systemInfo().gpus.devices.length
const requireGpu = process.env.KVTRANSFER_REQUIRE_GPU === '1'
const onGpu = gpus > 0 || requireGpu ? test.serial : test.skip
const code = (t, f) => t.throws(f, { instanceOf: KVTransferError }).code

test('bad sizes and GPU numbers are refused before the driver is asked', (t) => {
  for (const [gpu, bytes] of [[-1, 1], [1.5, 1], ['0', 1], [0, 0], [0, -4], [0, 2.5], [0, 2 ** 60]]) {
    t.is(code(t, () => DeviceBuffer.alloc(gpu, bytes)), 'INVALID_ARGUMENT', `${gpu}, ${bytes}`)
  }
})

test('a GPU this machine lacks is UNAVAILABLE, and says which GPUs there are', (t) => {
  if (requireGpu) t.true(gpus > 0, 'KVTRANSFER_REQUIRE_GPU=1, but the driver sees no GPU')
  const e = t.throws(() => DeviceBuffer.alloc(gpus, 4096), { instanceOf: KVTransferError })
  t.is(e.code, 'UNAVAILABLE')
  t.regex(e.message, gpus === 0 ? /no GPU 0: this machine has no GPU that a CUDA driver serves/ : new RegExp(`no GPU ${gpus}: this process sees ${gpus} GPU`))
})

onGpu('bytes round-trip through a DeviceBuffer; use past its end or after free is refused', (t) => {
  const db = DeviceBuffer.alloc(0, 1 << 20)
  t.is(db.byteLength, 1 << 20)
  t.is(db.gpu, 0)
  t.true(typeof db.ptr === 'bigint' && db.ptr > 0n)
  t.deepEqual(db.read(4096, 64), Buffer.alloc(64), 'zeroed')
  const data = randomBytes(100_000)
  db.write(data, 12_345)
  t.deepEqual(db.read(12_345, data.length), data)
  t.deepEqual(db.read(12_344, 1), Buffer.alloc(1), 'nothing before the offset changed')
  t.is(db.read((1 << 20) - 8).length, 8, 'to the end by default')
  t.is(code(t, () => db.write(Buffer.alloc(2), (1 << 20) - 1)), 'INVALID_ARGUMENT')
  t.is(code(t, () => db.read((1 << 20) - 1, 2)), 'INVALID_ARGUMENT')
  t.is(code(t, () => db.write('not bytes', 0)), 'INVALID_ARGUMENT')
  db.free()
  t.true(db.freed)
  t.is(code(t, () => db.read(0, 1)), 'INVALID_ARGUMENT')
  db.free()
})

onGpu('a communicator holds a DeviceBuffer, given as one or by address, until it closes', async (t) => {
  const shape = { blockNumber: 16, blockBytes: 4096 }
  const options = { ...shape, transport: 'cuda-ipc', socketIfname: 'lo' }
  const [a, b] = [DeviceBuffer.alloc(0, 16 * 4096), DeviceBuffer.alloc(0, 16 * 4096)]
  const byObject = Communicator.decode({ keys: [a], ...options })
  const byAddress = Communicator.decode({ keyPtrs: [b.ptr], ...options })
  for (const db of [a, b]) {
    t.is(code(t, () => db.free()), 'IN_USE')
    t.false(db.freed)
  }
  await byObject.close()
  await byAddress.close()
  a.free()
  b.free()
  t.regex(t.throws(() => Communicator.decode({ keys: [a], ...options })).message, /freed/)
  // A cache that runs past the end of its DeviceBuffer is refused before anything listens.
  const c = DeviceBuffer.alloc(0, 8 * 4096)
  t.regex(t.throws(() => Communicator.decode({ keyPtrs: [c.ptr], ...options })).message, /past the end/)
  c.free()
})

onGpu('bench moves checked bytes over CUDA IPC between two processes, beside one device copy', async (t) => {
  const cli = fileURLToPath(new URL('../cli.js', import.meta.url))
  const args = ['bench', '--transports', 'cuda-ipc', '--sizes', '1,64', '--batch', '256', '--iterations', '3', '--warmup', '1', '--json']
  const { code: exit, stdout, stderr } = await new Promise((resolve) =>
    execFile(process.execPath, [cli, ...args], { timeout: 120_000 }, (e, stdout, stderr) => resolve({ code: e?.code ?? 0, stdout, stderr })),
  )
  t.is(exit, 0, stderr)
  const r = JSON.parse(stdout)
  t.deepEqual(r.failed, [])
  t.deepEqual(r.gpus, { prefill: 0, decode: 0 })
  t.deepEqual(r.rows.map((x) => [x.transport, x.blockBytes, x.verified]), [['cuda-ipc', 1024, true], ['cuda-ipc', 65536, true]])
  t.deepEqual(r.ceilings.map((c) => [c.name, c.blockBytes]), [['device-copy', 1024], ['device-copy', 65536]])
  t.true(r.ceilings.every((c) => c.gbps.median > 0 && c.bytesPerCall === 256 * c.blockBytes * 2))
})
