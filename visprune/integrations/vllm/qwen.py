"""Qwen2.5-VL in vLLM with visprune: vLLM's own model class, whose encoder step returns each
image's ``unit_budget(keep, N)`` kept merged tokens when the HF config has a ``visprune`` entry
(and is unchanged without one).

What each method reads is what the transformers Qwen integration feeds it
(:mod:`visprune.integrations.transformers.qwen`): the merged tokens (the 2×2 patch merger's
outputs), the prompt's text through the LLM's input embeddings (every prompt token but the image
and video placeholders), and, for HoloV / VisPruner, the mean attention each merged token
receives in the vision tower's last block (that block's own q / k, captured by a forward
pre-hook on its attention kernel, over that block's attention segments — windows or frames —,
patch scores averaged over each 2×2 merge group, then put back from the window order).

The kept tokens keep their **original** 3-D M-RoPE positions (the facts are those of vLLM's EVS
video pruning, which carries positions next to the embeddings; the mechanism differs because
vLLM's CPU model runner never takes EVS's ``recompute_mrope_positions`` path):

* the processor announces the pruned count of placeholders per image;
* :meth:`get_mrope_input_positions` numbers the prompt's text as the unpruned prompt is
  numbered (text after an image continues after the whole image's grid, and so does decoding)
  and gives an image's placeholders the position of its first token in all three channels;
* the encoder step appends each kept token's ``(t, h, w)`` within its image to its embedding as
  extra channels (:func:`encode_positions`: base-256 digits, exact in bf16), so they travel
  with it through vLLM's encoder cache and chunked prefill;
* :meth:`embed_input_ids` strips them and :meth:`forward` (which the model runner calls next
  with that step's positions) adds them to the positions of the image placeholders.

Videos: with an image method a video is refused (vLLM's own limit check: the model takes no
video); with a video method (:data:`~._core.VIDEO_METHODS`: ``evs``, ``vidcom2``, ``dycoke``)
each video keeps the method's count of its merged tokens, ``count(P, t)`` of its grid, which the
processor announces, in the method's output order, each at its original position (the temporal
coordinate scaled as vLLM numbers a video's frames, ``int(t · second_per_grid_t ·
tokens_per_second)``); images keep all their tokens.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List

import numpy as np
import torch
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from ..transformers.qwen import received_in_segments
from ._core import NEEDS_CLS, NEEDS_TEXT, TEXT_FIELD, QwenPruner, VideoPruner, prompt_text, \
    settings
from .processing import PrunedDummyInputsMixin, PrunedInfoMixin, PrunedProcessorMixin

# Each kept token's (t, h, w) within its image rides after its embedding, in the embedding's
# dtype: vLLM's encoder cache and prefill chunks carry one tensor per image.  bf16 holds
# integers exactly only up to 256 (a 2×300 grid's column 259 would become 260), so each
# coordinate is written as base-256 digits, each exact in bf16, fp16 and fp32; three digits
# cover any grid side below 256**3 merged tokens (a side of 2**24 tokens is 4.7e8 pixels).
POSITION_BASE, POSITION_DIGITS = 256, 3
POSITION_CHANNELS = 3 * POSITION_DIGITS


def encode_positions(thw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[K, POSITION_CHANNELS]`` in ``dtype``: the base-256 digits of ``thw: int64[K, 3]``,
    least significant first, coordinate by coordinate (:func:`decode_positions` inverts it)."""
    place = POSITION_BASE ** torch.arange(POSITION_DIGITS, device=thw.device)
    return (thw[:, :, None] // place % POSITION_BASE).flatten(1).to(dtype)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """``int64[3, K]``: the ``(t, h, w)`` that :func:`encode_positions` wrote in
    ``channels[K, POSITION_CHANNELS]``."""
    place = POSITION_BASE ** torch.arange(POSITION_DIGITS, device=channels.device)
    digits = channels.round().long().view(-1, 3, POSITION_DIGITS)
    return (digits * place).sum(-1).T


# ------------------------------------------------------------------------------ processor
class PrunedQwen2_5_VLProcessingInfo(PrunedInfoMixin, Qwen2_5_VLProcessingInfo):
    visprune_family = "qwen"

    def get_supported_mm_limits(self):
        limits = super().get_supported_mm_limits()
        config = self.visprune_settings()
        if config is None or config.video is not None:
            return limits
        # an image method does not prune videos: a request with one is refused by vLLM's own
        # limit check
        return {"image": limits["image"]}

    def get_num_video_tokens(self, *, image_width: int, image_height: int, num_frames: int,
                             image_processor, mm_kwargs) -> int:
        """A video method's count of a video (vLLM's profiling sizes the encoder budget and the
        longest dummy video by it), else vLLM's own."""
        size = dict(image_width=image_width, image_height=image_height,
                    image_processor=image_processor, mm_kwargs=mm_kwargs)
        n = super().get_num_video_tokens(num_frames=num_frames, **size)
        config = self.visprune_settings()
        if config is None or config.video is None:
            return n
        per_frame = super().get_num_video_tokens(num_frames=1, **size)    # one merged frame
        return config.video_budget(per_frame, n // per_frame)


class PrunedQwen2_5_VLDummyInputsBuilder(PrunedDummyInputsMixin, Qwen2_5_VLDummyInputsBuilder):
    pass


class PrunedQwen2_5_VLMultiModalProcessor(PrunedProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    def _visprune_image_token_ids(self) -> set:
        config = self.info.get_hf_config()
        return {config.image_token_id, config.video_token_id}

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        """A video method's count of placeholders for each video (from its grid ``(t, h, w)``:
        ``t`` frames of ``(h/m)·(w/m)`` merged tokens)."""
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.visprune_settings()
        if config is None or config.video is None:
            return updates
        merge = self.info.get_hf_config().vision_config.spatial_merge_size

        def counted(replacement):
            def get(item_idx):
                tokens = replacement(item_idx) if callable(replacement) else replacement
                t, h, w = out_mm_kwargs["video"][item_idx]["video_grid_thw"].data.tolist()
                return tokens[:config.video_budget((h // merge) * (w // merge), t)]
            return get

        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=counted(u.replacement))
                if u.modality == "video" else u for u in updates]


# ------------------------------------------------------------------------------ model
class PrunedQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with visprune.  ``self.visprune``: the :class:`QwenPruner`, or
    ``None`` (the model is vLLM's own)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visprune = None
        config = settings(self.config, "qwen")
        if config is None:
            return
        mm_config = self.multimodal_config
        if mm_config.is_multimodal_pruning_enabled():
            raise ValueError("visprune: pruning cannot be combined with vLLM's video pruning "
                             "(video_pruning_rate > 0): both rewrite the M-RoPE positions")
        if config.needs_cls and get_tensor_model_parallel_world_size() > 1:
            raise ValueError(f"visprune: {config.method} reads the attention of every head of "
                             "the vision tower's last block, which tensor parallelism splits "
                             "across devices; use tensor_parallel_size=1")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("visprune: pruning on Qwen2.5-VL needs pipeline_parallel_size=1 "
                             "(the kept tokens' positions are set on the first stage)")
        device = torch.device(vllm_config.device_config.device)
        self.visprune = (VideoPruner(config, device) if config.video is not None
                         else QwenPruner(config, device))
        # as with EVS, the encoder is not captured in CUDA graphs: the attention hook and the
        # data-dependent selection run eagerly
        self.is_multimodal_pruning_enabled = True

    # ------------------------------------------------------------------ the encoder step
    def embed_multimodal(self, **kwargs):
        """Each image's and video's kept tokens, in vLLM's order (the modalities in the order of
        their kwargs), each followed by its position channels."""
        text_ids = kwargs.pop(TEXT_FIELD, None)
        if self.visprune is None:
            return super().embed_multimodal(**kwargs)
        out = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if inputs is None:
                continue
            if modality == "image":
                out += self._visprune_images(inputs, text_ids)
            else:
                out += self._visprune_videos(inputs)
        return tuple(out)

    def _grid_positions(self, t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
        """``int64[3, t·(h/m)·(w/m)]``: each merged token's ``(t, h, w)`` offset from its
        image's / video's first position, in the merger's frame-major, row-major order; the
        temporal one ``int(t · t_factor)``, as vLLM numbers the unpruned prompt."""
        merge = self.visual.spatial_merge_size
        frames = torch.from_numpy((np.arange(t) * t_factor).astype(np.int64))
        return torch.stack(torch.meshgrid(frames, torch.arange(h // merge),
                                          torch.arange(w // merge), indexing="ij")).flatten(1)

    def _visprune_images(self, image_input, text_ids) -> List[torch.Tensor]:
        """Each image's kept tokens (an image method's; all of them under a video method), at
        their original positions."""
        grids = image_input["image_grid_thw"].tolist()
        video_method = isinstance(self.visprune, VideoPruner)
        pixels = image_input["type"] == "pixel_values" and not video_method
        with self._visprune_attention(grids, pixels) as got:
            features = self._process_image_input(image_input)       # per image [N_i, D]
        if video_method:            # a video method leaves images whole
            kept = [torch.arange(len(f), device=f.device) for f in features]
        else:
            text = {}
            if self.visprune.method in NEEDS_TEXT:
                text = prompt_text(self.language_model.embed_input_ids, text_ids)
            kept = self.visprune.select(features, score=got.get("score"), **text)
        out = []
        for f, k, (t, h, w) in zip(features, kept, grids):
            thw = self._grid_positions(t, h, w).to(f.device)
            out.append(torch.cat([f[k], encode_positions(thw[:, k].T, f.dtype)], 1))
        return out

    def _visprune_videos(self, video_input) -> List[torch.Tensor]:
        """Each video's tokens the video method keeps, at their original positions."""
        grids = video_input["video_grid_thw"].tolist()
        features = self._process_video_input(video_input)           # per video [t·P, D]
        seconds = video_input.get("second_per_grid_ts")
        seconds = [1.0] * len(grids) if seconds is None else seconds.tolist()
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        merge = self.visual.spatial_merge_size
        videos = [f.view(t, (h // merge) * (w // merge), f.shape[-1])
                  for f, (t, h, w) in zip(features, grids)]
        out = []
        for (tokens, index), (t, h, w), s in zip(self.visprune.prune(videos), grids, seconds):
            thw = self._grid_positions(t, h, w, s * tokens_per_second).to(tokens.device)
            out.append(torch.cat([tokens, encode_positions(thw[:, index].T, tokens.dtype)], 1))
        return out

    @contextlib.contextmanager
    def _visprune_attention(self, grids: List[List[int]], pixels: bool):
        """While the images are encoded: ``got["score"]``, ``float32[ΣN_i]``, the mean
        attention each merged token receives in the tower's last block (HoloV / VisPruner
        only)."""
        got: Dict[str, torch.Tensor] = {}
        if not pixels or self.visprune.method not in NEEDS_CLS:
            yield got
            return
        kernel = self.visual.blocks[-1].attn.attn

        def hook(module, args, kwargs):
            # [1, S, H, dh] after the block's RoPE, in the tower's window order
            got["q"], got["k"] = kwargs["query"][0], kwargs["key"][0]

        handle = kernel.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield got
        finally:
            handle.remove()
        got["score"] = self._visprune_scores(got.pop("q"), got.pop("k"), grids, kernel.scale)

    def _visprune_scores(self, q, k, grids, scale) -> torch.Tensor:
        visual = self.visual
        full = len(visual.blocks) - 1 in visual.fullatt_block_indexes
        scores, start = [], 0
        for t, h, w in grids:
            # the block's segments for this image (the tower's own helper), from 0
            _, _, window, cu_window, frames = visual.get_rope_by_thw(t, h, w)
            ends = frames.cumsum(0) if full else cu_window
            cu = torch.cat([ends.new_zeros(1), ends])
            n = t * h * w
            with torch.no_grad():
                patch = received_in_segments(q[start:start + n], k[start:start + n], cu, scale)
            merged = patch.view(-1, visual.spatial_merge_unit).mean(1)
            scores.append(merged[torch.argsort(window.to(merged.device))])
            start += n
        return torch.cat(scores)

    # ------------------------------------------------------------------ M-RoPE positions
    def get_mrope_input_positions(self, input_tokens, mm_features):
        """The prompt's positions ``[3, L]`` and decode offset.  Text is numbered as in the
        unpruned prompt (text after an image continues after the whole image's grid), and so is
        decoding; an image's placeholders get the position of the image's first token in all
        three channels, to which :meth:`forward` adds each kept token's ``(t, h, w)``."""
        if self.visprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        L = len(input_tokens)
        positions = np.empty((3, L), dtype=np.int64)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        st, nxt = 0, 0               # next token, next position
        for feature, (offset, t, h, w, t_factor) in zip(features,
                                                         self.iter_mm_grid_thw(mm_features)):
            positions[:, st:offset] = np.arange(offset - st) + nxt
            nxt += offset - st
            length = feature.mm_position.length
            positions[:, offset:offset + length] = nxt
            # after the unpruned grid's largest position, as vLLM and transformers number it
            nxt += max(int((t - 1) * t_factor), h - 1, w - 1) + 1
            st = offset + length
        positions[:, st:] = np.arange(L - st) + nxt
        nxt += L - st
        return torch.from_numpy(positions), nxt - L

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None,
                        **kwargs):
        """The step's input embeddings; the kept tokens' ``(t, h, w)`` channels are stripped
        and kept for this step's :meth:`forward` (the model runner calls the two in turn)."""
        self._visprune_thw = None
        if self.visprune is not None and multimodal_embeddings is not None \
                and len(multimodal_embeddings):
            thw = torch.cat([e[:, -POSITION_CHANNELS:] for e in multimodal_embeddings])
            self._visprune_thw = (is_multimodal, decode_positions(thw))
            multimodal_embeddings = [e[:, :-POSITION_CHANNELS] for e in multimodal_embeddings]
        return super().embed_input_ids(input_ids, multimodal_embeddings,
                                       is_multimodal=is_multimodal, **kwargs)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        pending = getattr(self, "_visprune_thw", None)
        self._visprune_thw = None
        if pending is not None:
            # each kept token's original position: its image's first position + its (t, h, w)
            is_multimodal, thw = pending
            slots = is_multimodal.to(positions.device).nonzero()[:, 0]
            positions = positions.clone()
            positions[:, slots] += thw.to(positions)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds,
                               **kwargs)


MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLMultiModalProcessor, info=PrunedQwen2_5_VLProcessingInfo,
    dummy_inputs=PrunedQwen2_5_VLDummyInputsBuilder,
)(PrunedQwen2_5_VLForConditionalGeneration)
