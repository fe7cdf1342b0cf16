"""Property-based tests of ``visprune.enable``'s ``generate()`` on tiny random LLaVA-1.5 and
LLaVA-NeXT models (fp32, CPU): with pruning, generate() returns what the unpruned run returns but
for the new tokens' values, and ``disable()`` gives back the unpruned model.

The examples draw the method and its budget, the batch (1-3 ragged prompts, 0-2 images a row,
left or right padding), the length options (``max_length`` / ``max_new_tokens`` /
``min_length`` / ``min_new_tokens``, given to the call, in a ``generation_config`` or in the
model's own), greedy or beam search (1-2 beams, 1-2 returned sequences), with or without KV
cache, a tensor or a ``return_dict_in_generate`` output, ``input_ids`` by keyword or position,
an int, bool or absent attention mask, and whether EOS ends a run as early as the length
options allow or never.

Default profile: 150 fixed examples (derandomized), about 15 s on two cores.
``VISPRUNE_FUZZ=large``: ten times as many, drawn afresh on every run.
"""
import copy
import functools
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import visprune  # noqa: E402
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
