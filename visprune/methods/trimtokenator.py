"""TrimTokenator (arXiv 2509.00320): text-aligned then diverse visual tokens, one fused op."""
from __future__ import annotations

from typing import Optional, Union

import torch

from .. import ops
from ..common import PruneResult


def trimtokenator(visual: torch.Tensor, text: torch.Tensor, keep: int, *,
                  stage1_keep: Union[int, float] = 0.8, text_mask: Optional[torch.Tensor] = None,
                  mask: Optional[torch.Tensor] = None, mi_metric: str = "l2",
                  objective: str = "maxsum", metric: str = "cosine",
                  backend: Optional[str] = None) -> PruneResult:
    """Keep ``keep`` of the visual tokens: ``PruneResult(tokens[B, keep, D], indices, lengths)``.

    Stage 1 keeps the ``stage1_keep`` tokens best aligned with the text (:func:`ops.mi_scores`),
    stage 2 the ``keep`` most diverse of those (greedy max-sum of cosine distances); the kept
    tokens come back in original order.  This *is* :func:`visprune.ops.prune`.

    Args:
        visual: ``[B, N, D]`` projector outputs (the LLM's embedding space).
        text: ``[B, M, D]`` input embeddings of the prompt's text tokens.
        keep: tokens kept per image.
        stage1_keep: stage-1 survivors, an int count or a float fraction of ``N`` (the paper's
            exact value is not public; 0.8 by default).
        text_mask / mask / mi_metric / objective / metric / backend: as :func:`visprune.ops.prune`.
    """
    return ops.prune(visual, text, keep, stage1_keep=stage1_keep, text_mask=text_mask, mask=mask,
                     mi_metric=mi_metric, objective=objective, metric=metric, backend=backend)
