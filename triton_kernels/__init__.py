"""Triton kernels of visprune (installed as ``visprune.triton_kernels``).

The launchers live one family a file (``mi_scores``, ``greedy``, ``gather``, ``prune``,
``attention``, ``video``, and the methods' ``holov`` and ``prumerge``); :mod:`.library` registers the ops with
``torch.library`` as ``torch.ops.visprune_triton.*``, so ``torch.compile`` treats them as opaque
ops, like the C++ ones.  The functions exported here call those ops with the positional
signatures of :mod:`visprune.reference` and assume arguments checked by :mod:`visprune.ops`.
Kernels accumulate in fp32; fp32 dot products are true fp32 (``input_precision="ieee"``).
"""
from .library import (cluster_merge, dpc_knn, dpc_knn_varlen, dpp_map, gather_compact,
                      gather_compact_varlen, greedy_select, greedy_select_varlen, mi_scores, prune,
                      prune_varlen, received_attention, temporal_similarity)

__all__ = ["mi_scores", "greedy_select", "gather_compact", "prune", "received_attention",
           "dpp_map", "greedy_select_varlen", "prune_varlen", "gather_compact_varlen", "dpc_knn",
           "dpc_knn_varlen", "cluster_merge", "temporal_similarity"]
