"""The in-LLM engine (FastV, FitPrune, DART) where generation and model handling get unusual:
Qwen3-VL videos written as one placeholder run per frame, generate() options the engine cannot
follow (chunked prefill, assisted decoding), ``use_cache=False``, deep copies of an enabled model
and of a pruned prompt cache, fractional budgets on tiny images, positional arguments, changes of
the attention implementation while enabled, sliding-window backbones, and NumPy counts.  Tiny
random models, fp32, CPU."""
import copy

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import visprune  # noqa: E402
from visprune.integrations.transformers import active_handle  # noqa: E402

from test_inllm import ROWS, _positions  # noqa: E402
from test_integration import IMAGE, _batch, _build, _configs, _snapshot  # noqa: E402
from test_integration import llava, llava_next  # noqa: E402,F401  (the tiny models' fixtures)
from test_qwen import IMG, VID, _prompt, _qwen3, _qwen25  # noqa: E402

METHODS = [("fastv", dict(keep=5, layer=1)), ("fitprune", dict(recipe={0: 4, 1: 3})),
           ("dart", dict(keep=4, layer=1, pivot_image=1, pivot_text=1))]
IDS = [m for m, _ in METHODS]


@pytest.fixture(scope="module")
def qwen3():
    return _qwen3()


@pytest.fixture(scope="module")
def qwen25():
    return _qwen25()


