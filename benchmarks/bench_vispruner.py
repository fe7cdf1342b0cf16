"""VisPruner: visprune's ``vispruner`` against the original's own code path, side by side.

    python benchmarks/bench_vispruner.py [--device cpu|cuda] [--reps 20]

LLaVA-1.5 shapes: N = 576 patches, D = 1024 (CLIP-L, the features the original compares), budget
64 = 32 important + 32 diverse (the original's default ratio 0.5); B ∈ {1, 8}.  fp32 on CPU, fp16
on CUDA (the original runs in the model's dtype).  ``original`` below is the tensor code of
``LlavaMetaForCausalLM.encode_images`` (Theia-4869/VisPruner ``llava/model/llava_arch.py``) from
the head-averaged CLS attention on, transliterated statement by statement, plus the boolean-mask
gather that ``prepare_inputs_labels_for_multimodal`` applies to the features; it is timed as
written (it takes a batch) and one image at a time (a loop over rows).  Both sides start from the
same tensors: the features ``[B, N, D]`` and the CLS attention ``[B, N]``.

Before timing, the two are checked to keep the same tokens on the same inputs in float64: the
removal ranking compares close max-cosines, so fp32 runs of two implementations that only sum in
a different order (or of the original in fp32 and in fp64) may differ in a few tokens.
"""
import argparse

import torch

from visprune.bench import fmt_time, medians
from visprune.methods.vispruner import vispruner

N, D, KEEP, RATIO = 576, 1024, 64, 0.5
BATCHES = (1, 8)


def original(image_features, image_attentions, visual_token_num, important_ratio):
    """``encode_images`` from ``image_attentions.mean(dim=1)`` on, then the mask gather."""
    B, N, C = image_features.shape
    device = image_features.device
    important_token_num = int(visual_token_num * important_ratio)
    diverse_token_num = visual_token_num - important_token_num
    token_indices = image_attentions.argsort(dim=-1, descending=True)
    important_indices = token_indices[:, :important_token_num]
    residual_indices = token_indices[:, important_token_num:]
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break
        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R),
                                           residual_indices]
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :]
        scores = a @ b.transpose(-1, -2)
        scores = scores.max(dim=-1).values
        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:]
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r),
                                       distinct_indices],
            residual_indices[..., 1::2]
        ], dim=-1)
    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1)
    else:
        selected_indices = important_indices
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, selected_indices, True)
    return image_features[index_masks].view(B, -1, C), index_masks


def original_loop(features, attn, keep, ratio):
    return [original(features[b:b + 1], attn[b:b + 1], keep, ratio)
            for b in range(features.shape[0])]


def inputs(B, seed=0):
    """CLIP-like features (a shared offset: cosines mostly positive) and a peaked attention."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    x += 0.5 * torch.randn(B, 1, D, generator=g, dtype=torch.float64)
    attn = torch.randn(B, N, generator=g, dtype=torch.float64).mul(2.0).softmax(-1)
    return x, attn


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for B in BATCHES:
        x64, a64 = (t.to(device) for t in inputs(B))
        _, mask = original(x64, a64, KEEP, RATIO)
        want = mask.nonzero()[:, 1].view(B, KEEP)
        if not torch.equal(vispruner(x64, a64, KEEP, important_ratio=RATIO).indices, want):
            raise SystemExit(f"B={B}: vispruner and the original disagree in float64")
        x, a = x64.to(dtype), a64.to(dtype)
        rows.append((B, *medians([lambda: vispruner(x, a, KEEP, important_ratio=RATIO),
                                  lambda: original(x, a, KEEP, RATIO),
                                  lambda: original_loop(x, a, KEEP, RATIO)], device, args.reps)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"VisPruner, N={N}, D={D}, keep {KEEP} (ratio {RATIO}); device {name} "
          f"({torch.get_num_threads()} CPU threads), {str(dtype).replace('torch.', '')}, "
          f"torch {torch.__version__}, median of {args.reps}\n")
    print("| B | visprune | original (batched, as written) | speed-up | "
          "original (one image at a time) | speed-up |")
    print("|---|---|---|---|---|---|")
    for B, t_ours, t_batch, t_loop in rows:
        print(f"| {B} | {fmt_time(1e3 * t_ours)} | {fmt_time(1e3 * t_batch)} | {t_batch / t_ours:.2f}× | "
              f"{fmt_time(1e3 * t_loop)} | {t_loop / t_ours:.2f}× |")


if __name__ == "__main__":
    main()
