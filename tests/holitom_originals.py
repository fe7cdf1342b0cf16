"""HoliTom's pre-LLM stage (github cokeshao/HoliTom, ``holitom/llava_arch.py``), transliterated
statement by statement: the golden reference of ``tests/test_holitom.py`` and the original's code
path of ``benchmarks/bench_holitom.py``.

Each function re-writes one method of ``LlavaMetaForCausalLM_holitom`` in the original's own form
(one video at a time, its loops, its torch calls in its order), written from the original, not
from :mod:`visprune.methods.holitom`.  What differs, and why:

* the settings the original reads from environment variables are arguments (``RETAIN_RATIO``,
  ``T``, ``K``, ``BETA`` (``None``: ``NO_BETA=1``), ``D``, ``MAX_WINDOW_SIZE``);
* the original carries each token's position ``p`` in its frame (for the ``"grid"`` newline
  layout, which is not transliterated: LLaVA-OneVision's ``"one_token"`` path is); here the
  positions are flat, ``t·P + p``, so that the output can be compared with visprune's indices: a
  static token (averaged over a window) has its window's first frame, a merged token its
  centre's;
* ``cluster_dpc_knn``'s ``x.float()`` is ``dist_dtype`` (float64 gives the exact math) and its
  ``1e-6·rand`` density noise is drawn from ``generator``; ``generator=None`` removes the noise
  and states the ties as visprune does (documented choice);
* with ``D > 0`` the original crashes (``pos.masked_select(mask.unsqueeze(-1))`` broadcasts
  ``[W, L]`` against ``[W, L, 1]``); the contextual tokens' positions are taken with the mask
  itself (documented choice).  Its default ``D = 0`` never reaches that line.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cluster_dpc_knn(x, cluster_num, k=7, dist_dtype=torch.float32, generator=None):
    """``cluster_dpc_knn``: ``(index_center, dist_matrix)``.

    With ``generator``: the original's ``density + rand·1e-6``, its strict comparison and
    ``score.topk``.  Without (documented choice): no noise; of two equal densities the lower index
    is the denser, of equal scores the lower index comes first (a stable descending sort)."""
    with torch.no_grad():
        batch_size, seq_len, embed_dim = x.shape
        dist_matrix = torch.cdist(x.to(dist_dtype), x.to(dist_dtype)) / (embed_dim ** 0.5)
        dist_nearest, index_nearest = torch.topk(dist_matrix, k, dim=-1, largest=False)
        density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
        if generator is not None:
            density = density + torch.rand(density.shape, generator=generator,
                                           dtype=density.dtype) * 1e-6
            mask = (density[:, None, :] > density[:, :, None]).type(dist_matrix.dtype)
        else:
            lower = torch.arange(seq_len)[None, :] < torch.arange(seq_len)[:, None]
            mask = ((density[:, None, :] > density[:, :, None])
                    | ((density[:, None, :] == density[:, :, None]) & lower)
                    ).type(dist_matrix.dtype)
        dist_max = dist_matrix.flatten(1).max(dim=-1).values[:, None, None]
        dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)
        score = dist * density
        if generator is not None:
            _, index_center = score.topk(cluster_num, dim=-1)
        else:
            index_center = torch.sort(score, dim=-1, descending=True,
                                      stable=True).indices[:, :cluster_num]
        return index_center, dist_matrix


def select_static_windows(feature_sim, batch_size, tau, max_window_size):
    """``select_static_windows``: ``(selected_frames, total_reduced)``, the windows
    ``[start, end]`` of the O(T²) dynamic programme and the tokens their static merge removes."""
    def get_pruned_static_count_vectorized(feature_sim, batch_size, tau):
        similarity_matrix = torch.ones((batch_size, batch_size, feature_sim.shape[1]))
        for start in range(batch_size - 1):
            cum_similarity = torch.cumprod(feature_sim[start:] > tau, dim=0)
            similarity_matrix[start, start + 1:start + 1 + len(cum_similarity)] = cum_similarity
        window_lengths = torch.arange(batch_size).unsqueeze(0) - \
            torch.arange(batch_size).unsqueeze(1)
        window_lengths = window_lengths.clamp(min=0)
        pruned_static_count = (similarity_matrix.sum(dim=-1) * window_lengths).float()
        return pruned_static_count

    pruned_static_count = get_pruned_static_count_vectorized(feature_sim, batch_size, tau)
    dp = torch.zeros(batch_size)
    prev = torch.zeros(batch_size, dtype=torch.long)
    for i in range(batch_size):
        max_val = dp[i - 1] if i > 0 else 0
        best_j = i
        for window_size in range(2, min(i + 1, max_window_size) + 1):
            j = i - window_size
            current_val = (dp[j] if j >= 0 else 0) + pruned_static_count[j + 1, i]
            if current_val > max_val:
                max_val = current_val
                best_j = j + 1
        dp[i] = max_val
        prev[i] = best_j
    selected_frames = []
    i = batch_size - 1
    while i >= 0:
        selected_frames.append((prev[i].item(), i))
        i = prev[i].item() - 1
    selected_frames = selected_frames[::-1]
    total_reduced = dp[-1].item()
    return selected_frames, total_reduced


def merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num, Beta):
    """``merge_tokens_by_clustering``: every other token to its nearest centre (``argmin`` over
    the ascending centres' columns); a centre with members becomes ``β·centre + (1-β)·mean``
    (``NO_BETA`` unset, the default), with ``Beta=None`` (``NO_BETA=1``) the mean of the centre
    and its members; one without stays itself."""
    batch_size, seq_len, embed_dim = feat.shape
    all_indices = torch.arange(seq_len)
    all_indices = all_indices.unsqueeze(0).expand(batch_size, -1)
    non_target_indices = torch.zeros((batch_size, seq_len - cluster_num), dtype=torch.long)
    for b in range(batch_size):
        non_target_mask = ~torch.isin(all_indices[b], target_indices[b])
        non_target_indices[b] = all_indices[b][non_target_mask]
    non_target_feat = torch.gather(
        feat, dim=1, index=non_target_indices.unsqueeze(-1).expand(-1, -1, feat.size(-1)))
    dist_matrix = torch.gather(
        dist_matrix, dim=1,
        index=non_target_indices.unsqueeze(-1).expand(-1, -1, dist_matrix.size(-1)))
    dist_matrix = torch.gather(
        dist_matrix, dim=2, index=target_indices.unsqueeze(1).expand(-1, dist_matrix.size(1), -1))
    idx_cluster = torch.argmin(dist_matrix, dim=-1)
    cluster_tokens = []
    for b in range(batch_size):
        batch_tokens = []
        for i in range(cluster_num):
            mask = (idx_cluster[b] == i)
            if mask.any():
                cluster_features = non_target_feat[b][mask]
                if Beta is not None:
                    cluster_means = cluster_features.mean(dim=0)
                    batch_tokens.append(Beta * feat[b][target_indices[b][i]]
                                        + (1 - Beta) * cluster_means)
                else:
                    all_features = torch.cat([feat[b][target_indices[b][i]].unsqueeze(0),
                                              cluster_features], dim=0)
                    batch_tokens.append(all_features.mean(dim=0))
            else:
                batch_tokens.append(feat[b][target_indices[b][i]])
        cluster_tokens.append(torch.stack(batch_tokens))
    cluster_tokens = torch.stack(cluster_tokens)
    return cluster_tokens


def merge_tokens_by_attention_density(feat, attn, pos, retain_ratio, D, Beta, K,
                                      dist_dtype=torch.float32, generator=None):
    """``merge_tokens_by_attention_density`` on a window's dynamic tokens ``[W, L, C]``: per
    frame the ``dominant_num`` tokens of highest attention (in position order), then the
    ``contextual_num`` DPC-kNN centres of the others (ascending), merged."""
    batch_size, seq_len, embed_dim = feat.shape
    dominant_num = round(math.ceil(seq_len * retain_ratio) * (1 - D))
    contextual_num = math.ceil(seq_len * retain_ratio) - dominant_num
    if dominant_num > 0:
        all_indices = attn.topk(dominant_num, dim=1).indices
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool).scatter_(1, all_indices, False)
        dominant_tokens = feat.masked_select(~mask.unsqueeze(-1)).view(batch_size, dominant_num,
                                                                        embed_dim)
        dominant_pos = pos.masked_select(~mask).view(batch_size, dominant_num)
    else:
        mask = torch.ones_like(feat[:, :, 0], dtype=torch.bool)
        dominant_tokens = torch.empty((batch_size, 0, embed_dim), dtype=feat.dtype)
        dominant_pos = torch.empty((batch_size, 0), dtype=torch.long)
    if contextual_num > 0:
        feat_filtered = feat.masked_select(mask.unsqueeze(-1)).view(
            batch_size, seq_len - dominant_num, embed_dim)
        # documented choice: the original's mask.unsqueeze(-1) here crashes
        contextual_pos = pos.masked_select(mask).view(batch_size, seq_len - dominant_num)
        target_indices, dist_matrix = cluster_dpc_knn(feat_filtered, contextual_num,
                                                      k=min(K, contextual_num),
                                                      dist_dtype=dist_dtype, generator=generator)
        target_indices = torch.sort(target_indices, dim=-1)[0]
        contextual_pos = torch.stack([contextual_pos[b][target_indices[b]]
                                      for b in range(batch_size)])
        contextual_tokens = merge_tokens_by_clustering(feat_filtered, target_indices, dist_matrix,
                                                       contextual_num, Beta)
    else:
        contextual_tokens = torch.empty((batch_size, 0, embed_dim), dtype=feat.dtype)
        contextual_pos = torch.empty((batch_size, 0), dtype=torch.long)
    image_feat = []
    image_pos = []
    for b in range(batch_size):
        image_feat.append(torch.cat([dominant_tokens[b], contextual_tokens[b]], dim=0))
        image_pos.append(torch.cat([dominant_pos[b], contextual_pos[b]], dim=0))
    return torch.stack(image_feat), torch.stack(image_pos)


def merge_tokens_by_density(feat, pos, retain_ratio, Beta, K, dist_dtype=torch.float32,
                            generator=None):
    """``merge_tokens_by_density`` on a window's static tokens ``[1, S, C]``: ``round(S·r)``
    DPC-kNN centres (ascending), every other token merged into its nearest."""
    batch_size, seq_len, embed_dim = feat.shape
    cluster_num = round(seq_len * retain_ratio)
    if cluster_num > 0:
        target_indices, dist_matrix = cluster_dpc_knn(feat, cluster_num, k=min(K, cluster_num),
                                                      dist_dtype=dist_dtype, generator=generator)
        target_indices = torch.sort(target_indices, dim=-1)[0]
        image_pos = torch.stack([pos[b][target_indices[b]] for b in range(batch_size)])
        image_feat = merge_tokens_by_clustering(feat, target_indices, dist_matrix, cluster_num,
                                                Beta)
    else:
        image_feat = torch.empty((batch_size, 0, embed_dim), dtype=feat.dtype)
        image_pos = torch.empty((batch_size, 0), dtype=torch.long)
    return image_feat, image_pos


def holitom_window(static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos, window_size,
                   retain_ratio, D, Beta, K, dist_dtype=torch.float32, generator=None):
    """``holitom`` with ``mm_newline_position != "grid"``: ``(tokens, positions)`` of one
    window, the static tokens merged, then each frame's (the dynamic tokens are merged first,
    as in the original: the order of the noise draws)."""
    if window_size == 1:
        dynamic_feat, dynamic_pos = merge_tokens_by_attention_density(
            dynamic_feat, dynamic_attn, dynamic_pos, retain_ratio, D, Beta, K, dist_dtype,
            generator)
        return dynamic_feat.flatten(0, 1), dynamic_pos.flatten(0, 1)
    dynamic_feat, dynamic_pos = merge_tokens_by_attention_density(
        dynamic_feat, dynamic_attn, dynamic_pos, retain_ratio, D, Beta, K, dist_dtype, generator)
    static_feat, static_pos = merge_tokens_by_density(
        static_feat.unsqueeze(0), static_pos, retain_ratio, Beta, K, dist_dtype, generator)
    return (torch.cat([static_feat.flatten(0, 1), dynamic_feat.flatten(0, 1)]),
            torch.cat([static_pos.flatten(0, 1), dynamic_pos.flatten(0, 1)]))


def get_static_dynamic_features(image_feat, attn_weights, selected_frames, feature_sim, tau):
    """``get_static_dynamic_features``, positions flat: per window the static tokens' mean over
    its frames (at the first frame's positions ``start·P + p``), the dynamic tokens, their
    attention and positions ``t·P + p``."""
    batch_size, seq_len, embed_dim = image_feat.shape
    static_feat_list, dynamic_feat_list, dynamic_attn_list = [], [], []
    static_pos_list, dynamic_pos_list = [], []
    for start, end in selected_frames:
        all_indices = torch.arange(seq_len).unsqueeze(0)
        if start == end:
            static_feat_list.append(torch.empty((0, embed_dim), dtype=image_feat.dtype))
            dynamic_feat_list.append(image_feat[start:end + 1])
            dynamic_attn_list.append(attn_weights[start:end + 1])
            static_pos_list.append(torch.empty((1, 0), dtype=torch.long))
            dynamic_pos_list.append(all_indices + start * seq_len)
        else:
            windows_size = end - start + 1
            mask = torch.all(feature_sim[start:end, :] > tau, dim=0)
            static_feat = image_feat[start:end + 1, mask]
            dynamic_feat = image_feat[start:end + 1, ~mask]
            dynamic_attn = attn_weights[start:end + 1, ~mask]
            static_feat_list.append(static_feat.mean(dim=0))
            dynamic_feat_list.append(dynamic_feat)
            dynamic_attn_list.append(dynamic_attn)
            static_pos_list.append(all_indices[:, mask].expand(1, -1) + start * seq_len)
            dynamic_pos_list.append(all_indices[:, ~mask].expand(windows_size, -1)
                                    + torch.arange(start, end + 1)[:, None] * seq_len)
    return static_feat_list, dynamic_feat_list, dynamic_attn_list, static_pos_list, \
        dynamic_pos_list


def holitom_video(pooled_image_feat, attn_weights, retain_ratio=0.1, tau=0.8, Beta=0.6, D=0.0,
                  K=7, max_window_size=1024, dist_dtype=torch.float32, generator=None):
    """The video branch of ``prepare_inputs_labels_for_multimodal`` after ``get_2dPool``, on one
    video: ``pooled_image_feat[T, P, C]``, ``attn_weights[T, P]`` (the pooled mean last-layer
    SigLIP attention); returns ``(tokens, positions, selected_frames)``, the tokens in the
    original's order."""
    batch_size, seq_len, embed_dim = pooled_image_feat.shape
    pooled_image_feat_normed = F.normalize(pooled_image_feat, p=2, dim=-1)
    feature_sim = F.cosine_similarity(pooled_image_feat_normed[:-1],
                                      pooled_image_feat_normed[1:], dim=-1)
    selected_frames, total_reduced = select_static_windows(feature_sim, batch_size, tau,
                                                           max_window_size)
    total_tokens = batch_size * seq_len
    retain_ratio = min(retain_ratio / ((total_tokens - total_reduced) / total_tokens), 1)
    static_feat, dynamic_feat, dynamic_attn, static_pos, dynamic_pos = \
        get_static_dynamic_features(pooled_image_feat, attn_weights, selected_frames,
                                    feature_sim, tau)
    tokens, positions = [], []
    for idx, (start, end) in enumerate(selected_frames):
        window_size = end - start + 1
        feat, pos = holitom_window(static_feat[idx], dynamic_feat[idx], dynamic_attn[idx],
                                   static_pos[idx], dynamic_pos[idx], window_size, retain_ratio,
                                   D, Beta, K, dist_dtype, generator)
        tokens.append(feat)
        positions.append(pos)
    return torch.cat(tokens, dim=0), torch.cat(positions, dim=0), selected_frames
