"""In-LLM visual-token pruning (FastV, FitPrune, DART) for transformers' LLaVA and Qwen-VL.

``enable(model, "fastv", keep=..., layer=K)`` / ``enable(model, "fitprune", recipe=...)`` /
``enable(model, "dart", keep=..., layer=K)`` make a ``LlavaForConditionalGeneration``
(LLaVA-1.5), ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT) or
``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` (images and videos,
3-D M-RoPE; Qwen3-VL's deepstack features follow the kept tokens) drop visual tokens
*between decoder layers* of its language model during the prefill, scored by the attention they receive (FastV, FitPrune) or by their keys and hidden
states (DART).  The layers keep their attention implementation
(``sdpa`` or ``eager``); the statistics come from :func:`visprune.ops.received_attention` on
the layer's own post-RoPE queries and keys, so no ``[B, H, L, L]`` map is ever formed.

How it plugs in (no model code is replaced and no weight is touched):

* The language model's ``config._attn_implementation`` is set to ``visprune_sdpa`` (or
  ``visprune_eager``): transformers' ``AttentionInterface`` calls our function with the layer's
  post-RoPE ``query`` / ``key``; it hands them to the engine when the layer is one the method
  scores after, then calls the real ``sdpa`` / ``eager`` attention unchanged.
* A forward pre-hook on the multimodal model finds each unit's placeholders in a prefill.
* A forward hook on a scoring layer replaces its output by the kept tokens only; pre-hooks on the
  later layers give them the matching causal/padding mask, the kept tokens' **original** RoPE
  positions, and, while decoding, a mask over the shorter KV cache those layers hold.

Layout: after a pruning layer, each row's kept tokens stay in their original order and are
right-aligned (padding in front), so ``logits[:, -1]`` is every row's last token; the output is
as wide as the longest row.  ``handle.positions`` gives each output slot's index in the input
(-1 for padding).  Each layer's KV cache holds the tokens that layer saw; layer 0 always holds the
whole prompt, so the cache length, the 2-D attention mask and decode positions continue from the
unpruned prompt length, as without pruning.  What decoding needs of the pruned layers' shorter
caches is an attribute of the cache object, so a deep copy of a prompt cache decodes too.

A method prunes per unit: an image, a video (however many placeholder runs its processor
writes), or with ``per_frame=True`` each video frame; every unit keeps at least one token.  The
pruning is the prompt's: ``generate`` tells the engine the prompt's width, so that
``use_cache=False`` (prompt and new tokens rerun at every step) scores the prompt's rows only.
``generate`` options whose decoding the engine cannot follow are refused before any work.
"""
from __future__ import annotations

import functools
import inspect
import sys
from typing import Callable, Dict, List, Optional

import torch
from transformers import (DynamicCache, LlavaForConditionalGeneration,
                          LlavaNextForConditionalGeneration, Qwen2_5_VLForConditionalGeneration,
                          Qwen3VLForConditionalGeneration)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ... import checks, methods, ops
from ...backends import checked_name
from ...fitprune import load_recipe
from .llava import Handle, _bind, generation_option, image_token_counts

__all__ = ["InLLMHandle", "INLLM_METHODS"]

INLLM_METHODS = ("fastv", "fitprune", "dart")
_SUPPORTED = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration,
              Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)
_INNER = ("sdpa", "eager")
# The attention module's attribute naming who observes its queries and keys: (handle, layer).
_OBSERVER = "_visprune_observer"
# The cache's attribute holding what decoding with it needs (a ``_Decode``): on the cache, so
# that a deep copy of the cache (transformers' prompt-reuse pattern) decodes as the original.
_DECODE = "_visprune_decode"
# generate() options whose decoding the engine cannot follow, and why.
_REFUSED_GENERATE = {
    "prefill_chunk_size": "chunked prefill scores each chunk alone (FastV's last token would be "
                          "the chunk's, two images in a chunk would share one budget): the "
                          "pruning needs the whole prompt in one pass",
    "assistant_model": "assisted decoding verifies draft tokens and crops the cache after a "
                       "rejected draft, which the pruned layers' shorter caches cannot follow",
    "prompt_lookup_num_tokens": "prompt-lookup decoding is assisted decoding (draft tokens, "
                                "cache crops), which the pruned layers' caches cannot follow",
    "assistant_early_exit": "self-speculative decoding is assisted decoding (draft tokens, cache "
                            "crops), which the pruned layers' caches cannot follow",
}


