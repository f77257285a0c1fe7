// Run where libibverbs.so.1 cannot be loaded (`.ci/rdma-tests.sh` hides it with a bind mount): the addon
// must load, RDMA must be a clear UNAVAILABLE error, and auto must fall back to TCP that moves real bytes.
import assert from 'node:assert/strict'
import { RDMACommunicator, HostBuffer, rdmaDevices } from 'kvtransfer'

assert.throws(() => rdmaDevices(), (e) => e.code === 'UNAVAILABLE' && /libibverbs\.so\.1 is not installed/.test(e.message))
const blocks = 8, bytes = 4096
const src = HostBuffer.alloc(blocks * bytes), dst = HostBuffer.alloc(blocks * bytes)
src.buffer.forEach((_, i) => (src.buffer[i] = (i * 7) & 0xff))
assert.throws(
  () => new RDMACommunicator('decode', 0, 0, [dst.ptr], [], blocks, bytes, 1, 0, { transport: 'rdma', errorFile: '/dev/null' }),
  (e) => e.code === 'UNAVAILABLE',
)
const decode = new RDMACommunicator('decode', 0, 0, [dst.ptr], [], blocks, bytes, 1, 0, { transport: 'auto' })
const prefill = new RDMACommunicator('prefill', 0, 0, [src.ptr], [], blocks, bytes, 1, 0, { transport: 'auto' })
assert.equal(decode.transport, 'tcp')
await prefill.connectAsync('127.0.0.1', decode.port)
await prefill.writeCacheAsync('127.0.0.1', decode.port, [1, 2], [6, 3], 0)
assert.deepEqual(dst.buffer.subarray(6 * bytes, 7 * bytes), src.buffer.subarray(bytes, 2 * bytes))
assert.deepEqual(dst.buffer.subarray(3 * bytes, 4 * bytes), src.buffer.subarray(2 * bytes, 3 * bytes))
prefill.close()
decode.close()
console.log('without libibverbs: the addon loads, rdma is UNAVAILABLE, auto moved the blocks over tcp')
