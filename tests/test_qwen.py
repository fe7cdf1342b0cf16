"""Pre-LLM pruning on Qwen2.5-VL and Qwen3-VL (visprune.integrations.transformers.qwen), and
the in-LLM engine on Qwen3-VL (deepstack).  Tiny random models built from configs, fp32, CPU.

The reference computations here are written from the models' definitions, not from the
integration: the language model is run by hand on the kept tokens with the positions that
``get_rope_index`` gives the *unpruned* prompt, and the attention substitute is recomputed from
the vision tower's own eager attention weights."""
import pytest
import torch
import transformers
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import visprune
from visprune import methods, ops
from visprune.common import stage1_count
from visprune.integrations.transformers.qwen import unit_budget

IMG, VID, START = 150, 151, 152
TEXT_METHODS = ("trimtokenator", "cdpruner")
ALL = ("trimtokenator", "divprune", "holov", "vispruner", "cdpruner")


def _qwen25(fullatt_block_indexes=(0,)):
    """A tiny random Qwen2.5-VL (2×2 merger, 3-D M-RoPE, GQA), fp32.  By default the last vision
    block uses window attention (the attention substitute's segments are then windows)."""
    config = transformers.Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=64, fullatt_block_indexes=list(fullatt_block_indexes),
                           window_size=56),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=200,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "rope_theta": 10000.0}),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=START,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen3():
    config = transformers.Qwen3VLConfig(
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=4,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           out_hidden_size=64, deepstack_visual_indexes=[0, 1],
                           num_position_embeddings=64),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=200, max_position_embeddings=512, bos_token_id=1,
                         eos_token_id=2,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True, "rope_theta": 10000.0}),
        image_token_id=IMG, video_token_id=VID, vision_start_token_id=START, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.Qwen3VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def model(request):
    return _qwen25() if request.param == "qwen2_5_vl" else _qwen3()


def _patch(model):
    return model.config.vision_config.patch_size


