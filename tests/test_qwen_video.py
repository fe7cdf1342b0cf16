"""The video methods on Qwen2.5-VL and Qwen3-VL (visprune.integrations.transformers.qwen with
the table in .video).  Tiny random models built from configs, fp32, CPU.

The references are computed outside the integration: each method called on one video's merged
features alone (``get_video_features``), the language model run by hand on the kept tokens with
the positions ``get_rope_index`` gives the *unpruned* prompt (Qwen3-VL: its deepstack features
at the kept tokens), and FastVID's saliency transliterated statement by statement from its
Qwen2.5-VL code.  FastVID, HoliTom and PruneVid plug in through the same table: each is tested
with the real method, and stubs with FastVID's and HoliTom's signatures check what the
integration passes them and that it places tokens by their indices."""
import math

import pytest
import torch
import transformers

import visprune
from visprune import methods
from visprune.integrations.transformers import video as video_table
from visprune.integrations.transformers.video import video_parameter
from visprune.methods import dycoke_count, evs_count, vidcom2_count

from test_qwen import (IMG, VID, _manual_logits, _prompt, _qwen25, _qwen3, _row,
                       _tower_attention)

SELECTION = ("evs", "vidcom2", "dycoke")
HAS_FASTVID = hasattr(methods, "fastvid")


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def model(request):
    return _qwen25() if request.param == "qwen2_5_vl" else _qwen3()


@pytest.fixture(scope="module")
def qwen25():
    return _qwen25()


