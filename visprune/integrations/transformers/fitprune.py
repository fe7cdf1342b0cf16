"""FitPrune's calibration on transformers models, through the in-LLM engine it drives.

The original (github ywh187/FitPrune, ``statistical_analysis.py``) fits a recipe ``{layer: tokens
deleted}`` to a FLOPs budget on a few samples: reference statistics of the unpruned model, then
per-layer fitting with the pruning carried forward, binary search on ``alpha``.  :func:`calibrate`
runs that procedure on any LLaVA model through :mod:`.inllm`'s engine, with the model's layer
sizes; the recipes, their files and the FLOPs model are :mod:`visprune.fitprune`'s (no model
needed there).  Command line::

    python -m visprune.integrations.transformers.fitprune calibrate \\
        --model llava-hf/llava-1.5-7b-hf --questions questions.jsonl --image-folder images/ \\
        --reduction 0.6 --out r60.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from ...fitprune import _deletable, _stop_layer, flops_ratio, layer_flops, save_recipe
from .inllm import InLLMHandle, fitprune_scores

__all__ = ["calibrate"]


class _Calibration:
    """The engine rule of the calibration: scores every layer; in the reference pass records
    the weight sums, in a fitting pass deletes the original's intersection set."""

    name = "fitprune"

    def __init__(self, num_layers: int):
        self.layers = set(range(num_layers))
        self.alpha: Optional[float] = None         # None: the reference pass
        self.sample = 0
        self.weightsums: Dict[int, Dict[int, tuple]] = {}
        self.n_images: Dict[int, int] = {}
        self.n_in: Dict[int, List[int]] = {}
        self.deleted: Dict[int, List[int]] = {}

    def check(self, counts):
        if len(counts) != 1:
            raise ValueError(f"FitPrune calibration takes samples with one image each, got a "
                             f"sample with {len(counts)} images")

    def drop(self, s) -> torch.Tensor:
        if s.valid.shape[0] != 1:
            raise ValueError("FitPrune calibration runs one sample per call (batch 1)")
        cross, self_, rows_after = fitprune_scores(s)
        tokens = (s.image[0] >= 0).nonzero()[:, 0]
        after = float(rows_after[0, tokens[0]])
        if after == 0:
            raise ValueError(f"sample {self.sample} has no text after its image: FitPrune's "
                             f"cross-attention statistics need some")
        cross = cross[0, tokens].double() / after
        self_ = self_[0, tokens].double()
        drop = torch.zeros_like(s.valid)
        if self.alpha is None:
            self.n_images.setdefault(self.sample, len(tokens))
            self.weightsums.setdefault(self.sample, {})[s.layer] = (float(cross.sum()),
                                                                    float(self_.sum()))
            return drop
        ws_cross, ws_self = self.weightsums[self.sample][s.layer]
        by_cross = _deletable(cross, ws_cross, self.alpha)
        by_self = _deletable(self_, ws_self, self.alpha)
        both = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        both[by_cross] = True
        chosen = torch.zeros_like(both)
        chosen[by_self] = True
        both &= chosen
        self.n_in.setdefault(self.sample, []).append(len(tokens))
        self.deleted.setdefault(self.sample, []).append(int(both.sum()))
        drop[0, tokens[both]] = True
        return drop


