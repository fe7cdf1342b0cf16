"""PruneVid's pre-LLM stage, transliterated statement by statement: the golden reference of
``tests/test_prunevid.py`` and the original's code path of ``benchmarks/bench_prunevid.py``.

Source: github Visual-AI/PruneVid, ``models/pllava/modeling_pllava.py``: the module functions
``cluster_dpc_knn``, ``index_points``, ``refine_clusters``, ``segment_lengths`` and the methods
``compute_cluster_vectors``, ``spatial_merge_tokens``, ``merge_frames_dynamic`` of
``PllavaForConditionalGeneration``.  Each function below re-writes one of them in its own form
(one video at a time, its loops, its torch calls in its order); it is written from the original,
not from :mod:`visprune.methods`.  The original's ``self.config`` values are arguments
(``num_frames``; ``P`` from the shape instead of ``pooling_shape``; ``tau``,
``temporal_segment_ratio``, ``cluster_ratio``; the hard-coded ``k = 7`` and the 14-token limit).

Two additions, both off by default in the original's sense:

- ``dist_dtype``: the original's ``x.float()`` before ``cdist``; float64 makes the whole
  computation exact enough to be the reference (``cdist`` computes with the matrix-product form
  ``||x||² + ||y||² - 2x·y`` above 25 rows, whose float32 rounding is large);
- ``generator``: a ``torch.Generator`` keeps the original's ``1e-6·rand`` density noise (drawn from
  it), its strict ``>`` and its ``topk``; ``None`` removes the noise and states the ties the way
  visprune does: of two equal densities the lower index is the denser, of equal scores the lower
  index comes first.

Besides the tokens, each function returns the position each output token stands for, found by
the same selections applied to ``arange(T·P)``: a token averaged over a window has its position in
the window's first frame, a cluster its centre's.

In development the transliteration was run next to the original's own functions (their source
taken from the repository's ``modeling_pllava.py``, executed in isolation with a stand-in
``self.config``) on 96 videos (fp32 and bf16, ``T`` 8–16, ``P`` 20–144, random and shot-like
tokens, two settings of the ratios and ``tau``, the density noise drawn from the same seeds):
bitwise the same tokens, every one.

Where the original crashes, the transliteration follows the documented choice, marked
"documented choice".
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def index_points(points, idx):
    """PruneVid ``index_points``: ``points[b, idx[b]]``."""
    B = points.shape[0]
    view_shape = list(idx.shape)
    view_shape[1:] = [1] * (len(view_shape) - 1)
    repeat_shape = list(idx.shape)
    repeat_shape[0] = 1
    batch_indices = torch.arange(B, dtype=torch.long).view(view_shape).repeat(repeat_shape)
    return points[batch_indices, idx, :]


def cluster_dpc_knn(x, cluster_num, k=5, dist_dtype=torch.float32, generator=None):
    """PruneVid ``cluster_dpc_knn`` (without its ``token_mask`` branch, which PruneVid never
    uses), returning ``(idx_cluster, index_down)``: the cluster of each token and the centres
    (the original computes the centres inside and returns ``cluster_num``).

    Documented choice: ``k`` above the token count uses every token (the original's ``topk``
    raises)."""
    B, N, C = x.shape
    dist_matrix = torch.cdist(x.to(dist_dtype), x.to(dist_dtype)) / (C ** 0.5)

    dist_nearest, index_nearest = torch.topk(dist_matrix, k=min(k, N), dim=-1, largest=False)
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if generator is not None:
        density = density + torch.rand(density.shape, generator=generator,
                                       dtype=density.dtype) * 1e-6
        mask = density[:, None, :] > density[:, :, None]
    else:
        lower = torch.arange(N)[None, :] < torch.arange(N)[:, None]
        mask = (density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & lower)
    mask = mask.type(dist_matrix.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist, index_parent = (dist_matrix * mask + dist_max * (1 - mask)).min(dim=-1)

    score = dist * density
    if generator is not None:
        _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    else:
        index_down = torch.sort(score, dim=-1, descending=True, stable=True).indices[:,
                                                                                   :cluster_num]

    dist_matrix = index_points(dist_matrix, index_down)
    idx_cluster = dist_matrix.argmin(dim=1)

    idx_batch = torch.arange(B)[:, None].expand(B, cluster_num)
    idx_tmp = torch.arange(cluster_num)[None, :].expand(B, cluster_num)
    idx_cluster[idx_batch.reshape(-1), index_down.reshape(-1)] = idx_tmp.reshape(-1)
    return idx_cluster, index_down


def refine_clusters(cluster_idx):
    """PruneVid ``refine_clusters``: in each cluster only its longest runs of frames stay (all of
    that length; none when the longest is one frame); every other stretch takes the label of
    its longer neighbouring run (the left one on a tie, as already relabelled; 0 with no
    neighbour)."""
    B, N = cluster_idx.shape
    refined_cluster_idx = cluster_idx.clone()
    for b in range(B):
        clusters = torch.unique(cluster_idx[b])
        segment_info = {}
        for cluster_label in clusters:
            indices = (cluster_idx[b] == cluster_label).nonzero(as_tuple=True)[0]
            if indices.numel() == 0:
                continue
            segments = []
            start = indices[0].item()
            prev = indices[0].item()
            for idx in indices[1:]:
                idx = idx.item()
                if idx == prev + 1:
                    prev = idx
                else:
                    segments.append((start, prev))
                    start = idx
                    prev = idx
            segments.append((start, prev))
            segment_info[cluster_label.item()] = segments

        for cluster_label, segments in segment_info.items():
            max_length = 0
            for (start, end) in segments:
                length = end - start + 1
                if length > max_length:
                    max_length = length
            if max_length == 1:
                for (start, end) in segments:
                    refined_cluster_idx[b, start:end + 1] = -1
                continue
            for (start, end) in segments:
                length = end - start + 1
                if length == max_length:
                    continue
                else:
                    refined_cluster_idx[b, start:end + 1] = -1

        idx = 0
        while idx < N:
            if refined_cluster_idx[b, idx] == -1:
                start = idx
                while idx < N and refined_cluster_idx[b, idx] == -1:
                    idx += 1
                end = idx - 1
                left_cluster_label = None
                left_length = 0
                if start > 0:
                    left_label = refined_cluster_idx[b, start - 1].item()
                    l_idx = start - 1
                    while l_idx >= 0 and refined_cluster_idx[b, l_idx] == left_label:
                        l_idx -= 1
                    left_length = start - l_idx - 1
                    left_cluster_label = left_label
                right_cluster_label = None
                right_length = 0
                if end < N - 1:
                    right_label = refined_cluster_idx[b, end + 1].item()
                    r_idx = end + 1
                    while r_idx < N and refined_cluster_idx[b, r_idx] == right_label:
                        r_idx += 1
                    right_length = r_idx - end - 1
                    right_cluster_label = right_label
                if left_length > right_length:
                    new_label = left_cluster_label
                elif right_length > left_length:
                    new_label = right_cluster_label
                else:
                    new_label = left_cluster_label if left_cluster_label is not None \
                        else right_cluster_label
                if new_label is None:
                    new_label = 0
                refined_cluster_idx[b, start:end + 1] = new_label
            else:
                idx += 1
    return refined_cluster_idx


def segment_lengths(tensor):
    """PruneVid ``segment_lengths``: the lengths of each row's runs of equal labels, ``[B, S]``
    padded with 0."""
    B, N = tensor.shape
    segment_lengths_list = []
    max_segments = 0
    for i in range(B):
        seq = tensor[i]
        change_points = torch.where(seq[1:] != seq[:-1])[0] + 1
        boundaries = torch.cat([torch.tensor([0]), change_points, torch.tensor([N])])
        lengths = boundaries[1:] - boundaries[:-1]
        segment_lengths_list.append(lengths)
        max_segments = max(max_segments, lengths.numel())
    result = torch.zeros((B, max_segments), dtype=torch.long)
    for i in range(B):
        lengths = segment_lengths_list[i]
        result[i, :lengths.numel()] = lengths
    return result


def compute_cluster_vectors(image_key_vectors, cluster_key_idx, num_cluster):
    """PruneVid ``compute_cluster_vectors``: each cluster's mean (0 for an empty one)."""
    cluster_key_idx_onehot = F.one_hot(cluster_key_idx, num_classes=num_cluster).to(
        dtype=image_key_vectors.dtype)
    cluster_key_idx_onehot_t = cluster_key_idx_onehot.permute(0, 2, 1)
    cluster_sums = torch.bmm(cluster_key_idx_onehot_t, image_key_vectors)
    cluster_counts = cluster_key_idx_onehot.sum(dim=1)
    cluster_counts_nonzero = cluster_counts.clone()
    cluster_counts_nonzero[cluster_counts_nonzero == 0] = 1
    cluster_features = cluster_sums / cluster_counts_nonzero.unsqueeze(-1)
    zero_mask = (cluster_counts == 0).unsqueeze(-1)
    return cluster_features.masked_fill(zero_mask, 0)