class _Ban(transformers.LogitsProcessor):
    """Bans the placeholder ids: without a cache a generated placeholder would be read as one
    more visual token of the prompt."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, [IMG, VID]] = -math.inf
        return scores


GREEDY = dict(do_sample=False, pad_token_id=0,
              logits_processor=transformers.LogitsProcessorList([_Ban()]))


def _videos(model, inputs):
    """Per video, its merged features ``[T, P, D]``."""
    grid = inputs["video_grid_thw"]
    with torch.no_grad():
        feats = model.model.get_video_features(inputs["pixel_values_videos"], grid).pooler_output
    return [f.view(t, h * w // 4, -1) for f, (t, h, w) in zip(feats, grid.tolist())]


def _alone(method, video, keep):
    """The kept positions of ``method`` on one video alone, ascending."""
    T, P, _ = video.shape
    value = video_parameter(method, keep, T, P)
    fn = getattr(methods, method)
    return sorted(fn(video[None], value).indices[0].tolist())


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("method,count", [("evs", evs_count), ("vidcom2", vidcom2_count)])
def test_rate_from_a_count_keeps_that_count(method, count):
    """A count ``c`` gives the ``q`` whose count is ``min(c, T·P)``, or the method's floor (EVS
    one frame, VidCom2 one token per frame) where that is larger; a fraction ``f`` is
    ``q = 1 - f``."""
    floor = {"evs": lambda T, P: P, "vidcom2": lambda T, P: T}[method]
    for T in range(1, 9):
        for P in (1, 2, 3, 7, 64, 196):
            N = T * P
            for c in sorted({1, 2, 3, P, N - 1, N, N + 5, N // 3, (7 * N) // 10}):
                if c < 1:
                    continue
                q = video_parameter(method, c, T, P)
                assert 0.0 <= q < 1.0
                assert count(P, T, q) == max(floor(T, P), min(c, N)), (T, P, c, q)
    assert video_parameter(method, 0.25, 4, 4) == 0.75
    assert video_parameter(method, 1.0, 4, 4) == 0.0


def test_dycoke_k_from_a_count_is_the_largest_count_not_above_it():
    """Per compared frame ``n = int((1 - k)·P)`` tokens: the ``n`` whose video count (``P`` per
    whole frame, ``n`` per compared one) is the largest not above the count, or ``n = 0``."""
    for T in range(1, 10):
        for P in (1, 2, 4, 7, 196):
            pairs, groups = T // 2, len(range(0, T - 4, 4))
            counts = {n: P if T == 1 else pairs * (P + n) - groups * (P - n)
                      for n in range(P + 1)}
            for c in range(1, T * P + 3):
                k = video_parameter("dycoke", c, T, P)
                assert 0.0 <= k <= 1.0
                n = int((1 - k) * P)
                fits = [m for m, v in counts.items() if v <= c]
                assert n == (max(fits) if fits else 0), (T, P, c, k)
                assert dycoke_count(P, T, k) == counts[n]
    assert video_parameter("dycoke", 0.3, 4, 4) == 1.0 - 0.3


# --------------------------------------------------------------------------- selection methods
@pytest.mark.parametrize("method", SELECTION)
@pytest.mark.parametrize("keep", [0.5, 7])
def test_kept_tokens_are_the_methods_on_each_video_and_the_logits_follow(model, method, keep):
    """Three videos (two with 6 tokens a frame and 3 / 2 frames, batched with ``frames=``; one
    with 4) and an image in one prompt: each video keeps the positions the method keeps of it
    alone, the image passes whole, and the logits equal the language model run by hand on the
    kept tokens at their original 3-D positions (Qwen3-VL: per-frame runs with timestamps
    between them, deepstack features at the kept tokens).  The first generated token
    agrees."""
    rows = [[3, 4, ("video", [3, 4, 6]), 5, ("image", [1, 4, 4]), 6, ("video", [2, 4, 6]), 7,
             ("video", [2, 4, 4]), 8]]
    inputs = _prompt(model, rows)
    with visprune.enable(model, method, keep=keep) as h, torch.no_grad():
        logits = model(**inputs).logits
        kept = [k.clone() for k in h.kept]
        first = model.generate(**inputs, max_new_tokens=1, **GREEDY)[0, -1]
    videos = _videos(model, inputs)
    want = [_alone(method, v, keep) for v in videos]
    assert kept[0].tolist() == list(range(4))                  # the image, whole
    assert [k.tolist() for k in kept[1:]] == want
    with torch.no_grad():
        manual = _manual_logits(model, inputs, kept)
    removed = sum(v.shape[0] * v.shape[1] for v in videos) - sum(map(len, want))
    assert logits.shape == manual.shape == (1, inputs["input_ids"].shape[1] - removed, 200)
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)
    assert int(first) == int(manual[0, -1].argmax())


def _manual_greedy(model, inputs, kept, steps):
    """Greedy decoding by hand without a cache (batch 1, a prompt ending with text): the
    language model on the kept tokens at the unpruned prompt's positions (Qwen3-VL: deepstack
    features at the kept tokens), each new token at the last token's position + 1 in every
    channel; placeholder ids banned as in :data:`GREEDY`."""
    inner = model.model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    enc = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
    slots = (ids[0] == VID).nonzero()[:, 0]
    embeds[0, slots] = torch.cat(list(enc.pooler_output))
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[slots] = False
    start = 0
    for k, f in zip(kept, enc.pooler_output):
        keep[slots[start + k]] = True
        start += len(f)
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                  video_grid_thw=inputs["video_grid_thw"])
    visual = torch.zeros(ids.shape[1], dtype=torch.bool)
    visual[slots] = True
    deep = None
    if getattr(enc, "deepstack_features", None) is not None:
        deep = [torch.cat(list(d))[keep[slots]] for d in enc.deepstack_features]
    x, p, vis = embeds[:, keep], pos[:, :, keep], visual[keep]
    new = []
    for _ in range(steps):
        extra = {} if deep is None else dict(visual_pos_masks=vis[None],
                                             deepstack_visual_embeds=deep)
        out = inner.language_model(inputs_embeds=x, position_ids=p, **extra)
        scores = model.lm_head(out.last_hidden_state[:, -1])
        scores[:, [IMG, VID]] = -math.inf
        token = scores.argmax(-1)
        new.append(int(token))
        x = torch.cat([x, inner.get_input_embeddings()(token)[:, None]], 1)
        p = torch.cat([p, p[:, :, -1:] + 1], 2)
        vis = torch.cat([vis, torch.zeros(1, dtype=torch.bool)])
    return new


@pytest.mark.parametrize("method", SELECTION)
def test_generated_tokens_equal_greedy_decoding_by_hand(model, method):
    """Four new tokens of generate() (with a cache) equal a greedy loop of the language model
    run by hand on the kept tokens at the unpruned prompt's positions."""
    inputs = _prompt(model, [[3, 4, ("video", [4, 4, 6]), 5, ("video", [3, 2, 4]), 6, 7]])
    with visprune.enable(model, method, keep=0.4) as h, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, **GREEDY)
        kept = [k.clone() for k in h.kept]
    with torch.no_grad():
        want = _manual_greedy(model, inputs, kept, 4)
    assert out[0, -4:].tolist() == want


