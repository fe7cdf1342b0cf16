"""VisPruner (Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective
Token Pruning in VLMs", ICCV 2025; github Theia-4869/VisPruner): important tokens by the vision
encoder's CLS attention, then diverse ones by removing duplicates from the rest.

The original (``LlavaMetaForCausalLM.encode_images`` in ``llava/model/llava_arch.py``) keeps
``T = visual_token_num`` tokens per image:

1. ``T_imp = int(T · important_ratio)`` important tokens: the highest CLS→patch attention,
   averaged over heads, of the CLIP layer whose output are the features (``select_layer``, -2 in
   LLaVA-1.5: ``attentions[-2][:, :, 0, 1:].mean(1)``).
2. ``T_div = T - T_imp`` diverse tokens from the others, kept as a list in descending attention
   order.  Rounds until ``T_div`` remain: with ``R`` tokens left, ``r = min(8, R - T_div)``; the
   list's even positions form ``A``, its odd positions ``B``; each ``a ∈ A`` scores
   ``max_b cos(a, b)``; the ``r`` tokens of ``A`` with the highest scores are removed, and the new
   list is ``A``'s survivors (by descending score) followed by ``B``.
3. The ``T`` tokens are fed to the LLM in original order (a boolean mask over the patches).

Here every round runs on all images at once (every row has the same ``R`` and ``r``), and the
cosines come from one Gram matrix of the ``N - T_imp`` candidates computed before the rounds
instead of a fresh ``A Bᵀ`` product per round (about 4x fewer flops at N=576, where there are
~64 rounds; memory ``B·(N - T_imp)²`` floats, 1.2 MB per image at N=576).

Deviations from the original, all where it crashes, is undefined or rounds differently:

* **The even half's index fix.**  The original gathers ``A``'s survivors with a row index of
  width ``R//2 - r`` (``|B| - r``) instead of ``|A| - r``.  For even ``R`` the two agree.  For
  odd ``R`` (``|A| = |B| + 1``) the two index tensors do not broadcast, so it raises an
  ``IndexError`` unless ``R//2 - r`` is 1 (then correct) or 0 (then it keeps no ``A`` token:
  one too few).  ``R`` is odd from the start whenever ``N - T_imp`` is odd: at N=576 and ratio
  0.5, 288 of the 576 budgets raise (keep 66 does, keep 64 does not).  With few tokens left,
  ``r`` may exceed ``|A|`` (``R - T_div > ⌈R/2⌉`` while ``8 > ⌈R/2⌉``, i.e. small ``T_div``:
  keep 1, 4, 8 at N=576): the original expands to a negative width and raises, or, when
  ``r = |A| + 1``, removes all of ``A`` (one too many).  A one-too-few round and a one-too-many
  round can compensate, so the original may return ``T`` tokens that are not the fixed rounds'.
  Here ``r = min(8, R - T_div, ⌈R/2⌉)`` and ``|A| - r`` survivors are kept: exactly ``T`` tokens
  come out, and wherever the original takes only its correct branch the result is the same.
* **Arithmetic** in float32 for fp16/bf16 inputs (the original computes norms and products in the
  model's dtype, fp16 in its scripts) and in float64 for float64 inputs.  Fp32 products are true
  fp32 (no TF32).  The removal ranking is numerically fragile: neighbouring max-cosines are close,
  so runs of the original in fp32 and fp64 themselves often disagree at N=576.
* **Ties.**  Every sort is stable (the original's ``argsort`` is not): attention ties go to the
  lowest token index; equal duplicate scores keep the order of the current list (the earlier
  ``A`` token ranks higher, i.e. is removed first).
* **Degenerate values.**  ``cls_attn`` is ranked in float32 with NaN after every real value
  (the original ranks NaN first); a zero-norm token has cosine 0 with everything (the original's
  ``x / ||x||`` gives NaN).  A NaN max-cosine ranks highest and is removed first, as in the
  original.  Indices are unique and in range for any input.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import checks, ops
from ..backends import checked_name
from ..common import EPS, PruneResult, descending_order, true_fp32

__all__ = ["vispruner", "split_budget", "remove_duplicates"]

IMPORTANT_RATIO = 0.5    # the original's default (--important_ratio in llava/eval/*.py)
ROUND = 8                # the original's largest removal per round
DTYPES = checks.FLOATS + (torch.float64,)


def split_budget(keep: int, important_ratio: float) -> tuple:
    """``(T_imp, T_div)`` as the original: ``T_imp = int(keep · important_ratio)`` in Python
    float arithmetic (so ``int(10 · 0.7) = 7`` but ``int(100 · 0.29) = 28``)."""
    important = int(keep * important_ratio)
    return important, keep - important


def remove_duplicates(features: torch.Tensor, residual: torch.Tensor,
                      diverse: int) -> torch.Tensor:
    """``int64[B, diverse]``: VisPruner's duplicate removal, batched.

    ``residual[B, R]``: candidate positions in ``features[B, N, D]``, in the order the rounds
    start from (descending attention).  Returns the survivors in the rounds' final list order.
    The cosines of the candidates are one ``[B, R, R]`` Gram matrix; the rounds work on
    positions in ``residual`` and gather their ``A × B`` block from it.  A cosine is
    ``a·b / (max(|a|, 1e-12) · max(|b|, 1e-12))`` (``F.normalize``).
    """
    B, R0 = residual.shape
    compute = torch.float64 if features.dtype == torch.float64 else torch.float32
    picked = features.gather(1, residual[:, :, None].expand(-1, -1, features.shape[-1]))
    unit = F.normalize(picked.to(compute), dim=-1, eps=EPS)
    with true_fp32():
        gram = (unit @ unit.transpose(1, 2)).reshape(B, R0 * R0)
    position = torch.arange(R0, device=residual.device).expand(B, R0)
    while True:
        R = position.shape[1]
        evens, odds = position[:, ::2], position[:, 1::2]        # A: ⌈R/2⌉ tokens, B: ⌊R/2⌋
        r = min(ROUND, R - diverse, evens.shape[1])      # the fix: at most all of A
        if r <= 0:
            return residual.gather(1, position)
        na, nb = evens.shape[1], odds.shape[1]
        pairs = (evens[:, :, None] * R0 + odds[:, None, :]).reshape(B, na * nb)
        score = gram.gather(1, pairs).reshape(B, na, nb).amax(-1)
        # torch ranks NaN above every number: a token with a NaN cosine goes first, as in the
        # original; stable, so equal scores keep the list's order
        survivors = score.sort(dim=-1, descending=True, stable=True).indices[:, r:]
        position = torch.cat([evens.gather(1, survivors), odds], dim=1)


def vispruner(features: torch.Tensor, cls_attn: torch.Tensor, keep: int, *,
              important_ratio: float = IMPORTANT_RATIO,
              backend: Optional[str] = None) -> PruneResult:
    """VisPruner: ``PruneResult(tokens[B, keep, D], indices[B, keep] (ascending), lengths = keep)``.

    Args:
        features: ``[B, N, D]`` the vision encoder's patch features at ``select_layer`` (CLS
            removed), before the projector: the cosines are taken on them.  The projector acts
            per token, so projecting the kept tokens equals keeping the projected ones.
            fp32/fp16/bf16 (computed in fp32) or float64 (computed in float64).
        cls_attn: ``[B, N]`` CLS→patch attention probabilities of the same encoder layer,
            averaged over heads (``attentions[select_layer][:, :, 0, 1:].mean(1)``).
        keep: tokens kept per image, ``1 <= keep <= N`` (the original's ``visual_token_num``).
        important_ratio: fraction in ``[0, 1]`` of ``keep`` chosen by attention,
            ``int(keep · important_ratio)`` tokens; the rest are the diverse ones.
        backend: validated like the ops (``None``: the device's default) and used for the final
            :func:`visprune.ops.gather_compact`; the rounds are plain PyTorch on every backend.

    Output order is the original's: the kept tokens in original (ascending index) order, as its
    boolean index mask feeds them to the LLM.  See the module docstring for the deviations.
    """
    checks.tensor("features", features, 3, "[B, N, D]", dtypes=DTYPES)
    checks.tensor("cls_attn", cls_attn, 2, "[B, N]", dtypes=DTYPES)
    checks.matching("cls_attn", cls_attn, "features", features, "[B, N]", 2)
    B, N, _ = features.shape
    keep = checks.integer("keep", keep)
    if not 1 <= keep <= N:
        raise ValueError(f"keep must be in [1, N] = [1, {N}], got keep={keep}")
    if isinstance(important_ratio, (bool, np.bool_)) or not isinstance(
            important_ratio, (int, float, np.integer, np.floating)):
        raise TypeError(f"important_ratio must be a float in [0, 1], "
                        f"got {type(important_ratio).__name__}")
    if not (math.isfinite(important_ratio) and 0.0 <= important_ratio <= 1.0):
        raise ValueError(f"important_ratio must be in [0, 1], got {important_ratio}")
    name = checked_name(backend, features.device)

    important, diverse = split_budget(keep, float(important_ratio))
    order = descending_order(cls_attn)
    chosen = order[:, :important]
    if diverse > 0:
        chosen = torch.cat([chosen, remove_duplicates(features, order[:, important:], diverse)], 1)
    # chosen is a permutation's prefix: distinct and in range, no value check (and no sync)
    tokens, indices = ops.gather_compact(features, chosen, sort=True, backend=name,
                                         validate=False)
    lengths = torch.full((B,), keep, dtype=torch.long, device=features.device)
    return PruneResult(tokens, indices, lengths)
