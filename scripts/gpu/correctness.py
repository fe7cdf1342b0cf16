"""Every op (dense and varlen) and every method of visprune on every backend of a device, against
the reference backend on the same inputs: indices identical, floats within a per-dtype tolerance.

    python scripts/gpu/correctness.py [--device cuda|cpu] [--shapes tiny small llava]
        [--dtypes float32 float16 bfloat16] [--backends triton cuda] [--only NAME ...]
        [--jobs N] [--json FILE] [--plan]

A case is a function (an op of ``visprune.ops`` or a callable of ``visprune.methods``) with one
set of options, at one shape and dtype; it runs on each backend and on "reference".  The first
failure of a (function, backend) pair is recorded in full and the pair's later cases are
skipped (the same fault would repeat, each costing a kernel compilation); the other pairs go on.
A CUDA error ends the run (the context is lost).  The (shape, dtype) pairs run in order of
value: on a GPU every dtype at the tiny shape first (every kernel and dtype reached early), then
LLaVA-1.5 in bf16, then the rest; a run stopped early has the most useful part.  First calls
compile Triton kernels (about a second each), which is most of a GPU run's time: ``--jobs N``
spreads the pairs over N processes (one CUDA context each), merged into ``--json``.
``--json`` is rewritten after every case.  Exit status 1 on any failure or uncovered function.

A function that takes no backend (``prumerge_cls_attention``, ``visionzip_attention``) runs on
the device and is compared with the same call on float32 CPU copies of its inputs.

``--device cpu`` (CI; Triton under ``TRITON_INTERPRET=1``): the tiny shape, fp32 and fp16, the
CPU backends; a few seconds.  ``--plan`` lists the cases without building a tensor.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import visprune  # noqa: E402
from visprune import methods, ops  # noqa: E402

from helpers import gen, random_mask, randn  # noqa: E402

# Per output dtype: (rtol, atol relative to the largest |value|, at least 1).  float32 is the
# table of tests/test_backends.py (scores are float32 whatever the input dtype); fp16 / bf16
# outputs (merged tokens) may differ by one rounding of their own dtype.
TOL = {torch.float64: (1e-5, 1e-5), torch.float32: (1e-5, 1e-5),
       torch.float16: (2 ** -10, 2 ** -10), torch.bfloat16: (2 ** -7, 2 ** -7)}


@dataclass(frozen=True)
class Shape:
    """``B`` rows of ``N`` tokens of width ``D``, ``M`` text tokens, ``k`` kept; attention
    heads ``H`` over ``Hkv`` of width ``dh`` for ``received_attention``."""

    B: int
    N: int
    D: int
    M: int
    k: int
    H: int
    Hkv: int
    dh: int


# Odd sizes (masked tails in every kernel), and LLaVA-1.5's projector outputs and prompt.
SHAPES = {
    "tiny": Shape(B=2, N=37, D=40, M=5, k=7, H=4, Hkv=2, dh=16),
    "small": Shape(B=3, N=300, D=65, M=13, k=33, H=6, Hkv=3, dh=64),
    "llava": Shape(B=2, N=576, D=4096, M=64, k=64, H=32, Hkv=32, dh=128),
}
DTYPES = ("float32", "float16", "bfloat16")
# The Triton interpreter computes bf16 wrongly (DESIGN.md): CPU runs use fp32 and fp16.
CPU_DTYPES = ("float32", "float16")
# A GPU run's (shape, dtype) pairs in order of value (see the module docstring).
GPU_SCHEDULE = [("tiny", "float32"), ("tiny", "float16"), ("tiny", "bfloat16"),
                ("llava", "bfloat16"), ("small", "float16"), ("llava", "float16"),
                ("small", "bfloat16"), ("small", "float32"), ("llava", "float32")]


# --------------------------------------------------------------------------- inputs
def make_inputs(s: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0
                ) -> Dict[str, Any]:
    """Seeded tensors of one shape and dtype (drawn on the CPU: the same values on any device)."""
    B, N, D, M, k = s.B, s.N, s.D, s.M, s.k
    to = dict(device=device)
    lengths = [N, N // 3, 1]                        # a packed batch: an image, a third, one token
    seg_k = [k, max(1, k // 3), 1]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    g = gen(seed + 9)
    seg_index = torch.cat([torch.randperm(n, generator=g)[:kb] + lo
                           for n, kb, lo in zip(lengths, seg_k, cu[:-1].tolist())])
    L = N + M + 3                                   # 3 text tokens, the image, the prompt
    probs = torch.softmax(randn((B, N), seed + 5) * 3, -1)
    return {
        "shape": s,
        "visual": randn((B, N, D), seed, dtype).to(**to),
        "text": randn((B, M, D), seed + 1, dtype).to(**to),
        "text_mask": random_mask(B, M, seed + 2, p=0.7).to(**to),
        # enough candidates in every row for a stage 1 of 2k
        "mask": random_mask(B, N, seed + 3, p=0.7, min_true=2 * k).to(**to),
        "index": torch.stack([torch.randperm(N, generator=gen(seed + 4 + b))[:k]
                              for b in range(B)]).to(**to),
        "attn": probs.to(**to),
        "qk_clip": (randn((B, N + 1, D), seed + 6, dtype).to(**to),
                    randn((B, N + 1, D), seed + 7, dtype).to(**to)),
        "embeds": randn((B, N, D), seed + 8, dtype).to(**to),
        "packed": randn((sum(lengths), D), seed + 10, dtype).to(**to),
        "cu": cu.to(**to),
        "seg_k": seg_k,
        "seg_index": seg_index.to(**to),
        "seg_mask": (torch.rand(sum(lengths), generator=g) < 0.8).index_fill_(
            0, seg_index, True).to(**to),
        "seg_text": randn((len(lengths), M, D), seed + 11, dtype).to(**to),
        "seg_text_mask": random_mask(len(lengths), M, seed + 12, p=0.7).to(**to),
        "q": randn((B, s.H, L, s.dh), seed + 13, dtype).to(**to),
        "k": randn((B, s.Hkv, L, s.dh), seed + 14, dtype).to(**to),
        "key_mask": (torch.arange(L)[None] >= torch.arange(B)[:, None] % 2).to(**to),
    }


# --------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    name: str                   # the function in visprune.ops / visprune.methods
    variant: str                # its options, in words
    run: Callable[[Dict[str, Any], Optional[str]], Any]    # (inputs, backend) -> output
    takes_backend: bool = True


def _cases() -> List[Case]:
    C: List[Case] = []

    def case(name, variant, run, takes_backend=True):
        C.append(Case(name, variant, run, takes_backend))

    for metric in ("l2", "cosine"):
        case("mi_scores", metric, lambda i, b, metric=metric: ops.mi_scores(
            i["visual"], i["text"], text_mask=i["text_mask"], metric=metric, backend=b))
    for objective in ("maxmin", "maxsum"):
        for metric in ("cosine", "l2"):
            case("greedy_select", f"{objective} {metric}",
                 lambda i, b, o=objective, m=metric: ops.greedy_select(
                     i["visual"], i["shape"].k, objective=o, metric=m, backend=b))
    case("greedy_select", "maxmin cosine mask", lambda i, b: ops.greedy_select(
        i["visual"], i["shape"].k, mask=i["mask"], backend=b))
    case("greedy_select", "maxsum l2 start=1", lambda i, b: ops.greedy_select(
        i["visual"], i["shape"].k, objective="maxsum", metric="l2", start=1, backend=b))
    for sort in (True, False):
        case("gather_compact", f"index sort={sort}", lambda i, b, sort=sort: ops.gather_compact(
            i["visual"], i["index"], sort=sort, backend=b))
    case("gather_compact", "mask", lambda i, b: ops.gather_compact(
        i["visual"], mask=torch.zeros_like(i["mask"]).scatter_(1, i["index"], True), backend=b))
    case("prune", "default text_mask", lambda i, b: ops.prune(
        i["visual"], i["text"], i["shape"].k, text_mask=i["text_mask"], backend=b))
    case("prune", "mask cosine maxmin l2", lambda i, b: ops.prune(
        i["visual"], i["text"], i["shape"].k, stage1_keep=2 * i["shape"].k, mask=i["mask"],
        mi_metric="cosine", objective="maxmin", metric="l2", backend=b))
    for queries, heads, masked in (("after", "max", False), ("span", "mean", True),
                                   ("last", "max", True)):
        case("received_attention", f"{queries} {heads} key_mask={masked}",
             lambda i, b, q=queries, h=heads, m=masked: ops.received_attention(
                 i["q"], i["k"], 3, i["shape"].N, queries=q, heads=h,
                 key_mask=i["key_mask"] if m else None, backend=b))
    case("greedy_select_varlen", "maxmin cosine", lambda i, b: ops.greedy_select_varlen(
        i["packed"], i["cu"], i["seg_k"], backend=b))
    case("greedy_select_varlen", "maxsum l2 mask", lambda i, b: ops.greedy_select_varlen(
        i["packed"], i["cu"], i["seg_k"], objective="maxsum", metric="l2", mask=i["seg_mask"],
        backend=b))
    case("prune_varlen", "default text_mask", lambda i, b: ops.prune_varlen(
        i["packed"], i["cu"], i["seg_text"], i["seg_k"], text_mask=i["seg_text_mask"],
        backend=b))
    case("gather_compact_varlen", "index", lambda i, b: ops.gather_compact_varlen(
        i["packed"], i["cu"], i["seg_index"], backend=b))
    case("gather_compact_varlen", "mask", lambda i, b: ops.gather_compact_varlen(
        i["packed"], i["cu"], mask=i["seg_mask"], backend=b))
    case("dpc_knn", "k=7", lambda i, b: ops.dpc_knn(i["visual"], i["shape"].k, k=7, backend=b))
    case("dpc_knn", "k=4 mask", lambda i, b: ops.dpc_knn(
        i["visual"], i["shape"].k, k=4, mask=i["mask"], backend=b))
    case("dpc_knn_varlen", "k=7", lambda i, b: ops.dpc_knn_varlen(
        i["packed"], i["cu"], i["seg_k"], k=7, backend=b))
    case("cluster_merge", "cosine blend=0.6 clamp", lambda i, b: ops.cluster_merge(
        i["visual"], i["index"], metric="cosine", blend=0.6, backend=b))
    case("cluster_merge", "l2 others blend=0.6 fixed mask", lambda i, b: ops.cluster_merge(
        i["visual"], i["index"], mask=i["mask"], include_centers=False, blend=0.6,
        blend_rule="fixed", backend=b))
    case("cluster_merge", "assign weights", lambda i, b: ops.cluster_merge(
        i["visual"], i["index"], (i["visual"][..., 0] > 0).long() * (i["shape"].k - 1),
        weights=i["attn"], backend=b))
    case("temporal_similarity", "", lambda i, b: ops.temporal_similarity(
        i["visual"][:, :i["shape"].N // 4 * 4].reshape(i["shape"].B, 4, i["shape"].N // 4, -1),
        backend=b))

    def cls_attn(i):
        return methods.prumerge_cls_attention(*i["qk_clip"])

    def heads(i):
        return math.gcd(i["shape"].D, 32)

    case("trimtokenator", "text_mask", lambda i, b: methods.trimtokenator(
        i["visual"], i["text"], i["shape"].k, text_mask=i["text_mask"], backend=b))
    case("divprune", "", lambda i, b: methods.divprune(i["visual"], i["shape"].k, backend=b))
    for plus in (False, True):
        case("prumerge", f"plus={plus}", lambda i, b, plus=plus: methods.prumerge(
            i["visual"], cls_attn(i), i["qk_clip"][1][:, 1:], plus=plus, backend=b))
    case("prumerge_cls_attention", "", lambda i, b: methods.prumerge_cls_attention(
        *i["qk_clip"]), takes_backend=False)
    case("holov", "", lambda i, b: methods.holov(i["visual"], i["attn"], i["shape"].k,
                                                 backend=b))
    case("visionzip", "", lambda i, b: methods.visionzip(
        i["visual"], *methods.visionzip_attention(*i["qk_clip"], heads(i)), i["shape"].k,
        backend=b))
    case("visionzip_attention", "", lambda i, b: methods.visionzip_attention(
        *i["qk_clip"], heads(i)), takes_backend=False)
    case("vispruner", "", lambda i, b: methods.vispruner(i["visual"], i["attn"], i["shape"].k,
                                                         backend=b))
    case("cdpruner", "embeddings", lambda i, b: methods.cdpruner(
        i["visual"], i["shape"].k, image_embeds=i["embeds"], text_embeds=i["text"],
        text_mask=i["text_mask"], backend=b))
    case("dpp_map", "", lambda i, b: methods.dpp_map(i["visual"], i["attn"], i["shape"].k,
                                                     backend=b))
    # the unit's tokens: the masked ones; the text pivots: the others
    case("dart", "", lambda i, b: methods.dart(i["embeds"], i["visual"], i["mask"], i["shape"].k,
                                               text=~i["mask"]), takes_backend=False)

    def video(i):
        """The tokens as 6 frames of N // 6 ([B, T, P, D]), and ragged frame counts."""
        B, N, D = i["visual"].shape
        frames = torch.tensor([6] + [5] * (B - 1))
        return i["visual"][:, :6 * (N // 6)].reshape(B, 6, N // 6, D), frames

    case("evs", "frames", lambda i, b: methods.evs(video(i)[0], 0.75, frames=video(i)[1],
                                                   backend=b))
    case("vidcom2", "frames", lambda i, b: methods.vidcom2(video(i)[0], 0.75,
                                                           frames=video(i)[1], backend=b))
    case("dycoke", "frames", lambda i, b: methods.dycoke(video(i)[0], frames=video(i)[1],
                                                         backend=b))
    # r = 0.5: a merged token in every anchor frame at the tiny shape's 6 tokens per frame
    case("fastvid", "llava_onevision global_features frames", lambda i, b: methods.fastvid(
        video(i)[0], i["attn"][:, :video(i)[0].shape[1] * video(i)[0].shape[2]].reshape(
            video(i)[0].shape[:3]), global_features=video(i)[0].mean(2) + 1, r=0.5, c=3,
        p=2, frames=video(i)[1], backend=b))
    case("fastvid", "qwen2_5_vl frames", lambda i, b: methods.fastvid(
        video(i)[0], i["attn"][:, :video(i)[0].shape[1] * video(i)[0].shape[2]].reshape(
            video(i)[0].shape[:3]), variant="qwen2_5_vl", r=0.5, c=2, tau=0.0, ignore=0.5,
        p=2, frames=video(i)[1], backend=b))
    case("prunevid", "frames", lambda i, b: methods.prunevid(video(i)[0], frames=video(i)[1],
                                                             backend=b))

    def video_attention(i):
        B, N, _ = i["visual"].shape
        return i["attn"][:, :6 * (N // 6)].reshape(B, 6, N // 6)

    case("holitom", "d=0.5 frames", lambda i, b: methods.holitom(
        video(i)[0], video_attention(i), d=0.5, frames=video(i)[1], backend=b))
    case("holitom", "tau=-1 (static windows) beta=None", lambda i, b: methods.holitom(
        video(i)[0], video_attention(i), tau=-1.0, beta=None, retain_ratio=0.25, backend=b))
    return C


CASES = _cases()


def functions() -> List[str]:
    """What must be covered: every op and every method visprune exports."""
    return ([n for n in ops.__all__ if not n.endswith("Result")]
            # the methods' token counts are integer arithmetic, no tensors
            + [n for n in methods.__all__ if not n.endswith("_count")])


def uncovered() -> List[str]:
    have = {c.name for c in CASES}
    return [n for n in functions() if n not in have]


# --------------------------------------------------------------------------- comparison
def compare(got: Any, want: Any, path: str = "output") -> Optional[str]:
    """None when ``got`` matches ``want`` (integers identical, floats within :data:`TOL` of the
    output's dtype); else what differs, first difference first."""
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{path}: got {type(got).__name__} of {len(got)}, want {len(want)} parts"
        names = getattr(want, "_fields", None) or [str(j) for j in range(len(want))]
        for name, g, w in zip(names, got, want):
            why = compare(g, w, f"{path}.{name}")
            if why:
                return why
        return None
    if got.shape != want.shape or got.dtype != want.dtype:
        return (f"{path}: got {got.dtype} {tuple(got.shape)}, "
                f"want {want.dtype} {tuple(want.shape)}")
    g, w = got.cpu(), want.cpu()
    if not w.dtype.is_floating_point:
        if torch.equal(g, w):
            return None
        at = tuple((g != w).nonzero()[0].tolist())
        row = at[:-1] if g.dim() > 1 else ()
        return (f"{path}: differs first at {at}: got {g[at].item()}, want {w[at].item()}; "
                f"row {row}: got {g[row].tolist()[:16]}, want {w[row].tolist()[:16]}")
    return close(g, w, *TOL[w.dtype], path)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float, atol_rel: float,
          path: str) -> Optional[str]:
    g, w = got.double(), want.double()
    finite = w[torch.isfinite(w)]
    scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    try:
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol_rel * scale, equal_nan=True)
    except AssertionError as e:
        return f"{path}: " + " ".join(str(e).split("\n")[:4])
    return None


def _float32_cpu(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_float32_cpu(t) for t in x)
    if isinstance(x, torch.Tensor):
        return x.cpu().float() if x.is_floating_point() else x.cpu()
    return x


def check_without_backend(case: Case, inputs: Dict[str, Any], dtype: torch.dtype
                          ) -> Optional[str]:
    """A function that takes no backend: the device's result against float32 on the CPU from the
    same values, within the input dtype's tolerance (the function may round to it on the way)."""
    got = case.run(inputs, None)
    want = case.run({k: _float32_cpu(v) for k, v in inputs.items()}, None)
    parts = got if isinstance(got, tuple) else (got,)
    wants = want if isinstance(want, tuple) else (want,)
    for j, (g, w) in enumerate(zip(parts, wants)):
        why = close(g.cpu(), w, *TOL[dtype], f"output.{j}")
        if why:
            return why
    return None


# --------------------------------------------------------------------------- run
def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:400]


class Results:
    """The records, written to ``path`` after each one (a temporary file renamed)."""

    def __init__(self, path: Optional[str], environment: Dict[str, Any]):
        self.path, self.environment = path, environment
        self.records: List[Dict[str, Any]] = []
        self.skipped: Dict[str, int] = {}
        self.complete = False

    def add(self, record: Dict[str, Any]) -> None:
        self.records.append(record)
        self.write()

    def summary(self) -> Dict[str, Any]:
        count = {s: sum(r["status"] == s for r in self.records)
                 for s in ("ok", "mismatch", "error", "unsupported", "uncovered")}
        return dict(count, skipped_after_failure=sum(self.skipped.values()),
                    failures=[r for r in self.records if r["status"] in FAILED],
                    complete=self.complete)

    def write(self) -> None:
        if not self.path:
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"environment": self.environment, "summary": self.summary(),
                       "records": self.records}, f, indent=1)
        os.replace(tmp, self.path)