def _prompt(model, rows, seed=0):
    """Left-padded rows; each row is a list of text ids and ``("image"|"video", [t, h, w])``
    items.  Returns the model inputs (pixel values random)."""
    g = torch.Generator().manual_seed(seed)
    p = _patch(model)
    seqs, grids = [], {"image": [], "video": []}
    for row in rows:
        seq = []
        for item in row:
            if isinstance(item, tuple):
                kind, grid = item
                grids[kind].append(grid)
                token = IMG if kind == "image" else VID
                if kind == "video" and isinstance(model, transformers.Qwen3VLForConditionalGeneration):
                    # Qwen3-VL's processor writes a timestamp and a run per frame
                    for f in range(grid[0]):
                        seq += [40 + f, START] + [token] * (grid[1] * grid[2] // 4)
                else:
                    seq += [START] + [token] * (grid[0] * grid[1] * grid[2] // 4)
            else:
                seq.append(item)
        seqs.append(seq)
    width = max(map(len, seqs))
    ids = torch.tensor([[0] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    out = dict(input_ids=ids, attention_mask=mask,
               mm_token_type_ids=(ids == IMG).int() + 2 * (ids == VID).int())
    for kind, pixels, name in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if grids[kind]:
            grid = torch.tensor(grids[kind])
            out[name] = grid
            out[pixels] = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * p * p, generator=g)
    return out


def _row(inputs, r, rows):
    """Row ``r`` of a :func:`_prompt` batch alone (no padding)."""
    keep = inputs["attention_mask"][r].bool()
    out = {k: inputs[k][r:r + 1, keep] for k in ("input_ids", "attention_mask",
                                                  "mm_token_type_ids")}
    for kind, pixels, name in (("image", "pixel_values", "image_grid_thw"),
                               ("video", "pixel_values_videos", "video_grid_thw")):
        if name not in inputs:
            continue
        counts = [[it[1] for it in row if isinstance(it, tuple) and it[0] == kind]
                  for row in rows]
        before = sum(len(c) for c in counts[:r])
        grid = inputs[name][before:before + len(counts[r])]
        if len(grid):
            start = int(inputs[name][:before].prod(-1).sum())
            out[name] = grid
            out[pixels] = inputs[pixels][start:start + int(grid.prod(-1).sum())]
    return out


def _manual_logits(model, inputs, kept):
    """The language model run by hand on the kept tokens (batch 1, no padding): features
    scattered into the placeholders, pruned placeholders dropped, positions taken from
    ``get_rope_index`` on the unpruned prompt, Qwen3-VL's deepstack features at the kept
    tokens.  ``kept``: per image then per video, kept token indices."""
    inner = model.model
    ids = inputs["input_ids"]
    assert ids.shape[0] == 1
    embeds = inner.get_input_embeddings()(ids)
    keep = torch.ones_like(ids, dtype=torch.bool)
    deep = None
    j = 0
    visual = torch.zeros_like(keep)
    for kind, token, pixels, name, get in (
            ("image", IMG, "pixel_values", "image_grid_thw", inner.get_image_features),
            ("video", VID, "pixel_values_videos", "video_grid_thw", inner.get_video_features)):
        if name not in inputs:
            continue
        enc = get(inputs[pixels], inputs[name], return_dict=True)
        feats = torch.cat(list(enc.pooler_output))
        slots = (ids[0] == token).nonzero()[:, 0]
        embeds[0, slots] = feats
        visual[0, slots] = True
        mine = torch.zeros(len(slots), dtype=torch.bool)
        start = 0
        for f in enc.pooler_output:
            mine[start + kept[j]] = True
            start += len(f)
            j += 1
        keep[0, slots[~mine]] = False
        if getattr(enc, "deepstack_features", None) is not None:
            layers = [torch.cat(list(layer)) for layer in enc.deepstack_features]
            full = [torch.zeros(ids.shape[1], feats.shape[1]) for _ in layers]
            for f, d in zip(full, layers):
                f[slots] = d
            deep = full if deep is None else [a + b for a, b in zip(deep, full)]
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                  image_grid_thw=inputs.get("image_grid_thw"),
                                  video_grid_thw=inputs.get("video_grid_thw"))
    k = keep[0]
    extra = {}
    if deep is not None:
        extra = dict(visual_pos_masks=visual[:, k],
                     deepstack_visual_embeds=[d[k][visual[0, k]] for d in deep])
    out = inner.language_model(inputs_embeds=embeds[:, k], position_ids=pos[:, :, k], **extra)
    return model.lm_head(out.last_hidden_state)


def _tower_attention(model, pixels, grid):
    """Per merged token, the mean attention received in the last vision block, from the
    tower's own eager attention weights (recorded by an attention function that calls the
    model's eager attention)."""
    module = __import__(type(model).__module__, fromlist=["eager_attention_forward"])
    visual = model.model.visual
    weights = []
    target = visual.blocks[-1].attn

    def recording(mod, q, k, v, attention_mask, **kw):
        out, w = module.eager_attention_forward(mod, q, k, v, attention_mask, **kw)
        if mod is target:
            weights.append(w[0])                          # [H, n, n]
        return out, w

    ALL_ATTENTION_FUNCTIONS.register("visprune_test_record", recording)
    config = visual.config
    before = config._attn_implementation
    config._attn_implementation = "visprune_test_record"
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grid)
    finally:
        config._attn_implementation = before
        ALL_ATTENTION_FUNCTIONS._local_mapping.pop("visprune_test_record", None)
    patch = torch.cat([w.mean((0, 1)) for w in weights])      # in the block's token order
    score = patch.view(-1, 4).mean(1)
    if hasattr(visual, "fullatt_block_indexes"):                 # undo the window order
        from transformers.vision_utils import get_vision_window_index
        c = model.config.vision_config
        window, _ = get_vision_window_index(grid, spatial_merge_size=2,
                                            window_size=c.window_size, patch_size=c.patch_size)
        score = score[torch.argsort(window)]
    return score


# --------------------------------------------------------------------------- the logits
@pytest.mark.parametrize("method", ALL)
def test_logits_equal_the_language_model_on_the_kept_tokens(model, method):
    """Two images of different sizes in one prompt: the pruned model's logits are those of the
    language model run by hand on the kept tokens at their original 3-D positions, and the
    first generated token agrees."""
    rows = [[3, 4, ("image", [1, 4, 6]), 5, 6, ("image", [1, 6, 4]), 7, 8]]
    inputs = _prompt(model, rows)
    with visprune.enable(model, method, keep=3) as h, torch.no_grad():
        logits = model(**inputs).logits
        assert [len(k) for k in h.kept] == [3, 3]
        kept = [k.clone() for k in h.kept]
        first = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1]
    with torch.no_grad():
        manual = _manual_logits(model, inputs, kept)
    assert logits.shape == manual.shape == (1, inputs["input_ids"].shape[1] - 6, 200)
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)
    assert int(first) == int(manual[0, -1].argmax())


