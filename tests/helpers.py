"""Shared test helpers: seeded data and float64 transliterations of the formulas in DESIGN.md.

The transliterations are written independently of :mod:`visprune.reference`: they follow the
contract's definitions literally (direct differences instead of the ``|a|² + |b|² - 2ab``
expansion, the min / sum over the selected set recomputed at every greedy step, Python sorting
for the stage-1 top-k), in float64, so they are an independent check of the reference.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch

EPS = 1e-12  # the cosine's norm floor (``F.normalize``'s eps), part of the contract


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded standard-normal CPU tensor, rounded to ``dtype``."""
    return torch.randn(*shape, generator=gen(seed)).to(dtype)


def random_mask(B: int, N: int, seed: int, p: float = 0.6, min_true: int = 1) -> torch.Tensor:
    """Seeded ``bool[B, N]`` with about ``p·N`` True per row and at least ``min_true``."""
    g = gen(seed)
    mask = torch.rand(B, N, generator=g) < p
    for b in range(B):
        have = int(mask[b].sum())
        if have < min_true:
            off = torch.randperm(N, generator=g)
            mask[b, off[: min_true]] = True
    return mask


def equal_count_mask(B: int, N: int, K: int, seed: int) -> torch.Tensor:
    """Seeded ``bool[B, N]`` with exactly ``K`` True per row."""
    g = gen(seed)
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, torch.randperm(N, generator=g)[:K]] = True
    return mask


def with_duplicates(x: torch.Tensor, n_distinct: int, seed: int) -> torch.Tensor:
    """``x[B, N, D]`` rewritten so that every row holds only ``n_distinct`` distinct tokens, each
    appearing at least once, the copies scattered at random positions (exact bitwise copies)."""
    B, N, D = x.shape
    g = gen(seed)
    out = torch.empty_like(x)
    for b in range(B):
        src = torch.cat([torch.arange(n_distinct),
                         torch.randint(0, n_distinct, (N - n_distinct,), generator=g)])
        src = src[torch.randperm(N, generator=g)]
        out[b] = x[b, src]
    return out


def distinct_groups(x_row: torch.Tensor) -> List[int]:
    """For each token of ``x_row[N, D]``, the id of its group of bitwise-identical tokens
    (the lowest index of the group)."""
    N = x_row.shape[0]
    group = list(range(N))
    for i in range(N):
        for j in range(i):
            if group[j] == j and torch.equal(x_row[i], x_row[j]):
                group[i] = j
                break
    return group


# --------------------------------------------------------------------------- mi_scores
def mi_scores_literal(visual: torch.Tensor, text: torch.Tensor,
                      text_mask: Optional[torch.Tensor] = None, metric: str = "l2") -> torch.Tensor:
    """float64 ``[B, N]``: ``-(1/M_b) Σ_j ||v_i - t_j||²`` or ``(1/M_b) Σ_j cos(v_i, t_j)`` over the
    valid text tokens ``j`` of each row, by explicit differences / products over ``N × M``."""
    v, t = visual.double(), text.double()
    B, N, _ = v.shape
    out = torch.empty(B, N, dtype=torch.float64)
    for b in range(B):
        valid = (list(range(t.shape[1])) if text_mask is None
                 else text_mask[b].nonzero().flatten().tolist())
        tb = t[b, valid]                                                 # [M_b, D]
        if metric == "l2":
            per_pair = ((v[b][:, None, :] - tb[None, :, :]) ** 2).sum(-1)      # [N, M_b]
            out[b] = -per_pair.mean(-1)
        else:
            dots = (v[b][:, None, :] * tb[None, :, :]).sum(-1)
            nv = v[b].norm(dim=-1).clamp_min(EPS)[:, None]
            nt = tb.norm(dim=-1).clamp_min(EPS)[None, :]
            out[b] = (dots / (nv * nt)).mean(-1)
    return out


