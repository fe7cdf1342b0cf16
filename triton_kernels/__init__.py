"""Triton kernels of visprune (installed as ``visprune.triton_kernels``).

Each function has the positional signature of its twin in :mod:`visprune.reference` and
assumes arguments checked by :mod:`visprune.ops`.  Kernels accumulate in fp32; fp32 dot
products are true fp32 (``input_precision="ieee"``).
"""
from .gather import gather_compact
from .greedy import greedy_select
from .mi_scores import mi_scores
from .prune import prune

__all__ = ["mi_scores", "greedy_select", "gather_compact", "prune"]