def calibrate(model, samples: Iterable[Mapping], reduction: float, *, tol: float = 0.01,
              progress: bool = True, backend: Optional[str] = None,
              info: Optional[dict] = None) -> Dict[int, int]:
    """FitPrune's calibration (the original's ``fit_model`` + binary search) on ``samples``.

    Args:
        model: a LLaVA / LLaVA-NeXT model (``sdpa`` or ``eager`` attention).
        samples: model inputs of one image + prompt each (batch 1: ``input_ids``,
            ``attention_mask``, ``pixel_values``, ``image_sizes`` for LLaVA-NeXT), e.g. a
            processor's output; the prompt needs text after the image.
        reduction: the FLOPs reduction to reach, in (0, 1): 0.6 keeps 40 % of the visual-token
            FLOPs of the unpruned model.
        tol: the binary search on ``alpha`` stops when its interval is at most ``tol``.
        progress: show a progress bar (tqdm).
        info: if a dict, receives ``alpha`` and ``ratio`` of the returned recipe.

    Returns ``{layer: tokens deleted}`` for every decoder layer: the recipe of the last pass
    that met the budget.  Deviations from the original, which hard-codes LLaVA-1.5-7B: the image
    span is the real placeholder run; the FLOPs use the model's hidden size, FFN size and layer
    count, and the mean over the samples of their unpruned FLOPs; when removing all but one
    token still keeps enough weight, ``n - 1`` tokens are deletable (the original reuses an
    earlier sample's count); the last *feasible* pass's recipe is returned (the original prints
    the last pass's); no feasible pass raises ``ValueError``.
    """
    from tqdm.auto import tqdm

    samples = list(samples)
    if not samples:
        raise ValueError("calibrate needs at least one sample")
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) \
            or not 0 < reduction < 1:
        raise ValueError(f"reduction must be a float in (0, 1), got {reduction!r}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or sample.get("input_ids") is None \
                or sample.get("pixel_values") is None:
            raise ValueError(f"samples[{i}] must be a dict of model inputs with input_ids and "
                             f"pixel_values")
        if sample["input_ids"].shape[0] != 1:
            raise ValueError(f"samples[{i}] must hold one prompt (batch 1), got "
                             f"{sample['input_ids'].shape[0]}")
    text = model.config.text_config
    d, d_ff, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    rule = _Calibration(layers)
    handle = InLLMHandle(model, "fitprune", None, {"recipe": {}, "backend": backend})
    handle.rule = rule
    steps = 1 + max(1, math.ceil(math.log2(1.0 / tol)))      # the reference pass + the search
    bar = tqdm(total=steps * len(samples), disable=not progress, desc="FitPrune calibration")

    def run_all():
        rule.n_in.clear()
        rule.deleted.clear()
        device = model.device
        for rule.sample, sample in enumerate(samples):
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in sample.items()}
            with torch.no_grad():
                model(**inputs, use_cache=False)
            bar.update(1)

    try:
        run_all()                                   # the reference statistics (no pruning)
        n_images = [rule.n_images[s] for s in range(len(samples))]
        origin = sum(layer_flops(n, n, d, d_ff) * layers for n in n_images) / len(samples)
        lo, hi, best = 0.0, 1.0, None
        while hi - lo > tol + 1e-6:
            rule.alpha = (lo + hi) / 2
            run_all()
            n_in = [rule.n_in[s] for s in range(len(samples))]
            deleted = [rule.deleted[s] for s in range(len(samples))]
            stop = _stop_layer(n_in, deleted, origin, reduction, d, d_ff)
            if stop is not None:
                recipe = {l: (sum(deleted[s][l] for s in range(len(samples))) // len(samples)
                              if l < stop else 0) for l in range(layers)}
                best, hi = (recipe, rule.alpha), rule.alpha
            else:
                lo = rule.alpha
    finally:
        bar.close()
        handle.disable()
    if best is None:
        raise ValueError(f"no alpha in [0, 1] met a FLOPs reduction of {reduction} on these "
                         f"samples (tried down to alpha={lo:.4f})")
    recipe, alpha = best
    if info is not None:
        info.update(alpha=alpha, ratio=sum(flops_ratio(recipe, n, d, d_ff, layers)
                                           for n in n_images) / len(n_images))
    return recipe


# --------------------------------------------------------------------------- command line
def _samples_from_questions(processor, path: str, image_folder: str, limit: Optional[int]):
    """Model inputs from the original's question file (JSON lines with ``image`` and ``text``)."""
    from PIL import Image

    samples = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            q = json.loads(line)
            image = Image.open(os.path.join(image_folder, q["image"])).convert("RGB")
            conversation = [{"role": "user", "content": [{"type": "image"},
                                                         {"type": "text", "text": q["text"]}]}]
            prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
            samples.append(dict(processor(images=image, text=prompt, return_tensors="pt")))
            if limit is not None and len(samples) >= limit:
                break
    return samples


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m visprune.integrations.transformers.fitprune",
                                     description="FitPrune recipes for LLaVA models")
    sub = parser.add_subparsers(dest="command", required=True)
    cal = sub.add_parser("calibrate", help="fit a recipe to a FLOPs reduction on samples")
    cal.add_argument("--model", required=True, help="model id or path (LLaVA / LLaVA-NeXT)")
    cal.add_argument("--questions", help="JSON lines with 'image' (file) and 'text' (prompt)")
    cal.add_argument("--image-folder", default=".", help="where the questions' images are")
    cal.add_argument("--samples", help="a torch.save'd list of model-input dicts (batch 1 each), "
                     "instead of --questions")
    cal.add_argument("--limit", type=int, help="use the first LIMIT questions")
    cal.add_argument("--reduction", type=float, required=True, help="FLOPs reduction, e.g. 0.6")
    cal.add_argument("--tol", type=float, default=0.01)
    cal.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cal.add_argument("--dtype", default="float16" if torch.cuda.is_available() else "float32",
                     choices=["float16", "bfloat16", "float32"])
    cal.add_argument("--out", required=True, help="the recipe's JSON file")
    args = parser.parse_args(argv)
    if (args.questions is None) == (args.samples is None):
        parser.error("give exactly one of --questions and --samples")

    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        args.model, dtype=getattr(torch, args.dtype), attn_implementation="sdpa").to(args.device)
    model.eval()
    if args.samples is not None:
        samples = torch.load(args.samples)[: args.limit]
    else:
        processor = AutoProcessor.from_pretrained(args.model)
        samples = _samples_from_questions(processor, args.questions, args.image_folder,
                                          args.limit)
    info: dict = {}
    recipe = calibrate(model, samples, args.reduction, tol=args.tol, info=info)
    save_recipe(recipe, args.out, model=args.model, reduction=args.reduction,
                samples=len(samples), **info)
    print(f"recipe ({sum(recipe.values())} tokens deleted per image, alpha={info['alpha']:.4f}, "
          f"visual FLOPs ratio {info['ratio']:.3f}) written to {args.out}")


if __name__ == "__main__":
    main()