@pytest.mark.parametrize("method", ALL)
def test_keep_all_reproduces_the_unpruned_model(model, method):
    inputs = _prompt(model, [[3, ("image", [1, 4, 6]), 5, ("image", [1, 2, 2]), 7]])
    # TrimTokenator's stage 1 must keep every token too (its default is 0.8)
    everything = {"stage1_keep": 1.0} if method == "trimtokenator" else {}
    with torch.no_grad():
        full = model(**inputs).logits
        with visprune.enable(model, method, keep=1.0, **everything):
            same = model(**inputs).logits
        with visprune.enable(model, method, keep=1000):       # an int above every image
            same_int = model(**inputs).logits
    torch.testing.assert_close(same, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(same_int, full, rtol=1e-5, atol=1e-5)


def test_disable_restores_the_model(model):
    inputs = _prompt(model, [[3, ("image", [1, 4, 6]), 5]])
    generate = model.generate
    with torch.no_grad():
        before = model(**inputs).logits
        h = visprune.enable(model, "divprune", keep=2)
        assert model(**inputs).logits.shape[1] == before.shape[1] - 4
        h.disable()
        after = model(**inputs).logits
    assert "generate" not in model.__dict__ and model.generate == generate
    assert not h.enabled
    torch.testing.assert_close(after, before, rtol=0, atol=0)


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("method", ["divprune", "trimtokenator", "holov"])
def test_padded_batch_equals_rows_alone(model, method):
    """Rows of different lengths (left padding), images of different sizes, a row without an
    image: each row's last logits and greedy generation equal the row run alone."""
    rows = [[3, 4, ("image", [1, 4, 6]), 5, 6, 7],
            [9, ("image", [1, 6, 6]), 10, ("image", [1, 4, 4]), 11],
            [12, 13, 14]]
    inputs = _prompt(model, rows)
    steps = 3
    with visprune.enable(model, method, keep=0.5), torch.no_grad():
        logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=steps, do_sample=False)
        assert out.shape[1] == inputs["input_ids"].shape[1] + steps
        for r in range(len(rows)):
            alone = _row(inputs, r, rows)          # the text-only row passes unpruned
            ref = model(**alone).logits[0, -1]
            gen = model.generate(**alone, max_new_tokens=steps, do_sample=False)
            torch.testing.assert_close(logits[r, -1], ref, rtol=1e-4, atol=1e-5)
            assert out[r, -steps:].tolist() == gen[0, -steps:].tolist()


def test_text_only_calls_pass_through(model):
    inputs = _prompt(model, [[3, 4, 5, 6]])
    with torch.no_grad():
        ref = model(**inputs).logits
        with visprune.enable(model, "divprune", keep=2):
            torch.testing.assert_close(model(**inputs).logits, ref, rtol=0, atol=0)


