"""PruneVid (Huang et al., "PruneVid: Visual Token Pruning for Efficient Video Large Language
Models", ACL 2025 Findings; github Visual-AI/PruneVid), the stage before the LLM
(``merge_frames_dynamic`` in ``models/pllava/modeling_pllava.py``), batched.

The original runs on PLLaVA's pooled projector features of one video, ``[T·P, D]`` (16 frames of
12×12 tokens in its evaluation), and:

1. **Temporal segments.**  DPC-kNN (``cluster_dpc_knn``: ``cdist / sqrt(D)``, ``k = 7`` nearest,
   density ``exp(-mean d²)``, distance to the nearest denser token, score ``ρ·δ``, the top
   ``int(T·temporal_segment_ratio)`` are centres, each frame to its nearest) clusters the
   frames' mean tokens.  ``refine_clusters`` then keeps, in each cluster, only its longest runs
   of consecutive frames (every run of that length; none when its longest is one frame); each
   other stretch of frames takes the label of its longer neighbouring run (the left one on a
   tie, as already relabelled; label 0 when it is the whole video).  The runs of equal labels
   are the windows (every window has at least two frames unless the video has one).
2. **Static tokens.**  In a window of ``W`` frames, position ``p`` is static when the mean cosine
   of its tokens over the ``W·(W-1)`` ordered pairs of different frames exceeds ``tau``; a
   static position becomes one token, its mean over the window's frames.
3. **Spatial merge.**  The window's static tokens (positions ascending), then each of its frames'
   other tokens (positions ascending), are each a group; a group of more than 14 tokens is
   clustered by the same DPC-kNN into ``int(n·cluster_ratio)`` clusters and replaced by the
   cluster means (the centre is a member of its own cluster; clusters in descending score
   order); a smaller group is kept as it is.
4. Output: window by window, its static group's tokens, then its frames' groups in frame order.

Here: ``D`` is the input's; ``tau``, ``temporal_ratio`` (``temporal_segment_ratio``),
``cluster_ratio``, ``k`` and ``max_unclustered`` (the 14) are arguments with the original's
values (the configuration of its README and evaluation script: 0.8, 0.25, 0.5, 7, 14); every
video of a batch is its own run of the above, each row exactly that video's result alone.

**Positions** (``indices``).  Every output token stands for a position of the flattened
``T·P`` (frame-major), chosen so that the model can give it M-RoPE / 1-D positions as for a kept
token: a token kept as it is, its own; a cluster mean, its centre's (the density peak, itself a
member); a static token (averaged over a window), its position in the window's **first** frame;
a static cluster, its centre's position in the first frame.  The output comes before the
window's frames' tokens, so positions are ascending by frame through the output (not within a
frame: a cluster's order is its score order).  The positions of a row are distinct.

**Parity.**  The windows, the static positions, the centres, their order and the groups' sizes are
the original's (up to the ties below), and each merged token is its cluster's mean.  The
arithmetic is fp32 whatever the tokens' dtype (the ops' dtype; the tokens are read once into
it, a group of windows at a time): the distances of DPC-kNN by
:func:`visprune.ops.dpc_knn_varlen` (the exact rule is in its docstring), the cluster means by
:func:`visprune.ops.cluster_merge`, a window's mean cosine as
``(||Σ_w u_w||² - W) / (W(W-1))`` with ``u = F.normalize(x)`` (the original's sum of the pairwise
cosines minus its ``W`` self-terms, in one pass); the original rounds in its features' dtype and
computes the distances with ``cdist``'s float32 matrix-product form.  Tested against a
statement-by-statement transliteration of the original in float64 (``tests/prunevid_originals.py``).

**Deviations.**  Deterministic: the original adds ``1e-6·rand`` to the density to break its ties;
here a density tie goes to the lower index (denser) and a score tie to the lower index
(:func:`visprune.ops.dpc_knn`).  Where no two densities or scores of a clustering are within
the noise, the original gives that result for every draw (tested with the noise on); where
some are, the original itself is random.  Scores are fp32: two clusters of a group whose scores
differ by less than that rounding may come in the other order than exact arithmetic gives (the
same tokens at the same positions; one such pair in the 32 × 196 × 3584 benchmark video).
Where the original crashes or divides by zero: at least one temporal and one spatial cluster
(``int(·)`` of a small count gives 0, and its ``topk(0)`` fails); ``k`` above a group's size
uses all of it (its ``topk`` fails); a one-frame window (only a one-frame video has one) has no
static position (the original divides by ``W·(W-1) = 0``, and its NaN / ±inf make a position
static by the rounding of a token's cosine with itself).  Batches and ragged videos
(``frames=``); the original is batch 1 with ``T`` fixed by its configuration.

**The in-LLM stage is not provided.**  The original also prunes inside the LLM
(``models/pllava/llama.py``): at layer ``selected_layer = 10`` it takes the eager attention of the
text tokens to the video tokens (max over heads and text queries), keeps per group (the static
and dynamic sizes this stage returns) the top ``alpha = 0.4`` video tokens, and prunes the hidden
states and the KV cache of the layers before.  That needs visprune's in-LLM engine
(:mod:`visprune.integrations.transformers.inllm`, :func:`visprune.ops.received_attention` with
``heads="max"`` over the text rows) to keep a per-group budget and to cut the earlier layers' KV
cache; it is not part of this module.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import checks, ops
from ..backends import checked_name
from ..common import PruneResult

__all__ = ["prunevid"]

TAU = 0.8                 # the original's tau (README, scripts/eval.sh)
TEMPORAL_RATIO = 0.25     # temporal_segment_ratio
CLUSTER_RATIO = 0.5       # cluster_ratio
K = 7                     # cluster_dpc_knn's k, hard-coded in merge_frames_dynamic
MAX_UNCLUSTERED = 14      # a group of at most this many tokens is not clustered
# the windows are worked through in groups of about this many bytes of frames (fp32): the
# temporaries (the frames, their unit vectors, the groups' tokens) stay a few windows' size
CHUNK_BYTES = 1 << 24
COMPUTE = torch.float32   # the ops' dtype: every input dtype is computed in it


def _windows(labels: List[int]) -> List[int]:
    """The window lengths of one video from its frames' cluster labels: ``refine_clusters``
    followed by ``segment_lengths``.

    A cluster keeps its longest runs of consecutive frames (all of that length; none when the
    longest is one frame).  The frames left out are relabelled stretch by stretch, left to right,
    with the label of the longer neighbouring run, counted on the labels as relabelled so far
    (the left one on equal lengths, the existing one when only one exists, 0 when none)."""
    T = len(labels)
    runs: List[List[int]] = []                       # [label, length]
    for lab in labels:
        if runs and runs[-1][0] == lab:
            runs[-1][1] += 1
        else:
            runs.append([lab, 1])
    longest = {}
    for lab, n in runs:
        longest[lab] = max(longest.get(lab, 0), n)
    out: List[Optional[int]] = []
    for lab, n in runs:
        out += [lab if n > 1 and n == longest[lab] else None] * n

    def run_length(t: int, step: int) -> int:
        n, lab = 0, out[t]
        while 0 <= t < T and out[t] == lab:
            n, t = n + 1, t + step
        return n

    t = 0
    while t < T:
        if out[t] is not None:
            t += 1
            continue
        end = t
        while end < T and out[end] is None:
            end += 1
        left = run_length(t - 1, -1) if t > 0 else 0
        right = run_length(end, 1) if end < T else 0
        if left == 0 and right == 0:
            new = 0
        elif left >= right and left > 0:
            new = out[t - 1]
        else:
            new = out[end]
        out[t:end] = [new] * (end - t)
        t = end
    lengths = []
    for t in range(T):
        if t and out[t] == out[t - 1]:
            lengths[-1] += 1
        else:
            lengths.append(1)
    return lengths


def _exclusive(n: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sum of ``n[U]`` (the offsets of consecutive runs of those lengths)."""
    return torch.cumsum(n, 0) - n


