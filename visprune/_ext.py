"""The compiled backends ("cpu", "cuda"): thin wrappers over ``torch.ops.visprune.*``.

The ops are registered by the C++ extension ``visprune._C`` (``csrc/ops.cpp``) with
``TORCH_LIBRARY``; loading it is what makes ``torch.ops.visprune`` exist.  Importing this module
never fails: when the extension is missing, :func:`has_cpu` / :func:`has_cuda` are False and
:data:`IMPORT_ERROR` says why.  The functions take the positional signatures of
:mod:`visprune.reference`; arguments are validated by :mod:`visprune.ops` (C++ repeats only the
structural checks, which read no tensor data).

:func:`visprune.oplib.register` gives the ops their fake implementations (so
``torch.compile(fullgraph=True)`` traces them without running them) and the gather's autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import oplib

try:
    from . import _C
    IMPORT_ERROR: Optional[str] = None
except ImportError as e:  # not built (no compiler, VISPRUNE_NO_EXT=1) or built for another torch
    _C = None
    IMPORT_ERROR = str(e)


# Plain constants, so that torch.compile traces the availability checks of visprune.backends.
_HAS_CPU = _C is not None and bool(_C.has_cpu())
_HAS_CUDA = _C is not None and bool(_C.has_cuda())


def has_cpu() -> bool:
    """Whether the CPU kernels are available."""
    return _HAS_CPU


def has_cuda() -> bool:
    """Whether the CUDA kernels were compiled in."""
    return _HAS_CUDA


if _C is not None:
    oplib.register("visprune", holov_variance=True)
    _ops = oplib.positional("visprune")
    mi_scores, greedy_select = _ops.mi_scores, _ops.greedy_select
    gather_compact, prune = _ops.gather_compact, _ops.prune
    received_attention = _ops.received_attention
    dpp_map = _ops.dpp_map                 # CDPruner's DPP MAP (visprune.methods.cdpruner)
    # HoloV's crop statistics (visprune.methods.holov), CPU only: (features, num_crops)
    holov_variance = torch.ops.visprune.holov_variance
    greedy_select_varlen, prune_varlen = _ops.greedy_select_varlen, _ops.prune_varlen
    gather_compact_varlen = _ops.gather_compact_varlen
    dpc_knn, dpc_knn_varlen = _ops.dpc_knn, _ops.dpc_knn_varlen   # CPU only, as the two below
    cluster_merge, temporal_similarity = _ops.cluster_merge, _ops.temporal_similarity
