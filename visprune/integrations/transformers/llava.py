"""Visual-token pruning inside Hugging Face transformers' LLaVA models.

``enable(model, method, keep, **method_kwargs)`` makes a ``LlavaForConditionalGeneration``
(LLaVA-1.5) or ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT) prune every image's visual
tokens after the multimodal projector, before the language model; the returned handle's
``disable()`` (or leaving its ``with`` block) undoes it.

What is pruned: each image's token sequence as the language model would see it.  LLaVA-1.5: the
576 (``(image_size / patch_size)²``) projected patch tokens.  LLaVA-NeXT: the packed any-resolution
sequence (base image, unpadded high-resolution grid, image-newline tokens), whose length differs
from image to image; the newline tokens are candidates like the others.  ``keep`` is per image.
PruMerge is adaptive and, as its original, selects and merges the CLIP features before the
projector, then projects the merged tokens (newline tokens have no CLIP feature: it drops them).

How it plugs in (no model code is replaced and no weight is touched):

* A forward pre-hook on the model rewrites a call that carries ``pixel_values`` into one that
  carries the kept image features as ``mm_encoder_outputs`` (transformers' own input for
  pre-encoded images) and ``input_ids`` / ``attention_mask`` / ``position_ids`` / ``labels``
  without the pruned images' surplus placeholder tokens.  Its logits are those of the shrunk
  sequence.
* ``generate`` is wrapped (an instance attribute): the prompt is pruned once, before generation,
  so that generate()'s own bookkeeping (the attention mask grown by one per step, the KV-cache
  length, beam expansion, chunked prefill) runs on the shrunk, left-padded prompt.  The caller's
  prompt is put back in front of the generated tokens, so ``out[:, input_ids.shape[1]:]`` are
  the new tokens as without pruning.  Lengths are counted on the caller's prompt, as without
  pruning: an absolute ``max_length`` / ``min_length`` is lowered by the width pruning removes.
* What a method needs from the vision tower (PruMerge's and HoloV's CLS attention, PruMerge's
  keys and pre-projector features) is captured by forward hooks on ``q_proj`` / ``k_proj`` and
  on the projector that exist only while one batch of images is encoded.  The attention is
  computed from the CLS query and the keys, so the vision tower and the language model keep
  their attention implementation (SDPA, flash): nothing is switched to eager.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import math
from typing import Dict, List, Optional

import torch
from transformers import LlavaForConditionalGeneration, LlavaNextForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from ... import checks, methods, ops
from ...backends import checked_name
from ...common import stage1_count

__all__ = ["PruningHandle", "METHODS", "image_token_counts"]

METHODS = ("trimtokenator", "divprune", "prumerge", "holov", "visionzip", "vispruner",
           "cdpruner")
# Methods that read the prompt's text (its input embeddings).
_NEEDS_TEXT = ("trimtokenator", "cdpruner")
_NEEDS_CLS = ("prumerge", "holov", "visionzip", "vispruner")
# Methods that select (and merge) the CLIP features before the projector, as their originals.
_PRE_PROJECTOR = ("prumerge", "visionzip", "vispruner")
# Methods that prune every image of a call in one varlen launch, whatever their token counts.
_VARLEN = ("divprune", "trimtokenator")
# Method arguments the integration fills in from the model; the others are the caller's.
_SUPPLIED = {"visual", "text", "keep", "text_mask", "mask", "features", "attn", "cls_attn", "keys",
             "cls_token", "relevance", "image_embeds", "text_embeds"}
# Arguments of a model call that describe the images and the prompt: pruning consumes them.
_PROMPT_ARGS = ("input_ids", "pixel_values", "attention_mask", "position_ids", "labels",
                "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
_SUPPORTED = (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)
# The model's attribute that holds its active handle.  An attribute (not a registry beside the
# model): copy.deepcopy of an enabled model copies the handle with it (see ``Handle``).
_HANDLE = "_visprune_handle"


def _bind(signature: inspect.Signature, args, kwargs) -> dict:
    """The call's arguments by name, ``**kwargs`` flattened in."""
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _shrink_order(real: torch.Tensor, left: bool):
    """``(order[B, L'], filler[B, L'])``: for every slot of the shrunk rows, the position it comes
    from, and whether it is padding.  ``real[B, L]`` marks the tokens that stay (not padding, not
    a pruned placeholder); they keep their order and ``L'`` is the longest row's count.  Padding
    goes in front (``left``) or after the tokens."""
    key = real.long() if left else (~real).long()
    order = key.sort(dim=1, stable=True).indices
    width = int(real.sum(1).max())
    order = order[:, order.shape[1] - width:] if left else order[:, :width]
    return order, ~real.gather(1, order)


