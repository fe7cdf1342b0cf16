"""visprune.enable on Hugging Face transformers' LLaVA-1.5 and LLaVA-NeXT: tiny random models
built from configs (no downloads), fp32 on the CPU."""
import copy
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import visprune  # noqa: E402
from visprune import methods  # noqa: E402
from visprune.integrations.transformers import _cls_attention  # noqa: E402

IMAGE, PAD = 100, 0
N = 16                                  # 28x28 pixels, 7x7 patches: 16 tokens per crop
FIXED = [("trimtokenator", {}), ("divprune", {}), ("holov", {"num_crops": 4})]
ALL = FIXED + [("prumerge", {}), ("prumerge", {"plus": True})]
IDS = ["trimtokenator", "divprune", "holov", "prumerge", "prumerge+"]


def _configs():
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, image_size=28,
                                           num_hidden_layers=3, num_attention_heads=4, patch_size=7)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                    max_position_embeddings=512, pad_token_id=PAD)
    return vision, text


def _build(family):
    """A tiny random ``"llava"`` (LLaVA-1.5) or ``"llava_next"`` model, the same on every call."""
    vision, text = _configs()
    if family == "llava":
        torch.manual_seed(0)
        config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                          image_token_id=IMAGE)
        return transformers.LlavaForConditionalGeneration(config).eval()
    torch.manual_seed(1)
    config = transformers.LlavaNextConfig(vision_config=vision, text_config=text,
                                          image_token_id=IMAGE,
                                          image_grid_pinpoints=[[28, 56], [56, 28], [56, 56]])
    return transformers.LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def llava():
    return _build("llava")


@pytest.fixture(scope="module")
def llava_next():
    return _build("llava_next")


@pytest.fixture(params=["llava", "llava_next"])
def model(request):
    return request.getfixturevalue(request.param)


def _batch(model, prompts, *, side="left", seed=0):
    """Model inputs for ``prompts``: one list per row of text token ids and ``"<image>"`` marks
    (each one image).  LLaVA-NeXT images get different sizes, hence different token counts."""
    g = torch.Generator().manual_seed(seed)
    images = sum(p.count("<image>") for p in prompts)
    inputs = {}
    if images and isinstance(model, transformers.LlavaNextForConditionalGeneration):
        sizes = torch.tensor([[20, 50], [40, 33], [56, 56], [30, 20]][:images])
        inputs["pixel_values"] = torch.randn(images, 5, 3, 28, 28, generator=g)
        inputs["image_sizes"] = sizes
        with torch.no_grad():
            counts = [len(f) for f in model.model.get_image_features(
                inputs["pixel_values"], sizes).pooler_output]
    else:
        inputs["pixel_values"] = torch.randn(images, 3, 28, 28, generator=g)
        counts = [N] * images
    counts = iter(counts)
    rows = [[t for x in p for t in ([IMAGE] * next(counts) if x == "<image>" else [x])]
            for p in prompts]
    width = max(map(len, rows))
    padded = [([PAD] * (width - len(r)) + r) if side == "left" else (r + [PAD] * (width - len(r)))
              for r in rows]
    mask = [[int(i >= width - len(r)) if side == "left" else int(i < len(r)) for i in range(width)]
            for r in rows]
    inputs.update(input_ids=torch.tensor(padded), attention_mask=torch.tensor(mask))
    if images == 0:
        inputs.pop("pixel_values"), inputs.pop("image_sizes", None)
    return inputs


def _split(inputs, row, prompts):
    """Row ``row`` of a batch from :func:`_batch`, alone and unpadded."""
    first = sum(p.count("<image>") for p in prompts[:row])
    count = prompts[row].count("<image>")
    out = {}
    keep = inputs["attention_mask"][row].bool()
    out["input_ids"] = inputs["input_ids"][row][keep][None]
    out["attention_mask"] = inputs["attention_mask"][row][keep][None]
    if count:
        out["pixel_values"] = inputs["pixel_values"][first:first + count]
        if "image_sizes" in inputs:
            out["image_sizes"] = inputs["image_sizes"][first:first + count]
    return out