def _group(video: torch.Tensor, frame_ids: torch.Tensor, wins: List[Tuple[int, int]],
           tau: float, cluster_ratio: float, k: int, max_unclustered: int,
           backend: str) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Steps 2–4 on consecutive windows ``wins`` (``(first frame t0, W)`` each, ``frame_ids``
    their frames' rows of ``video[B·T, P, D]``, window by window, on the CPU): ``(tokens[M, D]
    in fp32, positions[M], tokens per window)``.  Nothing is written into ``video``'s rows."""
    P, D = video.shape[1:]
    dev = video.device
    G = len(wins)
    lo = int(frame_ids[0])
    if int(frame_ids[-1]) - lo == len(frame_ids) - 1:             # one video's run of frames
        x = video[lo:lo + len(frame_ids)].to(COMPUTE)             # [F, P, D]: fp32, a view
    else:
        x = video.index_select(0, frame_ids.to(dev)).to(COMPUTE)
    sizes = torch.tensor([w for _, w in wins], device=dev)
    first = _exclusive(sizes)                                    # each window's first row of x

    # each window's sums over its frames (plain reductions: no atomics, the same on every run)
    unit_sum = x.new_empty(G, P, D)
    token_sum = x.new_empty(G, P, D)
    start = 0
    for g, (_, W) in enumerate(wins):
        frames = x[start:start + W]
        torch.sum(F.normalize(frames, p=2, dim=-1), 0, out=unit_sum[g])
        torch.sum(frames, 0, out=token_sum[g])
        start += W
    pairs = (sizes * (sizes - 1)).to(COMPUTE)
    sim = (unit_sum.square().sum(-1) - sizes[:, None].to(COMPUTE)) / pairs.clamp(min=1)[:, None]
    del unit_sum
    static = (sim > tau) & (sizes > 1)[:, None]                  # [G, P]

    # the groups (units), window by window: the static tokens, then each frame's others
    win_of_frame = torch.repeat_interleave(torch.arange(G, device=dev), sizes)
    n_static = static.sum(1)
    unit_static = first + torch.arange(G, device=dev)            # the static unit of window g
    unit_frame = unit_static[win_of_frame] + 1 + (torch.arange(x.shape[0], device=dev)
                                                  - first[win_of_frame])
    U = G + x.shape[0]
    unit_len = torch.empty(U, dtype=torch.long, device=dev)
    unit_len[unit_static] = n_static
    unit_len[unit_frame] = P - n_static[win_of_frame]
    unit_off = _exclusive(unit_len)

    dynamic = ~static[win_of_frame]                              # [F, P]
    slot = torch.arange(P, device=dev)
    t0 = torch.tensor([t for t, _ in wins], device=dev)
    frame_t = t0[win_of_frame] + (torch.arange(x.shape[0], device=dev) - first[win_of_frame])
    dest_s = (unit_off[unit_static][:, None] + static.cumsum(1) - 1)[static]
    dest_d = (unit_off[unit_frame][:, None] + dynamic.cumsum(1) - 1)[dynamic]
    lens = unit_len.tolist()                                     # the sizes as host ints
    total = sum(lens)
    tokens = x.new_empty(total, D)
    tokens[dest_s] = token_sum[static] / sizes.to(COMPUTE)[:, None].expand(G, P)[static][:, None]
    tokens[dest_d] = x[dynamic]
    del token_sum, x
    pos = torch.empty(total, dtype=torch.long, device=dev)
    pos[dest_s] = (t0[:, None] * P + slot)[static]
    pos[dest_d] = (frame_t[:, None] * P + slot)[dynamic]

    # DPC-kNN on the groups larger than max_unclustered (the others: no centre), then each
    # cluster's mean, centre included
    centers = [max(1, int(n * cluster_ratio)) if n > max_unclustered else 0 for n in lens]
    cu = torch.zeros(U + 1, dtype=torch.long, device=dev)
    cu[1:] = torch.cumsum(unit_len, 0)
    r = ops.dpc_knn_varlen(tokens, cu, centers, k=k, backend=backend, validate=False)
    n_centers = torch.tensor(centers, device=dev)
    unit_of = torch.repeat_interleave(torch.arange(U, device=dev), unit_len, output_size=total)
    clustered = (n_centers > 0)[unit_of]
    slot_off = _exclusive(n_centers)
    assign = torch.where(clustered, slot_off[unit_of] + r.assign, -1)
    merged = ops.cluster_merge(tokens[None], r.centers[None], assign[None], backend=backend,
                               validate=False).tokens[0]

    # each unit's output: its clusters in score order, or its tokens as they are
    out_len = torch.where(n_centers > 0, n_centers, unit_len)
    out_off = _exclusive(out_len)
    out_lens = [c if c else n for c, n in zip(centers, lens)]
    M = sum(out_lens)
    out = tokens.new_empty(M, D)
    out_pos = torch.empty(M, dtype=torch.long, device=dev)
    c_unit = unit_of[r.centers]
    c_dest = out_off[c_unit] + torch.arange(r.centers.shape[0], device=dev) - slot_off[c_unit]
    out[c_dest] = merged
    out_pos[c_dest] = pos[r.centers]
    keep = (~clustered).nonzero().squeeze(1)
    k_unit = unit_of[keep]
    k_dest = out_off[k_unit] + keep - unit_off[k_unit]
    out[k_dest] = tokens[keep]
    out_pos[k_dest] = pos[keep]
    per_window, u = [], 0
    for _, W in wins:                                            # a static unit and W frames
        per_window.append(sum(out_lens[u:u + 1 + W]))
        u += 1 + W
    return out, out_pos, per_window


