"""NIXL on kvtransfer bench's workload: its UCX backend, with `UCX_TLS=tcp` (beside kvtransfer's TCP) and with
UCX's own choice (cma or shared memory here, beside kvtransfer's shm; cuda_ipc for GPU memory), each with UCX's
progress thread on and off. The decode registers its buffers and hands over its agent's metadata; the prefill
prepares both sides' block lists once (NIXL's strided form) and makes each call one `make_prepped_xfer` WRITE of
every block of the call (keys and values), waited for until `DONE`, as an engine's connector does.
`nixl-cu12` runs on a CPU machine installed with `--no-deps` (it does not need torch).

    python benches/peers/nixl-driver.py --sizes 1024,65536 [--batch 1538 --layers 2 --iterations 20 --warmup 3]
"""
import base64
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def api():
    """NIXL's Python API, from whichever of its wheels is installed (`nixl`, `nixl-cu12`, `nixl-cu13`)."""
    import importlib
    for package in ("nixl", "nixl_cu12", "nixl_cu13"):
        try:
            m = importlib.import_module(f"{package}._api")
            return m.nixl_agent, m.nixl_agent_config
        except ModuleNotFoundError as e:
            if e.name != package:
                raise  # the wheel is there and failed to import: that is the reason to give
    raise ModuleNotFoundError("none of nixl, nixl-cu12, nixl-cu13 is installed")


class Nixl(common.Peer):
    system = "nixl"

    def __init__(self):
        self.agent = None

    def variants(self):
        out = []
        kinds = ((("cuda-ipc", "cuda-ipc", "UCX's default transports (cuda_ipc) on GPU memory"),) if self.gpu else
                 (("tcp", "tcp", "UCX_TLS=tcp"), ("same-host", "shm", "UCX's default transports")))
        for tls, compares, what in kinds:
            for thread in (True, False):
                env = {"UCX_TLS": "tcp"} if tls == "tcp" else {}
                name = f"ucx-{tls}" + ("" if thread else "-no-progress-thread")
                out.append((name, compares, f"{what}, progress thread {'on' if thread else 'off'}", env))
        return out

    def unusable(self):
        try:
            api()
        except Exception as e:  # noqa: BLE001 - the reason is the table's
            return f"cannot import nixl ({type(e).__name__}: {e})"
        return None

    def _agent(self, variant, name):
        nixl_agent, nixl_agent_config = api()
        thread = not variant[0].endswith("-no-progress-thread")
        return nixl_agent(name, nixl_agent_config(enable_prog_thread=thread, backends=["UCX"]))

    def _memory(self):
        return "VRAM" if self.gpu else "DRAM"

    @staticmethod
    def _device(a):
        return a.device.index if hasattr(a, "data_ptr") and a.device.type == "cuda" else 0

    def _register(self, buffers):
        return self.agent.register_memory([(common.address(a), a.nbytes, self._device(a), "") for t in buffers for a in t], self._memory())

    def _strided(self, buffers, block_bytes, pool):
        # One row per tensor and layer: (address, block length, device, stride, count) — block i of tensor t,
        # layer l is descriptor (t * layers + l) * pool + i.
        return np.array([[common.address(a), block_bytes, self._device(a), block_bytes, pool] for t in buffers for a in t], dtype=np.uint64)

    def needs_idle(self, variant):
        return variant[0].endswith("-no-progress-thread")

    def decode_start(self, variant, buffers, block_bytes):
        self.agent = self._agent(variant, "decode")
        self.reg = self._register(buffers)
        pool = buffers[0][0].nbytes // block_bytes
        return {"metadata": base64.b64encode(self.agent.get_agent_metadata()).decode(),
                "rows": self._strided(buffers, block_bytes, pool).tolist()}

    def decode_idle(self):
        # Without UCX's progress thread the target makes progress only when asked.
        if self.agent is not None:
            self.agent.get_new_notifs()

    def prefill_start(self, variant, buffers, block_bytes, pool, remote):
        self.agent = self._agent(variant, "prefill")
        self.reg = self._register(buffers)
        name = self.agent.add_remote_agent(base64.b64decode(remote["metadata"]))
        self.remote_name = name.decode() if isinstance(name, bytes) else name
        self.local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", self._strided(buffers, block_bytes, pool), self._memory())
        self.remote = self.agent.prep_xfer_dlist(self.remote_name, np.array(remote["rows"], dtype=np.uint64), self._memory())
        self.tensors, self.layers, self.pool = len(buffers), len(buffers[0]), pool

    def plan(self, layers, local_ids, remote_ids):
        # Each layer's descriptor indices on both sides, keys then values.
        self.indices = []
        for layer in range(layers):
            base = [(t * self.layers + layer) * self.pool for t in range(self.tensors)]
            self.indices.append((np.concatenate([b + local_ids for b in base]), np.concatenate([b + remote_ids for b in base])))

    def write(self, layer, local_ids, remote_ids):
        li, ri = self.indices[layer]
        handle = self.agent.make_prepped_xfer("WRITE", self.local, li, self.remote, ri)
        try:
            state = self.agent.transfer(handle)
            while state == "PROC":
                state = self.agent.check_xfer_state(handle)
            if state != "DONE":
                raise RuntimeError(f"the transfer ended {state}")
        finally:
            self.agent.release_xfer_handle(handle)

    def prefill_stop(self):
        # Whatever `prefill_start` got, in the reverse order.
        if self.agent is None:
            return
        for name in ("local", "remote"):
            if getattr(self, name, None) is not None:
                self.agent.release_dlist_handle(getattr(self, name))
                setattr(self, name, None)
        if getattr(self, "remote_name", None) is not None:
            self.agent.remove_remote_agent(self.remote_name)
            self.remote_name = None
        if getattr(self, "reg", None) is not None:
            self.agent.deregister_memory(self.reg)
            self.reg = None
        self.agent = None


if __name__ == "__main__":
    common.main(Nixl(), os.path.abspath(__file__))
