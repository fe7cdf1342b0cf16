"""LLaVA-1.5 and LLaVA-NeXT in vLLM with visprune: vLLM's own model classes, whose encoder step
returns each image's ``min(keep, N)`` kept tokens when the HF config has a ``visprune`` entry
(and is unchanged without one).

What each method reads is what the transformers integration feeds it
(:mod:`visprune.integrations.transformers.llava`): the projector outputs (TrimTokenator,
DivPrune, HoloV, CDPruner) or the selected CLIP features before the projector (VisionZip,
VisPruner), the prompt's text through the LLM's input embeddings, and the CLS attention of the
vision layer that outputs the selected features, computed from that layer's ``qkv_proj`` output
(captured by a forward hook while the batch of images is encoded; the tower keeps its attention
kernel).  LLaVA-NeXT: each image's packed any-resolution sequence (base crop, unpadded grid,
newline tokens) is pruned as a whole; a token's CLS attention is its own crop's, a newline token
has attention 0 and no CLIP feature (VisionZip / VisPruner drop it).
"""
from __future__ import annotations

import contextlib
import types
from typing import Dict, List, Tuple

import torch
from transformers import CLIPVisionConfig
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import InputProcessingContext

from ... import methods
from ..transformers.llava import _cls_attention
from ._core import EMBEDDING_METHODS, NEEDS_TEXT, PRE_PROJECTOR, TEXT_FIELD, Pruner, \
    prompt_text, settings
from .processing import PrunedDummyInputsMixin, PrunedInfoMixin, PrunedProcessorMixin


# ------------------------------------------------------------------------------ processors
class PrunedLlavaProcessingInfo(PrunedInfoMixin, LlavaProcessingInfo):
    def visprune_counts(self) -> Tuple[int, int]:
        """``(fewest, most)`` tokens the method chooses among in one image: LLaVA-1.5 gives
        every image one count."""
        size = self.get_image_size_with_most_features()
        n = self.visprune_candidates(image_width=size.width, image_height=size.height)
        return n, n


class PrunedLlavaNextProcessingInfo(PrunedInfoMixin, LlavaNextProcessingInfo):
    def visprune_candidates(self, *, image_width: int, image_height: int) -> int:
        """The packed sequence's tokens, but for VisionZip / VisPruner, which select CLIP
        features before the projector, without its newline tokens (one per row of the
        unpadded grid): they have no CLIP feature and the encoder step does not return them."""
        n = super().visprune_candidates(image_width=image_width, image_height=image_height)
        config = self.visprune_settings()
        if config is None or config.method not in PRE_PROJECTOR:
            return n
        encoder = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=encoder.get_image_size())
        _, newlines = self._get_num_unpadded_features(
            original_height=image_height, original_width=image_width,
            npatches=encoder.get_patch_grid_length(), num_patch_height=rows,
            num_patch_width=cols)
        return n - newlines

    def visprune_counts(self) -> Tuple[int, int]:
        """``(fewest, most)`` tokens the method chooses among in one image: the base crop's
        alone (a thin strip, whose unpadded grid is empty), and an image of the largest grid
        pinpoint (its grid is not cut)."""
        encoder = self.get_vision_encoder_info()
        side = encoder.get_image_size()
        fewest = get_num_selected_vision_tokens(
            encoder.get_num_image_tokens(image_width=side, image_height=side),
            self.get_hf_config().vision_feature_select_strategy)
        most = max(self.visprune_candidates(image_width=w, image_height=h)
                   for h, w in self.get_hf_config().image_grid_pinpoints)
        return fewest, most


class PrunedLlavaDummyInputsBuilder(PrunedDummyInputsMixin, LlavaDummyInputsBuilder):
    pass


class PrunedLlavaMultiModalProcessor(PrunedProcessorMixin, LlavaMultiModalProcessor):
    pass


class PrunedLlavaNextMultiModalProcessor(PrunedProcessorMixin, LlavaNextMultiModalProcessor):
    pass


def _llava_info(ctx):
    info = _build_llava_or_pixtral_hf_info(ctx)
    if isinstance(info, PixtralHFProcessingInfo):     # Pixtral-HF: vLLM's own, unpruned
        return info
    return PrunedLlavaProcessingInfo(ctx)


def _llava_processor(info, dummy_inputs):
    if isinstance(info, PrunedLlavaProcessingInfo):
        return PrunedLlavaMultiModalProcessor(info, dummy_inputs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs)


