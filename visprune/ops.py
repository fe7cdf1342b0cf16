"""Public functional ops: argument checks and backend dispatch, nothing else.

Shapes: ``B`` batch, ``N`` visual tokens, ``M`` text tokens, ``D`` hidden size, ``k`` kept tokens.
Inputs may be fp32, fp16 or bf16, contiguous or not; they are never modified.  Every backend
(``None`` = the fastest available, ``"reference"``, ``"triton"``, ``"cuda"``, ``"cpu"``) returns
the same indices; see :mod:`visprune.reference` for the exact math.
"""
from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import numpy as np
import torch

from .backends import checked_name, module
from .reference import PruneResult, stage1_count

__all__ = ["mi_scores", "greedy_select", "gather_compact", "prune", "PruneResult"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _reads_values(backend: str) -> bool:
    """Whether to run the checks that read tensor values (mask counts, index ranges).

    They break a torch.compile graph, and the compiled extension ("cpu", "cuda") repeats them in
    its kernels, so they are skipped only while compiling for it; every other backend runs them.
    """
    return not (backend in ("cpu", "cuda") and torch.compiler.is_compiling())


# --------------------------------------------------------------------------- argument checks
def _tensor(name: str, t, ndim: int, layout: str, dtypes=_FLOATS) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    return t


def _same_device(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; "
                         f"they must be on the same device")


def _bool_mask(name: str, mask, ref_name: str, ref: torch.Tensor, shape: Tuple[int, int],
               layout: str) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    _tensor(name, mask, 2, layout, dtypes=(torch.bool,))
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} must have shape {layout} = {shape}, got {tuple(mask.shape)}")
    _same_device(ref_name, ref, name, mask)
    return mask


def _choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _int(name: str, value) -> int:
    """``value`` as a Python int (NumPy and 0-d integer tensors included, bool excluded)."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")


def _count(name: str, value) -> int:
    value = _int(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _candidates(mask: Optional[torch.Tensor], n: int, values: bool) -> int:
    """The smallest number of candidate tokens in any row (``n`` when not reading values)."""
    if mask is None or mask.shape[0] == 0 or not values:
        return n
    return int(mask.sum(-1).min())


def _check_select(x, k, objective, metric, mask, start, values, xname="x"):
    B, N, _ = x.shape
    _choice("objective", objective, ("maxmin", "maxsum"))
    _choice("metric", metric, ("cosine", "l2"))
    mask = _bool_mask("mask", mask, xname, x, (B, N), "[B, N]")
    k = _count("k", k)
    avail = _candidates(mask, N, values)
    if k > avail:
        raise ValueError(f"k={k} is larger than the number of candidate tokens "
                         f"({avail}{' in the sparsest mask row' if mask is not None else ''})")
    if not (isinstance(start, str) and start == "auto"):
        try:
            start = _int("start", start)
        except TypeError:
            raise ValueError(f"start must be 'auto' or an int index in [0, {N}), "
                             f"got {start!r}") from None
        if not 0 <= start < N:
            raise ValueError(f"start={start} is out of range for N={N}")
        if mask is not None and k > 0 and values and not bool(mask[:, start].all()):
            raise ValueError(f"start={start} is not a candidate (mask is False there) in every row")
    return k, mask, start


def _check_text(visual, text, text_mask, metric, values, metric_name=None):
    _tensor("text", text, 3, "[B, M, D]")
    B, N, D = visual.shape
    if text.shape[0] != B or text.shape[2] != D:
        raise ValueError(f"text must have shape [B, M, D] = [{B}, M, {D}] to match visual, "
                         f"got {tuple(text.shape)}")
    if text.shape[1] == 0:
        raise ValueError("text must have at least one token (M >= 1), got M=0")
    _same_device("visual", visual, "text", text)
    if text.dtype != visual.dtype:
        raise TypeError(f"text has dtype {text.dtype} but visual has {visual.dtype}; "
                        f"they must have the same dtype")
    _choice("metric" if metric_name is None else metric_name, metric, ("l2", "cosine"))
    text_mask = _bool_mask("text_mask", text_mask, "visual", visual, (B, text.shape[1]), "[B, M]")
    if text_mask is not None and B > 0 and values:
        empty = (~text_mask.any(-1)).nonzero().flatten()
        if len(empty):
            raise ValueError(f"text_mask has no True entry in row(s) {empty.tolist()}: "
                             f"every row needs at least one text token")
    return text_mask


# --------------------------------------------------------------------------- ops
def mi_scores(visual: torch.Tensor, text: torch.Tensor, *, text_mask: Optional[torch.Tensor] = None,
              metric: str = "l2", backend: Optional[str] = None) -> torch.Tensor:
    """Text–visual alignment score of each visual token: ``float32[B, N]``, higher = better aligned.

    Args:
        visual: ``[B, N, D]`` visual tokens.
        text: ``[B, M, D]`` text tokens (same ``B`` and ``D``).
        text_mask: optional ``bool[B, M]``, True = real text token; every row needs at least one.
        metric: ``"l2"``: ``-(1/M_b) Σ_j ||v_i - t_j||²``; ``"cosine"``: ``(1/M_b) Σ_j cos(v_i, t_j)``.
        backend: see the module docstring.
    """
    _tensor("visual", visual, 3, "[B, N, D]")
    name = checked_name(backend, visual.device)
    text_mask = _check_text(visual, text, text_mask, metric, _reads_values(name))
    return module(name).mi_scores(visual, text, text_mask, metric)


def greedy_select(x: torch.Tensor, k: int, *, objective: str = "maxmin", metric: str = "cosine",
                  mask: Optional[torch.Tensor] = None, start: Union[str, int] = "auto",
                  backend: Optional[str] = None) -> torch.Tensor:
    """Incremental greedy diverse subset selection: ``int64[B, k]`` indices in selection order.

    Args:
        x: ``[B, N, D]`` tokens.
        k: how many to select (``0 <= k <=`` candidates per row).
        objective: ``"maxmin"`` (farthest point, DivPrune) or ``"maxsum"`` (TrimTokenator stage 2).
        metric: distance ``"cosine"`` (``1 - cos``) or ``"l2"`` (squared Euclidean).
        mask: optional ``bool[B, N]``: only True tokens are candidates.
        start: ``"auto"`` (maxmin: the most isolated token; maxsum: the largest distance sum) or an
            int index used for every row.
        backend: see the module docstring.
    """
    _tensor("x", x, 3, "[B, N, D]")
    name = checked_name(backend, x.device)
    k, mask, start = _check_select(x, k, objective, metric, mask, start, _reads_values(name))
    return module(name).greedy_select(x, k, objective, metric, mask, start)


def gather_compact(x: torch.Tensor, index: Optional[torch.Tensor] = None, *,
                   mask: Optional[torch.Tensor] = None, sort: bool = True,
                   backend: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gather the surviving rows into a contiguous ``(tokens[B, K, D], indices[B, K] int64)``.

    Exactly one of ``index[B, K]`` (integer positions, unique per row) or ``mask[B, N]`` (bool,
    the same number of True per row) is given.  With ``sort=True`` the kept rows keep their
    original order; the mask form is always in original order.
    """
    _tensor("x", x, 3, "[B, N, D]", dtypes=None)
    B, N, _ = x.shape
    if (index is None) == (mask is None):
        raise ValueError("gather_compact needs exactly one of index or mask")
    if not isinstance(sort, bool):
        raise TypeError(f"sort must be a bool, got {type(sort).__name__}")
    name = checked_name(backend, x.device)
    values = _reads_values(name)
    if mask is not None:
        _bool_mask("mask", mask, "x", x, (B, N), "[B, N]")
        counts = mask.sum(-1)
        if B > 0 and values and bool((counts != counts[0]).any()):
            raise ValueError(f"mask rows keep different counts {counts.tolist()}; "
                             f"every row must keep the same number of tokens")
    else:
        if not isinstance(index, torch.Tensor) or index.dim() != 2 or index.dtype.is_floating_point \
                or index.dtype.is_complex or index.dtype == torch.bool:
            got = (f"{index.dtype} tensor of shape {tuple(index.shape)}"
                   if isinstance(index, torch.Tensor) else type(index).__name__)
            raise TypeError(f"index must be an integer tensor of shape [B, K], got {got}")
        if index.shape[0] != B:
            raise ValueError(f"index must have shape [B, K] with B={B}, got {tuple(index.shape)}")
        _same_device("x", x, "index", index)
        if index.numel() and values:
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= N:
                raise ValueError(f"index has values in [{lo}, {hi}], expected [0, {N})")
            srt = index.sort(-1).values
            if bool((srt[:, 1:] == srt[:, :-1]).any()):
                raise ValueError("index has duplicate entries within a row")
    return module(name).gather_compact(x, index, mask, sort)


