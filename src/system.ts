/** What this machine offers kvtransfer: RDMA devices, GPUs, transports, settings (`kvtransfer info`). */
import { call } from './errors.js'
import { native, nativeBinary, platform } from './loader.js'
import type { Transport } from './options.js'

/** One RDMA device of this machine, with its ports and their non-empty GID table entries. */
export interface RdmaDevice {
  /** The device name: `mlx5_0`, `rxe0`, ... (what `KVCACHE_RDMA_NICS` lists). */
  name: string
  /** Its ports (empty when the device cannot be opened). */
  ports: RdmaPort[]
}

/** One port of an {@link RdmaDevice}. */
export interface RdmaPort {
  /** The port number, from 1. */
  port: number
  /** `ACTIVE`, `DOWN`, `INIT`, ... Only an `ACTIVE` port carries traffic. */
  state: string
  /** `Ethernet` (RoCE: addressed by GID) or `InfiniBand` (addressed by LID). */
  linkLayer: string
  /** The active MTU in bytes. */
  mtu: number
  /** The port's LID (InfiniBand). */
  lid: number
  /** The non-empty GID table entries: what `KVCACHE_RDMA_GID_INDEX` picks from. */
  gids: RdmaGid[]
}

/** One entry of a port's GID table. */
export interface RdmaGid {
  /** Its index (`KVCACHE_RDMA_GID_INDEX`). */
  index: number
  /** The GID, as eight colon-separated groups of four hex digits. */
  gid: string
}

/**
 * Lists the RDMA devices this machine has: ports with state, link layer (`Ethernet` for RoCE,
 * `InfiniBand`), MTU, LID and GIDs — what `KVCACHE_RDMA_NICS` and `KVCACHE_RDMA_GID_INDEX` choose from.
 * @throws {KVTransferError} `UNAVAILABLE` where there is none, saying why (no libibverbs, no RDMA in the kernel,
 * no provider for the kernel's devices).
 */
export function rdmaDevices(): RdmaDevice[] {
  return call(() => native.rdmaDevices()) as RdmaDevice[]
}

/** One GPU the CUDA driver sees. */
export interface GpuInfo {
  /** Its CUDA ordinal (as this process numbers GPUs, after `CUDA_VISIBLE_DEVICES`). */
  ordinal: number
  /** The product name: `NVIDIA H100 80GB HBM3`, ... */
  name: string
  /** Its memory in bytes. */
  memoryBytes: number
  /** `major.minor`: `9.0` for Hopper. */
  computeCapability: string
}

/** One `KVCACHE_*` variable as {@link systemInfo} found it. */
export interface SettingInfo {
  /** The variable's name. */
  env: string
  /** Its value, or `null` when unset. */
  value: string | null
  /** The `CONFIG` error a communicator would raise for the value, or `null` when it is fine. */
  error: string | null
}

/** One transport as {@link systemInfo} judged it. */
export interface TransportInfo {
  /** The transport. */
  name: Transport
  /** Whether a communicator could use it on this machine. */
  usable: boolean
  /** What it would use (a NIC, an interface), or why it cannot be used. */
  detail: string
}

/** What {@link systemInfo} reports: what this machine offers kvtransfer, and what is in the way. */
export interface SystemInfo {
  /** The package's version. */
  version: string
  /** The native library's version (the same as `version` unless the install is mixed up). */
  nativeVersion: string
  /** The platform, as {@link platform} names it. */
  platform: string
  /** The path of the native binary loaded for it, or `null` when it cannot be located. */
  binary: string | null
  /** The Node.js version. */
  node: string
  /** Every `KVCACHE_*` variable, with bad values flagged. */
  settings: SettingInfo[]
  /** Every transport: whether it can be used here, and what it would use or why not. */
  transports: TransportInfo[]
  /** The RDMA devices. */
  rdma: RdmaInfo
  /** The CUDA driver and its GPUs. */
  gpus: GpusInfo
}

/** The RDMA devices as {@link systemInfo} found them. */
export interface RdmaInfo {
  /** The devices, with ports and GIDs. */
  devices: RdmaDevice[]
  /** Why they cannot be listed (e.g. libibverbs is not installed), or `null`. */
  error: string | null
}

/** The CUDA driver and GPUs as {@link systemInfo} found them. */
export interface GpusInfo {
  /** The CUDA version the driver supports (`12.8`), or `null` without a driver. */
  driver: string | null
  /** The GPUs it sees. */
  devices: GpuInfo[]
  /** Why there are none, or `null`. */
  error: string | null
}

/**
 * Reports what this machine offers: platform and binary, versions, each transport and why it cannot be used,
 * the RDMA devices with ports and GIDs, the GPUs and driver, and the `KVCACHE_*` variables in force with
 * bad values flagged. `npx kvtransfer info` prints it.
 */
export function systemInfo(): SystemInfo {
  const report = call(() => native.systemReport()) as Omit<SystemInfo, 'platform' | 'binary' | 'node' | 'nativeVersion'> & {
    version: string
  }
  return {
    version: (require('../package.json') as { version: string }).version,
    nativeVersion: report.version,
    platform: platform(),
    binary: nativeBinary(),
    node: process.version,
    settings: report.settings,
    transports: report.transports,
    rdma: report.rdma,
    gpus: report.gpus,
  }
}

/**
 * What this process holds through kvtransfer, all its communicators together: the kernel and device resources
 * its links live on. Each returns to where it was once the links that took it are gone (a cache's regions once
 * its communicator is closed), so a count that only grows is a leak (`kvtransfer soak` samples these).
 */
export interface Resources {
  /** RDMA queue pairs: each link's on a prefill (its flush reads go on it too), each session's on a decode. */
  rdmaQueuePairs: number
  /**
   * RDMA memory regions registered: the caches', each RDMA communicator's scratch page (where its flush reads
   * land), and a decode's flush word (what they read).
   */
  rdmaMemoryRegions: number
  /** TCP data connections, both ends (a link of `tcpConnections` connections counts as that many). */
  tcpDataConnections: number
  /** Mappings of shared-memory rings, both ends (each shm link has one ring, mapped by each side). */
  shmRings: number
}

/** This process's live {@link Resources}, read from the native counters (cheap: four atomic loads). */
export function resources(): Resources {
  return call(() => native.resources())
}