def spatial_merge_tokens(feature, positions, num_cluster, k, dist_dtype, generator):
    """PruneVid ``spatial_merge_tokens``, with the positions of its centres (score order, the
    order of the cluster vectors)."""
    cluster_idx, index_down = cluster_dpc_knn(feature, cluster_num=num_cluster, k=k,
                                              dist_dtype=dist_dtype, generator=generator)
    feature = compute_cluster_vectors(feature, cluster_idx, num_cluster=num_cluster)
    return feature, index_points(positions[..., None], index_down)[..., 0]


def merge_frames_dynamic(frames, num_frames, threshold=0.8, k=7, temporal_segment_ratio=0.25,
                         cluster_ratio=0.5, max_unclustered=14, dist_dtype=torch.float32,
                         generator=None):
    """PruneVid ``merge_frames_dynamic`` on one video's pooled projector features
    ``frames[1, T·P, C]``, returning ``(tokens[M, C], positions[M])`` (the original returns the
    tokens and the static, dynamic and window sizes).

    Documented choices where the original crashes or divides by zero: at least one temporal
    cluster and one spatial cluster (``int(·)`` can give 0, and ``topk(k=0)`` leaves nothing to
    ``argmin`` over); a one-frame window (only a one-frame video has one) has no static tokens
    (the original divides by ``W·(W-1) = 0``: its NaN / ±inf make a token static by the rounding
    of its own cosine)."""
    B, L, C = frames.shape
    P = L // num_frames
    frames = frames.view(B, num_frames, P, C)
    positions = torch.arange(L).view(B, num_frames, P)
    idx_clusters, _ = cluster_dpc_knn(frames.mean(dim=2),
                                      cluster_num=max(1, int(num_frames * temporal_segment_ratio)),
                                      k=k, dist_dtype=dist_dtype, generator=generator)
    idx_clusters = refine_clusters(idx_clusters)
    window_list = segment_lengths(idx_clusters)

    static_features, static_positions = [], []
    dynamic_features, dynamic_positions = [], []
    start_idx = 0
    for window_size in window_list[0]:
        window_size = int(window_size)
        current_frames = frames[:, start_idx:start_idx + window_size, :, :]
        current_positions = positions[:, start_idx:start_idx + window_size, :]

        if window_size == 1:                             # documented choice
            mask = torch.zeros(B, P, dtype=torch.bool)
        else:
            frames_normed = F.normalize(current_frames, p=2, dim=-1)
            frames_sim = torch.einsum('bwlc,btlc->bwtl', frames_normed, frames_normed)
            frames_sim = (frames_sim.sum(dim=-2) - 1).sum(dim=-2) / (window_size
                                                                     * (window_size - 1))
            mask = frames_sim > threshold
        mask_expand = mask.view(B, 1, P, 1).expand(-1, window_size, -1, C)

        static_mask = mask_expand
        static_feat = torch.masked_select(current_frames, static_mask).view(
            B, window_size, -1, C).mean(dim=1)
        static_pos = torch.masked_select(current_positions, mask.view(B, 1, P)).view(
            B, window_size, -1)[:, 0]
        if static_feat.shape[1] > max_unclustered:
            static_feat, static_pos = spatial_merge_tokens(
                static_feat, static_pos, max(1, int(static_feat.shape[1] * cluster_ratio)), k,
                dist_dtype, generator)
        static_features.append(static_feat)
        static_positions.append(static_pos)

        dynamic_mask = ~mask_expand
        dynamic_feat = torch.masked_select(current_frames, dynamic_mask).view(
            B, window_size, -1, C)
        dynamic_pos = torch.masked_select(current_positions, ~mask.view(B, 1, P)).view(
            B, window_size, -1)
        dynamic_window_list, dynamic_window_positions = [], []
        for i in range(window_size):
            dynamic_feat_window = dynamic_feat[:, i, :, :]
            dynamic_pos_window = dynamic_pos[:, i, :]
            if dynamic_feat_window.shape[1] > max_unclustered:
                dynamic_feat_window, dynamic_pos_window = spatial_merge_tokens(
                    dynamic_feat_window, dynamic_pos_window,
                    max(1, int(dynamic_feat_window.shape[1] * cluster_ratio)), k, dist_dtype,
                    generator)
            dynamic_window_list.append(dynamic_feat_window)
            dynamic_window_positions.append(dynamic_pos_window)
        dynamic_features.append(torch.cat(dynamic_window_list, dim=1))
        dynamic_positions.append(torch.cat(dynamic_window_positions, dim=1))
        start_idx += window_size

    final_features, final_positions = [], []
    for parts in zip(static_features, dynamic_features, static_positions, dynamic_positions):
        final_features += parts[:2]
        final_positions += parts[2:]
    return torch.cat(final_features, dim=1)[0], torch.cat(final_positions, dim=1)[0]
