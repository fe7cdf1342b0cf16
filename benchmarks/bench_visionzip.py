"""VisionZip: visprune's ``visionzip`` against the original's own code path, side by side.

    python benchmarks/bench_visionzip.py [--device cpu|cuda] [--reps 30] [--threads T]

LLaVA-1.5 shapes: N = 576 patches (+ CLS), D = 1024 (CLIP-L), 16 heads of 64 (keys of width 64),
budget 64 = 54 dominant (CLS included) + 10 contextual; B ∈ {1, 8}.  fp32 on CPU, fp16 on CUDA
(the original runs in the model's dtype).  ``original`` below is the tensor code of
``CLIPVisionTower_VisionZip.forward`` (dvlab-research/VisionZip ``visionzip/clip_encoder.py``)
transliterated statement by statement from the captured encoder outputs on; it is timed as
written (it takes a batch) and one image at a time (a loop over rows).  Both sides start from the
same tensors: the layer's attention weights ``[B, H, N+1, N+1]``, its output ``[B, N+1, D]`` and
the head-averaged keys ``[B, N+1, 64]``; visprune's time includes slicing and summing the CLS
row.  Before timing, the two outputs are checked to hold the same tokens.
"""
import argparse

import torch

from visprune.bench import fmt_time, medians
from visprune.methods.visionzip import visionzip

N, D, H, DH = 576, 1024, 16, 64
DOMINANT, CONTEXTUAL = 54, 10
BATCHES = (1, 8)


def original(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    """``CLIPVisionTower_VisionZip.forward``, tensor branch, from the encoder outputs on."""
    cls_idx = 0
    cls_attention = attn_weights[:, :, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(dim=1)
    topk_indices = cls_attention_sum.topk(dominant_num, dim=1).indices + 1
    all_indices = torch.cat([torch.zeros((hidden_states.shape[0], 1), dtype=topk_indices.dtype,
                                         device=topk_indices.device), topk_indices], dim=1)
    mask = torch.ones_like(hidden_states[:, :, 0], dtype=torch.bool,
                           device=metric.device).scatter_(1, all_indices, False)
    dominant_tokens = hidden_states.masked_select(~mask.unsqueeze(-1)).view(
        hidden_states.shape[0], dominant_num + 1, hidden_states.shape[2])
    metric_filtered = metric[mask].view(hidden_states.shape[0],
                                        hidden_states.shape[1] - (dominant_num + 1),
                                        metric.shape[2])
    hidden_states_filtered = hidden_states.masked_select(mask.unsqueeze(-1)).view(
        hidden_states.shape[0], hidden_states.shape[1] - (dominant_num + 1),
        hidden_states.shape[2])
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step,
                                  device=metric_normalized.device)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    tokens_to_merge = metric_normalized[:, ~torch.isin(torch.arange(
        metric_normalized.shape[1], device=metric_normalized.device), target_indices), :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(tokens_to_merge.shape[0], tokens_to_merge.shape[1],
                                 contextual_num, dtype=hidden_states_filtered.dtype,
                                 device=metric_normalized.device)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    hidden_to_merge = hidden_states_filtered[:, ~torch.isin(torch.arange(
        hidden_states_filtered.shape[1], device=hidden_states_filtered.device), target_indices), :]
    aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    target_hidden = hidden_states_filtered[:, target_indices, :]
    contextual_tokens = target_hidden + aggregated_hidden
    return torch.cat([dominant_tokens, contextual_tokens], dim=1), all_indices


def original_loop(attn_weights, hidden_states, metric, dominant_num, contextual_num):
    return [original(attn_weights[b:b + 1], hidden_states[b:b + 1], metric[b:b + 1],
                     dominant_num, contextual_num) for b in range(hidden_states.shape[0])]


def ours(attn_weights, hidden_states, metric):
    return visionzip(hidden_states[:, 1:], attn_weights[:, :, 0, 1:].sum(1), metric[:, 1:],
                     dominant=DOMINANT, contextual=CONTEXTUAL, cls_token=hidden_states[:, 0])


def inputs(B, device, dtype, seed=0):
    """Softmax attention with a few dominant patches per image, as CLIP's layer -2."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, H, N + 1, N + 1, generator=g)
    for b in range(B):
        logits[b, :, 0, torch.randperm(N, generator=g)[:20] + 1] += 4.0
    hidden = torch.randn(B, N + 1, D, generator=g)
    metric = torch.randn(B, N + 1, DH, generator=g) + torch.randn(B, N + 1, 1, generator=g)
    return [t.to(device, dtype) for t in (logits.softmax(-1), hidden, metric)]


def same_tokens(res, want):
    """The same tokens: dominant ones bit for bit as a set (the original's are in position order
    too), contextual ones within the dtype's tolerance."""
    tokens, _ = want
    tol = 1e-5 if tokens.dtype == torch.float32 else 2e-2
    return (torch.equal(res.tokens[:, :DOMINANT], tokens[:, :DOMINANT])
            and torch.allclose(res.tokens[:, DOMINANT:].float(), tokens[:, DOMINANT:].float(),
                               rtol=tol, atol=tol))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's); 1 steadies a loaded machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for B in BATCHES:
        attn, hidden, metric = inputs(B, device, dtype)
        res = ours(attn, hidden, metric)
        if not same_tokens(res, original(attn, hidden, metric, DOMINANT - 1, CONTEXTUAL)):
            raise SystemExit(f"B={B}: visionzip and the original disagree")
        rows.append((B, *medians([
            lambda: ours(attn, hidden, metric),
            lambda: original(attn, hidden, metric, DOMINANT - 1, CONTEXTUAL),
            lambda: original_loop(attn, hidden, metric, DOMINANT - 1, CONTEXTUAL)],
            device, args.reps)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"VisionZip, N={N}, D={D}, keys {DH}, budget {DOMINANT}+{CONTEXTUAL}; device {name} "
          f"({torch.get_num_threads()} CPU threads), {str(dtype).replace('torch.', '')}, "
          f"torch {torch.__version__}, median of {args.reps}, interleaved\n")
    print("| B | visprune | original (batched, as written) | speed-up | "
          "original (one image at a time) | speed-up |")
    print("|---|---|---|---|---|---|")
    for B, t_ours, t_batch, t_loop in rows:
        print(f"| {B} | {fmt_time(1e3 * t_ours)} | {fmt_time(1e3 * t_batch)} | {t_batch / t_ours:.2f}× | "
              f"{fmt_time(1e3 * t_loop)} | {t_loop / t_ours:.2f}× |")


if __name__ == "__main__":
    main()
