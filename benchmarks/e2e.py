"""End-to-end benchmark: a LLaVA-1.5 model with visprune.enable, unpruned vs pruned.

    python benchmarks/e2e.py          # GPU if present (LLaVA-1.5-7B shapes, fp16), else tiny on CPU
    python benchmarks/e2e.py --device cpu --json e2e.json
    python benchmarks/e2e.py --batch 8 --new-tokens 64 --methods trimtokenator holov
    python benchmarks/e2e.py --methods fastv fitprune       # the in-LLM methods

On a GPU the model has LLaVA-1.5-7B's real architecture and sizes (CLIP ViT-L/14-336, 576 visual
tokens per image, Vicuna-7B: 32 layers of width 4096) with random fp16 weights: the timings are
those of the real model, the generated text is meaningless.  On a CPU the same script runs a tiny
model with the same 576 visual tokens per image (2-layer vision tower, 4-layer width-256 LLM), whose
prefill is so cheap that pruning is a large share of it: those figures test the script, they do
not predict the GPU's.

Per row: ``prefill`` is one forward over the prompt with the image (vision tower, projector,
pruning, language model; ``logits_to_keep=1``), median of ``--reps``; ``generate`` is
``model.generate`` of ``--new-tokens`` tokens (greedy, KV cache), median of ``--gen-reps``, and
``tok/s`` is batch x new tokens / that time; ``prune`` is the time of the pruning method alone
(the visprune call inside the prefill, timed in separate repetitions with the device synchronised
around it), also as a share of the pruned prefill.  ``kept``: mean visual tokens kept per image.
In-LLM methods: ``fastv`` keeps ``keep`` tokens per image before layer 2 (``--fastv-layer``),
``dart`` (same layer, 4 + 4 pivots) keeps ``4 + 8·int(keep / 8)``;
``fitprune`` runs the original's reduction-60 recipe for LLaVA-1.5-7B (on the tiny model its
per-layer deletions are summed onto the tiny model's layers, layer ``l`` of 32 onto
``l * layers // 32``); their ``kept`` is what the last layer sees and ``prune`` times the scoring
(the ``received_attention`` calls and the selection) without the compaction.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

try:
    import transformers
except ImportError:
    sys.exit("benchmarks/e2e.py needs transformers: pip install 'visprune[transformers]'")

import visprune

IMAGE_TOKEN = 32000
TEXT_TOKENS = 64            # prompt text around the image (the DESIGN's M)
ADAPTIVE = {"prumerge": {}, "prumerge+": {"plus": True}}
INLLM = ("fastv", "fitprune", "dart")


def fitprune_recipe(layers: int) -> dict:
    """The original's reduction-60 recipe (LLaVA-1.5-7B, 32 layers) on ``layers`` layers."""
    from visprune.fitprune import RECIPES

    recipe = {l: 0 for l in range(layers)}
    for l, d in enumerate(RECIPES[60]):
        recipe[l * layers // 32] += d
    return recipe


def build_model(device: torch.device, tiny: bool):
    """LLaVA-1.5-7B's architecture with random weights, or the tiny CPU model."""
    if tiny:
        vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               image_size=336, patch_size=14)
        text = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4,
                                        vocab_size=32064, max_position_embeddings=4096)
        dtype = torch.float32
    else:
        vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                               num_hidden_layers=24, num_attention_heads=16,
                                               image_size=336, patch_size=14, projection_dim=768,
                                               hidden_act="quick_gelu")
        text = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=32, vocab_size=32064,
                                        max_position_embeddings=4096, rms_norm_eps=1e-5)
        dtype = torch.float16
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                                      vision_feature_select_strategy="default",
                                      projector_hidden_act="gelu")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = transformers.LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval(), dtype


