"""The video methods' original code, transliterated statement by statement: the golden references of
``tests/test_video_methods.py`` and the originals' code paths of
``benchmarks/bench_video_methods.py``.

Each function below re-writes one original function in the original's own form (one video at a
time, its loops, its torch calls in its order) and is written from the original, not from
:mod:`visprune.methods`.  The originals compute in the dtype of the embeddings they are given, so
these do too: on float64 inputs they are float64 references, and on fp32 / fp16 / bf16 inputs they
round where the originals round, which decides ranks and ties (bf16 scores tie often).  In
development they were run next to the originals themselves (vLLM 0.32's functions in vLLM's own
environment; DyCoke's ``dycole_ttm`` from its repository) on random inputs of every dtype and gave
bitwise the same masks and tokens.

Where an original crashes, the transliteration follows the documented choice, marked
"documented choice".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------- vLLM: EVS
def evs_retained_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """vLLM 0.32 ``vllm/multimodal/video_prune/evs.py``: ``compute_retained_tokens_count``."""
    total_tokens = tokens_per_frame * num_frames
    evs_num_tokens = int(total_tokens * (1 - q))
    min_num_tokens = tokens_per_frame
    return max(min_num_tokens, evs_num_tokens)


def evs_retention_mask(video_embeds, video_size_thw, spatial_merge_size, q):
    """vLLM 0.32 ``vllm/multimodal/video_prune/evs.py``: ``compute_retention_mask``.
    ``video_embeds[T·H·W/m², D]`` → bool mask of the same length."""
    T, H, W = map(int, video_size_thw)
    rows, cols = H // spatial_merge_size, W // spatial_merge_size
    grid = video_embeds.reshape(T, rows, cols, video_embeds.size(-1))
    per_frame = rows * cols
    cos = F.cosine_similarity(grid[1:, ...], grid[:-1, ...], dim=-1)
    dissimilar = 1 - cos
    first = 255 * torch.ones_like(grid[:1, :, :, 0])           # frame 0 always kept
    dissimilar = torch.cat([first, dissimilar], dim=0)
    flat = dissimilar.view(-1)
    ranked = torch.argsort(flat, dim=-1, descending=True, stable=True)
    n = evs_retained_count(tokens_per_frame=per_frame, num_frames=T, q=q)
    keep = ranked[:n]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask.index_fill_(0, keep, True)
    return mask.reshape(dissimilar.size()).view(-1)


# --------------------------------------------------------------------------- vLLM: VidCom2
ALPHAS = tuple(2.0 ** e for e in range(-3, 2))


def vidcom2_retained_count(tokens_per_frame: int, num_frames: int, q: float) -> int:
    """vLLM 0.32 ``vllm/multimodal/video_prune/vidcom2.py``: ``compute_retained_tokens_count``."""
    total = tokens_per_frame * num_frames
    wanted = int(total * (1.0 - q))
    return max(num_frames, min(wanted, total))


def vidcom2_gaussian(x, center):
    """vLLM 0.32 ``vidcom2.py``: ``_multi_scale_gaussian``."""
    d2 = ((x - center) ** 2).sum(dim=-1)
    return sum(torch.exp(-d2 / (2.0 * a)) for a in ALPHAS)


def vidcom2_retention_mask(video_embeds, video_size_thw, spatial_merge_size, q):
    """vLLM 0.32 ``vllm/multimodal/video_prune/vidcom2.py``: ``compute_retention_mask``."""
    T, H, W = map(int, video_size_thw)
    rows, cols = H // spatial_merge_size, W // spatial_merge_size
    per_frame = rows * cols
    total = T * per_frame
    device = video_embeds.device
    if per_frame == 0 or total == 0:
        return torch.ones(0, dtype=torch.bool, device=device)
    target = vidcom2_retained_count(tokens_per_frame=per_frame, num_frames=T, q=q)
    target = min(target, total)

    # 1. the lowest-variance half of the channels
    var = video_embeds.var(dim=0, unbiased=False)
    n_channels = max(1, int(video_embeds.size(-1) * 0.5))
    _, low = torch.topk(var, k=n_channels, largest=False)
    chosen = video_embeds.index_select(-1, low)

    # 2. Gaussian similarity to the video's and each frame's centre
    frames = chosen.view(T, per_frame, chosen.size(-1))
    frames = F.normalize(frames, dim=-1)
    video_center = frames.mean(dim=(0, 1), keepdim=True)
    frame_center = frames.mean(dim=1, keepdim=True)
    v = vidcom2_gaussian(frames, video_center)
    f = vidcom2_gaussian(frames, frame_center)
    sim = v + f

    # 3. per-frame budgets
    base = 1.0 - q
    frame_score = -v.mean(dim=-1)
    p = F.softmax((frame_score - frame_score.max()) / 0.01, dim=0)
    scale = (base * (1.0 + p - p.mean())).clamp(max=1.0)
    ks = (scale * per_frame).round().long().clamp(min=1, max=per_frame)

    # 4. each frame's least similar tokens
    budgets = ks.tolist()
    mask2d = torch.zeros(T, per_frame, dtype=torch.bool, device=device)
    for i, k_i in enumerate(budgets):
        _, idx = torch.topk(sim[i], k=k_i, largest=False, sorted=False)
        mask2d[i].scatter_(0, idx, True)

    # 5. reconcile to the target
    flat_mask = mask2d.view(-1)
    flat_sim = sim.view(-1)
    current = sum(budgets)
    if current > target:
        kept = flat_mask.nonzero(as_tuple=False).squeeze(-1)
        _, worst = torch.topk(flat_sim[kept], k=current - target, largest=True, sorted=False)
        flat_mask[kept[worst]] = False
    elif current < target:
        free = (~flat_mask).nonzero(as_tuple=False).squeeze(-1)
        if free.numel() > 0:
            add = min(target - current, free.numel())
            _, best = torch.topk(flat_sim[free], k=add, largest=False, sorted=False)
            flat_mask[free[best]] = True
    return flat_mask


# --------------------------------------------------------------------------- DyCoke
def dycoke_ttm(image_feature, num_tokens_per_frame=196, merging_ratio=0.7):
    """KD-TAO/DyCoke ``llava/model/llava_arch.py``: ``dycole_ttm``, returning ``(tokens,
    positions)``: the original's concatenated tokens and, by the same slicing of
    ``arange(len(image_feature))``, their positions.  The original stacks empty lists (and
    raises) when ``num_frames <= 4``; documented choice: no second-stage group then, and a
    one-frame video kept whole."""
    num_frames = image_feature.shape[0] // num_tokens_per_frame
    merging_ratio = 1 - merging_ratio
    positions = torch.arange(image_feature.shape[0])

    def frame(x, i):
        return x[i * num_tokens_per_frame:(i + 1) * num_tokens_per_frame]

    if num_frames == 1:                                  # documented choice
        return frame(image_feature, 0), frame(positions, 0)

    # even pairs: similarity of frame i+1 to frame i, both normalised first
    similarities = []
    for i in range(0, num_frames - 1, 2):
        a = F.normalize(frame(image_feature, i), p=2, dim=1)
        b = F.normalize(frame(image_feature, i + 1), p=2, dim=1)
        similarities.append(F.cosine_similarity(a, b, dim=1))
    similarities = torch.stack([s.clone() for s in similarities])

    tokens, kept_positions = [], []
    for i in range(0, num_frames - 1, 2):
        n = int(merging_ratio * num_tokens_per_frame)
        keep = similarities[i // 2].topk(n, largest=False).indices
        tokens.append(frame(image_feature, i))
        tokens.append(frame(image_feature, i + 1)[keep])
        kept_positions.append(frame(positions, i))
        kept_positions.append(frame(positions, i + 1)[keep])

    # every fourth frame against the frame two later
    odd_similarities = []
    for i in range(0, num_frames - 4, 4):
        odd_similarities.append(F.cosine_similarity(frame(image_feature, i),
                                                    frame(image_feature, i + 2), dim=1))
    if odd_similarities:                                 # documented choice: none for T <= 4
        odd_similarities = torch.stack([s.clone() for s in odd_similarities])
    for i in range(0, num_frames - 4, 4):
        n = int(merging_ratio * num_tokens_per_frame)
        keep = odd_similarities[i // 4].topk(n, largest=False).indices
        tokens[i] = frame(image_feature, i)
        tokens[i + 2] = frame(image_feature, i + 2)[keep]
        kept_positions[i] = frame(positions, i)
        kept_positions[i + 2] = frame(positions, i + 2)[keep]

    return torch.cat(tokens, dim=0), torch.cat(kept_positions, dim=0)
