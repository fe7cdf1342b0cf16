"""CDPruner: visprune's ``cdpruner`` against the original's own code path, side by side.

    python benchmarks/bench_cdpruner.py [--device cpu|cuda] [--reps 20] [--dim 1024]

LLaVA-1.5 shapes: N = 576 patches, D = 1024 features (``--dim 4096`` for the projector width of
a 7B model), CLIP embeddings E = 768 with one text embedding (a prompt under 77 tokens), keep 64;
B ∈ {1, 8}.  fp32 on CPU, fp16 features on CUDA (the original runs the projector in the model's
dtype and the DPP in fp32).  ``original`` below is the tensor code of
``LlavaMetaForCausalLM.encode_images`` (Theia-4869/CDPruner ``llava/model/llava_arch.py``) after
the vision tower and the projector, transliterated statement by statement, plus the
boolean-mask gather that ``prepare_inputs_labels_for_multimodal`` applies to the features; it is
timed as written (it takes a batch and normalises the relevance over it: ``cdpruner`` runs with
``relevance_scope="batch"`` against it) and one image at a time (a loop over rows, against the
default per-image scope).  Both sides start from the same tensors: the projector outputs
``[B, N, D]``, the CLIP patch embeddings ``[B, N, E]`` and the text embeddings ``[M, E]``.

Before timing, both modes are checked to keep the same tokens as the original (run in float64)
on the same inputs.
"""
import argparse

import torch

from visprune.bench import fmt_time, medians
from visprune.methods.cdpruner import cdpruner

N, E, M, KEEP = 576, 768, 1, 64
BATCHES = (1, 8)


def original(image_features, image_embeds, text_embeds, visual_token_num):
    """``encode_images`` after the projector (DPP in fp32, as there), then the mask gather."""
    B, N, C = image_features.shape
    device = image_features.device
    work = torch.float64 if image_features.dtype == torch.float64 else torch.float32

    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True)
    image_normalized = image_normalized.to(work)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2))

    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = torch.matmul(image_embeds, text_embeds.t())
    relevance = (-relevance).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())

    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1)

    cis = torch.zeros((visual_token_num, B, N), device=device, dtype=work)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone()
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j
        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')

    select_idx = torch.sort(select_idx.t()).values
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, select_idx, True)
    return image_features[index_masks].view(B, -1, C), index_masks


def original_loop(features, image_embeds, text_embeds, keep):
    return [original(features[b:b + 1], image_embeds[b:b + 1], text_embeds, keep)
            for b in range(features.shape[0])]


def inputs(B, D, seed=0):
    """Projector-like features (a shared offset: cosines mostly positive), CLIP-like embeddings."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    x += 0.5 * torch.randn(B, 1, D, generator=g, dtype=torch.float64)
    img = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    img += 0.5 * torch.randn(1, 1, E, generator=g, dtype=torch.float64)
    txt = torch.randn(M, E, generator=g, dtype=torch.float64)
    return x, img, txt


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=1024, help="feature width D")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    D = args.dim
    rows = []
    for B in BATCHES:
        x64, img64, txt64 = (t.to(device) for t in inputs(B, D))
        x, img, txt = x64.to(dtype), img64.float(), txt64.float()
        _, want = original(x.double(), img64, txt64, KEEP)
        got = cdpruner(x, KEEP, image_embeds=img, text_embeds=txt, relevance_scope="batch")
        if not torch.equal(got.indices, want.nonzero()[:, 1].view(B, KEEP)):
            raise SystemExit(f"B={B}: cdpruner (batch scope) and the original disagree")
        got = cdpruner(x, KEEP, image_embeds=img, text_embeds=txt)
        for b in range(B):
            _, want = original(x[b:b + 1].double(), img64[b:b + 1], txt64, KEEP)
            if not torch.equal(got.indices[b], want.nonzero()[:, 1]):
                raise SystemExit(f"B={B}: cdpruner and the original disagree on image {b}")
        rows.append((B, *medians([
            lambda: cdpruner(x, KEEP, image_embeds=img, text_embeds=txt, relevance_scope="batch"),
            lambda: original(x, img, txt, KEEP),
            lambda: cdpruner(x, KEEP, image_embeds=img, text_embeds=txt),
            lambda: original_loop(x, img, txt, KEEP)], device, args.reps)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"CDPruner, N={N}, D={D}, E={E}, M={M}, keep {KEEP}; device {name} "
          f"({torch.get_num_threads()} CPU threads), features {str(dtype).replace('torch.', '')}, "
          f"torch {torch.__version__}, median of {args.reps}\n")
    print("| B | visprune (batch scope) | original (batched, as written) | speed-up | "
          "visprune (image scope) | original (one image at a time) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for B, t_batch_ours, t_batch, t_ours, t_loop in rows:
        print(f"| {B} | {fmt_time(1e3 * t_batch_ours)} | {fmt_time(1e3 * t_batch)} | {t_batch / t_batch_ours:.2f}× | "
              f"{fmt_time(1e3 * t_ours)} | {fmt_time(1e3 * t_loop)} | {t_loop / t_ours:.2f}× |")


if __name__ == "__main__":
    main()