@pytest.mark.parametrize("method", SELECTION)
def test_keep_all_reproduces_the_unpruned_model(model, method):
    """``keep=1.0`` keeps every token of EVS and VidCom2 (``q = 0``) and of DyCoke on an even
    frame count (``k = 0``; an odd last frame is in no pair and is dropped)."""
    inputs = _prompt(model, [[3, ("video", [4, 4, 4]), 5, ("video", [2, 2, 4]), 6]])
    with torch.no_grad():
        full = model(**inputs).logits
        with visprune.enable(model, method, keep=1.0):
            same = model(**inputs).logits
    torch.testing.assert_close(same, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", SELECTION)
def test_generate_with_and_without_cache_and_rows_alone_agree(model, method):
    """A left-padded batch (a row with two videos, one ending the row; a row with an image
    only; a text-only row): generate() with and without a cache gives the same tokens, each
    row's the same as that row alone, and the caller's prompt is kept in front."""
    rows = [[3, 4, ("video", [3, 4, 4]), 5, ("video", [2, 2, 4])],
            [9, ("image", [1, 4, 4]), 10, ("video", [4, 2, 4]), 11],
            [12, 13, 14]]
    inputs = _prompt(model, rows)
    width = inputs["input_ids"].shape[1]
    with visprune.enable(model, method, keep=0.4), torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        uncached = model.generate(**inputs, max_new_tokens=3, use_cache=False, **GREEDY)
        alone = [model.generate(**_row(inputs, r, rows), max_new_tokens=3, **GREEDY)[0, -3:]
                 for r in range(len(rows))]
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :width], inputs["input_ids"])
    assert [c.tolist() for c in cached[:, -3:]] == [a.tolist() for a in alone]


def test_own_parameter_instead_of_keep(model):
    """The method's own budget parameter (EVS's ``q``) in place of ``keep``: one value for
    every video, the same kept tokens as the ``keep`` it maps from."""
    inputs = _prompt(model, [[3, ("video", [3, 4, 4]), 5, ("video", [2, 4, 6]), 6]])
    with torch.no_grad():
        with visprune.enable(model, "evs", keep=0.25) as h:
            model(**inputs)
            by_keep = [k.tolist() for k in h.kept]
        with visprune.enable(model, "evs", q=0.75) as h:
            model(**inputs)
            by_q = [k.tolist() for k in h.kept]
        with visprune.enable(model, "dycoke", k=0.5) as h:
            model(**inputs)
            assert [len(k) for k in h.kept] == [dycoke_count(4, 3, 0.5), dycoke_count(6, 2, 0.5)]
    assert by_q == by_keep
    assert [len(k) for k in by_q] == [evs_count(4, 3, 0.75), evs_count(6, 2, 0.75)]


def test_images_alone_pass_whole(model):
    """A video method on a prompt with images and no video leaves the prompt as it is."""
    inputs = _prompt(model, [[3, ("image", [1, 4, 6]), 5]])
    with torch.no_grad():
        full = model(**inputs).logits
        with visprune.enable(model, "vidcom2", keep=0.25) as h:
            same = model(**inputs).logits
            assert [k.tolist() for k in h.kept] == [list(range(6))]
    torch.testing.assert_close(same, full, rtol=0, atol=0)


