"""Property-based tests of ``visprune.enable``'s ``generate()`` on tiny random models (fp32, CPU).

Pre-LLM methods on LLaVA-1.5 and LLaVA-NeXT: with pruning, generate() returns what the unpruned
run returns but for the new tokens' values, and ``disable()`` gives back the unpruned model.
The examples draw the method and its budget, the batch (1-3 ragged prompts, 0-2 images a row,
left or right padding), the length options (``max_length`` / ``max_new_tokens`` /
``min_length`` / ``min_new_tokens``, given to the call, in a ``generation_config`` or in the
model's own), greedy or beam search (1-2 beams, 1-2 returned sequences), with or without KV
cache, a tensor or a ``return_dict_in_generate`` output, ``input_ids`` by keyword or position,
an int, bool or absent attention mask, and whether EOS ends a run as early as the length
options allow or never.

The in-LLM engine (FastV, FitPrune, DART) on LLaVA-1.5, LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL and a
sliding-window (Mistral) backbone, and the pre-LLM methods on Qwen: the examples draw images and
videos (Qwen3-VL's one run per frame), units that end their row, tiny images with fractional
budgets, ``per_frame`` (on prompts with or without videos), counts as Python ints, NumPy
integers or 0-d tensors, generation with or without a cache, on a deep copy of the enabled
model, and chunked prefill or prompt-lookup decoding (refused in-LLM).  The video methods
(EVS, VidCom2, DyCoke) on Qwen get their own draws, on prompts with at least one video, and the
same checks.

Default profile: 150 + 100 + 30 fixed examples (derandomized).
``VISPRUNE_FUZZ=large``: ten times as many, drawn afresh on every run.
"""
import copy
import functools
import math
import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import visprune  # noqa: E402
from visprune.methods import dycoke_count, evs_count, vidcom2_count  # noqa: E402
from test_integration import (EOS, IMAGE, PAD, _batch, _build, _EosBias,  # noqa: E402
                              _snapshot, _stop_steps)

