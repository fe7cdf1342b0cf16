"""visprune's vLLM plugin: serve LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL with visual-token pruning
in vLLM.

vLLM loads :func:`register` through the ``vllm.general_plugins`` entry point in every process
it starts.  It replaces the model classes of ``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration`` and ``Qwen2_5_VLForConditionalGeneration`` with
subclasses that prune only when the model's HF config has a ``visprune`` entry, e.g. from
``--hf-overrides``::

    python -m vllm.entrypoints.openai.api_server --model llava-hf/llava-1.5-7b-hf \\
        --hf-overrides '{"visprune": {"method": "divprune", "keep": 64}}'

    LLM(model=..., hf_overrides={"visprune": {"method": "trimtokenator", "keep": 64}})

    LLM(model="Qwen/Qwen2.5-VL-7B-Instruct", hf_overrides={"visprune": {"method": "evs",
                                                                         "keep": 0.25}})

A model without that entry runs exactly as vLLM's own.  Supported: the fixed-budget pre-LLM
methods (LLaVA: :data:`METHODS`, Qwen2.5-VL: :data:`QWEN_METHODS`, where ``keep`` may also be a
float fraction of each image's tokens); adaptive and in-LLM methods, and on Qwen2.5-VL the
merging ones, are refused at start-up (:data:`REFUSED`, :data:`QWEN_REFUSED_ALL`).  On
Qwen2.5-VL the video methods of :data:`VIDEO_METHODS` (``keep``: the fraction of each video's
tokens kept) prune videos and leave images whole.
"""
from __future__ import annotations

# no vLLM import here: the plugin loads cheaply
from ._core import METHODS, QWEN_METHODS, QWEN_REFUSED_ALL, REFUSED, VIDEO_METHODS  # noqa: F401

__all__ = ["register", "METHODS", "REFUSED", "QWEN_METHODS", "QWEN_REFUSED_ALL", "VIDEO_METHODS",
           "ARCHITECTURES"]

# architecture name -> "module:class" (imported lazily by vLLM's registry)
ARCHITECTURES = {
    "LlavaForConditionalGeneration":
        "visprune.integrations.vllm.llava:PrunedLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration":
        "visprune.integrations.vllm.llava:PrunedLlavaNextForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration":
        "visprune.integrations.vllm.qwen:PrunedQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the model classes.  Idempotent (vLLM
    calls it in every process, possibly more than once)."""
    from vllm import ModelRegistry

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
