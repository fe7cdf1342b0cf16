"""Which implementation runs a method's own kernels."""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import checked_name


def use_triton(backend: Optional[str], device: torch.device) -> bool:
    """Whether a method's own kernels run in Triton (``"triton"``) or in plain PyTorch (any other
    backend).  ``None`` resolves like the ops; an explicit backend that cannot run raises."""
    return checked_name(backend, device) == "triton"
