// Run where libibverbs.so.1 cannot be loaded (`.ci/rdma-tests.sh` hides it with a bind mount): the addon
// must load, RDMA must be a clear UNAVAILABLE error, and auto must still move real bytes: over shm within this
// host, over TCP to a peer that has only TCP.
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
assert.equal(decode.transport, 'shm')
assert.equal(decode.rdmaDevice, null)
for (const [options, via, local, remote] of [
  [{ transport: 'auto' }, 'shm', [1, 2], [6, 3]],
  [{ transport: 'tcp' }, 'tcp', [4, 5], [0, 7]],
]) {
  const prefill = new RDMACommunicator('prefill', 0, 0, [src.ptr], [], blocks, bytes, 1, 0, options)
  await prefill.connectAsync('127.0.0.1', decode.port)
  assert.equal(prefill.connectedTransport('127.0.0.1', decode.port), via)
  await prefill.writeCacheAsync('127.0.0.1', decode.port, local, remote, 0)
  local.forEach((l, i) =>
    assert.deepEqual(dst.buffer.subarray(remote[i] * bytes, (remote[i] + 1) * bytes), src.buffer.subarray(l * bytes, (l + 1) * bytes)),
  )
  prefill.close()
}
decode.close()
console.log('without libibverbs: the addon loads, rdma is UNAVAILABLE, auto moved blocks over shm and tcp')
