"""Shared launch helpers and the constants the kernels agree on."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from visprune import common
from visprune.backends import interpreting  # noqa: F401  (re-exported for the launchers)

EPS = tl.constexpr(common.EPS)     # cos(a, b) = a·b / (max(|a|, EPS) · max(|b|, EPS)), as F.normalize

# Metric and objective codes: launchers pass them as constexprs, kernels compare with these.
COSINE, L2 = tl.constexpr(0), tl.constexpr(1)
MAXMIN, MAXSUM = tl.constexpr(0), tl.constexpr(1)
METRICS = {"cosine": COSINE.value, "l2": L2.value}
OBJECTIVES = {"maxmin": MAXMIN.value, "maxsum": MAXSUM.value}


def block(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    """Next power of two of ``n`` clamped to ``[lo, hi]`` (tl.dot needs dims >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def warps(block_elems: int) -> int:
    """Warps for a program that holds ``block_elems`` values per live tensor."""
    return max(1, min(16, block_elems // 512))


@triton.jit
def cosine(dot, inv_i, inv_j):
    """``cos(x_i, x_j)`` from ``x_i·x_j`` and the inverse norms.  The norms are multiplied first
    so that ``cos(i, j)`` and ``cos(j, i)`` are the same float: ``(dot·inv_i)·inv_j`` rounds by
    which token is the row, and then a mutual-nearest pair's exact tie breaks by that order."""
    return dot * (inv_i * inv_j)


@triton.jit
def clamp_distance(d):
    """Distances are >= 0: rounding can make them slightly negative; NaN counts as 0."""
    return tl.where(d > 0, d, 0.0)


@triton.jit
def segment(cu_ptr, b, N, IS_VARLEN: tl.constexpr):
    """Row ``b``'s first token ``bos`` in the ``[B·N]`` (or ``[T]``) per-token buffers and its
    length ``n``: ``(b·N, N)`` for a dense batch; for a packed one (``N`` = T) segment ``b`` of
    ``cu_seqlens``, clamped into ``[0, T]`` so that unvalidated offsets never lead outside x."""
    if IS_VARLEN:
        bos = tl.minimum(tl.maximum(tl.load(cu_ptr + b).to(tl.int64), 0), N)
        eos = tl.minimum(tl.maximum(tl.load(cu_ptr + b + 1).to(tl.int64), bos), N)
        n = eos - bos
    else:
        bos = b * N
        n = bos * 0 + N
    return bos, n


def on_device(launcher):
    """Run ``launcher`` with its first argument's CUDA device current.

    Triton launches on the current device and stream: tensors on ``cuda:1`` (a model split with
    ``device_map="auto"``) would otherwise be read by a kernel running on ``cuda:0``.  Every entry
    point of :mod:`visprune.triton_kernels` carries this guard; CPU tensors (the interpreter) pass
    through unchanged.
    """
    @functools.wraps(launcher)
    def guarded(x, *args, **kwargs):
        if x.device.type == "cuda":
            with torch.cuda.device(x.device):
                return launcher(x, *args, **kwargs)
        return launcher(x, *args, **kwargs)
    guarded.device_guarded = True
    return guarded


@triton.jit
def tile_dots(p_x, o_i, m_i, o_j, m_j, sx_n, sx_d, D, INTERPRETED: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` fp32 dot products of the rows ``o_i`` and ``o_j`` of ``p_x``
    (masked rows give 0), over ``D`` in ``BLOCK_D`` slices: true fp32 for fp32 tokens (TF32
    flips choices), the tensor cores for fp16/bf16."""
    o_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m_d = (d0 + o_d) < D
        b_a = tl.load(p_x + o_i[:, None] * sx_n + (d0 + o_d)[None, :] * sx_d,
                      mask=m_i[:, None] & m_d[None, :], other=0.0)
        b_b = tl.load(p_x + o_j[:, None] * sx_n + (d0 + o_d)[None, :] * sx_d,
                      mask=m_j[:, None] & m_d[None, :], other=0.0)
        if INTERPRETED:
            # The interpreter's tl.dot rounds by a row's place in the tile (a BLAS call): this sum
            # rounds every pair alike, as the GPU's matrix instructions do, so copies tie exactly.
            acc += tl.sum(b_a.to(tl.float32)[:, None, :] * b_b.to(tl.float32)[None, :, :], axis=2)
        else:
            acc = tl.dot(b_a, tl.trans(b_b), acc, input_precision="ieee")
    return acc
