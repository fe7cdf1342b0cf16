"""The video methods in the transformers integration: one table entry per method.

A video method takes one batch of videos ``video[B, T, P, D]`` (``T`` frames of ``P`` merged
tokens, ``frames=`` for videos of different lengths) and returns ``PruneResult(tokens[B, L, D],
indices[B, L], lengths[B])``: ``indices`` are positions in the flattened ``T·P``, and a token may
be synthesised (merged), in which case it sits at its anchor's position.  What differs between
methods is written in :data:`VIDEO_METHODS`:

* ``parameter``: the method's own budget argument, and ``budget(keep, T, P)``, the value that
  the integration's ``keep`` (an int count or a float fraction of each video's ``T·P`` tokens)
  gives it for one video;
* ``needs``: what the integration computes from the vision tower and passes as the method's
  second argument (``"saliency"``: FastVID's score of each merged token; ``"attention"``: the
  mean attention each merged token receives in the tower's last block), or ``None``;
* ``merges``: whether the method synthesises tokens (they are not rows of its input);
* ``fixed``: arguments the integration sets (FastVID's ``variant``).

The function is looked up in :mod:`visprune.methods` by name when pruning is enabled, so a
method not in the installed package is refused there with a clear message.

Budgets (``keep`` → the method's parameter), per video of ``T`` frames of ``P`` tokens,
``N = T·P``:

========  ================  =================================================================
method    parameter         from ``keep``
========  ================  =================================================================
evs       ``q``             fraction ``f``: ``q = 1 - f`` (EVS keeps ``max(P, int(N·(1-q)))``);
                            count ``c``: the ``q`` that keeps ``max(P, min(c, N))``
vidcom2   ``q``             fraction: ``q = 1 - f`` (keeps ``max(T, min(int(N·(1-q)), N))``);
                            count: the ``q`` that keeps ``max(T, min(c, N))``
dycoke    ``k``             fraction: ``k = 1 - f`` (each compared frame keeps
                            ``int((1-k)·P)``, the whole frames stay whole); count: the ``k``
                            whose count (``dycoke_count``) is the largest not above ``c``
                            (``k = 1`` where even that is above: only the whole frames)
fastvid   ``r``             fraction: ``r = f``; count: ``r = min(1, c/N)`` (FastVID's own
                            rounding per frame and segment decides the count)
holitom   ``retain_ratio``  as fastvid
prunevid  ``cluster_ratio`` as fastvid: the share of each group's tokens its clusters keep
                            (a group of at most ``max_unclustered`` tokens stays whole, and
                            the static merge removes more, so the count is the method's own)
========  ================  =================================================================
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, NamedTuple, Optional

from ... import methods
from ...methods import dycoke_count, evs_count, vidcom2_count

__all__ = ["VideoMethod", "VIDEO_METHODS", "video_function", "video_parameter"]


class VideoMethod(NamedTuple):
    """One video method's entry; see the module docstring."""

    parameter: str
    budget: Callable
    needs: Optional[str] = None
    merges: bool = False
    fixed: tuple = ()


def _rate_for(total: int, target: int) -> float:
    """The largest ``q`` in ``[0, 1)`` with ``int(total·(1 - q)) >= target`` (``0 < target <=
    total``), in the Python float arithmetic the methods count with: ``1 - target/total``,
    lowered by the few ulps that its rounding may need."""
    q = 1.0 - target / total
    while int(total * (1 - q)) < target:
        q = math.nextafter(q, 0.0)      # ends: q = 0 keeps total >= target
    return q


def _rate(keep, T: int, P: int) -> float:
    """EVS's and VidCom2's ``q``: ``1 - keep`` for a fraction, else the ``q`` whose
    ``int(T·P·(1 - q))`` is ``min(keep, T·P)`` (the method's floor, one frame or one token per
    frame, still applies)."""
    if isinstance(keep, float):
        return 1.0 - keep
    return _rate_for(T * P, min(keep, T * P))


def _dycoke_k(keep, T: int, P: int) -> float:
    """DyCoke's ``k``: ``1 - keep`` for a fraction; for a count, the ``k`` whose
    ``int((1 - k)·P)`` tokens per compared frame give the largest count not above ``keep``
    (``k = 1``, none, where the whole frames alone are above it)."""
    if isinstance(keep, float):
        return 1.0 - keep
    n = 0
    for m in range(P, 0, -1):
        if dycoke_count(P, T, _rate_for(P, m)) <= keep:
            n = m
            break
    return 1.0 if n == 0 else _rate_for(P, n)


def _share(keep, T: int, P: int) -> float:
    """FastVID's ``r``, HoliTom's ``retain_ratio`` and PruneVid's ``cluster_ratio``: the
    fraction, or ``count / (T·P)`` (at most 1)."""
    if isinstance(keep, float):
        return keep
    return min(1.0, keep / (T * P))


VIDEO_METHODS = {
    "evs": VideoMethod("q", _rate),
    "vidcom2": VideoMethod("q", _rate),
    "dycoke": VideoMethod("k", _dycoke_k),
    "fastvid": VideoMethod("r", _share, needs="saliency", merges=True,
                           fixed=(("variant", "qwen2_5_vl"),)),
    "holitom": VideoMethod("retain_ratio", _share, needs="attention", merges=True),
    "prunevid": VideoMethod("cluster_ratio", _share, merges=True),
}

# what each entry's budget gives a video, for the methods with a count function here
COUNTS = {"evs": evs_count, "vidcom2": vidcom2_count, "dycoke": dycoke_count}


def video_parameter(method: str, keep, T: int, P: int):
    """The value of ``method``'s own budget parameter that ``keep`` gives a video of ``T``
    frames of ``P`` tokens."""
    return VIDEO_METHODS[method].budget(keep, T, P)


def video_function(method: str):
    """``(function, supplied)``: the method's function in :mod:`visprune.methods` and the
    argument names the integration fills in (the video, its score, ``frames``, the fixed ones);
    ``ValueError`` when the installed package does not have it."""
    fn = getattr(methods, method, None)
    if fn is None:
        raise ValueError(f"{method} is not available: this installation's visprune.methods has "
                         f"no {method}")
    entry = VIDEO_METHODS[method]
    names = list(inspect.signature(fn).parameters)
    supplied = {names[0], "frames", "global_features", *dict(entry.fixed)}
    if entry.needs is not None:
        supplied.add(names[1])
    return fn, supplied
