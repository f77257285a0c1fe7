// The transport the two-process suites run over: KVTRANSFER_TEST_TRANSPORT (`tcp`, the default, or `shm`); RDMA
// where KVTRANSFER_TEST_RDMA_NIC names a device (`npm run test:rdma` runs the suites that way inside a
// Soft-RoCE VM).
const nic = process.env.KVTRANSFER_TEST_RDMA_NIC
const plain = process.env.KVTRANSFER_TEST_TRANSPORT ?? 'tcp'
if (!['tcp', 'shm'].includes(plain)) throw new Error(`KVTRANSFER_TEST_TRANSPORT must be tcp or shm, not ${plain}`)

export const transportOptions = nic
  ? {
      transport: 'rdma',
      rdmaNics: nic,
      gidIndex: Number(process.env.KVTRANSFER_TEST_RDMA_GID_INDEX ?? 1),
      // Notice a dead peer in seconds: 67 ms per transport retry, 5 s without progress at most.
      ibTimeout: 14,
      stallTimeoutMs: 5000,
    }
  : { transport: plain }

// Every suite runs on one host: its decodes listen on loopback only, which needs no token.
transportOptions.socketIfname = 'lo'

export const transportName = transportOptions.transport
