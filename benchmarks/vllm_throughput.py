"""vLLM throughput with visprune: offline ``LLM.generate`` on N image prompts, unpruned against
``keep`` 64 / 128 per method.  Run it in the vLLM environment of scripts/vllm_check.sh:

    .vllm_env/bin/python benchmarks/vllm_throughput.py --json out.json --md out.md
    .vllm_env/bin/python benchmarks/vllm_throughput.py --model DIR --size 7b   # a real checkpoint

Without ``--model`` it builds a LLaVA-1.5-shaped random checkpoint (CLIP 336 px / patch 14:
576 visual tokens per image) and saves it to a temporary directory: ``--size tiny`` (narrow
layers, for a CPU) or ``--size 7b`` (LLaVA-1.5-7B's shapes: CLIP ViT-L, a 32-layer 4096-wide
LLaMA; for a GPU).  Every prompt has its own image (no encoder-cache or prefix-cache hit).

Per configuration:
* requests/s: N prompts, ``--max-tokens`` new tokens each (greedy, EOS ignored), one
  ``generate`` call, wall clock;
* prefill tokens/s: the N prompts with 1 new token; prompt tokens (as the LLM sees them, after
  pruning) / wall clock;
* TTFT: one prompt at a time with 1 new token, median over ``--ttft-reps`` prompts.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_checkpoint(size: str, path: str) -> str:
    """A random LLaVA-1.5-shaped checkpoint with a word-level tokenizer in ``path``."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "vllm"))
    import tiny       # the tests' checkpoint writer (weights renamed as vLLM loads them)
    import transformers

    if size == "7b":
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16)
        text = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32)
    else:
        vision = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=2)
        text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(image_size=336, patch_size=14,
                                                    projection_dim=128, **vision),
        text_config=transformers.LlamaConfig(vocab_size=len(tiny.WORDS),
                                             max_position_embeddings=4096, pad_token_id=0,
                                             bos_token_id=1, eos_token_id=2, **text),
        image_token_id=tiny.IMAGE, image_token_index=tiny.IMAGE)
    torch.manual_seed(0)
    with torch.device("meta" if size == "7b" else "cpu"):
        model = transformers.LlavaForConditionalGeneration(config)
    if size == "7b":     # random weights without a 7B fp32 init on the host
        model = model.to_empty(device="cpu").to(torch.float16)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    processor = tiny.processor("llava")
    processor.image_processor.size = {"shortest_edge": 336}
    processor.image_processor.crop_size = {"height": 336, "width": 336}
    processor.patch_size = 14
    model.save_pretrained(path)
    processor.save_pretrained(path)
    tiny.rename_vision_weights(path)
    return path


def prompts(n: int, seed: int, words: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    text = list(rng.integers(5, 120, size=words))
    return [{"prompt_token_ids": [1] + text[:words // 2] + [4] + text[words // 2:],
             "multi_modal_data": {"image": Image.fromarray(
                 rng.integers(0, 256, size=(336, 336, 3), dtype=np.uint8))}}
            for _ in range(n)]


def measure(path: str, config, args) -> dict:
    from vllm import LLM, SamplingParams

    overrides = {"visprune": config} if config else None
    llm = LLM(model=path, enforce_eager=args.eager, max_model_len=2048, dtype=args.dtype,
              seed=0, hf_overrides=overrides, enable_prefix_caching=False,
              mm_processor_cache_gb=0, limit_mm_per_prompt={"image": 1})
    try:
        generate = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
        first = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        llm.generate(prompts(2, 99, args.words), generate, use_tqdm=False)      # warm-up
        batch = prompts(args.prompts, 1, args.words)
        t = time.perf_counter()
        outputs = llm.generate(batch, generate, use_tqdm=False)
        requests_s = len(batch) / (time.perf_counter() - t)
        batch = prompts(args.prompts, 2, args.words)
        t = time.perf_counter()
        outputs = llm.generate(batch, first, use_tqdm=False)
        prefill = time.perf_counter() - t
        prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
        ttft = []
        for request in prompts(args.ttft_reps, 3, args.words):
            t = time.perf_counter()
            llm.generate([request], first, use_tqdm=False)
            ttft.append(time.perf_counter() - t)
    finally:
        del llm
        gc.collect()
    return {"method": config["method"] if config else "unpruned",
            "keep": config["keep"] if config else None,
            "prompt_tokens": prompt_tokens // len(outputs), "requests_s": requests_s,
            "prefill_tokens_s": prompt_tokens / prefill, "ttft_ms": 1e3 * statistics.median(ttft)}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{model}, {os.cpu_count()} cores"


def table(rows, header: str) -> str:
    base = rows[0]
    lines = [header, "",
             "| method | keep | prompt tokens | requests/s | × | prefill tokens/s | TTFT ms | × |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['keep'] or 'all'} | {r['prompt_tokens']} | "
                     f"{r['requests_s']:.2f} | {r['requests_s'] / base['requests_s']:.2f} | "
                     f"{r['prefill_tokens_s']:.0f} | {r['ttft_ms']:.1f} | "
                     f"{base['ttft_ms'] / r['ttft_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a LLaVA-1.5 checkpoint directory (default: build one)")
    parser.add_argument("--size", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--methods", nargs="+", default=["divprune", "trimtokenator", "holov"])
    parser.add_argument("--keeps", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--words", type=int, default=32, help="text tokens per prompt")
    parser.add_argument("--ttft-reps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, float16 on GPU")
    parser.add_argument("--compile", dest="eager", action="store_false",
                        help="let vLLM compile the model (default: eager)")
    parser.add_argument("--json")
    parser.add_argument("--md")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float16" if torch.cuda.is_available() else "float32")

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(tmp, "cache"))
        path = args.model or build_checkpoint(args.size, os.path.join(tmp, "model"))
        configs = [None] + [{"method": m, "keep": k} for m in args.methods for k in args.keeps]
        rows = []
        for config in configs:
            rows.append(measure(path, config, args))
            print(json.dumps(rows[-1]), flush=True)
    header = (f"vLLM offline, {args.prompts} image prompts ({args.words} text tokens + 1 image "
              f"of 576 tokens), {args.max_tokens} new tokens; model: "
              f"{args.model or 'random LLaVA-1.5-shaped (' + args.size + ')'}, {args.dtype}, "
              f"{'eager' if args.eager else 'compiled'}; device: {device_name()}; "
              f"× = against unpruned")
    text = table(rows, header)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