# --------------------------------------------------------------------------- attention functions
def _wrapped(inner: str) -> Callable:
    def attention(module, query, key, value, attention_mask, **kwargs):
        owner = module.__dict__.get(_OBSERVER)
        if owner is not None:
            owner[0]._observe(owner[1], query, key)
        if inner == "sdpa":
            fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:       # the model's own eager attention, defined next to its attention module
            fn = sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"visprune_{inner}_attention"
    return attention


def _register() -> None:
    """Registers ``visprune_sdpa`` / ``visprune_eager`` with transformers (idempotent)."""
    for inner in _INNER:
        name = f"visprune_{inner}"
        if name not in ALL_ATTENTION_FUNCTIONS:
            ALL_ATTENTION_FUNCTIONS.register(name, _wrapped(inner))
            ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])


# --------------------------------------------------------------------------- rules
class Scoring:
    """What a rule sees after one layer's attention in a prefill: the layer's post-RoPE ``q``
    ``[B, H, W, dh]`` and ``k`` ``[B, Hkv, W, dh]`` and the current layout: ``valid[B, W]``
    (not padding), ``orig[B, W]`` (each slot's index in the input; -1 for padding),
    ``image[B, W]`` (the token's unit: an image, a video, or with ``per_frame`` a video frame,
    numbered over the batch; -1 for a text token), ``ordinal[B, W]`` (the unit's order among
    its row's units; -1 for text), ``counts[I]`` (each unit's current token count),
    ``hidden[B, W, D]`` (the layer's output), ``norm`` (the language model's final norm) and
    ``prompt[B, W]`` (the valid slots of the prompt: in ``generate(use_cache=False)``, which
    reruns prompt and new tokens at every step, the new tokens are not part of it, so the
    pruning is the prompt's own at every step)."""

    def __init__(self, layer, q, k, valid, orig, image, ordinal, counts, backend, hidden=None,
                 norm=None, prompt=None):
        self.layer, self.q, self.k, self.valid, self.orig = layer, q, k, valid, orig
        self.image, self.ordinal, self.counts, self.backend = image, ordinal, counts, backend
        self.hidden, self.norm = hidden, norm
        self.prompt = valid if prompt is None else prompt & valid

    def received(self, queries, heads: str) -> torch.Tensor:
        """``float32[B, W]``: the attention every token receives from ``queries`` (``"last"``,
        or ``bool[B, W]``), reduced over heads by ``heads`` (``"max"`` / ``"mean"``)."""
        q, k = self.q, self.k
        if q.dtype == torch.float64:                 # the op takes fp32/fp16/bf16
            q, k = q.float(), k.float()
        return ops.received_attention(q, k, 0, q.shape[2], queries=queries,
                                      heads=heads, key_mask=self.valid, backend=self.backend)

    def image_rows(self, r: int):
        """``(rows, after)`` for the ``r``-th unit of every row: ``bool[B, W]`` its tokens, and
        the prompt's text tokens after it (none in a row without an ``r``-th unit)."""
        rows = self.ordinal == r
        slot = torch.arange(rows.shape[1], device=rows.device)
        end = torch.where(rows, slot, -1).amax(1, keepdim=True)
        after = self.prompt & (self.image < 0) & (slot > end) & (end >= 0)
        return rows, after

    def last_prompt_row(self) -> torch.Tensor:
        """``bool[B, W]``: each row's last prompt token."""
        slot = torch.arange(self.prompt.shape[1], device=self.prompt.device)
        last = torch.where(self.prompt, slot, -1).amax(1, keepdim=True)
        return self.prompt & (slot == last)


def rank_in_image(score: torch.Tensor, image: torch.Tensor, descending: bool) -> torch.Tensor:
    """``int64[B, W]``: each image token's rank among its image's tokens by ``score`` (0 = the
    highest with ``descending``, else the lowest); ties go to the lower index."""
    B, W = score.shape
    order = torch.sort(score, dim=1, descending=descending, stable=True).indices
    by_image = torch.sort(image.gather(1, order), dim=1, stable=True)
    order = order.gather(1, by_image.indices)
    slot = torch.arange(W, device=score.device).expand(B, W)
    ids = by_image.values
    starts = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool),
                        ids[:, 1:] != ids[:, :-1]], 1)
    first = torch.cummax(torch.where(starts, slot, 0), 1).values    # where each image's run starts
    return torch.empty_like(order).scatter_(1, order, slot - first)


