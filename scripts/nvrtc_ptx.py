#!/usr/bin/env python3
"""Compile one CUDA C++ file to PTX with NVRTC through ctypes.

usage: nvrtc_ptx.py <libnvrtc.so> <src.cu> <out.ptx> [-I<dir> ...]

The options are fixed here (not taken from the caller) so that the committed
PTX depends only on the sources and the pinned NVRTC wheel.
"""
import ctypes
import sys

# compute_80: the oldest target with everything the kernels use (mma.m16n8k16
# f16->f32, lop3, prmt); the driver JITs it for sm_86/89/90 as well.
ARCH = "--gpu-architecture=compute_80"
# No -lineinfo: it records include paths (venv, python version) in the PTX,
# which would make the committed PTX depend on the machine that built it.
OPTIONS = [ARCH, "-default-device", "-std=c++17", "--fmad=true"]


def check(nvrtc, rc, prog, what):
    if rc != 0:
        nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
        msg = nvrtc.nvrtcGetErrorString(rc).decode()
        log = b""
        if prog is not None:
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.value
        sys.exit(f"nvrtc {what}: {msg}\n{log.decode(errors='replace')}")


def main():
    lib, src, out, *includes = sys.argv[1:]
    nvrtc = ctypes.CDLL(lib)
    text = open(src, "rb").read()
    prog = ctypes.c_void_p()
    # The program name appears in #line directives of the PTX: use the base
    # name so the output does not depend on where the checkout lives.
    name = src.rsplit("/", 1)[-1].encode()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), text, name, 0, None, None), None, "create")
    opts = [o.encode() for o in OPTIONS + includes]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
    check(nvrtc, rc, prog, f"compile {src}")
    size = ctypes.c_size_t()
    check(nvrtc, nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size)), prog, "ptx size")
    buf = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetPTX(prog, buf), prog, "ptx")
    with open(out, "wb") as f:
        f.write(buf.value)


if __name__ == "__main__":
    main()
