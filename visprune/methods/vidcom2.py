"""VidCom2 (Video Compression Commander, Liu et al., EMNLP 2025, arXiv 2505.14454) as vLLM ships
it (``vllm/multimodal/video_prune/vidcom2.py``, ``compute_retention_mask`` and
``compute_retained_tokens_count``, v0.32), batched.

Per video, on the merged visual tokens ``[T·P, D]``:

1. the ``max(1, int(D/2))`` channels of lowest variance over the video's tokens
   (``torch.topk(largest=False)``, in its order);
2. those channels of each token, ``F.normalize``d; scores against the video's mean token
   ``v`` and its frame's mean token ``f``, each the multi-scale Gaussian
   ``Σ_{a ∈ 2^-3..2^1} exp(-||x - c||² / 2a)``; ``similarity = v + f``;
3. frame budgets: ``s_t = -mean(v over frame t)``, ``p = softmax((s - max s) / 0.01)``,
   ``k_t = clamp(round(P · min(1, (1 - q)(1 + p_t - mean p))), 1, P)``;
4. each frame keeps its ``k_t`` tokens of lowest similarity (``torch.topk(largest=False)``);
5. the count is reconciled to ``target = max(T, min(int(T·P·(1 - q)), T·P))``: the surplus of
   highest-similarity kept tokens is dropped, or the shortfall of lowest-similarity dropped
   tokens added (``torch.topk`` over the video's kept / dropped tokens in position order).

Parity.  The kept positions are vLLM's for every ``B, T, P, q`` and dtype: every step runs the
same torch operations in the input's dtype (vLLM computes in the embeddings' dtype), on a batch of
videos instead of one (the two reductions over a whole video, one call per video as in vLLM);
each result element is computed from the same elements in the same order, so the values are
bitwise vLLM's.  Where the selection is ``torch.topk``'s, whose choice among equal values is its
own (and frequent in bf16), the same ``topk`` is called on the same values: in step 4 on every
frame of the batch that has the same budget at once (a frame's row is what vLLM's loop passes),
in step 5 on each video's own list (the lists differ in length between videos).  Tested on CPU;
on CUDA, ``topk``'s choice among equal values may depend on how many rows a call holds.  vLLM's
function takes one video and its ``(T, H, W)`` grid; it uses the grid only to split the tokens
into frames, so ``P = (H/m)·(W/m)`` is all it needs of the layout.

Differences from vLLM's code, none of which changes a kept position: a batch of videos in one call
(``frames[B]`` for videos of different lengths; the videos of one length are computed together),
the per-frame selection grouped by budget instead of a loop over frames, and arguments checked
first: ``q`` in ``[0, 1)`` (vLLM's accepted ``video_pruning_rate``), at least one frame per video.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import checks
from ..backends import checked_name
from ..common import PruneResult
from ._video import frame_step, padded_result

__all__ = ["vidcom2", "vidcom2_count"]

ALPHAS = tuple(2.0 ** k for k in range(-3, 2))   # the Gaussian bandwidths, in vLLM's order
LOW_VARIANCE_SHARE = 0.5                           # the share of channels scored
TEMPERATURE = 0.01                                 # of the frame-budget softmax


def vidcom2_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """Tokens VidCom2 keeps of a video, ``max(T, min(int(T·P·(1 - q)), T·P))`` in Python float
    arithmetic (vLLM's ``compute_retained_tokens_count``): at least one per frame."""
    total = tokens_per_frame * num_frames
    return max(num_frames, min(int(total * (1.0 - q)), total))


def _gaussian(x: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """``Σ_a exp(-||x - center||² / 2a)`` over :data:`ALPHAS`, summed in their order from 0."""
    dist_sq = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-dist_sq / (2.0 * a)) for a in ALPHAS)