FAILED = ("mismatch", "error", "uncovered")


def run(cases: List[Case], pairs: List[Tuple[str, str]], backends: List[str],
        device: torch.device, results: Results, log=print) -> bool:
    """Every case x (shape, dtype) x backend; True when nothing failed."""
    failed = set()                  # (function, backend) pairs that failed once
    for shape_name, dtype_name in pairs:
        dtype = getattr(torch, dtype_name)
        inputs = make_inputs(SHAPES[shape_name], dtype, device)
        for case in cases:
            where = dict(name=case.name, variant=case.variant, shape=shape_name, dtype=dtype_name)
            names = backends if case.takes_backend else ["(none)"]
            todo = [b for b in names if (case.name, b) not in failed]
            results.skipped[case.name] = results.skipped.get(case.name, 0) + len(names) - len(todo)
            if not todo:
                continue
            want, ref_error = None, None
            if case.takes_backend:
                try:
                    want = case.run(inputs, "reference")
                except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                    ref_error = e
            for backend in todo:
                t0 = time.perf_counter()
                try:
                    if ref_error is not None:
                        raise ref_error
                    if case.takes_backend:
                        detail = compare(case.run(inputs, backend), want) or ""
                    else:
                        detail = check_without_backend(case, inputs, dtype) or ""
                    status = "mismatch" if detail else "ok"
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                except NotImplementedError as e:
                    status, detail = "unsupported", _first_line(e)
                except Exception as e:  # noqa: BLE001 - a failing backend is a finding
                    status = "error"
                    detail = _first_line(e) + "\n" + traceback.format_exc(limit=-3)
                rec = dict(where, backend="reference" if ref_error is not None else backend,
                           status=status, detail=detail,
                           seconds=round(time.perf_counter() - t0, 3))
                results.add(rec)
                line = (f"{status:<11} {case.name} [{case.variant}] {shape_name} {dtype_name} "
                        f"{rec['backend']} {rec['seconds']:.2f}s")
                log(line + (f"\n    {detail.splitlines()[0]}" if status in FAILED else ""))
                if status in FAILED:
                    failed.add((case.name, backend))
                if status == "error" and context_lost(device):
                    log("the CUDA context is lost (a kernel fault): stopping here")
                    return False
    results.complete = True
    results.write()
    return not any(r["status"] in FAILED for r in results.records)


