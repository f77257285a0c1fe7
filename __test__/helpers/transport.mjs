// The transport the two-process suites run over: TCP by default; RDMA where KVTRANSFER_TEST_RDMA_NIC names a
// device (`npm run test:rdma` runs the suites that way inside a Soft-RoCE VM).
const nic = process.env.KVTRANSFER_TEST_RDMA_NIC

export const transportOptions = nic
  ? {
      transport: 'rdma',
      rdmaNics: nic,
      gidIndex: Number(process.env.KVTRANSFER_TEST_RDMA_GID_INDEX ?? 1),
      // Notice a dead peer in seconds: 67 ms per transport retry, 5 s without progress at most.
      ibTimeout: 14,
      timeoutMs: 5000,
    }
  : { transport: 'tcp' }

export const transportName = transportOptions.transport
