"""VisionZip against a float64 transliteration of the original (github dvlab-research/VisionZip).

``golden_attention`` transliterates ``visionzip/utils.py`` ``CLIPAttention_forward`` (the
attention weights it returns and its third output, the ``metric``); ``golden_visionzip``
transliterates ``visionzip/clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward`` (tensor
branch) for one image, in float64 numpy, statement by statement.  Where the original is
undefined or crashes, the golden encodes the documented choice (marked "documented choice").
The method runs on every backend available on CPU (Triton in its interpreter).
"""
import numpy as np
import pytest
import torch

from visprune import available_backends
from visprune.methods.visionzip import visionzip, visionzip_attention, visionzip_split

CPU = torch.device("cpu")
BACKENDS = [name for name, why in available_backends(CPU).items() if why == "ok"]


def f64(t):
    return t.detach().double().numpy()


# --------------------------------------------------------------------------- goldens
def golden_attention(q, k, num_heads):
    """``utils.py`` ``CLIPAttention_forward`` for one image (``q``, ``k``: the ``q_proj`` /
    ``k_proj`` outputs ``[L, C]``): ``(attn_weights[H, L, L], metric[L, dh])``."""
    L, C = q.shape
    head_dim = C // num_heads
    scale = head_dim ** -0.5
    query_states = q * scale                                        # q_proj(...) * self.scale
    # self._shape(t, seq, bsz) = t.view(bsz, seq, H, dh).transpose(1, 2), bsz = 1 dropped
    key_states = k.reshape(L, num_heads, head_dim).transpose(1, 0, 2)
    raw_key_states = key_states.copy()
    query_states = query_states.reshape(L, num_heads, head_dim).transpose(1, 0, 2)
    attn_weights = query_states @ key_states.transpose(0, 2, 1)     # torch.bmm
    attn_weights = np.exp(attn_weights - attn_weights.max(-1, keepdims=True))
    attn_weights /= attn_weights.sum(-1, keepdims=True)             # softmax(dim=-1)
    return attn_weights, raw_key_states.mean(0)                     # raw_key_states.mean(1)


