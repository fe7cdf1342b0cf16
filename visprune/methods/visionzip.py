"""VisionZip (CVPR 2025, arXiv 2412.04467): dominant tokens by CLS attention, plus contextual
tokens merged by key similarity.

The original (github dvlab-research/VisionZip, ``visionzip/clip_encoder.py``
``CLIPVisionTower_VisionZip.forward``, with ``visionzip/utils.py`` capturing the keys) runs on
the CLIP layer LLaVA feeds its projector (``hidden_states[-2]``), before the projector:

* **dominant**: the CLS token, then the ``dominant - 1`` patches with the largest CLS attention
  of that layer (``attentions[-2][:, :, 0, 1:]`` summed over heads), in position order (the
  original gathers them with a mask, so its top-k order is lost);
* **contextual**: the ``R`` patches left are listed in position order; ``contextual`` anchors are
  every ``max(1, R // contextual)``-th entry of that list (the first ``contextual`` of them, not a
  spatial grid); every other remaining patch joins the anchor whose key has the highest cosine
  with its own (keys: that layer's ``k_proj`` outputs averaged over heads), and the contextual
  token is ``anchor + mean(its members)`` (the anchor itself is not in the mean; an anchor with
  no member stays as it is).

The output is ``[CLS, dominant patches ascending, contextual tokens in anchor order]``, which the
original passes to the projector as is.  The original is batched already; here the merge is one
matrix product per image instead of the original's one-hot ``bmm`` plus gathers.

Deviations from the original (all where it is undefined or crashes):

* top-k ties go to the lowest index (``torch.topk`` does not promise an order) and a NaN
  ``cls_attn`` ranks last (``torch.topk`` ranks it first); an anchor tie goes to the lowest
  anchor (``argmax``'s first maximum, as the original);
* cosines use ``F.normalize``'s norm floor (``EPS``): a zero key has cosine 0 with every anchor.
  For a zero member key that is what the original does too (its NaN row's argmax is the first
  anchor); a zero *anchor* key makes the original's cosines NaN, which win every member's
  argmax, here it is an ordinary 0.  A NaN cosine ranks below every real one;
* arithmetic in float32 whatever the input dtype (the original runs the merge in the model's
  dtype); the tokens are returned in ``features``' dtype;
* ``contextual > R`` raises ``ValueError`` (the original fails to broadcast, or for ``R == 1``
  repeats the one anchor); ``contextual == 0`` gives no contextual token (the original divides
  by zero);
* without ``cls_token`` every dominant slot is a patch (see :func:`visionzip`).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import checks, ops
from ..backends import checked_name
from ..common import EPS, NAN_COSINE, PruneResult, descending_order, true_fp32

__all__ = ["visionzip", "visionzip_attention", "visionzip_split"]

# The README's LLaVA-1.5 setting for 64 tokens: 54 dominant (CLS included) and 10 contextual.
# The repository states no other split (``main.py``'s defaults, 191 + 30, match no budget);
# other budgets keep this ratio: 128 → 108 + 20 and 192 → 162 + 30, as reproductions use.
SPLIT_64 = (54, 10)


def visionzip_split(keep: int) -> Tuple[int, int]:
    """``(dominant, contextual)`` for a budget of ``keep`` tokens: ``contextual =
    round(keep · 10/64)`` (half up), ``dominant = keep - contextual``.  Gives the README's
    54 + 10 for 64 and 108 + 20, 162 + 30 for 128, 192."""
    keep = checks.count("keep", keep)
    contextual = (keep * SPLIT_64[1] * 2 + sum(SPLIT_64)) // (2 * sum(SPLIT_64))
    return keep - contextual, contextual


def visionzip_attention(q: torch.Tensor, k: torch.Tensor,
                        num_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """VisionZip's two inputs from one CLIP layer's projections: ``(cls_attn float32[B, N],
    keys float32[B, N, C/H])``.

    ``q``, ``k``: ``[B, N+1, C]``, the layer's ``q_proj`` / ``k_proj`` outputs (CLS first), i.e.
    of ``layer_norm1`` of the previous layer's output.  ``cls_attn`` is the CLS row of each head's
    ``softmax(q_h k_hᵀ · (C/H)^-0.5)`` over all ``N+1`` keys, columns ``1..N``, summed over the
    ``H`` heads (what the original reads from ``output_attentions``); ``keys`` is ``k`` split into
    heads and averaged over them, CLS removed (the original's ``metric``).  Only the CLS row of
    the attention is computed, so SDPA / FlashAttention can stay on in the encoder.
    """
    checks.cls_qk(q, k)
    B, L, C = q.shape
    if L < 1:
        raise ValueError("q and k need the CLS token (N+1 >= 1), got N+1=0")
    num_heads = checks.count("num_heads", num_heads)
    if num_heads == 0 or C % num_heads:
        raise ValueError(f"num_heads={num_heads} must be >= 1 and divide C={C}")
    dh = C // num_heads
    qh = q[:, :1].float().view(B, 1, num_heads, dh).transpose(1, 2)           # [B, H, 1, dh]
    kh = k.float().view(B, L, num_heads, dh).transpose(1, 2)                  # [B, H, L, dh]
    with true_fp32():
        logits = (qh * dh ** -0.5) @ kh.transpose(-1, -2)                     # [B, H, 1, L]
    cls_attn = logits.softmax(-1)[:, :, 0, 1:].sum(1)
    return cls_attn, kh.mean(1)[:, 1:]


def _budget(keep, dominant, contextual, n: int, has_cls: bool) -> Tuple[int, int]:
    """The checked ``(dominant, contextual)`` from whichever of the three counts are given."""
    if keep is None:
        if dominant is None or contextual is None:
            raise ValueError("visionzip needs keep, or both dominant and contextual "
                             f"(got dominant={dominant!r}, contextual={contextual!r})")
        dominant, contextual = checks.count("dominant", dominant), checks.count("contextual",
                                                                                contextual)
    else:
        keep = checks.count("keep", keep)
        if dominant is None and contextual is None:
            dominant, contextual = visionzip_split(keep)
        elif contextual is None:
            dominant = checks.count("dominant", dominant)
            contextual = keep - dominant
        elif dominant is None:
            contextual = checks.count("contextual", contextual)
            dominant = keep - contextual
        else:
            dominant, contextual = checks.count("dominant", dominant), checks.count(
                "contextual", contextual)
        if dominant < 0 or contextual < 0 or dominant + contextual != keep:
            raise ValueError(f"keep={keep} must equal dominant + contextual with both >= 0, got "
                             f"dominant={dominant}, contextual={contextual}")
    if has_cls and dominant < 1:
        raise ValueError(f"dominant={dominant} must be >= 1 when cls_token is given: the CLS "
                         f"token is one of the dominant tokens")
    patches = dominant - has_cls
    if patches > n:
        raise ValueError(f"dominant={dominant} needs {patches} dominant patches but features "
                         f"has only N={n} tokens")
    if contextual > n - patches:
        raise ValueError(f"contextual={contextual} is larger than the {n - patches} tokens left "
                         f"after the {patches} dominant patches (N={n})")
    return dominant, contextual


def _anchor_columns(r: int, contextual: int, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Which entries of the remaining-token list are anchors (``range(0, r, step)[:contextual]``,
    ``step = max(1, r // contextual)``) and which are members (the rest), both ascending; built
    without reading the device (a stable sort instead of boolean indexing)."""
    step = max(1, r // contextual)
    is_anchor = torch.zeros(r, dtype=torch.uint8, device=device)
    is_anchor[: step * contextual: step] = 1
    cols = is_anchor.sort(stable=True).indices                 # members first, then anchors
    return cols[r - contextual:], cols[: r - contextual]


def _contextual_tokens(features: torch.Tensor, keys: torch.Tensor, rest: torch.Tensor,
                       contextual: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(tokens float32[B, contextual, D], anchor positions int64[B, contextual])`` from the
    remaining positions ``rest[B, R]`` (ascending)."""
    B, r = rest.shape
    anchor_cols, member_cols = _anchor_columns(r, contextual, rest.device)
    anchor, member = rest[:, anchor_cols], rest[:, member_cols]
    kn = F.normalize(keys.float(), dim=-1, eps=EPS)
    pick = lambda pos: kn.gather(1, pos[..., None].expand(-1, -1, kn.shape[-1]))
    with true_fp32():
        cos = pick(member) @ pick(anchor).transpose(1, 2)                # [B, R - C, C]
    # argmax returns the first maximum: a tie goes to the lowest anchor, as in the original
    joins = torch.where(cos.isnan(), NAN_COSINE, cos).argmax(-1)
    # Row c of the weights: 1/|members| on c's members, 1 on the anchor; one product then gives
    # anchor + mean(members) for every anchor, deterministically (no atomics).
    n = features.shape[1]
    weights = features.new_zeros(B, contextual * n, dtype=torch.float32)
    weights.scatter_(1, joins * n + member, 1.0)
    weights = weights.view(B, contextual, n)
    weights /= weights.sum(-1, keepdim=True).clamp(min=1)
    weights.scatter_(2, anchor[..., None], 1.0)
    with true_fp32():
        return weights @ features.float(), anchor


def visionzip(features: torch.Tensor, cls_attn: torch.Tensor, keys: torch.Tensor,
              keep: Optional[int] = None, *, dominant: Optional[int] = None,
              contextual: Optional[int] = None, cls_token: Optional[torch.Tensor] = None,
              backend: Optional[str] = None) -> PruneResult:
    """VisionZip: ``PruneResult(tokens[B, keep, D], indices[B, keep], lengths[B] = keep)``.

    Args:
        features: ``[B, N, D]`` the patch tokens (CLS removed) of the vision layer LLaVA feeds
            its projector (CLIP's ``hidden_states[-2]``), before the projector.
        cls_attn: ``[B, N]`` that layer's CLS→patch attention **summed over heads**
            (``attentions[-2][:, :, 0, 1:].sum(1)``, or :func:`visionzip_attention`).
        keys: ``[B, N, Dk]`` that layer's ``k_proj`` outputs of the patches, averaged over heads
            (``Dk`` = head dim; :func:`visionzip_attention`).
        keep: the total number of tokens out, ``dominant + contextual``.  Given alone it is split
            by :func:`visionzip_split` (64 → 54 + 10); with one of the two counts, the other is
            the rest; with both, it must equal their sum.
        dominant: dominant tokens, **counting the CLS token when ``cls_token`` is given** (the
            original's ``visionzip(model, dominant=54, contextual=10)``: CLS + 53 patches);
            without ``cls_token`` all ``dominant`` are patches.
        contextual: contextual (merged) tokens, at most the ``N - dominant patches`` left.
        cls_token: ``[B, D]`` the CLS token's features at the same layer (``hidden_states[-2]
            [:, 0]``), in ``features``' dtype.  The original keeps it first; pass it to
            reproduce the original.
        backend: validated like the ops'; the dominant patches are gathered by
            :func:`visprune.ops.gather_compact` on it, the rest is plain PyTorch.

    Output rows: the CLS token (if given; index -1), the dominant patches in position order
    (their indices), then the contextual tokens in anchor order (index = the anchor's position:
    the token is the anchor plus the mean of its members, as PruMerge's merged tokens keep
    theirs).  Ties in ``cls_attn`` go to the lowest index.
    """
    checks.tensor("features", features, 3, "[B, N, D]")
    checks.tensor("cls_attn", cls_attn, 2, "[B, N]")
    checks.tensor("keys", keys, 3, "[B, N, Dk]")
    checks.matching("cls_attn", cls_attn, "features", features, "[B, N]", 2)
    checks.matching("keys", keys, "features", features, "[B, N, Dk]", 2)
    B, N, D = features.shape
    if cls_token is not None:
        checks.tensor("cls_token", cls_token, 2, "[B, D]")
        if tuple(cls_token.shape) != (B, D):
            raise ValueError(f"cls_token must have shape [B, D] = {(B, D)} to match features, "
                             f"got {tuple(cls_token.shape)}")
        checks.same_device("features", features, "cls_token", cls_token)
        if cls_token.dtype != features.dtype:
            raise TypeError(f"cls_token has dtype {cls_token.dtype} but features has "
                            f"{features.dtype}; they must have the same dtype")
    has_cls = cls_token is not None
    dominant, contextual = _budget(keep, dominant, contextual, N, has_cls)
    name = checked_name(backend, features.device)

    patches = dominant - has_cls
    order = descending_order(cls_attn)
    # descending_order's indices are distinct and in range: no value check (and no sync) needed
    top, top_index = ops.gather_compact(features, order[:, :patches].contiguous(), sort=True,
                                        backend=name, validate=False)
    parts, index = [top], [top_index]
    if has_cls:
        parts.insert(0, cls_token[:, None])
        index.insert(0, torch.full((B, 1), -1, dtype=torch.long, device=features.device))
    if contextual:
        rest = order[:, patches:].sort(-1).values          # the original's filtered list
        merged, anchor = _contextual_tokens(features, keys, rest, contextual)
        parts.append(merged.to(features.dtype))
        index.append(anchor)
    lengths = torch.full((B,), dominant + contextual, dtype=torch.long, device=features.device)
    return PruneResult(torch.cat(parts, 1), torch.cat(index, 1), lengths)
