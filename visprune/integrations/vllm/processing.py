"""Processor side of the plugin: ``keep`` placeholders per image, and the prompt's text in the
multimodal kwargs for text-conditioned methods.  Mixins placed before vLLM's own classes."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.parse import ImageProcessorItems
from vllm.multimodal.processing import PromptReplacement

from ._core import EMBEDDING_METHODS, TEXT_FIELD, Settings, settings, text_hashes


class PrunedInfoMixin:
    """``get_num_image_tokens``: the pruned count (:meth:`Settings.budget` of the image's
    :meth:`visprune_candidates`).  It sizes the profiling budget (``get_max_image_tokens``).
    ``visprune_family``: whose methods and ``keep`` rules apply (:func:`settings`)."""

    visprune_family = "llava"

    def visprune_settings(self) -> Optional[Settings]:
        return settings(self.get_hf_config(), self.visprune_family)

    def visprune_candidates(self, **image) -> int:
        """The tokens the method chooses among in an image (``image``: vLLM's
        ``get_num_image_tokens`` arguments, its size first): its unpruned token count."""
        return super().get_num_image_tokens(**image)

    def get_num_image_tokens(self, **image) -> int:
        config = self.visprune_settings()
        if config is None:
            return super().get_num_image_tokens(**image)
        return config.budget(self.visprune_candidates(**image))


class PrunedDummyInputsMixin:
    """A text token in the profiling prompt, which text-conditioned methods need."""

    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        text = super().get_dummy_text(mm_counts)
        config = self.info.visprune_settings()
        return text + " a" if config is not None and config.needs_text else text


class PrunedProcessorMixin:
    """Announces the pruned count (:meth:`Settings.budget`) of placeholders for every image,
    precomputed embeddings included,
    and, for text-conditioned methods, puts the prompt's text token ids (every token but the
    image placeholders) in the multimodal kwargs of each image and in its hash, so that vLLM's
    caches key on (image, prompt)."""

    def _visprune_image_token_ids(self) -> set:
        """The placeholder ids that are not text."""
        config = self.info.get_hf_config()
        return {getattr(config, "image_token_index", getattr(config, "image_token_id", None))}

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs):
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        if TEXT_FIELD in hf_inputs:
            fields[TEXT_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        config = self.info.visprune_settings()
        if config is None:
            return updates

        def capped(replacement):
            def get(item_idx):
                tokens = replacement(item_idx) if callable(replacement) else replacement
                return tokens[:config.budget(len(tokens))]
            return get

        return [PromptReplacement(modality=u.modality, target=u.target,
                                  replacement=capped(u.replacement))
                if u.modality == "image" else u for u in updates]

    def _visprune_text_ids(self, prompt) -> list:
        image = self._visprune_image_token_ids()
        return [t for t in prompt if t not in image]

    def _get_mm_hashes(self, inputs):
        hashes = super()._get_mm_hashes(inputs)
        config = self.info.visprune_settings()
        if config is None or not config.needs_text:
            return hashes
        return text_hashes(hashes, self._visprune_text_ids(inputs.prompt))

    def apply(self, inputs, timing_ctx):
        """Refuses, before any work, a request the method cannot prune (precomputed embeddings
        for a method that reads the vision tower's attention, a prompt without text for a
        text-conditioned one); else vLLM's own, with the prompt's text for text-conditioned
        methods."""
        config = self.info.visprune_settings()
        if config is None:
            return super().apply(inputs, timing_ctx)
        images = inputs.mm_data_items.get("image")
        # Pixels are ImageProcessorItems; LLaVA's and Qwen's precomputed embeddings are
        # two other classes.
        if config.needs_cls and images is not None \
                and not isinstance(images, ImageProcessorItems):
            raise ValueError(
                f"visprune: {config.method} needs the vision tower's attention, which "
                f"precomputed image_embeds do not carry; send the image itself, or serve a "
                f"method that prunes embeddings ({', '.join(EMBEDDING_METHODS)})")
        if not config.needs_text:
            return super().apply(inputs, timing_ctx)
        text = self._visprune_text_ids(inputs.prompt)
        if not text and inputs.mm_data_items.get_all_counts().get("image"):
            raise ValueError(f"visprune: {config.method} needs text tokens in a prompt with "
                             "images; this prompt has none besides the image placeholders")
        # The HF processor runs on the images only (vLLM tokenizes the prompt apart): it gets
        # the text through this attribute, read by _apply_hf_processor_main for the same request.
        self._visprune_text = text
        try:
            return super().apply(inputs, timing_ctx)
        finally:
            self._visprune_text = None

    def _apply_hf_processor_main(self, mm_items, hf_kwargs):
        out = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        text = getattr(self, "_visprune_text", None)
        images = mm_items.get_all_counts().get("image", 0)
        if text is not None and images:     # pixels and precomputed embeddings alike
            out[TEXT_FIELD] = [torch.tensor(text, dtype=torch.long) for _ in range(images)]
        return out
