"""Published visual-token pruning methods, each a thin composition of :mod:`visprune.ops` and
the kernels it needs.  All are batched, take ``backend=`` and return :class:`PruneResult`."""
from .divprune import divprune
from .holov import holov
from .prumerge import prumerge, prumerge_cls_attention
from .trimtokenator import trimtokenator

__all__ = ["trimtokenator", "divprune", "prumerge", "prumerge_cls_attention", "holov"]