# --------------------------------------------------------------------------- greedy_select
def distance_matrix_literal(x_row: torch.Tensor, metric: str) -> torch.Tensor:
    """float64 ``[N, N]``: ``1 - cos(x_i, x_j)`` or ``||x_i - x_j||²``, negatives (rounding) → 0."""
    x = x_row.double()
    if metric == "l2":
        d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    else:
        n = x.norm(dim=-1).clamp_min(EPS)
        d = 1.0 - (x[:, None, :] * x[None, :, :]).sum(-1) / (n[:, None] * n[None, :])
    return d.clamp_min(0.0)


def start_values_literal(dist: torch.Tensor, cands: List[int], objective: str) -> List[float]:
    """The ``start="auto"`` key of each candidate: maxmin ``min_{j≠i} d(i, j)`` (+inf when ``i``
    is the only candidate), maxsum ``Σ_j d(i, j)``, ``j`` over the candidates."""
    vals = []
    for i in cands:
        if objective == "maxmin":
            others = [dist[i, j].item() for j in cands if j != i]
            vals.append(min(others) if others else math.inf)
        else:
            vals.append(sum(dist[i, j].item() for j in cands))
    return vals


def step_values_literal(dist: torch.Tensor, cands: List[int], selected: List[int],
                        objective: str) -> List[float]:
    """``min_{s∈S} d(i, s)`` or ``Σ_{s∈S} d(i, s)`` for each remaining candidate ``i``,
    recomputed from scratch over the selected set ``S``."""
    vals = []
    for i in cands:
        ds = [dist[i, s].item() for s in selected]
        vals.append(min(ds) if objective == "maxmin" else sum(ds))
    return vals


def greedy_literal(x: torch.Tensor, k: int, objective: str = "maxmin", metric: str = "cosine",
                   mask: Optional[torch.Tensor] = None,
                   start: Union[str, int] = "auto") -> torch.Tensor:
    """Brute-force float64 greedy selection, ``int64[B, k]``, ties to the lowest index."""
    B, N, _ = x.shape
    out = torch.empty(B, k, dtype=torch.long)
    for b in range(B):
        dist = distance_matrix_literal(x[b], metric)
        cands = [i for i in range(N) if mask is None or bool(mask[b, i])]
        selected: List[int] = []
        for t in range(k):
            if t == 0 and isinstance(start, int):
                pick = start
            else:
                vals = (start_values_literal(dist, cands, objective) if t == 0
                        else step_values_literal(dist, cands, selected, objective))
                best = max(vals)
                pick = cands[vals.index(best)]          # list.index: the first (lowest) index
            selected.append(pick)
            cands.remove(pick)
        out[b] = torch.tensor(selected, dtype=torch.long)
    return out


def assert_greedy_matches_literal(x: torch.Tensor, out: torch.Tensor, objective: str, metric: str,
                                  mask: Optional[torch.Tensor] = None,
                                  start: Union[str, int] = "auto", rel_tol: float = 1e-5) -> None:
    """Check ``out`` step by step against the float64 definition, robust to fp32 near-ties.

    Following ``out``'s own trajectory, every pick must be a remaining candidate whose float64
    objective value is within ``rel_tol`` (relative to the largest value) of the best one.  When
    the best candidate is ahead of every other by more than that margin — nearly always on random
    data — this forces the exact choice."""
    B, N, _ = x.shape
    k = out.shape[1]
    for b in range(B):
        dist = distance_matrix_literal(x[b], metric)
        cands = [i for i in range(N) if mask is None or bool(mask[b, i])]
        selected: List[int] = []
        for t in range(k):
            pick = int(out[b, t])
            assert pick in cands, f"row {b} step {t}: {pick} is not a remaining candidate"
            if not (t == 0 and isinstance(start, int)):
                vals = (start_values_literal(dist, cands, objective) if t == 0
                        else step_values_literal(dist, cands, selected, objective))
                best = max(vals)
                got = vals[cands.index(pick)]
                tol = rel_tol * max(1.0, abs(best) if math.isfinite(best) else 1.0)
                assert got >= best - tol or got == best, (
                    f"row {b} step {t}: picked {pick} with value {got}, but the best is "
                    f"{cands[vals.index(best)]} with {best}")
                # An exact float64 tie (duplicates, exact arithmetic) is exact in fp32 too: the
                # lowest index must win it.
                assert got != best or pick == cands[vals.index(best)], (
                    f"row {b} step {t}: picked {pick}, but {cands[vals.index(best)]} ties it "
                    f"exactly ({best}) and has the lower index")
            else:
                assert pick == start
            selected.append(pick)
            cands.remove(pick)