LARGE = os.environ.get("VISPRUNE_FUZZ") == "large"
FUZZ = settings(max_examples=1500 if LARGE else 150, deadline=None, derandomize=not LARGE,
                database=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.sampled_from([t for t in range(3, 128) if t != IMAGE])   # no PAD, BOS, EOS, image


@functools.lru_cache(maxsize=None)
def _model(family):
    return _build(family)


@st.composite
def _prompts(draw, family):
    """1-3 rows of text ids and ``"<image>"`` marks, every row with some text (TrimTokenator
    reads it); LLaVA-NeXT at most one image a row (``_batch`` has four image sizes)."""
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        row = draw(st.lists(TEXT, min_size=1, max_size=6))
        for _ in range(draw(st.integers(0, 2 if family == "llava" else 1))):
            row.insert(draw(st.integers(0, len(row))), "<image>")
        rows.append(row)
    return rows


@st.composite
def _cases(draw):
    family = draw(st.sampled_from(["llava", "llava_next"]))
    method = draw(st.sampled_from(["trimtokenator", "divprune", "holov", "prumerge"]))
    kwargs = {}
    if method == "holov":
        kwargs["num_crops"] = draw(st.sampled_from([1, 3, 4, 16]))
    if method == "prumerge":
        kwargs["plus"] = draw(st.booleans())
    beams = draw(st.integers(1, 2))
    return {
        "family": family, "method": method, "kwargs": kwargs,
        # 16 tokens an image at the least; TrimTokenator's stage 1 keeps 13 of them
        "keep": None if method == "prumerge" else draw(st.integers(1, 12)),
        "prompts": draw(_prompts(family)), "side": draw(st.sampled_from(["left", "right"])),
        "seed": draw(st.integers(0, 2**16)), "drop_mask": draw(st.booleans()),
        "bool_mask": draw(st.booleans()), "positional": draw(st.booleans()),
        "use_cache": draw(st.booleans()), "return_dict": draw(st.booleans()),
        "beams": beams, "returns": draw(st.integers(1, beams)),
        # (option, value): max_length / min_length as offsets from the prompt's width
        "max": draw(st.sampled_from([None, "max_length", "max_new_tokens"])),
        "max_value": draw(st.integers(1, 6)),
        "min": draw(st.sampled_from([None, "min_length", "min_new_tokens"])),
        "min_value": draw(st.integers(0, 6)),
        "where": draw(st.sampled_from(["call", "generation_config", "model"])),
        "eos": draw(st.sampled_from([1e4, -math.inf])),
    }


def _options(case, width):
    """The length options of ``case`` for a prompt of ``width``."""
    options = {}
    for kind in ("max", "min"):
        name, value = case[kind], case[f"{kind}_value"]
        if name is not None:
            options[name] = value + (width if name.endswith("_length") else 0)
    return options


@FUZZ
@given(case=_cases())
def test_generate_with_pruning_behaves_as_unpruned(case):
    model = _model(case["family"])
    inputs = _batch(model, case["prompts"], side=case["side"], seed=case["seed"])
    if case["drop_mask"] and bool(inputs["attention_mask"].all()):
        del inputs["attention_mask"]                  # no padding: generate() infers the mask
    elif case["bool_mask"]:
        inputs["attention_mask"] = inputs["attention_mask"].bool()
    width = inputs["input_ids"].shape[1]
    lengths = _options(case, width)
    call = dict(do_sample=False, num_beams=case["beams"], num_return_sequences=case["returns"],
                pad_token_id=PAD, eos_token_id=EOS, use_cache=case["use_cache"],
                return_dict_in_generate=case["return_dict"])
    if case["where"] == "generation_config":
        call = {"generation_config": transformers.GenerationConfig(**call, **lengths)}
    elif case["where"] == "call":
        call.update(lengths)
    given_config = call.get("generation_config")
    config_before = None if given_config is None else given_config.to_dict()
    frozen = {k: v.clone() for k, v in inputs.items()}
    processors = transformers.LogitsProcessorList([_EosBias(case["eos"])])

    def generate():
        kwargs = dict(inputs, **call, logits_processor=processors)
        args = (kwargs.pop("input_ids"),) if case["positional"] else ()
        out = model.generate(*args, **kwargs)
        return out.sequences if case["return_dict"] else out

    saved = copy.deepcopy(model.generation_config)
    try:
        if case["where"] == "model":
            for name, value in lengths.items():
                setattr(model.generation_config, name, value)
        unpruned = generate()
        # after a run: transformers hooks the vision tower's layers on its first call
        before = _snapshot(model)
        handle = visprune.enable(model, case["method"], case["keep"], **case["kwargs"])
        try:
            pruned = generate()
        finally:
            handle.disable()
        after = _snapshot(model)
        again = generate()
    finally:
        model.generation_config = saved

    assert pruned.shape == unpruned.shape
    prompt = frozen["input_ids"].repeat_interleave(case["returns"], 0)
    assert torch.equal(pruned[:, :width], prompt)
    assert _stop_steps(pruned, width) == _stop_steps(unpruned, width)
    assert inputs.keys() == frozen.keys()                       # the caller's inputs untouched
    assert all(torch.equal(inputs[k], v) for k, v in frozen.items())
    assert given_config is None or given_config.to_dict() == config_before
    assert after[1:] == before[1:]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert torch.equal(again, unpruned)


# --------------------------------------------------------------------------- the in-LLM engine, Qwen
class _Ban(transformers.LogitsProcessor):
    """Bans EOS (every run makes its full length) and the placeholder ids (without a cache a
    generated placeholder would count as one more visual token, pruned or not)."""

    def __init__(self, ids):
        self.ids = list(ids)

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.ids] = -math.inf
        return scores


