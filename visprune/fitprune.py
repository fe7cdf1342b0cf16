"""FitPrune recipes: the shipped ones, loading and saving, and the FLOPs model.

A recipe ``{layer: tokens deleted}`` says how many visual tokens of every image FitPrune deletes
after each decoder layer (``visprune.enable(model, "fitprune", recipe=...)``).  The original
(github ywh187/FitPrune) fits one to a FLOPs budget on a few samples (``statistical_analysis.py``);
that calibration drives the in-LLM engine and lives with it:
:func:`visprune.integrations.transformers.fitprune.calibrate`.  This module needs no model and
imports nothing of the integrations.
"""
from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Mapping, Optional, Union

import torch

from . import checks

__all__ = ["RECIPES", "load_recipe", "save_recipe", "layer_flops", "flops_ratio"]

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
    ``"r60"``, ``"60"``), or the path of a JSON file :func:`save_recipe` wrote.  Keys and counts
    follow the ops' rule for counts (Python ints, NumPy integers, 0-d integer tensors; keys also
    decimal strings, as JSON writes them).  Raises naming the problem for keys that are not
    layer indices (``1.7``), a layer given twice (``{"1": 2, 1: 3}``), layers the model does not
    have, or counts that are not ints >= 0."""
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
    given: Dict[int, object] = {}
    for key, value in recipe.items():
        layer = _layer_key(key)
        if layer in given:
            raise ValueError(f"recipe gives layer {layer} twice ({given[layer]!r} and {key!r})")
        given[layer] = key
        try:
            value = checks.count(f"recipe[{layer}]", value)
        except (TypeError, ValueError):
            raise ValueError(f"recipe[{layer}] must be an int >= 0 (tokens deleted), "
                             f"got {value!r}") from None
        if not 0 <= layer < num_layers:
            if value:
                raise ValueError(f"recipe {source if not isinstance(source, Mapping) else ''}"
                                 f"deletes {value} tokens after layer {layer}, but the model "
                                 f"has {num_layers} decoder layers (0..{num_layers - 1})")
            continue
        out[layer] = value
    return out


def _layer_key(key) -> int:
    """A recipe key as a layer index: an int as the counts are (Python, NumPy, 0-d tensor), or
    the decimal string of one (JSON keys are strings)."""
    if isinstance(key, str) and re.fullmatch(r"\s*[+-]?\d+\s*", key):
        return int(key)
    try:
        return checks.integer("layer", key)
    except TypeError:
        raise ValueError(f"recipe keys must be layer indices (ints), got {key!r}") from None


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
