"""The workload of `kvtransfer bench`, for a peer library: the same scattered blocks, the same bytes, the same
verification and the same statistics, so that a peer's row and ours differ only in the library that moved them.

A driver (mooncake-driver.py, nixl-driver.py) gives a `Peer`: its variants (a transport and the settings it runs with), how
its decode side starts and how its prefill side writes one call. `main` runs one prefill here and one decode in a
child process per variant, and prints one JSON object per line on stdout: `{"row": ...}` in the shape of
`kvtransfer bench --json`'s rows, `{"failed": ...}` for a size that failed, `{"skipped": ...}` for a variant or
a whole peer that cannot run here, with the reason. Anything the libraries print goes to stderr.
"""
import argparse
import hashlib
import json
import math
import os
import select
import subprocess
import sys
import time


def protocol_stdout():
    """Keeps the real stdout for our JSON lines and points fd 1 at stderr, so that nothing a library prints
    (they log to stdout) can be taken for a line of ours."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    return out


def scattered(n, pool, seed):
    """`n` distinct ids of [0, pool) in the order kvtransfer's bench uses for the same seed (the same LCG)."""
    ids = list(range(pool))
    x = seed & 0xFFFFFFFF
    for i in range(pool - 1, 0, -1):
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF
        j = x % (i + 1)
        ids[i], ids[j] = ids[j], ids[i]
    return ids[:n]


def cache(tensors, layers, pool, block_bytes, random, gpu=None):
    """Per tensor, per layer, one buffer of `pool` blocks with every page touched: random bytes for the source,
    zeros for the decode. numpy asks for transparent huge pages for buffers this large, as kvtransfer's do.
    With `gpu` (an index), the buffers are that GPU's memory, through PyTorch."""
    if gpu is not None:
        import torch
        torch.cuda.set_device(gpu)
        make = lambda: (torch.randint(0, 256, (pool * block_bytes,), dtype=torch.uint8, device=f"cuda:{gpu}") if random
                        else torch.zeros(pool * block_bytes, dtype=torch.uint8, device=f"cuda:{gpu}"))
        out = [[make() for _ in range(layers)] for _ in range(tensors)]
        torch.cuda.synchronize(gpu)
        return out
    import numpy as np  # here, not above: the workload's ids and hashes are checked where numpy is absent
    rng = np.random.default_rng(12345)
    out = []
    for _ in range(tensors):
        row = []
        for _ in range(layers):
            a = np.empty(pool * block_bytes, dtype=np.uint8)
            if random:
                a[:] = rng.integers(0, 256, a.size, dtype=np.uint8)
            else:
                a.fill(0)
            row.append(a)
        out.append(row)
    return out


def address(buffer):
    """A buffer's first byte (a numpy array's, or a PyTorch tensor's on a GPU)."""
    return buffer.data_ptr() if hasattr(buffer, "data_ptr") else buffer.ctypes.data


def digest(buffers, layer, ids, block_bytes):
    """The hash of `ids`' blocks of one layer, in that order, every tensor (as kvtransfer's bench hashes)."""
    h = hashlib.sha1()
    for t in buffers:
        b = t[layer]
        view = memoryview(b.cpu().numpy() if hasattr(b, "cpu") else b)
        for i in ids:
            h.update(view[int(i) * block_bytes:(int(i) + 1) * block_bytes])
    return h.hexdigest()


def spread(values):
    """Median, p10 and p90 by nearest rank, as kvtransfer's bench computes them."""
    s = sorted(values)
    at = lambda q: s[min(len(s) - 1, max(0, math.floor(q * (len(s) - 1) + 0.5)))]
    return {"median": at(0.5), "p10": at(0.1), "p90": at(0.9)}


def rate(bytes_per_call, us):
    gbps = lambda t: bytes_per_call / (t * 1e3)
    return {"median": gbps(us["median"]), "p10": gbps(us["p90"]), "p90": gbps(us["p10"])}


def python():
    """This interpreter, with the flags it runs with (isolated, no bytecode), for the processes it starts."""
    return [sys.executable, *(["-I"] if sys.flags.isolated else []), *(["-B"] if sys.flags.dont_write_bytecode else [])]


