"""Each published method against a straightforward batched PyTorch implementation of the same
algorithm, side by side (one pytest-benchmark group per method and shape).

    pytest benchmarks/bench_methods.py --benchmark-only [--benchmark-group-by=group]

Shapes are LLaVA-1.5's (N = 576 visual tokens) at quick CPU sizes: D = 1024 (CLIP-L width:
PruMerge's and HoloV's inputs; DivPrune and TrimTokenator at the same width to stay quick),
B ∈ {1, 4}.  On CUDA the same file times the GPU paths (Triton kernels by default).  The
``plain`` implementations below are what one would write without visprune: vectorised PyTorch,
``torch.topk`` for the rankings, a Python loop where the algorithm is naturally one (greedy
steps, images of different kept counts, HoloV's crops).  For PruMerge the original's double
loop over images and kept tokens is timed as well (``original-loop``).  Before timing, every
``plain`` result is checked to select the same tokens as the method.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from visprune.methods import divprune, holov, prumerge, prumerge_cls_attention, trimtokenator

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N, D, DK, M, KEEP = 576, 1024, 1024, 64, 64
BATCHES = (1, 4)


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _inputs(B, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, N + 1, DK, generator=g), torch.randn(B, N + 1, DK, generator=g)
    for b in range(B):          # a few dominant tokens (logit + ~8), as in CLIP's last layer
        hot = torch.randperm(N, generator=g)[:4 + 3 * b] + 1
        k[b, hot] += 8.0 * q[b, :1] / math.sqrt(DK)
    x = torch.randn(B, N, D, generator=g) + 0.3 * torch.randn(B, 1, D, generator=g)
    text = torch.randn(B, M, D, generator=g)
    to = lambda t: t.to(DEVICE)
    return to(x), to(text), to(prumerge_cls_attention(q, k)), to(k[:, 1:].contiguous())


# --------------------------------------------------------------------------- plain PyTorch
def plain_trimtokenator(visual, text, keep, stage1_keep=0.8):
    B, n = visual.shape[:2]
    v, t = visual.float(), text.float()
    score = -torch.cdist(v, t).square().mean(-1)
    survivors = score.topk(int(math.floor(stage1_keep * n + 0.5)), dim=-1).indices
    vs = F.normalize(v.gather(1, survivors[..., None].expand(-1, -1, v.shape[-1])), dim=-1)
    dist = (1 - vs @ vs.transpose(1, 2)).clamp(min=0)
    rows = torch.arange(B, device=visual.device)
    s = dist.sum(-1).argmax(-1)
    total = torch.zeros_like(dist[:, 0])
    free = torch.ones_like(total, dtype=torch.bool)
    chosen = []
    for _ in range(keep):
        chosen.append(s)
        free[rows, s] = False
        total += dist[rows, s]
        s = total.masked_fill(~free, -1).argmax(-1)
    idx = survivors.gather(1, torch.stack(chosen, 1)).sort(-1).values
    return idx, visual.gather(1, idx[..., None].expand(-1, -1, visual.shape[-1]))


def plain_divprune(visual, keep):
    """The original's algorithm (min over all selected rows at every step), batched."""
    n = visual.shape[1]
    vn = F.normalize(visual.float(), dim=-1)
    dist = 1 - vn @ vn.transpose(1, 2)
    s = [torch.topk(dist, 2, dim=1, largest=False).values[:, 1].argmax(-1)]
    for i in range(1, keep):
        sel = torch.stack(s, 1)
        s.append(dist.gather(1, sel[..., None].expand(-1, -1, n)).min(1).values.argmax(-1))
    idx = torch.stack(s, 1).sort(-1).values
    return idx, visual.gather(1, idx[..., None].expand(-1, -1, visual.shape[-1]))


def plain_prumerge(x, a, keys):
    n = a.shape[1]
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], device=a.device), dim=-1)
    count = (a > (q3 + 1.5 * (q3 - q1))[:, None]).sum(-1)
    kn = F.normalize(keys.float(), dim=-1)
    idx_out, tok_out = [], []
    for b in range(a.shape[0]):                         # images keep different counts
        kept = a[b].topk(max(1, int(n * (count[b].item() / n)))).indices
        cos = kn[b, kept] @ kn[b].T
        cos[torch.arange(len(kept)), kept] = -math.inf
        nbr = cos.topk(min(32, n - 1), dim=-1).indices
        merged = x[b, kept] + (a[b, nbr, None] * x[b, nbr]).sum(1)
        rest = torch.ones(n, dtype=torch.bool, device=a.device)
        rest[kept] = False
        extra = (a[b, rest, None] * x[b, rest]).sum(0, keepdim=True)
        idx_out.append(kept)
        tok_out.append(torch.cat([merged, extra]))
    return idx_out, tok_out


