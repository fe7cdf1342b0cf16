"""Compile every Triton kernel of visprune for sm_90 on a machine without a GPU.

Triton's active driver is replaced by a stand-in that reports ``GPUTarget("cuda", 90, 32)`` and
turns each launch into a compile-only call: the real launchers run on CPU tensors of the real
shapes, so constexprs, warps and argument specialisations are exactly those of a GPU launch.
A kernel that compiles is never run.  Registers and spills come from Triton's own ``ptxas -v``
log, shared memory from the compiled kernel's metadata.  The kernels are whatever the launchers
compile (nothing here names a kernel); Triton's in-memory cache compiles each distinct
specialisation once however many calls reach it.

    python3 scripts/gpu_compile/triton_sm90.py --out results.json [--only holov]
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import io
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

# Before Triton is imported: compiled kernels (not the interpreter), every one through ptxas (a
# fresh cache), and ptxas's log printed by Triton, which is where registers and spills come from.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="visprune-sm90-")
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as triton_driver  # noqa: E402

from visprune.common import stage1_count  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
# H100 / H200 (sm_90): what CUDA reports for the properties Triton reads at compile and load time.
SM90_PROPERTIES = {"max_shared_mem": 232448, "max_num_regs": 65536, "multiprocessor_count": 132,
                   "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000,
                   "mem_bus_width": 5120}
MAX_THREADS = 1024

# name, N visual tokens, D hidden, M text tokens, kept tokens (DESIGN.md's benchmark shapes)
SHAPES = [("llava-1.5", 576, 4096, 64, 64),
          ("llava-next", 2880, 4096, 64, 320),
          ("video", 16384, 3584, 64, 1024)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
CLIP_DIM = 1024                     # PruMerge's keys and features: the vision tower's width
HOLOV_CROPS = (16, 24, 64)          # the default, and crops of 24 and 9 tokens at N = 576
# received_attention: name, H, Hkv, L (= Lk), dh, span start, span length.  LLaVA-1.5's prompt
# (32 heads of 128, the image at 35..611), a long GQA prompt (28 query heads over 4 kv heads of
# 128, as Qwen2.5-7B) and heads of 64.
ATTENTION_SHAPES = [("llava-1.5", 32, 32, 640, 128, 35, 576),
                    ("long-gqa", 28, 4, 8192, 128, 35, 576),
                    ("dh64", 16, 16, 2048, 64, 35, 576)]
# The video ops: name, frames T, positions per frame P, hidden size D (FastVID / HoliTom on
# LLaVA-OneVision: 196 pooled tokens per frame; Qwen2-0.5B's 896 and Qwen2-7B's 3584).
VIDEO_SHAPES = [("video-32x196", 32, 196, 896), ("video-64x196", 64, 196, 3584)]
PTXAS_ENTRY = re.compile(
    r"Compiling entry function '(?P<name>[^']+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, (?P<ld>\d+) bytes spill loads"
    r".*?Used (?P<regs>\d+) registers", re.S)


class _Log(io.TextIOBase):
    """Stands in for ``sys.stdout`` while launchers run: keeps what Triton prints (ptxas logs,
    the reproducer of a failed compile) until a kernel load claims it."""

    def __init__(self):
        self.text = []

    def write(self, s):
        self.text.append(s)
        return len(s)

    def take(self):
        out, self.text = "".join(self.text), []
        return out


class _Launcher:
    """A compile-only launch: the kernel has been compiled and loaded; nothing runs."""

    def __init__(self, src, metadata):
        self.src, self.metadata = src, metadata

    def __call__(self, *args, **kwargs):
        return None


class _Utils:
    def __init__(self, stand_in):
        self.stand_in = stand_in

    def get_device_properties(self, device):
        return dict(SM90_PROPERTIES)

    def load_binary(self, name, kernel, shared, device):
        regs, spill_st, spill_ld = self.stand_in.loaded(name, kernel)
        return object(), object(), regs, max(spill_st, spill_ld), MAX_THREADS

    def unload_module(self, module):
        return None


class CompileOnlyDriver(DriverBase):
    """Triton's active driver for an sm_90 device that is not there."""

    def __init__(self, log):
        self.log = log
        self.utils = _Utils(self)
        self.pending = None                 # the last launcher made: its kernel loads next
        self.records = []
        self.call = None                    # the launcher call being run (for the records)

    @classmethod
    def is_active(cls):
        return False

    def launcher_cls(self, src, metadata):
        self.pending = _Launcher(src, metadata)
        return self.pending

    def loaded(self, name, cubin):
        """A compiled kernel is loaded: record it with its ptxas statistics."""
        log = self.log.take()
        stats = {m.group("name"): m for m in PTXAS_ENTRY.finditer(log)}
        m = stats.get(name)
        src, meta = self.pending.src, self.pending.metadata
        rec = {"toolchain": f"triton {triton.__version__}", "kernel": name,
               "module": getattr(src.fn, "module", "?").rsplit(".", 1)[-1],
               "signature": signature(src, meta), "smem": int(meta.shared),
               "first_call": self.call}
        if m is None:
            rec["error"] = "no ptxas log for this kernel (compiled outside this run?)"
            regs = st = ld = 0
        else:
            regs, st, ld = int(m.group("regs")), int(m.group("st")), int(m.group("ld"))
            rec.update(regs=regs, spill_stores=st, spill_loads=ld, stack=int(m.group("stack")))
        self.records.append(rec)
        return regs, st, ld

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        return None

    def get_current_stream(self, device=None):
        return 0

    def get_device_capability(self, device=None):
        return (TARGET.arch // 10, TARGET.arch % 10)

    def map_python_to_cpp_type(self, ty):
        return "void*" if ty.startswith("*") else ty

    def get_benchmarker(self):
        raise RuntimeError("compile-only driver: nothing can be timed")


_SHORT = {"fp32": "f32", "fp16": "f16", "bf16": "bf16", "i8": "i8", "u8": "u8", "i1": "i1",
          "i32": "i32", "i64": "i64"}


def signature(src, meta):
    """``x:bf16 norm:f32 | METRIC=0 BLOCK_M=64 | w8 s3``: pointer element types, constexprs in
    parameter order, warps and stages."""
    names = src.fn.arg_names
    ptrs = [f"{k}:{_SHORT.get(v[1:], v[1:])}" for k, v in src.signature.items()
            if isinstance(v, str) and v.startswith("*")]
    consts = []
    for path, value in sorted(src.constants.items()):
        name = names[path[0]] if len(path) == 1 else str(path)
        if src.signature.get(name) != "constexpr":
            continue                        # an argument specialised to a value (e.g. == 1)
        value = getattr(value, "value", value)
        consts.append(f"{name}={int(value) if isinstance(value, bool) else value}")
    ptr_types = " ".join(p.replace("_ptr", "") for p in ptrs)
    return f"{ptr_types} | {' '.join(consts)} | w{meta.num_warps} s{meta.num_stages}"


def _launcher(module, name):
    return getattr(importlib.import_module(f"visprune.triton_kernels.{module}"), name)


def calls():
    """``(description, thunk)`` for every launcher call: each shape, dtype and option."""
    mi_scores = _launcher("mi_scores", "mi_scores")
    greedy = importlib.import_module("visprune.triton_kernels.greedy")
    gather_compact = _launcher("gather", "gather_compact")
    prune = _launcher("prune", "prune")
    prune_varlen = _launcher("prune", "prune_varlen")
    gather_compact_varlen = _launcher("gather", "gather_compact_varlen")
    similarity_variance = _launcher("holov", "similarity_variance")
    merge = _launcher("prumerge", "merge")
    gram_max_n = getattr(greedy, "GRAM_MAX_N", 4096)
    dpp = importlib.import_module("visprune.triton_kernels.dpp")
    received_attention = _launcher("attention", "received_attention")

    for (shape, N, D, M, keep), dtype in itertools.product(SHAPES, DTYPES):
        dt = str(dtype).replace("torch.", "")
        x = torch.empty(1, N, D, dtype=dtype)
        text = torch.empty(1, M, D, dtype=dtype)
        text_mask = torch.arange(M)[None] < M - 7
        mask = torch.arange(N)[None] % 8 != 3
        keep_mask = torch.arange(N)[None] < keep
        index = torch.randperm(N)[None, :keep].contiguous()
        tag = f"{shape} {dt}"

        for tm, metric in itertools.product((None, text_mask), ("l2", "cosine")):
            yield (f"mi_scores {tag} {metric} text_mask={tm is not None}",
                   lambda tm=tm, metric=metric: mi_scores(x, text, tm, metric))

        paths = ["auto", "stream"] + (["gram"] if N <= gram_max_n else [])
        for objective, metric, m, start, path in itertools.product(
                ("maxmin", "maxsum"), ("cosine", "l2"), (None, mask), ("auto", 0, "linear"), paths):
            yield (f"greedy_select {tag} {objective} {metric} mask={m is not None} "
                   f"start={start} path={path}",
                   lambda objective=objective, metric=metric, m=m, start=start, path=path:
                   greedy.greedy_select(x, keep, objective, metric, m, start, norms=None,
                                        path=path))

        for sort in (True, False):
            yield (f"gather_compact {tag} index sort={sort}",
                   lambda sort=sort: gather_compact(x, index, None, sort))
        yield (f"gather_compact {tag} mask", lambda: gather_compact(x, None, keep_mask, True))

        stage1 = stage1_count(N, 0.8)
        for tm, m, mi_metric, objective, metric in itertools.product(
                (None, text_mask), (None, mask), ("l2", "cosine"), ("maxsum", "maxmin"),
                ("cosine", "l2")):
            yield (f"prune {tag} mi={mi_metric} {objective} {metric} text_mask={tm is not None} "
                   f"mask={m is not None}",
                   lambda tm=tm, m=m, mi_metric=mi_metric, objective=objective, metric=metric:
                   prune(x, text, keep, stage1, tm, m, mi_metric, objective, metric))

        # Varlen: a packed batch of this shape's image, one a third of it and a 1-token one.
        lengths = [N, N // 3, 1]
        xv = torch.empty(sum(lengths), D, dtype=dtype)
        cu = torch.tensor([0, N, N + N // 3, sum(lengths)], dtype=torch.int32)
        kv = [keep, keep // 3, 1]
        maskv = torch.arange(sum(lengths)) % 8 != 3
        textv = torch.empty(len(lengths), M, D, dtype=dtype)
        vpaths = ["stream"] + (["gram"] if N <= gram_max_n else [])
        for objective, metric, m, start, path in itertools.product(
                ("maxmin", "maxsum"), ("cosine", "l2"), (None, maskv), ("auto", 0, "linear"),
                vpaths):
            yield (f"greedy_select_varlen {tag} {objective} {metric} mask={m is not None} "
                   f"start={start} path={path}",
                   lambda objective=objective, metric=metric, m=m, start=start, path=path:
                   greedy.greedy_select_varlen(xv, cu, kv, objective, metric, m, start,
                                               path=path))
        stage1v = torch.tensor([stage1_count(n, 0.8) for n in lengths])
        for tm, mi_metric, objective, metric in itertools.product(
                (text_mask.expand(len(lengths), -1),), ("l2", "cosine"), ("maxsum",),
                ("cosine", "l2")):
            yield (f"prune_varlen {tag} mi={mi_metric} {objective} {metric} "
                   f"text_mask={tm is not None}",
                   lambda tm=tm, mi_metric=mi_metric, objective=objective, metric=metric:
                   prune_varlen(xv, cu, textv, kv, stage1v, tm, None, mi_metric, objective,
                                metric))
        indexv = torch.cat([torch.arange(k) * (n // max(k, 1)) + lo for k, n, lo in
                            zip(kv, lengths, [0, N, N + N // 3])])
        for sort in (True, False):
            yield (f"gather_compact_varlen {tag} index sort={sort}",
                   lambda sort=sort: gather_compact_varlen(xv, cu, indexv, None, sort))
        yield (f"gather_compact_varlen {tag} mask",
               lambda: gather_compact_varlen(xv, cu, None, maskv, True))

        relevance = torch.empty(1, N, dtype=torch.float32)
        dpp_paths = ["auto", "stream"] + (["gram"] if N <= dpp.GRAM_MAX_N else [])
        for m, path in itertools.product((None, mask), dpp_paths):
            yield (f"cdpruner.dpp_map {tag} mask={m is not None} path={path}",
                   lambda m=m, path=path: dpp.dpp_map(x, relevance, keep, m, 1e-4, path=path))

        for crops in HOLOV_CROPS:
            yield (f"holov.similarity_variance {tag} crops={crops}",
                   lambda crops=crops: similarity_variance(x, crops))

        feats = torch.empty(1, N, CLIP_DIM, dtype=dtype)
        keys = torch.empty(1, N, CLIP_DIM, dtype=dtype)
        attn = torch.empty(1, N, dtype=torch.float32)
        kept = torch.cat([index, torch.full((1, 1), -1)], 1)      # with one padding row
        out = feats.new_zeros(1, kept.shape[1] + 1, CLIP_DIM)[:, :kept.shape[1]]
        yield (f"prumerge.merge {tag}", lambda: merge(keys, feats, attn, kept, out, neighbours=32))

    video = importlib.import_module("visprune.triton_kernels.video")
    for (shape, T, P, D), dtype in itertools.product(VIDEO_SHAPES, DTYPES):
        N = T * P
        x = torch.empty(1, N, D, dtype=dtype)
        mask = torch.arange(N)[None] % 8 != 3
        tag = f"{shape} {str(dtype).replace('torch.', '')}"
        for k, m in itertools.product((4, 7), (None, mask)):
            yield (f"dpc_knn {tag} k={k} mask={m is not None}",
                   lambda k=k, m=m: video.dpc_knn(x, N // 10, k, m))
        cu = torch.arange(0, N + 1, P)              # one segment per frame
        yield (f"dpc_knn_varlen {tag} frames",
               lambda cu=cu: video.dpc_knn_varlen(x[0], cu, [P // 4] * T, 7, None))
        centers = torch.randperm(N)[None, :N // 10].contiguous()
        weights = torch.empty(1, N)
        for metric, m, w, blend, rule in itertools.product(
                ("cosine", "l2"), (None, mask), (None, weights), (None, 0.6), ("clamp", "fixed")):
            if blend is None and rule == "fixed":
                continue
            yield (f"cluster_merge {tag} {metric} mask={m is not None} weights={w is not None} "
                   f"blend={blend} {rule}",
                   lambda metric=metric, m=m, w=w, blend=blend, rule=rule:
                   video.cluster_merge(x, centers, None, metric, m, w, True, blend, rule))
        yield (f"temporal_similarity {tag}",
               lambda: video.temporal_similarity(x.view(1, T, P, D), None, float("-inf")))

    for (shape, H, Hkv, L, dh, start, length), dtype in itertools.product(ATTENTION_SHAPES, DTYPES):
        q = torch.empty(1, H, L, dh, dtype=dtype)
        k = torch.empty(1, Hkv, L, dh, dtype=dtype)
        first = torch.full((1,), start, dtype=torch.long)
        key_mask = torch.arange(L)[None] >= 3                  # left padding
        rows = torch.arange(L)[None] >= start + length
        tag = f"{shape} {str(dtype).replace('torch.', '')}"
        for (queries, qm), heads, km in itertools.product(
                (("after", None), ("mask", rows)), ("max", "mean"), (None, key_mask)):
            yield (f"received_attention {tag} queries={queries} heads={heads} "
                   f"key_mask={km is not None}",
                   lambda qm=qm, queries=queries, heads=heads, km=km:
                   received_attention(q, k, first, length, queries, qm, heads, km, dh ** -0.5))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file for the records")
    ap.add_argument("--only", default="", help="run only the calls whose description has this")
    args = ap.parse_args()

    log = _Log()
    stand_in = CompileOnlyDriver(log)
    triton_driver.set_active(stand_in)
    errors, n_calls, t0 = [], 0, time.time()
    real_stdout = sys.stdout
    try:
        for what, thunk in calls():
            if args.only not in what:
                continue
            n_calls += 1
            stand_in.call = what
            sys.stdout = log
            try:
                thunk()
            except Exception as e:  # a compile error, or a launcher that no longer fits the call
                errors.append({"toolchain": f"triton {triton.__version__}", "what": what,
                               "error": f"{type(e).__name__}: {e}"[:4000],
                               "trace": traceback.format_exc()[-4000:],
                               "output": log.take()[-4000:]})
            finally:
                sys.stdout = real_stdout
    except Exception as e:          # the call list itself failed (an import, a moved launcher)
        errors.append({"toolchain": f"triton {triton.__version__}", "what": "collecting calls",
                       "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()})
    with open(args.out, "w") as f:
        json.dump({"toolchain": f"triton {triton.__version__}", "calls": n_calls,
                   "seconds": round(time.time() - t0, 1), "records": stand_in.records,
                   "errors": errors}, f, indent=1)
    print(f"triton {triton.__version__}: {n_calls} launcher calls, {len(stand_in.records)} "
          f"kernels compiled, {len(errors)} errors, {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
