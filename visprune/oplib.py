"""The ``torch.library`` side every compiled backend shares ("triton": ``torch.ops.visprune_triton``,
"cpu" / "cuda": ``torch.ops.visprune``): the ops' fake (meta) implementations, which let
``torch.compile`` trace them as opaque ops, the gather's autograd rule, and the functions that
call them with the positional signatures of :mod:`visprune.reference`.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from .common import START_CODES, PruneResult


def _mi_scores_fake(visual, text, text_mask, metric):
    return visual.new_empty(visual.shape[:2], dtype=torch.float32)


def _greedy_select_fake(x, k, objective, metric, mask, start):
    return x.new_empty((x.shape[0], k), dtype=torch.long)


def _gather_compact_fake(x, index, mask, sort):
    # The mask form keeps as many rows as the mask has True entries: a data-dependent size.
    kept = index.shape[1] if index is not None else torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((x.shape[0], kept, x.shape[2])),
            x.new_empty((x.shape[0], kept), dtype=torch.long))


def _prune_fake(visual, text, keep, stage1_keep, text_mask, mask, mi_metric, objective, metric):
    B, _, D = visual.shape
    return (visual.new_empty((B, keep, D)), visual.new_empty((B, keep), dtype=torch.long),
            visual.new_empty((B,), dtype=torch.long))


def _greedy_select_varlen_fake(x, cu_seqlens, k, objective, metric, mask, start):
    return x.new_empty((sum(k),), dtype=torch.long)


def _prune_varlen_fake(visual, cu_seqlens, text, keep, stage1_keep, text_mask, mask, mi_metric,
                       objective, metric):
    return (visual.new_empty((sum(keep), visual.shape[1])),
            visual.new_empty((sum(keep),), dtype=torch.long),
            visual.new_empty((len(keep),), dtype=torch.long))


def _gather_compact_varlen_fake(x, cu_seqlens, index, mask, sort):
    kept = index.shape[0] if index is not None else torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty((kept, x.shape[1])), x.new_empty((kept,), dtype=torch.long),
            x.new_empty(cu_seqlens.shape, dtype=torch.long))


def _received_attention_fake(q, k, start, length, queries, query_mask, heads, key_mask, scale):
    return q.new_empty((q.shape[0], length), dtype=torch.float32)


def _dpp_map_fake(x, relevance, k, mask, eps):
    return x.new_empty((x.shape[0], k), dtype=torch.long)


def _holov_variance_fake(features, num_crops):
    return features.new_empty(features.shape[:2], dtype=torch.float32)


def _dpc_knn_fake(x, num_centers, k, mask):
    B, N, _ = x.shape
    return (x.new_empty((B, num_centers), dtype=torch.long),
            x.new_empty((B, N), dtype=torch.long),
            *(x.new_empty((B, N), dtype=torch.float32) for _ in range(3)))


def _dpc_knn_varlen_fake(x, cu_seqlens, num_centers, k, mask):
    T = x.shape[0]
    return (x.new_empty((sum(num_centers),), dtype=torch.long),
            x.new_empty((T,), dtype=torch.long),
            *(x.new_empty((T,), dtype=torch.float32) for _ in range(3)))


def _cluster_merge_fake(x, centers, assign, metric, mask, weights, include_centers, blend,
                        blend_rule):
    B, C = centers.shape
    return (x.new_empty((B, C, x.shape[2])), x.new_empty((B, C), dtype=torch.long),
            x.new_empty((B, C), dtype=torch.float32))


def _temporal_similarity_fake(video, reference, fill):
    return video.new_empty(video.shape[:3], dtype=torch.float32)


def _register_gather_grad(qualname: str, n_inputs: int) -> None:
    """Autograd of an op whose outputs start with ``(tokens[B, K, D], indices[B, K])`` gathered
    from its first input ``x[B, N, D]`` (``gather_compact``, ``prune``), or ``(tokens[K, D],
    indices[K])`` from ``x[T, D]`` (their varlen forms): ``tokens`` is
    differentiable w.r.t. ``x`` on every backend, as ``torch.gather`` makes it in the reference;
    the selection itself is discrete and passes no gradient.  Every other input gets ``None``."""

    def setup_context(ctx, inputs, output):
        ctx.x_shape = inputs[0].shape
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_tokens, *_):
        if grad_tokens is None:
            return (None,) * n_inputs
        (index,) = ctx.saved_tensors
        grad = grad_tokens.new_zeros(ctx.x_shape)
        if grad_tokens.numel():
            grad.scatter_add_(index.dim() - 1,
                              index[..., None].expand(*index.shape, ctx.x_shape[-1]), grad_tokens)
        return (grad,) + (None,) * (n_inputs - 1)

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def register(ns: str, *, holov_variance: bool = False) -> None:
    """Fake implementations of the ops of namespace ``ns`` and the gather autograd;
    ``holov_variance``: the namespace also has that op (the C++ extension's CPU kernel)."""
    torch.library.register_fake(f"{ns}::mi_scores")(_mi_scores_fake)
    torch.library.register_fake(f"{ns}::greedy_select")(_greedy_select_fake)
    torch.library.register_fake(f"{ns}::gather_compact")(_gather_compact_fake)
    torch.library.register_fake(f"{ns}::prune")(_prune_fake)
    torch.library.register_fake(f"{ns}::received_attention")(_received_attention_fake)
    torch.library.register_fake(f"{ns}::dpp_map")(_dpp_map_fake)
    if holov_variance:
        torch.library.register_fake(f"{ns}::holov_variance")(_holov_variance_fake)
    torch.library.register_fake(f"{ns}::greedy_select_varlen")(_greedy_select_varlen_fake)
    torch.library.register_fake(f"{ns}::prune_varlen")(_prune_varlen_fake)
    torch.library.register_fake(f"{ns}::gather_compact_varlen")(_gather_compact_varlen_fake)
    torch.library.register_fake(f"{ns}::dpc_knn")(_dpc_knn_fake)
    torch.library.register_fake(f"{ns}::dpc_knn_varlen")(_dpc_knn_varlen_fake)
    torch.library.register_fake(f"{ns}::cluster_merge")(_cluster_merge_fake)
    torch.library.register_fake(f"{ns}::temporal_similarity")(_temporal_similarity_fake)
    _register_gather_grad(f"{ns}::gather_compact", 4)
    _register_gather_grad(f"{ns}::prune", 9)
    _register_gather_grad(f"{ns}::gather_compact_varlen", 5)
    _register_gather_grad(f"{ns}::prune_varlen", 10)


def positional(ns: str) -> SimpleNamespace:
    """``mi_scores``, ``greedy_select``, ``gather_compact``, ``prune`` and ``received_attention``
    calling ``torch.ops.<ns>`` with the reference's positional signatures (``start="auto"`` is -1
    in the schemas; ``prune`` takes the stage-1 survivor count,
    :func:`visprune.common.stage1_count`; ``received_attention`` takes ``start`` as an int64
    tensor ``[B]``, and its query-row mask as ``queries="mask"`` plus the mask), and CDPruner's
    ``dpp_map(x, relevance, k, mask, eps)`` (:mod:`visprune.methods.cdpruner`), and the varlen
    ops ``greedy_select_varlen``, ``prune_varlen`` (``keep`` a list of ints, ``stage1_keep`` an
    int64 tensor ``[B]``: :func:`visprune.common.stage1_counts`) and ``gather_compact_varlen``."""
    ops = getattr(torch.ops, ns)

    def mi_scores(visual, text, text_mask=None, metric="l2"):
        return ops.mi_scores(visual, text, text_mask, metric)

    def greedy_select(x, k, objective="maxmin", metric="cosine", mask=None, start="auto"):
        return ops.greedy_select(x, k, objective, metric, mask, START_CODES.get(start, start))

    def gather_compact(x, index=None, mask=None, sort=True):
        return ops.gather_compact(x, index, mask, sort)

    def prune(visual, text, keep, stage1_keep, text_mask=None, mask=None, mi_metric="l2",
              objective="maxsum", metric="cosine") -> PruneResult:
        return PruneResult(*ops.prune(visual, text, keep, stage1_keep, text_mask, mask,
                                      mi_metric, objective, metric))

    def received_attention(q, k, start, length, queries="after", heads="max", key_mask=None,
                           scale=None):
        rows = queries if isinstance(queries, torch.Tensor) else None
        return ops.received_attention(q, k, start, length, "mask" if rows is not None else queries,
                                      rows, heads, key_mask,
                                      q.shape[-1] ** -0.5 if scale is None else scale)

    def dpp_map(x, relevance, k, mask, eps):
        return ops.dpp_map(x, relevance, k, mask, eps)

    def greedy_select_varlen(x, cu_seqlens, k, objective="maxmin", metric="cosine", mask=None,
                             start="auto"):
        return ops.greedy_select_varlen(x, cu_seqlens, list(k), objective, metric, mask,
                                        START_CODES.get(start, start))

    def prune_varlen(visual, cu_seqlens, text, keep, stage1_keep, text_mask=None, mask=None,
                     mi_metric="l2", objective="maxsum", metric="cosine") -> PruneResult:
        return PruneResult(*ops.prune_varlen(visual, cu_seqlens, text, list(keep), stage1_keep,
                                             text_mask, mask, mi_metric, objective, metric))

    def gather_compact_varlen(x, cu_seqlens, index=None, mask=None, sort=True):
        return ops.gather_compact_varlen(x, cu_seqlens, index, mask, sort)

    def dpc_knn(x, num_centers, k=5, mask=None):
        return ops.dpc_knn(x, num_centers, k, mask)

    def dpc_knn_varlen(x, cu_seqlens, num_centers, k=5, mask=None):
        return ops.dpc_knn_varlen(x, cu_seqlens, list(num_centers), k, mask)

    def cluster_merge(x, centers, assign=None, metric="l2", mask=None, weights=None,
                      include_centers=True, blend=None, blend_rule="clamp"):
        return ops.cluster_merge(x, centers, assign, metric, mask, weights, include_centers,
                                 blend, blend_rule)

    def temporal_similarity(video, reference=None, fill=float("-inf")):
        return ops.temporal_similarity(video, reference, fill)

    return SimpleNamespace(mi_scores=mi_scores, greedy_select=greedy_select,
                           gather_compact=gather_compact, prune=prune,
                           received_attention=received_attention, dpp_map=dpp_map,
                           greedy_select_varlen=greedy_select_varlen, prune_varlen=prune_varlen,
                           gather_compact_varlen=gather_compact_varlen, dpc_knn=dpc_knn,
                           dpc_knn_varlen=dpc_knn_varlen, cluster_merge=cluster_merge,
                           temporal_similarity=temporal_similarity)