# --------------------------------------------------------------------------- refusals
def test_bad_settings_are_refused_at_enable_and_the_model_still_works(model):
    inputs = _prompt(model, [[3, ("video", [2, 4, 4]), 5]])
    with torch.no_grad():
        before = model(**inputs).logits
    cases = [
        (dict(method="evs", keep=0.5, per_frame=True), ValueError,
         "evs prunes each video as a whole.*per_frame=True"),
        (dict(method="evs"), ValueError, "evs needs keep .* or its own q"),
        (dict(method="vidcom2", keep=0.5, q=0.5), ValueError,
         "vidcom2 takes keep or its own q, not both: got keep=0.5 and q=0.5"),
        (dict(method="dycoke", keep=1.5), ValueError, "keep must be an int >= 1 or a float"),
        (dict(method="dycoke", keep=0), ValueError, "keep must be an int >= 1"),
        (dict(method="evs", q=1.0), ValueError, "q must be in \\[0.0, 1.0\\), got 1.0"),
        (dict(method="dycoke", k=-0.5), ValueError, "k must be in \\[0.0, 1.0\\], got -0.5"),
        (dict(method="evs", keep=4, frames=[2]), TypeError,
         "evs takes no argument\\(s\\) \\['frames'\\]"),
        (dict(method="dycoke", keep=4, stage1_keep=0.8), TypeError,
         "dycoke takes no argument\\(s\\) \\['stage1_keep'\\]; its options are "
         "\\['backend', 'k'\\]"),                  # per_frame is not one of them
        (dict(method="evs", q=None), ValueError, "evs's q must be a number .* got None"),
    ]
    if isinstance(model, transformers.Qwen3VLForConditionalGeneration):
        cases.append((dict(method="fastvid", keep=0.25), ValueError,
                      "fastvid is not available on Qwen3VLForConditionalGeneration: it merges"))
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            visprune.enable(model, **kwargs)
        assert "generate" not in model.__dict__, kwargs          # nothing was installed
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


def test_video_method_on_llava_is_refused():
    from test_integration import _build
    with pytest.raises(ValueError, match="evs prunes videos on Qwen2.5-VL and Qwen3-VL"):
        visprune.enable(_build("llava"), "evs", keep=0.5)


def test_a_method_missing_from_the_installation_is_refused(qwen25, monkeypatch):
    monkeypatch.delattr(methods, "holitom", raising=False)
    with pytest.raises(ValueError, match="holitom is not available: this installation's "
                                         "visprune.methods has no holitom"):
        visprune.enable(qwen25, "holitom", keep=0.25)
    assert "generate" not in qwen25.__dict__


