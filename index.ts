/**
 * kvtransfer: move an LLM's KV cache from a prefill engine into a decode engine's memory.
 *
 * ```ts
 * import { Communicator, HostBuffer } from 'kvtransfer'
 *
 * // decode process: register the cache (the communicator holds it) and listen on port 12345
 * const cache = () => ({ keys: [HostBuffer.alloc(1024 * 4096)], values: [HostBuffer.alloc(1024 * 4096)], blockNumber: 1024, blockBytes: 4096 })
 * const decode = Communicator.decode({ port: 12345, ...cache() })
 *
 * // prefill process: connect and write blocks 0..2 of layer 0 into the decode's blocks 3..5
 * const prefill = Communicator.prefill(cache())
 * const peer = await prefill.connect('10.0.0.2', 12345)
 * await peer.write([0, 1, 2], [3, 4, 5], 0)
 * await prefill.close()
 * ```
 *
 * The API the original's users port from, `RDMACommunicator`, keeps its names and semantics (see {@link RDMACommunicator}).
 *
 * @packageDocumentation
 */
export {
  Communicator,
  DecodeCommunicator,
  PrefillCommunicator,
  type ConnectOptions,
  type DecodeOptions,
  type PeerConnectedEvent,
  type PeerDisconnectedEvent,
  type PeerReconnectingEvent,
  type PeerSummary,
  type PrefillEvents,
  type PrefillOptions,
  type SignalOptions,
} from './lib/communicator.js'
export { Peer } from './lib/peer.js'
export type { LogFields, LogLevel, LogOptions, LogRecord } from './lib/logging.js'
export { quantile, type HistogramStats, type PeerStats, type RefusalReason, type RequestCounts, type Stats, type TransportStats } from './lib/stats.js'
export { RDMACommunicator } from './lib/compat.js'
export type { Notification, NotificationStatus, WaitOptions, WriteOptions } from './lib/requests.js'
export { KVTransferError, type ErrorCode, type ErrorContext } from './lib/errors.js'
export { DeviceBuffer } from './lib/device-buffer.js'
export { HostBuffer } from './lib/host-buffer.js'
export { platform } from './lib/loader.js'
export type {
  BlockIds,
  CacheMemory,
  CacheOptions,
  MemoryDescriptor,
  CommunicatorOptions,
  Pointer,
  Port,
  ReconnectPolicy,
  Role,
  ScaleOptions,
  Settings,
  Transport,
  TransportName,
} from './lib/options.js'
export {
  rdmaDevices,
  resources,
  systemInfo,
  type GpuInfo,
  type GpusInfo,
  type RdmaDevice,
  type RdmaGid,
  type RdmaInfo,
  type RdmaPort,
  type Resources,
  type SettingInfo,
  type SystemInfo,
  type TransportInfo,
} from './lib/system.js'
