"""Integrations of the pruning methods into model libraries.

Each submodule imports its library on import; nothing here is imported by ``import visprune``.
``visprune.integrations.transformers``: Hugging Face transformers' LLaVA-1.5 and LLaVA-NeXT
(``visprune.enable``): pre-LLM pruning in ``.llava``, in-LLM pruning (FastV, FitPrune) in
``.inllm``.
"""
