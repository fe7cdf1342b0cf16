"""Argument checks: the one place where visprune validates what a caller passes.

Every public entry point (:mod:`visprune.ops`, :mod:`visprune.methods`, the integrations) checks
its arguments here before any work.  Two kinds of check:

* structural ones (type, shape, dtype, device, option names, Python ints) read no tensor data and
  always run;
* value checks (mask counts, index ranges, duplicate indices) read tensor data, i.e. make the host
  wait for the device.  They run by default; ``validate=False`` on an op skips them for a
  sync-free call (CUDA-graph capture, a hot loop on indices visprune itself produced), and they
  are skipped while ``torch.compile`` traces an opaque op ("triton", "cpu", "cuda" backends),
  where they would break the graph.  The kernels stay memory-safe without them.

A failed check raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong shape or value)
whose message names the argument, what was received and what was expected.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from .common import START_CODES

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# gather_compact copies rows of any of these; complex and float8 are refused (not every
# backend can gather them, and nothing in visprune produces them).
GATHER_DTYPES = FLOATS + (torch.float64, torch.int8, torch.int16, torch.int32, torch.int64,
                          torch.uint8, torch.bool)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def tensor(name: str, t, ndim: int, layout: str, dtypes=FLOATS) -> torch.Tensor:
    """``t`` is a tensor with ``ndim`` dims (``layout`` names them) and one of ``dtypes``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {dtype_names(dtypes)}, got {t.dtype}")
    return t


def same_device(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         f"they must be on the same device")


def matching(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, layout: str,
             dims: int) -> None:
    """``t`` agrees with ``ref`` on the first ``dims`` dimensions and lives on the same device."""
    want = tuple(ref.shape[:dims])
    if tuple(t.shape[:dims]) != want:
        raise ValueError(f"{name} must have shape {layout} with {'×'.join(map(str, want))} "
                         f"leading dims matching {ref_name}, got {tuple(t.shape)}")
    same_device(ref_name, ref, name, t)


def cls_qk(q, k) -> None:
    """``q``, ``k``: a vision layer's ``q_proj`` / ``k_proj`` outputs ``[B, N+1, C]`` (CLS
    first), of one shape, device and dtype."""
    tensor("q", q, 3, "[B, N+1, C]")
    tensor("k", k, 3, "[B, N+1, C]")
    if q.shape != k.shape:
        raise ValueError(f"k must have the shape of q [B, N+1, C] = {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    matching("k", k, "q", q, "[B, N+1, C]", 3)


def bool_mask(name: str, mask, ref_name: str, ref: torch.Tensor, shape: Tuple[int, int],
              layout: str) -> Optional[torch.Tensor]:
    """``None`` or a ``bool`` tensor of ``shape`` on ``ref``'s device."""
    if mask is None:
        return None
    tensor(name, mask, 2, layout, dtypes=(torch.bool,))
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(mask.shape)}")
    same_device(ref_name, ref, name, mask)
    return mask