# ------------------------------------------------------------------------------ models
class _PrunedEncoderMixin:
    """The encoder step with pruning.  ``self.visprune``: the :class:`Pruner`, or ``None``."""

    def _visprune_setup(self, vllm_config) -> None:
        """``self.visprune`` from the HF config's ``visprune`` entry, checked against the image
        token counts of this model's processor (its own, as the processor announces them)."""
        self.visprune = None
        config = settings(self.config)
        if config is None:
            return
        info = type(self)._processor_factory.info(
            InputProcessingContext(vllm_config.model_config, None))
        if not isinstance(info, PrunedInfoMixin):
            raise ValueError(f"visprune: the vLLM plugin does not prune "
                             f"{type(self.config.vision_config).__name__} towers "
                             f"(Pixtral-HF's variable-resolution images)")
        if config.needs_cls:
            self._visprune_check_cls(config.method)
        self.visprune = Pruner(config, *info.visprune_counts(),
                               torch.device(vllm_config.device_config.device))

    def _visprune_check_cls(self, method: str) -> None:
        """A method that reads CLS attention needs a CLIP tower (SigLIP has no CLS token) and
        its CLS token out of the visual tokens; sets the attention layer it reads."""
        vision = self.config.vision_config
        if not isinstance(vision, CLIPVisionConfig):
            raise ValueError(f"visprune: {method} reads the vision tower's CLS attention, and "
                             f"this model's {type(vision).__name__} tower has no CLS token "
                             f"({', '.join(EMBEDDING_METHODS)} work with any tower)")
        strategy = self.config.vision_feature_select_strategy
        if strategy != "default":
            raise ValueError(f"visprune: {method} needs vision_feature_select_strategy="
                             f"'default' (the CLS token is not a visual token), got {strategy!r}")
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int) or layer % (vision.num_hidden_layers + 1) < 1:
            raise ValueError(f"visprune: {method} needs one vision_feature_layer after the "
                             f"embeddings, got {layer!r}")
        self._crop_tokens = (vision.image_size // vision.patch_size) ** 2
        # the vision layer that outputs the selected features (vLLM builds the tower up to it)
        self._attn_layer = layer % (vision.num_hidden_layers + 1) - 1
        self._heads = vision.num_attention_heads

    @contextlib.contextmanager
    def _visprune_capture(self):
        """Forward hooks on the attention layer's ``qkv_proj`` (and the layer, for VisionZip's
        CLS token) for one encoding of the images: ``got["q"]``, ``got["k"]``, ``got["cls"]``."""
        got: Dict[str, torch.Tensor] = {}
        hooks = []
        if self.visprune.method in ("holov", "visionzip", "vispruner"):
            layer = self.vision_tower.vision_model.encoder.layers[self._attn_layer]

            def qkv(module, args, output):
                q, k, _ = output[0].chunk(3, dim=-1)
                got["q"], got["k"] = q, k

            hooks.append(layer.self_attn.qkv_proj.register_forward_hook(qkv))
            if self.visprune.method == "visionzip":
                hooks.append(layer.register_forward_hook(
                    lambda module, args, output: got.__setitem__("cls", output[:, 0])))
        try:
            yield got
        finally:
            for h in hooks:
                h.remove()

    def _visprune_cls_inputs(self, got) -> Dict[str, torch.Tensor]:
        """Per crop: ``attn[P, n]``, ``keys[P, n, Dk]``, ``cls[P, C]`` as the method takes them
        (VisionZip: attention summed and keys averaged over heads; HoloV / VisPruner: attention
        averaged over heads)."""
        if "q" not in got:
            return {}
        if self.visprune.method == "visionzip":
            attn, keys = methods.visionzip_attention(got["q"], got["k"], self._heads)
            return {"attn": attn, "keys": keys, "cls": got["cls"]}
        return {"attn": _cls_attention(got["q"], got["k"], self._heads), "keys": got["k"][:, 1:]}

    def _visprune_text(self, text_ids) -> Dict[str, torch.Tensor]:
        """``text[I, M, D]`` and ``text_mask[I, M]``: each image's prompt text through the LLM's
        input embeddings (one embedding call for the whole step)."""
        if text_ids is None or self.visprune.method not in NEEDS_TEXT:
            return {}
        return prompt_text(self.language_model.embed_input_ids, text_ids)

    def _visprune_embeds(self, data, text) -> List[torch.Tensor] | torch.Tensor:
        """Precomputed image embeddings (projector outputs), pruned."""
        if isinstance(data, torch.Tensor) and data.dim() == 3:
            return self.visprune.prune_dense(data, **text)
        return self.visprune.prune(list(data), **text)

    def embed_multimodal(self, **kwargs):
        """The encoder step: vLLM's own without pruning; else the images pruned, from
        precomputed embeddings (``_visprune_embeds``) or pixels (the model's
        ``_visprune_pixels(image_input, text)``)."""
        text_ids = kwargs.pop(TEXT_FIELD, None)
        if self.visprune is None:
            return super().embed_multimodal(**kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        text = self._visprune_text(text_ids)
        if image_input["type"] == "image_embeds":
            return self._visprune_embeds(image_input["data"], text)
        return self._visprune_pixels(image_input, text)


class PrunedLlavaForConditionalGeneration(_PrunedEncoderMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with visprune.  All images have the same token count: every encoder
    step's images are pruned in one batched call."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._visprune_setup(vllm_config)

    def _visprune_pixels(self, image_input, text):
        """The step's images from pixels, pruned in one batched call."""
        with self._visprune_capture() as got:
            features = self._process_image_pixels(image_input)       # [I, n, C], before projector
        inputs = self._visprune_cls_inputs(got)
        cls = inputs.pop("cls", None)
        if self.visprune.method in PRE_PROJECTOR:
            kept = self.visprune.prune_dense(
                features, **inputs, **({"cls_token": cls.to(features.dtype)} if cls is not None
                                       else {}))
            return self.multi_modal_projector(kept)
        return self.visprune.prune_dense(self.multi_modal_projector(features), **text,
                                         **({"attn": inputs["attn"]} if inputs else {}))


class PrunedLlavaNextForConditionalGeneration(_PrunedEncoderMixin,
                                              LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with visprune.  Images have different token counts: images of one
    count are pruned in one batched call."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._visprune_setup(vllm_config)

    def _visprune_layout(self, image_sizes, crops: List[int]) -> List[torch.Tensor]:
        """Per image, ``int64[N_i]``: each packed token's flat index into the step's
        ``[crops × n]`` vision outputs, -1 for a newline token — vLLM's own packing applied to
        the indices, so it cannot drift from the features."""
        n = self._crop_tokens
        flat = torch.arange(sum(crops) * n, dtype=torch.float64).view(-1, n, 1)
        shim = types.SimpleNamespace(config=self.config, image_newline=flat.new_full((1,), -1.0))
        return [LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
                    shim, size, crop, strategy="spatial_unpad")[:, 0].long()
                for size, crop in zip(image_sizes, flat.split(crops))]

    def _visprune_pixels(self, image_input, text):
        """The step's images from pixels, each packed sequence pruned as a whole."""
        if self.visprune.method not in PRE_PROJECTOR and self.visprune.method != "holov":
            return self.visprune.prune(list(super()._process_image_input(image_input)), **text)

        pixel_values = image_input["pixel_values"]
        crops = ([pixel_values.shape[1]] * pixel_values.shape[0]
                 if isinstance(pixel_values, torch.Tensor) else [len(p) for p in pixel_values])
        stacked = (pixel_values.flatten(0, 1) if isinstance(pixel_values, torch.Tensor)
                   else torch.cat(list(pixel_values)))
        with self._visprune_capture() as got:
            features = self._image_pixels_to_features(self.vision_tower, stacked)  # [P, n, C]
        inputs = self._visprune_cls_inputs(got)
        image_sizes = image_input.get("image_sizes")
        sources = [s.to(features.device) for s in self._visprune_layout(image_sizes, crops)]
        attn = inputs["attn"].flatten()
        if self.visprune.method == "holov":
            projected = self.multi_modal_projector(features).split(crops)
            visual = [self._merge_image_patch_embeddings(size, p, strategy="spatial_unpad")
                      for size, p in zip(image_sizes, projected)]
            return self.visprune.prune(
                visual, attn=[torch.where(s >= 0, attn[s.clamp(min=0)], 0.0) for s in sources])
        # VisionZip / VisPruner select (and merge) CLIP features before the projector; a
        # newline token has none and is not kept.
        sources = [s[s >= 0] for s in sources]
        pre, keys = features.flatten(0, 1), inputs["keys"].flatten(0, 1)
        extra = {}
        if "cls" in inputs:                 # the CLS token of each image's base crop
            extra["cls_token"] = torch.stack(
                [inputs["cls"][s[0] // self._crop_tokens] for s in sources]).to(features.dtype)
        kept = self.visprune.prune([pre[s] for s in sources], attn=[attn[s] for s in sources],
                                   keys=[keys[s] for s in sources], **extra)
        return [self.multi_modal_projector(k) for k in kept]


MULTIMODAL_REGISTRY.register_processor(
    _llava_processor, info=_llava_info, dummy_inputs=PrunedLlavaDummyInputsBuilder,
)(PrunedLlavaForConditionalGeneration)
MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaNextMultiModalProcessor, info=PrunedLlavaNextProcessingInfo,
    dummy_inputs=PrunedLlavaDummyInputsBuilder,
)(PrunedLlavaNextForConditionalGeneration)
