"""HoliTom (Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models",
NeurIPS 2025; github cokeshao/HoliTom), the merging before the LLM (``holitom/llava_arch.py``,
the video branch of ``prepare_inputs_labels_for_multimodal``), batched.

The original runs on one video's pooled projector features ``[T, P, D]`` (LLaVA-OneVision /
LLaVA-Video: ``P = 196``) and the pooled last-layer SigLIP attention ``[T, P]`` (its patched
``siglip_encoder.py``: the attention map of the last layer, mean over heads and query rows, then
``get_2dPool`` like the features).  Its settings come from environment variables; the defaults
here are its code's (``RETAIN_RATIO=0.1``, ``T=0.8``, ``BETA=0.6``, ``D=0``, ``K=7``,
``MAX_WINDOW_SIZE=1024``, ``NO_BETA`` unset); its scripts run ``RETAIN_RATIO`` 0.10 to 0.25 with
``T=0.65`` at 0.10 and ``T=0.80`` otherwise.

1. ``s[t, p]`` = cosine of ``normalize(x[t, p])`` and ``normalize(x[t+1, p])``.
2. Windows (``select_static_windows``): a window ``[s, e]`` removes
   ``(e - s)·#{p : s[t, p] > τ for every t in [s, e)}`` tokens; an O(T²) dynamic programme splits
   the video into consecutive windows of at most ``max_window`` frames removing the most (a
   frame alone removes nothing; ties: the frame alone, then the shortest window).
3. The budget: ``r' = min(r / ((T·P - removed) / (T·P)), 1)``.
4. Per window of ``W > 1`` frames, the positions similar in every step are static: their mean
   over the window is one token each; ``round(S·r')`` of those ``S`` are DPC-kNN centres
   (``k = min(K, C)``), and every other one is merged into its nearest centre:
   ``β·centre + (1-β)·mean(members)`` (``beta=None``: the mean of the centre and its members,
   the original's ``NO_BETA=1``); a centre without members stays itself.
5. Per frame, of its ``L`` dynamic tokens (all ``P`` for a frame alone) ``n = ceil(L·r')`` are
   kept: ``round(n·(1-d))`` of highest attention, the other ``n - round(n·(1-d))`` are DPC-kNN
   centres of the rest, merged like step 4.
6. Output, window by window: the static tokens (ascending position), then frame by frame the
   attention tokens (ascending) and the centres (ascending).  That is the original's order with
   ``mm_newline_position != "grid"`` (LLaVA-OneVision); with ``"grid"`` (LLaVA-Video) the
   original reorders each frame's tokens by position (a window's static tokens with its first
   frame's) and inserts the model's ``image_newline`` after each row holding a token: a
   reordering of these tokens, left to the caller.

``indices``: each output token's position in the flattened ``T·P``; a merged token has its
centre's, a static token its window's first frame's (the original carries the same position
``p`` along).  ``lengths[b]``: the tokens of video ``b``.

Parity (tests/test_holitom.py against the transliteration in ``tests/holitom_originals.py``).
The windows, the budget arithmetic (Python's ``round`` and ``math.ceil`` on the same floats) and
the output order are the original's.  The similarities are computed in the input's dtype with
the original's arithmetic (:func:`~visprune.methods._video.frame_cosine`, bitwise
``F.cosine_similarity``); DPC-kNN and the merge run on :func:`visprune.ops.dpc_knn_varlen` and
:func:`visprune.ops.cluster_merge` in fp32 (the original's ``cdist(x.float())``), so centres can
differ from the original's only where rounding decides a near-tie.  Deviations:

* deterministic ties: where the original adds ``1e-6·rand`` to the densities, a density tie goes
  to the lower index (denser), a score tie to the lower index; attention ties go to the lower
  position (the original's ``topk`` leaves them to the implementation); a token equally near
  two centres joins the centre of higher score (the original: the lower position).  On
  continuous inputs with ``k >= 3`` neighbours the noise changes nothing (tested); with
  ``k = min(K, C) <= 2`` densities tie exactly (``k = 1``: every density is ``exp(0)``, so the
  original's one centre is the noise's pick and visprune's the group's first token; ``k = 2``:
  mutual nearest neighbours), and there the original's choice is random;
* the window means, merges and token arithmetic accumulate in fp32 (float64 for float64
  inputs' means), where the original rounds to the input's dtype at each step;
* ``d > 0`` crashes the original (``pos.masked_select(mask.unsqueeze(-1))`` broadcasts
  ``[W, L]`` against ``[W, L, 1]``); here the remaining tokens' positions are the intended ones.
  Its default ``d = 0`` gives the whole dynamic budget to attention.
* ``attention=None`` is accepted with ``d = 1`` (no attention is read).

Stage 2 (not provided).  With ``HOLITOM_k`` and ``HOLITOM_r`` set (its scripts: 18 and 0.5) the
original also merges inside the LLM (``holitom/modeling_qwen2.py``): at layer ``k`` the last
prompt token's attention (eager) keeps the top ``(1 - r)`` video tokens and folds each dropped
token into its most similar kept one by repeated ``(a + b) / 2`` (order-dependent, not a mean).
That needs visprune's in-LLM engine (:mod:`visprune.integrations.transformers.inllm`) to merge
hidden states rather than only drop them; it is outside this module.
"""
from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
import torch