class Peer:
    """What a driver fills in; `gpu` says whether the run's buffers are GPU memory. `variants()` lists (transport, compares, detail, env): `compares` names our
    transport the row stands beside (tcp or shm), `env` is set for both processes of that variant."""

    system = "peer"
    gpu = False

    def variants(self):
        raise NotImplementedError

    def unusable(self):
        """Why this peer cannot run here (its import failed, a library is missing), or None."""
        return None

    # The decode side, in the child: starts on `buffers` and returns what the prefill needs (JSON-able);
    # `idle()` is called while it waits for the next request (a peer whose target must make progress).
    def decode_start(self, variant, buffers, block_bytes):
        raise NotImplementedError

    def needs_idle(self, variant):
        return False

    def decode_idle(self):
        pass

    def decode_stop(self):
        pass

    # The prefill side, here: connects to the decode from what `decode_start` returned; `write` moves one call.
    # `prefill_stop` runs even where `prefill_start` failed part-way, and releases what it got.
    def prefill_start(self, variant, buffers, block_bytes, pool, remote):
        raise NotImplementedError

    def plan(self, layers, local_ids, remote_ids):
        """Before the calls, untimed: whatever a driver can work out once per layer (addresses, indices), as an
        engine's connector would keep it."""

    def write(self, layer, local_ids, remote_ids):
        raise NotImplementedError

    def prefill_stop(self):
        pass