def context_lost(device: torch.device) -> bool:
    """True when the device no longer runs anything (a sticky CUDA error)."""
    if device.type != "cuda":
        return False
    try:
        torch.ones(1, device=device).add_(1).item()
        return False
    except Exception:  # noqa: BLE001 - any failure here means the context is gone
        return True


def environment(device: torch.device, backends: List[str]) -> Dict[str, Any]:
    env = {"device": str(device), "torch": torch.__version__,
           "backends": visprune.available_backends(device), "checked_backends": backends}
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when torch sees a GPU, else cpu")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=None,
                   help="default: tiny small llava on cuda (in GPU_SCHEDULE's order), tiny on cpu")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                   help=f"default: {' '.join(DTYPES)} on cuda, {' '.join(CPU_DTYPES)} on cpu")
    p.add_argument("--pairs", help=argparse.SUPPRESS)       # shape:dtype,... (a --jobs worker)
    p.add_argument("--backends", nargs="+", default=None,
                   help="backends compared with the reference (default: every other one "
                        "available on the device)")
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these functions")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--json", help="write the records here (rewritten after every case)")
    p.add_argument("--plan", action="store_true",
                   help="list the cases and check that every op and method has one; no tensors")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cpu = args.device == "cpu"
    if args.pairs:
        args.schedule = [tuple(pair.split(":")) for pair in args.pairs.split(",")]
    elif not cpu and args.shapes is None and args.dtypes is None:
        args.schedule = list(GPU_SCHEDULE)
    else:
        args.schedule = [(s, d) for s in args.shapes or (["tiny"] if cpu else list(SHAPES))
                         for d in args.dtypes or (CPU_DTYPES if cpu else DTYPES)]
    if args.backends is None:
        args.backends = [n for n, why in visprune.available_backends(args.device).items()
                         if why == "ok" and n != "reference"]
    unknown = set(args.only or ()) - set(functions())
    if unknown:
        p.error(f"unknown function(s) {sorted(unknown)}; choose from {functions()}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def merge(parts: List[str], into: Results) -> None:
    """The workers' records (as far as each got) into ``into``, which is then written."""
    into.records = [r for r in into.records if r["status"] == "uncovered"]
    into.skipped, into.complete = {}, True
    for path in parts:
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError):
            into.complete = False
            continue
        into.records += part["records"]
        into.skipped[path] = part["summary"]["skipped_after_failure"]
        into.complete &= part["summary"]["complete"]
    into.write()


