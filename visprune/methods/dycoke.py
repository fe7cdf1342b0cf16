"""DyCoke (Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
Models", CVPR 2025; github KD-TAO/DyCoke), stage 1: temporal token merging before the LLM
(``dycole_ttm`` in ``llava/model/llava_arch.py``), batched.

The original runs on LLaVA-OneVision's pooled projector features of one video, ``[T·196, D]``,
and keeps ``n = int((1 - k)·196)`` tokens of every frame it compares (``k`` = ``dycoke_k``, 0.7 in
its lmms-eval model and README commands).  With ``P`` tokens per frame (196 hard-coded there):

1. for each pair ``(2j, 2j+1)``, ``2j+1 < T``: frame ``2j`` whole, and of frame ``2j+1`` the ``n``
   tokens least similar to the same position in frame ``2j`` (``cos(normalize(a), normalize(b))``,
   ``topk(n, largest=False)``, in that ``topk``'s order: least similar first);
2. for each ``i`` in ``range(0, T - 4, 4)``: frame ``i + 2`` is replaced by its ``n`` tokens least
   similar to the same position in frame ``i`` (``cos(a, b)``, no prior normalisation).

So in a group of four frames, frame 0 stays whole, frames 1 and 2 are compared with frame 0 and
frame 3 with frame 2 (the whole one).  The loop bound ``T - 4`` leaves the last group's frame 2
whole when ``T`` is a multiple of 4; an odd ``T``'s last frame is in no pair and is dropped.  The
tokens are dropped, not averaged ("merging" is the paper's word).  Output: frame by frame in that
concatenation order, a compared frame's tokens in ``topk`` order.

Parity.  The kept positions and their order are the original's: the cosines are computed in the
input's dtype with the original's arithmetic (the same ``F.normalize`` and ``F.cosine_similarity``
steps, :func:`~visprune.methods._video.frame_cosine`, bitwise the same values), and the selection
is the same ``torch.topk`` on the same values (one call for every compared frame of the batch; its
order among equal values is its own, and is reproduced because each row is the original's row;
tested on CPU: on CUDA that choice may depend on how many rows a call holds).

Deviations, only where the original crashes: it stacks an empty list for ``T <= 4`` (step 2 has
no group) and for ``T = 1`` (step 1 has no pair).  Here ``2 <= T <= 4`` runs step 1 alone, and a
one-frame video is kept whole (step 1 would keep nothing of it).  ``P`` is the input's (the
original's 196 is its default shape); ``k`` outside ``[0, 1]`` (a negative ``n`` or more than ``P``,
where the original's ``topk`` fails) is refused.

Stage 2 (not provided).  The original also prunes while decoding (``dycoke_pruning`` in
``llava/model/language_model/modeling_qwen2.py``): before layer ``L = 3`` at every decode step it
takes layer ``L-1``'s eager attention of the new token to the video tokens (mean over heads);
when its cosine to the previous step's is below 0.9 (always at the first step), the layers ``>= L``
attend, for that step, only to the top ``int(N·(1 - p))`` video tokens by that attention
(``p = dycoke_p``), through a gathered view of their KV cache; otherwise to all of them.  Batch 1,
the image at position 14 hard-coded.  visprune's in-LLM engine
(:mod:`visprune.integrations.transformers.inllm`) prunes during the prefill only: stage 2 needs it
to observe the decode step's queries and keys at layer ``L-1`` (``received_attention`` with
``queries="last"`` gives the attention without eager mode), to keep per-row state across decode
steps (the previous attention, batched), and to give layers ``>= L`` a per-step key mask over the
full cache instead of a fixed one.  That is a change to the engine's decode path, outside this
module.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..backends import checked_name
from ..common import PruneResult
from ._video import frame_cosine, padded_result

__all__ = ["dycoke", "dycoke_count"]

DYCOKE_K = 0.7       # dycoke_k of the original's lmms-eval model and README commands


def _layout(num_frames: int):
    """``(pairs, groups)`` of a video of ``T`` frames: step 1's ``T // 2`` pairs and step 2's
    ``len(range(0, T - 4, 4))`` groups."""
    return num_frames // 2, len(range(0, num_frames - 4, 4))


def dycoke_count(tokens_per_frame: int, num_frames: int, k: float = DYCOKE_K) -> int:
    """Tokens stage 1 keeps of a video: ``P`` per whole frame and ``int((1 - k)·P)`` per compared
    frame (a one-frame video: ``P``)."""
    if num_frames == 1:
        return tokens_per_frame
    n = int((1 - k) * tokens_per_frame)
    pairs, groups = _layout(num_frames)
    return pairs * (tokens_per_frame + n) - groups * (tokens_per_frame - n)


def dycoke(video: torch.Tensor, k: float = DYCOKE_K, *, frames=None,
           backend: Optional[str] = None) -> PruneResult:
    """DyCoke's stage 1: ``PruneResult(tokens[B, L, D], indices[B, L], lengths[B])``.

    Args:
        video: ``[B, T, P, D]`` the visual tokens of ``B`` videos, ``T`` frames of ``P`` tokens
            each (LLaVA-OneVision: the pooled projector features, ``P = 196``); fp32, fp16, bf16
            or float64, computed in that dtype like the original.
        k: the share of a compared frame's tokens dropped, in ``[0, 1]`` (the original's
            ``dycoke_k``); each compared frame keeps ``int((1 - k)·P)``.
        frames: ``None`` (every video has ``T`` frames) or each video's frame count (a sequence
            or 1-D integer tensor of ``B`` ints in ``[1, T]``): the frames past it are padding.
        backend: validated like the ops (``None``: the device's default) and used for the final
            :func:`visprune.ops.gather_compact`; the scores are plain PyTorch on every backend.

    ``indices`` are positions in the flattened ``T·P`` (frame-major) in the original's output
    order (not ascending: a compared frame's tokens come least similar first); row ``b`` holds
    ``lengths[b] = dycoke_count(P, frames[b], k)`` tokens, -1 and zero tokens past it.
    """
    counts = checks.video("video", video, frames)
    k = checks.bounded("k", k, 0.0, 1.0)
    name = checked_name(backend, video.device)
    B, T, P, _ = video.shape
    dev = video.device
    n = int((1 - k) * P)
    pairs, groups = _layout(T)

    # every video's comparisons at once; those that reach into a shorter video's padding are
    # computed and never used
    first = frame_cosine(video[:, 0:2 * pairs:2], video[:, 1:2 * pairs:2], prenormalize=True)
    second = frame_cosine(video[:, 0:4 * groups:4], video[:, 2:4 * groups:4])
    slot = torch.arange(P, device=dev)
    pos = slot.repeat(B, T, 1)                                          # [B, T, P]
    pos[:, 1:2 * pairs:2, :n] = first.topk(n, dim=-1, largest=False).indices
    pos[:, 2:4 * groups:4, :n] = second.topk(n, dim=-1, largest=False).indices

    # per video, the frames compared (their n chosen tokens) and the whole ones (P in order);
    # an odd last frame and padding keep nothing
    frame_no = torch.arange(T, device=dev)
    layout = torch.tensor([_layout(t) for t in counts], device=dev).view(B, 2)
    compared = (frame_no % 2 == 1) | ((frame_no % 4 == 2) & (frame_no // 4 < layout[:, 1:]))
    pos = torch.where(compared[..., None], pos, slot)
    take = torch.where(compared, n, P)
    take = torch.where(frame_no < 2 * layout[:, :1], take, 0)
    one_frame = torch.tensor(counts, device=dev)[:, None] == 1
    take = torch.where(one_frame & (frame_no == 0), P, take)            # kept whole

    chosen = (slot < take[..., None]).view(B, T * P)
    index = (frame_no[:, None] * P + pos).view(B, T * P)
    lengths = [dycoke_count(P, t, k) for t in counts]
    L = max(lengths, default=0)
    order = (~chosen).to(torch.uint8).sort(dim=-1, stable=True).indices[:, :L]
    filled = torch.arange(L, device=dev) < torch.tensor(lengths, device=dev)[:, None]
    return padded_result(video, torch.where(filled, index.gather(1, order), -1), lengths, name)