def image_layout(model, images: int, image_sizes, strategy: str) -> List[torch.Tensor]:
    """Per image, ``int64[N_i]`` (CPU): for each visual token the language model sees, its flat
    index into the vision tower's ``[crops × tokens per crop]`` outputs; -1 for an
    image-newline token.  LLaVA-NeXT's layout comes from the model's own
    ``pack_image_features`` applied to the indices, so it cannot drift from the features.
    ``images``: how many images (``pixel_values.shape[0]``)."""
    config = model.config
    vision = config.vision_config
    # the tower's tokens per crop (a CLS token, if it has one, then the patches); "default"
    # drops the first of them (the CLS token, or a SigLIP tower's first patch)
    n = (vision.image_size // vision.patch_size) ** 2 + _has_cls(model) - (strategy == "default")
    if not isinstance(model, LlavaNextForConditionalGeneration):
        if image_sizes is not None:
            raise NotImplementedError("image_sizes (variable-resolution vision towers) is not "
                                      "supported for LlavaForConditionalGeneration")
        return list(torch.arange(images * n).view(-1, n))
    if image_sizes is None:
        raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values")
    crops = [image_size_to_num_patches(size, config.image_grid_pinpoints, vision.image_size)
             for size in image_sizes]
    flat = torch.arange(sum(crops) * n, dtype=torch.float64).view(-1, n, 1)
    packed, _ = model.model.pack_image_features(
        flat.split(crops), image_sizes, strategy, image_newline=flat.new_full((1,), -1.0))
    return [p[:, 0].long() for p in packed]


def _vision_encoder(model):
    tower = model.model.vision_tower
    return getattr(tower, "vision_model", tower)         # CLIP's layout before transformers 5


def _has_cls(model) -> bool:
    embeddings = getattr(_vision_encoder(model), "embeddings", None)
    return getattr(embeddings, "class_embedding", None) is not None


def image_token_counts(model, images: int, image_sizes,
                       strategy: Optional[str] = None) -> List[int]:
    """How many placeholder tokens each of ``images`` images fills in the prompt."""
    if strategy is None:
        strategy = model.config.vision_feature_select_strategy
    return [len(s) for s in image_layout(model, images, image_sizes, strategy)]


def method_function(method: str, options: dict, supplied, extra=()):
    """The method's function in :mod:`visprune.methods`, once ``options`` are known to be its
    arguments (those the integration does not ``supplied``) or the integration's own ``extra``
    ones; ``TypeError`` naming the unknown ones otherwise."""
    fn = getattr(methods, method)
    accepted = sorted(set(inspect.signature(fn).parameters) - set(supplied))
    unknown = sorted(set(options) - set(accepted) - set(extra))
    if unknown:
        raise TypeError(f"{method} takes no argument(s) {unknown}; its options are "
                        f"{sorted(accepted + list(extra))}")
    return fn


def active_handle(model):
    """The handle of the pruning enabled on ``model`` (or on the model it was deep-copied from:
    the copy has its own), or ``None``."""
    return model.__dict__.get(_HANDLE)


class Handle:
    """What every pruning handle shares: ``enabled``, ``with`` that disables at the end, and
    copies.  ``model`` is None once ``disable()`` ran.

    Everything a handle installs on its model (hooks, the ``generate`` wrapper, the handle
    itself) is a bound method, a ``functools.partial`` of one, or an attribute, never a closure
    or a registry beside the model: ``copy.deepcopy(model)`` then gives a model whose hooks call
    a copy of the handle, bound to the copy's own modules, so the copy prunes as the original
    does and each one's ``disable()`` leaves the other as it is.  ``_TRANSIENT`` attributes (one
    call's state) start empty in a copy."""

    model = None
    _TRANSIENT: tuple = ()

    def disable(self) -> None:
        raise NotImplementedError

    @property
    def enabled(self) -> bool:
        return self.model is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.disable()

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            new.__dict__[name] = None if name in self._TRANSIENT else copy.deepcopy(value, memo)
        return new

    @staticmethod
    def _check_free(model) -> None:
        if active_handle(model) is not None:
            raise RuntimeError("pruning is already enabled on this model: disable() it first")

    def _attach(self, model) -> None:
        """Marks ``model`` as pruned by this handle and wraps its ``generate``."""
        self._own_generate = model.__dict__.get("generate")
        model.generate = _Generate(self, model.generate)
        model.__dict__[_HANDLE] = self

    def _detach(self) -> None:
        if self._own_generate is None:
            self.model.__dict__.pop("generate", None)
        else:
            self.model.__dict__["generate"] = self._own_generate
        self.model.__dict__.pop(_HANDLE, None)

    def _generate(self, generate, *args, **kwargs):
        """``model.generate`` while enabled: ``generate`` is the model's own."""
        raise NotImplementedError


class _Generate:
    """``model.generate`` while a handle is enabled: calls ``handle._generate`` with the model's
    own ``generate``.  An object rather than a closure, so that a deep copy of the model gets
    the copy's handle and the copy's own ``generate`` (see :class:`Handle`)."""

    def __init__(self, handle: Handle, generate):
        self.handle, self.generate = handle, generate
        self.__wrapped__ = generate           # inspect.signature and help() see generate's
        self.__doc__ = generate.__doc__

    def __call__(self, *args, **kwargs):
        return self.handle._generate(self.generate, *args, **kwargs)


class PromptPruning(Handle):
    """What both pre-LLM handles share: a forward pre-hook that swaps a call's images and prompt
    for :meth:`prune_inputs`' shrunk prompt and kept features, and a ``generate`` wrapper that
    prunes the prompt once.  Subclasses set ``PROMPT_ARGS`` (the call arguments pruning
    consumes) and ``VISUAL_ARGS`` (those that carry images) and define ``prune_inputs``."""

    PROMPT_ARGS: tuple = ()
    VISUAL_ARGS: tuple = ()

    def _install(self, model) -> None:
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._forward_signature = inspect.signature(model.forward)
        names = list(self._forward_signature.parameters)
        self._first_visual = min(names.index(n) for n in self.VISUAL_ARGS)
        self._generate_signature = inspect.signature(model.generate)
        self._attach(model)

    def disable(self) -> None:
        """Remove the hook and the ``generate`` wrapper: the model is as before ``enable``."""
        if self.model is None:
            return
        self._hook.remove()
        self._detach()
        self.model = None

    def prune_inputs(self, **prompt) -> dict:
        raise NotImplementedError

    def _has_visuals(self, arguments: dict) -> bool:
        return any(arguments.get(name) is not None and arguments[name].shape[0] > 0
                   for name in self.VISUAL_ARGS)

    def _pre_forward(self, module, args, kwargs):
        if len(args) <= self._first_visual and all(kwargs.get(n) is None
                                                   for n in self.VISUAL_ARGS):
            return None                                  # a decoding step: no image
        arguments = _bind(self._forward_signature, args, kwargs)
        if not self._has_visuals(arguments):
            return None
        cache = arguments.get("cache", arguments.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("pruning images that arrive after a non-empty KV cache is "
                                      "not supported: pass the images with the first call")
        prompt = {name: arguments.pop(name, None) for name in self.PROMPT_ARGS}
        arguments.update(self.prune_inputs(**prompt))
        return (), arguments

    def _generate(self, generate, *args, **kwargs):
        """Prunes the prompt once, generates from it, and puts the caller's prompt back."""
        arguments = _bind(self._generate_signature, args, kwargs)
        if not self._has_visuals(arguments):
            return generate(*args, **kwargs)
        prompt = {name: arguments.pop(name, None) for name in self.PROMPT_ARGS}
        inputs = arguments.pop("inputs", None)
        if prompt["input_ids"] is None:
            prompt["input_ids"] = inputs
        width = prompt["input_ids"].shape[1]
        limits = _length_limits(self.model, arguments, width)
        with torch.no_grad():
            pruned = self.prune_inputs(**prompt, left_align=True)
        arguments.update({k: v for k, v in pruned.items() if v is not None})
        _shift_limits(arguments, limits, width - pruned["input_ids"].shape[1])
        out = generate(**arguments)
        return _restore_prompt(out, prompt["input_ids"], pruned["input_ids"].shape[1])


class PruningHandle(PromptPruning):
    """Pruning enabled on one model.  ``disable()`` (or the end of a ``with`` block) restores it.

    ``prune_inputs(...)`` is the transformation the hooks apply; call it directly to drive the
    model step by step (a custom decoding loop) with the shrunk prompt.
    """

    PROMPT_ARGS = _PROMPT_ARGS
    VISUAL_ARGS = ("pixel_values",)

    def __init__(self, model, method, keep, method_kwargs):
        if not isinstance(model, _SUPPORTED):
            names = ", ".join(c.__name__ for c in _SUPPORTED)
            raise TypeError(f"visprune.enable supports {names}, got {type(model).__name__}")
        self._check_free(model)
        checks.choice("method", method, METHODS)
        fn = method_function(method, method_kwargs, _SUPPLIED)
        if method == "prumerge":
            if keep is not None:
                raise ValueError("prumerge chooses how many tokens to keep per image (adaptive): "
                                 f"pass no keep, got keep={keep}")
        else:
            keep = checks.count("keep", keep) if keep is not None else None
            if not keep:
                raise ValueError(f"{method} needs keep >= 1 (visual tokens kept per image), "
                                 f"got {keep}")

        self.model, self.method, self.keep = model, method, keep
        self.method_kwargs = dict(method_kwargs)
        self._fn = fn
        self._next = isinstance(model, LlavaNextForConditionalGeneration)
        vision = model.config.vision_config
        self._crop_tokens = (vision.image_size // vision.patch_size) ** 2
        if method in _NEEDS_CLS:
            if not _has_cls(model):
                raise ValueError(f"{method} needs the vision tower's CLS attention, but "
                                 f"{type(model.model.vision_tower).__name__} has no CLS token")
            self._layers = _vision_encoder(model).encoder.layers
        if method == "trimtokenator":
            self._stage1 = checks.fraction_or_count("stage1_keep", self.method_kwargs.get(
                "stage1_keep", inspect.signature(fn).parameters["stage1_keep"].default))
        checked_name(self.method_kwargs.get("backend"), model.device)
        self._dry_run()
        if not self._next:          # LLaVA-1.5: every image has the same, known token count
            self._check_budget(image_token_counts(model, 1, None))

        self._install(model)

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"PruningHandle({self.method}, keep={self.keep}, {self.method_kwargs}, {state})"

    # ------------------------------------------------------------------ the method
    def _call(self, visual, text=None, text_mask=None, attn=None, keys=None, **overrides):
        """The method on ``[G, N, ·]`` stacks of images with the same token count."""
        kw = {**self.method_kwargs, **overrides}
        if self.method == "trimtokenator":
            return self._fn(visual, text, self.keep, text_mask=text_mask, **kw)
        if self.method == "divprune":
            return self._fn(visual, self.keep, **kw)
        if self.method == "cdpruner":
            # The original's relevance, mean over the text of -cos(image, text), with the LLM's
            # input embeddings of the prompt in place of CLIP's text tower (not in LLaVA).
            relevance = -ops.mi_scores(visual, text, text_mask=text_mask, metric="cosine",
                                       backend=kw.get("backend"))
            return self._fn(visual, self.keep, relevance=relevance, **kw)
        if self.method in ("holov", "vispruner"):
            return self._fn(visual, attn, self.keep, **kw)
        if self.method == "visionzip":
            return self._fn(visual, attn, keys, self.keep, **kw)
        return self._fn(visual, attn, keys, **kw)

    def _dry_run(self) -> None:
        """The method's own argument checks, at once, on a dummy input (CPU, reference backend)
        with enough tokens for the budget, which is checked per image (:meth:`_check_budget`)."""
        n = max(self._crop_tokens, self.keep or 0)
        if self.method == "trimtokenator":
            s1 = self._stage1
            if isinstance(s1, float) and s1 > 0:
                n = max(n, math.ceil(self.keep / s1))
            elif isinstance(s1, int):
                n = max(n, s1)
        x = torch.zeros(1, n, 4)
        self._call(x, text=x[:, :1], attn=torch.full((1, n), 1.0 / n), keys=x, backend="reference")

    def _check_budget(self, counts: List[int]) -> None:
        for j, n in enumerate(counts):
            if self.keep is not None and self.keep > n:
                raise ValueError(f"keep={self.keep} is larger than image {j}'s {n} visual tokens")
            if self.method != "trimtokenator":
                continue
            stage1 = stage1_count(n, self._stage1)
            if not self.keep <= stage1 <= n:
                raise ValueError(f"stage1_keep={self._stage1} keeps {stage1} of image {j}'s {n} "
                                 f"tokens; that must lie in [keep={self.keep}, {n}]")

    # ------------------------------------------------------------------ the images' layout
    def _layout(self, pixel_values, image_sizes, strategy) -> List[torch.Tensor]:
        return image_layout(self.model, pixel_values.shape[0], image_sizes, strategy)

    @contextlib.contextmanager
    def _capture(self, layer):
        """Forward hooks that keep what the method needs from one encoding of the images."""
        got: Dict[str, torch.Tensor] = {}

        def output_as(name):
            return lambda module, args, output: got.__setitem__(name, output)

        hooks = []
        if self.method in _NEEDS_CLS:
            attention = self._layers[layer].self_attn
            hooks += [attention.q_proj.register_forward_hook(output_as("q")),
                      attention.k_proj.register_forward_hook(output_as("k"))]
        if self.method == "visionzip":         # the CLS token's features at that layer
            hooks.append(self._layers[layer].register_forward_hook(
                lambda module, args, output: got.__setitem__(
                    "cls", (output[0] if isinstance(output, tuple) else output)[:, 0])))
        if self.method in _PRE_PROJECTOR:      # the projector's input: the selected CLIP features
            hooks.append(self.model.model.multi_modal_projector.register_forward_pre_hook(
                lambda module, args: got.__setitem__("pre", args[0])))
        try:
            yield got
        finally:
            for h in hooks:
                h.remove()

    def _attention_layer(self, feature_layer) -> Optional[int]:
        """The vision layer whose CLS attention the method reads: PruMerge the last (as the
        original), HoloV, VisionZip and VisPruner the one that outputs the selected features
        (``vision_feature_layer``)."""
        if self.method == "prumerge":
            return len(self._layers) - 1
        if self.method in ("holov", "visionzip", "vispruner"):
            if not isinstance(feature_layer, int):
                raise ValueError(f"{self.method} needs one vision_feature_layer, got "
                                 f"{feature_layer!r}")
            layer = feature_layer % (len(self._layers) + 1) - 1
            if layer < 0:
                raise ValueError(f"{self.method} needs a vision_feature_layer after the "
                                 f"embeddings")
            return layer
        return None

    # ------------------------------------------------------------------ the transformation
    def prune_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, *,
                     attention_mask: Optional[torch.Tensor] = None,
                     position_ids: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None,
                     image_sizes: Optional[torch.Tensor] = None,
                     vision_feature_layer=None, vision_feature_select_strategy=None,
                     left_align: bool = False) -> dict:
        """The model inputs with every image pruned.

        Returns ``input_ids``, ``attention_mask``, ``position_ids`` and ``labels`` (``None``
        where not given) without the pruned images' surplus placeholder tokens, and
        ``mm_encoder_outputs`` with the kept features, to pass to the model's forward or
        generate in place of ``pixel_values``.  Each image keeps the first placeholders of its
        run.  The batch is re-padded to its longest shrunk row (attention 0, label -100): at the
        left with ``left_align`` (what generation needs, whatever the input's padding side) or
        when the batch is left-padded, else at the right.  ``position_ids``, if given, are
        renumbered so that each row stays contiguous.
        """
        model, config = self.model, self.model.config
        if input_ids is None:
            raise ValueError("pruning needs input_ids with the image placeholder tokens "
                             "(inputs_embeds alone is not supported)")
        layer, strategy = vision_feature_layer, vision_feature_select_strategy
        layer = config.vision_feature_layer if layer is None else layer
        strategy = config.vision_feature_select_strategy if strategy is None else strategy
        if self.method in _NEEDS_CLS and strategy != "default":
            raise ValueError(f"{self.method} needs vision_feature_select_strategy='default' "
                             f"(the CLS token is not a visual token), got {strategy!r}")
        attn_layer = self._attention_layer(layer)
        device = input_ids.device

        # 1. Where every image's tokens are, and whether the budget fits (before any work).
        sources = self._layout(pixel_values, image_sizes, strategy)
        counts = [len(s) for s in sources]
        is_image = input_ids == config.image_token_id
        if int(is_image.sum()) != sum(counts):
            raise ValueError(f"input_ids hold {int(is_image.sum())} image placeholder tokens, but "
                             f"the {len(counts)} image(s) have {counts} visual tokens")
        self._check_budget(counts)
        # Placeholders are filled in (row, position) order: image j owns the j-th run of counts[j].
        size = torch.tensor(counts, device=device)
        ends = size.cumsum(0)
        rank = is_image.flatten().cumsum(0).view_as(is_image) - 1
        image = torch.bucketize(rank, ends, right=True).clamp(max=len(counts) - 1)
        slot = rank - (ends - size)[image]                   # the token's index within its image
        row = torch.nonzero(is_image & (slot == 0))[:, 0]
        if not torch.equal(row, torch.nonzero(is_image & (slot == size[image] - 1))[:, 0]):
            raise ValueError("an image's placeholder tokens span two rows of input_ids")
        padding = (torch.zeros_like(is_image) if attention_mask is None
                   else attention_mask == 0)
        text_mask = ~is_image & ~padding
        if self.method in _NEEDS_TEXT:
            empty = sorted(set(row.tolist()) - set(text_mask.any(1).nonzero()[:, 0].tolist()))
            if empty:
                raise ValueError(f"{self.method} needs text tokens next to every image; row(s) "
                                 f"{empty} have none (padding and placeholders do not count)")

        # 2. Encode the images, capturing what the method reads from the vision tower.
        inner = model.model
        extra = {"image_sizes": image_sizes} if self._next else {}
        with self._capture(attn_layer) as got:
            features = inner.get_image_features(
                pixel_values=pixel_values, vision_feature_layer=layer,
                vision_feature_select_strategy=strategy, return_dict=True, **extra).pooler_output
        kept = self._prune_images(features, sources, got, input_ids, text_mask, row)

        # 3. Drop each image's surplus placeholders from the prompt.
        lengths = torch.tensor([len(k) for k in kept], device=device)
        deleted = is_image & (slot >= lengths[image])
        left = left_align or bool(padding[:, 0].any())
        order, filler = _shrink_order(~deleted & ~padding, left)

        def take(t, fill):
            if t is None:
                return None
            return t.expand_as(input_ids).gather(1, order).masked_fill(filler, fill)

        pad_id = config.text_config.pad_token_id
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        if position_ids is not None:
            position_ids = position_ids.expand_as(input_ids) - deleted.long().cumsum(1)
        return {"input_ids": take(input_ids, 0 if pad_id is None else pad_id),
                "attention_mask": take(mask, 0), "position_ids": take(position_ids, 1),
                "labels": take(labels, -100),
                "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=kept)}}

    def _prune_images(self, features, sources, got, input_ids, text_mask,
                      row) -> List[torch.Tensor]:
        """The kept features ``[k_i, D]`` of every image: DivPrune and TrimTokenator in one varlen
        call for all images; for the other methods, images with the same token count are
        pruned in one batched call."""
        if self.method in _PRE_PROJECTOR:
            # PruMerge and VisionZip select and merge the vision features before the projector,
            # as their originals; an image-newline token has no vision feature nor CLS attention
            # and is not kept.
            sources = [s[s >= 0] for s in sources]
            pre = got["pre"].flatten(0, 1)
        if self.method == "visionzip":
            # the CLS attention summed over heads, the keys averaged over heads (the original)
            attn, keys = methods.visionzip_attention(got["q"], got["k"],
                                                     self._layers[0].self_attn.num_heads)
            attn, keys = attn.flatten(), keys.flatten(0, 1)
        elif self.method in _NEEDS_CLS:
            q, k = got["q"], got["k"]
            # PruMerge's original takes q and k as one C-wide head; HoloV and VisPruner average
            # the heads
            heads = 1 if self.method == "prumerge" else self._layers[0].self_attn.num_heads
            attn = _cls_attention(q, k, heads).flatten()
            keys = k[:, 1:].flatten(0, 1)
        if self.method in _NEEDS_TEXT:
            embeds = self.model.get_input_embeddings()(input_ids)

        if self.method in _VARLEN:
            return self._prune_varlen(features, sources, embeds if self.method in _NEEDS_TEXT
                                      else None, text_mask, row)
        groups: Dict[int, List[int]] = {}
        for j, s in enumerate(sources):
            groups.setdefault(len(s), []).append(j)
        kept: List[Optional[torch.Tensor]] = [None] * len(sources)
        for members in groups.values():
            src = torch.stack([sources[j] for j in members]).to(features[0].device)
            inputs = {}
            if self.method in _PRE_PROJECTOR:
                visual = pre[src]
            else:
                visual = torch.stack([features[j] for j in members])
            if self.method in _NEEDS_CLS:
                inputs["attn"] = torch.where(src >= 0, attn[src.clamp(min=0)], 0.0)
                inputs["keys"] = keys[src.clamp(min=0)]
            if self.method in _NEEDS_TEXT:
                rows = row[members]
                inputs.update(text=embeds[rows], text_mask=text_mask[rows])
            if self.method == "visionzip":   # the CLS token of the image's (base) first crop
                inputs["cls_token"] = got["cls"][src[:, 0] // self._crop_tokens].to(visual.dtype)
            result = self._call(visual, **inputs)
            tokens = result.tokens
            if self.method in _PRE_PROJECTOR:
                tokens = self.model.model.multi_modal_projector(tokens)
            for i, (j, n) in enumerate(zip(members, result.lengths.tolist())):
                kept[j] = tokens[i, :n]
        return kept

    def _prune_varlen(self, features, sources, embeds, text_mask, row) -> List[torch.Tensor]:
        """DivPrune / TrimTokenator on every image of the call in one varlen launch (images of
        different token counts, LLaVA-NeXT), with the dense methods' rules: the kept features
        of each image, ascending."""
        packed = torch.cat(list(features), 0)
        sizes = [len(s) for s in sources]
        cu = torch.tensor([0, *itertools.accumulate(sizes)], device=packed.device)
        kw = {k: v for k, v in self.method_kwargs.items() if k != "stage1_keep"}
        if self.method == "divprune":
            picked = ops.greedy_select_varlen(packed, cu, self.keep, objective="maxmin",
                                              metric="cosine", start="auto", **kw).sort().values
        else:
            stage1 = [stage1_count(n, self._stage1) for n in sizes]
            picked = ops.prune_varlen(packed, cu, embeds[row], self.keep, stage1_keep=stage1,
                                      text_mask=text_mask[row], **kw).indices
        return list(packed[picked].split([self.keep] * len(sizes)))


def generation_option(model, arguments: dict, name: str):
    """A ``generate()`` option as generate resolves it: from the call's ``arguments`` (bound,
    ``**kwargs`` flattened), else its ``generation_config``, else the model's; ``None`` if
    unset."""
    given = arguments.get("generation_config")
    for source in (arguments, vars(given) if given is not None else {},
                   vars(model.generation_config)):
        if source.get(name) is not None:
            return source[name]
    return None


def _length_limits(model, arguments: dict, width: int) -> Dict[str, int]:
    """The unpruned run's limits that count the whole sequence, prompt included, as generate()
    resolves them: ``max_length`` unless ``max_new_tokens`` is set, ``min_length`` unless
    ``min_new_tokens`` is set; each from the call, else its ``generation_config``, else the
    model's.  Without any, generate() makes a default number of new tokens (20), but no more
    than the config's ``max_position_embeddings`` allows for the whole sequence: that bound
    counts the prompt too.  ``width``: the caller's prompt width."""
    def resolved(name):
        return generation_option(model, arguments, name)

    limits = {}
    if resolved("max_new_tokens") is None:
        limit = resolved("max_length")
        if limit is None:
            cap = getattr(model.config, "max_position_embeddings", None)
            default = model.generation_config._get_default_generation_params()["max_length"]
            limit = cap if cap is not None and default + width > cap else None
        if limit is not None:
            if width >= limit:
                raise ValueError(f"input_ids are {width} tokens long, but max_length is {limit}: "
                                 f"nothing is left to generate (set max_new_tokens instead)")
            limits["max_length"] = limit
    if resolved("min_new_tokens") is None and resolved("min_length"):
        limits["min_length"] = resolved("min_length")
    return limits


def _shift_limits(arguments: dict, limits: Dict[str, int], removed: int) -> None:
    """Lowers the :func:`_length_limits` by the ``removed`` width of the pruned prompt, so that
    generation stops where the unpruned run stops.  A value the call gave goes back to the call;
    any other goes to a copy of the call's ``generation_config`` if it has one (never to the
    caller's object: transformers warns about options given both ways), else to the call."""
    given, copied = arguments.get("generation_config"), None
    for name, limit in limits.items():
        value = max(limit - removed, 0)
        if arguments.get(name) is None and given is not None:
            if copied is None:
                copied = arguments["generation_config"] = copy.deepcopy(given)
            setattr(copied, name, value)
        else:
            arguments[name] = value


def _cls_attention(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """``float32[P, T-1]``: the CLS query's softmax attention to the other tokens, averaged
    over ``heads`` (``q``, ``k``: ``[P, T, C]`` raw ``q_proj`` / ``k_proj`` outputs, the
    scale ``(C/heads)^-0.5`` as in the attention layer)."""
    P, T, C = q.shape

    def split(t):
        return t.reshape(P, T, heads, C // heads).transpose(1, 2).reshape(P * heads, T, C // heads)

    return methods.prumerge_cls_attention(split(q), split(k)).view(P, heads, T - 1).mean(1)


def _restore_prompt(out, prompt: torch.Tensor, pruned_length: int):
    """generate()'s output with the caller's prompt in front of the generated tokens."""
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    repeats = sequences.shape[0] // prompt.shape[0]                 # num_return_sequences, beams
    full = torch.cat([prompt.repeat_interleave(repeats, 0).to(sequences.device),
                      sequences[:, pruned_length:]], dim=1)
    if isinstance(out, torch.Tensor):
        return full
    out.sequences = full
    return out
