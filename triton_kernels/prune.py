"""The fused TrimTokenator pipeline.

Visual tokens are read from memory by three kernels: one pass of ``_token_stats_kernel`` gives
both the MI scores (stage 1) and the norms of the greedy distances (stage 2); the distance
tiles of stage 2 read them again (tensor-core Gram tiles, re-read from L2); the final gather
reads only the kept rows.  Stage 2 runs on the survivors in place (a candidate mask), so the
survivors are never compacted, and ties keep meaning "lowest original index".
"""
from __future__ import annotations

import torch

from visprune.common import PruneResult, topk_mask, varlen_topk_mask

from .gather import gather_rows
from .greedy import greedy_select, greedy_select_varlen, packed
from .mi_scores import text_summary, token_stats
from .utils import on_device


@on_device
def prune(visual, text, keep, stage1_keep, text_mask=None, mask=None, mi_metric="l2",
          objective="maxsum", metric="cosine") -> PruneResult:
    """See :func:`visprune.reference.prune`; ``stage1_keep`` is the survivor count."""
    B, N, D = visual.shape
    lengths = torch.full((B,), keep, dtype=torch.long, device=visual.device)
    if B == 0 or keep == 0:
        empty = torch.empty(B, keep, dtype=torch.long, device=visual.device)
        return PruneResult(visual.new_empty(B, keep, D), empty, lengths)
    scores, norms = token_stats(visual, text_summary(text, text_mask, mi_metric),
                                score_metric=mi_metric, norm=metric)
    survivors = topk_mask(scores, stage1_keep, mask)
    chosen = greedy_select(visual, keep, objective, metric, survivors, "auto", norms=norms)
    indices = chosen.sort(dim=-1).values
    return PruneResult(gather_rows(visual, indices), indices, lengths)


@on_device
def prune_varlen(visual, cu_seqlens, text, keep, stage1_keep, text_mask=None, mask=None,
                 mi_metric="l2", objective="maxsum", metric="cosine") -> PruneResult:
    """See :func:`visprune.reference.prune_varlen`; ``stage1_keep`` is ``int64[B]``.  The same
    kernels as :func:`prune` with one program per segment (text summary ``b`` for segment ``b``);
    stage 1 ranks all ``T`` scores at once (:func:`visprune.common.varlen_topk_mask`)."""
    T, D = visual.shape
    lengths = torch.tensor(list(keep), dtype=torch.long, device=visual.device)
    if sum(keep) == 0:
        return PruneResult(visual.new_empty(0, D),
                           torch.empty(0, dtype=torch.long, device=visual.device), lengths)
    rows = packed(cu_seqlens, T, keep)
    scores, norms = token_stats(visual, text_summary(text, text_mask, mi_metric),
                                score_metric=mi_metric, norm=metric, cu_seqlens=rows.cu,
                                nmax=rows.nmax)
    survivors = varlen_topk_mask(scores, rows.cu, stage1_keep, mask)
    chosen = greedy_select_varlen(visual, rows.cu, keep, objective, metric, survivors, "auto",
                                  norms=norms, rows=rows)
    # Segments hold ascending, disjoint ranges: one sort orders each segment's picks.
    indices = chosen.sort().values
    return PruneResult(gather_rows(visual[None], indices[None])[0], indices, lengths)
