"""visprune.enable with the methods added after the first four (VisionZip, VisPruner,
CDPruner) on tiny random LLaVA models: the pruned model equals the language model run by hand on
the method's output computed from the vision tower's own eager attention; batches equal rows
alone; generation runs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

import visprune  # noqa: E402
from visprune import methods  # noqa: E402

from test_integration import IMAGE, PROMPTS, _batch, _split  # noqa: E402
from test_integration import llava, llava_next  # noqa: E402,F401  (the tiny models' fixtures)

BATCH = [[1, 5, 6, "<image>", 7, 8], [1, 9, "<image>", 7, 8, 11, 12, 13], [2, "<image>", 3]]


def _vision(model, pixel_values):
    """The CLIP tower's hidden states and eager attentions, computed by transformers."""
    tower = model.model.vision_tower
    implementation = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        out = tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        tower.config._attn_implementation = implementation
    return out.hidden_states, out.attentions


def _run_with_features(model, inputs, kept):
    """The model on ``inputs`` whose image ``j`` is replaced by the projected tokens
    ``kept[j]`` (``[k_j, D]``): each image keeps the first ``k_j`` of its placeholders."""
    ids, mask = inputs["input_ids"][0], inputs["attention_mask"][0]
    drop = torch.zeros_like(ids, dtype=torch.bool)
    image, run = -1, 0
    for i, t in enumerate(ids.tolist()):
        run = run + 1 if t == IMAGE else 0
        image += run == 1                        # a new run of placeholders: the next image
        if run > 0 and run > len(kept[image]):
            drop[i] = True
    out = {"input_ids": ids[~drop][None], "attention_mask": mask[~drop][None],
           "mm_encoder_outputs": {"image": transformers.modeling_outputs.BaseModelOutputWithPooling(
               pooler_output=list(kept))}}
    return model(**out).logits


def _visionzip_by_hand(model, inputs, keep):
    """VisionZip on LLaVA-1.5 as its original wires it: CLIP's ``hidden_states[-2]`` (CLS and
    patches), that layer's CLS attention summed over heads and its keys (``k_proj`` of
    ``layer_norm1`` of the layer's input) averaged over heads; the projector on the output."""
    hidden, attentions = _vision(model, inputs["pixel_values"])
    layer = model.model.vision_tower.vision_model.encoder.layers[-2] \
        if hasattr(model.model.vision_tower, "vision_model") \
        else model.model.vision_tower.encoder.layers[-2]
    heads = layer.self_attn.num_heads
    cls_attn = attentions[-2][:, :, 0, 1:].sum(1)
    keys = layer.self_attn.k_proj(layer.layer_norm1(hidden[-3]))
    P, T, C = keys.shape
    keys = keys.view(P, T, heads, C // heads).mean(2)[:, 1:]
    features = hidden[-2]
    result = methods.visionzip(features[:, 1:], cls_attn, keys, keep, cls_token=features[:, 0],
                               backend="reference")
    return model.model.multi_modal_projector(result.tokens)


def _vispruner_by_hand(model, inputs, keep):
    """VisPruner on LLaVA-1.5 as its original wires it: the patches of CLIP's
    ``hidden_states[-2]``, that layer's CLS attention averaged over heads; the projector on the
    kept tokens."""
    hidden, attentions = _vision(model, inputs["pixel_values"])
    cls_attn = attentions[-2][:, :, 0, 1:].mean(1)
    result = methods.vispruner(hidden[-2][:, 1:], cls_attn, keep, backend="reference")
    return model.model.multi_modal_projector(result.tokens)


def _cdpruner_by_hand(model, inputs, keep):
    """CDPruner with the integration's relevance: the original's mean over the text of
    ``-cos(image token, text token)``, the projector outputs against the LLM's input embeddings
    of the prompt's text tokens (LLaVA has no CLIP text tower); the DPP on the projector
    outputs."""
    features = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                              return_dict=True).pooler_output
    features = torch.stack(list(features))
    ids = inputs["input_ids"][0]
    text = model.get_input_embeddings()(ids[(ids != IMAGE) & (inputs["attention_mask"][0] == 1)])
    cos = torch.nn.functional.cosine_similarity(features[:, :, None], text[None, None], dim=-1)
    result = methods.cdpruner(features, keep, relevance=-cos.mean(-1), backend="reference")
    return result.tokens


BY_HAND = {"visionzip": _visionzip_by_hand, "vispruner": _vispruner_by_hand,
           "cdpruner": _cdpruner_by_hand}


@pytest.mark.parametrize("method", sorted(BY_HAND))
def test_pruned_model_equals_the_method_by_hand(llava, method):
    keep = 6
    prompts = PROMPTS + [[1, "<image>", 5, "<image>", 6]]            # two images in one row
    for row in range(len(prompts)):
        inputs = _split(_batch(llava, prompts), row, prompts)
        with torch.no_grad():
            expected = _run_with_features(llava, inputs, BY_HAND[method](llava, inputs, keep))
            with visprune.enable(llava, method, keep):
                got = llava(**inputs).logits
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", sorted(BY_HAND))
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_equals_rows_alone(llava, method, side):
    inputs = _batch(llava, BATCH, side=side)
    with visprune.enable(llava, method, 5), torch.no_grad():
        out = llava(**inputs).logits
        for row in range(len(BATCH)):
            alone = llava(**_split(inputs, row, BATCH)).logits[0]
            real = (inputs["attention_mask"][row] == 1).sum() - (16 - 5)
            got = out[row, -real:] if side == "left" else out[row, :real]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
        tokens = llava.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokens.shape == (len(BATCH), inputs["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("method", ["visionzip", "vispruner", "cdpruner"])
def test_on_llava_next(llava_next, method):
    prompts = [[1, "<image>", 5, 6], [2, 3, "<image>", 4]]
    inputs = _batch(llava_next, prompts)
    with visprune.enable(llava_next, method, 7) as handle, torch.no_grad():
        kept = handle.prune_inputs(**inputs)["mm_encoder_outputs"]["image"].pooler_output
        assert [len(k) for k in kept] == [7, 7]
        tokens = llava_next.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert tokens.shape == (2, inputs["input_ids"].shape[1] + 2)