from .. import checks, ops
from ..backends import checked_name
from ..common import PruneResult
from ._video import frame_cosine, spare_filled

__all__ = ["holitom", "holitom_windows"]

RETAIN_RATIO = 0.1      # RETAIN_RATIO
TAU = 0.8               # T
BETA = 0.6              # BETA
D_SHARE = 0.0           # D
K = 7                   # K
MAX_WINDOW = 1024       # MAX_WINDOW_SIZE


def _runs(static: torch.Tensor) -> torch.Tensor:
    """``int64[B, T, P]``: how many steps from frame ``t`` on are static at ``p``
    (``static[B, T-1, P]``; frame ``T-1`` has none)."""
    B, S, P = static.shape
    run = torch.zeros(B, S + 1, P, dtype=torch.long, device=static.device)
    for t in range(S - 1, -1, -1):
        run[:, t] = (run[:, t + 1] + 1) * static[:, t]
    return run


def _removed(run: torch.Tensor) -> torch.Tensor:
    """``int64[B, T, T]``: ``[b, s, e]`` = the tokens window ``[s, e]`` removes,
    ``(e - s)·#{p : run[b, s, p] >= e - s}`` (0 for ``e <= s``)."""
    B, T, P = run.shape
    hist = torch.zeros(B, T, T + 1, dtype=torch.long, device=run.device)
    hist.scatter_add_(2, run, torch.ones_like(run))
    at_least = hist.flip(-1).cumsum(-1).flip(-1)[..., :T]          # #{p : run >= L}
    span = torch.arange(T, device=run.device)
    length = (span[None, :] - span[:, None]).clamp(min=0)          # [s, e] -> e - s
    return at_least.gather(2, length.expand(B, T, T)) * length


def holitom_windows(removed: np.ndarray, frames: List[int], max_window: int):
    """The original's ``select_static_windows`` for every video at once: ``(windows, total)``,
    each video's windows ``[(start, end), ...]`` and the tokens they remove.

    ``removed[B, T, T]`` (integers): ``[b, s, e]`` the tokens window ``[s, e]`` removes.  At
    frame ``i`` the candidates, in the original's order, are the frame alone (``dp[i-1]``) and
    the windows of 2, 3, ... frames ending at ``i``; the first best wins (its strict ``>``)."""
    B, T, _ = removed.shape
    dpz = np.zeros((B, T + 1), dtype=np.int64)         # dpz[:, i + 1] = dp[i], dpz[:, 0] = 0
    start = np.zeros((B, T), dtype=np.int64)
    rows = np.arange(B)
    for i in range(T):
        starts = i + 1 - np.arange(2, min(i + 1, max_window) + 1)
        vals = np.concatenate([dpz[:, i:i + 1], dpz[:, starts] + removed[:, starts, i]], axis=1)
        best = vals.argmax(axis=1)
        dpz[:, i + 1] = vals[rows, best]
        start[:, i] = np.where(best == 0, i, starts[np.maximum(best - 1, 0)]) if starts.size \
            else i
    windows = []
    for b, t in enumerate(frames):
        w, i = [], t - 1
        while i >= 0:
            w.append((int(start[b, i]), i))
            i = int(start[b, i]) - 1
        windows.append(w[::-1])
    return windows, [int(dpz[b, t]) for b, t in enumerate(frames)]