def _generate(model, inputs, n=4):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=PAD)


class _SeenLengths:
    """Sequence lengths the language model receives, call by call."""

    def __init__(self, model):
        self.lengths = []
        self._hook = model.model.language_model.register_forward_pre_hook(
            lambda m, args, kwargs: self.lengths.append(kwargs["inputs_embeds"].shape[1]),
            with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def _features(pruned):
    """The kept features of every image, from :meth:`PruningHandle.prune_inputs`."""
    return pruned["mm_encoder_outputs"]["image"].pooler_output


def _image_counts(model, inputs):
    if "image_sizes" in inputs:
        with torch.no_grad():
            return [len(f) for f in model.model.get_image_features(
                inputs["pixel_values"], inputs["image_sizes"]).pooler_output]
    return [N] * len(inputs["pixel_values"])


PROMPTS = [[1, 5, 6, "<image>", 7, 8], [1, 9, "<image>", 7, 8, 11, 12, 13]]


# --------------------------------------------------------------------------- generation
@pytest.mark.parametrize("method,kwargs", ALL, ids=IDS)
def test_generate_with_pruning(model, method, kwargs):
    inputs = _batch(model, PROMPTS)
    keep = None if method == "prumerge" else 5
    with visprune.enable(model, method, keep, **kwargs) as handle, _SeenLengths(model) as seen:
        out = _generate(model, inputs, n=4)
        kept = [len(f) for f in _features(handle.prune_inputs(**inputs))]
    ids = inputs["input_ids"]
    assert out.shape == (2, ids.shape[1] + 4)
    assert torch.equal(out[:, :ids.shape[1]], ids)           # the caller's prompt, then new tokens
    if keep is not None:
        assert kept == [keep, keep]
    # prefill: each row loses its image's surplus tokens, the batch is as wide as the longest row
    removed = [c - k for c, k in zip(_image_counts(model, inputs), kept)]
    real = inputs["attention_mask"].sum(1).tolist()
    assert seen.lengths[0] == max(r - d for r, d in zip(real, removed))
    assert seen.lengths[1:] == [1, 1, 1]                      # then one token per step (KV cache)


@pytest.mark.parametrize("method,kwargs", FIXED, ids=IDS[:3])
def test_keep_all_tokens_is_the_unpruned_model(model, method, kwargs):
    inputs = _batch(model, PROMPTS[:1])
    (count,) = _image_counts(model, inputs)
    kwargs = dict(kwargs, stage1_keep=1.0) if method == "trimtokenator" else kwargs
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = _generate(model, inputs)
    with visprune.enable(model, method, count, **kwargs):
        with torch.no_grad():
            pruned_logits = model(**inputs).logits
        pruned_tokens = _generate(model, inputs)
    torch.testing.assert_close(pruned_logits, logits, rtol=0, atol=0)
    assert torch.equal(pruned_tokens, tokens)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("method,kwargs", ALL, ids=IDS)
def test_batch_matches_rows_one_by_one(model, method, kwargs, side):
    # rows of different lengths; LLaVA-NeXT images of different token counts; a row without image
    prompts = PROMPTS + [[3, 4, 5, 6, 7]]
    inputs = _batch(model, prompts, side=side)
    keep = None if method == "prumerge" else 6
    with visprune.enable(model, method, keep, **kwargs):
        batch = _generate(model, inputs, n=5)[:, inputs["input_ids"].shape[1]:]
        for row in range(len(prompts)):
            alone = _split(inputs, row, prompts)
            single = _generate(model, alone, n=5)[:, alone["input_ids"].shape[1]:]
            assert torch.equal(batch[row], single[0]), f"row {row}"


def test_two_images_in_one_row(llava):
    prompts = [[1, "<image>", 5, "<image>", 6], [1, 2, "<image>", 3]]
    inputs = _batch(llava, prompts)
    with visprune.enable(llava, "divprune", 3) as handle, _SeenLengths(llava) as seen:
        batch = _generate(llava, inputs)[:, inputs["input_ids"].shape[1]:]
        pruned = handle.prune_inputs(**inputs)
        for row in range(2):
            alone = _split(inputs, row, prompts)
            assert torch.equal(batch[row], _generate(llava, alone)[0, alone["input_ids"].shape[1]:])
    assert (pruned["input_ids"] == IMAGE).sum(1).tolist() == [6, 3]
    assert seen.lengths[0] == 3 + 3 + 3              # row 0: 3 text tokens, 2 images of 3


def test_generate_options(llava_next):
    inputs = _batch(llava_next, PROMPTS)
    width = inputs["input_ids"].shape[1]
    with visprune.enable(llava_next, "divprune", 6):
        greedy = _generate(llava_next, inputs)
        # the pre-encoded features follow transformers' own expansion and prefill chunking
        chunked = llava_next.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      pad_token_id=PAD, prefill_chunk_size=8)
        no_cache = llava_next.generate(**inputs, max_new_tokens=4, min_new_tokens=4,
                                       do_sample=False, pad_token_id=PAD, use_cache=False)
        beams = llava_next.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=2,
                                    num_return_sequences=2, pad_token_id=PAD,
                                    return_dict_in_generate=True)
    assert torch.equal(chunked, greedy) and torch.equal(no_cache, greedy)
    assert beams.sequences.shape == (4, width + 4)
    assert torch.equal(beams.sequences[:, :width], inputs["input_ids"].repeat_interleave(2, 0))