# --------------------------------------------------------------------------- prune
def stable_topk_literal(scores_row: Sequence[float], n: int, cands: Sequence[int]) -> List[int]:
    """The ``n`` candidates with the highest score, ties to the lowest index (ascending list)."""
    order = sorted(cands, key=lambda i: (-scores_row[i], i))
    return sorted(order[:n])



# --------------------------------------------------------------------------- video
def dpc_knn_literal(x_row: torch.Tensor, num_centers: int, k: int,
                    cands: Optional[Sequence[int]] = None):
    """The originals' DPC-kNN on one row ``x_row[N, D]`` in float64, on the full matrix of direct
    differences ``cdist / sqrt(D)``: the k nearest (itself included), ``exp(-mean d²)``, the
    nearest denser token (the largest distance for the densest), ``ρ·δ``, the top scores,
    nearest-centre assignment with each centre its own.  Where the originals add ``1e-6·rand`` to
    the density, a density tie goes to the lower index.  Returns ``(centers, assign, density,
    delta)`` lists over ``cands`` (all tokens when None; assign -1 elsewhere)."""
    N, D = x_row.shape
    cands = list(range(N)) if cands is None else list(cands)
    y = x_row.double()[cands]
    c = len(cands)
    dist = (y[:, None, :] - y[None, :, :]).square().sum(-1).sqrt() / math.sqrt(D)
    kk = min(k, c)
    density = [math.exp(-sum(v * v for v in sorted(dist[i].tolist())[:kk]) / kk) for i in range(c)]
    top = float(dist.max()) if c else 0.0
    delta = []
    for i in range(c):
        denser = [j for j in range(c) if density[j] > density[i]
                  or (density[j] == density[i] and j < i)]
        delta.append(min(float(dist[i, j]) for j in denser) if denser else top)
    score = [density[i] * delta[i] for i in range(c)]
    order = sorted(range(c), key=lambda i: (-score[i], i))[:num_centers]
    assign = [-1] * N
    for i in range(c):
        near = min(range(len(order)), key=lambda s: (float(dist[i, order[s]]), s)) \
            if order else -1
        assign[cands[i]] = order.index(i) if i in order else near
    return ([cands[i] for i in order], assign, density, delta)


def cluster_merge_literal(x_row: torch.Tensor, centers: Sequence[int], assign: Sequence[int],
                          include_centers: bool = True, blend: Optional[float] = None,
                          rule: str = "clamp", weights: Optional[Sequence[float]] = None):
    """One row's merged tokens in float64, member by member: the (weighted) mean of each slot's
    members, blended with the anchor as FastVID (``a = max(β, 1/(n+1))``) or HoliTom (``a = β``);
    an empty slot gives its anchor."""
    x = x_row.double()
    out = []
    for s, anchor in enumerate(centers):
        members = [i for i, a in enumerate(assign) if a == s
                   and (include_centers or i not in centers)
                   and (weights is None or weights[i] > 0)]
        w = [1.0 if weights is None else float(weights[i]) for i in members]
        n = sum(w)
        if n == 0:
            out.append(x[anchor])
            continue
        mean = sum(wi * x[i] for wi, i in zip(w, members)) / n
        if blend is None:
            out.append(mean)
            continue
        a = max(blend, 1.0 / (n + 1.0)) if rule == "clamp" else blend
        out.append(a * x[anchor] + (1.0 - a) * mean)
    return torch.stack(out) if out else x.new_zeros(0, x.shape[1])