def golden_visionzip(hidden_states, attn_weights, metric, dominant_num, contextual_num):
    """``clip_encoder.py`` ``CLIPVisionTower_VisionZip.forward`` for one image.

    ``hidden_states[L, D]`` (CLS first), ``attn_weights[H, L, L]``, ``metric[L, dh]``;
    ``dominant_num`` = the ``visionzip(dominant=...)`` argument minus one, as ``main.py`` passes
    it to ``apply_info``.  Returns ``(hidden_states_save[1 + dominant_num + contextual_num, D],
    positions)``: each output row's position in ``hidden_states`` (anchors' for contextual rows).
    """
    L = hidden_states.shape[0]
    # Dominant Visual Tokens
    cls_idx = 0
    cls_attention = attn_weights[:, cls_idx, cls_idx + 1:]
    cls_attention_sum = cls_attention.sum(0)
    # .topk(dominant_num).indices: documented choice, ties go to the lowest index
    topk_indices = sorted(range(len(cls_attention_sum)),
                          key=lambda i: (-cls_attention_sum[i], i))[:dominant_num]
    all_indices = [0] + [i + 1 for i in topk_indices]
    mask = np.ones(L, dtype=bool)
    mask[all_indices] = False
    dominant_tokens = hidden_states[~mask]                    # masked_select: position order
    dominant_positions = list(np.nonzero(~mask)[0])
    # Filter
    metric_filtered = metric[mask]
    hidden_states_filtered = hidden_states[mask]
    filtered_positions = np.nonzero(mask)[0]
    metric_normalized = metric_filtered / np.linalg.norm(metric_filtered, axis=-1, keepdims=True)
    if contextual_num == 0:            # documented choice (the original divides by zero)
        return dominant_tokens, dominant_positions
    # Contextual Visual Tokens
    step = max(1, metric_normalized.shape[0] // contextual_num)
    target_indices = list(range(0, metric_normalized.shape[0], step))[:contextual_num]
    target_tokens = metric_normalized[target_indices]
    others = [i for i in range(metric_normalized.shape[0]) if i not in target_indices]
    tokens_to_merge = metric_normalized[others]
    similarity = tokens_to_merge @ target_tokens.T
    assign_one_hot = np.zeros((len(others), contextual_num))
    assign_one_hot[np.arange(len(others)), similarity.argmax(1)] = 1   # first maximum, as torch
    counts = np.clip(assign_one_hot.sum(0), 1, None)[:, None]
    hidden_to_merge = hidden_states_filtered[others]
    aggregated_hidden = assign_one_hot.T @ hidden_to_merge / counts
    target_hidden = hidden_states_filtered[target_indices]
    contextual_tokens = target_hidden + aggregated_hidden
    hidden_states_save = np.concatenate([dominant_tokens, contextual_tokens])
    return hidden_states_save, dominant_positions + list(filtered_positions[target_indices])


# --------------------------------------------------------------------------- inputs
def encoder_inputs(B, N, D, C, H, seed, hot=12):
    """One CLIP layer's output ``hidden[B, N+1, D]`` and its ``q``/``k`` projections
    ``[B, N+1, C]``: a few patch keys aligned with the CLS query draw most of the attention, and
    the keys share a few directions so that cosines spread."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, N + 1, D, generator=g)
    q = torch.randn(B, N + 1, C, generator=g)
    basis = torch.randn(4, C, generator=g)
    k = torch.randn(B, N + 1, C, generator=g) + torch.randn(B, N + 1, 4, generator=g) @ basis
    for b in range(B):
        pos = torch.randperm(N, generator=g)[:hot] + 1
        k[b, pos] += (1.0 + torch.rand(hot, 1, generator=g)) * q[b, :1]
    return hidden, q, k


def run(hidden, q, k, H, backend="reference", **counts):
    cls_attn, keys = visionzip_attention(q, k, H)
    return visionzip(hidden[:, 1:], cls_attn, keys, cls_token=hidden[:, 0], backend=backend,
                     **counts)


def check_golden(res, hidden, q, k, H, dominant, contextual, atol=1e-5):
    B = hidden.shape[0]
    assert res.tokens.shape == (B, dominant + contextual, hidden.shape[2])
    assert res.lengths.tolist() == [dominant + contextual] * B
    for b in range(B):
        attn, metric = golden_attention(f64(q[b]), f64(k[b]), H)
        tokens, positions = golden_visionzip(f64(hidden[b]), attn, metric, dominant - 1,
                                             contextual)
        assert res.indices[b].tolist() == [p - 1 for p in positions]     # CLS (position 0) → -1
        np.testing.assert_allclose(f64(res.tokens[b]), tokens, rtol=1e-5, atol=atol)


# --------------------------------------------------------------------------- tests
def test_split_follows_the_readme():
    assert visionzip_split(64) == (54, 10)
    assert visionzip_split(128) == (108, 20)
    assert visionzip_split(192) == (162, 30)
    assert [visionzip_split(k) for k in (0, 1, 3, 4)] == [(0, 0), (1, 0), (3, 0), (3, 1)]


def test_attention_inputs_match_golden():
    hidden, q, k = encoder_inputs(2, 30, 8, 24, 3, seed=0)
    cls_attn, keys = visionzip_attention(q, k, 3)
    assert cls_attn.shape == (2, 30) and keys.shape == (2, 30, 8)
    for b in range(2):
        attn, metric = golden_attention(f64(q[b]), f64(k[b]), 3)
        np.testing.assert_allclose(f64(cls_attn[b]), attn[:, 0, 1:].sum(0), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(f64(keys[b]), metric[1:], rtol=1e-5, atol=1e-6)


def test_attention_inputs_from_a_transformers_clip_layer():
    """What an integration captures: layer -2's ``q_proj``/``k_proj`` outputs (inputs:
    ``layer_norm1`` of ``hidden_states[-3]``) give the eager ``attentions[-2]`` CLS row."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=3, num_attention_heads=4,
                                           image_size=30, patch_size=6)
    model = transformers.CLIPVisionModel(config).eval()
    model.config._attn_implementation = "eager"
    layers = getattr(model, "vision_model", model).encoder.layers   # flattened in transformers 5
    attn_module = layers[-2].self_attn
    seen = {}
    hooks = [getattr(attn_module, name).register_forward_hook(
        lambda m, args, out, name=name: seen.__setitem__(name, out))
        for name in ("q_proj", "k_proj")]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 30, 30), output_hidden_states=True, output_attentions=True)
    for h in hooks:
        h.remove()
    cls_attn, keys = visionzip_attention(seen["q_proj"], seen["k_proj"], 4)
    torch.testing.assert_close(cls_attn, out.attentions[-2][:, :, 0, 1:].sum(1))
    layer = layers[-2]
    with torch.no_grad():
        k = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    torch.testing.assert_close(keys, k.view(2, 26, 4, 8).mean(2)[:, 1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,dominant,contextual", [(576, 54, 10), (576, 108, 20), (100, 17, 7),
                                                   (37, 5, 4)])
