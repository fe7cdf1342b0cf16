"""FastVID (Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
NeurIPS 2025; github LunarShen/FastVID), the pruning before the LLM's first layer, batched.

The original prunes one video at the start of the LLM's prefill, in two versions that differ
beyond their inputs; ``variant`` picks one:

* ``"llava_onevision"`` (``Qwen2Model.forward`` in its LLaVA-NeXT ``modeling_qwen2.py``;
  LLaVA-Video's copy differs again and is not reproduced): with ``P`` tokens per frame,
  ``retain = int(P·r)``, ``s = retain - int(retain·d)`` salient tokens and ``n = retain - s``
  context tokens per frame.

  1. DySeg: ``sim[t] = ĝ_t·ĝ_{t+1}`` of the normalised global features (``g / ||g||``); a cut
     after frame ``t`` at the ``c - 1`` lowest ``sim`` (``torch.topk(largest=False)``) and
     wherever ``sim < tau``.
  2. Every frame keeps its ``s`` most salient tokens (``torch.topk`` of ``saliency``).
  3. Density peaks per frame over its other tokens (DPC-kNN: ``cdist / sqrt(D)``, ``k`` nearest).
  4. Anchor frames: in a segment of ``L`` frames the frames ``L-1, L-1-p, ...`` (counted from its
     end), each with ``(n·L) // ceil(L/p)`` anchors, its best density scores.  An anchor frame
     whose count equals ``n`` (every one-frame segment; with ``p <= 2`` also some longer ones)
     merges its own frame's non-salient tokens; the others merge their whole segment's.  Each
     of those tokens goes to the anchor of highest cosine (argmax, anchors in score order), the
     anchor among them, and the anchor becomes ``w·anchor + (1 - w)·mean(members)`` with
     ``w = max(beta, 1/(m + 1))`` for ``m`` members: ``cluster_merge(..., metric="cosine",
     blend=beta)``.  A token is merged once for every anchor frame whose scope holds it.

* ``"qwen2_5_vl"`` (``Qwen2_5_VLForConditionalGeneration.forward`` in its
  ``modeling_qwen2_5_vl.py``): DySeg as above; then per segment of ``L`` frames a budget
  ``retain·L`` of which ``max(int(retain·L·d), 1)`` are anchors.  A longer segment is cut again
  after every ``sim < ignore`` into ``V`` sub-segments; only the last frame of each takes tokens:
  the salient budget split evenly over them (the first ``remainder`` one more), the anchors split
  over ``ceil(V/p)`` groups and given to the sub-segments ``V-1, V-1-p, ...`` (at most ``P // 2``
  each, and the salient count at most ``P`` minus them).  Salient tokens by ``topk`` per frame;
  anchors = the frame's best density scores among its non-salient tokens, in position order. Each
  anchor frame merges the segment's tokens that are neither salient nor its own anchors
  (``include_centers=False``: ``w = max(beta, 1/(m + 1))`` over the ``m`` others).

Both return the salient tokens (the input's rows) and one merged token per anchor, sorted by
position, as the original sorts its ``keep_indexs``: ``indices`` ascending, a merged token at its
anchor's position (the model gives it the anchor's position ids, as the original does).

Inputs.  ``video[B, T, P, D]``: the tokens the LLM receives (LLaVA-OneVision: the pooled
projector features, ``P = 196``; Qwen2.5-VL: the merged visual tokens).  ``saliency[B, T, P]``:
per token (LLaVA-OneVision: the attention weights of SigLIP's attention-pooling head, bilinearly
pooled like the features; Qwen2.5-VL: in the last vision block, the attention of each frame's
mean query to each merged token's mean key, softmax over the frame, mean over heads).
``global_features[B, T, G]``: per frame (LLaVA-OneVision: that head's pooled output); ``None``
takes each frame's mean token, which is Qwen2.5-VL's definition.

Parity.  On the same inputs the kept positions are the original's and the merged tokens agree
within float32 rounding: DySeg's cosines, the ``topk`` of DySeg and of the saliency are the
original's operations in the inputs' dtypes (bitwise the same values and choices, one ``topk``
per video for DySeg and one per group of frames with the same count for the saliency); the
density peaks and the merge are :func:`visprune.ops.dpc_knn_varlen` and
:func:`visprune.ops.cluster_merge` (float32 arithmetic, as the original's ``.float()`` distances;
the original merges in the model's dtype).  Deviations:

* Deterministic density peaks: where the original adds ``1e-6·rand`` to the density, a density
  tie goes to the lower index and the centres are the best scores with ties to the lowest index
  (the ops' rule).  On continuous inputs, where nothing ties within the noise, the original
  with its noise gives the same result (tested).  Densities tie exactly, and the original's
  noise decides, between copies of a token, for ``k = 2`` between two mutual nearest
  neighbours, and for ``k = 1`` everywhere (every density is 1).
* Where the original crashes, the least surprising result: DySeg with fewer frame pairs than
  ``c - 1`` cuts every pair (its ``topk`` fails); more anchors than a frame has non-salient
  tokens takes them all; no anchors (``n = 0``) merges nothing (its ``argmax`` over no anchors
  fails); a frame with fewer than ``k`` non-salient tokens takes the mean over all of them; a
  Qwen segment without salient or anchor tokens contributes what it has (its ``torch.cat`` of
  an empty list fails), one without cuts is one segment.
* An exact cosine tie in the assignment goes to the lowest slot and an anchor always to its own
  (the original's ``argmax`` agrees except between duplicate tokens).
* ``P``, ``k`` (4 there) and the other settings are parameters, with the original's defaults per
  variant (its eval scripts: ``r = 0.10, tau = 0.9`` for LLaVA-OneVision, ``r = 0.27,
  tau = 0.84, ignore = 0.95`` for Qwen2.5-VL; ``c = 8, d = 0.4, p = 4, beta = 0.6`` for both).
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import checks, ops
from ..backends import checked_name
from ..common import PruneResult
from ._video import padded_result

__all__ = ["fastvid"]

ONEVISION, QWEN = "llava_onevision", "qwen2_5_vl"
# the variant's defaults of (retention ratio r, tau), from the original's eval scripts
DEFAULTS = {ONEVISION: (0.10, 0.9), QWEN: (0.27, 0.84)}


class _Anchors(NamedTuple):
    """One anchor frame of video ``b``: frame ``frame`` takes ``count`` anchors (its best density
    scores) and merges the non-salient tokens of frames ``[lo, hi)``."""
    b: int
    frame: int
    count: int
    lo: int
    hi: int


def _segments(sim: torch.Tensor, frames: int, c: int, tau: float) -> List[Tuple[int, int]]:
    """DySeg of one video: ``(first frame, length)`` of each segment, from the adjacent frames'
    cosines ``sim[frames - 1]``."""
    lowest = torch.topk(sim, min(c - 1, frames - 1), largest=False).indices.tolist()
    below = (sim < tau).nonzero().squeeze(-1).tolist()
    return _split_at(sorted(set(lowest) | set(below)), 0, frames)


def _split_at(cuts: Sequence[int], lo: int, length: int) -> List[Tuple[int, int]]:
    """``(first frame, length)`` of the runs of ``length`` frames from ``lo`` cut after each
    (relative) frame in ``cuts``."""
    ends = [i + 1 for i in cuts] + [length]
    starts = [0] + ends[:-1]
    return [(lo + s, e - s) for s, e in zip(starts, ends)]


def _even(total: int, parts: int) -> List[int]:
    """``total`` split into ``parts`` (Python's floor division), the first ones one larger."""
    size, extra = divmod(total, parts)
    return [size + (1 if i < extra else 0) for i in range(parts)]


def _plan_onevision(b, segments, P, r, d, p):
    """The LLaVA-OneVision path's counts: the salient count of every frame and the anchor
    frames."""
    retain = int(P * r)
    salient = retain - int(retain * d)
    context = retain - salient
    anchors = []
    for lo, L in segments:
        per_anchor = context * L // ((L + p - 1) // p)
        if per_anchor == 0:
            continue
        own_frame = per_anchor == context        # the original's test for a one-frame merge
        for f in range(lo + (L - 1) % p, lo + L, p):
            anchors.append(_Anchors(b, f, min(per_anchor, P - salient),
                                    f if own_frame else lo, f + 1 if own_frame else lo + L))
    return salient, anchors


def _plan_qwen(b, segments, sim, P, r, d, p, ignore):
    """The Qwen2.5-VL path's counts: ``{frame: salient count}`` and the anchor frames."""
    retain = int(P * r)
    salient: Dict[int, int] = {}
    anchors = []
    for lo, L in segments:
        seg_context = max(int(retain * L * d), 1)
        seg_salient = retain * L - seg_context
        if L == 1:
            last, sal, ctx = [lo], [seg_salient], [seg_context]
        else:
            inner = (sim[lo:lo + L - 1] < ignore).nonzero().squeeze(-1).tolist()
            subs = _split_at(inner, lo, L)
            V = len(subs)
            last = [s + n - 1 for s, n in subs]
            groups = _even(seg_context, (V + p - 1) // p)
            ctx = [min(groups[i // p], P // 2) if i % p == 0 else 0 for i in range(V)][::-1]
            sal = [min(s, P - n) for s, n in zip(_even(seg_salient, V), ctx)]
        for f, s, n in zip(last, sal, ctx):
            salient[f] = max(s, 0)
            if n > 0:
                anchors.append(_Anchors(b, f, n, lo, lo + L))
    return salient, anchors


def _checked_per_frame(name: str, t, video: torch.Tensor, layout: str) -> None:
    checks.tensor(name, t, 3, layout, dtypes=checks.FLOATS + (torch.float64,))
    checks.matching(name, t, "video", video, layout, 2)


def fastvid(video: torch.Tensor, saliency: torch.Tensor, *,
            global_features: Optional[torch.Tensor] = None, variant: str = ONEVISION,
            r: Optional[float] = None, c: int = 8, tau: Optional[float] = None,
            ignore: float = 0.95, d: float = 0.4, p: int = 4, beta: float = 0.6, k: int = 4,
            frames=None, backend: Optional[str] = None) -> PruneResult:
    """FastVID: ``PruneResult(tokens[B, L, D], indices[B, L] (ascending), lengths[B])``.

    Args:
        video: ``[B, T, P, D]`` the visual tokens of ``B`` videos, ``T`` frames of ``P`` tokens
            (a frame's tokens in raster order); fp32, fp16, bf16 or float64.
        saliency: ``[B, T, P]`` each token's saliency (higher = kept first); any float dtype.
        global_features: ``[B, T, G]`` each frame's global feature for DySeg, or ``None``: each
            frame's mean token (Qwen2.5-VL's definition); any float dtype.
        variant: ``"llava_onevision"`` or ``"qwen2_5_vl"``: the original's model path followed.
        r: the retention ratio in ``[0, 1]`` (``None``: 0.10 for LLaVA-OneVision, 0.27 for
            Qwen2.5-VL, the original's scripts).
        c: DySeg's minimum number of segments (``c - 1`` cuts at the lowest similarities), >= 1.
        tau: DySeg's threshold: a cut wherever the similarity is below it (``None``: 0.9 /
            0.84 by variant).
        ignore: Qwen2.5-VL's threshold for sub-segments within a segment (unused otherwise).
        d: the share of the retained tokens that are merged anchors, in ``[0, 1]``.
        p: the anchor frames' stride within a segment, counted from its end, >= 1.
        beta: the anchor's least weight in its merge, in ``[0, 1]``.
        k: the nearest neighbours in the density, >= 1.
        frames: ``None`` (every video has ``T`` frames) or each video's frame count (a sequence
            or 1-D integer tensor of ``B`` ints in ``[1, T]``): the frames past it are padding.
        backend: the ops' backend (``None``: the device's default), for the density peaks, the
            merge and the gather.

    ``indices`` are positions in the flattened ``T·P`` (frame-major): a salient token's own, a
    merged token's anchor's; ``lengths[b]`` tokens in row ``b``, -1 and zero tokens past it.
    """
    counts = checks.video("video", video, frames)
    checks.choice("variant", variant, tuple(DEFAULTS))
    _checked_per_frame("saliency", saliency, video, "[B, T, P]")
    if saliency.shape[2] != video.shape[2]:
        raise ValueError(f"saliency must have shape [B, T, P] = {tuple(video.shape[:3])}, got "
                         f"{tuple(saliency.shape)}")
    if global_features is not None:
        _checked_per_frame("global_features", global_features, video, "[B, T, G]")
        if global_features.shape[2] == 0:
            raise ValueError("global_features must have G >= 1 channels, got shape "
                             f"{tuple(global_features.shape)}")
    r = checks.bounded("r", DEFAULTS[variant][0] if r is None else r, 0.0, 1.0)
    tau = checks.bounded("tau", DEFAULTS[variant][1] if tau is None else tau, -float("inf"),
                         float("inf"))
    ignore = checks.bounded("ignore", ignore, -float("inf"), float("inf"))
    d = checks.bounded("d", d, 0.0, 1.0)
    beta = checks.bounded("beta", beta, 0.0, 1.0)
    c, p, k = (checks.integer(n, v) for n, v in (("c", c), ("p", p), ("k", k)))
    for n, v in (("c", c), ("p", p), ("k", k)):
        if v < 1:
            raise ValueError(f"{n} must be >= 1, got {v}")
    name = checked_name(backend, video.device)
    B, T, P, D = video.shape
    dev = video.device
    # one copy of a strided video (for the mean token, the ops and the gather), none otherwise
    video = video.contiguous()

    # DySeg: the original's operations in the features' dtype, its reductions over a
    # contiguous G as on its packed [T, G] features (and the mean token over the tokens of a
    # contiguous [P, D] frame, as on its packed video)
    g = (video.mean(dim=2) if global_features is None else global_features).contiguous()
    g = g / g.norm(dim=-1, keepdim=True)
    sim = (g[:, :-1] * g[:, 1:]).sum(dim=-1)

    salient_count = torch.zeros(B, T, dtype=torch.long)       # per frame, 0 on padding
    anchors: List[_Anchors] = []
    for b, t in enumerate(counts):
        segments = _segments(sim[b, :t - 1], t, c, tau)
        if variant == ONEVISION:
            s, rows = _plan_onevision(b, segments, P, r, d, p)
            salient_count[b, :t] = s
        else:
            per_frame, rows = _plan_qwen(b, segments, sim[b], P, r, d, p, ignore)
            for f, s in per_frame.items():
                salient_count[b, f] = s
        anchors += rows

    # the salient tokens: one topk over every frame with the same count (each row the
    # original's own call on that frame)
    salient = torch.zeros(B * T, P, dtype=torch.bool, device=dev)
    flat_count = salient_count.view(-1)
    flat_saliency = saliency.reshape(B * T, P)
    for s in sorted(set(flat_count.tolist()) - {0}):
        rows = (flat_count == s).nonzero().squeeze(-1).to(dev)
        top = torch.topk(flat_saliency[rows], s, dim=-1).indices
        salient[rows] = salient[rows].scatter(1, top, True)

    # the anchors: density peaks of every anchor frame's non-salient tokens in one varlen call
    x = video if video.dtype != torch.float64 else video.float()     # the ops compute in fp32
    anchor_count = [0] * (B * T)
    for a in anchors:
        anchor_count[a.b * T + a.frame] = a.count
    candidates = ~salient & (torch.tensor(anchor_count, device=dev) > 0)[:, None]
    dpc = ops.dpc_knn_varlen(x.reshape(B * T * P, D), torch.arange(B * T + 1, device=dev) * P,
                             anchor_count, k=k, mask=candidates.view(-1), backend=name,
                             validate=False)
    centers = dpc.centers.split([a.count for a in anchors]) if anchors else []
    if variant == QWEN:
        centers = [ce.sort().values for ce in centers]   # the original's anchors by position
    merged = _merge(x, salient.view(B, T, P), anchors, centers, variant, beta, name)

    # the result: salient and anchor positions ascending, the anchors' rows replaced
    kept = salient.view(B, T * P).clone()
    anchor_pos = torch.cat([ce - a.b * T * P for a, ce in zip(anchors, centers)]) if anchors \
        else torch.zeros(0, dtype=torch.long, device=dev)
    anchor_row = torch.tensor([a.b for a, ce in zip(anchors, centers) for _ in range(len(ce))],
                              dtype=torch.long, device=dev)
    kept[anchor_row, anchor_pos] = True
    lengths = kept.sum(-1).tolist()
    L = max(lengths, default=0)
    index = (~kept).to(torch.uint8).sort(dim=-1, stable=True).indices[:, :L]
    index = torch.where(torch.arange(L, device=dev) < torch.tensor(lengths, device=dev)[:, None],
                        index, -1)
    res = padded_result(video, index, lengths, name)
    slot = kept.cumsum(-1)[anchor_row, anchor_pos] - 1
    res.tokens[anchor_row, slot] = merged.to(video.dtype)
    return res


def _merge(x: torch.Tensor, salient: torch.Tensor, anchors: List[_Anchors],
           centers: Sequence[torch.Tensor], variant: str, beta: float, backend: str
           ) -> torch.Tensor:
    """The merged tokens ``[Σ counts, D]`` of every anchor frame, in the order of ``anchors``.

    Each anchor frame is one ``cluster_merge`` row over its scope's tokens.  Rows of one-frame
    scopes with the same count go in one call (their frames gathered: each frame at most once);
    a longer scope is a view of the video, one call each, so the tokens are never copied per
    anchor frame (a segment holds up to ``ceil(L/p)`` of them)."""
    B, T, P, D = x.shape
    dev = x.device
    own = variant == ONEVISION          # the anchor counts among its members in that path
    out: List[Optional[torch.Tensor]] = [None] * len(anchors)
    groups: Dict[int, List[int]] = {}
    for i, a in enumerate(anchors):
        if a.hi - a.lo == 1:
            groups.setdefault(a.count, []).append(i)
            continue
        local = centers[i] - (a.b * T + a.lo) * P
        m = ops.cluster_merge(x[a.b, a.lo:a.hi].reshape(1, -1, D), local[None], metric="cosine",
                              mask=~salient[a.b, a.lo:a.hi].reshape(1, -1),
                              include_centers=own, blend=beta, backend=backend, validate=False)
        out[i] = m.tokens[0]
    for count, members in groups.items():
        frame = torch.tensor([anchors[i].b * T + anchors[i].frame for i in members], device=dev)
        local = torch.stack([centers[i] for i in members]) - frame[:, None] * P
        m = ops.cluster_merge(x.reshape(B * T, P, D)[frame], local, metric="cosine",
                              mask=~salient.view(B * T, P)[frame], include_centers=own,
                              blend=beta, backend=backend, validate=False)
        for j, i in enumerate(members):
            out[i] = m.tokens[j]
    return torch.cat(out) if out else x.new_zeros(0, D)