# --------------------------------------------------------------------------- generation lengths
EOS = 2                                 # the Llama config's eos_token_id


class _EosBias(transformers.LogitsProcessor):
    """Adds ``bias`` to the EOS logit after generate()'s own processors: ``1e4`` makes EOS the
    greedy choice wherever ``min_length`` / ``min_new_tokens`` allow it, ``-inf`` bans it, so
    the step where a run stops depends on the length options alone, not on the prompt.  Bans
    the image placeholder too: a random model may pick it, and with ``use_cache=False`` the
    model would then count it as one more image token (with or without pruning)."""

    def __init__(self, bias):
        self.bias = bias

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, EOS] += self.bias
        scores[:, IMAGE] = -math.inf
        return scores


def _stop_steps(out, width):
    """Per row, the step of the first generated EOS (-1: none)."""
    eos = out[:, width:] == EOS
    return torch.where(eos.any(1), eos.int().argmax(1), -1).tolist()


def _assert_lengths_as_unpruned(model, inputs, eos, **options):
    """``generate(**options)`` with pruning returns what the unpruned run returns, but for the
    new tokens' values: the same shape, the caller's prompt in front, EOS at the same steps."""
    width = inputs["input_ids"].shape[1]
    given = options.get("generation_config")
    before = None if given is None else given.to_dict()
    if given is None:
        options = dict(options, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    processors = transformers.LogitsProcessorList([_EosBias(eos)])
    unpruned = model.generate(**inputs, **options, logits_processor=processors)
    with visprune.enable(model, "divprune", 4):
        pruned = model.generate(**inputs, **options, logits_processor=processors)
    assert pruned.shape == unpruned.shape
    assert torch.equal(pruned[:, :width], inputs["input_ids"])
    assert _stop_steps(pruned, width) == _stop_steps(unpruned, width)
    assert given is None or given.to_dict() == before           # the caller's config untouched
    return unpruned


LENGTHS = {
    "max_length": lambda w: {"max_length": w + 3},
    "max_and_min_length": lambda w: {"max_length": w + 6, "min_length": w + 4},
    "min_length": lambda w: {"min_length": w + 5},
    "max_new_tokens": lambda w: {"max_new_tokens": 3},
    "min_new_tokens": lambda w: {"max_new_tokens": 8, "min_new_tokens": 4},
    "min_length_and_max_new_tokens": lambda w: {"max_new_tokens": 7, "min_length": w + 2},
    "generation_config": lambda w: {"generation_config": transformers.GenerationConfig(
        max_length=w + 6, min_length=w + 2, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)},
    "default": lambda w: {},
}


@pytest.mark.parametrize("eos", [1e4, -math.inf], ids=["eager_eos", "no_eos"])
@pytest.mark.parametrize("case", list(LENGTHS))
def test_generate_counts_lengths_on_the_callers_prompt(model, case, eos):
    inputs = _batch(model, PROMPTS)
    width = inputs["input_ids"].shape[1]
    out = _assert_lengths_as_unpruned(model, inputs, eos, **LENGTHS[case](width))
    if case == "max_length" and eos < 0:                        # 21 + 16 + 2 = 23 tokens (LLaVA)
        assert out.shape[1] == width + 3


def test_generate_counts_the_models_generation_config_on_the_callers_prompt(llava):
    inputs = _batch(llava, PROMPTS)
    width = inputs["input_ids"].shape[1]
    saved = copy.deepcopy(llava.generation_config)
    try:
        llava.generation_config.max_length = width + 5
        llava.generation_config.min_length = width + 3
        for eos in (1e4, -math.inf):
            _assert_lengths_as_unpruned(llava, inputs, eos)
    finally:
        llava.generation_config = saved


def test_generate_default_length_bounded_by_max_position_embeddings(llava):
    """Without a length option generate() makes 20 new tokens, but no more than the config's
    ``max_position_embeddings`` allows for the whole sequence, the caller's prompt included."""
    inputs = _batch(llava, PROMPTS)
    width = inputs["input_ids"].shape[1]
    llava.config.max_position_embeddings = width + 7
    try:
        out = _assert_lengths_as_unpruned(llava, inputs, -math.inf)
    finally:
        del llava.config.max_position_embeddings
    assert out.shape[1] == width + 7


def test_generate_max_length_within_the_prompt(llava):
    inputs = _batch(llava, PROMPTS)
    width = inputs["input_ids"].shape[1]
    with pytest.raises(ValueError, match="max_length"):
        llava.generate(**inputs, max_length=width, pad_token_id=PAD)
    with visprune.enable(llava, "divprune", 4), _VisionCalls(llava) as v:
        with pytest.raises(ValueError, match=f"{width} tokens long, but max_length is {width}"):
            llava.generate(**inputs, max_length=width, pad_token_id=PAD)
        assert v.calls == 0


# --------------------------------------------------------------------------- forward
def test_forward_shrinks_every_input(llava_next):
    inputs = _batch(llava_next, PROMPTS, side="right")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    labels = torch.where((ids == IMAGE) | (mask == 0), -100, ids)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with visprune.enable(llava_next, "holov", 7, num_crops=4) as handle:
        pruned = handle.prune_inputs(**inputs, labels=labels, position_ids=positions)
        out = llava_next(**inputs, labels=labels, position_ids=positions)
    p_ids, p_mask = pruned["input_ids"], pruned["attention_mask"]
    assert (p_ids == IMAGE).sum(1).tolist() == [7, 7]
    assert out.logits.shape[:2] == p_ids.shape and torch.isfinite(out.loss)
    for row in range(2):
        real = p_mask[row].bool()
        assert real[:real.sum()].all()                          # right padding stays at the right
        # the text and its labels are unchanged, in order; positions stay contiguous
        kept_ids, labels_row = p_ids[row][real], pruned["labels"][row][real]
        text = ids[row][(ids[row] != IMAGE) & mask[row].bool()]
        assert torch.equal(kept_ids[kept_ids != IMAGE], text)
        assert torch.equal(labels_row, torch.where(kept_ids == IMAGE, -100, kept_ids))
        assert torch.equal(pruned["position_ids"][row][real], torch.arange(int(real.sum())))
        assert (pruned["labels"][row][~real] == -100).all()
    # the loss is the language model's loss on the shrunk sequence
    with torch.no_grad():
        direct = llava_next(input_ids=p_ids, attention_mask=p_mask, labels=pruned["labels"],
                            position_ids=pruned["position_ids"],
                            mm_encoder_outputs=pruned["mm_encoder_outputs"])
    torch.testing.assert_close(out.loss, direct.loss)


# --------------------------------------------------------------------------- inputs from the model
def test_cls_attention_matches_the_eager_attention(llava):
    """HoloV's and PruMerge's inputs come from q_proj/k_proj hooks, not from eager attention."""
    inputs = _batch(llava, PROMPTS)
    tower = copy.deepcopy(llava.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        ref = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    layers = tower.encoder.layers
    with torch.no_grad():     # HoloV: the layer that outputs hidden_states[-2], mean over heads
        x = layers[-2].layer_norm1(ref.hidden_states[-3])
        ours = _cls_attention(layers[-2].self_attn.q_proj(x), layers[-2].self_attn.k_proj(x), 4)
    torch.testing.assert_close(ours, ref.attentions[-2][:, :, 0, 1:].mean(1))

    # PruMerge end to end: the last layer as one wide head, merged before the projector
    layers = llava.model.vision_tower.encoder.layers
    with torch.no_grad():
        hidden = llava.model.vision_tower(inputs["pixel_values"],
                                          output_hidden_states=True).hidden_states
        x = layers[-1].layer_norm1(hidden[-2])
        q, k = layers[-1].self_attn.q_proj(x), layers[-1].self_attn.k_proj(x)
        expect = methods.prumerge(hidden[-2][:, 1:], methods.prumerge_cls_attention(q, k),
                                  k[:, 1:], plus=True)
        expect = llava.model.multi_modal_projector(expect.tokens)
        with visprune.enable(llava, "prumerge", plus=True) as handle:
            got = _features(handle.prune_inputs(**inputs))
    for i, g in enumerate(got):
        torch.testing.assert_close(g, expect[i, :len(g)])
    assert llava.config.text_config._attn_implementation == "sdpa"


def test_trimtokenator_reads_the_prompt_text(llava):
    inputs = _batch(llava, PROMPTS)
    with torch.no_grad():
        visual = llava.model.get_image_features(inputs["pixel_values"]).pooler_output
        embeds = llava.get_input_embeddings()(inputs["input_ids"])
        text_mask = (inputs["input_ids"] != IMAGE) & inputs["attention_mask"].bool()
        expect = methods.trimtokenator(torch.stack(visual), embeds, 5, text_mask=text_mask)
        with visprune.enable(llava, "trimtokenator", 5) as handle:
            got = _features(handle.prune_inputs(**inputs))
    torch.testing.assert_close(torch.stack(got), expect.tokens)


# --------------------------------------------------------------------------- enable / disable
def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()}, set(model.__dict__),
            [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()])