# --------------------------------------------------------------------------- video
def test_video_per_clip_and_per_frame(model):
    """A video of 3 temporal groups × 4×6 patches (6 merged tokens per frame, 18 per clip): per
    clip keeps ``keep`` of the 18; ``per_frame`` keeps ``keep`` of each frame; the logits equal
    the language model run by hand on the kept tokens."""
    inputs = _prompt(model, [[3, 4, ("video", [3, 4, 6]), 5, 6]])
    with torch.no_grad():
        with visprune.enable(model, "divprune", keep=4) as h:
            clip = model(**inputs).logits
            assert [len(k) for k in h.kept] == [4]
            kept_clip = [k.clone() for k in h.kept]
        with visprune.enable(model, "divprune", keep=2, per_frame=True) as h:
            frame = model(**inputs).logits
            kept = h.kept[0]
            assert len(kept) == 6 and (kept // 6).bincount(minlength=3).tolist() == [2, 2, 2]
            kept_frame = [kept.clone()]
        torch.testing.assert_close(clip, _manual_logits(model, inputs, kept_clip),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(frame, _manual_logits(model, inputs, kept_frame),
                                   rtol=1e-5, atol=1e-5)
        # per frame = each frame's own DivPrune on its features
        feats = torch.cat(list(model.model.get_video_features(
            inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output))
        want = torch.cat([ops.greedy_select(feats[None, 6 * f:6 * f + 6], 2)[0].sort().values
                          + 6 * f for f in range(3)])
        assert kept_frame[0].tolist() == want.tolist()


def test_per_frame_handle_serves_images_videos_and_both(model):
    """``per_frame`` splits videos only: on a prompt with images and no video, forward and
    generate prune as without it; a prompt with an image and a video keeps ``keep`` of the
    image and of each frame; the logits equal the language model run by hand."""
    image = _prompt(model, [[3, 4, ("image", [1, 4, 6]), 5, 6]])
    mixed = _prompt(model, [[3, ("image", [1, 4, 4]), 4, ("video", [2, 4, 4]), 5]])
    with torch.no_grad():
        with visprune.enable(model, "divprune", keep=2) as h:
            want = model(**image).logits
            want_kept = [k.tolist() for k in h.kept]
            want_gen = model.generate(**image, max_new_tokens=2, do_sample=False)
        with visprune.enable(model, "divprune", keep=2, per_frame=True) as h:
            got = model(**image).logits
            assert [k.tolist() for k in h.kept] == want_kept
            gen = model.generate(**image, max_new_tokens=2, do_sample=False)
            both = model(**mixed).logits
            kept = [k.clone() for k in h.kept]
        manual = _manual_logits(model, mixed, kept)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert gen.tolist() == want_gen.tolist()
    assert len(kept[0]) == 2 and (kept[1] // 4).bincount(minlength=2).tolist() == [2, 2]
    torch.testing.assert_close(both, manual, rtol=1e-5, atol=1e-5)


def test_images_and_video_in_one_prompt(model):
    inputs = _prompt(model, [[3, ("image", [1, 4, 4]), 4, ("video", [2, 4, 4]), 5]])
    with visprune.enable(model, "cdpruner", keep=0.5) as h, torch.no_grad():
        logits = model(**inputs).logits
        assert [len(k) for k in h.kept] == [2, 4]
        kept = [k.clone() for k in h.kept]
    torch.testing.assert_close(logits, _manual_logits(model, inputs, kept), rtol=1e-5,
                               atol=1e-5)


# --------------------------------------------------------------------------- selection
def test_selection_matches_each_method_on_each_image(model):
    """The kept tokens are those of the method called on each image's merged features alone
    (DivPrune through the varlen op; HoloV / VisPruner with the attention the tower's eager
    weights give; TrimTokenator / CDPruner with the row's text embeddings)."""
    rows = [[3, 4, ("image", [1, 4, 6]), 5, ("image", [1, 6, 6]), 6, 7]]
    inputs = _prompt(model, rows)
    inner = model.model
    with torch.no_grad():
        enc = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        feats = list(enc.pooler_output)
        attn = _tower_attention(model, inputs["pixel_values"], inputs["image_grid_thw"])
        ids = inputs["input_ids"]
        text = inner.get_input_embeddings()(ids[:, (ids[0] != IMG)])
    attn = attn.split([len(f) for f in feats])
    expect = {
        "divprune": lambda f, a, k: methods.divprune(f[None], k).indices[0],
        "holov": lambda f, a, k: methods.holov(f[None], a[None], k).indices[0],
        "vispruner": lambda f, a, k: methods.vispruner(f[None], a[None], k).indices[0],
        "trimtokenator": lambda f, a, k: methods.trimtokenator(
            f[None], text, k, stage1_keep=max(k, stage1_count(len(f), 0.8))).indices[0],
        "cdpruner": lambda f, a, k: methods.cdpruner(
            f[None], k, relevance=-ops.mi_scores(f[None], text, metric="cosine")).indices[0],
    }
    for method, fn in expect.items():
        with visprune.enable(model, method, keep=4) as h, torch.no_grad():
            model(**inputs)
            got = [k.tolist() for k in h.kept]
        want = [sorted(fn(f, a, 4).tolist()) for f, a in zip(feats, attn)]
        assert got == want, method


def test_attention_substitute_ranks_like_the_eager_weights(model):
    """VisPruner with important_ratio=1 keeps the top-k tokens by the substitute score: they
    are the top-k of the mean attention received computed from the eager weights."""
    inputs = _prompt(model, [[3, ("image", [1, 6, 8]), 5]])
    with torch.no_grad():
        attn = _tower_attention(model, inputs["pixel_values"], inputs["image_grid_thw"])
    with visprune.enable(model, "vispruner", keep=5, important_ratio=1.0) as h, torch.no_grad():
        model(**inputs)
    assert h.kept[0].tolist() == sorted(attn.argsort(descending=True, stable=True)[:5].tolist())


# --------------------------------------------------------------------------- keep semantics
def test_unit_budget():
    assert [unit_budget(64, n) for n in (0, 10, 64, 100)] == [0, 10, 64, 64]
    assert [unit_budget(0.25, n) for n in (1, 2, 6, 10, 100)] == [1, 1, 2, 3, 25]
    assert unit_budget(1.0, 37) == 37


def test_keep_int_caps_small_images(model):
    inputs = _prompt(model, [[3, ("image", [1, 2, 4]), 4, ("image", [1, 6, 6]), 5]])
    with visprune.enable(model, "divprune", keep=5) as h, torch.no_grad():
        model(**inputs)
        assert [len(k) for k in h.kept] == [2, 5]


# --------------------------------------------------------------------------- in-LLM on Qwen3-VL
def _manual_inllm(model, inputs, positions, layer):
    """Qwen3-VL's language model by hand, batch 1: every token through layers ``< layer``,
    then only ``positions`` (their original positions and, for the deepstack layers that
    remain, their deepstack features)."""
    inner, lm = model.model, model.model.language_model
    ids = inputs["input_ids"]
    embeds = inner.get_input_embeddings()(ids)
    enc = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    visual = ids[0] == IMG
    embeds[0, visual] = torch.cat(list(enc.pooler_output))
    deep = [torch.cat(list(d)) for d in enc.deepstack_features]
    pos, _ = inner.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                  image_grid_thw=inputs["image_grid_thw"])
    hidden = embeds
    cos, sin = lm.rotary_emb(hidden, pos)
    L = ids.shape[1]
    vis_rows = torch.full((L,), -1)
    vis_rows[visual] = torch.arange(int(visual.sum()))
    for l, block in enumerate(lm.layers):
        n = hidden.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        hidden = block(hidden, attention_mask=mask, position_embeddings=(cos, sin))
        if l == layer - 1:
            hidden, cos, sin = hidden[:, positions], cos[:, positions], sin[:, positions]
            vis_rows = vis_rows[positions]
        if l < len(deep):
            rows = vis_rows >= 0
            hidden = hidden.clone()
            hidden[0, rows] = hidden[0, rows] + deep[l][vis_rows[rows]]
    return model.lm_head(lm.norm(hidden))


@pytest.mark.parametrize("method,kw", [("fastv", dict(keep=3, layer=1)),
                                       ("dart", dict(keep=4, layer=1, pivot_image=1,
                                                     pivot_text=1))])
def test_inllm_on_qwen3_vl_filters_deepstack(method, kw):
    """In-LLM pruning after layer 0 of Qwen3-VL, whose deepstack features are added after
    layers 0 and 1: the logits equal the layers run by hand with the deepstack features of
    the kept tokens only."""
    model = _qwen3()
    inputs = _prompt(model, [[3, 4, ("image", [1, 4, 6]), 5, ("image", [1, 6, 4]), 7, 8]])
    with visprune.enable(model, method, **kw) as h, torch.no_grad():
        logits = model(**inputs).logits
        positions = h.positions[0]
    assert int((inputs["input_ids"][0, positions] == IMG).sum()) < 12
    with torch.no_grad():
        manual = _manual_inllm(model, inputs, positions, kw["layer"])
    torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- errors
def test_errors_before_any_work(model):
    with pytest.raises(ValueError, match="prumerge is not available.*M-RoPE"):
        visprune.enable(model, "prumerge")
    with pytest.raises(ValueError, match="visionzip is not available"):
        visprune.enable(model, "visionzip", keep=4)
    with pytest.raises(ValueError, match="keep must be an int >= 1 or a float in \\(0, 1\\]"):
        visprune.enable(model, "divprune", keep=1.5)
    with pytest.raises(TypeError, match="keep must be an int"):
        visprune.enable(model, "divprune", keep="8")
    with pytest.raises(ValueError, match="divprune needs keep"):
        visprune.enable(model, "divprune")
    with pytest.raises(TypeError, match="takes no argument\\(s\\) \\['num_crops'\\]"):
        visprune.enable(model, "divprune", keep=4, num_crops=4)
    with pytest.raises(ValueError, match="redistribute=True"):
        visprune.enable(model, "holov", keep=4, redistribute=False)
    with pytest.raises(TypeError, match="per_frame must be a bool"):
        visprune.enable(model, "divprune", keep=4, per_frame=1)
    assert "generate" not in model.__dict__          # nothing was installed
    inputs = _prompt(model, [[3, ("image", [1, 4, 4]), 5]])
    with visprune.enable(model, "divprune", keep=2):
        bad = dict(inputs, image_grid_thw=torch.tensor([[1, 4, 8]]))
        with pytest.raises(ValueError, match="input_ids hold 4 image placeholder tokens, but "
                                             "the 1 image\\(s\\) have \\[8\\]"):
            model(**bad)
        with pytest.raises(ValueError, match="trimtokenator|pixel_values needs image_grid_thw"):
            model(**dict(inputs, image_grid_thw=None))
    with visprune.enable(model, "trimtokenator", keep=2):
        only = _prompt(model, [[("image", [1, 4, 4])]])
        only = dict(only, input_ids=only["input_ids"][:, 1:],         # no START token either
                    attention_mask=only["attention_mask"][:, 1:],
                    mm_token_type_ids=only["mm_token_type_ids"][:, 1:])
        with pytest.raises(ValueError, match="needs text tokens next to every image"):
            model(**only)


@pytest.mark.parametrize("keep,stage1_keep,expected", [
    (4, 0, "an int >= keep=4"), (4, -3, "an int >= keep=4"), (4, 3, "an int >= keep=4"),
    (0.5, 0, "an int >= 1"), (0.5, 0.25, "a fraction >= keep=0.5"),
    (4, 1.5, "in \\(0, 1\\]"), (4, 0.0, "in \\(0, 1\\]")])
def test_bad_stage1_keep_is_refused_at_enable(model, keep, stage1_keep, expected):
    """keep <= stage1_keep, as TrimTokenator itself requires, wherever the two compare for every
    unit (both counts, or both fractions): refused at enable, before any image is encoded, with
    the argument, the value received and what was expected."""
    with pytest.raises(ValueError, match=f"stage1_keep.*{expected}.*got {stage1_keep}"):
        visprune.enable(model, "trimtokenator", keep=keep, stage1_keep=stage1_keep).disable()
    assert "generate" not in model.__dict__          # nothing was installed


def test_stage1_keep_is_per_unit_and_never_below_the_units_budget(model):
    """stage1_keep follows keep's rule per image (a fraction rounded half up, at least one; an
    int at most the image).  Where an int and a fraction leave an image fewer stage-1 survivors
    than its budget (an int keep and a small image, a fraction keep and a large one), stage 1
    keeps the budget, as an image smaller than an int keep keeps all its tokens."""
    rows = [[3, 4, ("image", [1, 2, 12]), 5, ("image", [1, 6, 6]), 6, ("image", [1, 2, 4]), 7]]
    inputs = _prompt(model, rows)
    inner = model.model
    with torch.no_grad():
        feats = list(inner.get_image_features(inputs["pixel_values"],
                                              inputs["image_grid_thw"]).pooler_output)
        ids = inputs["input_ids"]
        text = inner.get_input_embeddings()(ids[:, (ids[0] != IMG)])
        got = {}
        for keep, stage1_keep in ((4, 0.5), (0.5, 3)):
            with visprune.enable(model, "trimtokenator", keep=keep,
                                 stage1_keep=stage1_keep) as h:
                model(**inputs)
                got[keep] = [k.tolist() for k in h.kept]
    assert [len(f) for f in feats] == [6, 9, 2]

    def want(budgets, stage1):
        return [sorted(methods.trimtokenator(f[None], text, k, stage1_keep=s1)
                       .indices[0].tolist()) for f, k, s1 in zip(feats, budgets, stage1)]

    # keep=4, stage1_keep=0.5: stage 1 keeps 4 of 6 (not round(3.0) = 3), 5 of 9, 2 of 2
    assert got[4] == want((4, 4, 2), (4, 5, 2))
    # keep=0.5, stage1_keep=3: budgets 3, 5 (4.5 rounded up), 1; stage 1 keeps 3, 5 (not 3), 2
    assert got[0.5] == want((3, 5, 1), (3, 5, 2))


def test_hand_written_decoding_continues_the_unpruned_positions(model):
    """prune_inputs, then decoding steps without position_ids (the model's rope_deltas, as
    transformers computes them for an unpadded row) give the logits generate() gives with its
    explicit positions."""
    inputs = _prompt(model, [[3, 4, ("image", [1, 4, 6]), 5, ("image", [1, 6, 4]), 8]])
    with visprune.enable(model, "divprune", keep=2) as h, torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        shrunk = h.prune_inputs(**inputs)
        out = model(**shrunk, use_cache=True)
        logits, cache = [out.logits[:, -1]], out.cache
        for _ in range(2):
            token = logits[-1].argmax(-1, keepdim=True)
            step = model(input_ids=token, cache=cache)
            logits.append(step.logits[:, -1])
    for got, want in zip(logits, ref.logits):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _decode_positions(model, run):
    """The 3-D positions ``[3, B·beams, steps]`` the language model gets in the decoding steps
    of ``run()`` (every call after the first, which is the prompt's)."""
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["position_ids"][-3:].clone())

    hook = model.model.language_model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            run()
    finally:
        hook.remove()
    return torch.cat(seen[1:], -1)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_decoding_continues_the_unpruned_positions_after_a_trailing_image(model, num_beams):
    """generate(): the new tokens get the 3-D positions the unpruned generate() gives them, also
    in rows that end with an image whose last tokens are pruned (generate() extends the
    prompt's last position, which is the image's last token without pruning); padded batch,
    rows ending with text and with an image, greedy and beam search."""
    rows = [[3, 4, ("image", [1, 4, 6])],
            [5, ("image", [1, 6, 4]), 6, 7, 8, 9],
            [7, ("image", [1, 4, 4]), 8, ("image", [1, 6, 6])]]
    inputs = _prompt(model, rows, seed=6)
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=num_beams)
    want = _decode_positions(model, lambda: model.generate(**inputs, **kw))
    with visprune.enable(model, "divprune", keep=2) as h:
        got = _decode_positions(model, lambda: model.generate(**inputs, **kw))
    # the case at stake: the last token of the images that end rows 0 and 2 is pruned
    last = (inputs["image_grid_thw"].prod(-1) // 4 - 1).tolist()
    assert [last[i] in h.kept[i].tolist() for i in (0, 3)] == [False, False]
    assert got.tolist() == want.tolist()


def test_hand_written_step_after_a_trailing_image_matches_the_unpruned_one(model):
    """A decoding step without position_ids (the model's rope_deltas) after a prompt that ends
    with an image gets the position the same step gets after the unpruned prompt."""
    inputs = _prompt(model, [[3, 4, ("image", [1, 4, 6])]])
    token = torch.tensor([[9]])

    def step(prompt):
        def run():
            out = model(**prompt, use_cache=True)
            model(input_ids=token, cache=out.cache)
        return run

    want = _decode_positions(model, step(inputs))
    with visprune.enable(model, "divprune", keep=2) as h:
        got = _decode_positions(model, step(h.prune_inputs(**inputs)))
    assert got.tolist() == want.tolist()


def test_e2e_benchmark_runs_on_the_tiny_qwen(tmp_path):
    """benchmarks/e2e.py --model qwen2_5_vl: one pre-LLM and one in-LLM row on the tiny model;
    the kept counts are the fraction of the image's 324 merged tokens."""
    import importlib.util
    import json
    import pathlib
    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "e2e.py"
    spec = importlib.util.spec_from_file_location("visprune_e2e", path)
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)
    out = tmp_path / "rows.json"
    e2e.main(["--device", "cpu", "--model", "qwen2_5_vl", "--methods", "divprune", "fastv",
              "--keeps", "0.25", "--reps", "1", "--gen-reps", "1", "--new-tokens", "2",
              "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["method"], r["kept"]) for r in rows] == [("none", 324), ("divprune", 81),
                                                       ("fastv", 81)]
    assert all(r["prefill_ms"] > 0 and r["prune_ms"] >= 0 for r in rows)