class _VisionCalls:
    """Counts the vision tower's forward calls."""

    def __init__(self, tower):
        self.calls = 0
        self._hook = tower.register_forward_hook(lambda *a: setattr(self, "calls",
                                                                    self.calls + 1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def _kept(inputs, positions, token):
    """How many ``token`` placeholders each row keeps after the pruning layers."""
    ids = inputs["input_ids"]
    return ((ids.gather(1, positions.clamp(min=0)) == token) & (positions >= 0)).sum(1).tolist()


def _qwen3_video(model, seed=0):
    """A 36-token Qwen3-VL video (4 temporal groups of 6×6 patches, 9 merged tokens each) as
    its processor writes it: per group a timestamp, ``<vision_start>`` and a run of 9
    placeholders; text before and after."""
    return _prompt(model, [[3, 4, ("video", [4, 6, 6]), 5, 6, 7]], seed=seed)


# --------------------------------------------------------------------------- a video is one unit
@pytest.mark.parametrize("method,kw,per_video,per_frame", [
    ("dart", dict(keep=4, layer=1, pivot_image=1, pivot_text=1), 1 + 2 * 2, 4 * (1 + 2 * 2)),
    ("fastv", dict(keep=5, layer=1), 5, 4 * 5),
    ("fitprune", dict(recipe={0: 3, 1: 2}), 36 - 5, 4 * (9 - 5)),
], ids=["dart", "fastv", "fitprune"])
def test_qwen3_vl_video_is_one_unit_unless_per_frame(qwen3, method, kw, per_video, per_frame):
    inputs = _qwen3_video(qwen3)
    for frames, expected in ((False, per_video), (True, per_frame)):
        with visprune.enable(qwen3, method, per_frame=frames, **kw) as h, torch.no_grad():
            qwen3(**inputs)
            assert _kept(inputs, h.positions, VID) == [expected]


def _fitprune_oracle(model, inputs, layer, deleted):
    """FitPrune's deletions after ``layer`` as documented, from the unpruned eager attention
    (batch 1, pruning at that layer only): head-max map; ``cross_j`` = the text rows after the
    whole video, summed; ``self_j`` = the video's rows, summed, / the video's count; the
    ``deleted`` lowest ``cross·self`` (stable: ties delete the lower index)."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attn = eager(**inputs, output_attentions=True).attentions[layer][0].amax(0)   # [L, L]
    video = (inputs["input_ids"][0] == VID).nonzero()[:, 0]
    after = torch.arange(int(video[-1]) + 1, attn.shape[0])
    cross = attn[after][:, video].sum(0)
    self_ = attn[video][:, video].sum(0) / len(video)
    order = torch.sort(cross * self_, stable=True).indices
    return set(video[order[deleted:]].tolist())


def test_qwen3_vl_video_fitprune_statistics_are_per_video(qwen3):
    inputs = _qwen3_video(qwen3, seed=4)
    with visprune.enable(qwen3, "fitprune", recipe={1: 12}) as h, torch.no_grad():
        qwen3(**inputs)
        got = {int(p) for p in h.positions[0] if inputs["input_ids"][0, p] == VID}
    assert got == _fitprune_oracle(qwen3, inputs, 1, 12)


def test_fastv_and_dart_keep_at_least_one_token_of_a_tiny_unit(qwen25):
    """A fractional keep that rounds to 0, or a DART budget smaller than its pivots, keeps one
    token of every unit (keep=0 is refused)."""
    inputs = _prompt(qwen25, [[3, ("image", [1, 4, 4]), 5, 6]])       # 4 merged tokens
    for method, kw in (("fastv", dict(keep=0.1, layer=1)),
                       ("dart", dict(keep=1, layer=1, pivot_image=0, pivot_text=2)),
                       ("dart", dict(keep=0.1, layer=1, pivot_image=0, pivot_text=1))):
        with visprune.enable(qwen25, method, **kw) as h, torch.no_grad():
            qwen25(**inputs)
            assert _kept(inputs, h.positions, IMG) == [1], (method, kw)
    with pytest.raises(ValueError, match="deletes 4 tokens per image"):
        with visprune.enable(qwen25, "fitprune", recipe={0: 4}), torch.no_grad():
            qwen25(**inputs)


# --------------------------------------------------------------------------- generate() options
@pytest.mark.parametrize("option", [dict(prefill_chunk_size=4), dict(prompt_lookup_num_tokens=3)],
                         ids=["chunked-prefill", "prompt-lookup"])
def test_generate_options_the_engine_cannot_follow_are_refused(llava, option):
    inputs = _batch(llava, ROWS[:1])
    with visprune.enable(llava, "fastv", keep=4, layer=1), _VisionCalls(
            llava.model.vision_tower) as vision:
        with pytest.raises(NotImplementedError, match=next(iter(option))):
            llava.generate(**inputs, max_new_tokens=3, do_sample=False, **option)
        assert vision.calls == 0
        out = llava.generate(**inputs, max_new_tokens=3, do_sample=False)   # still answers
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


@pytest.mark.parametrize("family", ["llava_next", "qwen"])
def test_generate_refuses_a_too_large_keep_before_the_vision_tower(llava_next, qwen25, family):
    if family == "qwen":
        model, inputs = qwen25, _prompt(qwen25, [[3, ("image", [1, 4, 4]), 5]])
        tower, keep = qwen25.model.visual, 5
    else:
        model, inputs = llava_next, _batch(llava_next, [[5, "<image>", 6]])
        tower, keep = llava_next.model.vision_tower, int((inputs["input_ids"] == IMAGE).sum()) + 1
    with visprune.enable(model, "fastv", keep=keep, layer=1), _VisionCalls(tower) as vision:
        with pytest.raises(ValueError, match=f"keep={keep} is larger than image 0's"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert vision.calls == 0


@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_generate_without_cache_prunes_as_the_prompt_says(llava, qwen25, family, method, kw):
    """Without a KV cache, generate() reruns prompt + new tokens at every step: the pruning
    stays the prompt's (FastV's last token is the prompt's), so the tokens are those generated
    with the cache."""
    if family == "llava":
        model, inputs = llava, _batch(llava, ROWS, side="left")
    else:
        model = qwen25
        inputs = _prompt(qwen25, [[3, 4, ("image", [1, 4, 6]), 5, 6, 7], [9, ("image", [1, 6, 6]),
                                                                          10]])
    kw = dict(kw, recipe={0: 3, 1: 2}) if method == "fitprune" else kw
    with visprune.enable(model, method, **kw), torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True)
        uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# --------------------------------------------------------------------------- copies
@pytest.mark.parametrize("method,kw", [METHODS[0], ("divprune", dict(keep=4))],
                         ids=["fastv", "divprune"])
def test_deepcopy_of_an_enabled_model_is_a_pruned_model_of_its_own(method, kw):
    model = _build("llava")
    inputs = _batch(model, ROWS, side="left")
    with torch.no_grad():
        unpruned = model(**inputs).logits
    handle = visprune.enable(model, method, **kw)
    with torch.no_grad():
        pruned = model(**inputs).logits
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(**inputs).logits, pruned)
        assert pruned.shape[1] < unpruned.shape[1]
        # the copy's generate runs the copy: change its weights, its output follows
        twin.lm_head.weight.mul_(-1)
        mine = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        theirs = twin.generate(**inputs, max_new_tokens=3, do_sample=False)
        twin.lm_head.weight.mul_(-1)
        assert not torch.equal(mine, theirs)
        assert torch.equal(twin.generate(**inputs, max_new_tokens=3, do_sample=False), mine)
    twin_handle = active_handle(twin)
    assert twin_handle is not None and twin_handle is not handle and twin_handle.model is twin
    twin_handle.disable()                                       # the original stays pruned
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, pruned)
        torch.testing.assert_close(twin(**inputs).logits, unpruned)
    handle.disable()
    assert _snapshot(twin)[1:] == _snapshot(model)[1:]
    with visprune.enable(twin, method, **kw), torch.no_grad():  # the copy can be enabled again
        torch.testing.assert_close(twin(**inputs).logits, pruned)


@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
def test_deep_copied_prompt_cache_continues_as_the_original(llava, method, kw):
    """transformers' prompt reuse: prefill once into a cache, deep-copy it per continuation."""
    inputs = _batch(llava, ROWS, side="left")
    more = torch.tensor([[7, 8, 9]] * len(ROWS))
    mask = torch.cat([inputs["attention_mask"], torch.ones_like(more)], 1)

    def continue_from(cache):          # at the positions generate() gives the new tokens
        positions = (mask.cumsum(1) - 1)[:, -more.shape[1]:]
        return llava(input_ids=more, attention_mask=mask, position_ids=positions,
                     cache=cache).logits

    with visprune.enable(llava, method, **kw), torch.no_grad():
        prompt_cache = transformers.DynamicCache(config=llava.config.text_config)
        llava(**inputs, cache=prompt_cache)
        reused = continue_from(copy.deepcopy(prompt_cache))
        again = continue_from(copy.deepcopy(prompt_cache))
        out = llava.generate(input_ids=torch.cat([inputs["input_ids"], more], 1),
                             attention_mask=mask, max_new_tokens=2, do_sample=False,
                             cache=copy.deepcopy(prompt_cache))
        original = continue_from(prompt_cache)
    torch.testing.assert_close(reused, original)
    torch.testing.assert_close(again, original)
    assert torch.equal(out[:, -2], original[:, -1].argmax(-1))


# --------------------------------------------------------------------------- calls and settings
def test_labels_with_positional_pixel_values_are_refused(llava):
    inputs = _batch(llava, ROWS[:1])
    with visprune.enable(llava, "fastv", keep=4, layer=1):
        with pytest.raises(NotImplementedError, match="labels"):
            llava(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                  labels=inputs["input_ids"])


def test_dart_with_fewer_text_tokens_than_pivots(llava):
    """The pivots found share the budget (t = int(budget / pivots found)); a pivot_text wider
    than the whole prompt, or a prompt that ends with the image, does not crash."""
    cases = [([5, "<image>", 6, 7, 8, 9], 4, 1 + 5 * 1),        # 4 text pivots: t = int(8/5)
             ([5, "<image>", 6], 4, 1 + 2 * 4),                   # 1 text pivot: t = int(8/2)
             ([5, "<image>"], 4, 1 + 1 * 8),                      # none: the image pivot alone
             ([5, "<image>", 6, 7], 50, 1 + 3 * 2)]               # wider than the sequence
    for prompt, pivot_text, expected in cases:
        inputs = _batch(llava, [prompt])
        with visprune.enable(llava, "dart", keep=8, layer=1, pivot_image=1,
                             pivot_text=pivot_text) as h, torch.no_grad():
            llava(**inputs)
            assert _kept(inputs, h.positions, IMAGE) == [expected], prompt


def test_set_attn_implementation_while_enabled_is_followed():
    model = _build("llava")
    inputs = _batch(model, ROWS, side="left")
    eager = _build("llava")
    eager.set_attn_implementation("eager")
    with visprune.enable(eager, "fitprune", recipe={0: 4, 1: 3}), torch.no_grad():
        expected = eager(**inputs).logits
    with visprune.enable(model, "fitprune", recipe={0: 4, 1: 3}) as h, torch.no_grad():
        model.set_attn_implementation("eager")
        torch.testing.assert_close(model(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        assert model.config.text_config._attn_implementation == "visprune_eager"
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
        model.config.text_config._attn_implementation = "flash_attention_2"
        with pytest.raises(ValueError, match="set to 'flash_attention_2' while pruning"):
            model(**inputs)
        model.set_attn_implementation("eager")
        h.disable()
        assert model.config.text_config._attn_implementation == "eager"
    with visprune.enable(model, "fastv", keep=4, layer=1) as h:
        model.set_attn_implementation("sdpa")
    assert model.config.text_config._attn_implementation == "sdpa"   # the caller's choice


def test_positions_mark_padding_when_nothing_is_pruned(llava):
    inputs = _batch(llava, ROWS, side="left")
    for kw in (dict(keep=16), dict(keep=1.0)):
        with visprune.enable(llava, "fastv", layer=1, **kw) as h, torch.no_grad():
            llava(**inputs)
            padding = inputs["attention_mask"] == 0
            assert bool((h.positions[padding] == -1).all())
            assert torch.equal(h.positions[~padding], torch.arange(padding.shape[1]).expand_as(
                padding)[~padding])


@pytest.mark.parametrize("keep", [np.int64(4), torch.tensor(4), np.float64(0.25), np.float32(0.25)],
                         ids=["np.int64", "0-d tensor", "np.float64", "np.float32"])
@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_counts_follow_the_ops_rule(llava, method, keep):
    kw = dict(layer=np.int64(1))
    if method == "dart":
        kw.update(pivot_image=np.int32(1), pivot_text=torch.tensor(1))
    with visprune.enable(llava, method, keep=keep, **kw) as h:
        assert h.rule.keep in (4, 0.25) and type(h.rule.keep) in (int, float)


@pytest.mark.parametrize("recipe,error,match", [
    ({np.int64(0): np.int32(4), "1": torch.tensor(3)}, None, None),
    ({1.7: 2}, ValueError, r"recipe keys must be layer indices \(ints\), got 1.7"),
    ({"1": 2, 1: 3}, ValueError, r"recipe gives layer 1 twice \('1' and 1\)"),
    ({0: True}, ValueError, r"recipe\[0\] must be an int >= 0"),
    ({0: 2.0}, ValueError, r"recipe\[0\] must be an int >= 0"),
], ids=["numpy", "float-key", "twice", "bool", "float-count"])
def test_recipe_keys_and_counts(llava, recipe, error, match):
    if error is None:
        with visprune.enable(llava, "fitprune", recipe=recipe) as h:
            assert h.rule.recipe == {0: 4, 1: 3}
        return
    with pytest.raises(error, match=match):
        visprune.enable(llava, "fitprune", recipe=recipe)


# --------------------------------------------------------------------------- sliding window
def _windowed(window):
    """The tiny LLaVA-1.5 with a Mistral text backbone whose sliding window is ``window``
    (``None``: no window), the same weights whatever the window."""
    vision, text = _configs()
    text = transformers.MistralConfig(**{k: getattr(text, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "vocab_size", "max_position_embeddings", "pad_token_id")},
        sliding_window=window)
    torch.manual_seed(0)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_id=IMAGE)
    return transformers.LlavaForConditionalGeneration(config).eval()


@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
def test_sliding_window_backbone_within_the_window(method, kw):
    inputs = _batch(_windowed(None), ROWS, side="left")
    inputs["position_ids"] = _positions(inputs)
    width = inputs["input_ids"].shape[1]
    outs = []
    for window in (None, width + 4):
        model = _windowed(window)
        with visprune.enable(model, method, **kw), torch.no_grad():
            out = model.generate(**{k: v for k, v in inputs.items() if k != "position_ids"},
                                 max_new_tokens=4, do_sample=False)
            outs.append((out, model(**inputs).logits))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


def test_sliding_window_backbone_beyond_the_window_is_refused():
    inputs = _batch(_windowed(None), ROWS, side="left")
    width = inputs["input_ids"].shape[1]
    model = _windowed(width + 2)
    with visprune.enable(model, "fastv", keep=4, layer=1), _VisionCalls(
            model.model.vision_tower) as vision:
        with pytest.raises(ValueError, match=f"window {width + 2}.* reaches {width + 3} tokens"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert vision.calls == 0
        with pytest.raises(ValueError, match="sliding-window"), torch.no_grad():
            model(**_batch(model, [[5] * (width + 3) + ["<image>"]]))
        with pytest.raises(ValueError, match="sliding-window"), torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False, use_cache=False)
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False)   # within: answers
    assert out.shape[1] == width + 2