class Decode:
    """The decode child of one variant and size, driven by JSON lines on its stdin and stdout."""

    def __init__(self, driver, variant, env, gpu):
        gpu_args = [] if gpu is None else ["--decode-gpu", str(gpu)]
        self.proc = subprocess.Popen([*python(), driver, "--decode", variant, *gpu_args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, text=True, bufsize=1)

    def ask(self, op, **args):
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the decode process ended during {op} (exit code {self.proc.wait()})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the decode process: {reply['error']}")
        return reply.get("result")

    def end(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:
            self.proc.kill()


def serve_decode(peer, variant, gpu):
    """The child's loop: `start`, `clear`, `digest`, until stdin closes."""
    out = protocol_stdout()
    buffers, block_bytes = [], 0
    v = next(v for v in peer.variants() if v[0] == variant)
    while True:
        ready, _, _ = select.select([sys.stdin], [], [], 0 if peer.needs_idle(v) else None)
        if not ready:
            peer.decode_idle()
            continue
        line = sys.stdin.readline()
        if not line:
            break
        m = json.loads(line)
        try:
            if m["op"] == "start":
                block_bytes = m["blockBytes"]
                buffers = cache(m["tensors"], m["layers"], m["pool"], block_bytes, False, gpu)
                result = peer.decode_start(v, buffers, block_bytes)
            elif m["op"] == "clear":
                for t in buffers:
                    for i in m["ids"]:
                        t[m["layer"]][i * block_bytes:(i + 1) * block_bytes] = 0
                result = True
            elif m["op"] == "digest":
                result = digest(buffers, m["layer"], m["ids"], block_bytes)
            else:
                raise ValueError(f"unknown op {m['op']}")
            out.write(json.dumps({"result": result}) + "\n")
        except Exception as e:  # noqa: BLE001 - every failure goes back to the prefill as text
            out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
    peer.decode_stop()
    out.flush()
    os._exit(0)


def no_torch_gpu():
    """Why GPU rows cannot run in this Python (they allocate through PyTorch), or None."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - the reason is the table's
        return (f"GPU memory is allocated through PyTorch, which this Python cannot import ({type(e).__name__}: {e}); "
                "make the peers' environment with --system-site-packages where PyTorch is installed")
    if not torch.cuda.is_available():
        return "PyTorch here sees no GPU"
    return None


def measure(peer, driver, variant, env, a, block_bytes):
    """One variant at one size: warm-up, timed calls, then the bytes checked once."""
    tensors, layers, pool = a.tensors, a.layers, a.pool
    decode = Decode(driver, variant[0], env, (a.decode_gpu or 0) if a.gpu else None)
    try:
        src = cache(tensors, layers, pool, block_bytes, True, 0 if a.gpu else None)
        remote_info = decode.ask("start", blockBytes=block_bytes, pool=pool, layers=layers, tensors=tensors)
        try:
            peer.prefill_start(variant, src, block_bytes, pool, remote_info)
            import numpy as np
            local = np.array(scattered(a.batch, pool, 1), dtype=np.int64)
            remote = np.array(scattered(a.batch, pool, 2), dtype=np.int64)
            peer.plan(layers, local, remote)
            # At least `warmup` calls, going on until `warmup_ms` have passed (none with warmup 0), as kvtransfer's.
            i, warming = 0, time.perf_counter()
            while i < a.warmup or (a.warmup > 0 and time.perf_counter() - warming < a.warmup_ms / 1e3):
                peer.write(i % layers, local, remote)
                i += 1
            seconds = []
            for i in range(a.iterations):
                start = time.perf_counter_ns()
                peer.write(i % layers, local, remote)
                seconds.append((time.perf_counter_ns() - start) / 1e9)
            decode.ask("clear", layer=0, ids=remote.tolist())
            peer.write(0, local, remote)
            theirs = decode.ask("digest", layer=0, ids=remote.tolist())
            verified = theirs == digest(src, 0, local, block_bytes)
        finally:
            try:
                peer.prefill_stop()
            except Exception as e:  # noqa: BLE001 - the error that ended the size is the one to report
                print(f"releasing {peer.system} {variant[0]} after {block_bytes} B: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        decode.end()
    bytes_per_call = a.batch * block_bytes * tensors
    us = spread([t * 1e6 for t in seconds])
    return {"system": peer.system, "transport": variant[0], "compares": variant[1], "detail": variant[2],
            "blockBytes": block_bytes, "batch": a.batch, "bytesPerCall": bytes_per_call, "calls": len(seconds),
            "gbps": rate(bytes_per_call, us), "usPerCall": us, "verified": verified}


def main(peer, driver):
    p = argparse.ArgumentParser(description=f"{peer.system} on kvtransfer bench's workload")
    p.add_argument("--decode", help=argparse.SUPPRESS)
    p.add_argument("--variant", help="one variant only (the driver runs each in processes of its own)")
    p.add_argument("--sizes", default="1024,65536,262144", help="block sizes in bytes, comma-separated")
    p.add_argument("--batch", type=int, default=1538)
    p.add_argument("--pool", type=int, default=0, help="blocks per buffer (default batch × 1.25)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--tensors", type=int, default=2)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--warmup-ms", type=float, default=200, help="untimed calls go on at least this long (with --warmup > 0)")
    p.add_argument("--gpu", action="store_true", help="GPU memory: the prefill on GPU 0, the decode on --decode-gpu")
    p.add_argument("--decode-gpu", type=int, default=None, help="the decode's GPU with --gpu (default 0)")
    a = p.parse_args()
    peer.gpu = a.gpu or a.decode_gpu is not None
    if a.decode:
        return serve_decode(peer, a.decode, a.decode_gpu)
    out = protocol_stdout()
    a.pool = a.pool or math.ceil(a.batch * 1.25)
    why = peer.unusable() or (peer.gpu and no_torch_gpu())
    if why:
        out.write(json.dumps({"skipped": {"system": peer.system, "why": why}}) + "\n")
        return
    variants = peer.variants()
    if a.variant is None:
        # Each variant in processes of its own: its environment (UCX_TLS, …) is read when its library starts.
        for v in variants:
            env = {**os.environ, **v[3]}
            # Its lines go straight through, as they come (the bench takes a long silence for a hang).
            out.flush()
            child = subprocess.run([*python(), driver, "--variant", v[0], *sys.argv[1:]], env=env, stdout=out)
            if child.returncode != 0:
                out.write(json.dumps({"skipped": {"system": peer.system, "transport": v[0],
                                                  "why": f"its driver ended with exit code {child.returncode}"}}) + "\n")
        return
    v = next(v for v in variants if v[0] == a.variant)
    env = {**os.environ, **v[3]}
    for size in [int(s) for s in a.sizes.split(",")]:
        try:
            out.write(json.dumps({"row": measure(peer, driver, v, env, a, size)}) + "\n")
        except Exception as e:  # noqa: BLE001 - a failed size is a line of the table, not the end of the run
            out.write(json.dumps({"failed": {"system": peer.system, "transport": v[0], "blockBytes": size,
                                             "error": f"{type(e).__name__}: {e}"}}) + "\n")
    # Out without the interpreter's teardown: NIXL 1.5's agent crashes (SIGSEGV) when Python frees it at exit,
    # after every row is out.
    out.flush()
    os._exit(0)