def choice(name: str, value, options) -> None:
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def integer(name: str, value) -> int:
    """``value`` as a Python int: an int, a NumPy integer, or a 0-d integer tensor.

    Bools (Python, NumPy or tensor), floats and tensors with dims are refused: ``k=True`` or
    ``k=torch.tensor([3])`` is far more likely a mistake than a count.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.dtype.is_floating_point \
                or value.dtype.is_complex:
            raise TypeError(f"{name} must be an int, got a {value.dtype} tensor of shape "
                            f"{tuple(value.shape)}")
        return int(value)
    if not isinstance(value, (bool, np.bool_)):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def count(name: str, value) -> int:
    """A non-negative :func:`integer`."""
    value = integer(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def keep(name: str, value, unit: str = "unit"):
    """A per-unit budget: an :func:`integer` ``>= 1`` (tokens kept of each ``unit``), or a float
    (Python or NumPy) in ``(0, 1]`` (a fraction of each one's tokens), returned as a Python int
    or float."""
    if isinstance(value, (float, np.floating)):
        if not 0.0 < float(value) <= 1.0:
            raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1], got {value!r}")
        return float(value)
    try:
        value = integer(name, value)
    except TypeError:
        raise TypeError(f"{name} must be an int (tokens kept per {unit}) or a float in (0, 1] "
                        f"(a fraction of each one's tokens), got {value!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1 or a float in (0, 1], got {value!r}")
    return value


def fraction_or_count(name: str, value):
    """An int count, or a float fraction in ``(0, 1]`` (returned as a Python float)."""
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{name} as a fraction must be in (0, 1], got {value}")
        return value
    try:
        return integer(name, value)
    except TypeError:
        raise TypeError(f"{name} must be an int count or a float fraction, "
                        f"got {type(value).__name__}") from None


def bounded(name: str, value, lo: float, hi: float, *, hi_open: bool = False) -> float:
    """A real number (Python or NumPy int or float, not a bool) in ``[lo, hi]`` (``[lo, hi)``
    with ``hi_open``), returned as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    inside = lo <= value < hi if hi_open else lo <= value <= hi
    if not inside:
        raise ValueError(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}, got {value}")
    return value


def video(name: str, t, frames) -> list:
    """``t``: frames of visual tokens ``[B, T, P, D]`` (fp32, fp16, bf16 or float64; ``P >= 1``
    tokens per frame, ``D >= 1`` channels).  ``frames``: ``None`` (every video has ``T``
    frames) or each video's frame count, a sequence or 1-D integer tensor (any device: read
    once) of ``B`` ints in ``[1, T]``; the frames past a video's count are padding.  Returns the
    counts as a list of Python ints."""
    tensor(name, t, 4, "[B, T, P, D]", dtypes=FLOATS + (torch.float64,))
    B, T, P, D = t.shape
    if P == 0 or D == 0:
        raise ValueError(f"{name} must have P >= 1 tokens per frame and D >= 1 channels, got "
                         f"shape {tuple(t.shape)}")
    counts = [T] * B if frames is None else per_segment("frames", frames, B, "video")
    bad = [(b, c) for b, c in enumerate(counts) if not 1 <= c <= T]
    if bad:
        b, c = bad[0]
        raise ValueError(f"frames must be in [1, T] = [1, {T}] for every video (each video needs "
                         f"a frame; {name} holds T={T}), got frames[{b}]={c}")
    return counts


# --------------------------------------------------------------------------- the ops' checks
def read(*values: torch.Tensor) -> list:
    """Scalars computed on the device, read back with one sync."""
    return torch.stack([v.reshape(()).to(torch.long) for v in values]).tolist()


def selection(x, k, objective, metric, mask, start, xname="x", kname="k"):
    """Structural checks of greedy selection; returns ``(k, mask, start)``, start as an int
    index or a code of :data:`visprune.common.START_CODES`."""
    B, N, _ = x.shape
    choice("objective", objective, ("maxmin", "maxsum"))
    choice("metric", metric, ("cosine", "l2"))
    mask = bool_mask("mask", mask, xname, x, (B, N), "[B, N]")
    k = count(kname, k)
    if k > N:
        raise ValueError(f"{kname}={k} is larger than the number of candidate tokens (N={N})")
    if isinstance(start, str) and start in START_CODES:
        return k, mask, START_CODES[start]
    try:
        start = integer("start", start)
    except TypeError:
        raise ValueError(f"start must be 'auto', 'linear' or an int index in [0, {N}), "
                         f"got {start!r}") from None
    if not 0 <= start < N:
        raise ValueError(f"start={start} is out of range for N={N}")
    return k, mask, start


def candidates(mask, k, start, what=None, extra=()):
    """Value checks of greedy selection (plus ``extra`` ``(flag tensor, message)`` pairs), one
    sync; ``what`` names the count in the message (default ``k=...``)."""
    tests = list(extra)
    if mask is not None and mask.shape[0] and k > 0:
        tests.append((mask.sum(-1).min() < k, None))
        if start >= 0:
            tests.append((~mask[:, start].all(), f"start={start} is not a candidate (mask is False "
                                                 f"there) in every row"))
    if not tests:
        return
    for (failed, message), bad in zip(tests, read(*(t for t, _ in tests))):
        if bad and message is None:
            fewest = int(mask.sum(-1).min())
            raise ValueError(f"{what or f'k={k}'} is larger than the number of candidate tokens "
                             f"({fewest} in the sparsest mask row)")
        if bad:
            raise ValueError(message() if callable(message) else message)


def text_args(visual, text, text_mask, metric, metric_name="metric"):
    """Structural checks of the text arguments; returns ``(text_mask, value check or None)``."""
    tensor("text", text, 3, "[B, M, D]")
    B, N, D = visual.shape
    if text.shape[0] != B or text.shape[2] != D:
        raise ValueError(f"text must have shape [B, M, D] = [{B}, M, {D}] to match visual, "
                         f"got {tuple(text.shape)}")
    if text.shape[1] == 0:
        raise ValueError("text must have at least one token (M >= 1), got M=0")
    same_device("visual", visual, "text", text)
    if text.dtype != visual.dtype:
        raise TypeError(f"text has dtype {text.dtype} but visual has {visual.dtype}; "
                        f"they must have the same dtype")
    choice(metric_name, metric, ("l2", "cosine"))
    text_mask = bool_mask("text_mask", text_mask, "visual", visual, (B, text.shape[1]), "[B, M]")
    if text_mask is None or B == 0:
        return text_mask, None

    def message():
        empty = (~text_mask.any(-1)).nonzero().flatten().tolist()
        return f"text_mask has no True entry in row(s) {empty}: every row needs a text token"
    return text_mask, ((~text_mask.any(-1)).any(), message)


def gather_args(x, index, mask, sort, values: bool) -> None:
    """``gather_compact``'s checks (``x`` already checked); value checks when ``values``."""
    B, N, _ = x.shape
    if (index is None) == (mask is None):
        raise ValueError("gather_compact needs exactly one of index or mask")
    flag("sort", sort)
    if mask is not None:
        bool_mask("mask", mask, "x", x, (B, N), "[B, N]")
        if B > 0 and values:
            counts = mask.sum(-1)
            if read((counts != counts[0]).any())[0]:
                raise ValueError(f"mask rows keep different counts {counts.tolist()}; "
                                 f"every row must keep the same number of tokens")
        return
    if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.dtype not in INDEX_DTYPES:
        got = (f"{index.dtype} tensor of shape {tuple(index.shape)}"
               if isinstance(index, torch.Tensor) else type(index).__name__)
        raise TypeError(f"index must be an integer tensor of shape [B, K] and dtype "
                        f"{dtype_names(INDEX_DTYPES)}, got {got}")
    if index.shape[0] != B:
        raise ValueError(f"index must have shape [B, K] with B={B}, got {tuple(index.shape)}")
    same_device("x", x, "index", index)
    if values:
        row_indices("index", index, N)


def row_indices(name: str, index: torch.Tensor, N: int) -> None:
    """Value check (one sync): the entries of ``index[B, K]`` lie in ``[0, N)``, none repeated
    within a row."""
    if index.numel() == 0:
        return
    srt = index.sort(-1).values
    lo, hi, dup = read(srt[:, 0].min(), srt[:, -1].max(), (srt[:, 1:] == srt[:, :-1]).any())
    if lo < 0 or hi >= N:
        raise ValueError(f"{name} has values in [{lo}, {hi}], expected [0, {N})")
    if dup:
        raise ValueError(f"{name} has duplicate entries within a row")


QUERY_MODES = ("after", "span", "last")


def attention_args(q, k, start, length, queries, heads, key_mask, scale, values: bool):
    """``received_attention``'s checks (``q`` already checked as ``[B, H, L, dh]``); returns
    ``(start int64[B], length, queries, key_mask, scale)``, the start and the scale filled in.
    The range of a start tensor is a value check, run when ``values``."""
    B, H, L, dh = q.shape
    tensor("k", k, 4, "[B, Hkv, Lk, dh]")
    same_device("q", q, "k", k)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; they must have the same dtype")
    _, Hkv, Lk, dk = k.shape
    if k.shape[0] != B or dk != dh:
        raise ValueError(f"k must have shape [B, Hkv, Lk, dh] with B={B} and dh={dh} to match q, "
                         f"got {tuple(k.shape)}")
    if dh == 0:
        raise ValueError(f"q must have dh >= 1, got shape {tuple(q.shape)}")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"k's head count Hkv={Hkv} must divide q's H={H} (H % Hkv == 0)")
    if Lk < L:
        raise ValueError(f"k must have at least as many positions as q (Lk >= L), got Lk={Lk}, "
                         f"L={L}")
    length = count("length", length)
    if length > Lk:
        raise ValueError(f"length={length} is larger than the key positions (Lk={Lk})")
    if isinstance(start, torch.Tensor) and start.dim() > 0:
        if start.dtype not in INDEX_DTYPES:
            raise TypeError(f"start must be an int or an integer tensor of shape [B], got dtype "
                            f"{start.dtype}")
        if tuple(start.shape) != (B,):
            raise ValueError(f"start must be an int or a tensor of shape [B] = ({B},), got shape "
                             f"{tuple(start.shape)}")
        same_device("q", q, "start", start)
        start = start.long()
        if values and B > 0:
            lo, hi = read(start.min(), start.max())
            if lo < 0 or hi + length > Lk:
                raise ValueError(f"start has values in [{lo}, {hi}]; with length={length} the "
                                 f"span needs 0 <= start and start + length <= Lk={Lk}")
    else:
        value = integer("start", start)
        if not (0 <= value and value + length <= Lk):
            raise ValueError(f"start={value} with length={length} is out of range: the span "
                             f"needs 0 <= start and start + length <= Lk={Lk}")
        start = torch.full((B,), value, dtype=torch.long, device=q.device)
    if isinstance(queries, torch.Tensor):
        bool_mask("queries", queries, "q", q, (B, L), "[B, L]")
    elif not isinstance(queries, str) or queries not in QUERY_MODES:
        raise ValueError(f"queries must be one of {QUERY_MODES} or a bool tensor of shape "
                         f"[B, L] = {(B, L)}, got {queries!r}")
    choice("heads", heads, ("max", "mean"))
    key_mask = bool_mask("key_mask", key_mask, "q", q, (B, Lk), "[B, Lk]")
    if scale is None:
        scale = dh ** -0.5
    elif isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.integer,
                                                                     np.floating)):
        raise TypeError(f"scale must be a positive float or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return start, length, queries, key_mask, float(scale)


# --------------------------------------------------------------------------- varlen (ragged) batches
CU_DTYPES = (torch.int32, torch.int64)


def cu_seqlens(x: torch.Tensor, cu, xname: str = "x") -> int:
    """``cu``: an int32 / int64 tensor ``[B+1]`` on ``x``'s device (its values are
    :func:`varlen_values`' to check); returns ``B``."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor of shape [B+1], "
                        f"got {type(cu).__name__}")
    if cu.dtype not in CU_DTYPES:
        raise TypeError(f"cu_seqlens must have dtype {dtype_names(CU_DTYPES)}, got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() == 0:
        raise ValueError(f"cu_seqlens must have shape [B+1] (at least one entry, cu_seqlens[0] "
                         f"= 0), got shape {tuple(cu.shape)}")
    same_device(xname, x, "cu_seqlens", cu)
    return cu.numel() - 1


def per_segment(name: str, value, B: int, unit: str = "segment") -> list:
    """A count per segment (or other ``unit``) as a list of ``B`` Python ints: one :func:`count`
    for every one, or a sequence (list, tuple, NumPy array) or 1-D integer tensor (any device:
    read once) of ``B`` counts."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{name} must be an int or a per-{unit} sequence of ints, got a "
                            f"{value.dtype} tensor")
        values = [int(v) for v in value.tolist()]
    elif isinstance(value, (list, tuple, np.ndarray)):
        values = [integer(f"{name}[{i}]", v) for i, v in enumerate(value)]
    else:
        return [count(name, value)] * B
    if len(values) != B:
        raise ValueError(f"{name} must have one count per {unit} (B={B}), got {len(values)}")
    bad = [v for v in values if v < 0]
    if bad:
        raise ValueError(f"{name} must be >= 0 in every {unit}, got {bad[0]}")
    return values


