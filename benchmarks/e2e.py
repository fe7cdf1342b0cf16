"""End-to-end benchmark: a LLaVA-1.5 or Qwen2.5-VL model with visprune.enable, unpruned vs pruned.

    python benchmarks/e2e.py          # GPU if present (LLaVA-1.5-7B shapes, fp16), else tiny on CPU
    python benchmarks/e2e.py --model qwen2_5_vl --visual video --keeps 0.25 0.11
    python benchmarks/e2e.py --device cpu --json e2e.json
    python benchmarks/e2e.py --batch 8 --new-tokens 64 --methods trimtokenator holov
    python benchmarks/e2e.py --methods fastv fitprune       # the in-LLM methods
    python benchmarks/e2e.py --methods trimtokenator --keeps 64 --dtype bfloat16 --gen-reps 0

On a GPU the model has LLaVA-1.5-7B's real architecture and sizes (CLIP ViT-L/14-336, 576 visual
tokens per image, Vicuna-7B: 32 layers of width 4096) with random fp16 weights: the timings are
those of the real model, the generated text is meaningless.  On a CPU the same script runs a tiny
model with the same 576 visual tokens per image (2-layer vision tower, 4-layer width-256 LLM), whose
prefill is so cheap that pruning is a large share of it: those figures test the script, they do
not predict the GPU's.  ``--dtype`` sets the weights' and inputs' dtype (default fp16 on a GPU,
fp32 on a CPU); the random weights are made on the device itself (no CPU copy, no loading).

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

``--gen-reps 0`` skips ``generate``.  ``--json`` is rewritten after every row.

``--model qwen2_5_vl``: Qwen2.5-VL-7B's architecture (32-block windowed ViT with a 2×2 merger,
28-layer width-3584 LLM with GQA and 3-D M-RoPE) on a GPU, a tiny one on a CPU; ``--visual
image`` is one 504×504 image (36×36 patches, 324 merged tokens), ``--visual video`` a 16-frame
336×476 clip (8×24×34 patches, 1,632 merged tokens).  ``--keeps`` are then fractions of each
image's / clip's tokens, or counts where above 1 (kept tokens keep their original M-RoPE
positions).
"""
from __future__ import annotations

import argparse
import json
import os
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
QWEN_IMAGE, QWEN_VIDEO, QWEN_START = 151655, 151656, 151652
QWEN_GRIDS = {"image": [1, 36, 36], "video": [8, 24, 34]}
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


def build_model(device: torch.device, tiny: bool, dtype=None):
    """LLaVA-1.5-7B's architecture with random weights, or the tiny CPU model."""
    if tiny:
        vision = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4,
                                               image_size=336, patch_size=14)
        text = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=4,
                                        vocab_size=32064, max_position_embeddings=4096)
    else:
        vision = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                               num_hidden_layers=24, num_attention_heads=16,
                                               image_size=336, patch_size=14, projection_dim=768,
                                               hidden_act="quick_gelu")
        text = transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008,
                                        num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=32, vocab_size=32064,
                                        max_position_embeddings=4096, rms_norm_eps=1e-5)
    dtype = dtype or (torch.float32 if tiny else torch.float16)
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


def build_qwen(device: torch.device, tiny: bool, dtype=None):
    """Qwen2.5-VL-7B's architecture with random weights, or a tiny CPU model."""
    if tiny:
        vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4,
                      out_hidden_size=256, fullatt_block_indexes=[1])
        text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
    else:
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                      out_hidden_size=3584, fullatt_block_indexes=[7, 15, 23, 31])
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                    num_attention_heads=28, num_key_value_heads=4)
    dtype = dtype or (torch.float32 if tiny else torch.float16)
    vision.update(patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                  tokens_per_second=2)
    text.update(vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24],
                                 "rope_theta": 1e6} if not tiny else
                {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e6})
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text,
                                           image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO,
                                           vision_start_token_id=QWEN_START)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    return model.to(dtype).eval(), dtype


def build_qwen_inputs(model, batch: int, dtype, device, visual: str):
    g = torch.Generator().manual_seed(0)
    t, h, w = QWEN_GRIDS[visual]
    n = t * h * w // 4
    token = QWEN_IMAGE if visual == "image" else QWEN_VIDEO
    before = TEXT_TOKENS // 8
    text = torch.randint(1, 32000, (batch, TEXT_TOKENS), generator=g)
    ids = torch.cat([text[:, :before], torch.full((batch, 1), QWEN_START),
                     torch.full((batch, n), token), text[:, before:]], 1)
    pixels = torch.randn(batch * t * h * w, 3 * 2 * 14 * 14, generator=g).to(device, dtype)
    grid = torch.tensor([[t, h, w]] * batch, device=device)
    out = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
           "mm_token_type_ids": (ids == token).int().mul(1 if visual == "image" else 2).to(device)}
    if visual == "image":
        out.update(pixel_values=pixels, image_grid_thw=grid)
    else:
        out.update(pixel_values_videos=pixels, video_grid_thw=grid,
                   second_per_grid_ts=torch.ones(batch, device=device))
    return out


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


# Where each handle does its pruning: the in-LLM rule's drop, Qwen's selection, LLaVA's pruning of
# the encoded images (all images of the call).
PRUNE_STEPS = (("rule", "drop"), (None, "_select"), (None, "_prune_images"))


