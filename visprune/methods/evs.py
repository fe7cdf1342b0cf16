"""EVS, Efficient Video Sampling, as vLLM ships it (``vllm/multimodal/video_prune/evs.py``,
``compute_retention_mask`` and ``compute_retained_tokens_count``, v0.32), batched.

After the vision encoder and its patch merger, each token scores ``1 - cos`` against the token
at the same position one frame earlier (one frame of merged tokens: two input frames for
Qwen2.5-VL); every token of frame 0 scores 255, so the first frame always survives.  The scores
of the whole video are sorted once (descending, stable: ties to the lowest position) and the
first ``max(P, int(T·P·(1 - q)))`` positions are kept, so the per-frame counts vary.  The kept
tokens keep their input order (vLLM applies a boolean mask), and keep their original 3-D M-RoPE
positions in the model.

Parity.  The kept positions are vLLM's for every ``B, T, P, q`` and dtype: the scores are
computed in the input's dtype with ``F.cosine_similarity``'s arithmetic
(:func:`~visprune.methods._video.frame_cosine`, bitwise the same values, so the same ranks and
the same ties) and sorted with the same stable descending sort.  vLLM's function takes one video
and its ``(T, H, W)`` grid; the comparison is per position, so ``P = (H/m)·(W/m)`` is all it
needs of the layout.

Differences from vLLM's code, none of which changes a kept position: a batch of videos in one
call (``frames[B]`` for videos of different lengths, padded with frames that are never kept),
the cosines a few frames at a time with each frame normalised once (vLLM normalises every frame
twice and makes three video-sized temporaries), and arguments checked first: ``q`` in ``[0, 1)``
(vLLM's accepted ``video_pruning_rate``), at least one frame per video.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..backends import checked_name
from ..common import PruneResult
from ._video import frame_cosine, padded_result

__all__ = ["evs", "evs_count"]

FIRST_FRAME = 255      # vLLM's score for every token of frame 0: above any 1 - cos (<= 2)


def evs_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """Tokens EVS keeps of a video, ``max(P, int(T·P·(1 - q)))`` in Python float arithmetic
    (vLLM's ``compute_retained_tokens_count``)."""
    return max(tokens_per_frame, int(tokens_per_frame * num_frames * (1 - q)))


def evs(video: torch.Tensor, q: float, *, frames=None,
        backend: Optional[str] = None) -> PruneResult:
    """EVS: ``PruneResult(tokens[B, L, D], indices[B, L] (ascending), lengths[B])``.

    Args:
        video: ``[B, T, P, D]`` the merged visual tokens of ``B`` videos, ``T`` frames of ``P``
            tokens each (raster order within a frame); fp32, fp16, bf16 or float64, computed in
            that dtype as vLLM computes in the embeddings' dtype.
        q: the pruning rate in ``[0, 1)`` (vLLM's ``video_pruning_rate``).
        frames: ``None`` (every video has ``T`` frames) or each video's frame count (a sequence
            or 1-D integer tensor of ``B`` ints in ``[1, T]``): the frames past it are padding.
        backend: validated like the ops (``None``: the device's default) and used for the final
            :func:`visprune.ops.gather_compact`; the scores are plain PyTorch on every backend.

    ``indices`` are positions in the flattened ``T·P`` (frame-major), those vLLM's
    ``compute_retention_mask`` keeps of the video alone; row ``b`` keeps
    ``lengths[b] = evs_count(P, frames[b], q)`` tokens, -1 and zero tokens past it.
    """
    counts = checks.video("video", video, frames)
    q = checks.bounded("q", q, 0.0, 1.0, hi_open=True)
    name = checked_name(backend, video.device)
    B, T, P, _ = video.shape
    dev = video.device

    score = torch.empty(B, T, P, dtype=video.dtype, device=dev)
    score[:, :1] = FIRST_FRAME
    score[:, 1:] = 1 - frame_cosine(video)
    # padding frames rank after every real score: 1 - cos is NaN (ranked first by the sort, as
    # in vLLM) or finite, never -inf
    frame_no = torch.arange(T, device=dev)
    real = frame_no < torch.tensor(counts, device=dev)[:, None]
    score = score.masked_fill(~real[..., None], -torch.inf).reshape(B, T * P)
    lengths = [evs_count(P, t, q) for t in counts]
    L = max(lengths, default=0)
    top = score.argsort(dim=-1, descending=True, stable=True)[:, :L]
    kept = torch.arange(L, device=dev) < torch.tensor(lengths, device=dev)[:, None]
    index = torch.where(kept, top, T * P).sort(dim=-1).values      # ascending, padding last
    return padded_result(video, torch.where(kept, index, -1), lengths, name)