def mask1d(name: str, mask, ref_name: str, ref: torch.Tensor) -> Optional[torch.Tensor]:
    """``None`` or a ``bool[T]`` tensor (``T`` = rows of ``ref``) on ``ref``'s device."""
    if mask is None:
        return None
    tensor(name, mask, 1, "[T]", dtypes=(torch.bool,))
    if mask.shape[0] != ref.shape[0]:
        raise ValueError(f"{name} must have shape [T] = ({ref.shape[0]},), got {tuple(mask.shape)}")
    same_device(ref_name, ref, name, mask)
    return mask


def varlen_selection(x, cu, k, objective, metric, mask, start, xname="x", kname="k"):
    """Structural checks of a varlen selection; returns ``(B, k list, mask, start)``, start as
    in :func:`selection`."""
    B = cu_seqlens(x, cu, xname)
    choice("objective", objective, ("maxmin", "maxsum"))
    choice("metric", metric, ("cosine", "l2"))
    mask = mask1d("mask", mask, xname, x)
    k = per_segment(kname, k, B)
    if isinstance(start, str) and start in START_CODES:
        return B, k, mask, START_CODES[start]
    try:
        start = integer("start", start)
    except TypeError:
        raise ValueError(f"start must be 'auto', 'linear' or an int index local to each "
                         f"segment, got {start!r}") from None
    if start < 0:
        raise ValueError(f"start={start} must be >= 0 (an index local to each segment)")
    return B, k, mask, start