class FastV:
    """FastV: after layer ``layer - 1``, keep per unit the ``keep`` tokens (or the fraction
    ``round(N·keep)``, at least one) that the prompt's last token attends to most, averaged
    over heads."""

    name = "fastv"

    def __init__(self, keep, layer, num_layers):
        self.keep = checks.keep("keep", keep, "image")
        self.layer = _check_layer("fastv", layer, num_layers)
        self.layers = {self.layer - 1}

    def kept(self, n: int) -> int:
        return self.keep if isinstance(self.keep, int) else max(1, round(n * self.keep))

    def check(self, counts: List[int]) -> None:
        for j, n in enumerate(counts):
            if self.kept(n) > n:
                raise ValueError(f"fastv: keep={self.keep} is larger than image {j}'s {n} "
                                 f"visual tokens")

    def drop(self, s: Scoring) -> torch.Tensor:
        score = s.received(s.last_prompt_row(), "mean")
        keep = torch.tensor([self.kept(n) for n in s.counts], device=score.device)
        rank = rank_in_image(score, s.image, descending=True)
        return (s.image >= 0) & (rank >= keep[s.image.clamp(min=0)])

    def __repr__(self):
        return f"keep={self.keep}, layer={self.layer}"


def fitprune_scores(s: Scoring) -> tuple:
    """FitPrune's statistics of every image token, ``(cross, self, after)`` as ``float32[B, W]``
    (0 for text): ``cross`` = the head-max attention the valid text tokens after its image pay
    it, summed; ``self`` = the head-max attention its image's tokens pay it, summed, divided by
    the image's current token count; ``after[B, W]`` = how many text rows ``cross`` summed."""
    cross = torch.zeros(s.valid.shape, device=s.valid.device)
    self_ = torch.zeros_like(cross)
    rows_after = torch.zeros_like(cross)
    count = torch.tensor(s.counts, device=cross.device, dtype=torch.float32)
    for r in range(int(s.ordinal.max()) + 1):
        rows, after = s.image_rows(r)
        cross = torch.where(rows, s.received(after, "max"), cross)
        self_ = torch.where(rows, s.received(rows, "max") / count[s.image.clamp(min=0)], self_)
        rows_after = torch.where(rows, after.sum(1, keepdim=True).float(), rows_after)
    return cross, self_, rows_after


class FitPrune:
    """FitPrune with a recipe ``{layer: tokens deleted}``: after layer ``l``, delete from every
    image its ``recipe[l]`` tokens with the lowest ``cross · self`` (:func:`fitprune_scores`)."""

    name = "fitprune"

    def __init__(self, recipe, num_layers):
        self.recipe = load_recipe(recipe, num_layers)
        self.layers = {l for l, d in self.recipe.items() if d}

    def check(self, counts: List[int]) -> None:
        total = sum(self.recipe.values())
        for j, n in enumerate(counts):
            if total >= n:          # at least one token of every unit stays
                raise ValueError(f"fitprune: the recipe deletes {total} tokens per image, more "
                                 f"than image {j}'s {n} visual tokens leave (one must stay)")

    def drop(self, s: Scoring) -> torch.Tensor:
        cross, self_, _ = fitprune_scores(s)
        rank = rank_in_image(cross * self_, s.image, descending=False)
        return (s.image >= 0) & (rank < self.recipe[s.layer])

    def __repr__(self):
        return f"recipe={ {l: d for l, d in self.recipe.items() if d} }"


class DART:
    """DART (:func:`visprune.methods.dart`): after layer ``layer - 1``, per unit, pivots by the
    L1 norm of layer ``layer - 1``'s keys claim the unit's tokens least similar to them in the
    final-normed hidden states; the unit keeps ``pivot_image + (pivot_image + pivot_text)·t``
    with ``t = int(budget / (pivot_image + pivot_text))``, ``budget`` = ``keep`` (int) or
    ``N·keep`` (float, the original's ``1 - reduction_ratio``); the text pivots are the prompt's
    text tokens after the unit (when fewer follow it, the pivots found share the budget)."""

    name = "dart"

    def __init__(self, keep, layer, pivot_image, pivot_text, num_layers):
        self.keep = checks.keep("keep", keep, "image")
        self.layer = _check_layer("dart", layer, num_layers)
        self.pivot_image = checks.integer("pivot_image", pivot_image)
        self.pivot_text = checks.integer("pivot_text", pivot_text)
        if self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text < 1:
            raise ValueError(f"dart: pivot_image and pivot_text must be >= 0 with at least one "
                             f"pivot, got {pivot_image} and {pivot_text}")
        self.layers = {self.layer - 1}

    def claims(self, n: int) -> int:
        budget = self.keep if isinstance(self.keep, int) else n * self.keep
        return int(budget / (self.pivot_image + self.pivot_text))

    def kept(self, n: int) -> int:
        return max(1, self.pivot_image + (self.pivot_image + self.pivot_text) * self.claims(n))

    def check(self, counts: List[int]) -> None:
        for j, n in enumerate(counts):
            if self.kept(n) > n:
                raise ValueError(f"dart: keep={self.keep} keeps {self.kept(n)} tokens "
                                 f"({self.pivot_image} pivots + {self.pivot_image} + "
                                 f"{self.pivot_text} pivots x {self.claims(n)} claimed), more than "
                                 f"image {j}'s {n} visual tokens")

    def drop(self, s: Scoring) -> torch.Tensor:
        B, W = s.valid.shape
        keys = s.k.transpose(1, 2).reshape(B, W, -1)                 # [B, W, Hkv·dh]
        states = s.norm(s.hidden) if s.norm is not None else s.hidden
        keep = torch.zeros(B, W + 1, dtype=torch.bool, device=keys.device)
        for r in range(int(s.ordinal.max()) + 1):
            image, after = s.image_rows(r)
            kept = methods.dart(states, keys, image, self.keep, text=after,
                                pivot_image=self.pivot_image, pivot_text=self.pivot_text).indices
            keep.scatter_(1, torch.where(kept >= 0, kept, W), True)
        return (s.image >= 0) & ~keep[:, :W]

    def __repr__(self):
        return (f"keep={self.keep}, layer={self.layer}, pivot_image={self.pivot_image}, "
                f"pivot_text={self.pivot_text}")


