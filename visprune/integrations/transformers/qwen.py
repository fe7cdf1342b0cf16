"""Visual-token pruning before the language model for transformers' Qwen2.5-VL and Qwen3-VL.

``enable(model, method, keep, **options)`` makes a ``Qwen2_5_VLForConditionalGeneration`` or a
``Qwen3VLForConditionalGeneration`` prune the merged visual tokens (the 2×2 patch merger's
outputs) of every image and video between the vision tower and the language model.  The kept
tokens keep their **original** 3-D M-RoPE positions (``get_rope_index`` on the unpruned prompt),
and decoding continues from the unpruned prompt's positions, as every published Qwen
integration and vLLM's EVS do.  Qwen3-VL's deepstack features are filtered with the same kept
mask.  The returned handle's ``disable()`` (or leaving its ``with`` block) undoes it.

``keep`` is per unit: an int is at most that many tokens of each unit (a smaller unit keeps all
its tokens), a float in ``(0, 1]`` is that fraction of each unit's tokens, rounded half up, at
least one.  A unit is an image; a video is one unit (``per_frame=False``, the default) or each
of its frames (temporal patch groups) is one (``per_frame=True``, which leaves images as they
are: one handle serves prompts with images, videos or both).  TrimTokenator's ``stage1_keep``
is read per unit by the same rule and must be at least ``keep`` where the two compare for every
unit (both ints, or both fractions; an int at least 1); where an int and a fraction leave a unit
fewer stage-1 survivors than its budget, stage 1 keeps the budget.

What each method reads (the towers have no CLS token):

* ``trimtokenator`` / ``cdpruner``: the merged tokens and the prompt's text, i.e. the language
  model's input embeddings of every token of the row that is not an image/video placeholder nor
  padding (CDPruner's relevance: the original's ``-cos`` formula in that space);
* ``divprune``: the merged tokens;
* ``holov`` / ``vispruner``: the merged tokens and, in place of the CLS attention, the mean
  attention each token receives in the vision tower's last block (computed from that block's
  own q/k, with its RoPE and its attention segments; patch scores averaged over each 2×2 merge
  group).  Nothing is switched to eager attention.
* ``prumerge`` and ``visionzip`` are refused: they synthesise (merge) tokens, which have no
  original M-RoPE position, and their merge keys are defined on CLIP's CLS layer.

Video methods (``evs``, ``vidcom2``, ``dycoke``, ``fastvid``, ``holitom``, ``prunevid``; the
merging ones on Qwen2.5-VL only; the table and the ``keep`` mapping in :mod:`.video`) prune
each video's merged tokens as ``[T, P, D]`` (``T`` the grid's ``t``, ``P = (h/m)(w/m)``); images
pass whole, ``per_frame=True`` is refused.  ``keep`` per video maps to the method's own budget
parameter, which may be given instead.  The method's tokens go in the order of their positions,
each at its ``indices`` placeholder, so a merged token (not a row of the input) takes its
anchor's M-RoPE position.  FastVID gets its saliency from the last vision block
(:func:`frame_query_saliency`), HoliTom the mean attention received (as ``holov``).  Qwen3-VL
writes a video as one placeholder run per frame with timestamps between: the placeholders are
still the video's ``T·P`` tokens in frame-major order, so the runs lose their pruned tokens and
the timestamps stay.  The merging methods are refused on Qwen3-VL: a merged token's deepstack
features are undefined (the method's result carries no assignment to merge them with).

How it plugs in is the LLaVA integration's (:mod:`.llava`): a forward pre-hook rewrites a call
with ``pixel_values`` / ``pixel_values_videos`` into one with the kept features as
``mm_encoder_outputs``, the prompt without the pruned tokens' placeholders, and explicit
``position_ids`` ``[4, B, L']`` (a contiguous text channel for the mask, then the kept tokens'
original 3-D positions); ``generate`` is wrapped to prune the prompt once, and the new tokens get
the positions they get without pruning: generate() numbers them on from the prompt's last token,
channel by channel, which is the unpruned row's last token also where pruning removed it (a
prompt that ends with an image).  A decoding step without ``position_ids`` uses the model's
``rope_deltas``, set so that it gets the position it gets after the unpruned prompt
(transformers' own two ways differ after a trailing image: ``rope_deltas`` continue every
channel after the prompt's largest position).
"""
from __future__ import annotations

import contextlib
import inspect
import itertools
from typing import Dict, List, Optional

