// Every export of kvtransfer, used once, in one process (decode and prefill side by side). CI type-checks it
// under `strict` against the installed package's declarations and runs it.
//
//   node examples/dist/api-tour.js      (once built: `tsc -p examples`)
import {
  Communicator,
  DecodeCommunicator,
  HostBuffer,
  PrefillCommunicator,
  Peer,
  KVTransferError,
  RDMACommunicator,
  platform,
  rdmaDevices,
  systemInfo,
  type BlockIds,
  type CacheMemory,
  type CacheOptions,
  type CommunicatorOptions,
  type ConnectOptions,
  type DecodeOptions,
  type ErrorCode,
  type ErrorContext,
  type GpuInfo,
  type GpusInfo,
  type MemoryDescriptor,
  type PeerConnectedEvent,
  type PeerDisconnectedEvent,
  type PeerReconnectingEvent,
  type PeerSummary,
  type PrefillEvents,
  type Pointer,
  type Port,
  type PrefillOptions,
  type RdmaDevice,
  type RdmaGid,
  type RdmaInfo,
  type RdmaPort,
  type ReconnectPolicy,
  type Role,
  type ScaleOptions,
  type SettingInfo,
  type Settings,
  type SignalOptions,
  type SystemInfo,
  type Transport,
  type TransportInfo,
  type TransportName,
} from 'kvtransfer'

function check(ok: boolean, what: string): void {
  if (!ok) throw new Error(`api tour: ${what}`)
}

