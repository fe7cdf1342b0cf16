"""DART: visprune's selection (``visprune.methods.dart``, what the in-LLM engine calls) against
the original's code path, side by side.

    python benchmarks/bench_dart.py [--device cpu|cuda] [--reps 20]

LLaVA-1.5-7B shapes at the pruning layer: a 640-token prompt with the image at 35..611, keys of
32 kv heads × 128, hidden states of width 4096; 4 + 4 pivots, reduction 0.7778 (keep 128 → 132
kept); B ∈ {1, 8}.  fp32 on CPU, fp16 on CUDA.  ``original`` is ``get_retained_image_token`` of
the LightCompress port (``llmc/compression/token_reduction/dart.py``), transliterated statement by
statement (it reads batch row 0: the B=8 column runs it once per row); the final norm is applied
on both sides.  Before timing, visprune is checked to keep the tokens the original keeps with its
pivots visited in index order (visprune's documented deviation; the timed original iterates its
Python set as written).
"""
import argparse

import torch

from visprune.bench import fmt_time, medians
from visprune.methods import dart

L, START, N, HKV, DH, D = 640, 35, 576, 32, 128, 4096
PIVOT_IMAGE = PIVOT_TEXT = 4
RATIO = 0.7778
BATCHES = (1, 8)


def original(start, length, last_layer_state, any_states, ordered=False):
    """``get_retained_image_token`` (batch row 0), as written; ``ordered``: the pivots and the
    pool in index order with ties to the lower index (visprune's documented deviation: the
    original's Python-set order is an implementation detail), to check the selections."""
    order = sorted if ordered else list
    TOKEN_TOPK = int(length * (1 - RATIO) / (PIVOT_IMAGE + PIVOT_TEXT))
    any_states = any_states.permute(0, 2, 1, 3)
    any_states = any_states.reshape(any_states.shape[0], any_states.shape[1], -1)
    k_states_image_token = any_states[0][start:start + length, :]
    k_states_query_token = any_states[0][start + length:, :]
    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)
    image_indices = (k_states_image_token_L1_norm.topk(PIVOT_IMAGE).indices + start).tolist()
    query_indices = (k_states_query_token_L1_norm.topk(PIVOT_TEXT).indices
                     + start + length).tolist()
    indices_set = set(image_indices + query_indices)
    valid_indices = set(range(start, start + length)) - set(image_indices)
    valid_indices_list = order(valid_indices)
    for item in order(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :],
                                                         valid_vectors, dim=-1)
        top_k_indices = (torch.sort(cos_sim, descending=True, stable=True).indices[:TOKEN_TOPK]
                         if ordered else cos_sim.topk(TOKEN_TOPK).indices)
        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = order(valid_indices)
    indices_set.difference_update(query_indices)
    return torch.tensor(list(indices_set), device=last_layer_state.device)


def inputs(B, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, L, DH, generator=g) * (1 + torch.rand(B, 1, L, 1, generator=g))
    hidden = torch.randn(B, L, D, generator=g) + 0.5 * torch.randn(B, 1, D, generator=g)
    return keys.to(device, dtype), hidden.to(device, dtype)


def spans(B, device):
    """``(image, text)``: ``bool[B, L]`` the image's tokens and the text after it."""
    slots = torch.arange(L, device=device).expand(B, L)
    image = (slots >= START) & (slots < START + N)
    return image, slots >= START + N


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    norm = torch.nn.RMSNorm(D, eps=1e-5, device=device, dtype=dtype)
    rows = []
    for B in BATCHES:
        keys, hidden = inputs(B, device, dtype)
        image, text = spans(B, device)

        def ours():
            with torch.no_grad():
                return dart(norm(hidden), keys.transpose(1, 2).reshape(B, L, -1), image,
                            1 - RATIO, text=text, pivot_image=PIVOT_IMAGE,
                            pivot_text=PIVOT_TEXT).indices

        def loop(ordered=False):
            with torch.no_grad():
                states = norm(hidden)
                return [original(START, N, states[b:b + 1], keys[b:b + 1], ordered)
                        for b in range(B)]

        kept = ours()
        for b, want in enumerate(loop(ordered=True)):
            if sorted(want.tolist()) != kept[b][kept[b] >= 0].tolist():
                raise SystemExit(f"B={B}: DART and the original keep different tokens (row {b})")
        rows.append((B, *medians([ours, loop], device, args.reps)))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"DART selection, L={L}, image {START}..{START + N}, keys {HKV}x{DH}, hidden {D}, "
          f"{PIVOT_IMAGE}+{PIVOT_TEXT} pivots, reduction {RATIO}; device {name} "
          f"({torch.get_num_threads()} CPU threads), {str(dtype).replace('torch.', '')}, "
          f"torch {torch.__version__}, median of {args.reps}, interleaved\n")
    print("| B | visprune | original (one image at a time) | speed-up |")
    print("|---|---|---|---|")
    for B, t_ours, t_loop in rows:
        print(f"| {B} | {fmt_time(1e3 * t_ours)} | {fmt_time(1e3 * t_loop)} | "
              f"{t_loop / t_ours:.2f}× |")


if __name__ == "__main__":
    main()