import torch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ... import checks, ops
from ...backends import checked_name
from ...common import stage1_count
from .llava import PromptPruning, _shrink_order, method_function
from .video import VIDEO_METHODS, video_function, video_parameter

__all__ = ["QwenPruningHandle", "QWEN_METHODS", "QWEN_VIDEO_METHODS", "QWEN_REFUSED",
           "unit_budget", "frame_query_saliency"]

QWEN_METHODS = ("trimtokenator", "divprune", "holov", "vispruner", "cdpruner")
QWEN_REFUSED = {
    "prumerge": "it merges tokens into synthesised ones with no original M-RoPE position, and "
                "its merge keys and outlier rule are defined on CLIP's CLS attention",
    "visionzip": "its contextual tokens are synthesised (merged) and have no original M-RoPE "
                 "position, and its dominant tokens are defined by CLIP's CLS attention",
}
QWEN_VIDEO_METHODS = tuple(VIDEO_METHODS)
SUPPORTED = (Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration)
_NEEDS_TEXT = ("trimtokenator", "cdpruner")
_NEEDS_ATTENTION = ("holov", "vispruner")
_SUPPLIED = {"visual", "text", "keep", "text_mask", "mask", "features", "attn", "cls_attn",
             "relevance", "image_embeds", "text_embeds"}
_PROMPT_ARGS = ("input_ids", "pixel_values", "pixel_values_videos", "image_grid_thw",
                "video_grid_thw", "mm_token_type_ids", "second_per_grid_ts", "attention_mask",
                "position_ids", "labels")


def unit_budget(keep, n: int) -> int:
    """Tokens kept of a unit of ``n``: ``min(keep, n)`` for an int, ``round_half_up(keep·n)``
    (at least 1, at most ``n``) for a float fraction; 0 for an empty unit."""
    if n == 0:
        return 0
    if isinstance(keep, float):
        return min(n, max(1, stage1_count(n, keep)))
    return min(n, keep)


def _check_stage1(keep, stage1_keep):
    """TrimTokenator's ``stage1_keep``, read per unit by ``keep``'s rule (:func:`unit_budget`).
    ``keep <= stage1_keep`` (as :func:`visprune.ops.prune` requires) wherever the two compare
    for every unit: an int at least an int ``keep`` (at least 1 beside a fraction), a fraction
    at least a fractional ``keep``."""
    stage1 = checks.fraction_or_count("stage1_keep", stage1_keep)
    if isinstance(stage1, int):
        low = keep if isinstance(keep, int) else 1
        if stage1 < low:
            bound = f"an int >= keep={keep}" if isinstance(keep, int) else "an int >= 1"
            raise ValueError(f"stage1_keep must be {bound} (tokens of each image or video "
                             f"stage 1 keeps) or a float in (0, 1], got {stage1_keep!r}")
    elif isinstance(keep, float) and stage1 < keep:
        raise ValueError(f"stage1_keep must be a fraction >= keep={keep} (stage 2 keeps keep "
                         f"of each image's or video's tokens among stage 1's), got "
                         f"{stage1_keep!r}")
    return stage1