# --------------------------------------------------------------------------- merged tokens
def _fastvid_transliteration(model, pixels, grid):
    """FastVID's saliency on Qwen2.5-VL, statement by statement from its
    ``Qwen2_5_VLVisionFlashAttention2.forward`` (the ``grid_thw is not None`` branch of the
    last block) and ``Qwen2_5_VisionTransformerPretrainedModel.forward`` (the reverse window
    order), on one video: ``[grid_t, P]``."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index
    visual = model.model.visual
    block = visual.blocks[-1].attn
    got = {}

    def capture(module, args, kwargs):
        got["h"] = args[0] if args else kwargs["hidden_states"]
        got["pe"] = kwargs["position_embeddings"]

    handle = block.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid)
    finally:
        handle.remove()
    hidden_states, (cos, sin), grid_thw = got["h"], got["pe"], grid
    num_heads = block.num_heads
    head_dim = hidden_states.shape[-1] // num_heads
    with torch.no_grad():
        seq_length = hidden_states.shape[0]
        q, k, v = block.qkv(hidden_states).reshape(seq_length, 3, num_heads, -1).permute(
            1, 0, 2, 3).unbind(0)
        q_attn, k_attn = apply_rotary_pos_emb_vision(q, k, cos, sin)
        q_attn = q_attn.transpose(0, 1)
        k_attn = k_attn.transpose(0, 1)
        grid_t, grid_h, grid_w = grid_thw[0, 0], grid_thw[0, 1], grid_thw[0, 2]
        q_attn = q_attn.view(num_heads, grid_t, grid_h * grid_w, head_dim).mean(-2, keepdim=True)
        k_attn = k_attn.view(num_heads, grid_t, grid_h * grid_w // 4, 4, head_dim).mean(-2)
        attn_weights = torch.matmul(q_attn, k_attn.transpose(-2, -1)) / math.sqrt(head_dim)
        attn_weights = torch.nn.functional.softmax(attn_weights, dim=-1,
                                                   dtype=torch.float32).to(q_attn.dtype)
        attn_weights = attn_weights.mean(2).mean(0)
        config = model.config.vision_config
        window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=2,
                                                  window_size=config.window_size,
                                                  patch_size=config.patch_size)
        reverse_indices = torch.argsort(window_index)
        attn_weights = attn_weights.view(-1)
        attn_weights = attn_weights[reverse_indices]
        attn_weights = attn_weights.reshape(grid_thw[0, 0], -1)
    return attn_weights


def _merging_stub(calls):
    """A stand-in with FastVID's signature that merges: in each frame, every even token becomes
    the mean of itself and the next one (an anchor at the even position), odd tokens are
    dropped; the result is listed in descending position order (the integration must place
    each token by its index, not by its rank)."""

    def fastvid(video, saliency, global_features=None, *, variant="llava_onevision", r=None,
                frames=None, backend=None):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"r must be in [0.0, 1.0], got {r}")
        calls.append(dict(video=video.clone(), saliency=saliency.clone(), variant=variant,
                          r=r, frames=list(frames)))
        B, T, P, D = video.shape
        anchors = torch.arange(0, P, 2)
        partner = (anchors + 1).clamp(max=P - 1)
        merged = (video[:, :, anchors] + video[:, :, partner]) / 2          # [B, T, A, D]
        index = (torch.arange(T)[:, None] * P + anchors).reshape(-1)
        lengths = [t * len(anchors) for t in frames]
        L = max(lengths)
        tokens = video.new_zeros(B, L, D)
        indices = torch.full((B, L), -1)
        for b, n in enumerate(lengths):
            tokens[b, :n] = merged[b, :frames[b]].reshape(-1, D).flip(0)
            indices[b, :n] = index[:n].flip(0)
        return visprune.PruneResult(tokens, indices, torch.tensor(lengths))

    return fastvid


def _manual_merged(model, inputs, kept, tokens):
    """Qwen2.5-VL's language model by hand (batch 1): the video placeholders at ``kept`` hold
    ``tokens`` (per video, in position order), the others are dropped; every token at the
    position ``get_rope_index`` gives the unpruned prompt."""
    inner = model.model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    slots = (ids[0] == VID).nonzero()[:, 0]
    keep = torch.ones(ids.shape[1], dtype=torch.bool)
    keep[slots] = False
    start = 0
    for k, t, (gt, h, w) in zip(kept, tokens, inputs["video_grid_thw"].tolist()):
        embeds[0, slots[start + k]] = t
        keep[slots[start + k]] = True
        start += gt * h * w // 4
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                  video_grid_thw=inputs["video_grid_thw"])
    out = inner.language_model(inputs_embeds=embeds[:, keep], position_ids=pos[:, :, keep])
    return model.lm_head(out.last_hidden_state)


def _matches_each_video_alone(model, inputs, kept, logits, alone):
    """Per video, the integration kept what ``alone(v, video[T, P, D])`` (the method on that
    video alone, a ``PruneResult`` of one row) keeps, and the logits are the hand-run model's
    on its tokens at their positions.  Returns how many tokens the videos kept in all."""
    tokens = []
    for v, video in enumerate(_videos(model, inputs)):
        res = alone(v, video)
        n = int(res.lengths[0])
        idx, order = res.indices[0, :n].sort()
        assert kept[v].tolist() == idx.tolist()
        tokens.append(res.tokens[0, :n][order])
    with torch.no_grad():
        manual = _manual_merged(model, inputs, kept, tokens)
    torch.testing.assert_close(logits, manual, rtol=1e-4, atol=1e-5)
    return sum(len(t) for t in tokens)


def test_merged_tokens_enter_at_their_anchors_positions_with_a_stub(qwen25, monkeypatch):
    """A stub with FastVID's signature that merges stands in for it: its tokens come in
    descending position order, so the integration must place each by its index, not by its
    rank.  The stub receives each video's merged features (two videos with 6 tokens a frame batched
    with ``frames=``), ``variant="qwen2_5_vl"``, ``r`` from ``keep`` and the saliency, which is
    FastVID's own (transliterated) on each video; the merged tokens enter the language model
    at their anchors' original positions (logits equal the hand-run model), and generate()
    with and without a cache agree."""
    calls = []
    monkeypatch.setattr(methods, "fastvid", _merging_stub(calls), raising=False)
    model = qwen25
    rows = [[3, 4, ("video", [3, 4, 6]), 5, ("video", [2, 4, 6]), 6]]
    inputs = _prompt(model, rows)
    with visprune.enable(model, "fastvid", keep=0.25) as h, torch.no_grad():
        logits = model(**inputs).logits
        kept = [k.clone() for k in h.kept]
        cached = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        uncached = model.generate(**inputs, max_new_tokens=3, use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached)
    call = calls[-1]
    assert call["variant"] == "qwen2_5_vl" and call["r"] == 0.25 and call["frames"] == [3, 2]
    videos = _videos(model, inputs)
    torch.testing.assert_close(call["video"][0], videos[0], rtol=0, atol=0)
    torch.testing.assert_close(call["video"][1, :2], videos[1], rtol=0, atol=0)
    grids = inputs["video_grid_thw"]
    sizes = grids.prod(-1).tolist()
    for v, pixels in enumerate(inputs["pixel_values_videos"].split(sizes)):
        want = _fastvid_transliteration(model, pixels, grids[v:v + 1])
        torch.testing.assert_close(call["saliency"][v, :len(want)], want, rtol=1e-5, atol=1e-6)
    anchors = [[t * 6 + a for t in range(n) for a in (0, 2, 4)] for n in (3, 2)]
    assert [k.tolist() for k in kept] == anchors
    tokens = [((v[:, 0::2] + v[:, 1::2]) / 2).reshape(-1, v.shape[-1]) for v in videos]
    with torch.no_grad():
        manual = _manual_merged(model, inputs, kept, tokens)
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not HAS_FASTVID, reason="visprune.methods has no FastVID here")
def test_fastvid_on_each_video_with_its_saliency(qwen25):
    """FastVID through the integration keeps, per video, what FastVID keeps of that video alone
    with the transliterated saliency; the logits equal the hand-run model on its tokens."""
    model = qwen25
    inputs = _prompt(model, [[3, 4, ("video", [4, 4, 6]), 5, ("video", [2, 4, 4]), 6]])
    with visprune.enable(model, "fastvid", keep=0.5) as h, torch.no_grad():
        logits = model(**inputs).logits
        kept = [k.clone() for k in h.kept]
    grids = inputs["video_grid_thw"]
    pixels = inputs["pixel_values_videos"].split(grids.prod(-1).tolist())

    def alone(v, video):
        sal = _fastvid_transliteration(model, pixels[v], grids[v:v + 1])
        return methods.fastvid(video[None], sal[None], variant="qwen2_5_vl", r=0.5)

    _matches_each_video_alone(model, inputs, kept, logits, alone)


def test_holitom_entry_gets_the_attention_received_with_a_stub(qwen25, monkeypatch):
    """A stub with HoliTom's signature stands in for it (it keeps frame 0 whole).  It receives ``retain_ratio`` from ``keep`` and, per merged token, the mean
    attention received in the tower's last block (as the tower's eager weights give it)."""
    calls = []

    def holitom(video, attention, *, retain_ratio=0.1, frames=None, backend=None):
        calls.append(dict(attention=attention.clone(), retain_ratio=retain_ratio))
        B, T, P, D = video.shape
        return visprune.PruneResult(video[:, 0].clone(), torch.arange(P).repeat(B, 1),
                                    torch.full((B,), P))

    monkeypatch.setattr(methods, "holitom", holitom, raising=False)
    inputs = _prompt(qwen25, [[3, ("video", [2, 4, 6]), 5]])
    with visprune.enable(qwen25, "holitom", keep=3) as h, torch.no_grad():
        qwen25(**inputs)
        assert h.kept[0].tolist() == list(range(6))
    assert calls[-1]["retain_ratio"] == 0.25
    want = _tower_attention(qwen25, inputs["pixel_values_videos"], inputs["video_grid_thw"])
    torch.testing.assert_close(calls[-1]["attention"][0], want.view(2, 6), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.skipif(not hasattr(methods, "holitom"), reason="visprune.methods has no HoliTom")
@pytest.mark.parametrize("options", [{}, {"d": 0.5, "tau": 0.0}], ids=["default", "d=0.5"])
def test_holitom_on_each_video_with_the_attention_received(qwen25, options):
    """HoliTom through the integration keeps, per video, what HoliTom keeps of that video alone
    given the attention each merged token receives in the tower's last block (from the tower's
    own eager weights); its merged tokens enter at their positions (logits equal the hand-run
    model on them), and generate() with and without a cache agree."""
    model = qwen25
    inputs = _prompt(model, [[3, 4, ("video", [4, 4, 6]), 5, ("video", [2, 4, 4]), 6]])
    with visprune.enable(model, "holitom", keep=0.5, **options) as h, torch.no_grad():
        logits = model(**inputs).logits
        kept = [k.clone() for k in h.kept]
        cached = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        uncached = model.generate(**inputs, max_new_tokens=3, use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached)
    grids = inputs["video_grid_thw"]
    pixels = inputs["pixel_values_videos"].split(grids.prod(-1).tolist())

    def alone(v, video):
        T, P, _ = video.shape
        attn = _tower_attention(model, pixels[v], grids[v:v + 1]).view(1, T, P)
        return methods.holitom(video[None], attn, retain_ratio=0.5, **options)

    assert _matches_each_video_alone(model, inputs, kept, logits, alone) < sum(
        v.shape[0] * v.shape[1] for v in _videos(model, inputs))


@pytest.mark.parametrize("keep", [0.5, 10])
def test_prunevid_on_each_video(qwen25, keep):
    """PruneVid through the integration keeps, per video, what PruneVid keeps of that video
    alone (``cluster_ratio`` from ``keep``; ``max_unclustered`` passed through, the tiny
    frames' 6 and 4 tokens being below its default 14); its merged tokens enter at
    their positions (logits equal the hand-run model on them), and generate() with and without
    a cache agree."""
    model = qwen25
    options = {"max_unclustered": 2}
    inputs = _prompt(model, [[3, 4, ("video", [4, 4, 6]), 5, ("video", [2, 4, 4]), 6]])
    with visprune.enable(model, "prunevid", keep=keep, **options) as h, torch.no_grad():
        logits = model(**inputs).logits
        kept = [k.clone() for k in h.kept]
        cached = model.generate(**inputs, max_new_tokens=3, **GREEDY)
        uncached = model.generate(**inputs, max_new_tokens=3, use_cache=False, **GREEDY)
    assert torch.equal(cached, uncached)

    def alone(v, video):
        T, P, _ = video.shape
        ratio = video_parameter("prunevid", keep, T, P)
        assert ratio == (keep if isinstance(keep, float) else min(1.0, keep / (T * P)))
        return methods.prunevid(video[None], cluster_ratio=ratio, **options)

    assert _matches_each_video_alone(model, inputs, kept, logits, alone) < sum(
        v.shape[0] * v.shape[1] for v in _videos(model, inputs))


def test_merging_video_methods_are_refused_on_qwen3():
    """A merged token's deepstack features are undefined: the merging methods are refused on
    Qwen3-VL at enable, and the model still answers unpruned afterwards."""
    model = _qwen3()
    inputs = _prompt(model, [[3, ("video", [2, 4, 4]), 5]])
    with torch.no_grad():
        before = model(**inputs).logits
    for method in ("fastvid", "holitom", "prunevid"):
        with pytest.raises(ValueError, match="deepstack"):
            visprune.enable(model, method, keep=0.5)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, before, rtol=0, atol=0)


def test_table_entries_say_what_each_method_needs():
    table = video_table.VIDEO_METHODS
    assert {m: e.parameter for m, e in table.items()} == {
        "evs": "q", "vidcom2": "q", "dycoke": "k", "fastvid": "r", "holitom": "retain_ratio",
        "prunevid": "cluster_ratio"}
    assert [m for m, e in table.items() if e.merges] == ["fastvid", "holitom", "prunevid"]
    assert table["fastvid"].needs == "saliency" and dict(table["fastvid"].fixed) == {
        "variant": "qwen2_5_vl"}