def test_enable_disable_round_trip(model):
    inputs = _batch(model, PROMPTS)
    before, tokens = _snapshot(model), _generate(model, inputs)
    handle = visprune.enable(model, "holov", 4, num_crops=4)
    with pytest.raises(RuntimeError, match="already enabled"):
        visprune.enable(model, "divprune", 4)
    with _SeenLengths(model) as seen:
        _generate(model, inputs)
    assert seen.lengths[0] < inputs["input_ids"].shape[1]
    handle.disable()
    handle.disable()                                            # idempotent
    after = _snapshot(model)
    assert after[1:] == before[1:]
    assert all(torch.equal(after[0][k], v) for k, v in before[0].items())
    assert torch.equal(_generate(model, inputs), tokens)
    with visprune.enable(model, "divprune", 4) as h:            # usable again, as a context manager
        assert h.enabled
    assert not h.enabled and _snapshot(model)[1:] == before[1:]


def test_import_does_not_import_transformers():
    code = "import sys, visprune; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- errors, before work
class _VisionCalls:
    def __init__(self, model):
        self.calls = 0
        self._hook = model.model.vision_tower.register_forward_pre_hook(self._count)

    def _count(self, *args):
        self.calls += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._hook.remove()


def test_bad_arguments_at_enable(llava):
    torch.manual_seed(0)
    _, text = _configs()
    with pytest.raises(TypeError, match="LlavaForConditionalGeneration"):
        visprune.enable(transformers.LlamaForCausalLM(text), "divprune", 4)
    with pytest.raises(ValueError, match="method must be one of .*'fastv', 'fitprune'"):
        visprune.enable(llava, "sparsevlm", 4)
    with pytest.raises(ValueError, match="larger than image 0's 16"):
        visprune.enable(llava, "divprune", 17)
    with pytest.raises(ValueError, match="keep >= 1"):
        visprune.enable(llava, "holov")
    with pytest.raises(ValueError, match="adaptive"):
        visprune.enable(llava, "prumerge", 8)
    with pytest.raises(TypeError, match="takes no argument"):
        visprune.enable(llava, "divprune", 4, num_crops=4)
    with pytest.raises(ValueError, match="metric"):
        visprune.enable(llava, "trimtokenator", 4, metric="dot")
    with pytest.raises(ValueError, match="stage1_keep"):
        visprune.enable(llava, "trimtokenator", 14)              # 0.8 · 16 = 13 < 14
    siglip = transformers.LlavaConfig(
        vision_config=transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      image_size=28, patch_size=7),
        text_config=text, image_token_id=IMAGE, vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="no CLS token"):
        visprune.enable(transformers.LlavaForConditionalGeneration(siglip), "holov", 4)
    assert llava.__dict__.get("generate") is None                # nothing left behind