def _scores(video: torch.Tensor, q: float):
    """``(similarity[G, T, P], budgets int64[G, T])`` of ``G`` videos of ``T`` frames each: steps
    1-3, each operation vLLM's on a leading batch dimension."""
    G, T, P, D = video.shape
    tokens = video.reshape(G, T * P, D)
    # The two reductions over a whole video are vLLM's own calls, one video each: a reduction to
    # a single output (one channel, D < 4) with 32k+ inputs is split across threads, and the
    # split's partial sums round differently from a batched call's serial sum.
    variances = torch.stack([t.var(dim=0, unbiased=False) for t in tokens])
    channels = max(1, int(D * LOW_VARIANCE_SHARE))
    _, low = torch.topk(variances, k=channels, largest=False)
    picked = tokens.gather(2, low[:, None, :].expand(G, T * P, channels))
    frames = F.normalize(picked.view(G, T, P, channels), dim=-1)
    del picked
    video_center = torch.stack([f.mean(dim=(0, 1), keepdim=True) for f in frames])
    frame_center = frames.mean(dim=2, keepdim=True)
    # a few frames at a time: vLLM's video-sized temporaries (x - c and its square) stay small;
    # each score is the same elementwise arithmetic
    v_score = frames.new_empty(G, T, P)
    f_score = frames.new_empty(G, T, P)
    step = frame_step(frames)
    for s in range(0, T, step):
        chunk = frames[:, s:s + step]
        v_score[:, s:s + step] = _gaussian(chunk, video_center)
        f_score[:, s:s + step] = _gaussian(chunk, frame_center[:, s:s + step])
    similarity = v_score + f_score

    base = 1.0 - q
    frame_scores = -v_score.mean(dim=-1)
    probs = F.softmax((frame_scores - frame_scores.amax(dim=-1, keepdim=True)) / TEMPERATURE,
                      dim=-1)
    scales = (base * (1.0 + probs - probs.mean(dim=-1, keepdim=True))).clamp(max=1.0)
    budgets = (scales * P).round().long().clamp(min=1, max=P)
    return similarity, budgets


def vidcom2(video: torch.Tensor, q: float, *, frames=None,
            backend: Optional[str] = None) -> PruneResult:
    """VidCom2: ``PruneResult(tokens[B, L, D], indices[B, L] (ascending), lengths[B])``.

    Args:
        video: ``[B, T, P, D]`` the merged visual tokens of ``B`` videos, ``T`` frames of ``P``
            tokens each; fp32, fp16, bf16 or float64, computed in that dtype as vLLM computes in
            the embeddings' dtype.
        q: the pruning rate in ``[0, 1)`` (vLLM's ``video_pruning_rate``).
        frames: ``None`` (every video has ``T`` frames) or each video's frame count (a sequence
            or 1-D integer tensor of ``B`` ints in ``[1, T]``): the frames past it are padding.
        backend: validated like the ops (``None``: the device's default) and used for the final
            :func:`visprune.ops.gather_compact`; the scores are plain PyTorch on every backend.

    ``indices`` are positions in the flattened ``T·P`` (frame-major), those vLLM's
    ``compute_retention_mask`` keeps of the video alone; row ``b`` keeps
    ``lengths[b] = vidcom2_count(P, frames[b], q)`` tokens, -1 and zero tokens past it.
    """
    counts = checks.video("video", video, frames)
    q = checks.bounded("q", q, 0.0, 1.0, hi_open=True)
    name = checked_name(backend, video.device)
    B, T, P, _ = video.shape
    dev = video.device

    x = video if video.stride(-1) == 1 else video.contiguous()   # vLLM's tokens are packed
    similarity = torch.zeros(B, T, P, dtype=video.dtype, device=dev)
    budgets = torch.zeros(B, T, dtype=torch.long, device=dev)     # 0: a padding frame
    for t in sorted(set(counts)):
        rows = [b for b, c in enumerate(counts) if c == t]
        sim, k = _scores(x[:, :t] if len(rows) == B else x[rows, :t], q)   # a view if all
        similarity[rows, :t] = sim
        budgets[rows, :t] = k

    # step 4: every frame of the batch with the same budget in one topk
    kept = torch.zeros(B * T, P, dtype=torch.bool, device=dev)
    flat_sim, flat_budget = similarity.view(B * T, P), budgets.view(B * T)
    for k in flat_budget.unique().tolist():
        if k == 0:
            continue
        rows = (flat_budget == k).nonzero().squeeze(-1)
        _, idx = torch.topk(flat_sim[rows], k=k, largest=False, sorted=False)
        kept[rows] = kept[rows].scatter(1, idx, True)
    kept = kept.view(B, T * P)

    # step 5: each video's surplus or shortfall, on its own list
    lengths = [vidcom2_count(P, t, q) for t in counts]
    current = budgets.sum(-1).tolist()
    for b, t in enumerate(counts):
        mask, sim = kept[b, :t * P], similarity[b, :t].reshape(-1)
        if current[b] > lengths[b]:
            retained = mask.nonzero().squeeze(-1)
            _, worst = torch.topk(sim[retained], k=current[b] - lengths[b], largest=True,
                                  sorted=False)
            mask[retained[worst]] = False
        elif current[b] < lengths[b]:
            # current < target <= T·P: some tokens are not kept
            available = (~mask).nonzero().squeeze(-1)
            _, best = torch.topk(sim[available], k=lengths[b] - current[b], largest=False,
                                 sorted=False)
            mask[available[best]] = True

    L = max(lengths, default=0)
    order = (~kept).to(torch.uint8).sort(dim=-1, stable=True).indices[:, :L]
    slot = torch.arange(L, device=dev) < torch.tensor(lengths, device=dev)[:, None]
    return padded_result(video, torch.where(slot, order, -1), lengths, name)
