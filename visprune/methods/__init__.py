"""Published visual-token pruning methods, each a thin composition of :mod:`visprune.ops` and
the kernels it needs.  All are batched, take ``backend=`` and return :class:`PruneResult`."""
from .cdpruner import cdpruner, dpp_map
from .dart import dart
from .divprune import divprune
from .dycoke import dycoke, dycoke_count
from .evs import evs, evs_count
from .fastvid import fastvid
from .holitom import holitom
from .holov import holov
from .prumerge import prumerge, prumerge_cls_attention
from .prunevid import prunevid
from .trimtokenator import trimtokenator
from .vidcom2 import vidcom2, vidcom2_count
from .visionzip import visionzip, visionzip_attention
from .vispruner import vispruner

__all__ = ["trimtokenator", "divprune", "prumerge", "prumerge_cls_attention", "holov",
           "visionzip", "visionzip_attention", "vispruner", "cdpruner", "dpp_map", "dart",
           "evs", "evs_count", "vidcom2", "vidcom2_count", "dycoke", "dycoke_count",
           "fastvid", "prunevid", "holitom"]