class QwenPruningHandle(PromptPruning):
    """Pre-LLM pruning enabled on a Qwen2.5-VL / Qwen3-VL model; see the module docstring.

    ``prune_inputs(...)`` is the transformation the hooks apply; call it directly to drive the
    model step by step with the shrunk prompt.  ``kept``: after a pruned call, per image then
    per video, ``int64[k]`` the kept token indices (within that image's / video's tokens).
    """

    PROMPT_ARGS = _PROMPT_ARGS
    VISUAL_ARGS = ("pixel_values", "pixel_values_videos")
    _TRANSIENT = ("_next_positions",)

    def __init__(self, model, method, keep, method_kwargs):
        if not isinstance(model, SUPPORTED):
            names = ", ".join(c.__name__ for c in SUPPORTED)
            raise TypeError(f"supports {names}, got {type(model).__name__}")
        self._check_free(model)
        if method in QWEN_REFUSED:
            raise ValueError(f"{method} is not available on {type(model).__name__}: "
                             f"{QWEN_REFUSED[method]}; use one of {QWEN_METHODS}")
        checks.choice("method", method, QWEN_METHODS + QWEN_VIDEO_METHODS)
        kwargs = dict(method_kwargs)
        self.per_frame = checks.flag("per_frame", kwargs.pop("per_frame", False))
        self._qwen3 = isinstance(model, Qwen3VLForConditionalGeneration)
        self._video = VIDEO_METHODS.get(method)
        if self._video is not None:
            fn, self.keep = self._video_setup(model, method, keep, kwargs)
        else:
            fn = method_function(method, kwargs, _SUPPLIED, extra=("per_frame",))
            if keep is None:
                raise ValueError(f"{method} needs keep (tokens kept per image or video: an "
                                 f"int, or a float fraction of each one's tokens)")
            self.keep = checks.keep("keep", keep, "image or video")
            if method == "holov" and kwargs.get("redistribute", True) is not True:
                raise ValueError("holov on Qwen needs redistribute=True: the original's "
                                 "zero-padded tokens have no M-RoPE position")
            if method == "trimtokenator":
                self._stage1 = _check_stage1(self.keep, kwargs.get("stage1_keep", 0.8))
        self.backend = checked_name(kwargs.get("backend"), model.device)
        self.model, self.method, self.method_kwargs, self._fn = model, method, kwargs, fn
        self.kept: List[torch.Tensor] = []
        self._next_positions = None
        if self._video is not None:
            self._video_dry_run()
        else:
            self._dry_run()
        self._install(model)

    def _video_setup(self, model, method, keep, kwargs):
        """A video method's checks (see :mod:`.video`): ``(function, keep)``.  ``keep`` maps to
        the method's own budget parameter per video; that parameter may be given instead (one
        value for every video), not both."""
        entry = self._video
        if self.per_frame:
            raise ValueError(f"{method} prunes each video as a whole (it compares its frames): "
                             f"per_frame=True does not apply to it, got per_frame=True")
        if entry.merges and self._qwen3:
            raise ValueError(f"{method} is not available on {type(model).__name__}: it merges "
                             f"tokens, and a merged token's deepstack features are undefined "
                             f"(the method's result carries no assignment to merge them with); "
                             f"use one of {[m for m, e in VIDEO_METHODS.items() if not e.merges]}")
        fn, supplied = video_function(method)
        method_function(method, kwargs, supplied)
        own = entry.parameter
        if own in kwargs and kwargs[own] is None:
            raise ValueError(f"{method}'s {own} must be a number (it sets the budget), got None; "
                             f"give keep or a value for {own}")
        if keep is not None and own in kwargs:
            raise ValueError(f"{method} takes keep or its own {own}, not both: got keep={keep!r} "
                             f"and {own}={kwargs[own]!r}")
        if keep is None and own not in kwargs:
            raise ValueError(f"{method} needs keep (tokens kept per video: an int, or a float "
                             f"fraction of each video's tokens) or its own {own}")
        return fn, None if keep is None else checks.keep("keep", keep, "video")

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return (f"QwenPruningHandle({self.method}, keep={self.keep}, per_frame={self.per_frame}, "
                f"{self.method_kwargs}, {state})")

    def _dry_run(self) -> None:
        """The method's own option checks, at once, on a dummy unit (reference backend)."""
        n = 64
        x = torch.randn(1, n, 4, generator=torch.Generator().manual_seed(0))
        k = unit_budget(self.keep, n)
        self._batched(x, k, text=x[:, :2], text_mask=None,
                      attn=torch.full((1, n), 1.0 / n), backend="reference")

    # ------------------------------------------------------------------ selection
    def _batched(self, visual, k, text=None, text_mask=None, attn=None, **overrides):
        """The method on ``[G, n, D]`` units of one size; ``int64[G, k]`` kept indices."""
        kw = {**self.method_kwargs, **overrides}
        kw.pop("stage1_keep", None)
        if self.method == "cdpruner":
            relevance = -ops.mi_scores(visual, text, text_mask=text_mask, metric="cosine",
                                       backend=kw.get("backend"))
            return self._fn(visual, k, relevance=relevance, **kw).indices
        if self.method == "trimtokenator":
            return self._fn(visual, text, k, stage1_keep=self._survivors(visual.shape[1], k),
                            text_mask=text_mask, **kw).indices
        if self.method == "divprune":
            return self._fn(visual, k, **kw).indices
        return self._fn(visual, attn, k, **kw).indices          # holov, vispruner

    def _survivors(self, n: int, k: int) -> int:
        """TrimTokenator's stage-1 survivors in a unit of ``n`` tokens that keeps ``k``:
        ``stage1_keep`` read by keep's rule (:func:`unit_budget`), raised to ``k`` where it is
        below.  Only the mixed forms get there (an int keep beside a fraction stage1_keep in a
        unit too small for the fraction to reach keep, a fraction keep beside an int
        stage1_keep in a unit large enough for the fraction to pass it): as a unit smaller
        than an int keep keeps all its tokens, such a unit's stage 1 keeps its budget, and
        stage 2 keeps all of them."""
        return max(k, unit_budget(self._stage1, n))

    def _select(self, feats, cu, budgets, text, text_mask, unit_row, score) -> torch.Tensor:
        """``bool[T]``: the kept tokens of the packed units ``feats[T, D]`` (``cu``: their
        offsets, ``budgets``: tokens kept per unit)."""
        T = feats.shape[0]
        keep = torch.zeros(T, dtype=torch.bool, device=feats.device)
        sizes = (cu[1:] - cu[:-1]).tolist()
        live = [u for u, n in enumerate(sizes) if n > 0]
        if not live:
            return keep
        backend = self.method_kwargs.get("backend")
        if self.method == "divprune":           # one varlen launch over every unit
            idx = ops.greedy_select_varlen(feats, cu, budgets, objective="maxmin",
                                           metric="cosine", backend=backend)
            return keep.index_fill_(0, idx, True)
        if self.method == "trimtokenator":
            stage1 = [self._survivors(n, k) for n, k in zip(sizes, budgets)]
            options = {o: v for o, v in self.method_kwargs.items() if o != "stage1_keep"}
            res = ops.prune_varlen(feats, cu, text[unit_row], budgets, stage1_keep=stage1,
                                   text_mask=text_mask[unit_row], **options)
            return keep.index_fill_(0, res.indices, True)
        # the other methods are batched over the units of one size
        groups: Dict[tuple, List[int]] = {}
        for u in live:
            groups.setdefault((sizes[u], budgets[u]), []).append(u)
        starts = cu[:-1]
        for (n, k), members in groups.items():
            first = starts[members]
            rows = first[:, None] + torch.arange(n, device=feats.device)
            inputs = {}
            if self.method in _NEEDS_TEXT:
                r = unit_row[members]
                inputs.update(text=text[r], text_mask=text_mask[r])
            if self.method in _NEEDS_ATTENTION:
                inputs["attn"] = score[rows]
            idx = self._batched(feats[rows], k, **inputs)
            keep[(first[:, None] + idx).flatten()] = True
        return keep

    # ------------------------------------------------------------------ video methods
    def _video_dry_run(self) -> None:
        """The video method's own option checks, at once, on a dummy video of 4 frames of 16
        tokens (reference backend)."""
        x = torch.randn(1, 4, 16, 4, generator=torch.Generator().manual_seed(0))
        self._video_call(x, torch.full((1, 4, 16), 1.0 / 16), [4], self._video_value(4, 16),
                         backend="reference")

    def _video_value(self, T: int, P: int):
        """The method's budget parameter for a video of ``T`` frames of ``P`` tokens: from
        ``keep``, or the caller's own value."""
        if self.keep is None:
            return self.method_kwargs[self._video.parameter]
        return video_parameter(self.method, self.keep, T, P)

    def _video_call(self, video, score, frames, value, **overrides):
        """The video method on ``video[G, T, P, D]`` (``score[G, T, P]`` where it needs one)."""
        entry = self._video
        kw = {**self.method_kwargs, **dict(entry.fixed), **overrides, entry.parameter: value}
        args = (video,) if entry.needs is None else (video, score)
        return self._fn(*args, frames=frames, **kw)

    def _prune_videos(self, feats, grid, merge: int, score):
        """``(kept bool[S], tokens)``: the video method on every video of ``feats[S, D]`` (their
        merged tokens, one video after another; ``grid``: their ``(t, h, w)``), batched over the
        videos with the same tokens per frame and the same budget parameter.  ``tokens``: per
        video, the method's tokens in the order of their positions (a merged token at its
        anchor's), which ``kept`` marks."""
        shapes = [(t, h * w // merge ** 2) for t, h, w in grid.tolist()]
        starts = [0, *itertools.accumulate(t * p for t, p in shapes)]
        D = feats.shape[1]
        kept = torch.zeros(feats.shape[0], dtype=torch.bool, device=feats.device)
        tokens: List[Optional[torch.Tensor]] = [None] * len(shapes)
        groups: Dict[tuple, List[int]] = {}
        for v, (t, p) in enumerate(shapes):
            groups.setdefault((p, self._video_value(t, p)), []).append(v)
        for (P, value), members in groups.items():
            frames = [shapes[v][0] for v in members]
            T = max(frames)
            if len(members) == 1:               # a view: no copy
                a = starts[members[0]]
                video = feats[a:a + T * P].view(1, T, P, D)
                sal = None if score is None else score[a:a + T * P].view(1, T, P)
            else:
                video = feats.new_zeros(len(members), T, P, D)
                sal = None if score is None else score.new_zeros(len(members), T, P)
                for g, v in enumerate(members):
                    a, t = starts[v], shapes[v][0]
                    video[g, :t] = feats[a:a + t * P].view(t, P, D)
                    if sal is not None:
                        sal[g, :t] = score[a:a + t * P].view(t, P)
            res = self._video_call(video, sal, frames, value)
            for g, (v, length) in enumerate(zip(members, res.lengths.tolist())):
                idx, order = res.indices[g, :length].sort()
                n = shapes[v][0] * P
                if length and (int(idx[0]) < 0 or int(idx[-1]) >= n
                               or bool((idx[1:] == idx[:-1]).any())):
                    raise RuntimeError(f"{self.method} returned positions outside [0, {n}) or "
                                       f"twice for a video of {n} tokens: {idx.tolist()}")
                kept[starts[v] + idx.to(kept.device)] = True
                tokens[v] = res.tokens[g, :length][order].to(feats.dtype)
        return kept, tokens

    # ------------------------------------------------------------------ the transformation
    def prune_inputs(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                     pixel_values_videos: Optional[torch.Tensor] = None, *,
                     image_grid_thw: Optional[torch.Tensor] = None,
                     video_grid_thw: Optional[torch.Tensor] = None,
                     mm_token_type_ids: Optional[torch.Tensor] = None,
                     second_per_grid_ts: Optional[torch.Tensor] = None,
                     attention_mask: Optional[torch.Tensor] = None,
                     position_ids: Optional[torch.Tensor] = None,
                     labels: Optional[torch.Tensor] = None,
                     left_align: bool = False) -> dict:
        """The model inputs with every image and video pruned.

        Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` (``None``
        where not given) without the pruned tokens' placeholders, ``position_ids``
        ``[4, B, L']`` (a contiguous text channel, then each kept token's original 3-D M-RoPE
        position), and ``mm_encoder_outputs`` with the kept features, to pass to the model's
        forward or generate in place of the pixel values and grids.  The batch is re-padded to
        its longest shrunk row: at the left with ``left_align`` (what generation needs) or when
        the batch is left-padded, else at the right.  Sets the model's ``rope_deltas`` so that
        a decoding step without ``position_ids`` gets the position it gets after the unpruned
        prompt.
        """
        model, config = self.model, self.model.config
        inner = model.model
        if input_ids is None:
            raise ValueError("pruning needs input_ids with the image/video placeholder tokens "
                             "(inputs_embeds alone is not supported)")
        device = input_ids.device
        merge = config.vision_config.spatial_merge_size
        has_img = pixel_values is not None and pixel_values.shape[0] > 0
        has_vid = pixel_values_videos is not None and pixel_values_videos.shape[0] > 0
        for name, given, grid in (("pixel_values", has_img, image_grid_thw),
                                  ("pixel_values_videos", has_vid, video_grid_thw)):
            if given and grid is None:
                grid_name = "image_grid_thw" if name == "pixel_values" else "video_grid_thw"
                raise ValueError(f"{name} needs {grid_name}")
        img_counts = (image_grid_thw.prod(-1) // merge ** 2).tolist() if has_img else []
        vid_counts = (video_grid_thw.prod(-1) // merge ** 2).tolist() if has_vid else []
        is_img = input_ids == config.image_token_id
        is_vid = input_ids == config.video_token_id
        for what, mask, counts in (("image", is_img, img_counts), ("video", is_vid, vid_counts)):
            if int(mask.sum()) != sum(counts):
                raise ValueError(f"input_ids hold {int(mask.sum())} {what} placeholder tokens, "
                                 f"but the {len(counts)} {what}(s) have {counts} visual tokens")
        padding = (torch.zeros_like(is_img) if attention_mask is None else attention_mask == 0)
        text_mask = ~is_img & ~is_vid & ~padding
        if mm_token_type_ids is None:   # what the processor gives: text 0, image 1, video 2
            mm_token_type_ids = is_img.int() + 2 * is_vid.int()

        # 1. The unpruned prompt's 3-D positions (before any work on the images).
        if position_ids is None:
            extra = {} if self._qwen3 else {"second_per_grid_ts": second_per_grid_ts}
            pos, _ = inner.get_rope_index(
                input_ids, mm_token_type_ids=mm_token_type_ids,
                image_grid_thw=image_grid_thw if has_img else None,
                video_grid_thw=video_grid_thw if has_vid else None,
                attention_mask=attention_mask, **extra)
        else:
            if position_ids.dim() != 3 or position_ids.shape[0] not in (3, 4):
                raise ValueError(f"position_ids must be the 3-D M-RoPE positions [3 or 4, B, L], "
                                 f"got shape {tuple(position_ids.shape)}")
            pos = position_ids[-3:].expand(3, *input_ids.shape)

        # 2. Units, budgets and the text, then encode and select.
        units_img = self._units(img_counts, image_grid_thw, merge, video=False)
        units_vid = self._units(vid_counts, video_grid_thw, merge, video=True)
        embeds = None
        if self.method in _NEEDS_TEXT:
            rows_with_units = set()
            for mask in (is_img, is_vid):
                rows_with_units |= set(mask.any(1).nonzero()[:, 0].tolist())
            empty = sorted(rows_with_units - set(text_mask.any(1).nonzero()[:, 0].tolist()))
            if empty:
                raise ValueError(f"{self.method} needs text tokens next to every image; row(s) "
                                 f"{empty} have none (padding and placeholders do not count)")
            embeds = model.get_input_embeddings()(input_ids)
        outputs, keep_img, keep_vid = {}, None, None
        self.kept = []
        for what, has, pixels, grid, units, mask, counts in (
                ("image", has_img, pixel_values, image_grid_thw, units_img, is_img, img_counts),
                ("video", has_vid, pixel_values_videos, video_grid_thw, units_vid, is_vid,
                 vid_counts)):
            if not has:
                continue
            with self._attention_scores(grid, self._score_kind(what)) as scores:
                get = inner.get_image_features if what == "image" else inner.get_video_features
                encoded = get(pixels, grid, return_dict=True)
            feats = torch.cat(list(encoded.pooler_output), 0)
            tokens = None
            if self._video is not None:         # a video method: images pass whole
                kept = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
                if what == "video":
                    with torch.no_grad():
                        kept, tokens = self._prune_videos(feats, grid, merge,
                                                          scores.get("score"))
            else:
                cu = torch.tensor([0, *itertools.accumulate(units)], device=feats.device)
                budgets = [unit_budget(self.keep, n) for n in units]
                # each unit's row: the row of its first placeholder
                rank = torch.nonzero(mask)[:, 0]             # placeholders in (row, pos) order
                unit_row = rank[cu[:-1].clamp(max=max(len(rank) - 1, 0)).to(rank.device)] \
                    if len(rank) else torch.zeros(len(units), dtype=torch.long, device=device)
                with torch.no_grad():
                    kept = self._select(feats, cu, budgets, embeds, text_mask, unit_row,
                                        scores.get("score"))
            split = kept.split(counts)
            self.kept += [s.nonzero()[:, 0] for s in split]
            outputs[what] = self._kept_output(encoded, kept, split, tokens)
            if what == "image":
                keep_img = kept.to(device)
            else:
                keep_vid = kept.to(device)

        # 3. Drop the pruned placeholders; kept tokens keep their original positions.
        deleted = torch.zeros_like(is_img)
        for mask, kept in ((is_img, keep_img), (is_vid, keep_vid)):
            if kept is not None:
                deleted[mask] = ~kept
        real = ~deleted & ~padding
        left = left_align or bool(padding[:, 0].any())
        order, filler = _shrink_order(real, left)

        def take(t, fill):
            if t is None:
                return None
            return t.expand_as(input_ids).gather(1, order).masked_fill(filler, fill)

        pad_id = getattr(config, "pad_token_id", None)
        if pad_id is None:
            pad_id = getattr(config.text_config, "pad_token_id", None)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        new_mask = take(mask, 0)
        vision = pos.gather(2, order[None].expand(3, -1, -1)).masked_fill(filler[None], 1)
        text_pos = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
        new_pos = torch.cat([text_pos[None].to(vision.dtype), vision], 0)
        # decode positions continue after the row's largest position, as without pruning
        top = pos.masked_fill(padding[None], -1).amax((0, 2))
        inner.rope_deltas = (top + 1 - real.sum(1))[:, None]
        # what generate() gives the first new token without pruning: the row's last token's
        # position + 1 in each channel (see _continuing_positions)
        last = torch.arange(pos.shape[2], device=pos.device).masked_fill(padding, 0).amax(1)
        after = pos.gather(2, last.view(1, -1, 1).expand(3, -1, 1))[..., 0] + 1
        self._next_positions = (order.shape[1], after)
        return {"input_ids": take(input_ids, 0 if pad_id is None else pad_id),
                "attention_mask": new_mask, "position_ids": new_pos,
                "mm_token_type_ids": take(mm_token_type_ids, 0), "labels": take(labels, -100),
                "mm_encoder_outputs": outputs}

    def _generate(self, generate, *args, **kwargs):
        self._next_positions = None
        with self._continuing_positions():
            return super()._generate(generate, *args, **kwargs)

    @contextlib.contextmanager
    def _continuing_positions(self):
        """While generate() runs, the positions it appends after a prompt it pruned continue
        the unpruned prompt's.  generate() gives each new token the last column of
        ``position_ids`` plus one (``_update_model_kwargs_for_generation``, the one place it
        extends them): without pruning that column is the row's last token, after pruning the
        last *kept* one, and the two differ when the row ends with an image (no text after it)
        whose last tokens were pruned.  The appended columns' 3-D channels are set from
        ``_next_positions`` (the shrunk prompt's width, ``int64[3, B]`` the unpruned rows' next
        positions); the text channel stays generate()'s, contiguous on the shrunk sequence.
        Beam search and ``num_return_sequences`` repeat each prompt row; so does the
        continuation."""
        model = self.model
        name = "_update_model_kwargs_for_generation"
        own = model.__dict__.get(name)
        update = getattr(model, name)

        def continued(outputs, model_kwargs, *args, **kwargs):
            model_kwargs = update(outputs, model_kwargs, *args, **kwargs)
            pos = model_kwargs.get("position_ids")
            if self._next_positions is not None and pos is not None:
                width, start = self._next_positions
                steps = pos.shape[-1] - width
                if steps > 0:
                    start = start.to(pos.device).repeat_interleave(
                        pos.shape[1] // start.shape[1], 1)
                    pos = pos.clone()
                    pos[-3:, :, width:] = start[..., None] + torch.arange(steps, device=pos.device)
                    model_kwargs["position_ids"] = pos
            return model_kwargs

        setattr(model, name, continued)
        try:
            yield
        finally:
            if own is None:
                del model.__dict__[name]
            else:
                model.__dict__[name] = own
            self._next_positions = None

    def _units(self, counts: List[int], grid, merge: int, video: bool) -> List[int]:
        """Token count of every unit: one per image / video, or per frame of a video."""
        if not (video and self.per_frame and counts):     # no video: no grid to split
            return list(counts)
        units = []
        for t, h, w in grid.tolist():
            units += [h * w // merge ** 2] * t
        return units

    def _kept_output(self, encoded, kept: torch.Tensor, split,
                     tokens=None) -> BaseModelOutputWithPooling:
        """The encoder output with only the kept tokens (deepstack features too); ``tokens``:
        per unit, the tokens to give instead (a video method's, merged ones included)."""
        pooled = tuple(tokens) if tokens is not None else tuple(
            f[s] for f, s in zip(encoded.pooler_output, split))
        deep = getattr(encoded, "deepstack_features", None)
        if deep is None:
            return BaseModelOutputWithPooling(pooler_output=pooled)
        out = type(encoded)(pooler_output=pooled)
        out.deepstack_features = [tuple(f[s] for f, s in zip(layer, split)) for layer in deep]
        return out

    def _score_kind(self, what: str) -> Optional[str]:
        """What the method needs from the tower's last block for ``what`` ("image" or
        "video"): ``"attention"``, ``"saliency"`` (FastVID's) or ``None``."""
        if self._video is not None:
            return self._video.needs if what == "video" else None
        return "attention" if self.method in _NEEDS_ATTENTION else None

    @contextlib.contextmanager
    def _attention_scores(self, grid, kind: Optional[str]):
        """While a batch is encoded: ``got["score"]``, ``float32[T]``, a score of each merged
        token from the tower's last block: ``kind="attention"``, the mean attention it receives
        (:func:`received_in_segments`, patch scores averaged over each merge group);
        ``"saliency"``, FastVID's (:func:`frame_query_saliency`); ``None``: nothing."""
        got: dict = {}
        if kind is None:
            yield got
            return
        visual = self.model.model.visual
        attn = visual.blocks[-1].attn
        rotary = inspect.getmodule(type(attn)).apply_rotary_pos_emb_vision
        unit = visual.spatial_merge_unit if hasattr(visual, "spatial_merge_unit") \
            else self.model.config.vision_config.spatial_merge_size ** 2

        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                S = h.shape[0]
                q, k, _ = module.qkv(h).reshape(S, 3, module.num_heads, -1).permute(
                    1, 0, 2, 3).unbind(0)
                q, k = rotary(q, k, cos, sin)
                if kind == "saliency":
                    got["merged"] = frame_query_saliency(q, k, grid, unit, module.scaling)
                else:
                    got["merged"] = received_in_segments(q, k, cu, module.scaling).view(
                        -1, unit).mean(1)

        handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield got
        finally:
            handle.remove()
        score = got.pop("merged")
        if getattr(visual, "window_size", None) is not None and \
                hasattr(visual, "fullatt_block_indexes"):          # Qwen2.5-VL's window order
            from transformers.vision_utils import get_vision_window_index
            config = self.model.config.vision_config
            window, _ = get_vision_window_index(grid, spatial_merge_size=config.spatial_merge_size,
                                                window_size=config.window_size,
                                                patch_size=config.patch_size)
            score = score[torch.argsort(window.to(score.device))]
        got["score"] = score


def frame_query_saliency(q: torch.Tensor, k: torch.Tensor, grid: torch.Tensor, unit: int,
                         scale: float) -> torch.Tensor:
    """``float32[S / unit]``: FastVID's saliency of each merged token on Qwen2.5-VL (its
    ``Qwen2_5_VLVisionFlashAttention2.forward`` in the tower's last block): per frame and head,
    the frame's mean query (over its patches, after RoPE) against the mean key of each merged
    token's ``unit`` patches, ``softmax(scale · q·k)`` over the frame's merged tokens, then the
    mean over heads.  ``q``, ``k``: ``[S, H, dh]`` in the block's token order (each frame's
    patches contiguous, each merge group's ``unit`` patches adjacent; Qwen2.5-VL's window order
    moves merge groups only within a frame, so the result is in that order too); ``grid[V, 3]``
    the videos' ``(t, h, w)`` in patches.  The original computes one video (``grid_thw[0]``);
    this runs each of ``V``.  float32 throughout (the original rounds the softmax to the model's
    dtype before the mean)."""
    H, dh = q.shape[1:]
    out, a = [], 0
    for t, h, w in grid.tolist():
        n = t * h * w
        query = q[a:a + n].float().view(t, h * w, H, dh).mean(1)                 # [t, H, dh]
        key = k[a:a + n].float().view(t, h * w // unit, unit, H, dh).mean(2)     # [t, P, H, dh]
        logits = torch.einsum("thd,tphd->thp", query, key) * scale
        out.append(logits.softmax(-1).mean(1).reshape(-1))
        a += n
    return torch.cat(out)


def received_in_segments(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor,
                         scale: float, chunk: int = 1024) -> torch.Tensor:
    """``float32[S]``: per token, the softmax attention it receives from the queries of its own
    segment (``cu_seqlens``), averaged over heads and queries (bidirectional attention, as in
    the vision tower).  ``q``, ``k``: ``[S, H, dh]``.  Queries are taken ``chunk`` at a time, so
    the memory is ``H·chunk·n`` per segment of ``n`` tokens."""
    S, H, _ = q.shape
    out = torch.zeros(S, dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b == a:
            continue
        kk = k[a:b].transpose(0, 1).float()                         # [H, n, dh]
        acc = torch.zeros(b - a, dtype=torch.float32, device=q.device)
        for s in range(a, b, chunk):
            qq = q[s:min(s + chunk, b)].transpose(0, 1).float()     # [H, c, dh]
            p = torch.softmax(qq @ kk.transpose(1, 2) * scale, dim=-1)
            acc += p.sum((0, 1))
        out[a:b] = acc / (H * (b - a))
    return out
