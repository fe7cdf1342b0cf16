"""FastVID's pruning code (github LunarShen/FastVID), transliterated statement by statement: the
golden references of ``tests/test_fastvid.py`` and the originals' code paths of
``benchmarks/bench_fastvid.py``.

Two functions, one per model path of the repository, each re-written from the original's own
form (one video, its loops, its torch calls in its order), not from :mod:`visprune.methods`:

* :func:`fastvid_llava_onevision`: the block marked "FastVID" at the start of ``Qwen2Model.forward``
  in ``fastvid_llavaonevision/LLaVA-NeXT/llava/model/language_model/modeling_qwen2.py`` (DySeg,
  STPrune, the anchor distribution, "Parallel Density Score Computation", the single-frame and
  multi-frame merges);
* :func:`fastvid_qwen2_5_vl`: the block after ``get_rope_index`` in
  ``Qwen2_5_VLForConditionalGeneration.forward`` of
  ``fastvid_qwen25vl/lmms-eval/lmms_eval/models/qwenvlutils/modeling_qwen2_5_vl.py`` (segments,
  sub-segments by ``DySeg_ignore``, per-frame density peaks, per-anchor-frame merges).

Inputs are the video's part of the sequence only: ``video_hidden_states[T·P, D]`` (the original
slices it out of ``inputs_embeds``), the per-token saliency ``frame_attn_weights`` and the
per-frame ``frame_global_features[T, G]``.  They return ``(tokens, positions)``: the kept and
merged tokens in the original's output order (ascending position) and their positions in
``T·P`` (the original adds the video's start offset, 0 here).

What differs from the original, each marked "documented choice" below:

* ``noise``: the original adds ``torch.rand(...) * 1e-6`` to the density.  ``noise=None`` removes
  it and states the tie rule instead (a density tie goes to the lower index, which counts as
  denser; the centres are the best scores with ties to the lowest index), which is visprune's;
  ``noise=<torch.Generator>`` draws the original's noise from that generator.
* ``dpc_dtype``: the original computes the distances in float32 (``.float()``); float64 gives
  the float64 reference.
* ``knn``: the original's 4 nearest neighbours; with fewer candidates than that (where the
  original's ``topk`` fails) all of them.
* The original's crashes: ``DySeg_c - 1`` cuts asked of fewer frame pairs (``topk`` fails: all
  pairs are cut), more anchors than a frame has non-salient tokens (``topk`` fails: all of them),
  a Qwen segment without salient or anchor tokens (``torch.cat`` of an empty list: none).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _dpc_scores(tokens, knn, dpc_dtype, noise):
    """"Parallel Density Score Computation" on ``tokens[F, N, D]`` (one row per frame):
    ``density * dist`` per token, as the original computes it."""
    hidden_states_dim = tokens.shape[-1]
    dist_matrix = torch.cdist(tokens.to(dpc_dtype), tokens.to(dpc_dtype)) / (hidden_states_dim ** 0.5)
    dist_nearest, index_nearest = torch.topk(dist_matrix, k=min(knn, tokens.shape[1]), dim=-1,
                                             largest=False)              # documented choice: min
    density = (-(dist_nearest ** 2).mean(dim=-1)).exp()
    if noise is not None:
        density = density + torch.rand(density.shape, generator=noise,
                                       dtype=density.dtype) * 1e-6
        density_mask = density[:, None, :] > density[:, :, None]
    else:                                # documented choice: a tie goes to the lower index
        idx = torch.arange(density.shape[-1])
        density_mask = (density[:, None, :] > density[:, :, None]) | (
            (density[:, None, :] == density[:, :, None]) & (idx[None, None, :] < idx[None, :, None]))
    density_mask = density_mask.type(tokens.dtype)
    dist_max = dist_matrix.flatten(1).max(dim=-1)[0][:, None, None]
    dist_0, index_parent = (dist_matrix * density_mask + dist_max * (1 - density_mask)).min(dim=-1)
    return dist_0 * density


def _top_scores(score, k):
    """``torch.topk(score, k, dim=-1).indices``; documented choice: ties to the lowest index
    (a stable descending sort; the same as ``topk`` where no two scores are equal)."""
    return torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :k]


def _dyseg(frame_global_features, frame_num, DySeg_c, DySeg_tau):
    """DySeg: the normalised global features, the cosine of adjacent frames, the cuts."""
    frame_global_features = frame_global_features / frame_global_features.norm(dim=1, keepdim=True)
    similarity_matrix = (frame_global_features[:-1] * frame_global_features[1:]).sum(dim=1)
    cut_indices_topk = torch.topk(similarity_matrix, min(DySeg_c - 1, frame_num - 1),
                                  largest=False).indices                # documented choice: min
    cut_indices_cos = torch.nonzero(similarity_matrix < DySeg_tau, as_tuple=False).squeeze(1)
    cut_indices = torch.unique(torch.cat([cut_indices_topk, cut_indices_cos])).sort().values
    return frame_global_features, cut_indices


# --------------------------------------------------------------------------- LLaVA-OneVision
def fastvid_llava_onevision(video_hidden_states, frame_attn_weights, frame_global_features,
                            frame_num, fastvid_retention_ratio=0.10, fastvid_DySeg_c=8,
                            fastvid_DySeg_tau=0.9, fastvid_STPrune_d=0.4, fastvid_DTM_p=4,
                            fastvid_DTM_beta=0.6, knn=4, dpc_dtype=torch.float32, noise=None):
    """The LLaVA-OneVision path (``Qwen2Model.forward``'s FastVID block) on one video
    ``video_hidden_states[T·P, D]``, ``frame_attn_weights[T·P]``, ``frame_global_features[T, G]``."""
    video_token_len, hidden_states_dim = video_hidden_states.shape
    frame_token_len = video_token_len // frame_num
    batchframe_indices = torch.arange(frame_num).unsqueeze(1)
    alltoken_indices = torch.arange(video_token_len).view(frame_num, frame_token_len)

    video_hidden_states = video_hidden_states.reshape(frame_num, frame_token_len, -1)
    frame_attn_weights = frame_attn_weights.reshape(frame_num, frame_token_len)

    ############ DySeg ############
    _, cut_indices = _dyseg(frame_global_features, frame_num, fastvid_DySeg_c, fastvid_DySeg_tau)
    padded = F.pad(cut_indices, (1, 1), value=-1)
    padded[-1] = frame_num - 1
    segment_sizes = padded.diff().tolist()

    ############ STPrune ############
    final_tokens = []
    keep_indexs = ()
    frame_retain_num = int(frame_token_len * fastvid_retention_ratio)
    frame_salient_num = frame_retain_num - int(frame_retain_num * fastvid_STPrune_d)
    frm_context_num_list = torch.zeros(frame_num, dtype=torch.int)
    frame_context_num = frame_retain_num - frame_salient_num
    non_salient = frame_token_len - frame_salient_num

    ############ Compute Anchor Token Distribution ############
    offset = 0
    for seg_i_len in segment_sizes:
        seg_context_num = frame_context_num * seg_i_len
        temp_num = (seg_i_len + fastvid_DTM_p - 1) // fastvid_DTM_p
        cur_frm_context_num = seg_context_num // temp_num
        end = offset + seg_i_len
        seg_indices = torch.arange(seg_i_len - 1, -1, -1)
        mask = (seg_indices % fastvid_DTM_p == 0)
        frm_context_num_list[offset:end][mask] = cur_frm_context_num
        offset = end

    ############ ATS ############
    salient_indexes = torch.topk(frame_attn_weights, frame_salient_num, dim=1).indices
    batch_indices = batchframe_indices.expand(-1, frame_salient_num)
    salient_tokens = video_hidden_states[batch_indices, salient_indexes]
    salient_global_indexes = alltoken_indices[batch_indices, salient_indexes]
    final_tokens.append(salient_tokens.view(-1, hidden_states_dim))
    keep_indexs += (salient_global_indexes.view(-1),)

    # documented choice: without anchors (frame_context_num == 0) nothing is merged, where the
    # original's argmax over zero anchors fails
    if frame_context_num > 0:
        ############ Parallel Density Score Computation ############
        all_indices = torch.arange(frame_token_len).unsqueeze(0).expand(frame_num, -1)
        all_indices_mask = torch.ones_like(all_indices, dtype=torch.bool)
        all_indices_mask.scatter_(1, salient_indexes, False)
        filtered_indices = all_indices[all_indices_mask].view(frame_num, non_salient)
        batch_indices = batchframe_indices.expand(-1, non_salient)
        token_filtered = video_hidden_states[batch_indices, filtered_indices]
        alltoken_filtered_indices = alltoken_indices[batch_indices, filtered_indices]
        density_score = _dpc_scores(token_filtered, knn, dpc_dtype, noise)

        sampled_indexs = _top_scores(density_score, frame_context_num)

        ############ DTM for Single-Frame Segment ############
        batch_indices = batchframe_indices.expand(-1, frame_context_num)
        frm_context_tokens = token_filtered[batch_indices, sampled_indexs]
        frm_context_global_indexes = alltoken_filtered_indices[batch_indices, sampled_indexs]
        to_be_merge_tokens = token_filtered / token_filtered.norm(dim=-1, keepdim=True)
        merge_target_tokens = to_be_merge_tokens[batch_indices, sampled_indexs]
        similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
        assign_one_hot = torch.zeros(frame_num, non_salient, frame_context_num,
                                     dtype=token_filtered.dtype)
        assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
        avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=fastvid_DTM_beta)
        counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
        aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), token_filtered) / counts
        frm_context_tokens = avg_weights * frm_context_tokens + (1 - avg_weights) * aggregated_hidden

        context_for_frame_mask = (frm_context_num_list == frame_context_num)
        context_for_frame_tokens = frm_context_tokens[context_for_frame_mask]
        context_for_frame_global_indexes = frm_context_global_indexes[context_for_frame_mask]
        final_tokens.append(context_for_frame_tokens.view(-1, hidden_states_dim))
        keep_indexs += (context_for_frame_global_indexes.view(-1),)

        ############ DTM for Multi-Frame Segment ############
        idx_seg_start = 0
        for seg_i_len in segment_sizes:
            if seg_i_len > 1:
                cur_seg_context_num_list = frm_context_num_list[idx_seg_start:idx_seg_start + seg_i_len]
                # documented choice: at most the frame's non-salient tokens
                cur_seg_context_num = min(int(cur_seg_context_num_list[-1]), non_salient)
                cur_seg_target_mask = (cur_seg_context_num_list > frame_context_num)
                cur_seg_target_num = int(cur_seg_target_mask.sum())

                cur_seg_density_score = density_score[idx_seg_start:idx_seg_start + seg_i_len]
                cur_seg_density_score = cur_seg_density_score[cur_seg_target_mask]
                cur_seg_token_filtered = token_filtered[idx_seg_start:idx_seg_start + seg_i_len]
                cur_seg_token_target = cur_seg_token_filtered[cur_seg_target_mask]
                cur_seg_token_filtered = cur_seg_token_filtered.view(1, -1, hidden_states_dim).expand(
                    cur_seg_target_num, -1, -1)
                cur_seg_alltoken_indices = alltoken_filtered_indices[idx_seg_start:idx_seg_start + seg_i_len]
                cur_seg_alltoken_indices = cur_seg_alltoken_indices[cur_seg_target_mask]

                sampled_indexs = _top_scores(cur_seg_density_score, cur_seg_context_num)
                batch_indices = batchframe_indices[:cur_seg_target_num].expand(-1, cur_seg_context_num)
                cur_context_tokens = cur_seg_token_target[batch_indices, sampled_indexs]
                cur_context_global_indexes = cur_seg_alltoken_indices[batch_indices, sampled_indexs]

                to_be_merge_tokens = cur_seg_token_filtered / cur_seg_token_filtered.norm(dim=-1, keepdim=True)
                merge_target_tokens = cur_context_tokens / cur_context_tokens.norm(dim=-1, keepdim=True)
                similarity = torch.bmm(to_be_merge_tokens, merge_target_tokens.transpose(1, 2))
                assign_one_hot = torch.zeros(cur_seg_target_num, to_be_merge_tokens.shape[1],
                                             cur_seg_context_num, dtype=token_filtered.dtype)
                assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
                avg_weights = (1 / (assign_one_hot.sum(dim=1).unsqueeze(-1) + 1)).clamp(min=fastvid_DTM_beta)
                counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
                aggregated_hidden = torch.bmm(assign_one_hot.transpose(1, 2), cur_seg_token_filtered) / counts
                cur_context_tokens = avg_weights * cur_context_tokens + (1 - avg_weights) * aggregated_hidden

                final_tokens.append(cur_context_tokens.view(-1, hidden_states_dim))
                keep_indexs += (cur_context_global_indexes.view(-1),)
            idx_seg_start += seg_i_len

    hidden_states = torch.cat(final_tokens, dim=0)
    keep_indexs = torch.cat(keep_indexs, dim=0)
    sorted_indexs = torch.argsort(keep_indexs)
    return hidden_states[sorted_indexs], keep_indexs[sorted_indexs]


# --------------------------------------------------------------------------- Qwen2.5-VL
def _sizes_from_cuts(cut_indices, length):
    """The original's segment sizes from sorted cut positions (a cut after frame ``i``)."""
    sizes = [cut_indices[0] + 1]
    for i in range(1, len(cut_indices)):
        sizes.append(cut_indices[i] - cut_indices[i - 1])
    sizes.append(length - cut_indices[-1] - 1)
    return sizes


def fastvid_qwen2_5_vl(video_hidden_states, frame_attn_weights, frame_global_features, frame_num,
                       fastvid_retention_ratio=0.27, fastvid_DySeg_c=8, fastvid_DySeg_tau=0.84,
                       fastvid_DySeg_ignore=0.95, fastvid_STPrune_d=0.4, fastvid_DTM_p=4,
                       fastvid_DTM_beta=0.6, knn=4, dpc_dtype=torch.float32, noise=None):
    """The Qwen2.5-VL path (``Qwen2_5_VLForConditionalGeneration.forward``) on one video
    ``video_hidden_states[T·P, D]``, ``frame_attn_weights[T, P]`` and
    ``frame_global_features[T, G]`` (the original's: the mean of each frame's merged tokens)."""
    frm_len = video_hidden_states.shape[0] // frame_num
    video_hidden_states = video_hidden_states.reshape(frame_num, frm_len, -1)
    frame_attn_weights = frame_attn_weights.reshape(frame_num, frm_len)

    frame_global_features, cut_indices = _dyseg(frame_global_features, frame_num,
                                                fastvid_DySeg_c, fastvid_DySeg_tau)
    # documented choice: no cut (one frame) is one segment, where the original indexes cut 0
    segment_sizes = _sizes_from_cuts(cut_indices.tolist(), frame_num) if cut_indices.numel() \
        else [frame_num]

    segments_hidden_states = torch.split(video_hidden_states, segment_sizes)
    segments_attn_weights = torch.split(frame_attn_weights, segment_sizes)
    segments_global_features = torch.split(frame_global_features, segment_sizes)
    segment_num = len(segment_sizes)

    vision_tokens = []
    keep_indexs = ()
    frame_retain_num = int(frm_len * fastvid_retention_ratio)
    seg_index_start = 0
    for seg_i in range(segment_num):
        cur_hidden_states = segments_hidden_states[seg_i]
        cur_attn_weights = segments_attn_weights[seg_i]
        cur_global_features = segments_global_features[seg_i]
        cur_seg_len, frm_len = cur_attn_weights.shape

        seg_retain_num = frame_retain_num * cur_seg_len
        seg_context_num = max(int(seg_retain_num * fastvid_STPrune_d), 1)
        seg_salient_num = seg_retain_num - seg_context_num

        if cur_seg_len == 1:
            frm_salient_num = [seg_salient_num]
            frm_context_num = [seg_context_num]
        else:
            cur_global_similarity_matrix = (cur_global_features[:-1] * cur_global_features[1:]).sum(dim=1)
            cur_cut_indices = torch.nonzero(cur_global_similarity_matrix < fastvid_DySeg_ignore).squeeze(1)
            cur_cut_indices = cur_cut_indices.sort().values
            if cur_cut_indices.shape[0] > 0:
                cur_segment_sizes = _sizes_from_cuts(cur_cut_indices.tolist(), cur_seg_len)
            else:
                cur_segment_sizes = [cur_seg_len]
            valid_seg_len = len(cur_segment_sizes)

            chunk_size = seg_salient_num // valid_seg_len
            remainder = seg_salient_num % valid_seg_len
            frm_salient_num = [chunk_size + (1 if i < remainder else 0) for i in range(valid_seg_len)]

            temp_num = (valid_seg_len + fastvid_DTM_p - 1) // fastvid_DTM_p
            chunk_size = seg_context_num // temp_num
            remainder = seg_context_num % temp_num
            temp_context_num = [chunk_size + (1 if i < remainder else 0) for i in range(temp_num)]

            tmp_ctx_idx = 0
            frm_context_num = []
            for tmp_i in range(valid_seg_len):
                if tmp_i % fastvid_DTM_p == 0:
                    frm_context_num.append(min(temp_context_num[tmp_ctx_idx], frm_len // 2))
                    if temp_context_num[tmp_ctx_idx] + frm_context_num[-1] > frm_len:
                        temp_context_num[tmp_ctx_idx] = frm_len - frm_context_num[-1]
                    tmp_ctx_idx += 1
                else:
                    frm_context_num.append(0)
            frm_context_num.reverse()

            valid_frm_salient_num = []
            valid_frm_context_num = []
            for i in range(valid_seg_len):
                valid_frm_salient_num.extend([0] * (cur_segment_sizes[i] - 1))
                valid_frm_context_num.extend([0] * (cur_segment_sizes[i] - 1))
                if frm_context_num[i] == 0:
                    valid_frm_salient_num.append(min(frm_salient_num[i], frm_len))
                    valid_frm_context_num.append(0)
                elif frm_context_num[i] > 0:
                    valid_frm_context_num.append(min(frm_context_num[i], frm_len // 2))
                    valid_frm_salient_num.append(min(frm_salient_num[i], frm_len - valid_frm_context_num[-1]))
                else:
                    valid_frm_salient_num.append(frm_len - int(frm_len * fastvid_STPrune_d))
                    valid_frm_context_num.append(int(frm_len * fastvid_STPrune_d))
            frm_salient_num = valid_frm_salient_num
            frm_context_num = valid_frm_context_num

        cur_salient_indexs = []
        cur_context_indexs = []
        for frame_i in range(cur_seg_len):
            if frm_salient_num[frame_i] > 0:
                frm_top_indexes = torch.topk(cur_attn_weights[frame_i], frm_salient_num[frame_i]).indices
            else:
                frm_top_indexes = None
            if frm_context_num[frame_i] > 0:
                frm_all_indexs = torch.arange(frm_len)
                if frm_top_indexes is not None:
                    tmp_mask = torch.isin(frm_all_indexs, frm_top_indexes)
                    remaining_indexs = frm_all_indexs[~tmp_mask]
                else:
                    remaining_indexs = frm_all_indexs
                tmp_frm_hidden_states = cur_hidden_states[frame_i]
                tmp_frm_hidden_states = tmp_frm_hidden_states[remaining_indexs].unsqueeze(0)
                score = _dpc_scores(tmp_frm_hidden_states, knn, dpc_dtype, noise)
                sampled_indexs = _top_scores(score, frm_context_num[frame_i])
                sampled_indexs = sampled_indexs[0].sort().values
                frm_context_indexes = remaining_indexs[sampled_indexs]
            else:
                frm_context_indexes = None
            if frm_top_indexes is not None:
                cur_salient_indexs.append(frm_top_indexes + frame_i * frm_len)
            if frm_context_indexes is not None:
                cur_context_indexs.append(frm_context_indexes + frame_i * frm_len)

        cur_tome_hidden_states = cur_hidden_states.reshape(cur_seg_len * frm_len, -1)
        # documented choice: a segment without salient (or anchor) tokens has none
        cur_salient_indexs = torch.cat(cur_salient_indexs) if cur_salient_indexs \
            else torch.zeros(0, dtype=torch.long)
        cur_salient_hidden_states = cur_tome_hidden_states[cur_salient_indexs]

        cur_all_indexs = torch.arange(cur_seg_len * frm_len)
        cur_tome_tokens = cur_tome_hidden_states / cur_tome_hidden_states.norm(dim=-1, keepdim=True)
        cur_context_hidden_states = []
        for tmp_context_indexs in cur_context_indexs:
            tmp_retain_index = torch.cat([cur_salient_indexs, tmp_context_indexs])
            tmp_mask = torch.isin(cur_all_indexs, tmp_retain_index)
            tmp_merge_indexs = cur_all_indexs[~tmp_mask]
            tmp_target_tokens = cur_tome_tokens[tmp_context_indexs]
            tmp_to_merge_tokens = cur_tome_tokens[tmp_merge_indexs]
            similarity = torch.mm(tmp_to_merge_tokens, tmp_target_tokens.T)
            assign_one_hot = torch.zeros(tmp_to_merge_tokens.shape[0], tmp_context_indexs.shape[0],
                                         dtype=cur_hidden_states.dtype)
            assign_one_hot.scatter_(1, similarity.argmax(dim=1).unsqueeze(-1), 1)
            avg_weights = (1 / (assign_one_hot.sum(dim=0).unsqueeze(-1) + 1)).clamp(min=fastvid_DTM_beta)
            counts = assign_one_hot.sum(dim=0).clamp(min=1).unsqueeze(-1)
            hidden_to_merge = cur_tome_hidden_states[tmp_merge_indexs]
            aggregated_hidden = torch.mm(assign_one_hot.T, hidden_to_merge) / counts
            target_hidden = cur_tome_hidden_states[tmp_context_indexs]
            target_hidden = avg_weights * target_hidden + (1 - avg_weights) * aggregated_hidden
            cur_context_hidden_states.append(target_hidden)

        cur_context_indexs = torch.cat(cur_context_indexs) if cur_context_indexs \
            else torch.zeros(0, dtype=torch.long)
        cur_context_hidden_states = torch.cat(cur_context_hidden_states, dim=0) \
            if cur_context_hidden_states else cur_tome_hidden_states[:0]

        cur_index_combined = torch.cat([cur_salient_indexs, cur_context_indexs])
        cur_hidden_combined = torch.cat([cur_salient_hidden_states, cur_context_hidden_states], dim=0)
        sorted_indexs = torch.argsort(cur_index_combined)
        vision_tokens.append(cur_hidden_combined[sorted_indexs])
        keep_indexs += (cur_index_combined[sorted_indexs] + seg_index_start,)
        seg_index_start = seg_index_start + cur_seg_len * frm_len

    vision_tokens = torch.cat(vision_tokens, dim=0)
    keep_indexs = torch.cat(keep_indexs)
    return vision_tokens, keep_indexs
