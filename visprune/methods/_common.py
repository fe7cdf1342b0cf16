"""What the methods share: argument checks and which implementation runs their own kernels."""
from __future__ import annotations

from typing import Optional

import torch

from ..backends import checked_name
from ..ops import _same_device


def use_triton(backend: Optional[str], device: torch.device) -> bool:
    """Whether a method's own kernels run in Triton (``"triton"``) or in plain PyTorch (any other
    backend).  ``None`` resolves like the ops; an explicit backend that cannot run raises."""
    return checked_name(backend, device) == "triton"


def matching(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, layout: str,
             dims: int) -> None:
    """``t`` agrees with ``ref`` on the first ``dims`` dimensions and lives on the same device."""
    want = tuple(ref.shape[:dims])
    if tuple(t.shape[:dims]) != want:
        raise ValueError(f"{name} must have shape {layout} with {'×'.join(map(str, want))} "
                         f"leading dims matching {ref_name}, got {tuple(t.shape)}")
    _same_device(ref_name, ref, name, t)
