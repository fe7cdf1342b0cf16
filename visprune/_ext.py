"""The compiled backends ("cpu", "cuda"): thin wrappers over ``torch.ops.visprune.*``.

The ops are registered by the C++ extension ``visprune._C`` (``csrc/ops.cpp``) with
``TORCH_LIBRARY``; loading it is what makes ``torch.ops.visprune`` exist.  Importing this module
never fails: when the extension is missing, :func:`has_cpu` / :func:`has_cuda` are False and
:data:`IMPORT_ERROR` says why.  The functions take the positional signatures of
:mod:`visprune.reference`; arguments are validated by :mod:`visprune.ops` (C++ repeats only the
structural checks, which read no tensor data).

The fake (meta) implementations below let ``torch.compile(fullgraph=True)`` trace the ops
without running them; gather_compact's mask form returns a data-dependent number of rows.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .common import PruneResult, register_gather_grad

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
    @torch.library.register_fake("visprune::mi_scores")
    def _mi_scores_fake(visual, text, text_mask, metric):
        return visual.new_empty(visual.shape[:2], dtype=torch.float32)

    @torch.library.register_fake("visprune::greedy_select")
    def _greedy_select_fake(x, k, objective, metric, mask, start):
        return x.new_empty((x.shape[0], k), dtype=torch.long)

    @torch.library.register_fake("visprune::gather_compact")
    def _gather_compact_fake(x, index, mask, sort):
        kept = index.shape[1] if index is not None else torch.library.get_ctx().new_dynamic_size()
        return (x.new_empty((x.shape[0], kept, x.shape[2])),
                x.new_empty((x.shape[0], kept), dtype=torch.long))

    @torch.library.register_fake("visprune::prune")
    def _prune_fake(visual, text, keep, stage1_keep, text_mask, mask, mi_metric, objective, metric):
        B, _, D = visual.shape
        return (visual.new_empty((B, keep, D)), visual.new_empty((B, keep), dtype=torch.long),
                visual.new_empty((B,), dtype=torch.long))

    register_gather_grad("visprune::gather_compact")
    register_gather_grad("visprune::prune")


def mi_scores(visual: torch.Tensor, text: torch.Tensor, text_mask: Optional[torch.Tensor] = None,
              metric: str = "l2") -> torch.Tensor:
    return torch.ops.visprune.mi_scores(visual, text, text_mask, metric)


def greedy_select(x: torch.Tensor, k: int, objective: str = "maxmin", metric: str = "cosine",
                  mask: Optional[torch.Tensor] = None, start: Union[str, int] = "auto") -> torch.Tensor:
    return torch.ops.visprune.greedy_select(x, k, objective, metric, mask,
                                            -1 if start == "auto" else start)


def gather_compact(x: torch.Tensor, index: Optional[torch.Tensor] = None,
                   mask: Optional[torch.Tensor] = None, sort: bool = True):
    return torch.ops.visprune.gather_compact(x, index, mask, sort)


def prune(visual: torch.Tensor, text: torch.Tensor, keep: int, stage1_keep: int,
          text_mask: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
          mi_metric: str = "l2", objective: str = "maxsum", metric: str = "cosine") -> PruneResult:
    """``stage1_keep`` is the survivor count (:func:`visprune.common.stage1_count`)."""
    return PruneResult(*torch.ops.visprune.prune(visual, text, keep, stage1_keep, text_mask, mask,
                                                 mi_metric, objective, metric))