def prune_step(handle):
    """``(object, method name)`` of the handle's pruning step."""
    for owner_name, attr in PRUNE_STEPS:
        owner = getattr(handle, owner_name, None) if owner_name else handle
        if owner is not None and hasattr(owner, attr):
            return owner, attr
    raise RuntimeError(f"{type(handle).__name__} has none of the pruning steps of PRUNE_STEPS "
                       f"in {__file__}")


def prune_time(handle, prefill, device, reps: int) -> float:
    """Median seconds per prefill spent in the pruning method itself."""
    owner, attr = prune_step(handle)
    call = getattr(owner, attr)
    spent, calls = [], []

    def timed_call(*args, **kwargs):
        _sync(device)
        t0 = time.perf_counter()
        out = call(*args, **kwargs)
        _sync(device)
        spent[-1] += time.perf_counter() - t0
        calls.append(attr)
        return out

    setattr(owner, attr, timed_call)
    try:
        for _ in range(reps):
            spent.append(0.0)
            prefill()
    finally:
        delattr(owner, attr)
    if not calls:   # a renamed step would read as free pruning: refuse instead
        raise RuntimeError(f"the prefill never called {type(owner).__name__}.{attr}: "
                           f"update PRUNE_STEPS in {__file__}")
    return statistics.median(spent)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available (7B shapes), else cpu (tiny model)")
    p.add_argument("--tiny", action="store_true", help="the tiny model on a GPU too")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--model", choices=("llava", "qwen2_5_vl"), default="llava")
    p.add_argument("--visual", choices=("image", "video"), default="image",
                   help="Qwen2.5-VL: one image or one video per prompt")
    p.add_argument("--keeps", type=float, nargs="+", default=None,
                   help="tokens kept per image (LLaVA, default 64 128 192) or fractions of "
                        "each image's / clip's tokens (Qwen, default 0.25 0.11)")
    p.add_argument("--methods", nargs="+", default=None,
                   help="default LLaVA: trimtokenator divprune holov prumerge prumerge+ fastv "
                        "fitprune dart; Qwen: trimtokenator divprune holov vispruner cdpruner "
                        "fastv dart")
    p.add_argument("--fastv-layer", type=int, default=2, help="FastV's and DART's layer")
    p.add_argument("--reps", type=int, default=10, help="prefill repetitions")
    p.add_argument("--gen-reps", type=int, default=3, help="generate repetitions (0: no generate)")
    p.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default=None,
                   help="weights and inputs (default: float16 on a GPU, float32 on a CPU)")
    p.add_argument("--json", help="write one JSON object per row to this file")
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny or device.type == "cpu"
    torch.manual_seed(0)
    qwen = args.model == "qwen2_5_vl"
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if qwen:
        args.keeps = [int(k) if k > 1 else k for k in args.keeps or [0.25, 0.11]]
        args.methods = args.methods or ["trimtokenator", "divprune", "holov", "vispruner",
                                        "cdpruner", "fastv", "dart"]
        model, dtype = build_qwen(device, tiny, dtype)
        inputs = build_qwen_inputs(model, args.batch, dtype, device, args.visual)
        token = QWEN_IMAGE if args.visual == "image" else QWEN_VIDEO
        t, h, w = QWEN_GRIDS[args.visual]
        shape = (f"{'tiny Qwen2.5-VL' if tiny else 'Qwen2.5-VL-7B shapes, random weights'}, "
                 f"one {args.visual} ({t * h * w // 4} merged tokens)")
    else:
        args.keeps = [int(k) for k in (args.keeps or [64, 128, 192])]
        args.methods = args.methods or ["trimtokenator", "divprune", "holov", "prumerge",
                                        "prumerge+", "fastv", "fitprune", "dart"]
        model, dtype = build_model(device, tiny, dtype)
        inputs = build_inputs(model, args.batch, dtype, device)
        token = IMAGE_TOKEN
        shape = ("tiny LLaVA-1.5 (576 visual tokens)" if tiny
                 else "LLaVA-1.5-7B shapes, random weights")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
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
            t_gen = timed(generate, device, args.gen_reps) if args.gen_reps else None
            if handle is None:
                kept, t_prune = inputs["input_ids"].eq(token).sum().item() / args.batch, 0.0
            elif method in INLLM:
                prefill()
                positions = handle.positions
                image = inputs["input_ids"].eq(token).gather(1, positions.clamp(min=0))
                kept = (image & (positions >= 0)).sum().item() / args.batch
                t_prune = prune_time(handle, prefill, device, args.reps)
            elif qwen:
                prefill()
                kept = sum(len(k) for k in handle.kept) / len(handle.kept)
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
               "speedup": base / t_prefill, "generate_ms": t_gen and 1e3 * t_gen,
               "tokens_per_s": t_gen and args.batch * args.new_tokens / t_gen,
               "prune_ms": 1e3 * t_prune,
               "prune_share": t_prune / t_prefill, "batch": args.batch, "device": name,
               "dtype": str(dtype), "model": shape}
        rows.append(row)
        gen = (f"{row['generate_ms']:>13.1f}{row['tokens_per_s']:>9.1f}" if t_gen
               else f"{'-':>13}{'-':>9}")
        print(f"{label:<14}{'-' if keep is None else keep:>6}{kept:>7.1f}{row['prefill_ms']:>12.2f}"
              f"{row['speedup']:>9.2f}x{gen}"
              f"{row['prune_ms']:>10.3f}{100 * row['prune_share']:>8.2f}%", flush=True)
        if args.json:           # after every row: a run stopped from outside keeps its rows
            with open(args.json + ".tmp", "w") as f:
                json.dump(rows, f, indent=1)
            os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
