"""What is timed: the shape families, the ops with their cost models, the cases and their inputs."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import ops
from ..common import stage1_count

COMPILED = "reference_compiled"       # torch.compile of the reference, timed like a backend


# --------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Family:
    """A model's token geometry: ``N`` visual tokens of width ``D``, ``M`` text tokens."""

    N: int
    D: int
    M: int
    keeps: Tuple[int, ...]


FAMILIES: Dict[str, Family] = {
    "llava15": Family(N=576, D=4096, M=64, keeps=(64, 128, 192)),      # LLaVA-1.5-7B
    "llava_next": Family(N=2880, D=4096, M=64, keeps=(320,)),          # LLaVA-NeXT, 5 tiles
    "video": Family(N=16384, D=3584, M=64, keeps=(1024,)),             # Qwen2-VL-7B video
    "tiny": Family(N=64, D=32, M=8, keeps=(8,)),                       # smoke tests only
}
FULL_FAMILIES = ("llava15", "llava_next", "video")
QUICK_FAMILIES = ("llava15",)
BATCHES = (1, 8, 64)
QUICK_SMALL_D = 256      # --quick adds this width next to the model's: the CPU target at D <= 256


@dataclass(frozen=True)
class Shape:
    family: str
    B: int
    N: int
    D: int
    M: int
    k: int


def shape_grid(families: Optional[Sequence[str]] = None, batches: Optional[Sequence[int]] = None,
               quick: bool = False) -> List[Shape]:
    """The benchmark shapes: every family x batch x keep.  ``quick``: B=1, the first keep, the
    model width plus a ``D=256`` variant, and by default the LLaVA-1.5 family only."""
    families = families or (QUICK_FAMILIES if quick else FULL_FAMILIES)
    out = []
    for name in families:
        f = FAMILIES[name]
        widths = (f.D, QUICK_SMALL_D) if quick and f.D > QUICK_SMALL_D else (f.D,)
        for B in batches or ((1,) if quick else BATCHES):
            for D in widths:
                for k in f.keeps[:1] if quick else f.keeps:
                    out.append(Shape(name, B, f.N, D, f.M, k))
    return out


# --------------------------------------------------------------------------- ops
@dataclass(frozen=True)
class OpSpec:
    """How to call one op on a shape, and what it costs at least (for the roofline columns)."""

    fn: Callable
    dims: str                                           # the Shape fields the op depends on
    call: Callable[[Dict[str, torch.Tensor], Shape], Tuple[tuple, dict]]
    traffic: Callable[[Shape, int], int]                # bytes it must move at least
    flops: Callable[[Shape], int]                       # arithmetic of the DESIGN algorithm
    reference_scratch: Callable[[Shape], int]           # the reference's working memory, bytes


def _dist_scratch(B: int, N: int) -> int:
    # reference.greedy_select: the [B, N, N] fp32 distances, two fp32 temporaries, a bool pair mask.
    return B * N * N * (3 * 4 + 1) + N * N


def _stage1(s: Shape) -> int:
    """Stage-1 survivors of ``prune`` with its default ``stage1_keep``."""
    return stage1_count(s.N, inspect.signature(ops.prune).parameters["stage1_keep"].default)