def test_matches_golden(backend, N, dominant, contextual):
    hidden, q, k = encoder_inputs(2, N, 32, 32, 4, seed=N + dominant)
    res = run(hidden, q, k, 4, backend, dominant=dominant, contextual=contextual)
    check_golden(res, hidden, q, k, 4, dominant, contextual)


def test_keep_alone_is_split_like_the_readme():
    hidden, q, k = encoder_inputs(2, 576, 16, 16, 2, seed=1)
    for keep in (64, 128):
        dominant, contextual = visionzip_split(keep)
        want = run(hidden, q, k, 2, dominant=dominant, contextual=contextual)
        for counts in ({}, {"dominant": dominant}, {"contextual": contextual},
                       {"dominant": dominant, "contextual": contextual}):
            got = run(hidden, q, k, 2, keep=keep, **counts)
            assert torch.equal(got.indices, want.indices) and torch.equal(got.tokens, want.tokens)


def test_without_cls_every_dominant_slot_is_a_patch():
    hidden, q, k = encoder_inputs(2, 90, 16, 16, 2, seed=2)
    cls_attn, keys = visionzip_attention(q, k, 2)
    with_cls = visionzip(hidden[:, 1:], cls_attn, keys, dominant=12, contextual=5,
                         cls_token=hidden[:, 0])
    without = visionzip(hidden[:, 1:], cls_attn, keys, 16, dominant=11)
    assert torch.equal(without.indices, with_cls.indices[:, 1:])
    assert torch.equal(without.tokens, with_cls.tokens[:, 1:])
    assert without.lengths.tolist() == [16, 16]


