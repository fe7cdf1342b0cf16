"""Visual-token pruning inside Hugging Face transformers' multimodal models.

``enable(model, method, ...)`` is the one entry point; it picks where the method prunes:

* pre-LLM methods (``trimtokenator``, ``divprune``, ``holov``, ``prumerge``, ``visionzip``,
  ``vispruner``, ``cdpruner``) prune each image's tokens between the projector and the language
  model: LLaVA-1.5 / LLaVA-NeXT in :mod:`.llava`, Qwen2.5-VL / Qwen3-VL (images and videos,
  original M-RoPE positions kept) in :mod:`.qwen`;
* video methods (``evs``, ``vidcom2``, ``dycoke``, ``fastvid``, ``holitom``, ``prunevid``)
  prune each video's merged tokens on Qwen2.5-VL / Qwen3-VL (the merging ones on Qwen2.5-VL;
  :mod:`.qwen`; the table and the budget mapping in :mod:`.video`);
* in-LLM methods (``fastv``, ``fitprune``, ``dart``) prune visual tokens between decoder layers,
  with the layers' own SDPA/eager attention (:mod:`.inllm`).
"""
from __future__ import annotations

from ... import checks
from .inllm import INLLM_METHODS, InLLMHandle
from .llava import METHODS as PRE_LLM_METHODS
from .llava import PruningHandle, _cls_attention, active_handle  # noqa: F401  (_cls_attention: tests)
from .qwen import QWEN_METHODS, QwenPruningHandle
from .qwen import SUPPORTED as _QWEN
from .video import VIDEO_METHODS as _VIDEO

__all__ = ["enable", "active_handle", "PruningHandle", "QwenPruningHandle", "InLLMHandle", "METHODS",
           "PRE_LLM_METHODS", "QWEN_METHODS", "INLLM_METHODS", "VIDEO_METHODS"]

VIDEO_METHODS = tuple(_VIDEO)
METHODS = PRE_LLM_METHODS + INLLM_METHODS + VIDEO_METHODS


def enable(model, method: str = "trimtokenator", keep=None, **method_kwargs):
    """Prune ``model``'s visual tokens with ``method`` until the returned handle is disabled.

    Pre-LLM methods: see :class:`visprune.integrations.transformers.llava.PruningHandle`
    (LLaVA) and :class:`visprune.integrations.transformers.qwen.QwenPruningHandle` (Qwen2.5-VL,
    Qwen3-VL: ``keep`` an int or a fraction per image / video, ``per_frame=True`` for a budget
    per video frame; video methods ``evs``, ``vidcom2``, ``dycoke``, ... with ``keep`` per
    video or the method's own budget parameter).  In-LLM methods:
    ``enable(model, "fastv", keep=..., layer=2)``, ``enable(model, "fitprune", recipe=...)`` and
    ``enable(model, "dart", keep=..., layer=2)``,
    see :class:`visprune.integrations.transformers.inllm.InLLMHandle`.
    """
    checks.choice("method", method, METHODS)
    if method in INLLM_METHODS:
        return InLLMHandle(model, method, keep, method_kwargs)
    if isinstance(model, _QWEN):
        return QwenPruningHandle(model, method, keep, method_kwargs)
    if method in VIDEO_METHODS:
        raise ValueError(f"{method} prunes videos on Qwen2.5-VL and Qwen3-VL "
                         f"({', '.join(c.__name__ for c in _QWEN)}), got "
                         f"{type(model).__name__}")
    return PruningHandle(model, method, keep, method_kwargs)
