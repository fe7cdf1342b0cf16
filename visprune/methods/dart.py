"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", arXiv 2502.11494): inside the language model, keep a few pivot tokens
and the image tokens least similar to them.

The authors' repository is not public; the facts come from the port in ModelTC/LightCompress
(``llmc/compression/token_reduction/dart.py``, ``get_retained_image_token``), which hooks layer
``K - 1``'s key cache and prunes before layer ``K``:

1. pivots: the ``pivot_image`` image tokens and the ``pivot_text`` tokens after the image whose
   keys (all kv heads concatenated) have the largest L1 norm;
2. ``t = int(budget / (pivot_image + pivot_text))`` with ``budget`` the image's ``N · (1 -
   reduction_ratio)``;
3. each pivot in turn claims, from the image tokens not yet kept (image pivots excluded), the
   ``t`` least cosine-similar to it, on the hidden states entering layer ``K`` through the final
   norm;
4. the image keeps its image pivots and every claimed token: ``pivot_image + (pivot_image +
   pivot_text) · t``.

:func:`dart` is that selection on one image (or video, or frame: a *unit*) per batch row, for
any batch, as the in-LLM engine (:mod:`visprune.integrations.transformers.inllm`) calls it.
Deviations, where the original's order is undefined or it crashes:

* pivots are visited in ascending index order and every ranking breaks ties toward the lower
  index (the original iterates a Python ``set``; its order is an implementation detail);
* fewer candidates than pivots: the pivots that exist share the budget, ``t = int(budget / P)``
  with ``P`` the pivots found (the original's ``topk`` raises when fewer than ``pivot_text``
  tokens follow the image), so the unit keeps about ``budget`` tokens whatever the text's length;
* at least one token per unit: when the rule would keep nothing (no image pivot and ``t = 0``,
  or no pivot at all) the unit keeps its image token with the largest key L1 norm, the one an
  image pivot would be.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import checks
from ..common import PruneResult

__all__ = ["dart"]


def dart(states: torch.Tensor, keys: torch.Tensor, image: torch.Tensor, keep, *,
         text: Optional[torch.Tensor] = None, pivot_image: int = 4,
         pivot_text: int = 4) -> PruneResult:
    """DART's selection of one unit's image tokens per batch row.

    Args:
        states: ``[B, L, D]`` the hidden states the similarity is measured on (the engine: the
            states entering layer ``K``, through the model's final norm).
        keys: ``[B, L, C]`` the keys whose L1 norms rank the pivots (the engine: layer
            ``K - 1``'s post-RoPE keys, kv heads concatenated).
        image: ``bool[B, L]`` the unit's tokens in each row (a row with none keeps nothing).
        keep: the budget: an int, or a float in ``(0, 1]``, that fraction of each row's unit
            size ``N`` (``N · keep``, the original's ``1 - reduction_ratio``).
        text: ``bool[B, L]`` the text-pivot candidates (the engine: the valid text tokens after
            the unit in the prompt); ``None``: none.
        pivot_image, pivot_text: pivots per unit (``>= 0``, at least one in all).

    Returns ``PruneResult(tokens[B, K, D], indices[B, K], lengths[B])``: the kept image tokens'
    states and positions, ascending, padded with zeros and -1 to the longest row.
    """
    checks.tensor("states", states, 3, "[B, L, D]", dtypes=checks.FLOATS + (torch.float64,))
    checks.tensor("keys", keys, 3, "[B, L, C]", dtypes=checks.FLOATS + (torch.float64,))
    checks.matching("keys", keys, "states", states, "[B, L, C]", 2)
    B, L, _ = states.shape
    image = checks.bool_mask("image", image, "states", states, (B, L), "[B, L]")
    if image is None:
        raise TypeError("image must be a bool tensor of shape [B, L], got None")
    text = checks.bool_mask("text", text, "states", states, (B, L), "[B, L]")
    keep = checks.keep("keep", keep)
    pivot_image = checks.count("pivot_image", pivot_image)
    pivot_text = checks.count("pivot_text", pivot_text)
    if pivot_image + pivot_text < 1:
        raise ValueError(f"dart needs at least one pivot, got pivot_image={pivot_image} and "
                         f"pivot_text={pivot_text}")
    if text is None:
        text = torch.zeros_like(image)

    with torch.no_grad():
        l1 = keys.float().abs().sum(-1)
        img_pivots = _top(l1, image, pivot_image)                      # [B, pi], -1: none
        pivots = torch.cat([img_pivots, _top(l1, text & ~image, pivot_text)], 1)
        found = (pivots >= 0).sum(1)
        n = image.sum(1)
        budget = n.double() * keep if isinstance(keep, float) else torch.full_like(
            n, keep, dtype=torch.float64)
        t = torch.where(found > 0, torch.div(budget, found.clamp(min=1),
                                             rounding_mode="floor"), 0).long()
        kept = _as_mask(img_pivots, L)
        if int(t.max()) if B else 0:
            pool = image & ~kept
            pivots = torch.sort(torch.where(pivots >= 0, pivots, L), dim=1).values  # none: L
            x = states.float()
            unit = x / x.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            # every token's cosine to every pivot, [B, L, P], in one product
            at = pivots.clamp(max=L - 1)[..., None].expand(-1, -1, unit.shape[-1])
            cosines = torch.bmm(unit, unit.gather(1, at).transpose(1, 2))
            for j in range(pivots.shape[1]):            # in index order, from the pool left
                hit = _as_mask(_top(-cosines[:, :, j], pool & (pivots[:, j:j + 1] < L), t), L)
                pool &= ~hit
                kept |= hit
        empty = (n > 0) & ~kept.any(1)
        if bool(empty.any()):
            kept |= _as_mask(_top(l1, image & empty[:, None], 1), L)

        lengths = kept.sum(1)
        K = int(lengths.max()) if B else 0
        order = (~kept).to(torch.uint8).sort(dim=1, stable=True).indices[:, :K]
        real = torch.arange(K, device=states.device) < lengths[:, None]
        indices = torch.where(real, order, -1)
        tokens = states.gather(1, order[..., None].expand(-1, -1, states.shape[-1]))
        tokens = tokens.masked_fill(~real[..., None], 0)
    return PruneResult(tokens, indices, lengths)


def _top(score: torch.Tensor, allowed: torch.Tensor, k) -> torch.Tensor:
    """``int64[B, K]``: per row the slots of the ``k`` highest ``score`` among ``allowed`` (ties:
    the lower slot), -1 where a row has fewer; ``k``: an int, or an int64 ``[B]`` (``K`` its
    maximum, at most the row width; a row's entries past its own ``k`` are -1)."""
    B, W = score.shape
    k = torch.as_tensor(k, device=score.device).expand(B)
    K = min(int(k.max()), W) if B else 0
    order = torch.sort(score.masked_fill(~allowed, float("-inf")), dim=1, descending=True,
                       stable=True).indices[:, :K]
    ok = allowed.gather(1, order) & (torch.arange(K, device=score.device) < k[:, None])
    return torch.where(ok, order, -1)


def _as_mask(slots: torch.Tensor, W: int) -> torch.Tensor:
    """``bool[B, W]``: True at the ``slots[B, K]`` (entries -1 ignored)."""
    mask = torch.zeros(slots.shape[0], W + 1, dtype=torch.bool, device=slots.device)
    return mask.scatter_(1, torch.where(slots >= 0, slots, W), True)[:, :W]
