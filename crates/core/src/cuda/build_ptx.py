"""Regenerates copy_blocks.ptx from copy_blocks.cu with NVRTC (no GPU needed).

    python3 -m venv /tmp/nvrtc && /tmp/nvrtc/bin/pip install 'nvidia-cuda-nvrtc-cu12==12.0.*'
    /tmp/nvrtc/bin/python crates/core/src/cuda/build_ptx.py

NVRTC 12.0 writes PTX ISA 8.0, which every CUDA 12 driver can load; compute_70 covers Volta and later.
"""
import ctypes
import glob
import os
import sys

import nvidia.cuda_nvrtc

here = os.path.dirname(os.path.abspath(__file__))
lib_dir = os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib")
nvrtc = ctypes.CDLL(sorted(glob.glob(os.path.join(lib_dir, "libnvrtc.so*")))[0])


def check(rc, what):
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        sys.exit(f"{what}: {nvrtc.nvrtcGetErrorString(rc).decode()}")


source = open(os.path.join(here, "copy_blocks.cu"), "rb").read()
program = ctypes.c_void_p()
check(nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"copy_blocks.cu", 0, None, None), "create")
options = [b"--gpu-architecture=compute_70", b"--std=c++14"]
rc = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(program, log)
if log.value.strip():
    print(log.value.decode(), file=sys.stderr)
check(rc, "compile")
check(nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size)), "ptx size")
ptx = ctypes.create_string_buffer(size.value)
check(nvrtc.nvrtcGetPTX(program, ptx), "ptx")
with open(os.path.join(here, "copy_blocks.ptx"), "w") as out:
    out.write(ptx.value.decode())
print("wrote copy_blocks.ptx")
