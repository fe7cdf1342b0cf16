"""In-LLM pruning (FastV, FitPrune) through visprune.enable on tiny random LLaVA models: batching
and padding, generation with the KV cache, the attention implementations, bad input, disable.
The fidelity against the originals' code is in test_inllm_fidelity.py."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import visprune  # noqa: E402
from visprune.fitprune import RECIPES, flops_ratio, load_recipe  # noqa: E402
from visprune.integrations.transformers.fitprune import calibrate  # noqa: E402
from visprune.integrations.transformers.inllm import rank_in_image  # noqa: E402
from visprune.integrations.transformers.llava import image_token_counts  # noqa: E402

from test_integration import IMAGE, _batch, _build  # noqa: E402
from test_integration import llava, llava_next  # noqa: E402,F401  (the tiny models' fixtures)

ROWS = [[5, 6, "<image>", 7, 8, 9, 10], [5, "<image>", 7, 8], [9, "<image>", 11, 12, 13, 14, 15]]
METHODS = [("fastv", dict(keep=5, layer=1)), ("fastv", dict(keep=0.5, layer=1)),
           ("fitprune", dict(recipe={0: 4, 1: 3})),
           ("dart", dict(keep=4, layer=1, pivot_image=1, pivot_text=1))]
IDS = ["fastv", "fastv-fraction", "fitprune", "dart"]


def _positions(inputs):
    """Each row's tokens at positions 0, 1, ... whatever its padding, as ``generate`` numbers
    them (DART's key norms, as RoPE rotates them, depend on the absolute position)."""
    return (inputs["attention_mask"].cumsum(1) - 1).clamp(min=0)


def _one(model, inputs, r):
    """Row ``r`` of a batch built by ``_batch`` as a batch of one, without its padding."""
    keep = inputs["attention_mask"][r].bool()
    one = {"input_ids": inputs["input_ids"][r:r + 1, keep],
           "attention_mask": inputs["attention_mask"][r:r + 1, keep]}
    before = int((inputs["input_ids"][:r] == IMAGE).sum())
    mine = int((inputs["input_ids"][r] == IMAGE).sum())
    counts = image_token_counts(model, len(inputs["pixel_values"]), inputs.get("image_sizes"))
    ends = torch.tensor(counts).cumsum(0).tolist()
    images = [j for j, e in enumerate(ends) if before < e <= before + mine]
    one["pixel_values"] = inputs["pixel_values"][images]
    if "image_sizes" in inputs:
        one["image_sizes"] = inputs["image_sizes"][images]
    return one


@pytest.mark.parametrize("method,kw", METHODS, ids=IDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_rows_alone(llava, method, kw, side):
    inputs = _batch(llava, ROWS, side=side)
    inputs["position_ids"] = _positions(inputs)
    with visprune.enable(llava, method, **kw) as h, torch.no_grad():
        out = llava(**inputs).logits
        positions = h.positions.clone()
        for r in range(len(ROWS)):
            one = _one(llava, inputs, r)
            alone = llava(**one).logits
            offset = int((~inputs["attention_mask"][r].bool()).cumsum(0)[-1]) \
                if side == "left" else 0
            valid = positions[r] >= 0
            assert int(valid.sum()) == alone.shape[1]
            assert (positions[r, valid] - offset).tolist() == h.positions[0].tolist()
            torch.testing.assert_close(out[r, valid], alone[0], atol=1e-5, rtol=1e-5)
    image = inputs["input_ids"] == IMAGE
    kept_images = image.gather(1, positions.clamp(min=0)) & (positions >= 0)
    per_row = kept_images.sum(1)
    if method == "fastv":
        expected = kw["keep"] if isinstance(kw["keep"], int) else round(16 * kw["keep"])
    elif method == "dart":
        expected = 1 + 2 * (4 // 2)                 # 1 image pivot + 2 pivots x 2 claimed
    else:
        expected = 16 - 7
    assert per_row.tolist() == [expected] * len(ROWS)
    text = (~image) & inputs["attention_mask"].bool()
    assert ((~kept_images) & (positions >= 0)).sum(1).tolist() == text.sum(1).tolist()


@pytest.mark.parametrize("method,kw,per_image", [
    ("fastv", dict(keep=4, layer=1), 4),
    ("dart", dict(keep=8, layer=1, pivot_image=2, pivot_text=2), 2 + 4 * 2),
], ids=["fastv", "dart"])
def test_llava_next_multi_image_rows(llava_next, method, kw, per_image):
    rows = [[5, "<image>", 6, "<image>", 7, 8], [9, "<image>", 10, 11]]
    inputs = _batch(llava_next, rows, side="left")
    inputs["position_ids"] = _positions(inputs)
    with visprune.enable(llava_next, method, **kw) as h, torch.no_grad():
        out = llava_next(**inputs).logits
        image = inputs["input_ids"] == IMAGE
        kept = image.gather(1, h.positions.clamp(min=0)) & (h.positions >= 0)
        assert kept.sum(1).tolist() == [2 * per_image, per_image]
        for r in range(2):
            alone = llava_next(**_one(llava_next, inputs, r)).logits
            torch.testing.assert_close(out[r, -1], alone[0, -1], atol=1e-5, rtol=1e-5)


class _Replay:
    """A rule that drops given input positions after given layers (the test's oracle for the
    decode path: the same pruning applied to prompt + generated tokens in one forward)."""

    def __init__(self, drops):
        self.drops = drops                          # {layer: bool[B, L] over input positions}
        self.layers = set(drops)

    def check(self, counts):
        pass

    def drop(self, s):
        dropped = self.drops[s.layer]
        return (s.orig >= 0) & dropped.gather(1, s.orig.clamp(min=0))


@pytest.mark.parametrize("method,kw", [METHODS[0], METHODS[2], METHODS[3]],
                         ids=["fastv", "fitprune", "dart"])
def test_generate_with_cache_matches_one_pass(llava, method, kw):
    """Each token generated with the pruned, per-layer KV cache has the logits of one forward
    over prompt + generated tokens in which the same tokens are dropped after the same layers."""
    inputs = _batch(llava, ROWS, side="left")
    L = inputs["input_ids"].shape[1]
    steps = 4
    with visprune.enable(llava, method, **kw) as h, torch.no_grad():
        # which input positions each layer group dropped, recorded with a spying rule
        rule, drops = h.rule, {}

        def spy(s, rule=rule):
            d = rule.drop(s)
            full = torch.zeros(s.valid.shape[0], L, dtype=torch.bool)
            full.scatter_(1, s.orig.clamp(min=0), d & (s.orig >= 0))
            drops[s.layer] = full
            return d

        h.rule = type("Spy", (), {"layers": rule.layers, "check": rule.check,
                                  "drop": staticmethod(spy)})()
        out = llava.generate(**inputs, max_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
        assert drops, "the prefill dropped nothing"
        seq = out.sequences
        mask = torch.cat([inputs["attention_mask"], torch.ones(len(ROWS), steps - 1,
                                                               dtype=torch.long)], 1)
        replay = {l: torch.cat([d, torch.zeros(len(ROWS), steps - 1, dtype=torch.bool)], 1)
                  for l, d in drops.items()}
        h.rule = _Replay(replay)
        position_ids = (mask.cumsum(1) - 1).clamp(min=0)
        full = llava(input_ids=seq[:, :-1], attention_mask=mask, position_ids=position_ids,
                     pixel_values=inputs["pixel_values"]).logits
    for t in range(steps):
        torch.testing.assert_close(out.logits[t], full[:, full.shape[1] - steps + t],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
def test_generate_batch_equals_rows_alone(llava, beams):
    inputs = _batch(llava, ROWS, side="left")
    with visprune.enable(llava, "fitprune", recipe={0: 6, 1: 2}), torch.no_grad():
        out = llava.generate(**inputs, max_new_tokens=5, do_sample=False, num_beams=beams)
        for r in range(len(ROWS)):
            one = _one(llava, inputs, r)
            alone = llava.generate(**one, max_new_tokens=5, do_sample=False, num_beams=beams)
            assert out[r, -5:].tolist() == alone[0, -5:].tolist()


def test_eager_attention_matches_sdpa():
    inputs = _batch(_build("llava"), ROWS, side="left")
    results = []
    for implementation in ("sdpa", "eager"):
        model = _build("llava")
        model.set_attn_implementation(implementation)
        with visprune.enable(model, "fitprune", recipe={0: 4, 1: 3}) as h, torch.no_grad():
            assert model.config.text_config._attn_implementation == f"visprune_{implementation}"
            results.append((model(**inputs).logits, h.positions))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(results[0][1], results[1][1])


def test_disable_restores(llava):
    inputs = _batch(llava, ROWS, side="left")
    with torch.no_grad():
        before = llava(**inputs).logits
    h = visprune.enable(llava, "fastv", keep=2, layer=1)
    with torch.no_grad():
        assert llava(**inputs).logits.shape[1] < before.shape[1]
    h.disable()
    h.disable()                                         # idempotent
    assert llava.config.text_config._attn_implementation == "sdpa"
    assert not llava._forward_pre_hooks and not llava.model._forward_pre_hooks
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks
               for layer in llava.model.language_model.layers)
    with torch.no_grad():
        torch.testing.assert_close(llava(**inputs).logits, before)


def test_no_images_and_decode_without_pruning(llava):
    text_only = _batch(llava, [[5, 6, 7], [8, 9]], side="left")
    with torch.no_grad():
        before = llava(**text_only).logits
        with visprune.enable(llava, "fastv", keep=2, layer=1):
            torch.testing.assert_close(llava(**text_only).logits, before)


def test_rank_in_image_ties_and_groups():
    score = torch.tensor([[1.0, 3.0, 3.0, 0.0, 2.0, 2.0, 9.0]])
    image = torch.tensor([[-1, 0, 0, 0, 1, 1, 1]])
    assert rank_in_image(score, image, descending=True)[0, 1:].tolist() == [0, 1, 2, 1, 2, 0]
    assert rank_in_image(score, image, descending=False)[0, 1:].tolist() == [1, 2, 0, 0, 1, 2]


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("method,kw,error,match", [
    ("fastv", dict(keep=2, layer=0), ValueError, r"layer must lie in \[1, 1\].*got 0"),
    ("fastv", dict(keep=2, layer=2), ValueError, r"layer must lie in \[1, 1\]"),
    ("fastv", dict(keep=0, layer=1), ValueError, "keep must be"),
    ("fastv", dict(keep=1.5, layer=1), ValueError, "keep must be"),
    ("fastv", dict(keep="3", layer=1), TypeError, "keep must be"),
    ("fastv", dict(layer=1), ValueError, "fastv needs keep"),
    ("fastv", dict(keep=2, layers=1), TypeError, r"no argument\(s\) \['layers'\]"),
    ("dart", dict(layer=1), ValueError, "dart needs keep"),
    ("dart", dict(keep=4, layer=2), ValueError, r"layer must lie in \[1, 1\]"),
    ("dart", dict(keep=4, layer=1, pivot_image=0, pivot_text=0), ValueError, "at least one"),
    ("dart", dict(keep=4, layer=1, pivot_text=-1), ValueError, "must be >= 0"),
    ("dart", dict(keep=4, layer=1, pivots=2), TypeError, r"no argument\(s\) \['pivots'\]"),
    ("fitprune", dict(), ValueError, "fitprune needs recipe"),
    ("fitprune", dict(keep=3, recipe={0: 1}), ValueError, "pass no keep"),
    ("fitprune", dict(recipe={5: 1}), ValueError, "after layer 5, but the model has 2"),
    ("fitprune", dict(recipe="r60"), ValueError, "after layer 2, but the model has 2"),
    ("fitprune", dict(recipe={0: -1}), ValueError, r"recipe\[0\] must be an int >= 0"),
    ("fitprune", dict(recipe=65), ValueError, "no shipped FitPrune recipe for reduction 65"),
    ("fitprune", dict(recipe="missing.json"), ValueError, "neither a shipped recipe"),
    ("fitprune", dict(recipe=[1, 2]), TypeError, "recipe must be"),
])
def test_bad_arguments(llava, method, kw, error, match):
    with pytest.raises(error, match=match):
        visprune.enable(llava, method, **kw)
    assert llava.config.text_config._attn_implementation == "sdpa"
    assert not llava._forward_pre_hooks


@pytest.mark.parametrize("method,kw,match", [
    ("fastv", dict(keep=17, layer=1), r"keep=\d+ is larger than image 0's \d+ visual"),
    ("fitprune", dict(recipe={0: 10, 1: 7}), r"deletes \d+ tokens per image, more than image 0's"),
    ("dart", dict(keep=20, layer=1), r"keep=\d+ keeps \d+ tokens .* more than image 0's"),
])
def test_budget_checked_before_any_work(llava, llava_next, method, kw, match):
    """LLaVA-1.5's images all have the same size: enable() checks; LLaVA-NeXT's are checked
    per call, before the vision tower runs."""
    with pytest.raises(ValueError, match=match):
        visprune.enable(llava, method, **kw)
    inputs = _batch(llava_next, [[5, "<image>", 6]])
    n = int((inputs["input_ids"] == IMAGE).sum())
    kw = {"recipe": {0: n, 1: 1}} if method == "fitprune" else {**kw, "keep": n + 8}
    calls = []
    hook = llava_next.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    try:
        with visprune.enable(llava_next, method, **kw), pytest.raises(ValueError, match=match):
            llava_next(**inputs)
    finally:
        hook.remove()
    assert not calls


def test_unsupported_models_and_calls(llava):
    lm = transformers.LlamaForCausalLM(llava.config.text_config)
    with pytest.raises(TypeError, match="supports LlavaForConditionalGeneration"):
        visprune.enable(lm, "fastv", keep=2, layer=1)
    model = _build("llava")
    model.config.text_config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'sdpa' or 'eager' attention, got 'flash_attention_2'"):
        visprune.enable(model, "fastv", keep=2, layer=1)
    inputs = _batch(llava, ROWS[:1])
    with visprune.enable(llava, "fastv", keep=2, layer=1):
        with pytest.raises(RuntimeError, match="already enabled"):
            visprune.enable(llava, "fitprune", recipe={0: 1})
        with pytest.raises(NotImplementedError, match="labels"):
            llava(**inputs, labels=inputs["input_ids"])
        with pytest.raises(ValueError, match="needs input_ids"):
            llava.model(inputs_embeds=torch.zeros(1, 3, 64), pixel_values=inputs["pixel_values"])
        with pytest.raises(NotImplementedError, match="DynamicCache"):
            llava(**inputs, cache=transformers.StaticCache(
                config=llava.config.text_config, max_cache_len=64))


# --------------------------------------------------------------------------- recipes
def test_recipes_load_and_save(tmp_path):
    assert load_recipe("r60", 32) == dict(enumerate(RECIPES[60])) == load_recipe(60, 32)
    assert sum(RECIPES[60]) == 449
    assert load_recipe({"3": 2}, 4) == {0: 0, 1: 0, 2: 0, 3: 2}
    path = tmp_path / "r.json"
    visprune.fitprune.save_recipe({0: 1, 1: 2}, path, reduction=0.5)
    assert json.loads(path.read_text())["reduction"] == 0.5
    assert load_recipe(str(path), 2) == {0: 1, 1: 2}
    assert 0.38 < flops_ratio("r60") < 0.42
    assert flops_ratio("r0") == 1.0
    ratios = [flops_ratio(r) for r in sorted(RECIPES)]
    assert ratios == sorted(ratios, reverse=True)


# --------------------------------------------------------------------------- calibration
def _samples(model):
    prompts = [[5, 6, "<image>", 7, 8, 9], [5, "<image>", 7, 8, 9, 10, 11], [12, "<image>", 13, 14]]
    return [_batch(model, [p], seed=s) for s, p in enumerate(prompts)]


def test_calibrate_cli_writes_the_api_recipe(llava, tmp_path):
    import subprocess
    import sys

    samples = _samples(llava)
    info = {}
    recipe = calibrate(llava, samples, 0.5, progress=False, info=info)
    assert sum(recipe.values()) > 0 and 0 < info["alpha"] < 1 and info["ratio"] < 1
    assert not llava._forward_pre_hooks                  # the calibration's engine is gone
    llava.save_pretrained(tmp_path / "model")
    torch.save(samples, tmp_path / "samples.pt")
    out = tmp_path / "recipe.json"
    run = subprocess.run([sys.executable, "-m", "visprune.integrations.transformers.fitprune", "calibrate", "--model",
                          str(tmp_path / "model"), "--samples", str(tmp_path / "samples.pt"),
                          "--reduction", "0.5", "--device", "cpu", "--dtype", "float32",
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    written = json.loads(out.read_text())
    assert written["reduction"] == 0.5 and written["samples"] == 3
    assert load_recipe(str(out), 2) == recipe
    with visprune.enable(llava, "fitprune", recipe=str(out)) as h, torch.no_grad():
        llava(**samples[0])
        kept = (samples[0]["input_ids"] == IMAGE).gather(1, h.positions.clamp(min=0))
        assert int(kept.sum()) == 16 - sum(recipe.values())


@pytest.mark.parametrize("args,match", [
    (dict(reduction=1.0), r"reduction must be a float in \(0, 1\)"),
    (dict(reduction=0.5, samples=[]), "at least one sample"),
    (dict(reduction=0.5, samples=[{"input_ids": torch.zeros(1, 3)}]), r"samples\[0\] must be"),
    (dict(reduction=0.5, tol=0), r"tol must be in \(0, 1\)"),
])
def test_calibrate_bad_input(llava, args, match):
    samples = args.pop("samples", None)
    with pytest.raises(ValueError, match=match):
        calibrate(llava, samples if samples is not None else _samples(llava),
                                    progress=False, **args)


def test_calibrate_needs_text_after_the_image(llava):
    with pytest.raises(ValueError, match="no text after its image"):
        calibrate(llava, [_batch(llava, [[5, "<image>"]])], 0.5,
                                    progress=False)
    assert llava.config.text_config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------- Qwen2.5-VL
QWEN_IMAGE, QWEN_VIDEO, QWEN_START = 150, 151, 152


@pytest.fixture(scope="module")
def qwen():
    """A tiny random Qwen2.5-VL (2×2 patch merger, 3-D M-RoPE, GQA), fp32."""
    from test_qwen import _qwen25
    return _qwen25(fullatt_block_indexes=(1,))


def _qwen_inputs(rows, grids, seed=0):
    """Left-padded rows of text ids with one image each (``grids``: their ``[t, h, w]``)."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor(grids)
    tokens = (grids.prod(-1) // 4).tolist()
    rows = [r[:2] + [QWEN_START] + [QWEN_IMAGE] * n + r[2:] for r, n in zip(rows, tokens)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, image_grid_thw=grids,
                pixel_values=torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=g),
                mm_token_type_ids=(ids == QWEN_IMAGE).int())


def _qwen_row(inputs, r):
    keep = inputs["attention_mask"][r].bool()
    grids = inputs["image_grid_thw"]
    start = int(grids[:r].prod(-1).sum())
    ids = inputs["input_ids"][r:r + 1, keep]
    return dict(input_ids=ids, attention_mask=inputs["attention_mask"][r:r + 1, keep],
                image_grid_thw=grids[r:r + 1], mm_token_type_ids=(ids == QWEN_IMAGE).int(),
                pixel_values=inputs["pixel_values"][start:start + int(grids[r].prod())])


@pytest.mark.parametrize("method,kw,kept", [
    ("fastv", dict(keep=3, layer=1), [3, 3]),
    ("fitprune", dict(recipe={0: 2, 1: 1}), [6 - 3, 9 - 3]),
    ("dart", dict(keep=4, layer=2, pivot_image=1, pivot_text=1), [5, 5]),
], ids=["fastv", "fitprune", "dart"])
def test_qwen25_vl_generate_batch_equals_rows_alone(qwen, method, kw, kept):
    """Images of two sizes (6 and 9 merged tokens), left padding, 3-D M-RoPE positions kept,
    generation with the per-layer cache: each row generates what it generates alone."""
    inputs = _qwen_inputs([[3, 4, 5, 6, 7, 8], [9, 10, 11]], [[1, 4, 6], [1, 6, 6]])
    steps = 4
    with visprune.enable(qwen, method, **kw) as h, torch.no_grad():
        out = qwen.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
        image = inputs["input_ids"] == QWEN_IMAGE
        assert (image.gather(1, h.positions.clamp(min=0)) & (h.positions >= 0)).sum(1).tolist() \
            == kept
        for r in range(2):
            alone = qwen.generate(**_qwen_row(inputs, r), max_new_tokens=steps, do_sample=False,
                                  output_logits=True, return_dict_in_generate=True)
            assert out.sequences[r, -steps:].tolist() == alone.sequences[0, -steps:].tolist()
            for t in range(steps):
                torch.testing.assert_close(out.logits[t][r], alone.logits[t][0], atol=1e-5,
                                           rtol=1e-5)


def test_qwen25_vl_video(qwen):
    """A video (2 temporal patches of a 4×4 grid: 8 merged tokens, one placeholder run) is
    pruned like an image."""
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[3, 4, QWEN_START] + [QWEN_VIDEO] * 8 + [5, 6]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  video_grid_thw=torch.tensor([[2, 4, 4]]),
                  pixel_values_videos=torch.randn(32, 3 * 2 * 14 * 14, generator=g),
                  mm_token_type_ids=(ids == QWEN_VIDEO).int() * 2)
    with visprune.enable(qwen, "fastv", keep=0.25, layer=1) as h, torch.no_grad():
        logits = qwen(**inputs).logits
        assert logits.shape[1] == ids.shape[1] - 6
        assert int((ids[0, h.positions[0]] == QWEN_VIDEO).sum()) == 2
        qwen.generate(**inputs, max_new_tokens=2, do_sample=False)