def varlen_stage1(keep: list, stage1_keep, B: int):
    """``prune_varlen``'s ``stage1_keep``: an int count, a float fraction (both for every
    segment) or a list of ``B`` counts, each at least that segment's ``keep`` (a fraction's
    counts are checked with the values, :func:`varlen_values`)."""
    if isinstance(stage1_keep, (list, tuple, np.ndarray)) or (
            isinstance(stage1_keep, torch.Tensor) and stage1_keep.dim() == 1):
        stage1 = per_segment("stage1_keep", stage1_keep, B)
    else:
        stage1 = fraction_or_count("stage1_keep", stage1_keep)
    if not isinstance(stage1, float):
        for b in range(B):
            s1 = stage1[b] if isinstance(stage1, list) else stage1
            if keep[b] > s1:
                raise ValueError(f"need keep <= stage1_keep in every segment, got keep="
                                 f"{keep[b]}, stage1_keep={s1} in segment {b}")
    return stage1


def varlen_values(T: int, cu: torch.Tensor, need=None, need_name: str = "k", mask=None,
                  start: int = -1, picks=None, index=None, at_least=None) -> None:
    """The value checks of a varlen op, with one host read: ``cu`` (0 first, non-decreasing,
    ``T`` last); ``need[b]`` (int64 tensor or list) within segment ``b``'s length and, with
    ``mask``, its candidates, and at least ``at_least[b]``, in every segment with ``picks[b] > 0``
    (all when ``picks`` is None); an int ``start`` inside, and a candidate of, those segments; an ``index`` in range, without repeats,
    grouped by segment in order."""
    dev = cu.device
    B = cu.numel() - 1
    cu = cu.long()
    parts = [cu]
    if need is not None:
        need = torch.as_tensor(need, dtype=torch.long, device=dev).reshape(B)
        parts.append(need)
        if mask is not None:
            prefix = torch.cat([mask.new_zeros(1, dtype=torch.long), mask.long().cumsum(0)])
            parts.append(prefix[cu.clamp(0, T)])
    if start >= 0 and mask is not None and T > 0:
        parts.append(mask[(cu[:-1] + start).clamp(0, T - 1)].long())
    if index is not None and index.numel():
        idx = index.long()
        srt = idx.sort().values
        seg = torch.searchsorted(cu[1:].contiguous(), idx.contiguous(), right=True)
        parts.append(torch.stack([srt[0], srt[-1], (srt[1:] == srt[:-1]).any().long(),
                                  (seg[1:] < seg[:-1]).any().long()]))
    values = torch.cat(parts).tolist()
    c, values = values[:B + 1], values[B + 1:]
    if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"cu_seqlens must start at 0, never decrease and end at T={T}, got "
                         f"{c if len(c) <= 12 else c[:6] + ['...'] + c[-6:]}")
    n = [b - a for a, b in zip(c, c[1:])]
    if need is not None:
        want, values = values[:B], values[B:]
        for b in range(B):
            if picks is not None and picks[b] == 0:
                continue        # a segment that keeps nothing is not worked on
            if at_least is not None and want[b] < at_least[b]:
                raise ValueError(f"need keep <= stage1_keep in every segment: stage1_keep keeps "
                                 f"{want[b]} tokens of segment {b}, fewer than keep={at_least[b]}")
            if want[b] > n[b]:
                raise ValueError(f"{need_name}={want[b]} is larger than segment {b}'s length "
                                 f"({n[b]} tokens)")
        if mask is not None:
            pre, values = values[:B + 1], values[B + 1:]
            for b in range(B):
                if want[b] > pre[b + 1] - pre[b]:
                    raise ValueError(f"{need_name}={want[b]} is larger than the number of "
                                     f"candidate tokens in segment {b} "
                                     f"({pre[b + 1] - pre[b]} where mask is True)")
    if start >= 0:
        cand = values[:B] if mask is not None and T > 0 else None
        values = values[B:] if cand is not None else values
        for b in range(B):
            if picks[b] == 0:
                continue
            if start >= n[b]:
                raise ValueError(f"start={start} is out of range for segment {b} of length {n[b]}")
            if cand is not None and not cand[b]:
                raise ValueError(f"start={start} is not a candidate (mask is False there) in "
                                 f"segment {b}")
    if values:
        lo, hi, dup, ungrouped = values
        if lo < 0 or hi >= T:
            raise ValueError(f"index has values in [{lo}, {hi}], expected [0, {T})")
        if dup:
            raise ValueError("index has duplicate entries")
        if ungrouped:
            raise ValueError("index must list each segment's positions together, segments in "
                             "order (segment b's entries within [cu_seqlens[b], "
                             "cu_seqlens[b+1]), before segment b+1's)")