def prunevid(video: torch.Tensor, *, tau: float = TAU, temporal_ratio: float = TEMPORAL_RATIO,
             cluster_ratio: float = CLUSTER_RATIO, k: int = K,
             max_unclustered: int = MAX_UNCLUSTERED, frames=None,
             backend: Optional[str] = None) -> PruneResult:
    """PruneVid's stage before the LLM: ``PruneResult(tokens[B, L, D], indices[B, L],
    lengths[B])``.

    Args:
        video: ``[B, T, P, D]`` the visual tokens of ``B`` videos, ``T`` frames of ``P`` tokens
            each in raster order (PLLaVA: the pooled projector features, ``P = 144``); fp32,
            fp16, bf16 or float64 (computed in fp32, the ops' dtype; tokens returned in
            ``video``'s dtype).
        tau: a position is static in a window when its mean pairwise cosine exceeds it; in
            ``[-1, 1]``.
        temporal_ratio: ``int(T·temporal_ratio)`` (at least 1) frame clusters per video; in
            ``[0, 1]`` (the original's ``temporal_segment_ratio``).
        cluster_ratio: a clustered group of ``n`` tokens becomes ``int(n·cluster_ratio)`` (at
            least 1); in ``[0, 1]``.
        k: neighbours in DPC-kNN's density, ``>= 1`` (a group of fewer uses all of it), for
            both clusterings (the original: its ``k`` argument, 7, for the frames, and a
            hard-coded 7 for the groups).
        max_unclustered: groups of at most this many tokens are kept as they are, ``>= 0``.
        frames: ``None`` (every video has ``T`` frames) or each video's frame count (a sequence
            or 1-D integer tensor of ``B`` ints in ``[1, T]``): the frames past it are padding.
        backend: the backend of the ops (:func:`visprune.ops.dpc_knn_varlen`,
            :func:`visprune.ops.cluster_merge`); ``None``: the device's default.

    ``indices`` are positions in the flattened ``T·P`` in the original's output order (see the
    module docstring for which position a merged token has); row ``b`` holds ``lengths[b]``
    tokens, -1 and zero tokens past it.
    """
    counts = checks.video("video", video, frames)
    tau = checks.bounded("tau", tau, -1.0, 1.0)
    temporal_ratio = checks.bounded("temporal_ratio", temporal_ratio, 0.0, 1.0)
    cluster_ratio = checks.bounded("cluster_ratio", cluster_ratio, 0.0, 1.0)
    k = checks.count("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1 (neighbours in the density), got {k}")
    max_unclustered = checks.count("max_unclustered", max_unclustered)
    name = checked_name(backend, video.device)
    B, T, P, D = video.shape
    dev = video.device
    if B == 0:
        return PruneResult(video.new_zeros(0, 0, D), torch.zeros(0, 0, dtype=torch.long,
                                                                  device=dev),
                           torch.zeros(0, dtype=torch.long, device=dev))

    # 1. each video's frame means clustered; the windows from the labels
    real = torch.arange(T, device=dev) < torch.tensor(counts, device=dev)[:, None]
    means = video.mean(dim=2, dtype=COMPUTE)[real]               # [ΣT_b, D]
    cu = torch.tensor([0] + counts, device=dev).cumsum(0)
    r = ops.dpc_knn_varlen(means, cu, [max(1, int(t * temporal_ratio)) for t in counts], k=k,
                           backend=name, validate=False)
    labels = r.assign.tolist()                                   # every video's, one read
    wins, first = [], 0                                          # (b, t0, W), in output order
    for b, t in enumerate(counts):
        t0 = 0
        for W in _windows(labels[first:first + t]):
            wins.append((b, t0, W))
            t0 += W
        first += t

    # 2-4. the windows in groups of about CHUNK_BYTES of frames
    flat = video.reshape(B * T, P, D)
    per_frame = P * D * torch.finfo(COMPUTE).bits // 8
    pieces, lengths = [], [0] * B              # pieces: (row, offset, tokens, positions)
    i = 0
    while i < len(wins):
        j, nbytes = i, 0
        while j < len(wins) and (j == i or nbytes + wins[j][2] * per_frame <= CHUNK_BYTES):
            nbytes += wins[j][2] * per_frame
            j += 1
        group = wins[i:j]
        frame_ids = torch.tensor([b * T + t0 + w for b, t0, W in group for w in range(W)])
        out, pos, per_window = _group(flat, frame_ids, [(t0, W) for _, t0, W in group], tau,
                                      cluster_ratio, k, max_unclustered, name)
        at = 0
        for (b, _, _), n in zip(group, per_window):             # each window's rows of out
            pieces.append((b, lengths[b], out[at:at + n], pos[at:at + n]))
            lengths[b] += n
            at += n
        i = j
    del out, pos

    # each piece copied into its row, then let go (the groups' outputs and the result are the
    # only copies alive at once)
    L = max(lengths)
    tokens = video.new_empty(B, L, D)
    for b, n in enumerate(lengths):
        tokens[b, n:] = 0
    indices = torch.full((B, L), -1, dtype=torch.long, device=dev)
    while pieces:
        b, at, part, pos = pieces.pop(0)
        tokens[b, at:at + part.shape[0]] = part
        indices[b, at:at + part.shape[0]] = pos
    return PruneResult(tokens, indices, torch.tensor(lengths, dtype=torch.long, device=dev))