OPS: Dict[str, OpSpec] = {
    "mi_scores": OpSpec(
        ops.mi_scores, "BNDM",
        lambda t, s: ((t["visual"], t["text"]), {}),
        lambda s, e: (s.B * s.N * s.D + s.B * s.M * s.D) * e + s.B * s.N * 4,
        # linear in a per-batch text summary: one dot product of width D per visual token
        lambda s: 2 * s.B * (s.N + s.M) * s.D,
        lambda s: 4 * s.B * (s.N + s.M) * s.D + 3 * 4 * s.B * s.N * s.M),
    "greedy_select:maxmin": OpSpec(
        ops.greedy_select, "BNDk",
        lambda t, s: ((t["visual"], s.k), {"objective": "maxmin", "metric": "cosine"}),
        lambda s, e: s.B * s.N * s.D * e + s.B * s.k * 8,
        # start="auto" needs every pair's distance: the full Gram matrix
        lambda s: 2 * s.B * s.N * s.N * s.D,
        lambda s: 4 * s.B * s.N * s.D + _dist_scratch(s.B, s.N)),
    "greedy_select:maxsum": OpSpec(
        ops.greedy_select, "BNDk",
        lambda t, s: ((t["visual"], s.k), {"objective": "maxsum", "metric": "cosine"}),
        lambda s, e: s.B * s.N * s.D * e + s.B * s.k * 8,
        # start from a summary vector, then one row of distances per step
        lambda s: 2 * s.B * (s.k + 1) * s.N * s.D,
        lambda s: 4 * s.B * s.N * s.D + _dist_scratch(s.B, s.N)),
    "gather_compact": OpSpec(
        ops.gather_compact, "BNDk",
        lambda t, s: ((t["visual"], t["index"]), {}),
        lambda s, e: 2 * s.B * s.k * s.D * e + 2 * s.B * s.k * 8,
        lambda s: 0,
        lambda s: s.B * s.k * 8 * 3),
    "prune": OpSpec(
        ops.prune, "BNDMk",
        lambda t, s: ((t["visual"], t["text"], s.k), {}),
        lambda s, e: (s.B * s.N * s.D + s.B * s.M * s.D + 2 * s.B * s.k * s.D) * e + s.B * s.k * 8,
        lambda s: 2 * s.B * (s.N + s.M) * s.D + 2 * s.B * (s.k + 1) * _stage1(s) * s.D,
        lambda s: 4 * s.B * (s.N + s.M) * s.D + 3 * 4 * s.B * s.N * s.M + _dist_scratch(s.B, s.N)),
}


def select_ops(names: Optional[Sequence[str]]) -> List[str]:
    """``names`` may be an op (``greedy_select``: every variant) or one variant (``greedy_select:maxsum``)."""
    if not names:
        return list(OPS)
    chosen = [op for op in OPS if op in names or op.split(":")[0] in names]
    unknown = [n for n in names if not any(n in (op, op.split(":")[0]) for op in OPS)]
    if unknown:
        known = sorted(set(OPS) | {op.split(":")[0] for op in OPS})
        raise ValueError(f"unknown op(s) {unknown}; choose from {known}")
    return chosen


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape

    @property
    def spec(self) -> OpSpec:
        return OPS[self.op]

    @property
    def shape_label(self) -> str:
        s = self.shape
        return f"{s.family} " + " ".join(f"{d}={getattr(s, d)}" for d in self.spec.dims)

    @property
    def label(self) -> str:
        return f"{self.op} {self.shape_label}"


def cases(op_names: Sequence[str], shapes: Sequence[Shape]) -> List[Case]:
    """Every op x shape; an op that does not depend on ``k`` (mi_scores) appears once per shape."""
    out, seen = [], set()
    for op in op_names:
        for shape in shapes:
            case = Case(op, shape)
            if case.label not in seen:
                seen.add(case.label)
                out.append(case)
    return out


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random tokens (standard normal) and a random set of ``k`` distinct positions per row."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, N, D, M, k = shape.B, shape.N, shape.D, shape.M, shape.k
    return {
        "visual": torch.randn(B, N, D, generator=g, device=device, dtype=dtype),
        "text": torch.randn(B, M, D, generator=g, device=device, dtype=dtype),
        "index": torch.rand(B, N, generator=g, device=device).argsort(-1)[:, :k].contiguous(),
    }


def input_bytes(shape: Shape, itemsize: int) -> int:
    """Bytes of a case's tensors: the tokens, a ``k``-row output, the index drawn from ``B x N`` floats."""
    s = shape
    return (s.B * s.N * s.D + s.B * s.M * s.D + s.B * s.k * s.D) * itemsize + s.B * s.N * 12