def varlen_gather_args(x, cu, index, mask, sort, values: bool) -> int:
    """``gather_compact_varlen``'s checks (``x`` already checked); returns ``B``."""
    B = cu_seqlens(x, cu)
    if (index is None) == (mask is None):
        raise ValueError("gather_compact_varlen needs exactly one of index or mask")
    flag("sort", sort)
    if mask is not None:
        mask1d("mask", mask, "x", x)
    else:
        if not isinstance(index, torch.Tensor) or index.dim() != 1 \
                or index.dtype not in INDEX_DTYPES:
            got = (f"{index.dtype} tensor of shape {tuple(index.shape)}"
                   if isinstance(index, torch.Tensor) else type(index).__name__)
            raise TypeError(f"index must be an integer tensor of shape [K] and dtype "
                            f"{dtype_names(INDEX_DTYPES)}, got {got}")
        same_device("x", x, "index", index)
    if values:
        varlen_values(x.shape[0], cu, index=index)
    return B


# --------------------------------------------------------------------------- video ops
def dpc_args(x, num_centers, k, mask, varlen_cu=None):
    """Structural checks of DPC-kNN (``x`` already checked, ``[B, N, D]`` or packed ``[T, D]``
    with ``varlen_cu``); returns ``(num_centers, k, mask)``: ``num_centers`` an int, or a list
    of one per segment."""
    if x.shape[-1] == 0:
        raise ValueError(f"x must have D >= 1 (distances are scaled by 1/sqrt(D)), got shape "
                         f"{tuple(x.shape)}")
    k = integer("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1 (the token itself is its first neighbour), got {k}")
    if varlen_cu is not None:
        B = cu_seqlens(x, varlen_cu)
        return per_segment("num_centers", num_centers, B), k, mask1d("mask", mask, "x", x)
    B, N, _ = x.shape
    num_centers = count("num_centers", num_centers)
    if num_centers > N:
        raise ValueError(f"num_centers={num_centers} is larger than the number of candidate "
                         f"tokens (N={N})")
    return num_centers, k, bool_mask("mask", mask, "x", x, (B, N), "[B, N]")


