"""The Triton ops as ``torch.library`` custom ops: ``torch.ops.visprune_triton.*``.

Registered ops are opaque to ``torch.compile``; :func:`visprune.oplib.register` gives them the
fake implementations and the autograd rule the C++ ops have, and :func:`visprune.oplib.positional`
the positional signatures of :mod:`visprune.reference` (exported below).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from visprune import oplib
from visprune.common import START_NAMES

from . import attention, dpp, gather, greedy, mi_scores as _mi, prune as _prune, video

_NS = "visprune_triton"


@torch.library.custom_op(f"{_NS}::mi_scores", mutates_args=())
def _mi_scores_op(visual: Tensor, text: Tensor, text_mask: Optional[Tensor], metric: str) -> Tensor:
    return _mi.mi_scores(visual, text, text_mask, metric)


@torch.library.custom_op(f"{_NS}::greedy_select", mutates_args=())
def _greedy_select_op(x: Tensor, k: int, objective: str, metric: str, mask: Optional[Tensor],
                      start: int) -> Tensor:
    return greedy.greedy_select(x, k, objective, metric, mask, START_NAMES.get(start, start))


@torch.library.custom_op(f"{_NS}::gather_compact", mutates_args=())
def _gather_compact_op(x: Tensor, index: Optional[Tensor], mask: Optional[Tensor],
                       sort: bool) -> Tuple[Tensor, Tensor]:
    return gather.gather_compact(x, index, mask, sort)


@torch.library.custom_op(f"{_NS}::prune", mutates_args=())
def _prune_op(visual: Tensor, text: Tensor, keep: int, stage1_keep: int,
              text_mask: Optional[Tensor], mask: Optional[Tensor], mi_metric: str, objective: str,
              metric: str) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(_prune.prune(visual, text, keep, stage1_keep, text_mask, mask, mi_metric,
                              objective, metric))


@torch.library.custom_op(f"{_NS}::received_attention", mutates_args=())
def _received_attention_op(q: Tensor, k: Tensor, start: Tensor, length: int, queries: str,
                           query_mask: Optional[Tensor], heads: str, key_mask: Optional[Tensor],
                           scale: float) -> Tensor:
    return attention.received_attention(q, k, start, length, queries, query_mask, heads,
                                        key_mask, scale)


@torch.library.custom_op(f"{_NS}::dpp_map", mutates_args=())
def _dpp_map_op(x: Tensor, relevance: Tensor, k: int, mask: Optional[Tensor], eps: float) -> Tensor:
    return dpp.dpp_map(x, relevance, k, mask, eps)


@torch.library.custom_op(f"{_NS}::greedy_select_varlen", mutates_args=())
def _greedy_select_varlen_op(x: Tensor, cu_seqlens: Tensor, k: List[int], objective: str,
                             metric: str, mask: Optional[Tensor], start: int) -> Tensor:
    return greedy.greedy_select_varlen(x, cu_seqlens, k, objective, metric, mask,
                                       START_NAMES.get(start, start))


@torch.library.custom_op(f"{_NS}::prune_varlen", mutates_args=())
def _prune_varlen_op(visual: Tensor, cu_seqlens: Tensor, text: Tensor, keep: List[int],
                     stage1_keep: Tensor, text_mask: Optional[Tensor], mask: Optional[Tensor],
                     mi_metric: str, objective: str, metric: str) -> Tuple[Tensor, Tensor, Tensor]:
    return tuple(_prune.prune_varlen(visual, cu_seqlens, text, keep, stage1_keep, text_mask, mask,
                                     mi_metric, objective, metric))


@torch.library.custom_op(f"{_NS}::gather_compact_varlen", mutates_args=())
def _gather_compact_varlen_op(x: Tensor, cu_seqlens: Tensor, index: Optional[Tensor],
                              mask: Optional[Tensor], sort: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return gather.gather_compact_varlen(x, cu_seqlens, index, mask, sort)


@torch.library.custom_op(f"{_NS}::dpc_knn", mutates_args=())
def _dpc_knn_op(x: Tensor, num_centers: int, k: int,
                mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return video.dpc_knn(x, num_centers, k, mask)


@torch.library.custom_op(f"{_NS}::dpc_knn_varlen", mutates_args=())
def _dpc_knn_varlen_op(x: Tensor, cu_seqlens: Tensor, num_centers: List[int], k: int,
                       mask: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return video.dpc_knn_varlen(x, cu_seqlens, num_centers, k, mask)


@torch.library.custom_op(f"{_NS}::cluster_merge", mutates_args=())
def _cluster_merge_op(x: Tensor, centers: Tensor, assign: Optional[Tensor], metric: str,
                      mask: Optional[Tensor], weights: Optional[Tensor], include_centers: bool,
                      blend: Optional[float], blend_rule: str) -> Tuple[Tensor, Tensor, Tensor]:
    return video.cluster_merge(x, centers, assign, metric, mask, weights, include_centers, blend,
                               blend_rule)


@torch.library.custom_op(f"{_NS}::temporal_similarity", mutates_args=())
def _temporal_similarity_op(video_: Tensor, reference: Optional[List[int]], fill: float) -> Tensor:
    return video.temporal_similarity(video_, reference, fill)


oplib.register(_NS)
_ops = oplib.positional(_NS)
mi_scores, greedy_select, gather_compact, prune, received_attention, dpp_map = (
    _ops.mi_scores, _ops.greedy_select, _ops.gather_compact, _ops.prune, _ops.received_attention,
    _ops.dpp_map)
greedy_select_varlen, prune_varlen, gather_compact_varlen = (
    _ops.greedy_select_varlen, _ops.prune_varlen, _ops.gather_compact_varlen)
dpc_knn, dpc_knn_varlen, cluster_merge, temporal_similarity = (
    _ops.dpc_knn, _ops.dpc_knn_varlen, _ops.cluster_merge, _ops.temporal_similarity)