def build_inputs(model, batch: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    n = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    before = TEXT_TOKENS // 8
    text = torch.randint(1, 32000, (batch, TEXT_TOKENS), generator=g)
    ids = torch.cat([text[:, :before], torch.full((batch, n), IMAGE_TOKEN), text[:, before:]], 1)
    size = model.config.vision_config.image_size
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "pixel_values": torch.randn(batch, 3, size, size, generator=g).to(device, dtype)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def prune_time(handle, prefill, device, reps: int) -> float:
    """Median seconds per prefill spent in the pruning method itself."""
    spent = []
    owner, attr = (handle.rule, "drop") if hasattr(handle, "rule") else (handle, "_call")
    call = getattr(owner, attr)

    def timed_call(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = call(*args, **kwargs)
        _sync(device)
        spent[-1] += time.perf_counter() - t0
        return out

    setattr(owner, attr, timed_call)
    try:
        for _ in range(reps):
            spent.append(0.0)
            prefill()
    finally:
        delattr(owner, attr)
    return statistics.median(spent)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available (7B shapes), else cpu (tiny model)")
    p.add_argument("--tiny", action="store_true", help="the tiny model on a GPU too")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--keeps", type=int, nargs="+", default=[64, 128, 192])
    p.add_argument("--methods", nargs="+",
                   default=["trimtokenator", "divprune", "holov", "prumerge", "prumerge+",
                            "fastv", "fitprune", "dart"])
    p.add_argument("--fastv-layer", type=int, default=2, help="FastV's and DART's layer")
    p.add_argument("--reps", type=int, default=10, help="prefill repetitions")
    p.add_argument("--gen-reps", type=int, default=3, help="generate repetitions")
    p.add_argument("--json", help="write one JSON object per row to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type == "cpu"
    torch.manual_seed(0)
    model, dtype = build_model(device, tiny)
    inputs = build_inputs(model, args.batch, dtype, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    shape = "tiny LLaVA-1.5 (576 visual tokens)" if tiny else "LLaVA-1.5-7B shapes, random weights"
    print(f"# {shape}, {str(dtype).replace('torch.', '')}, {name}, batch {args.batch}, "
          f"{inputs['input_ids'].shape[1]} prompt tokens, {args.new_tokens} new tokens; "
          f"torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    @torch.no_grad()
    def prefill():
        model(**inputs, use_cache=True, logits_to_keep=1)

    def generate():
        model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                       do_sample=False, pad_token_id=0)

    cases = [("none", None, {})]
    for method in args.methods:
        if method in ADAPTIVE:
            cases.append(("prumerge", None, dict(ADAPTIVE[method], _label=method)))
        elif method == "fitprune":
            layers = model.config.text_config.num_hidden_layers
            cases.append(("fitprune", None, dict(recipe=fitprune_recipe(layers),
                                                 _label="fitprune r60")))
        elif method in ("fastv", "dart"):
            cases += [(method, keep, {"layer": args.fastv_layer}) for keep in args.keeps]
        else:
            cases += [(method, keep, {}) for keep in args.keeps]

    rows, base = [], None
    header = (f"{'method':<14}{'keep':>6}{'kept':>7}{'prefill ms':>12}{'speed-up':>10}"
              f"{'generate ms':>13}{'tok/s':>9}{'prune ms':>10}{'prune %':>9}")
    print(header + "\n" + "-" * len(header), flush=True)
    for method, keep, kwargs in cases:
        label = kwargs.pop("_label", method)
        handle = None if method == "none" else visprune.enable(model, method, keep, **kwargs)
        try:
            t_prefill = timed(prefill, device, args.reps)
            t_gen = timed(generate, device, args.gen_reps)
            if handle is None:
                kept, t_prune = inputs["input_ids"].eq(IMAGE_TOKEN).sum().item() / args.batch, 0.0
            elif method in INLLM:
                prefill()
                positions = handle.positions
                image = inputs["input_ids"].eq(IMAGE_TOKEN).gather(1, positions.clamp(min=0))
                kept = (image & (positions >= 0)).sum().item() / args.batch
                t_prune = prune_time(handle, prefill, device, args.reps)
            else:
                with torch.no_grad():
                    pruned = handle.prune_inputs(**inputs)["mm_encoder_outputs"]["image"]
                kept = sum(len(f) for f in pruned.pooler_output) / len(pruned.pooler_output)
                t_prune = prune_time(handle, prefill, device, args.reps)
        finally:
            if handle is not None:
                handle.disable()
        base = t_prefill if base is None else base
        row = {"method": label, "keep": keep, "kept": kept, "prefill_ms": 1e3 * t_prefill,
               "speedup": base / t_prefill, "generate_ms": 1e3 * t_gen,
               "tokens_per_s": args.batch * args.new_tokens / t_gen, "prune_ms": 1e3 * t_prune,
               "prune_share": t_prune / t_prefill, "batch": args.batch, "device": name,
               "dtype": str(dtype), "model": shape}
        rows.append(row)
        print(f"{label:<14}{'-' if keep is None else keep:>6}{kept:>7.1f}{row['prefill_ms']:>12.2f}"
              f"{row['speedup']:>9.2f}x{row['generate_ms']:>13.1f}{row['tokens_per_s']:>9.1f}"
              f"{row['prune_ms']:>10.3f}{100 * row['prune_share']:>8.2f}%", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