def _check_layer(method: str, layer, num_layers: int) -> int:
    layer = checks.integer("layer", layer)
    if not 1 <= layer < num_layers:
        raise ValueError(f"{method}: layer must lie in [1, {num_layers - 1}] (the first layer "
                         f"that sees the pruned sequence; the model has {num_layers} decoder "
                         f"layers), got {layer}")
    return layer


# --------------------------------------------------------------------------- state
class _Group:
    """The sequence a run of layers sees: ``orig[B, W]`` each slot's index in the input (-1:
    padding), ``valid[B, W]``, and the layers' keyword overrides (mask, positions)."""

    def __init__(self, orig, valid, overrides=None):
        self.orig, self.valid, self.overrides = orig, valid, overrides or {}


class _Prefill:
    def __init__(self, image, valid, counts, prompt_width=None):
        B, L = image.shape
        self.image, self.counts = image, list(counts)
        # each unit's order among its row's units (a Qwen3-VL video frame's run is not a unit)
        present = torch.zeros(B, len(self.counts) + 1, dtype=torch.long, device=image.device)
        present.scatter_(1, image + 1, 1)
        rank = present[:, 1:].cumsum(1) - 1
        self.ordinal = torch.where(image >= 0, rank.gather(1, image.clamp(min=0)), -1)
        slot = torch.arange(L, device=image.device)
        self.prompt = slot < (L if prompt_width is None else prompt_width)
        self.groups = [_Group(slot.expand(B, L), valid)]
        self.group_of: List[int] = []
        self.full: Dict[str, object] = {}
        self.cache = None
        self.qk = None


class _Decode:
    """What decoding with a pruned cache needs: the prompt width and each layer's group."""

    def __init__(self, width, groups, group_of):
        self.width, self.groups, self.group_of = width, groups, group_of
        self.past, self.tail = 0, None


