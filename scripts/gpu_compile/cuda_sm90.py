"""Compile visprune's CUDA extension sources for sm_90 without a GPU (compile only, no link).

``csrc/cuda/kernels.cu`` goes through nvcc and ``csrc/ops.cpp`` through the host compiler, both
with ``-DVISPRUNE_WITH_CUDA`` and the flags ``torch.utils.cpp_extension`` and ``setup.py`` use
for a CUDA build, plus warnings as errors and ``-Xptxas -v`` (registers, spills and shared
memory per kernel).  The CPU build of torch ships the CUDA headers of ATen and c10 but not the
generated ``c10/cuda/impl/cuda_cmake_macros.h``; a stand-in with the content a CUDA build
generates is put first on the include path.

    python3 scripts/gpu_compile/cuda_sm90.py --cuda-home DIR --work DIR --out results.json
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sysconfig
import time

from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARCH = ["-gencode=arch=compute_90,code=sm_90"]
# The extension's own flags (setup.py) and defines (setup.py + cpp_extension's BuildExtension).
SETUP_NVCC = ["-O3", "-lineinfo"]
SETUP_CXX = ["-O3", "-ffp-contract=off", "-fopenmp"]
DEFINES = ["-DVISPRUNE_WITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"
PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(?P<name>[^']+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads"
    r".*?Used (?P<regs>\d+) registers(?P<rest>[^\n]*)", re.S)


def _demangle(names):
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return dict(zip(names, out.splitlines())) if out else {n: n for n in names}


def _split(demangled):
    """``pair_min_kernel<false>``, ``(float const*, ...)`` from ``void ns::pair_min_kernel<false>(...)``."""
    plain = re.sub(r"(\w+::|\(anonymous namespace\)::)", "", demangled)
    head, _, params = plain.partition("(")
    return re.sub(r"^void ", "", head), "(" + params if params else ""


def commands(cuda_home, work):
    include = os.path.join(work, "include")
    header = os.path.join(include, "c10", "cuda", "impl", "cuda_cmake_macros.h")
    os.makedirs(os.path.dirname(header), exist_ok=True)
    with open(header, "w") as f:
        f.write(CMAKE_MACROS)
    # -isystem: warnings-as-errors apply to visprune's code, not to torch's or CUDA's headers.
    system = [*cpp_extension.include_paths(), os.path.join(cuda_home, "include"),
              sysconfig.get_paths()["include"]]
    includes = [f"-I{include}"] + [a for d in system for a in ("-isystem", d)]
    nvcc = [os.path.join(cuda_home, "bin", "nvcc"), "-c", "csrc/cuda/kernels.cu",
            "-o", os.path.join(work, "kernels.o"), *includes, *DEFINES,
            *cpp_extension.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *SETUP_NVCC, *ARCH,
            "-std=c++20", "-Xptxas", "-v", "-Xcompiler", "-Wall,-Wextra,-Werror", "-Werror", "all-warnings"]
    cxx = (os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++").split()
    host = [*cxx, "-c", "csrc/ops.cpp", "-o", os.path.join(work, "ops.o"), *includes, *DEFINES,
            "-DNDEBUG", "-fwrapv", "-fPIC", *SETUP_CXX, "-std=c++20", "-Wall", "-Wextra", "-Werror"]
    return {"csrc/cuda/kernels.cu": nvcc, "csrc/ops.cpp": host}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cuda-home", required=True, help="a CUDA toolkit: bin/nvcc, include/")
    ap.add_argument("--work", required=True, help="folder for the header stand-in and objects")
    ap.add_argument("--out", required=True, help="JSON file for the records")
    args = ap.parse_args()
    t0 = time.time()
    os.makedirs(args.work, exist_ok=True)
    env = dict(os.environ, CUDA_HOME=args.cuda_home,
               PATH=os.path.join(args.cuda_home, "bin") + os.pathsep + os.environ.get("PATH", ""))
    version = subprocess.run([os.path.join(args.cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", version)
    toolchain = f"nvcc {m.group(1) if m else '?'}"

    jobs = {src: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
            for src, cmd in commands(args.cuda_home, args.work).items()}
    records, errors = [], []
    for src, job in jobs.items():
        out, _ = job.communicate()
        if job.returncode != 0:
            errors.append({"toolchain": toolchain, "what": f"compile {src}",
                           "error": f"exit status {job.returncode}", "output": out[-6000:]})
        entries = list(PTXAS_ENTRY.finditer(out))
        names = _demangle([e.group("name") for e in entries])
        for e in entries:
            name, params = _split(names[e.group("name")])
            smem = re.search(r"(\d+) bytes smem", e.group("rest"))
            records.append({"toolchain": toolchain, "kernel": name, "module": src,
                            "signature": params, "regs": int(e.group("regs")),
                            "spill_stores": int(e.group("st")), "spill_loads": int(e.group("ld")),
                            "stack": int(e.group("stack")),
                            "smem": int(smem.group(1)) if smem else 0})
    with open(args.out, "w") as f:
        json.dump({"toolchain": toolchain, "calls": len(jobs), "seconds": round(time.time() - t0, 1),
                   "records": records, "errors": errors}, f, indent=1)
    print(f"{toolchain}: {len(jobs)} sources, {len(records)} kernels, {len(errors)} errors, "
          f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