def holitom(video: torch.Tensor, attention: Optional[torch.Tensor] = None, *,
            retain_ratio: float = RETAIN_RATIO, tau: float = TAU, beta: Optional[float] = BETA,
            d: float = D_SHARE, k: int = K, max_window: int = MAX_WINDOW, frames=None,
            backend: Optional[str] = None) -> PruneResult:
    """HoliTom's merging before the LLM: ``PruneResult(tokens[B, L, D], indices[B, L],
    lengths[B])``; see the module docstring for the steps.

    Args:
        video: ``[B, T, P, D]`` the visual tokens of ``B`` videos, ``T`` frames of ``P`` tokens
            (LLaVA-OneVision / LLaVA-Video: the pooled projector features, ``P = 196``); fp32,
            fp16, bf16 or float64.
        attention: ``[B, T, P]`` each token's attention (the original: the last SigLIP layer's
            attention map, mean over heads and query rows, pooled like the features), finite on
            the real frames; None only with ``d = 1``.
        retain_ratio: ``r`` in ``[0, 1]``, the share of the ``T·P`` tokens to keep before the
            static merge's rescaling (``RETAIN_RATIO``).
        tau: similarity threshold in ``[-1, 1]`` (``T``).
        beta: the centre's weight ``β`` in ``[0, 1]`` (``BETA``), or None for the plain mean of
            the centre and its members (``NO_BETA=1``).
        d: the share in ``[0, 1]`` of each frame's budget that goes to DPC-kNN centres rather
            than to attention (``D``).
        k: DPC-kNN's neighbours, ``>= 1`` (``K``; each clustering uses ``min(k, centres)``).
        max_window: the longest window in frames, ``>= 1`` (``MAX_WINDOW_SIZE``).
        frames: None or each video's frame count (``B`` ints in ``[1, T]``): the frames past
            it are padding, never read into a result.
        backend: validated like the ops (``None``: the device's default); used by the gather,
            DPC-kNN and merge ops.

    ``indices`` are positions in the flattened ``T·P`` in the original's output order; -1 and
    zero tokens past ``lengths[b]``.
    """
    counts = checks.video("video", video, frames)
    B, T, P, D = video.shape
    if attention is not None:
        checks.tensor("attention", attention, 3, "[B, T, P]",
                      dtypes=checks.FLOATS + (torch.float64,))
        if tuple(attention.shape) != (B, T, P):
            raise ValueError(f"attention must have shape [B, T, P] = {[B, T, P]} (video's), got "
                             f"shape {tuple(attention.shape)}")
        checks.same_device("video", video, "attention", attention)
    retain_ratio = checks.bounded("retain_ratio", retain_ratio, 0.0, 1.0)
    tau = checks.bounded("tau", tau, -1.0, 1.0)
    if beta is not None:
        beta = checks.bounded("beta", beta, 0.0, 1.0)
    d = checks.bounded("d", d, 0.0, 1.0)
    k = checks.integer("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1 (the token itself is its first neighbour), got {k}")
    max_window = checks.integer("max_window", max_window)
    if max_window < 1:
        raise ValueError(f"max_window must be >= 1 (frames in a window), got {max_window}")
    if attention is None and d < 1:
        raise ValueError(f"attention is None, but d={d} gives {1 - d:.3g} of each frame's budget "
                         f"to the tokens of highest attention; pass attention [B, T, P] or d=1")
    name = checked_name(backend, video.device)
    dev = video.device
    real = torch.arange(T, device=dev)[None, :] < torch.tensor(counts, device=dev,
                                                               dtype=torch.long)[:, None]
    if attention is not None and B * T * P and \
            not bool(torch.isfinite(attention).logical_or(~real[..., None]).all()):
        raise ValueError("attention must be finite on every real frame (it ranks the tokens), "
                         "got NaN or Inf")
    if B == 0:
        return PruneResult(video.new_zeros(0, 0, D), torch.zeros(0, 0, dtype=torch.long,
                                                                  device=dev),
                           torch.zeros(0, dtype=torch.long, device=dev))
    N = T * P

    # 1-3: windows and the rescaled budget, per video
    static = frame_cosine(video, prenormalize=True) > tau               # the original's compare
    run = _runs(static)                                                 # [B, T, P]
    windows, total = holitom_windows(_removed(run).cpu().numpy(), counts, max_window)
    ratio = [min(retain_ratio / ((t * P - red) / (t * P)), 1) for t, red in zip(counts, total)]

    # per frame: its window's first frame and size (padding frames: a window of 0 frames)
    first = np.zeros((B, T), dtype=np.int64)
    size = np.zeros((B, T), dtype=np.int64)
    for b, w in enumerate(windows):
        for s, e in w:
            first[b, s:e + 1] = s
            size[b, s:e + 1] = e - s + 1
    first_t = torch.from_numpy(first).to(dev)
    size_t = torch.from_numpy(size).to(dev)
    frame_no = torch.arange(T, device=dev)
    stat = (size_t > 1)[..., None] & (run.gather(1, first_t[..., None].expand(B, T, P))
                                      >= (size_t - 1)[..., None])       # static positions
    dyn = real[..., None] & ~stat
    anchor = stat & (frame_no[None, :, None] == first_t[..., None])    # a static token's slot
    n_static = stat.sum(-1).cpu().numpy()

    # budgets (the original's Python arithmetic)
    dom = np.zeros((B, T), dtype=np.int64)
    ctx = np.zeros((B, T), dtype=np.int64)
    centres_of = np.zeros((B, T), dtype=np.int64)                       # per window, at its first
    for b, w in enumerate(windows):
        r = ratio[b]
        for s, e in w:
            n_dyn = P - int(n_static[b, s])
            n = math.ceil(n_dyn * r)
            dom[b, s:e + 1] = round(n * (1 - d))
            ctx[b, s:e + 1] = n - dom[b, s]
            if e > s:
                centres_of[b, s] = round(int(n_static[b, s]) * r)
    lengths = [int(centres_of[b].sum() + dom[b].sum() + ctx[b].sum()) for b in range(B)]
    L = max(lengths)
    if L == 0:
        return PruneResult(video.new_zeros(B, 0, D), torch.zeros(B, 0, dtype=torch.long,
                                                                  device=dev),
                           torch.zeros(B, dtype=torch.long, device=dev))

    # 5: the attention tokens of each frame (ties: lower position)
    dom_t = torch.from_numpy(dom).to(dev)
    chosen = torch.zeros(B, T, P, dtype=torch.bool, device=dev)
    if attention is not None and dom.any():
        by_attn = attention.sort(dim=-1, descending=True, stable=True).indices
        order = by_attn.gather(-1, (~dyn.gather(-1, by_attn)).to(torch.uint8)
                               .sort(dim=-1, stable=True).indices)
        chosen.scatter_(-1, order, torch.arange(P, device=dev) < dom_t[..., None])

    # the groups DPC-kNN clusters: every static group (at its window's first frame) and every
    # frame's other dynamic tokens
    rest = dyn & ~chosen & (torch.from_numpy(ctx).to(dev) > 0)[..., None]
    grouped = anchor & (torch.from_numpy(centres_of).to(dev) > 0)[..., None]
    frame_id = 2 * (torch.arange(B, device=dev)[:, None] * T + frame_no)[..., None]
    group = torch.where(grouped, frame_id, torch.where(rest, frame_id + 1, -1)).reshape(-1)
    member = group >= 0

    # the tokens that reach the result (kept or merged), compacted per row: [B, M, D], the
    # grouped anchors holding their window's mean (no copy of the whole video)
    involved = (member | chosen.reshape(-1)).view(B, N)
    m_rows = involved.sum(1)
    M = int(m_rows.max())
    comp_pos = torch.where(torch.arange(M, device=dev) < m_rows[:, None],
                           (~involved).to(torch.uint8).sort(dim=-1, stable=True).indices[:, :M],
                           -1)
    comp_of = torch.full((B, N), M, dtype=torch.long, device=dev)
    comp_of.scatter_(1, spare_filled(comp_pos, N), torch.where(comp_pos >= 0, torch.arange(
        M, device=dev), M).expand(B, M).contiguous())
    cflat = (torch.arange(B, device=dev)[:, None] * M + comp_of.clamp(max=M - 1)).reshape(-1)
    work, _ = ops.gather_compact(video.reshape(B, N, D), spare_filled(comp_pos, N), sort=False,
                                 backend=name, validate=False)
    if work.dtype not in checks.FLOATS:
        work = work.float()
    flat_anchor = grouped.reshape(-1).nonzero().squeeze(1)
    if flat_anchor.numel():
        acc = torch.float64 if video.dtype == torch.float64 else torch.float32
        slot = torch.full((B * N,), flat_anchor.numel(), dtype=torch.long, device=dev)
        slot[flat_anchor] = torch.arange(flat_anchor.numel(), device=dev)
        home = (torch.arange(B, device=dev)[:, None, None] * N + first_t[..., None] * P
                + torch.arange(P, device=dev)).reshape(-1)
        sums = torch.zeros(flat_anchor.numel() + 1, D, dtype=acc, device=dev)
        if video.dtype == acc:          # read in place, the other tokens into a spare row
            sums.index_add_(0, torch.where(stat.reshape(-1), slot[home], flat_anchor.numel()),
                            video.reshape(B * N, D))
        else:                           # only the static tokens, widened
            rows = stat.reshape(-1).nonzero().squeeze(1)
            sums.index_add_(0, slot[home[rows]], video.reshape(B * N, D)[rows].to(acc))
        mean = sums[:-1] / size_t.reshape(-1)[flat_anchor // P][:, None].to(acc)
        work.view(B * M, D)[cflat[flat_anchor]] = mean.to(work.dtype)

    # 4-5: DPC-kNN of every group, one call per neighbour count k = min(K, centres)
    is_centre = torch.zeros(B * N, dtype=torch.bool, device=dev)
    home_of = torch.arange(B * N, device=dev)           # each token's centre (itself by default)
    if bool(member.any()):
        pos = member.nonzero().squeeze(1)
        gid, by = group[pos].sort(stable=True)
        pos = pos[by]
        ids, sizes = torch.unique_consecutive(gid, return_counts=True)
        ids_h, sizes_h = ids.tolist(), sizes.tolist()
        want = [int(centres_of.reshape(-1)[g // 2]) if g % 2 == 0
                else int(ctx.reshape(-1)[g // 2]) for g in ids_h]
        kk = np.minimum(k, want)
        elem_k = torch.repeat_interleave(torch.from_numpy(kk).to(dev), sizes)
        for kv in np.unique(kk).tolist():
            sel = np.nonzero(kk == kv)[0]
            seg_pos = pos if sel.size == kk.size else pos[elem_k == kv]
            seg_len = [sizes_h[g] for g in sel.tolist()]
            n_c = [want[g] for g in sel.tolist()]
            cu = torch.tensor([0] + np.cumsum(seg_len).tolist(), dtype=torch.long, device=dev)
            res = ops.dpc_knn_varlen(work.view(B * M, D)[cflat[seg_pos]], cu, n_c, k=kv,
                                     backend=name, validate=False)
            centre_pos = seg_pos[res.centers]
            is_centre[centre_pos] = True
            seg_of = torch.repeat_interleave(torch.arange(len(seg_len), device=dev),
                                             torch.tensor(seg_len, device=dev))
            c_start = torch.tensor([0] + np.cumsum(n_c).tolist()[:-1], dtype=torch.long,
                                   device=dev)
            home_of[seg_pos] = centre_pos[c_start[seg_of] + res.assign]

    # 6: output order, window by window: static centres, then per frame attention, centres
    part = torch.full((B * N,), 3, dtype=torch.long, device=dev)
    part[is_centre & anchor.reshape(-1)] = 0
    part[chosen.reshape(-1)] = 1
    part[is_centre & ~anchor.reshape(-1)] = 2
    key = (frame_no[None, :, None] * (3 * P) + part.view(B, T, P) * P
           + torch.arange(P, device=dev)).reshape(B, N)
    key = torch.where(part.view(B, N) < 3, key, 3 * N)
    order = key.sort(dim=-1, stable=True).indices[:, :L]
    filled = torch.arange(L, device=dev) < torch.tensor(lengths, device=dev)[:, None]
    index = torch.where(filled, order, -1)

    # one merge for every output token: members of a slot are the tokens whose centre it is
    slot_of = torch.full((B, N), -1, dtype=torch.long, device=dev)
    slot_of.scatter_(1, order, torch.where(filled, torch.arange(L, device=dev), -1)
                     .expand(B, L).contiguous())
    assign = slot_of.reshape(-1)[home_of].view(B, N)      # -1: neither kept nor merged
    assign_c = torch.full((B, M + 1), -1, dtype=torch.long, device=dev)
    assign_c.scatter_(1, comp_of, assign)                  # uninvolved tokens: the spare column
    assign_c = assign_c[:, :M]
    centres_c = spare_filled(torch.where(filled, comp_of.gather(1, order), -1), M)
    # the padding slots' anchors may be any tokens (members of other slots included): the
    # kept tokens leave the members through the mask, not include_centers
    kept_c = torch.zeros(B, M, dtype=torch.bool, device=dev).scatter_(1, centres_c, filled)
    merged = ops.cluster_merge(work, centres_c, assign_c, mask=None if beta is None else ~kept_c,
                               blend=beta, blend_rule="fixed", backend=name, validate=False)
    tokens = merged.tokens.to(video.dtype)
    if min(lengths) < L:
        tokens.masked_fill_(~filled[..., None], 0)
    return PruneResult(tokens, index, torch.tensor(lengths, dtype=torch.long, device=dev))
