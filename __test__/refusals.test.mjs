// Bad input is refused with a clear error, nothing moves, and nothing hangs or dies.
import test from 'ava'
import net from 'node:net'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { RDMACommunicator, KVTransferError } from 'kvtransfer'
import { makeCache } from './helpers/cache.mjs'
import { startDecode } from './helpers/peer.mjs'
import { scratchDir } from './helpers/scratch.mjs'
import { transportOptions } from './helpers/transport.mjs'

const HOST = '127.0.0.1'
const shape = { layers: 2, blocks: 16, blockBytes: 256 }

async function setup(t, decodeOptions = {}) {
  const dir = scratchDir(t)
  const errorFile = join(dir, 'prefill-errors.log')
  const decode = await startDecode(shape, { options: { ...transportOptions, ...decodeOptions } })
  t.teardown(decode.stop)
  const src = makeCache(shape)
  const comm = new RDMACommunicator('prefill', 0, 0, src.keyPtrs, src.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, {
    ...transportOptions,
    errorFile,
  })
  t.teardown(() => comm.close())
  return { dir, errorFile, decode, src, comm }
}

test('invalid writes are refused, logged, and leave the remote cache untouched', async (t) => {
  const { errorFile, decode, comm } = await setup(t)
  t.is(comm.writeCache(HOST, decode.port, [1], [1], 0), -1, 'not connected yet')
  t.is(comm.lastError.code, 'NOT_CONNECTED')
  t.true(comm.connect(HOST, decode.port), comm.lastError?.message)
  const digest = await decode.digest()
  const cases = [
    [[16], [0], 0, 'local block id 16'],
    [[0], [16], 0, 'remote block id 16'],
    [[0, 1], [0], 0, 'must pair up'],
    [[0], [0], 2, 'layer 2 is outside [0, 2)'],
    [[0], [0], -1, 'layerIdx must be a whole number'],
    [[0.5], [0], 0, 'localBlockIds[0] = 0.5'],
    [[0], ['3'], 0, "remoteBlockIds[0] = 3 is not a block id"],
    [[-1], [0], 0, 'localBlockIds[0] = -1'],
    [[1, 2], [5, 5], 0, 'listed twice'],
  ]
  for (const [local, remote, layer, why] of cases) {
    t.is(comm.writeCache(HOST, decode.port, local, remote, layer), -1, why)
    t.is(comm.lastError.code, 'INVALID_ARGUMENT')
    t.true(comm.lastError.message.includes(why), `${comm.lastError.message} lacks ${why}`)
    const err = await t.throwsAsync(comm.writeCacheAsync(HOST, decode.port, local, remote, layer), { instanceOf: KVTransferError })
    t.is(err.code, 'INVALID_ARGUMENT')
    t.true(err.message.includes(why))
  }
  t.is(await decode.digest(), digest, 'no byte of the remote cache changed')
  const log = readFileSync(errorFile, 'utf8')
  for (const [, , , why] of cases) t.true(log.includes(why), `error log lacks ${why}`)
  // After all that, the connection still works.
  t.is(comm.writeCache(HOST, decode.port, [3], [4], 1), 0)
  t.not(await decode.digest(), digest)
})

test('handshake mismatches fail connect on the prefill side and are logged on the decode side', async (t) => {
  const dir = scratchDir(t)
  const decodeErrors = join(dir, 'decode-errors.log')
  const decode = await startDecode(shape, { options: { ...transportOptions, errorFile: decodeErrors } })
  t.teardown(decode.stop)
  const wrong = makeCache({ ...shape, layers: 3 })
  const comm = new RDMACommunicator('prefill', 0, 0, wrong.keyPtrs, wrong.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, transportOptions)
  t.teardown(() => comm.close())
  t.false(comm.connect(HOST, decode.port))
  t.regex(comm.lastError.message, /layer count mismatch/)
  const err = await t.throwsAsync(comm.connectAsync(HOST, decode.port), { instanceOf: KVTransferError })
  t.is(err.code, 'INVALID_ARGUMENT')
  t.regex(readFileSync(decodeErrors, 'utf8'), /layer count mismatch/)
})

test('connecting to nobody is UNREACHABLE once the reconnect policy is spent', async (t) => {
  const src = makeCache(shape)
  const reconnect = { retries: 2, backoffMs: 100 }
  const comm = new RDMACommunicator('prefill', 0, 0, src.keyPtrs, src.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, { ...transportOptions, reconnect, errorFile: '/dev/null' })
  const started = Date.now()
  const err = await t.throwsAsync(comm.connectAsync(HOST, 1))
  t.is(err.code, 'UNREACHABLE')
  t.regex(err.message, /127\.0\.0\.1:1 is unreachable .*\(after 3 attempts\)/)
  const took = Date.now() - started
  t.true(took >= 300 && took < 3000, `pauses of 100 and 200 ms, then it gave up: ${took} ms`)
  comm.close()
})

test('garbage on the wire does not hurt the decode process', async (t) => {
  const { decode, comm } = await setup(t, { errorFile: '/dev/null' })
  // Not a control frame at all: a flood of bytes into the control port, left hanging open.
  const garbage = await new Promise((resolve, reject) => {
    const s = net.connect(decode.port, HOST, () => s.write(Buffer.alloc(65536, 0xab), () => resolve(s)))
    s.on('error', reject)
  })
  t.teardown(() => garbage.destroy())
  t.true(comm.connect(HOST, decode.port), comm.lastError?.message)
  t.is(comm.writeCache(HOST, decode.port, [1], [2], 0), 0)
  t.is(decode.child.exitCode, null, 'the decode process is alive')
})

test('a closed decode makes writes fail, not hang; a closed prefill refuses work', async (t) => {
  const { decode, comm } = await setup(t)
  t.true(comm.connect(HOST, decode.port), comm.lastError?.message)
  await decode.close()
  const err = await t.throwsAsync(comm.writeCacheAsync(HOST, decode.port, [1], [1], 0))
  // The write reconnects by the policy, and nothing listens there any more.
  t.is(err.code, 'UNREACHABLE', err.message)
  t.regex(err.message, /could not be rebuilt in 4 attempts/)
  t.false(comm.isConnected(HOST, decode.port))
  comm.close()
  comm.close()
  t.false(comm.connect(HOST, decode.port))
  t.is(comm.lastError.code, 'CLOSED')
})

test('a decode communicator does not write', async (t) => {
  const c = makeCache(shape)
  const d = new RDMACommunicator('decode', 0, 0, c.keyPtrs, c.valuePtrs, shape.blocks, shape.blockBytes, 1, 0, { errorFile: '/dev/null' })
  t.is(d.writeCache(HOST, d.port, [0], [0], 0), -1)
  t.regex(d.lastError.message, /for prefill communicators/)
  d.close()
})