def test_bad_inputs_before_the_vision_tower(llava, llava_next):
    inputs = _batch(llava_next, PROMPTS)
    counts = _image_counts(llava_next, inputs)
    with visprune.enable(llava_next, "divprune", min(counts) + 1), _VisionCalls(llava_next) as v:
        with pytest.raises(ValueError, match=f"larger than image {counts.index(min(counts))}"):
            _generate(llava_next, inputs)
        assert v.calls == 0
    short = dict(inputs, input_ids=inputs["input_ids"].clone())
    short["input_ids"][0, -3] = IMAGE + 1                         # one placeholder fewer
    with visprune.enable(llava_next, "divprune", 4), _VisionCalls(llava_next) as v:
        with pytest.raises(ValueError, match="placeholder tokens"):
            llava_next(**short)
        assert v.calls == 0
    only_image = _batch(llava, [["<image>"], [1, "<image>", 2]])
    with visprune.enable(llava, "trimtokenator", 4), _VisionCalls(llava) as v:
        with pytest.raises(ValueError, match=r"text tokens next to every image; row\(s\) \[0\]"):
            _generate(llava, only_image)
        assert v.calls == 0


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_siglip_tower_token_counts_and_pruning(strategy):
    """A SigLIP tower has no CLS token: "full" passes all 16 patches, "default" drops the first
    patch (transformers' LLaVA drops the first token either way); the methods that read no
    attention prune it, the CLS-attention ones are refused."""
    vision, text = _configs()
    vision = transformers.SiglipVisionConfig(
        **{k: getattr(vision, k) for k in ("hidden_size", "intermediate_size", "image_size",
                                           "num_hidden_layers", "num_attention_heads",
                                           "patch_size")})
    torch.manual_seed(2)
    model = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=IMAGE,
        vision_feature_select_strategy=strategy, vision_feature_layer=-1)).eval()
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        n = len(model.model.get_image_features(pixels).pooler_output[0])
    assert n == (16 if strategy == "full" else 15)
    ids = torch.tensor([[5] + [IMAGE] * n + [6, 7]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels)
    for method in ("divprune", "trimtokenator"):
        with visprune.enable(model, method, 4), _SeenLengths(model) as seen:
            out = _generate(model, inputs, n=2)
        assert seen.lengths[0] == ids.shape[1] - (n - 4) and out.shape[1] == ids.shape[1] + 2
    with visprune.enable(model, "fastv", keep=4, layer=1) as h, torch.no_grad():
        model(**inputs)
        assert int((ids[0, h.positions[0]] == IMAGE).sum()) == 4
    with pytest.raises(ValueError, match="has no CLS token"):
        visprune.enable(model, "holov", 4)
