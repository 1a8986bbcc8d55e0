#!/usr/bin/env python3
"""Compiles fer-cam's CUDA kernels (src/cuda/kernels.cu) with NVRTC, as the binary does at run
time, for the GPU generations docs/kernels.md names, and checks that every kernel is in the PTX.

NVRTC needs no GPU and no driver, so CI runs this where it cannot run the GPU tests: it catches
source that nvcc would take but NVRTC does not (no <math.h>, no host headers). The options are
those of `ptx_for` in src/cuda/mod.rs; keep the two lists the same.

    python3 scripts/nvrtc-check.py LIBNVRTC [src/cuda/kernels.cu]
"""
import ctypes
import glob
import os
import sys

KERNELS = ["card_embed", "card_chain", "card_summary", "crop_faces"]
ARCHS = ["compute_90", "compute_80", "compute_86", "compute_89"]


def main() -> int:
    # NVRTC opens its builtins library by name at compile time: load it first from beside it.
    for builtins in sorted(glob.glob(os.path.join(os.path.dirname(sys.argv[1]), "libnvrtc-builtins.so*"))):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(sys.argv[1])
    path = sys.argv[2] if len(sys.argv) > 2 else "src/cuda/kernels.cu"
    src = open(path, "rb").read()
    failed = False
    for arch in ARCHS:
        prog = ctypes.c_void_p()
        rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"fer_cam_kernels.cu", 0, None, None)
        if rc != 0:
            print(f"nvrtcCreateProgram failed: {rc}")
            return 1
        opts = [b"--ftz=false", b"--prec-sqrt=true", b"--prec-div=true", b"--fmad=false",
                b"--gpu-architecture=" + arch.encode()]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if rc != 0:
            print(f"{path}, {arch}: NVRTC error {rc}\n{log.value.decode(errors='replace')}")
            failed = True
        else:
            lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
            ptx = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetPTX(prog, ptx)
            missing = [k for k in KERNELS if f".entry {k}".encode() not in ptx.value]
            if missing:
                print(f"{path}, {arch}: kernels missing from the PTX: {missing}")
                failed = True
            else:
                print(f"{path}, {arch}: {len(ptx.value)} bytes of PTX, {len(KERNELS)} kernels")
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