# --------------------------------------------------------------------------- the handle
class InLLMHandle(Handle):
    """In-LLM pruning enabled on one model.  ``disable()`` (or the end of a ``with`` block)
    restores the model, its attention implementation included.

    ``positions``: after a forward with images, ``int64[B, W]``, the index in the input of each
    slot of the output (-1 for padding).
    """

    _TRANSIENT = ("_pending", "_run", "_last", "_prompt_width", "_video_grid")

    def __init__(self, model, method, keep, method_kwargs):
        if not isinstance(model, _SUPPORTED):
            names = ", ".join(c.__name__ for c in _SUPPORTED)
            raise TypeError(f"visprune.enable({method!r}) supports {names}, got "
                            f"{type(model).__name__}")
        self._check_free(model)
        checks.choice("method", method, INLLM_METHODS)
        kwargs = dict(method_kwargs)
        self.backend = kwargs.pop("backend", None)
        self.per_frame = checks.flag("per_frame", kwargs.pop("per_frame", False))
        if self.per_frame and getattr(model.config, "video_token_id", None) is None:
            raise ValueError(f"per_frame=True makes every video frame a unit, but "
                             f"{type(model).__name__} takes no videos")
        lm = model.model.language_model
        layers = lm.layers[: lm.config.num_hidden_layers]
        options = {"fastv": {"layer": 2}, "dart": {"layer": 2, "pivot_image": 4, "pivot_text": 4},
                   "fitprune": {"recipe": None}}[method]
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            allowed = sorted({"backend", "per_frame", *options} | ({"keep"} if method != "fitprune"
                                                                  else set()))
            raise TypeError(f"{method} takes no argument(s) {unknown}; its options are {allowed}")
        if method == "fitprune":
            if keep is not None:
                raise ValueError(f"fitprune's recipe says how many tokens each layer deletes: "
                                 f"pass no keep, got keep={keep}")
            if "recipe" not in kwargs:
                raise ValueError("fitprune needs recipe= (a {layer: tokens deleted} dict, a JSON "
                                 "file, or a shipped LLaVA-1.5-7B recipe such as 'r60')")
            rule = FitPrune(kwargs["recipe"], len(layers))
        else:
            if keep is None:
                raise ValueError(f"{method} needs keep (visual tokens kept per image, or a "
                                 f"fraction)")
            options.update(kwargs)
            rule = (FastV(keep, options["layer"], len(layers)) if method == "fastv" else
                    DART(keep, options["layer"], options["pivot_image"], options["pivot_text"],
                         len(layers)))
        implementation = lm.config._attn_implementation
        if implementation not in _INNER:
            raise ValueError(f"in-LLM pruning runs with the language model's 'sdpa' or 'eager' "
                             f"attention, got {implementation!r}; load the model with "
                             f"attn_implementation='sdpa'")
        checked_name(self.backend, model.device)
        if isinstance(model, LlavaForConditionalGeneration):
            rule.check(image_token_counts(model, 1, None))   # LLaVA-1.5: one size for all
        self.model, self.method, self.rule = model, method, rule
        self.positions: Optional[torch.Tensor] = None
        self._lm, self._layers, self._implementation = lm, layers, implementation
        self._window = _sliding_window(lm.config)
        self._pending: Optional[_Prefill] = None
        self._run: Optional[_Prefill] = None
        self._last: Optional[_Prefill] = None
        self._prompt_width: Optional[int] = None
        self._video_grid: Optional[torch.Tensor] = None
        self._signature = inspect.signature(model.model.forward)
        self._call_signature = inspect.signature(model.forward)
        self._generate_signature = inspect.signature(model.generate)

        _register()
        lm.config._attn_implementation = f"visprune_{implementation}"
        if hasattr(lm, "_deepstack_process"):        # Qwen3-VL: added after the early layers
            lm._deepstack_process = functools.partial(self._deepstack, lm._deepstack_process)
        self._hooks = [model.register_forward_pre_hook(self._check_call, with_kwargs=True),
                       model.model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        for l, layer in enumerate(layers):
            self._hooks.append(layer.register_forward_pre_hook(
                functools.partial(self._before_layer, l), with_kwargs=True))
            self._hooks.append(layer.register_forward_hook(functools.partial(self._after_layer,
                                                                             l)))
            layer.self_attn.__dict__[_OBSERVER] = (self, l)
        self._attach(model)

    def disable(self) -> None:
        """Remove the hooks and restore the attention implementation (unless it was changed
        since: the caller's choice stays)."""
        if self.model is None:
            return
        for h in self._hooks:
            h.remove()
        for layer in self._layers:
            layer.self_attn.__dict__.pop(_OBSERVER, None)
        if self._lm.config._attn_implementation == f"visprune_{self._implementation}":
            self._lm.config._attn_implementation = self._implementation
        self._lm.__dict__.pop("_deepstack_process", None)
        self._detach()
        self.model = self._pending = self._run = self._last = None

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"InLLMHandle({self.method}, {self.rule!r}, {state})"

    # ------------------------------------------------------------------ the model call
    def _generate(self, generate, *args, **kwargs):
        """``generate`` with the engine's refusals and checks made before any work; while it
        runs, the prompt's width (see :class:`Scoring`'s ``prompt``) and the videos' grids (the
        model's calls then carry encoded videos without them) are known."""
        a = _bind(self._generate_signature, args, kwargs)
        for name, why in _REFUSED_GENERATE.items():
            if generation_option(self.model, a, name) is not None:
                raise NotImplementedError(f"generate({name}=...) is not supported with in-LLM "
                                          f"pruning: {why}")
        ids = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs")
        if ids is not None and ids.dim() == 2 and _has_visuals(self.model, a):
            self._layout(dict(a, input_ids=ids))       # placeholders and budgets, before encoding
            new = generation_option(self.model, a, "max_new_tokens")
            total = ids.shape[1] + new if new is not None else \
                generation_option(self.model, a, "max_length")
            if total is not None:
                self._check_window(total)
        self._prompt_width = ids.shape[1] if ids is not None and ids.dim() == 2 else None
        self._video_grid = a.get("video_grid_thw")
        try:
            return generate(*args, **kwargs)
        finally:
            self._prompt_width = self._video_grid = None

    def _check_call(self, module, args, kwargs):
        self._sync_attention()
        a = _bind(self._call_signature, args, kwargs)
        if _has_visuals(self.model, a) and a.get("labels") is not None:
            raise NotImplementedError(f"{self.method} shortens the sequence inside the language "
                                      f"model, so the logits no longer line up with labels: "
                                      f"training/loss with in-LLM pruning is not supported")

    def _sync_attention(self) -> None:
        """Follows ``model.set_attn_implementation("sdpa" | "eager")`` made while enabled (the
        engine's wrapper of the new one takes over); refuses any other."""
        current = self._lm.config._attn_implementation
        if current == f"visprune_{self._implementation}":
            return
        if current not in _INNER:
            raise ValueError(f"in-LLM pruning runs with the language model's 'sdpa' or 'eager' "
                             f"attention, but it was set to {current!r} while pruning was "
                             f"enabled; set it back, or disable() pruning first")
        self._implementation = current
        self._lm.config._attn_implementation = f"visprune_{current}"

    def _check_window(self, total: int) -> None:
        if self._window is not None and total > self._window:
            raise ValueError(f"the language model uses sliding-window attention (window "
                             f"{self._window}) and this run reaches {total} tokens: in-LLM "
                             f"pruning supports such models only while the sequence fits the "
                             f"window (the pruned layers' shorter caches and masks do not follow "
                             f"it)")

    def _on_model(self, module, args, kwargs):
        self._sync_attention()
        a = _bind(self._signature, args, kwargs)
        cache = a.get("cache", a.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        images = _has_visuals(self.model, a)
        ids = a.get("input_ids") if a.get("input_ids") is not None else a.get("inputs_embeds")
        if ids is not None:
            self._check_window(past + ids.shape[1])
        self._pending = None
        if past:                                         # decoding, or a continued prompt
            if images:
                raise NotImplementedError("in-LLM pruning of images that arrive after a "
                                          "non-empty KV cache is not supported: pass the images "
                                          "with the first call")
            state = cache.__dict__.get(_DECODE)
            if state is not None:
                mask = a.get("attention_mask")
                if ids.shape[0] != state.groups[0].valid.shape[0]:
                    raise NotImplementedError("the batch changed after a pruned prefill "
                                              "(contrastive search / assisted decoding are not "
                                              "supported with in-LLM pruning)")
                state.past = past - state.width
                state.tail = (None if mask is None or mask.dim() != 2
                              else mask[:, state.width:].bool())
            return None
        if cache is not None:                            # a new prompt in this cache
            cache.__dict__.pop(_DECODE, None)
        if not images:
            return None
        if a.get("input_ids") is None:
            raise ValueError("in-LLM pruning needs input_ids with the image placeholder tokens "
                             "(inputs_embeds alone is not supported)")
        if cache is not None and type(cache) is not DynamicCache:
            raise NotImplementedError(f"in-LLM pruning keeps a different length per layer and "
                                      f"needs a DynamicCache, got {type(cache).__name__}")
        self._pending = self._layout(a)
        return None

    def _layout(self, a) -> _Prefill:
        """Each unit's placeholders in the prompt, and the rule's budget check."""
        input_ids, mask = a["input_ids"], a.get("attention_mask")
        config = self.model.config
        counts = _image_counts(self.model, a)
        if a.get("video_grid_thw") is None and self._video_grid is not None:
            a = dict(a, video_grid_thw=self._video_grid)
        videos = _video_counts(self.model, a, self.per_frame)
        image = torch.full_like(input_ids, -1)
        for name, unit, token, these in (("image", "image(s)", "image_token_id", counts),
                                         ("video", "video(s)", "video_token_id", videos)):
            token_id = getattr(config, token, None)
            is_unit = input_ids == token_id if token_id is not None \
                else torch.zeros_like(input_ids, dtype=torch.bool)
            if int(is_unit.sum()) != sum(these):
                raise ValueError(f"input_ids hold {int(is_unit.sum())} {name} placeholder tokens, "
                                 f"but the {len(these)} {unit} have {these} visual tokens")
            if these:   # placeholders are filled in (row, position) order, unit after unit
                ends = torch.tensor(these, device=input_ids.device).cumsum(0)
                rank = is_unit.flatten().cumsum(0).view_as(is_unit) - 1
                offset = len(counts) if name == "video" else 0
                image = torch.where(is_unit, torch.bucketize(rank, ends, right=True) + offset,
                                    image)
        counts = counts + videos
        self.rule.check(counts)
        valid = (torch.ones_like(image, dtype=torch.bool) if mask is None else mask.bool()) \
            | (image >= 0)
        return _Prefill(image, valid, counts, self._prompt_width)

    # ------------------------------------------------------------------ the layers
    def _observe(self, layer: int, query, key) -> None:
        run = self._run
        if run is not None and layer in self.rule.layers:
            run.qk = (query, key)

    def _before_layer(self, l: int, module, args, kwargs):
        if l == 0:
            self._run, self._pending, self._last = self._pending, None, None
            if self._run is not None:
                self._start(self._run, args, kwargs)
        run = self._run
        if run is not None:
            overrides = run.groups[run.group_of[l]].overrides
        else:
            cache = kwargs.get("cache", kwargs.get("past_key_values"))
            state = cache.__dict__.get(_DECODE) if cache is not None else None
            if state is None or state.group_of[l] == 0:
                return None
            overrides = {"attention_mask": self._decode_mask(state, state.group_of[l],
                                                             args, kwargs)}
        if not overrides:
            return None
        return args, {**kwargs, **overrides}

    def _start(self, run: _Prefill, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] != run.image.shape[1]:
            raise RuntimeError("the language model received a sequence of another length than "
                               "input_ids: in-LLM pruning cannot find the images")
        run.full = {k: kwargs.get(k) for k in ("position_embeddings", "position_ids")}
        run.cache = kwargs.get("cache", kwargs.get("past_key_values"))
        run.group_of = [0] * len(self._layers)
        run.dtype = hidden.dtype

    def _after_layer(self, l: int, module, args, output):
        run = self._run
        if run is not None and l in self.rule.layers:
            output = self._prune(run, l, output)
        if run is not None and l == len(self._layers) - 1:
            self._finish(run)
        return output

    def _prune(self, run: _Prefill, l: int, output):
        hidden = output[0] if isinstance(output, tuple) else output
        group = run.groups[run.group_of[l]]
        q, k = run.qk
        run.qk = None
        index = group.orig.clamp(min=0)
        image = torch.where(group.valid, run.image.gather(1, index), -1)
        ordinal = torch.where(image >= 0, run.ordinal.gather(1, index), -1)
        prompt = run.prompt[index]
        with torch.no_grad():
            drop = self.rule.drop(Scoring(l, q, k, group.valid, group.orig, image, ordinal,
                                          run.counts, self.backend, hidden,
                                          getattr(self._lm, "norm", None), prompt))

        if not bool(drop.any()):
            return output
        real = group.valid & ~drop
        run.counts = torch.bincount(image[real & (image >= 0)],
                                    minlength=len(run.counts)).tolist()
        key = real.long()                          # kept tokens last, in their order
        order = key.sort(dim=1, stable=True).indices[:, -int(real.sum(1).max()):]
        valid = real.gather(1, order)
        orig = torch.where(valid, group.orig.gather(1, order), -1)
        new = _Group(orig, valid, self._overrides(run, orig, valid))
        run.groups.append(new)
        for m in range(l + 1, len(self._layers)):
            run.group_of[m] = len(run.groups) - 1
        hidden = hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1]))
        return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden

    def _overrides(self, run: _Prefill, orig, valid) -> dict:
        """The later layers' mask and the kept tokens' original positions."""
        index = orig.clamp(min=0)
        out = {"attention_mask": self._mask(valid[:, None, :], valid.shape[1], 0, run.dtype)}
        cos_sin = run.full.get("position_embeddings")
        if cos_sin is not None:
            out["position_embeddings"] = tuple(_take(t, index, -2) for t in cos_sin)
        if run.full.get("position_ids") is not None:
            out["position_ids"] = _take(run.full["position_ids"], index, -1)
        return out

    def _mask(self, allowed_keys, width: int, offset: int, dtype):
        """``[B, 1, q, K]`` mask: key ``j`` allowed for query ``i`` where ``allowed_keys``
        ``[B, q|1, K]`` says so and ``j <= i + offset`` (causal); a query row with no key
        attends to its own slot (padding rows: keeps the softmax finite, never read)."""
        B, _, K = allowed_keys.shape
        i = torch.arange(width - offset, device=allowed_keys.device)[:, None] + offset
        j = torch.arange(K, device=allowed_keys.device)[None, :]
        allowed = allowed_keys & (j <= i)
        allowed = allowed | ((j == i) & ~allowed.any(-1, keepdim=True))
        allowed = allowed[:, None]
        if self._implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    def _decode_mask(self, state: _Decode, g: int, args, kwargs):
        group = state.groups[g]
        hidden = args[0] if args else kwargs["hidden_states"]
        B, q = hidden.shape[:2]
        W = group.valid.shape[1]
        total = state.past + q
        tail = state.tail
        if tail is None or tail.shape[1] != total:
            tail = torch.ones(B, total, dtype=torch.bool, device=hidden.device)
        keys = torch.cat([group.valid, tail], 1)[:, None, :]
        return self._mask(keys, W + total, W + state.past, hidden.dtype)

    def _deepstack(self, process, hidden_states, visual_pos_masks, visual_embeds):
        """Qwen3-VL adds deepstack features to the visual tokens after its first layers, with a
        mask over the whole prompt; once tokens are pruned, the mask and the features follow the
        kept tokens (the latest group is the hidden state's layout).  ``process``: the model's
        own."""
        run = self._run if self._run is not None else self._last
        if run is None or hidden_states.shape[1] == visual_pos_masks.shape[1]:
            return process(hidden_states, visual_pos_masks, visual_embeds)
        group = run.groups[-1]
        full = visual_pos_masks.to(group.orig.device)
        row = (full.flatten().cumsum(0) - 1).view_as(full)    # each visual token's row
        index = group.orig.clamp(min=0)
        mask = full.gather(1, index) & group.valid
        return process(hidden_states, mask,
                       visual_embeds[row.gather(1, index)[mask].to(visual_embeds.device)])

    def _finish(self, run: _Prefill) -> None:
        last = run.groups[-1]                       # after the last pruning layer
        self.positions = torch.where(last.valid, last.orig, -1)
        self._last = run        # Qwen3-VL adds deepstack features after the layer's hooks
        if run.cache is not None and len(run.groups) > 1:
            run.cache.__dict__[_DECODE] = _Decode(run.image.shape[1], run.groups, run.group_of)
        self._run = None


