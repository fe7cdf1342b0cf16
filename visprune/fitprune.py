"""FitPrune recipes: the shipped ones, loading and saving, the FLOPs model, and the calibration.

A recipe ``{layer: tokens deleted}`` says how many visual tokens of every image FitPrune deletes
after each decoder layer (``visprune.enable(model, "fitprune", recipe=...)``).  The original
(github ywh187/FitPrune) fits one to a FLOPs budget on a few samples (``statistical_analysis.py``:
reference statistics of the unpruned model, then per-layer fitting with the pruning carried
forward, binary search on ``alpha``); :func:`calibrate` runs that procedure on any LLaVA model
through visprune's in-LLM engine, with the model's layer sizes.  Command line::

    python -m visprune.fitprune calibrate --model llava-hf/llava-1.5-7b-hf \\
        --questions questions.jsonl --image-folder images/ --reduction 0.6 --out r60.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Dict, Iterable, List, Mapping, Optional, Union

import torch

__all__ = ["RECIPES", "load_recipe", "save_recipe", "layer_flops", "flops_ratio", "calibrate"]

# The original's recipes for LLaVA-1.5-7B (32 layers, 576 tokens per image), by FLOPs reduction
# in percent (LLaVA_1.5/llava/model/language_model/modeling_llama.py).
RECIPES: Dict[int, List[int]] = {
    0: [0] * 32,
    10: [0, 0, 1, 2, 1, 0, 1, 4, 5, 5, 11, 4, 2, 2, 0, 0, 1, 1, 2, 4, 2, 10, 1, 1, 1, 2, 1, 1, 0,
         1, 0, 0],
    20: [0, 0, 3, 3, 1, 1, 4, 16, 14, 15, 24, 4, 2, 3, 2, 0, 6, 0, 5, 13, 4, 19, 2, 1, 1, 1, 1, 1,
         2, 1, 0, 0],
    30: [0, 0, 7, 6, 4, 5, 16, 40, 24, 21, 24, 4, 2, 3, 4, 0, 16, 0, 11, 26, 6, 32, 3, 1, 0, 1, 2,
         2, 4, 0, 0, 0],
    40: [0, 1, 21, 13, 14, 11, 41, 53, 29, 15, 14, 5, 1, 4, 5, 1, 26, 1, 13, 28, 6, 27, 2, 1, 0, 0,
         1, 1, 2, 0, 0, 0],
    50: [3, 7, 49, 24, 29, 17, 59, 41, 26, 8, 10, 6, 2, 5, 7, 2, 30, 3, 13, 27, 5, 23, 2, 1, 0, 0,
         1, 1, 2, 0, 0, 0],
    55: [6, 17, 69, 31, 34, 19, 59, 30, 23, 6, 8, 7, 2, 5, 8, 2, 29, 4, 12, 25, 4, 19, 2, 1, 0, 0,
         1, 0, 1, 0, 0, 0],
    60: [14, 33, 89, 36, 36, 20, 55, 21, 18, 4, 7, 5, 2, 5, 7, 4, 26, 5, 11, 24, 4, 18, 2, 1, 0, 0,
         1, 0, 1, 0, 0, 0],
    70: [48, 79, 118, 41, 33, 17, 36, 9, 9, 2, 3, 2, 1, 3, 4, 8, 18, 7, 8, 20, 4, 13, 2, 1, 0, 0,
         1, 0, 1, 0, 0, 0],
    80: [128, 127, 118, 35, 26, 8, 13, 3, 2, 1, 0, 0, 0, 2, 1, 8, 7, 8, 5, 11, 2, 6, 1, 1, 0, 0, 0,
         1, 0, 0, 0, 0],
    90: [262, 153, 80, 19, 13, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 1, 2, 0, 1, 0, 0, 0, 0, 0, 1,
         0, 0, 0, 0],
}

Recipe = Union[Mapping, str, int, os.PathLike]


# --------------------------------------------------------------------------- recipes
def load_recipe(recipe: Recipe, num_layers: int) -> Dict[int, int]:
    """``{layer: tokens deleted}`` for every layer ``0..num_layers-1`` from ``recipe``: a mapping
    (missing layers delete nothing), a shipped LLaVA-1.5-7B recipe by reduction (``60``,
    ``"r60"``, ``"60"``), or the path of a JSON file :func:`save_recipe` wrote.  Raises naming
    the problem for layers the model does not have or counts that are not ints >= 0."""
    source = recipe
    if isinstance(recipe, bool):
        raise TypeError(f"recipe must be a {{layer: tokens}} dict, a reduction, a name or a "
                        f"JSON path, got {recipe!r}")
    if isinstance(recipe, int) or isinstance(recipe, str) and re.fullmatch(r"r?\d+", recipe):
        reduction = int(str(recipe).lstrip("r"))
        if reduction not in RECIPES:
            raise ValueError(f"no shipped FitPrune recipe for reduction {reduction}; shipped: "
                             f"{sorted(RECIPES)} (LLaVA-1.5-7B)")
        recipe = dict(enumerate(RECIPES[reduction]))
    elif isinstance(recipe, (str, os.PathLike)):
        if not os.path.isfile(recipe):
            raise ValueError(f"recipe {str(recipe)!r} is neither a shipped recipe name (e.g. "
                             f"'r60') nor an existing JSON file")
        with open(recipe) as f:
            data = json.load(f)
        recipe = data.get("recipe", data) if isinstance(data, dict) else data
    if not isinstance(recipe, Mapping):
        raise TypeError(f"recipe must be a {{layer: tokens}} dict, a reduction, a name or a JSON "
                        f"path, got {type(recipe).__name__}")
    out = {l: 0 for l in range(num_layers)}
    for key, value in recipe.items():
        try:
            layer = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"recipe keys must be layer indices, got {key!r}") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"recipe[{layer}] must be an int >= 0 (tokens deleted), "
                             f"got {value!r}")
        if not 0 <= layer < num_layers:
            if value:
                raise ValueError(f"recipe {source if not isinstance(source, Mapping) else ''}"
                                 f"deletes {value} tokens after layer {layer}, but the model "
                                 f"has {num_layers} decoder layers (0..{num_layers - 1})")
            continue
        out[layer] = value
    return out


def save_recipe(recipe: Mapping[int, int], path: Union[str, os.PathLike], **info) -> None:
    """Writes ``recipe`` as JSON (``{"recipe": {"0": n0, ...}, **info}``), loadable by
    :func:`load_recipe` and ``enable(model, "fitprune", recipe=path)``."""
    with open(path, "w") as f:
        json.dump({"method": "fitprune", **info,
                   "recipe": {str(l): int(d) for l, d in sorted(recipe.items())}}, f, indent=1)


# --------------------------------------------------------------------------- FLOPs
def layer_flops(n_in, n_out, d: int, d_ff: int):
    """The original's FLOPs of one decoder layer for the visual tokens: q/k/v projections and
    attention for the ``n_in`` tokens it receives (``3 n d² + 2 n² d``), output projection and
    FFN for the ``n_out`` it keeps (``n d² + 3 n d d_ff``)."""
    return 3 * n_in * d * d + 2 * n_in * n_in * d + n_out * d * d + 3 * n_out * d * d_ff


def flops_ratio(recipe: Recipe, n_tokens: int = 576, hidden: int = 4096,
                intermediate: int = 11008, layers: int = 32) -> float:
    """Visual-token FLOPs under ``recipe`` over the unpruned ones (LLaMA-7B sizes by default)."""
    recipe = load_recipe(recipe, layers)
    n, used = n_tokens, 0
    for l in range(layers):
        kept = max(n - recipe[l], 0)
        used += layer_flops(n, kept, hidden, intermediate)
        n = kept
    return used / (layer_flops(n_tokens, n_tokens, hidden, intermediate) * layers)


def _rest_flops(n, layer: int, layers: int, d: int, d_ff: int):
    """The original's forecast (``rest_flops``): this layer's output projection and FFN, and
    every later layer at ``n`` tokens."""
    return n * d * d + 3 * d_ff * d * n + layer_flops(n, n, d, d_ff) * (layers - 1 - layer)


def _stop_layer(n_in: List[List[int]], deleted: List[List[int]], origin: float,
                reduction: float, d: int, d_ff: int) -> Optional[int]:
    """The layer before which the original's layer-major ``fit_model`` stops (the budget is met
    by what was spent plus the forecast at the current counts), or None.  ``n_in[s][l]``: sample
    ``s``'s tokens entering layer ``l``; ``deleted[s][l]``: how many it deletes there."""
    S, layers = len(n_in), len(n_in[0])
    used = 0
    for l in range(layers):
        forecast = 0
        for s in range(S):
            n = n_in[s][l]
            used += 3 * n * d * d + 2 * n * n * d
            forecast += _rest_flops(n, l, layers, d, d_ff)
        if (used + forecast) / S <= origin * (1 - reduction):
            return l
        for s in range(S):
            n = n_in[s][l] - deleted[s][l]
            used += n * d * d + 3 * d_ff * d * n
    return None


# --------------------------------------------------------------------------- calibration
def _deletable(values: torch.Tensor, weightsum: float, alpha: float) -> torch.Tensor:
    """Indices of the most low-valued tokens whose removal keeps the remaining sum above
    ``(1 - alpha)·weightsum``: the original's ``del_num = max(i - 1, 0)`` at the first ``i``
    where the sum left after removing the ``i`` lowest falls below it; ``n - 1`` when it never
    does (the original leaves ``del_num`` from an earlier sample there)."""
    order = torch.sort(values, stable=True).indices
    removed = torch.cat([values.new_zeros(1), values[order].cumsum(0)[:-1]])
    below = ((values.sum() - removed) < (weightsum - weightsum * alpha)).nonzero()
    count = max(int(below[0, 0]) - 1, 0) if len(below) else len(values) - 1
    return order[:count]


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
        from .integrations.transformers.inllm import fitprune_scores

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

    from .integrations.transformers.inllm import InLLMHandle

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
    parser = argparse.ArgumentParser(prog="python -m visprune.fitprune",
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