def prune(visual: torch.Tensor, text: torch.Tensor, keep: int, *,
          stage1_keep: Union[int, float] = 0.8, text_mask: Optional[torch.Tensor] = None,
          mask: Optional[torch.Tensor] = None, mi_metric: str = "l2", objective: str = "maxsum",
          metric: str = "cosine", backend: Optional[str] = None) -> PruneResult:
    """The fused TrimTokenator pipeline: ``PruneResult(tokens[B, keep, D], indices, lengths)``.

    Stage 1 keeps the ``stage1_keep`` visual tokens (int count, or float fraction of N rounded
    half up) with the highest :func:`mi_scores`; stage 2 runs :func:`greedy_select` on those
    survivors; the ``keep`` chosen tokens are returned in original order (ascending ``indices``).
    ``mask[B, N]`` restricts both stages to its True tokens; a fraction stays a fraction of N, so
    with a mask it must not exceed the candidates of the sparsest row.
    """
    _tensor("visual", visual, 3, "[B, N, D]")
    name = checked_name(backend, visual.device)
    values = _reads_values(name)
    text_mask = _check_text(visual, text, text_mask, mi_metric, values, "mi_metric")
    B, N, _ = visual.shape
    keep = _count("keep", keep)
    if isinstance(stage1_keep, (float, np.floating)):
        stage1_keep = float(stage1_keep)
        if not 0.0 < stage1_keep <= 1.0:
            raise ValueError(f"stage1_keep as a fraction must be in (0, 1], got {stage1_keep}")
    else:
        try:
            stage1_keep = _int("stage1_keep", stage1_keep)
        except TypeError:
            raise TypeError(f"stage1_keep must be an int count or a float fraction, "
                            f"got {type(stage1_keep).__name__}") from None
    n1 = stage1_count(N, stage1_keep)
    _, mask, _ = _check_select(visual, 0, objective, metric, mask, "auto", values, xname="visual")
    avail = _candidates(mask, N, values)
    if not keep <= n1 <= avail:
        raise ValueError(f"need keep <= stage1_keep <= {'candidates' if mask is not None else 'N'}, "
                         f"got keep={keep}, stage1_keep={stage1_keep} ({n1} tokens), "
                         f"{'candidates' if mask is not None else 'N'}={avail}")
    return module(name).prune(visual, text, keep, n1, text_mask, mask, mi_metric, objective, metric)
