"""Mooncake Transfer Engine on kvtransfer bench's workload: its TCP transport (`mooncake-transfer-engine-non-cuda`
here; the CUDA wheel where there is a GPU), peers found by P2P handshake (no metadata server), each call one
`batch_transfer_sync_write` of every block of the call (keys and values), source and destination registered
once. Stands beside kvtransfer's TCP.

    python benches/peers/mooncake-driver.py --sizes 1024,65536 [--batch 1538 --layers 2 --iterations 20 --warmup 3]
"""
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


class Mooncake(common.Peer):
    system = "mooncake"

    def __init__(self):
        self.engine = None
        self.target = None
        self.addrs = None

    def variants(self):
        # A call is 3076 transfers (1538 blocks, keys and values); Mooncake's TCP transport refuses more than
        # its default queue per peer holds, so the queue is made as deep as a call.
        return [("tcp", "tcp", "TCP transport, P2P handshake, batch_transfer_sync_write",
                 {"MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER": "16384"})]

    def unusable(self):
        if self.gpu:
            return "this driver runs Mooncake's TCP transport on host memory only"
        try:
            importlib.import_module("mooncake.engine")
        except Exception as e:  # noqa: BLE001 - the reason is the table's
            return f"cannot import mooncake.engine ({type(e).__name__}: {e}); it needs libibverbs.so.1 even for TCP"
        return None

    def _engine(self, protocol):
        from mooncake.engine import TransferEngine
        engine = TransferEngine()
        if engine.initialize("127.0.0.1", "P2PHANDSHAKE", protocol, "") != 0:
            raise RuntimeError(f"TransferEngine.initialize(127.0.0.1, P2PHANDSHAKE, {protocol}) failed")
        return engine

    def _register(self, buffers):
        self.registered = []
        for t in buffers:
            for a in t:
                if self.engine.register_memory(common.address(a), a.nbytes) != 0:
                    raise RuntimeError("register_memory failed")
                self.registered.append(common.address(a))

    def decode_start(self, variant, buffers, block_bytes):
        self.engine = self._engine(variant[0])
        self._register(buffers)
        return {"port": self.engine.get_rpc_port(), "addrs": [[common.address(a) for a in t] for t in buffers]}

    def prefill_start(self, variant, buffers, block_bytes, pool, remote):
        self.engine = self.engine or self._engine(variant[0])
        self._register(buffers)
        self.target = f"127.0.0.1:{remote['port']}"
        self.block_bytes = block_bytes
        self.local_addrs = [[common.address(a) for a in t] for t in buffers]
        self.remote_addrs = remote["addrs"]

    def plan(self, layers, local_ids, remote_ids):
        # Each layer's call: every block's source and destination address, keys then values, and its length.
        bb = self.block_bytes
        self.calls = []
        for layer in range(layers):
            src, dst = [], []
            for t in range(len(self.local_addrs)):
                src.extend((self.local_addrs[t][layer] + local_ids * bb).tolist())
                dst.extend((self.remote_addrs[t][layer] + remote_ids * bb).tolist())
            self.calls.append((src, dst, [bb] * len(src)))

    def write(self, layer, local_ids, remote_ids):
        src, dst, lengths = self.calls[layer]
        if self.engine.batch_transfer_sync_write(self.target, src, dst, lengths) != 0:
            raise RuntimeError("batch_transfer_sync_write failed")

    def prefill_stop(self):
        # The engine lives on for the next size; the next size's buffers may reuse these addresses.
        for addr in getattr(self, "registered", []):
            self.engine.unregister_memory(addr)
        self.registered = []


if __name__ == "__main__":
    common.main(Mooncake(), os.path.abspath(__file__))