def _has_visuals(model, a) -> bool:
    return bool(_image_counts(model, a) or _video_counts(model, a, False))


def _sliding_window(config) -> Optional[int]:
    """The window of the text backbone's sliding-window attention layers, if it has any."""
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None:
        return window if "sliding_attention" in types else None
    return window if getattr(config, "use_sliding_window", True) else None


def _image_counts(model, a) -> List[int]:
    """Each image's token count in a call (``pixel_values``, or the pre-encoded
    ``mm_encoder_outputs`` that ``generate`` passes); ``[]`` without images."""
    encoded = (a.get("mm_encoder_outputs") or {}).get("image")
    if encoded is not None:
        return [len(f) for f in encoded.pooler_output]
    if a.get("pixel_values") is None or a["pixel_values"].shape[0] == 0:
        return []
    if a.get("image_grid_thw") is not None:                  # Qwen: merged t·h·w patches
        return _grid_counts(model, a["image_grid_thw"])
    return image_token_counts(model, a["pixel_values"].shape[0], a.get("image_sizes"),
                              a.get("vision_feature_select_strategy"))


def _video_counts(model, a, per_frame: bool) -> List[int]:
    """Each video's token count, or with ``per_frame`` each of its frames' (temporal patch
    groups, from ``video_grid_thw``); ``[]`` without videos."""
    encoded = (a.get("mm_encoder_outputs") or {}).get("video")
    grid = a.get("video_grid_thw")
    if encoded is None and (a.get("pixel_values_videos") is None or grid is None):
        return []
    if per_frame:
        if grid is None:
            raise ValueError("per_frame=True needs video_grid_thw with the videos")
        merge = model.config.vision_config.spatial_merge_size
        return [h * w // merge ** 2 for t, h, w in grid.tolist() for _ in range(t)]
    if encoded is not None:
        return [len(f) for f in encoded.pooler_output]
    return _grid_counts(model, grid)


def _grid_counts(model, grid_thw) -> List[int]:
    merge = model.config.vision_config.spatial_merge_size
    return [int(n) for n in grid_thw.prod(-1) // merge ** 2]


def _take(t: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` (``[..., B|1, L, (d)]`` along ``dim``) gathered at ``index[B, W]`` along ``dim``."""
    B, W = index.shape
    shape = list(t.shape)
    batch = dim - 1
    shape[batch] = B
    t = t.expand(*shape)
    idx = index.view(*([1] * (t.dim() + batch)), B, W, *([1] * (-dim - 1)))
    shape[dim] = W
    return t.gather(dim, idx.expand(*shape))
