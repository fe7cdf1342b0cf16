"""What the video methods share: the same-position cosine of frames and the padded result.

The video methods take ``video[B, T, P, D]`` (``T`` frames of ``P`` tokens each, the tokens of a
frame in raster order) and ``frames[B]`` (each video's real frame count: the frames past it are
padding, never read into a result).  They return the kept positions in the flattened ``T·P``
frame-major layout, so a row's positions are the same as its video's alone.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F

from .. import ops
from ..common import PruneResult

COS_EPS = 1e-8            # F.cosine_similarity's floor on each norm
# frame_cosine works through this many bytes of frames at a time: its temporaries stay in cache
# (one step of a D = 3584, 196-token frame is one frame) and the Python loop stays short for
# small frames.
CHUNK_BYTES = 1 << 21


def frame_step(frames: torch.Tensor) -> int:
    """Frames of ``frames[B, T, P, C]`` worked on at a time (at least one): about
    :data:`CHUNK_BYTES` of them."""
    B, _, P, C = frames.shape
    return max(1, CHUNK_BYTES // max(1, B * P * C * frames.element_size()))


def _unit(x: torch.Tensor, prenormalize: bool) -> torch.Tensor:
    """``x / max(||x||, 1e-8)`` per token, F.cosine_similarity's normalisation, in ``x``'s
    dtype; ``prenormalize``: ``F.normalize`` first."""
    if x.stride(-1) != 1:
        # the norms must reduce over a contiguous D, as on the originals' packed [N, D] tokens:
        # another memory order sums in another order and rounds differently
        x = x.contiguous()
    if prenormalize:
        x = F.normalize(x, p=2, dim=-1)
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(COS_EPS)


def frame_cosine(first: torch.Tensor, second: Optional[torch.Tensor] = None, *,
                 prenormalize: bool = False) -> torch.Tensor:
    """Cosine of the tokens at the same position in two frames, ``[B, F, P]`` in the input's dtype.

    ``second=None``: the adjacent frames of ``first[B, T, P, D]``,
    ``out[:, t-1] = cos(first[:, t], first[:, t-1])`` for ``t`` in ``1..T-1``.  Otherwise two runs
    of frames ``first``, ``second`` ``[B, F, P, D]``:
    ``out[:, f] = cos(first[:, f], second[:, f])``.
    ``prenormalize``: each token goes through ``F.normalize`` first (DyCoke's first comparison).

    The arithmetic is ``F.cosine_similarity``'s, which the originals call: each token divided by
    its norm (floored at 1e-8), the products summed over ``D``, every step rounded to the input's
    dtype, so the values, their ranks and their ties are bitwise the originals'.  The work goes a
    few frames at a time and each frame is normalised once, so the temporaries are a few frames
    (``F.cosine_similarity`` on whole videos makes three of the video's size).  This is the one
    place a fused kernel would replace.
    """
    B, T, P, _ = first.shape
    adjacent = second is None
    out = first.new_empty(B, max(T - 1, 0) if adjacent else T, P)
    if out.numel() == 0:
        return out
    step = frame_step(first)
    previous = None
    for s in range(0, T, step):
        u = _unit(first[:, s:s + step], prenormalize)
        n = u.shape[1]
        if not adjacent:
            out[:, s:s + n] = (u * _unit(second[:, s:s + n], prenormalize)).sum(-1)
            continue
        if previous is not None:
            out[:, s - 1] = (u[:, 0] * previous).sum(-1)
        if n > 1:
            out[:, s:s + n - 1] = (u[:, 1:] * u[:, :-1]).sum(-1)
        previous = u[:, -1]
    return out


def padded_result(video: torch.Tensor, index: torch.Tensor, lengths: List[int],
                  backend: Optional[str]) -> PruneResult:
    """``PruneResult`` of ``index[B, L]``: each row's kept positions in the flattened ``T·P``, in
    output order, -1 past ``lengths[b]``; the tokens past a row's length are zeros.

    One :func:`visprune.ops.gather_compact` serves every row: the padding slots point at distinct
    positions the row does not keep (a row keeps at most ``T·P >= L`` positions), so the index
    needs no check, and are zeroed after the gather."""
    B, T, P, D = video.shape
    N = T * P
    valid = index >= 0
    tokens, _ = ops.gather_compact(video.reshape(B, N, D), spare_filled(index, N), sort=False,
                                   backend=backend, validate=False)
    if min(lengths, default=0) < index.shape[1]:
        tokens.masked_fill_(~valid[..., None], 0)        # a fresh gather: no copy needed
    return PruneResult(tokens, index, torch.tensor(lengths, dtype=torch.long,
                                                   device=video.device))


def spare_filled(index: torch.Tensor, N: int) -> torch.Tensor:
    """``index[B, L]`` (positions in ``[0, N)``, unique per row, -1 past a row's length) with each
    -1 replaced by a distinct position the row does not hold, so the row is a valid unique index
    for the ops (a row holds at most ``N >= L`` positions)."""
    B = index.shape[0]
    valid = index >= 0
    used = torch.zeros(B, N + 1, dtype=torch.bool, device=index.device)
    used.scatter_(1, torch.where(valid, index, N), True)
    spare = used[:, :N].to(torch.uint8).sort(dim=-1, stable=True).indices
    pad_rank = ((~valid).long().cumsum(1) - 1).clamp(min=0)
    return torch.where(valid, index, spare.gather(1, pad_rank))