def original_merge(x, a, keys, idx):
    """The original's per-token merge loop on one image (``x[n, D]``, ``a[n]``, ``keys[n, Dk]``)
    for the kept positions ``idx``: each kept token plus the attention-weighted sum of the 32
    others nearest to it by key cosine, then one extra token, the weighted sum of the unkept."""
    n = a.shape[0]
    mask = torch.ones(n, dtype=torch.bool, device=a.device)
    mask[idx] = False
    compl = mask.nonzero().flatten()
    k_kept, k_rest = F.normalize(keys[idx], dim=-1), F.normalize(keys[compl], dim=-1)
    merged = torch.zeros(len(idx), x.shape[-1], device=x.device)
    for i in range(len(idx)):
        rest_x = torch.cat([x[idx[:i]], x[idx[i + 1:]], x[compl]])
        rest_a = torch.cat([a[idx[:i]], a[idx[i + 1:]], a[compl]])
        rest_k = torch.cat([k_kept[:i], k_kept[i + 1:], k_rest])
        cluster = (k_kept[i:i + 1] @ rest_k.T).topk(32, dim=1).indices[0]
        merged[i] = (rest_x[cluster] * rest_a[cluster, None]).sum(0) + x[idx[i]]
    extra = (x[compl] * a[compl, None]).sum(0, keepdim=True)
    return torch.cat([merged, extra])


def original_loop_prumerge(x, a, keys):
    """The original's merge: a Python loop over images and kept tokens (selection as above)."""
    n = a.shape[1]
    q1, q3 = torch.quantile(a, torch.tensor([0.25, 0.75], device=a.device), dim=-1)
    count = (a > (q3 + 1.5 * (q3 - q1))[:, None]).sum(-1)
    idx_out, tok_out = [], []
    for b in range(a.shape[0]):
        idx = a[b].topk(max(1, int(n * (count[b].item() / n)))).indices
        idx_out.append(idx)
        tok_out.append(original_merge(x[b], a[b], keys[b], idx))
    return idx_out, tok_out


def plain_holov(x, attn, keep, num_crops=16, alpha=0.09):
    """The original's zero-padding variant: a loop over crops (batched over images), then the
    allocation and the per-crop top-k per image."""
    B, n, _ = x.shape
    crops = torch.arange(n, device=x.device).tensor_split(num_crops)
    scores = []
    for c in crops:
        xc = x[:, c].float()
        f = xc / (xc.norm(dim=-1, keepdim=True) + 1e-6)
        s = f @ f.transpose(1, 2)
        s.diagonal(dim1=1, dim2=2).zero_()
        m = len(c)
        mu = s.sum(-1) / (m - 1)
        var = (s - mu[..., None]).square().sum(-1) / (m - 1)
        big_a = 1000 * attn[:, c].float()
        gamma = big_a.abs().mean(-1) / (var.abs().mean(-1) + 1e-6)
        scores.append((big_a + alpha * gamma[:, None] * var).mean(-1))
    w = torch.stack(scores, 1)
    w = w / (w.sum(-1, keepdim=True) + 1e-6)
    q = torch.floor(w * keep).long()
    index = torch.full((B, keep), -1, dtype=torch.long, device=x.device)
    for b in range(B):
        q[b, w[b].topk(int(keep - q[b].sum())).indices] += 1
        kept = []
        for c, qc in zip(crops, q[b].tolist()):
            kept.append(c if qc >= len(c) else c[attn[b, c].topk(qc).indices])
        kept = torch.cat(kept)[:keep]
        index[b, :len(kept)] = kept
    tokens = x.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, x.shape[-1]))
    return index, tokens * (index >= 0)[..., None]


# --------------------------------------------------------------------------- cases
def _calls(method, B):
    x, text, a, keys = _inputs(B)
    if method == "trimtokenator":
        ours = lambda: trimtokenator(x, text, KEEP)
        plain = {"plain": lambda: plain_trimtokenator(x, text, KEEP)}
        same = lambda r, p: torch.equal(r.indices, p[0])
    elif method == "divprune":
        ours = lambda: divprune(x, KEEP)
        plain = {"plain": lambda: plain_divprune(x, KEEP)}
        same = lambda r, p: torch.equal(r.indices, p[0])
    elif method == "prumerge":
        ours = lambda: prumerge(x, a, keys)
        plain = {"plain": lambda: plain_prumerge(x, a, keys),
                 "original-loop": lambda: original_loop_prumerge(x, a, keys)}
        same = lambda r, p: all(
            r.indices[b, :len(i)].tolist() == i.tolist()
            and torch.allclose(r.tokens[b, :len(t)].float(), t, rtol=1e-4, atol=1e-4)
            for b, (i, t) in enumerate(zip(*p)))
    else:
        ours = lambda: holov(x, a, KEEP, redistribute=False)
        plain = {"plain": lambda: plain_holov(x, a, KEEP)}
        same = lambda r, p: torch.equal(r.indices, p[0])
    return ours, plain, same


CASES = [(method, B, impl) for method in ("trimtokenator", "divprune", "prumerge", "holov")
         for B in BATCHES
         for impl in ("visprune", "plain") + (("original-loop",) if method == "prumerge" else ())]


@pytest.mark.parametrize("method,B,impl", CASES, ids=[f"{m}-B{b}-{i}" for m, b, i in CASES])
def test_method(benchmark, method, B, impl):
    ours, plain, same = _calls(method, B)
    fn = ours if impl == "visprune" else plain[impl]
    if impl != "visprune":
        assert same(ours(), fn()), f"{impl} {method} selects other tokens than visprune's"

    def call():
        out = fn()
        _sync()
        return out

    benchmark.group = f"{method} N={N} D={D} keep={KEEP} B={B} ({DEVICE.type})"
    benchmark.extra_info.update(method=method, B=B, impl=impl, device=DEVICE.type)
    benchmark.pedantic(call, rounds=10, warmup_rounds=1, iterations=1)