def run_jobs(args, results: Results) -> bool:
    """The schedule round-robin over ``args.jobs`` workers (this script with ``--pairs``),
    merged into ``results`` every second and at the end."""
    work = tempfile.mkdtemp(prefix="visprune-correctness-")
    procs, parts = [], []
    for j in range(args.jobs):
        mine = args.schedule[j::args.jobs]
        if not mine:
            continue
        parts.append(os.path.join(work, f"part{j}.json"))
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--device", args.device,
             "--pairs", ",".join(f"{s}:{d}" for s, d in mine), "--json", parts[-1]]
            + (["--backends", *args.backends] if args.backends else [])
            + (["--only", *args.only] if args.only else [])))
    while any(proc.poll() is None for proc in procs):
        time.sleep(1.0)
        merge(parts, results)
    merge(parts, results)
    shutil.rmtree(work, ignore_errors=True)
    return all(proc.returncode == 0 for proc in procs)


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = [c for c in CASES if not args.only or c.name in args.only]
    if args.plan:
        print(f"{len(cases)} cases x (shape, dtype) {args.schedule}, backends {args.backends} "
              f"against the reference on {args.device}, {args.jobs} process(es)")
        for c in cases:
            print(f"  {c.name} [{c.variant}]" + ("" if c.takes_backend else " (no backend: "
                                                 "the device against float32 on the CPU)"))
        missing = uncovered()
        for name in missing:
            print(f"UNCOVERED: {name} has no case")
        return 1 if missing else 0
    device = torch.device(args.device)
    results = Results(args.json, environment(device, args.backends))
    if not args.pairs:              # a worker's parent reports what is uncovered, once
        for name in uncovered():
            results.add({"name": name, "status": "uncovered",
                         "detail": f"no case in {pathlib.Path(__file__).name}: add one"})
    t0 = time.perf_counter()
    if args.jobs > 1:
        ok = run_jobs(args, results) and not uncovered()
    else:
        ok = run(cases, args.schedule, args.backends, device, results,
                 log=lambda line: print(line, flush=True)) and not uncovered()
    s = results.summary()
    print(f"{s['ok']} ok, {s['mismatch']} mismatch, {s['error']} error, {s['unsupported']} "
          f"unsupported, {s['uncovered']} uncovered, {s['skipped_after_failure']} skipped after "
          f"a failure{'' if s['complete'] else ' (incomplete)'}, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