def test_batch_rows_equal_rows_alone():
    hidden, q, k = encoder_inputs(3, 120, 24, 16, 2, seed=3)
    batch = run(hidden, q, k, 2, dominant=20, contextual=6)
    for b in range(3):
        alone = run(hidden[b:b + 1], q[b:b + 1], k[b:b + 1], 2, dominant=20, contextual=6)
        assert torch.equal(batch.indices[b], alone.indices[0])
        torch.testing.assert_close(batch.tokens[b], alone.tokens[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_fp32(dtype):
    hidden, q, k = encoder_inputs(2, 200, 32, 16, 2, seed=4)
    hidden, q, k = hidden.to(dtype), q.to(dtype), k.to(dtype)
    res = run(hidden, q, k, 2, dominant=30, contextual=8)
    assert res.tokens.dtype == dtype
    want = run(hidden.float(), q.float(), k.float(), 2, dominant=30, contextual=8)
    assert torch.equal(res.indices, want.indices)
    assert torch.equal(res.tokens, want.tokens.to(dtype))        # one rounding, at the end
    check_golden(res, hidden, q, k, 2, 30, 8, atol=2e-2)


def test_ties_go_to_the_lowest_index():
    g = torch.Generator().manual_seed(5)
    B, N, D = 2, 40, 8
    x = torch.randn(B, N + 1, D, generator=g)
    attn = torch.zeros(B, N + 1, N + 1)
    attn[:, 0, 1:] = torch.randint(0, 3, (B, N), generator=g).float()    # many equal values
    keys = torch.randn(B, N + 1, 6, generator=g)
    keys[:, 1:] = keys[:, 1:11].repeat(1, 4, 1)            # every key appears four times
    res = visionzip(x[:, 1:], attn[:, 0, 1:], keys[:, 1:], dominant=9, contextual=6,
                    cls_token=x[:, 0])
    for b in range(B):
        tokens, positions = golden_visionzip(f64(x[b]), f64(attn[b])[None], f64(keys[b]), 8, 6)
        assert res.indices[b].tolist() == [p - 1 for p in positions]
        np.testing.assert_allclose(f64(res.tokens[b]), tokens, rtol=1e-6, atol=1e-6)
    # all equal: the first patches are dominant, every key equal: all members join anchor 0
    same = visionzip(x[:, 1:], torch.ones(B, N), torch.ones(B, N, 6), dominant=5, contextual=3,
                     cls_token=x[:, 0])
    step = (N - 4) // 3
    assert same.indices[0].tolist() == [-1, 0, 1, 2, 3, 4, 4 + step, 4 + 2 * step]
    members = [i for i in range(4, N) if i not in (4, 4 + step, 4 + 2 * step)]
    torch.testing.assert_close(same.tokens[:, 5], x[:, 5] + x[:, 1:][:, members].mean(1))
    torch.testing.assert_close(same.tokens[:, 6:], x[:, 1:][:, [4 + step, 4 + 2 * step]])


def test_remaining_token_counts():
    """contextual == the tokens left: every one is an anchor and passes unchanged;
    contextual == 0: dominant tokens only; dominant == 1: the CLS token and contextual ones."""
    hidden, q, k = encoder_inputs(2, 30, 8, 8, 2, seed=6)
    cls_attn, keys = visionzip_attention(q, k, 2)
    x = hidden[:, 1:]
    full = visionzip(x, cls_attn, keys, dominant=21, contextual=10, cls_token=hidden[:, 0])
    rest = full.indices[:, 21:]
    assert (rest.diff(dim=1) > 0).all()
    assert torch.equal(full.tokens[:, 21:], x.gather(1, rest[..., None].expand(-1, -1, 8)))
    assert sorted(full.indices[0, 1:].tolist()) == list(range(30))
    for dominant, contextual in ((12, 0), (1, 6), (1, 29)):
        res = visionzip(x, cls_attn, keys, dominant=dominant, contextual=contextual,
                        cls_token=hidden[:, 0])
        check_golden(res, hidden, q, k, 2, dominant, contextual)
    empty = visionzip(x[:0], cls_attn[:0], keys[:0], 8, cls_token=hidden[:0, 0])
    assert empty.tokens.shape == (0, 8, 8) and empty.indices.shape == (0, 8)


def test_zero_keys():
    """A zero member key has cosine 0 with every anchor and joins the first, as in the original
    (its NaN row's argmax is 0).  Documented deviation: a zero anchor key has cosine 0 too, where
    the original's NaN column would win every member's argmax."""
    g = torch.Generator().manual_seed(7)
    x, keys = torch.randn(1, 21, 4, generator=g), torch.randn(1, 21, 3, generator=g)
    attn = torch.zeros(1, 21, 21)
    attn[0, 0, 1:] = torch.arange(20.0, 0, -1)        # patches 0..4 dominant; anchors 5, 10, 15
    keys[0, 12] = 0                                   # patch 11: a member
    res = visionzip(x[:, 1:], attn[:, 0, 1:], keys[:, 1:], dominant=6, contextual=3,
                    cls_token=x[:, 0])
    with np.errstate(invalid="ignore"):                # the original's 0/0
        tokens, positions = golden_visionzip(f64(x[0]), f64(attn), f64(keys[0]), 5, 3)
    assert res.indices[0].tolist() == [p - 1 for p in positions]
    np.testing.assert_allclose(f64(res.tokens[0]), tokens, rtol=1e-6, atol=1e-6)

    keys[0, 11] = 0                                   # patch 10: an anchor
    res = visionzip(x[:, 1:], attn[:, 0, 1:], keys[:, 1:], dominant=6, contextual=3,
                    cls_token=x[:, 0])
    kn = F_normalize(keys[0, 1:])
    members = [m for m in range(5, 20) if m not in (5, 10, 15)]
    joins = torch.stack([kn[members] @ kn[5], torch.zeros(len(members)), kn[members] @ kn[15]],
                        1).argmax(1)
    mine = [m for m, j in zip(members, joins.tolist()) if j == 1]
    want = x[0, 11] + (x[0, [m + 1 for m in mine]].mean(0) if mine else 0)
    torch.testing.assert_close(res.tokens[0, 7], want)
    assert res.tokens.isfinite().all()
    # NaN attention ranks last (torch.topk would rank it first)
    nan_first = attn[:, 0, 1:].clone()
    nan_first[0, 0] = float("nan")
    res = visionzip(x[:, 1:], nan_first, keys[:, 1:], dominant=6, contextual=3, cls_token=x[:, 0])
    assert res.indices[0, :6].tolist() == [-1, 1, 2, 3, 4, 5]


def F_normalize(t):
    return torch.nn.functional.normalize(t, dim=-1)


def test_noncontiguous_inputs():
    hidden, q, k = encoder_inputs(2, 64, 16, 16, 2, seed=8)
    cls_attn, keys = visionzip_attention(q, k, 2)
    want = visionzip(hidden[:, 1:], cls_attn, keys, dominant=10, contextual=4,
                     cls_token=hidden[:, 0])
    xt = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    kt = keys.transpose(1, 2).contiguous().transpose(1, 2)
    at = cls_attn.t().contiguous().t()
    got = visionzip(xt[:, 1:], at, kt, dominant=10, contextual=4, cls_token=xt[:, 0])
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.tokens, want.tokens)


def test_no_host_reads():
    """No op that makes the host wait for the device (value reads, data-dependent shapes)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    syncing = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
               torch.ops.aten.masked_select.default, torch.ops.aten.unique_consecutive.default}
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in syncing or (func is torch.ops.aten.index.Tensor and any(
                    t is not None and t.dtype == torch.bool for t in args[1])):
                seen.append(func)
            return func(*args, **(kwargs or {}))

    hidden, q, k = encoder_inputs(2, 50, 8, 8, 2, seed=9)
    with Record():
        run(hidden, q, k, 2, keep=16)
    assert seen == []


def _args():
    x, a, k = torch.zeros(2, 20, 8), torch.rand(2, 20), torch.rand(2, 20, 4)
    return dict(features=x, cls_attn=a, keys=k, dominant=5, contextual=3, cls_token=x[:, 0])


@pytest.mark.parametrize("change,error,match", [
    (dict(features=torch.zeros(2, 20)), ValueError, r"features must have shape \[B, N, D\]"),
    (dict(features=torch.zeros(2, 20, 8, dtype=torch.int32)), TypeError,
     "features must have dtype"),
    (dict(cls_attn=torch.rand(2, 19)), ValueError, r"cls_attn must have shape \[B, N\]"),
    (dict(cls_attn=torch.rand(2, 20, 1)), ValueError, r"cls_attn must have shape \[B, N\]"),
    (dict(keys=torch.rand(3, 20, 4)), ValueError, r"keys must have shape \[B, N, Dk\]"),
    (dict(keys="k"), TypeError, "keys must be a torch.Tensor"),
    (dict(cls_token=torch.zeros(2, 7)), ValueError, r"cls_token must have shape \[B, D\]"),
    (dict(cls_token=torch.zeros(2, 8, dtype=torch.float16)), TypeError, "cls_token has dtype"),
    (dict(dominant=0), ValueError, "dominant=0 must be >= 1 when cls_token is given"),
    (dict(dominant=22), ValueError,
     "dominant=22 needs 21 dominant patches but features has only N=20"),
    (dict(dominant=15, contextual=7), ValueError, "contextual=7 is larger than the 6 tokens left"),
    (dict(contextual=-1), ValueError, "contextual must be >= 0"),
    (dict(dominant=2.0), TypeError, "dominant must be an int"),
    (dict(contextual=None), ValueError, "visionzip needs keep, or both dominant and contextual"),
    (dict(keep=9), ValueError, "keep=9 must equal dominant \\+ contextual"),
    (dict(keep=4, contextual=None), ValueError, "keep=4 must equal dominant \\+ contextual"),
    (dict(keep=True, dominant=None, contextual=None), TypeError, "keep must be an int"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), RuntimeError, "backend 'cuda' is not available"),
])
def test_errors(change, error, match):
    args = _args()
    args.update(change)
    with pytest.raises(error, match=match):
        visionzip(**args)


def test_attention_errors():
    q = torch.zeros(2, 5, 12)
    with pytest.raises(ValueError, match="num_heads=5 must be >= 1 and divide C=12"):
        visionzip_attention(q, q, 5)
    with pytest.raises(ValueError, match=r"k must have the shape of q"):
        visionzip_attention(q, q[:, 1:], 3)