FAMILIES = ["llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "windowed"]
LAYERS = {"llava": 2, "llava_next": 2, "qwen2_5_vl": 3, "qwen3_vl": 4, "windowed": 2}
QWEN_GRIDS = [[1, 2, 2], [1, 2, 4], [1, 4, 4], [1, 4, 6]]         # 1, 2, 4, 6 merged tokens
QWEN_VIDEOS = [[2, 2, 4], [3, 4, 4]]                             # 2x2, 3x4 tokens per frame
INLLM = ("fastv", "fitprune", "dart")
VIDEO = ("evs", "vidcom2", "dycoke")


@functools.lru_cache(maxsize=None)
def _family_model(family):
    from test_inllm_reliability import _windowed
    from test_qwen import _qwen3, _qwen25
    if family == "windowed":
        return _windowed(28)                   # shorter than the longest prompts drawn
    return {"qwen2_5_vl": _qwen25, "qwen3_vl": _qwen3}.get(family, lambda: _build(family))()


@st.composite
def _engine_cases(draw, video=False):
    """A case of the engine's property test; ``video``: a video method on Qwen, and the first
    row's first unit a video."""
    family = draw(st.sampled_from(("qwen2_5_vl", "qwen3_vl") if video else FAMILIES))
    qwen = family.startswith("qwen")
    rows = []
    for _ in range(draw(st.integers(1, 2))):
        row = draw(st.lists(TEXT, min_size=1, max_size=4))
        units = draw(st.integers(1, 2 if qwen else 1))
        for u in range(units):
            if qwen:
                is_video = (video and not rows and u == 0) or draw(st.booleans())
                unit = (("video", draw(st.sampled_from(QWEN_VIDEOS))) if is_video
                        else ("image", draw(st.sampled_from(QWEN_GRIDS))))
            else:
                unit = "<image>"
            # at the end of the row (no text after it) as often as anywhere else
            at = len(row) if draw(st.booleans()) else draw(st.integers(0, len(row)))
            row.insert(at, unit)
        rows.append(row)
    # pre-LLM methods on Qwen (per_frame, trailing images, tiny units), in-LLM ones everywhere;
    # with ``video``, a video method
    method = draw(st.sampled_from(VIDEO if video else INLLM + (
        ("divprune", "trimtokenator") if qwen else ())))
    count = draw(st.sampled_from([int, np.int64, torch.tensor]))
    kwargs = {}
    if method in ("fastv", "dart"):
        kwargs["layer"] = count(draw(st.integers(1, LAYERS[family] - 1)))
    if method == "fitprune":
        kwargs["recipe"] = {l: count(draw(st.integers(0, 2) if l == 0 else st.integers(0, 1)))
                            for l in range(LAYERS[family])}
    else:
        kwargs["keep"] = (count(draw(st.integers(1, 6))) if draw(st.booleans())
                          else draw(st.sampled_from([0.05, 0.1, np.float64(0.3), 0.5, 1.0])))
    if method == "dart":
        kwargs.update(pivot_image=draw(st.integers(0, 2)), pivot_text=draw(st.integers(1, 3)))
    if method == "trimtokenator" and isinstance(kwargs["keep"], float) and kwargs["keep"] > 0.8:
        kwargs["stage1_keep"] = 1.0            # the default 0.8 is refused below keep
    if qwen and method not in VIDEO and draw(st.booleans()):
        kwargs["per_frame"] = True
    options = [None] + ([("prefill_chunk_size", 4), ("prompt_lookup_num_tokens", 2)]
                        if method in INLLM else [])
    return {"family": family, "rows": rows, "method": method, "kwargs": kwargs,
            "use_cache": draw(st.booleans()), "copy": draw(st.booleans()),
            "option": draw(st.sampled_from([None, None] + options)),
            "seed": draw(st.integers(0, 2**16))}


class _Tokens(int):
    """A unit's token count; ``frames``: its frame count where it is a whole video (a video
    method prunes only those), else None."""

    frames = None


def _video_unit(n, frames):
    unit = _Tokens(n)
    unit.frames = frames
    return unit


def _engine_inputs(model, case):
    """The case's batch and, per row, its units' token counts in prompt order (a video's frames
    with ``per_frame``; a whole video's count carries its frame count)."""
    if not case["family"].startswith("qwen"):
        inputs = _batch(model, case["rows"], seed=case["seed"])
        counts = ([16] * len(inputs["pixel_values"]) if "image_sizes" not in inputs else
                  [len(f) for f in model.model.get_image_features(
                      inputs["pixel_values"], inputs["image_sizes"]).pooler_output])
        images = iter(counts)
        return inputs, [[next(images) for x in r if x == "<image>"] for r in case["rows"]]
    from test_qwen import _prompt
    per_frame = case["kwargs"].get("per_frame", False)
    units = []
    for r in case["rows"]:
        units.append([])
        for kind, (t, h, w) in (x for x in r if isinstance(x, tuple)):
            if kind == "video" and not per_frame:
                units[-1].append(_video_unit(t * h * w // 4, t))
                continue
            frames = t if kind == "video" else 1
            units[-1] += [t * h * w // 4 // frames] * frames
    return _prompt(model, case["rows"], seed=case["seed"]), units


def _dycoke_kept(keep, T, P):
    """DyCoke's count of a video for ``keep`` as the README states: ``P`` per whole frame,
    ``n`` per compared one; a fraction gives ``k = 1 - keep``, a count the largest ``n`` whose
    total is not above it (else ``n = 0``)."""
    if isinstance(keep, float):
        return dycoke_count(P, T, 1 - keep)
    pairs, groups = T // 2, len(range(0, T - 4, 4))
    totals = [P if T == 1 else pairs * (P + n) - groups * (P - n) for n in range(P + 1)]
    fits = [v for v in totals if v <= keep]
    return max(fits) if fits else totals[0]


def _kept_per_unit(case, n):
    """Tokens a unit of ``n`` keeps as the README states, or None when the budget does not fit
    (DART: the exact count depends on the text pivots found; at least one).  A video method
    prunes whole videos only (``n.frames``); images pass whole."""
    kw = case["kwargs"]
    if case["method"] == "fitprune":
        total = sum(int(v) for v in kw["recipe"].values())
        return n - total if total < n else None
    keep = kw["keep"]
    keep = int(keep) if not isinstance(keep, float) else float(keep)
    if case["method"] in VIDEO:
        frames = getattr(n, "frames", None)
        if frames is None:
            return n
        P = n // frames
        if case["method"] == "dycoke":
            return _dycoke_kept(keep, frames, P)
        count, floor = {"evs": (evs_count, P), "vidcom2": (vidcom2_count, frames)}[case["method"]]
        return count(P, frames, 1 - keep) if isinstance(keep, float) else max(floor, min(keep, n))
    if case["method"] in ("divprune", "trimtokenator"):        # Qwen: a smaller unit keeps all
        return min(n, keep) if isinstance(keep, int) else min(n, max(1, math.floor(keep * n + .5)))
    if case["method"] == "fastv":
        kept = keep if isinstance(keep, int) else max(1, round(n * keep))
    else:
        pivots = kw["pivot_image"] + kw["pivot_text"]
        budget = keep if isinstance(keep, int) else n * keep
        kept = max(1, kw["pivot_image"] + pivots * int(budget / pivots))
    return kept if kept <= n else None


@settings(FUZZ, max_examples=1000 if LARGE else 100)
@given(case=_engine_cases())
def test_generate_is_refused_cleanly_or_behaves(case):
    """Either the setting or the request is refused before the vision tower runs (a budget that
    does not fit a unit, chunked prefill, assisted decoding, a sequence beyond a sliding window),
    and the model still answers; or generate() keeps the caller's prompt, generates with or
    without a cache (and on a deep copy of the enabled model) the same tokens, every unit keeps
    its documented count (DART: at least one), and disable() gives back the unpruned model."""
    model = _family_model(case["family"])
    qwen = case["family"].startswith("qwen")
    tower = model.model.visual if qwen else model.model.vision_tower
    with torch.no_grad():
        inputs, units = _engine_inputs(model, case)
    placeholders = [model.config.image_token_id] + (
        [model.config.video_token_id] if qwen else [])
    width = inputs["input_ids"].shape[1]
    call = dict(max_new_tokens=3, do_sample=False, pad_token_id=0,
                logits_processor=transformers.LogitsProcessorList([_Ban(placeholders + [2])]))
    with torch.no_grad():
        unpruned = model.generate(**inputs, **call)
    fits = [[_kept_per_unit(case, n) for n in row] for row in units]
    window = getattr(model.config.text_config, "sliding_window", None)
    refusal = (None if case["option"] is None else NotImplementedError) or (
        ValueError if any(None in row for row in fits)
        or (window is not None and width + 3 > window) else None)

    calls = []
    hook = tower.register_forward_hook(lambda *a: calls.append(1))
    handle = visprune.enable(model, case["method"], **case["kwargs"])
    try:
        runner = copy.deepcopy(model) if case["copy"] else model
        options = dict(call, use_cache=case["use_cache"])
        if case["option"] is not None:
            options[case["option"][0]] = case["option"][1]
        event(f"{case['method']}: " + ("refused" if refusal is not None else "generated"))
        if refusal is not None:
            with pytest.raises(refusal), torch.no_grad():
                runner.generate(**inputs, **options)
            assert not calls, "the vision tower ran before the refusal"
            return
        with torch.no_grad():
            pruned = runner.generate(**inputs, **options)
            ran = visprune.integrations.transformers.active_handle(runner)
            if not case["use_cache"]:
                assert torch.equal(pruned, model.generate(**inputs, **call))
        assert pruned.shape == unpruned.shape
        assert torch.equal(pruned[:, :width], inputs["input_ids"])
        if case["method"] in INLLM:
            ids, positions = inputs["input_ids"], ran.positions
            prompt = (positions >= 0) & (positions < width)    # without a cache: new tokens too
            kept = (prompt & torch.isin(ids.gather(1, positions.clamp(0, width - 1)),
                                        torch.tensor(placeholders))).sum(1).tolist()
            if case["method"] == "dart":
                assert all(k >= len(row) for k, row in zip(kept, units))
            else:
                assert kept == [sum(row) for row in fits]
        else:           # per image then per video, as the handle reports them
            kept = [len(k) for k in ran.kept]
            per_item = []
            for kind in ("image", "video"):
                for r, row in enumerate(case["rows"]):
                    it = iter(fits[r])
                    for x in row:
                        if isinstance(x, tuple):
                            (t, h, w) = x[1]
                            frames = t if x[0] == "video" and case["kwargs"].get("per_frame") \
                                else 1
                            got = sum(next(it) for _ in range(frames))
                            if x[0] == kind:
                                per_item.append(got)
            assert kept == per_item
    finally:
        hook.remove()
        handle.disable()
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, **call), unpruned)


@settings(FUZZ, max_examples=300 if LARGE else 30)
@given(case=_engine_cases(video=True))
def test_video_methods_on_qwen_behave(case):
    """EVS, VidCom2 and DyCoke on Qwen2.5-VL / Qwen3-VL prompts with at least one video: the
    checks of :func:`test_generate_is_refused_cleanly_or_behaves` (every video keeps the
    method's documented count, images pass whole)."""
    test_generate_is_refused_cleanly_or_behaves.hypothesis.inner_test(case)
