"""visprune: fused kernels for training-free visual-token pruning in multimodal models."""
from . import ops, reference
from .backends import available_backends
from .reference import PruneResult

__version__ = "0.1.0"
__all__ = ["ops", "reference", "available_backends", "PruneResult", "__version__"]
