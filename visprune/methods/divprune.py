"""DivPrune (CVPR 2025): the most diverse visual tokens by greedy max-min cosine distance."""
from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from ..common import PruneResult


def divprune(visual: torch.Tensor, keep: int, *, mask: Optional[torch.Tensor] = None,
             backend: Optional[str] = None) -> PruneResult:
    """Keep ``keep`` tokens: ``PruneResult(tokens[B, keep, D], indices (ascending), lengths)``.

    Farthest-point selection on ``1 - cos`` of the projector outputs ``visual[B, N, D]``,
    starting at the most isolated token; the kept tokens are returned in original order.
    ``mask[B, N]`` (bool) restricts the candidates.  The original recomputes a min over all
    selected rows at every step (O(N·k²)); the op keeps a running min (O(N·k)), same choices.
    """
    chosen = ops.greedy_select(visual, keep, objective="maxmin", metric="cosine", mask=mask,
                               start="auto", backend=backend)
    tokens, indices = ops.gather_compact(visual, chosen, sort=True, backend=backend,
                                         validate=False)   # greedy's indices are valid
    lengths = torch.full((visual.shape[0],), keep, dtype=torch.long, device=visual.device)
    return PruneResult(tokens, indices, lengths)