BLEND_RULES = ("clamp", "fixed")


def merge_args(x, centers, assign, metric, mask, weights, include_centers, blend, blend_rule,
               values: bool):
    """``cluster_merge``'s checks (``x`` already checked); value checks (centres in range and
    unique per row, slots in ``[-1, C)``, weights finite and >= 0) when ``values``.  Returns
    ``(mask, blend)``, the blend as a Python float or None."""
    B, N, _ = x.shape
    if not isinstance(centers, torch.Tensor) or centers.dim() != 2 \
            or centers.dtype not in INDEX_DTYPES:
        got = (f"{centers.dtype} tensor of shape {tuple(centers.shape)}"
               if isinstance(centers, torch.Tensor) else type(centers).__name__)
        raise TypeError(f"centers must be an integer tensor of shape [B, C] and dtype "
                        f"{dtype_names(INDEX_DTYPES)}, got {got}")
    if centers.shape[0] != B or centers.shape[1] > N:
        raise ValueError(f"centers must have shape [B, C] with B={B} and C <= N={N}, got "
                         f"{tuple(centers.shape)}")
    same_device("x", x, "centers", centers)
    C = centers.shape[1]
    choice("metric", metric, ("cosine", "l2"))
    mask = bool_mask("mask", mask, "x", x, (B, N), "[B, N]")
    flag("include_centers", include_centers)
    choice("blend_rule", blend_rule, BLEND_RULES)
    if blend is not None:
        if isinstance(blend, (bool, np.bool_)) or not isinstance(blend, (int, float, np.integer,
                                                                         np.floating)):
            raise TypeError(f"blend must be a float in [0, 1] or None, got {type(blend).__name__}")
        blend = float(blend)
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must be in [0, 1], got {blend}")
    tests = []
    if assign is not None:
        if not isinstance(assign, torch.Tensor) or assign.dtype not in INDEX_DTYPES:
            got = assign.dtype if isinstance(assign, torch.Tensor) else type(assign).__name__
            raise TypeError(f"assign must be an integer tensor of shape [B, N], got {got}")
        if tuple(assign.shape) != (B, N):
            raise ValueError(f"assign must have shape [B, N] = {(B, N)}, got "
                             f"{tuple(assign.shape)}")
        same_device("x", x, "assign", assign)
        if values and assign.numel():
            tests.append(((assign < -1).any() | (assign >= C).any(),
                          f"assign must hold centre slots in [-1, C={C}) (-1: not merged)"))
    if weights is not None:
        tensor("weights", weights, 2, "[B, N]")
        if tuple(weights.shape) != (B, N):
            raise ValueError(f"weights must have shape [B, N] = {(B, N)}, got "
                             f"{tuple(weights.shape)}")
        same_device("x", x, "weights", weights)
        if values and weights.numel():
            tests.append((~(torch.isfinite(weights) & (weights >= 0)).all(),
                          "weights must be finite and >= 0"))
    if values:
        row_indices("centers", centers, N)
        for bad, message in zip(read(*(t for t, _ in tests)) if tests else [], tests):
            if bad:
                raise ValueError(message[1])
    return mask, blend