async function main(): Promise<void> {
  const info: SystemInfo = systemInfo()
  check(info.platform === platform(), 'systemInfo names this platform')
  const transports: TransportInfo[] = info.transports
  const usable: Transport[] = transports.filter((t) => t.usable).map((t) => t.name)
  check(usable.includes('tcp'), 'tcp is usable everywhere')
  const bad: SettingInfo[] = info.settings.filter((s) => s.error !== null)
  check(bad.length === 0, `no bad KVCACHE_* values (${bad.map((s) => s.error).join('; ')})`)
  const gpuInfo: GpusInfo = info.gpus
  const gpus: GpuInfo[] = gpuInfo.devices
  const rdma: RdmaInfo = info.rdma
  let devices: RdmaDevice[] = []
  try {
    devices = rdmaDevices()
  } catch (err) {
    check(err instanceof KVTransferError && err.code === 'UNAVAILABLE', 'no libibverbs is UNAVAILABLE')
    check(rdma.error !== null, 'systemInfo says why there are no RDMA devices')
  }
  const gids: RdmaGid[] = devices.flatMap((d) => d.ports.flatMap((p: RdmaPort) => p.gids))
  console.log(`[tour] ${info.platform}: transports ${usable.join(', ')}; ${devices.length} RDMA device(s) (${gids.length} GIDs), ${gpus.length} GPU(s)`)

  const layers = 2
  const blocks = 16
  const blockBytes = 512
  const alloc = (): HostBuffer[] => Array.from({ length: layers }, () => HostBuffer.alloc(blocks * blockBytes))
  const [srcKeys, srcValues, dstKeys, dstValues] = [alloc(), alloc(), alloc(), alloc()]
  srcKeys.forEach((b, l) => b.buffer.fill(0x10 + l))
  srcValues.forEach((b, l) => b.buffer.fill(0x20 + l))

  const transport: TransportName = 'tcp'
  const options: CommunicatorOptions = { transport, connectTimeoutMs: 5000 }
  const ptrs = (bufs: HostBuffer[]): Pointer[] => bufs.map((b) => b.ptr)
  const decodeRole: Role = 'decode'
  await using decode = new RDMACommunicator(decodeRole, 0, 0, ptrs(dstKeys), ptrs(dstValues), blocks, blockBytes, 1, 0, options)
  const prefill = new RDMACommunicator('prefill', 0, 0, ptrs(srcKeys), ptrs(srcValues), blocks, blockBytes, 1, 0, options)
  const port: Port = String(decode.port)

  // The API users port from: booleans and 0 / -1.
  check(prefill.connect('127.0.0.1', port), 'connect')
  check(prefill.isConnected('127.0.0.1', port), 'isConnected')
  check(prefill.connectedTransport('127.0.0.1', port) === 'tcp', 'connectedTransport')
  const local: BlockIds = [1, 2, 3]
  check(prefill.writeCache('127.0.0.1', port, local, [7, 8, 9], 0) === 0, 'writeCache')
  check(prefill.writeCache('127.0.0.1', port, [99], [0], 0) === -1, 'a bad id is -1')
  check(prefill.lastError?.code === 'INVALID_ARGUMENT', 'lastError says why')

  // The Promise API.
  await prefill.connectAsync('127.0.0.1', port)
  await prefill.writeCacheAsync('127.0.0.1', port, new Uint32Array([4, 5]), [10, 11], 1)
  const code: ErrorCode | undefined = await prefill.writeCacheAsync('127.0.0.1', port, [0], [0], 9).then(
    () => undefined,
    (err: unknown) => (err instanceof KVTransferError ? err.code : undefined),
  )
  check(code === 'INVALID_ARGUMENT', 'a bad layer rejects with INVALID_ARGUMENT')

  const block = (bufs: HostBuffer[], layer: number, id: number): Buffer =>
    bufs[layer].buffer.subarray(id * blockBytes, (id + 1) * blockBytes)
  check(block(dstKeys, 0, 8).every((b) => b === 0x10), 'keys of layer 0 landed')
  check(block(dstValues, 1, 11).every((b) => b === 0x21), 'values of layer 1 landed')
  check(block(dstKeys, 0, 0).every((b) => b === 0), 'untouched blocks stay untouched')
  // The async-first API: a communicator from options, a peer handle per decode.
  const settings: Settings = { transport: 'tcp', connectTimeoutMs: 5000, stallTimeoutMs: 5000, confirmTimeoutMs: 5000 }
  const scales: ScaleOptions = {}
  const cache: CacheOptions = { keyPtrs: ptrs(srcKeys), valuePtrs: ptrs(srcValues), blockNumber: blocks, blockBytes, ...scales }
  const reconnect: ReconnectPolicy = { retries: 2, backoffMs: 100 }
  const prefillOptions: PrefillOptions = { ...cache, ...settings, reconnect, tpSize: 1, tpIdx: 0 }
  // One host: the decode listens on loopback only (beyond it, Communicator.decode needs authToken).
  // The decode's cache as objects it holds: a HostBuffer, a Buffer-backed view, or { ptr, byteLength }.
  const dstKeyMemory: CacheMemory[] = dstKeys
  const described: MemoryDescriptor = { ptr: dstValues[0].ptr, byteLength: dstValues[0].byteLength }
  const dstValueMemory: CacheMemory[] = [described, new Uint8Array(dstValues[1].buffer.buffer, dstValues[1].buffer.byteOffset, dstValues[1].byteLength)]
  const { keyPtrs: _keys, valuePtrs: _values, ...geometry } = cache
  const decodeOptions: DecodeOptions = { ...geometry, keys: dstKeyMemory, values: dstValueMemory, ...settings, port: 0, socketIfname: 'lo' }
  await using second: DecodeCommunicator = Communicator.decode(decodeOptions)
  await using writer: PrefillCommunicator = Communicator.prefill(prefillOptions)
  // How each decode peer's connection fares, as events.
  const told: string[] = []
  const connected = (e: PeerConnectedEvent): void => void told.push(`connected ${e.peer} over ${e.transport}`)
  const disconnected = (e: PeerDisconnectedEvent): void => void told.push(`disconnected ${e.peer}: ${e.cause.code}`)
  const reconnecting = (e: PeerReconnectingEvent): void => void told.push(`reconnecting ${e.attempt}/${e.attempts}`)
  const kinds: (keyof PrefillEvents)[] = ['connected', 'disconnected', 'reconnecting']
  writer.on('connected', connected).on('disconnected', disconnected).once('reconnecting', reconnecting)
  const connect: ConnectOptions = { dstTpSize: 1, signal: AbortSignal.timeout(5000) }
  const peer: Peer = await writer.connect('127.0.0.1', second.port, connect)
  check(peer.connected && peer.transport === 'tcp', 'the peer is connected over tcp')
  check(told.length === 1 && told[0] === `connected 127.0.0.1:${second.port} over tcp`, `the ${kinds[0]} event: ${told}`)
  await peer.write([6], [12], 0)
  check(block(dstKeys, 0, 12).every((b) => b === 0x10), 'a peer write landed')
  check(prefill.communicator.role === 'prefill', 'RDMACommunicator wraps a Communicator')
  console.log(`[tour] decode on port ${decode.port} (${decode.role}, prefers ${decode.transport}); every check passed`)
  // Memory an open communicator uses cannot be given back: close first, then free.
  prefill.close()
  const inUse = await Promise.resolve()
    .then(() => srcKeys[0].free())
    .then(
      () => null,
      (e: unknown) => e,
    )
  check(inUse instanceof KVTransferError && inUse.code === 'IN_USE', 'an open communicator holds its memory')
  const context: ErrorContext = await peer.write([99], [0], 0).then(
    () => ({}),
    (e: KVTransferError) => ({ peer: e.peer, layer: e.layer }),
  )
  check(context.peer === `127.0.0.1:${second.port}` && context.layer === 0, 'an error says which call it was')
  const links: PeerSummary[] = second.peers()
  check(links.length === 1 && links[0].transport === 'tcp', 'the decode lists its prefill link')
  await peer.close()
  check(!peer.connected, 'Peer.close() ended the connection')
  writer.off('connected', connected)
  const closing: SignalOptions = { signal: AbortSignal.timeout(5000) }
  await writer.close(closing)
  for (const b of [...srcKeys, ...srcValues]) b.free()
  check(srcKeys[0].freed && srcKeys[0].buffer.length === 0, 'freed memory is out of reach')
}

main().catch((err: unknown) => {
  console.error(err)
  process.exitCode = 1
})
