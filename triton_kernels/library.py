"""The Triton ops as ``torch.library`` custom ops: ``torch.ops.visprune_triton.*``.

Registered ops are opaque to ``torch.compile`` (their fake implementations give the output
shapes), carry the same autograd rule as the C++ ops (:func:`visprune.common.register_gather_grad`),
and the functions below give them the positional signatures of :mod:`visprune.reference`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from visprune.common import PruneResult, register_gather_grad

from . import gather, greedy, mi_scores as _mi, prune as _prune

_NS = "visprune_triton"


@torch.library.custom_op(f"{_NS}::mi_scores", mutates_args=())
def _mi_scores_op(visual: Tensor, text: Tensor, text_mask: Optional[Tensor], metric: str) -> Tensor:
    return _mi.mi_scores(visual, text, text_mask, metric)


@_mi_scores_op.register_fake
def _(visual, text, text_mask, metric):
    return visual.new_empty(visual.shape[:2], dtype=torch.float32)


@torch.library.custom_op(f"{_NS}::greedy_select", mutates_args=())
def _greedy_select_op(x: Tensor, k: int, objective: str, metric: str, mask: Optional[Tensor],
                      start: int) -> Tensor:
    return greedy.greedy_select(x, k, objective, metric, mask, "auto" if start < 0 else start)


@_greedy_select_op.register_fake
def _(x, k, objective, metric, mask, start):
    return x.new_empty((x.shape[0], k), dtype=torch.long)


@torch.library.custom_op(f"{_NS}::gather_compact", mutates_args=())
def _gather_compact_op(x: Tensor, index: Optional[Tensor], mask: Optional[Tensor],
                       sort: bool) -> Tuple[Tensor, Tensor]:
    return gather.gather_compact(x, index, mask, sort)


@_gather_compact_op.register_fake
def _(x, index, mask, sort):
    kept = index.shape[1] if index is not None else torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((x.shape[0], kept, x.shape[2])), x.new_empty((x.shape[0], kept),
                                                                     dtype=torch.long)


@torch.library.custom_op(f"{_NS}::prune", mutates_args=())
def _prune_op(visual: Tensor, text: Tensor, keep: int, stage1_keep: int,
              text_mask: Optional[Tensor], mask: Optional[Tensor], mi_metric: str, objective: str,
              metric: str) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(_prune.prune(visual, text, keep, stage1_keep, text_mask, mask, mi_metric,
                              objective, metric))


@_prune_op.register_fake
def _(visual, text, keep, stage1_keep, text_mask, mask, mi_metric, objective, metric):
    B, _, D = visual.shape
    return (visual.new_empty((B, keep, D)), visual.new_empty((B, keep), dtype=torch.long),
            visual.new_empty((B,), dtype=torch.long))


register_gather_grad(f"{_NS}::gather_compact")
register_gather_grad(f"{_NS}::prune")


def mi_scores(visual, text, text_mask=None, metric="l2"):
    return torch.ops.visprune_triton.mi_scores(visual, text, text_mask, metric)


def greedy_select(x, k, objective="maxmin", metric="cosine", mask=None, start="auto"):
    return torch.ops.visprune_triton.greedy_select(x, k, objective, metric, mask,
                                                   -1 if start == "auto" else start)


def gather_compact(x, index=None, mask=None, sort=True):
    return torch.ops.visprune_triton.gather_compact(x, index, mask, sort)


def prune(visual, text, keep, stage1_keep, text_mask=None, mask=None, mi_metric="l2",
          objective="maxsum", metric="cosine") -> PruneResult:
    """``stage1_keep`` is the survivor count (:func:`visprune.common.stage1_count`)."""
    return PruneResult(*torch.ops.visprune_triton.prune(visual, text, keep, stage1_keep,
                                                        text_mask, mask, mi_metric, objective,
                                                        metric))
