"""Which backend runs an op: availability, the default for a device, the ``VISPRUNE_BACKEND`` override.

Each backend is a module exposing ``mi_scores``, ``greedy_select``, ``gather_compact``, ``prune``
and ``received_attention``, and the varlen ``greedy_select_varlen``, ``prune_varlen`` and
``gather_compact_varlen``, with the positional signatures of :mod:`visprune.reference` (``prune``
takes the stage-1 count, ``prune_varlen`` the int64 tensor of counts per segment).
"triton", "cpu" and "cuda" call ``torch.library`` ops (``torch.ops.visprune_triton.*``,
``torch.ops.visprune.*``), opaque to ``torch.compile``.  An explicitly requested backend
that cannot run raises ``RuntimeError`` naming what is missing; nothing falls back silently.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType
from typing import Dict, Optional, Tuple, Union

import torch

BACKENDS = ("reference", "triton", "cuda", "cpu")


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_status(device: Optional[torch.device]) -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError as e:  # pragma: no cover - triton is a dependency
        return False, f"triton is not importable ({e})"
    if device is not None and device.type == "cpu" and not interpreting():
        return False, ("triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                       "imported to run its kernels on CPU tensors")
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if device is None and not (torch.cuda.is_available() or interpreting()):
        return False, "no CUDA device and TRITON_INTERPRET is not set"
    return True, "ok"


def _extension_status(name: str, device: Optional[torch.device]) -> Tuple[bool, str]:
    from . import _ext  # never raises: a missing extension is reported by IMPORT_ERROR

    if _ext.IMPORT_ERROR is not None:
        return False, (f"the compiled extension visprune._C is not built or does not load "
                       f"({_ext.IMPORT_ERROR}); reinstall with a C++ compiler, without "
                       f"VISPRUNE_NO_EXT=1")
    if not (_ext.has_cuda() if name == "cuda" else _ext.has_cpu()):
        hint = (" (needs a CUDA build of torch and the CUDA toolkit at build time, or "
                "VISPRUNE_FORCE_CUDA=1)") if name == "cuda" else ""
        return False, f"visprune._C was built without its {name.upper()} kernels{hint}"
    if device is not None and device.type != name:
        return False, f"the {name!r} backend runs on {name} tensors, got tensors on {device}"
    return True, "ok"


def _device(device: Union[None, str, int, torch.device]) -> Optional[torch.device]:
    """``device`` as a ``torch.device`` (a string such as ``"cuda:1"`` or an index, as torch
    takes them), or None."""
    if device is None or isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch.device, a device string such as 'cpu' or "
                         f"'cuda:1', or None, got {device!r}") from e


def backend_status(name: str, device: Union[None, str, int, torch.device] = None
                   ) -> Tuple[bool, str]:
    """``(available, reason)`` of backend ``name`` for tensors on ``device`` (None: any)."""
    device = _device(device)
    if name == "reference":
        return True, "ok"
    if name == "triton":
        return _triton_status(device)
    if name in ("cuda", "cpu"):
        return _extension_status(name, device)
    raise ValueError(f"backend must be one of {(None,) + BACKENDS}, got {name!r}")


def available_backends(device: Union[None, str, int, torch.device] = None) -> Dict[str, str]:
    """Map each backend name to ``"ok"`` or the reason it cannot run (on ``device`` if given:
    a ``torch.device`` or a string such as ``"cpu"`` or ``"cuda:1"``)."""
    device = _device(device)
    return {name: backend_status(name, device)[1] for name in BACKENDS}


def default_backend(device: torch.device) -> str:
    """The fastest backend available for tensors on ``device``, unless ``VISPRUNE_BACKEND`` says."""
    forced = os.environ.get("VISPRUNE_BACKEND")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"VISPRUNE_BACKEND names an unknown backend: must be one of "
                             f"{BACKENDS}, got {forced!r}")
        return forced
    if device.type == "cuda":
        return "triton" if backend_status("triton", device)[0] else "reference"
    return "cpu" if backend_status("cpu", device)[0] else "reference"


def checked_name(backend: Optional[str], device: torch.device) -> str:
    """The backend that runs an op for tensors on ``device``; raises if it cannot run."""
    name = default_backend(device) if backend is None else backend
    ok, why = backend_status(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not available: {why}")
    return name


def module(name: str) -> ModuleType:
    """The module implementing backend ``name`` (checked with :func:`checked_name`)."""
    # Import statements, not importlib: torch.compile traces them (it refuses importlib), so a
    # compiled call may be the first one.
    if name == "reference":
        from . import reference as found
    elif name == "triton":
        from . import triton_kernels as found
    else:
        from . import _ext as found
    return found


def resolve(backend: Optional[str], device: torch.device) -> ModuleType:
    """The module that runs the op for tensors on ``device``; raises if it cannot."""
    return module(checked_name(backend, device))
