"""visprune: fused kernels for training-free visual-token pruning in multimodal models."""
from . import ops
from .backends import available_backends
from .common import PruneResult

__version__ = "0.1.0"
__all__ = ["ops", "reference", "available_backends", "PruneResult", "enable", "fitprune", "__version__"]


def __getattr__(name):
    # The reference is the tests' oracle, imported by no production module; fitprune needs
    # transformers for its calibration: both are loaded on first use.
    if name in ("reference", "fitprune"):
        import importlib
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'visprune' has no attribute {name!r}")


def enable(model, method="trimtokenator", keep=None, **method_kwargs):
    """Prune a Hugging Face LLaVA model's visual tokens; returns a handle to ``disable()``.

    Pre-LLM methods (``trimtokenator``, ``divprune``, ``holov``, ``prumerge``) prune between the
    projector and the language model; in-LLM methods (``fastv`` with ``keep`` and ``layer``,
    ``fitprune`` with ``recipe``, ``dart`` with ``keep`` and ``layer``) between decoder layers.
    Video methods (``evs``, ``vidcom2``, ``dycoke``, ...) prune Qwen2.5-VL / Qwen3-VL videos.

    See :func:`visprune.integrations.transformers.enable`.  transformers is imported on the
    first call, not by ``import visprune`` (``pip install visprune[transformers]``).
    """
    from .integrations.transformers import enable as _enable
    return _enable(model, method, keep, **method_kwargs)