def temporal_args(video, reference, fill) -> Optional[list]:
    """``temporal_similarity``'s checks (``video`` already checked); returns the reference
    frames as a list of ``T`` ints in ``[-1, T)`` (None: each frame's previous one)."""
    T = video.shape[1]
    if isinstance(fill, (bool, np.bool_)) or not isinstance(fill, (int, float, np.integer,
                                                                   np.floating)):
        raise TypeError(f"fill must be a float, got {type(fill).__name__}")
    if reference is None:
        return None
    if isinstance(reference, torch.Tensor) and reference.dim() == 1 \
            and reference.dtype in INDEX_DTYPES:
        ref = [int(v) for v in reference.tolist()]
    elif isinstance(reference, (list, tuple, np.ndarray)):
        ref = [integer(f"reference[{i}]", v) for i, v in enumerate(reference)]
    else:
        raise TypeError(f"reference must be a sequence of T ints (the frame each frame is "
                        f"compared with, -1 for none) or None, got {type(reference).__name__}")
    if len(ref) != T:
        raise ValueError(f"reference must have one entry per frame (T={T}), got {len(ref)}")
    bad = [v for v in ref if not -1 <= v < T]
    if bad:
        raise ValueError(f"reference must hold frames in [-1, T={T}) (-1: none), got {bad[0]}")
    return ref
