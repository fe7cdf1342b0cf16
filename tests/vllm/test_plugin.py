"""visprune's vLLM plugin on vLLM's CPU build: tiny random LLaVA-1.5 / LLaVA-NeXT / Qwen2.5-VL
checkpoints saved locally, offline ``LLM.generate`` with images, greedy, fp32; the
OpenAI-compatible server on 127.0.0.1.  Run by scripts/vllm_check.sh in its own environment."""
from __future__ import annotations

import base64
import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tiny

from vllm import LLM, SamplingParams  # noqa: E402

import visprune  # noqa: E402
from visprune.integrations.transformers.llava import image_layout  # noqa: E402
from visprune.integrations.vllm.qwen import decode_positions, encode_positions  # noqa: E402
from visprune.methods import divprune  # noqa: E402

NEW_TOKENS = 6
# min_tokens: EOS is not chosen before the last token, as transformers' min_new_tokens does
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0,
                        ignore_eos=True)
METHODS = ["divprune", "trimtokenator", "holov", "visionzip", "vispruner", "cdpruner"]
KEEP = 5
# two prompts (text around one image each) and their images; NeXT images of different sizes
TEXTS = ["w5 w6 <image> w7 w8", "w9 <image> w10 w11 w12 w13"]
SIZES = {"llava": [(28, 28), (28, 28)], "llava_siglip": [(28, 28), (28, 28)],
         "llava_next": [(20, 50), (56, 40)]}


@pytest.fixture(scope="session", autouse=True)
def _cache_root(tmp_path_factory):
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm_cache"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{family: (transformers model, saved directory)}``."""
    out = {}
    for family in ("llava", "llava_siglip", "llava_next"):
        model = tiny.build(family)
        out[family] = model, tiny.save(model, family, str(tmp_path_factory.mktemp(family)))
    return out


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory):
    """``(transformers Qwen2.5-VL, saved directory)``."""
    model = tiny.build_qwen()
    return model, tiny.save_qwen(model, str(tmp_path_factory.mktemp("qwen2_5_vl")))


def _engine(path, visprune_config=None, **kwargs):
    overrides = {"visprune": visprune_config} if visprune_config is not None else None
    kwargs = {"dtype": "float32", "max_model_len": 512, **kwargs}
    return LLM(model=path, enforce_eager=True, seed=0, hf_overrides=overrides, **kwargs)


def _run(path, visprune_config, work, **kwargs):
    """``work(llm)`` on a fresh in-process engine, dropped before returning: the next engine must
    not be built while one is alive (its teardown resets vLLM's process-wide parallel state)."""
    llm = _engine(path, visprune_config, **kwargs)
    try:
        return work(llm)
    finally:
        del llm
        gc.collect()


def _requests(family, texts=TEXTS, seeds=(0, 1)):
    """vLLM requests (unexpanded prompt ids, one image each) and the transformers inputs of
    each (the processor expands the image placeholder)."""
    processor = tiny.processor(family)
    requests, inputs = [], []
    for text, seed, size in zip(texts, seeds, SIZES[family]):
        image = tiny.image(seed, size)
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        requests.append({"prompt_token_ids": ids, "multi_modal_data": {"image": image}})
        inputs.append(processor(images=image, text=text, return_tensors="pt"))
    return requests, inputs


def _transformers_generate(model, inputs):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False, pad_token_id=tiny.PAD)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def _visual_tokens(inputs):
    return int((inputs["input_ids"] == tiny.IMAGE).sum())


def _serves(llm, image_request) -> bool:
    """Whether the engine answers a plain-text request and ``image_request`` in full: a request
    refused (or failing) before them must not have left it stuck."""
    text = {"prompt_token_ids": image_request["prompt_token_ids"][:1] + [20, 21, 22]}
    outputs = [llm.generate([r], GREEDY)[0] for r in (text, image_request)]
    return [len(o.outputs[0].token_ids) for o in outputs] == [NEW_TOKENS] * 2


def _refused(llm, request, image_request):
    """``(error, serves)``: the message ``request`` is refused with (``None``: it ran), and
    :func:`_serves` afterwards."""
    try:
        llm.generate([request], GREEDY)
        error = None
    except Exception as e:          # noqa: BLE001  (the test reads the message)
        error = str(e)
    return error, _serves(llm, image_request)


# ------------------------------------------------------------------------------ generation
@pytest.mark.parametrize("family,method", [("llava", m) for m in METHODS] + [
    ("llava_next", m) for m in ("divprune", "trimtokenator", "holov", "vispruner")])
def test_pruned_generation_matches_transformers(checkpoints, family, method):
    model, path = checkpoints[family]
    requests, inputs = _requests(family)
    # both images in one encoder step
    outputs = _run(path, {"method": method, "keep": KEEP},
                   lambda llm: llm.generate(requests, GREEDY))
    with visprune.enable(model, method, KEEP):
        expected = [_transformers_generate(model, x) for x in inputs]
    for request, x, output, tokens in zip(requests, inputs, outputs, expected):
        text = sum(t != tiny.IMAGE for t in request["prompt_token_ids"])
        assert _visual_tokens(x) > KEEP
        assert len(output.prompt_token_ids) == text + KEEP
        assert list(output.outputs[0].token_ids) == tokens


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_keep_all_tokens_is_unpruned_vllm(checkpoints, family):
    model, path = checkpoints[family]
    requests, inputs = _requests(family)
    unpruned = _run(path, None, lambda llm: llm.generate(requests, GREEDY))
    # every image keeps all its tokens: LLaVA-1.5 N = 16, the NeXT images have more
    keep = max(_visual_tokens(x) for x in inputs)
    pruned = _run(path, {"method": "divprune", "keep": keep},
                  lambda llm: llm.generate(requests, GREEDY))
    for a, b, x in zip(unpruned, pruned, inputs):
        assert len(a.prompt_token_ids) == len(b.prompt_token_ids)
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
    # unpruned vLLM is the transformers model
    assert [list(a.outputs[0].token_ids) for a in unpruned] == [
        _transformers_generate(model, x) for x in inputs]


def _start_recording(model):
    if model.visprune is not None:
        model.visprune.record = []


def _recorded(model):
    return None if model.visprune is None else [t.tolist() for t in model.visprune.record]


@pytest.mark.parametrize("method", ["trimtokenator", "cdpruner"])
def test_text_conditioned_prunes_per_prompt(checkpoints, method):
    model, path = checkpoints["llava"]
    texts = ["w20 w21 w22 <image> w23", "w90 <image> w91 w92 w93 w94 w95 w96"]
    requests, inputs = _requests("llava", texts=texts, seeds=(7, 7))     # one image, two prompts
    def work(llm):
        llm.apply_model(_start_recording)
        first = llm.generate(requests[:1], GREEDY)
        second = llm.generate(requests[1:], GREEDY)       # the image is in vLLM's caches now
        return first, second, llm.apply_model(_recorded)[0]

    first, second, kept = _run(path, {"method": method, "keep": KEEP}, work)
    # the encoder ran for each prompt (no cache reuse) and kept different tokens
    assert len(kept) == 2 and kept[0] != kept[1]
    with visprune.enable(model, method, KEEP):
        assert list(first[0].outputs[0].token_ids) == _transformers_generate(model, inputs[0])
        assert list(second[0].outputs[0].token_ids) == _transformers_generate(model, inputs[1])


def test_precomputed_image_embeddings_are_pruned(checkpoints):
    model, path = checkpoints["llava"]
    requests, inputs = _requests("llava")
    with torch.no_grad():
        embeds = model.model.get_image_features(inputs[0]["pixel_values"]).pooler_output
    request = {"prompt_token_ids": requests[0]["prompt_token_ids"],
               "multi_modal_data": {"image": embeds[:1]}}           # [1, N, D]: embeddings
    (output,), (pixels,) = _run(
        path, {"method": "divprune", "keep": KEEP},
        lambda llm: (llm.generate([request], GREEDY), llm.generate(requests[:1], GREEDY)),
        enable_mm_embeds=True)
    assert len(output.prompt_token_ids) == len(pixels.prompt_token_ids)
    assert list(output.outputs[0].token_ids) == list(pixels.outputs[0].token_ids)


def _generate_from_features(model, inputs, features):
    """transformers' greedy tokens for ``inputs`` with one image whose visual tokens are
    ``features[K, D]`` (its placeholders cut to ``K``)."""
    ids = inputs["input_ids"][0]
    image = ids == tiny.IMAGE
    ids = ids[~image | (image.cumsum(0) <= len(features))][None]
    return _transformers_generate(model, {"input_ids": ids, "mm_encoder_outputs": {
        "image": BaseModelOutputWithPooling(pooler_output=[features])}})


def test_siglip_tower_prunes_with_methods_that_read_no_attention(checkpoints):
    """A SigLIP tower has no CLS token (the CLS-attention methods are refused at start-up), but
    DivPrune reads only the projector outputs: vLLM keeps DivPrune's tokens of the transformers
    model's projector outputs and generates what that model generates from them."""
    model, path = checkpoints["llava_siglip"]
    requests, inputs = _requests("llava_siglip")

    def work(llm):
        llm.apply_model(_start_recording)
        return llm.generate(requests, GREEDY), llm.apply_model(_recorded)[0]

    outputs, recorded = _run(path, {"method": "divprune", "keep": KEEP}, work)
    for request, x, output, kept in zip(requests, inputs, outputs, recorded):
        with torch.no_grad():
            (features,) = model.model.get_image_features(
                pixel_values=x["pixel_values"], return_dict=True).pooler_output
        assert _visual_tokens(x) == len(features) > KEEP
        expected = divprune(features[None], KEEP)
        assert kept == expected.indices[0].tolist()
        text = sum(t != tiny.IMAGE for t in request["prompt_token_ids"])
        assert len(output.prompt_token_ids) == text + KEEP
        assert list(output.outputs[0].token_ids) == _generate_from_features(
            model, x, expected.tokens[0])


@pytest.mark.parametrize("method", ["vispruner", "visionzip"])
def test_next_clip_feature_methods_on_an_image_with_fewer_clip_tokens_than_keep(checkpoints,
                                                                                method):
    """VisionZip and VisPruner choose among CLIP features, which a LLaVA-NeXT image's newline
    tokens lack: an image with fewer CLIP tokens than ``keep`` (but not fewer tokens, newlines
    counted) keeps all its CLIP tokens, and the processor announces that many placeholders —
    what transformers gives with ``keep`` = that count."""
    model, path = checkpoints["llava_next"]
    processor = tiny.processor("llava_next")
    text, image = "w5 <image> w7 w8", tiny.image(4, (28, 28))
    x = processor(images=image, text=text, return_tensors="pt")
    layout = image_layout(model, 1, x["image_sizes"].tolist(), "default")[0]
    clip = int((layout >= 0).sum())
    assert clip < clip + 1 <= len(layout)
    request = {"prompt_token_ids": processor.tokenizer(text, add_special_tokens=False)[
        "input_ids"], "multi_modal_data": {"image": image}}
    (output,) = _run(path, {"method": method, "keep": clip + 1},
                     lambda llm: llm.generate([request], GREEDY))
    with visprune.enable(model, method, clip):
        expected = _transformers_generate(model, x)
    text_tokens = sum(t != tiny.IMAGE for t in request["prompt_token_ids"])
    assert len(output.prompt_token_ids) == text_tokens + clip
    assert list(output.outputs[0].token_ids) == expected


def test_refused_request_leaves_the_engine_serving(checkpoints):
    """A request the method cannot prune (precomputed embeddings for HoloV, which reads the
    vision tower's attention) is refused before any work, naming the reason; the engine then
    answers a plain-text request and an image request."""
    model, path = checkpoints["llava"]
    requests, inputs = _requests("llava")
    with torch.no_grad():
        embeds = model.model.get_image_features(inputs[0]["pixel_values"]).pooler_output
    request = {"prompt_token_ids": requests[0]["prompt_token_ids"],
               "multi_modal_data": {"image": embeds[:1]}}
    error, serves = _run(path, {"method": "holov", "keep": KEEP},
                         lambda llm: _refused(llm, request, requests[0]), enable_mm_embeds=True)
    assert error is not None and "holov needs the vision tower's attention" in error, error
    assert serves


# ------------------------------------------------------------------------------ start-up errors
STARTUP_ERRORS = {
    "prumerge": ("llava", {"method": "prumerge"}, "adaptive"),
    "fastv": ("llava", {"method": "fastv", "keep": 4}, "inside the language model"),
    "unknown": ("llava", {"method": "nope", "keep": 4}, "unknown method 'nope'"),
    "method-list": ("llava", {"method": ["divprune"], "keep": 4},
                    r"method must be a string naming one of .*, got \['divprune'\] \(list\)"),
    "no-keep": ("llava", {"method": "divprune"}, "needs keep"),
    "bad-option": ("llava", {"method": "divprune", "keep": 4, "colour": 1},
                   r"takes no option\(s\) \['colour'\]"),
    "bad-stage1": ("llava", {"method": "trimtokenator", "keep": 4, "stage1_keep": 2},
                   "stage1_keep"),
    "keep-too-large": ("llava", {"method": "divprune", "keep": tiny.N + 1},
                       f"keep={tiny.N + 1} is larger than the {tiny.N} visual tokens of every "
                       f"image"),
    # stage 1 keeps round(0.8 N) < keep of every image; the dry run's dummy image alone passes
    "stage1-below-keep": ("llava", {"method": "trimtokenator", "keep": tiny.N - 2},
                          rf"stage1_keep=0.8 keeps {round(0.8 * tiny.N)} of an image's "
                          rf"{tiny.N} visual tokens \(every image of this model has {tiny.N}\)"),
    # a LLaVA-NeXT image has at least its base crop's N tokens
    "next-stage1-below-keep": ("llava_next", {"method": "trimtokenator", "keep": tiny.N - 2},
                               rf"keeps {round(0.8 * tiny.N)} of an image's {tiny.N} visual "
                               rf"tokens \(this model's smallest images have {tiny.N}\)"),
    "next-keep-too-large": ("llava_next", {"method": "divprune", "keep": 10 ** 6},
                            r"keep=1000000 is larger than the \d+ visual tokens of the largest"),
    "cdpruner-batch-scope": ("llava", {"method": "cdpruner", "keep": 4,
                                       "relevance_scope": "batch"},
                             "needs relevance_scope='image', got 'batch'"),
    "siglip-cls-method": ("llava_siglip", {"method": "holov", "keep": 4},
                          "SiglipVisionConfig tower has no CLS token"),
}


@pytest.mark.parametrize("family,config,message", STARTUP_ERRORS.values(), ids=STARTUP_ERRORS)
def test_bad_configuration_fails_at_start_up(checkpoints, family, config, message):
    _, path = checkpoints[family]
    with pytest.raises(Exception, match=message):
        _run(path, config, lambda llm: None)


def test_model_without_visprune_entry_is_vllm_own(checkpoints):
    _, path = checkpoints["llava"]
    assert _run(path, None, lambda llm: llm.apply_model(lambda model: model.visprune)) == [None]


# ------------------------------------------------------------------------------ server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url, payload, timeout=60):
    """``(status, reply)``: the HTTP status and the JSON body, an error's included."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _base64(write) -> str:
    buffer = io.BytesIO()
    write(buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def test_openai_server_serves_pruned_model_and_survives_refused_requests(checkpoints, tmp_path):
    """An image request; then a request the method refuses (precomputed embeddings for HoloV)
    gets an HTTP 400 naming the reason, and the server still answers a plain-text request and
    an image request."""
    model, path = checkpoints["llava"]
    port = _free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
         "--max-model-len", "512", "--enable-mm-embeds",
         "--hf-overrides", json.dumps({"visprune": {"method": "holov", "keep": KEEP}})],
        stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"

    def chat(*content):
        return _post(url, {"model": path, "max_tokens": 4, "temperature": 0,
                           "messages": [{"role": "user", "content": [
                               *content, {"type": "text", "text": "w5 w6"}]}]})

    _, inputs = _requests("llava")
    with torch.no_grad():
        embeds = model.model.get_image_features(inputs[0]["pixel_values"]).pooler_output
    image = {"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + _base64(lambda f: tiny.image(3).save(f, format="PNG"))}}
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not start in 240 s"
                time.sleep(1)
        status, reply = chat(image)
        # "<image> w5 w6 w1 w2" (the chat template): 4 text tokens + KEEP visual tokens
        assert status == 200 and reply["usage"]["prompt_tokens"] == 4 + KEEP, reply
        assert reply["usage"]["completion_tokens"] == 4
        status, reply = chat({"type": "image_embeds",
                              "image_embeds": _base64(lambda f: torch.save(embeds[0], f))})
        assert status == 400 and "holov needs the vision tower's attention" in str(reply), reply
        status, reply = _post(url, {"model": path, "max_tokens": 4, "temperature": 0,
                                    "messages": [{"role": "user", "content": "w5 w6"}]})
        assert status == 200 and reply["usage"]["completion_tokens"] == 4, reply
        status, reply = chat(image)
        assert status == 200 and reply["usage"]["prompt_tokens"] == 4 + KEEP, reply
        assert server.poll() is None
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# ------------------------------------------------------------------------------ Qwen2.5-VL
P = tiny.QWEN_PLACEHOLDER
# (prompt, images): 12 merged tokens; 10 + 9 (two sizes in one prompt); one image (12 tokens)
# under two prompts
QWEN_PROMPTS = [
    (f"w5 w6 {P} w7 w8", [(0, (84, 112))]),
    (f"w9 {P} w10 {P} w11 w12", [(1, (140, 56)), (2, (84, 84))]),
    (f"w20 w21 w22 {P} w23", [(7, (112, 84))]),
    (f"w90 {P} w91 w92 w93 w94 w95 w96", [(7, (112, 84))]),
]
# (method, keep, options); TrimTokenator's stage 1 keeps half of the tokens by their mutual
# information with the prompt (at 0.8 the two prompts happen to end in the same tokens)
QWEN_RUNS = [("divprune", 0.5, {}), ("trimtokenator", KEEP, {"stage1_keep": 0.5}),
             ("holov", KEEP, {}), ("vispruner", KEEP, {}), ("cdpruner", KEEP, {})]


def _qwen_requests():
    """vLLM requests (unexpanded prompt ids) and the transformers inputs of each."""
    processor = tiny.qwen_processor()
    requests, inputs = [], []
    for text, images in QWEN_PROMPTS:
        images = [tiny.image(seed, size) for seed, size in images]
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        requests.append({"prompt_token_ids": ids, "multi_modal_data": {"image": images}})
        inputs.append(processor(images=images, text=text, return_tensors="pt"))
    return requests, inputs


def _qwen_embeds(rows: int, cols: int, seed: int = 0):
    """Precomputed embeddings of an image whose merged grid is ``rows × cols``, and its grid."""
    embeds = torch.randn(rows * cols, 128, generator=torch.Generator().manual_seed(seed))
    return {"image_embeds": embeds, "image_grid_thw": torch.tensor([[1, 2 * rows, 2 * cols]])}


def _qwen_work(llm):
    """The first two prompts in one ``generate`` (three images of different sizes in one
    encoder step), then the two prompts that share an image, one after the other (the image is
    in vLLM's caches for the second); the kept indices the engine recorded; then, per request
    that a method may refuse (a video, precomputed embeddings, an image without text), the
    :func:`_refused` pair ``(error, serves)``."""
    requests, _ = _qwen_requests()
    llm.apply_model(_start_recording)
    outputs = llm.generate(requests[:2], GREEDY)
    outputs += llm.generate(requests[2:3], GREEDY)
    outputs += llm.generate(requests[3:], GREEDY)
    recorded = llm.apply_model(_recorded)[0]
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    metadata = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "video_backend": "opencv",
                "frames_indices": [0, 1, 2, 3], "do_sample_frames": False}
    placeholder = [tiny.QWEN_START, tiny.QWEN_IMAGE, tiny.QWEN_END]
    maybe_refused = {
        "video": {"prompt_token_ids": [10, tiny.QWEN_START, tiny.QWEN_VIDEO, tiny.QWEN_END],
                  "multi_modal_data": {"video": (frames, metadata)}},
        "embeds": {"prompt_token_ids": [10, *placeholder, 11],
                   "multi_modal_data": {"image": _qwen_embeds(2, 3)}},
        "no-text": {"prompt_token_ids": [tiny.QWEN_IMAGE],
                    "multi_modal_data": {"image": tiny.image(5, (56, 56))}},
    }
    refusals = {name: _refused(llm, request, requests[0])
                for name, request in maybe_refused.items()}
    return outputs, recorded, refusals


@pytest.fixture(scope="module")
def qwen_runs(qwen_checkpoint):
    """``{(method, keep): (outputs, recorded kept indices)}``, one engine per configuration,
    shared by the tests below."""
    _, path = qwen_checkpoint
    cache = {}

    def get(method, keep, options=None):
        key = (method, keep, json.dumps(options))
        if key not in cache:
            config = None if method is None else {"method": method, "keep": keep,
                                                  **(options or {})}
            # 8 tokens per step: the prompts' images are split across prefill chunks
            cache[key] = _run(path, config, _qwen_work, enable_mm_embeds=True,
                              max_num_batched_tokens=None if method is None else 8)
        return cache[key]

    return get


def _qwen_budget(keep, n):
    return min(n, keep) if isinstance(keep, int) else max(1, int(np.floor(keep * n + 0.5)))


@pytest.mark.parametrize("method,keep,options", QWEN_RUNS, ids=[m for m, _, _ in QWEN_RUNS])
def test_qwen_pruned_generation_matches_transformers(qwen_checkpoint, qwen_runs, method, keep,
                                                     options):
    """The prompt is its text plus each image's budget; vLLM keeps the tokens
    ``visprune.enable`` keeps on the transformers model and generates the same greedy tokens
    (which places the kept tokens at their original M-RoPE positions: the transformers
    integration is tested against the language model run by hand at those positions)."""
    model, _ = qwen_checkpoint
    requests, inputs = _qwen_requests()
    outputs, recorded, _ = qwen_runs(method, keep, options)
    expected, kept = [], []
    with visprune.enable(model, method, keep, **options) as handle:
        for x in inputs:
            expected.append(_transformers_generate(model, x))
            kept += [k.tolist() for k in handle.kept]
    if method in ("trimtokenator", "cdpruner"):
        assert recorded == kept
    else:       # the last prompt's image came from vLLM's encoder cache
        assert recorded == kept[:4] and kept[3] == kept[4]
    for request, x, output, tokens in zip(requests, inputs, outputs, expected):
        text = sum(t != tiny.QWEN_IMAGE for t in request["prompt_token_ids"])
        sizes = (x["image_grid_thw"].prod(-1) // 4).tolist()
        assert all(_qwen_budget(keep, n) < n for n in sizes)
        assert len(output.prompt_token_ids) == text + sum(_qwen_budget(keep, n) for n in sizes)
        assert list(output.outputs[0].token_ids) == tokens


@pytest.mark.parametrize("method,keep,options", QWEN_RUNS[1:2] + QWEN_RUNS[4:],
                         ids=["trimtokenator", "cdpruner"])
def test_qwen_text_conditioned_prunes_per_prompt(qwen_runs, method, keep, options):
    _, recorded, _ = qwen_runs(method, keep, options)
    # 3 images, then the shared image once per prompt: the encoder ran for each prompt
    assert len(recorded) == 5 and recorded[3] != recorded[4]


def test_qwen_keep_all_tokens_is_unpruned_vllm(qwen_checkpoint, qwen_runs):
    model, _ = qwen_checkpoint
    _, inputs = _qwen_requests()
    unpruned, _, _ = qwen_runs(None, None)
    everything, recorded, _ = qwen_runs("divprune", 1.0)
    assert [len(k) for k in recorded] == [12, 10, 9, 12]
    for a, b in zip(unpruned, everything):
        assert len(a.prompt_token_ids) == len(b.prompt_token_ids)
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
    # unpruned vLLM is the transformers model
    assert [list(a.outputs[0].token_ids) for a in unpruned] == [
        _transformers_generate(model, x) for x in inputs]


@pytest.mark.parametrize("method,keep,options", [(None, None, None)] + QWEN_RUNS,
                         ids=["unpruned"] + [m for m, _, _ in QWEN_RUNS])
def test_qwen_refused_requests_leave_the_engine_serving(qwen_runs, method, keep, options):
    """While pruning, a video is refused (vLLM's own limit), precomputed embeddings for HoloV /
    VisPruner (they read the vision tower's attention), an image without text for the
    text-conditioned methods; each before any work, naming the reason, and the engine then
    answers a plain-text request and an image request.  vLLM's own model takes all three."""
    expected = {"video": None, "embeds": None, "no-text": None}
    if method is not None:
        expected["video"] = "At most 0 video"
    if method in ("holov", "vispruner"):
        expected["embeds"] = f"{method} needs the vision tower's attention"
    if method in ("trimtokenator", "cdpruner"):
        expected["no-text"] = f"{method} needs text tokens"
    _, _, refusals = qwen_runs(method, keep, options)
    for name, (error, serves) in refusals.items():
        if expected[name] is None:
            assert error is None, (name, error)
        else:
            assert error is not None and expected[name] in error, (name, error)
        assert serves, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qwen_position_channels_are_exact_up_to_the_largest_side(dtype):
    """The (t, h, w) channels carried after a kept token's embedding decode exactly in every
    embedding dtype, up to the largest grid side they promise (256**3 - 1)."""
    largest = 256 ** 3 - 1
    thw = torch.tensor([[0, 0, 0], [0, 1, 259], [1, 256, 257], [7, 65535, 65536],
                        [largest, largest - 1, 2 ** 20 + 3]])
    assert torch.equal(decode_positions(encode_positions(thw, dtype)), thw.T)


def test_qwen_bf16_keeps_exact_positions_on_a_grid_wider_than_256(qwen_checkpoint):
    """bf16 holds integers exactly only up to 256: on a 2×300 merged grid (precomputed
    embeddings; DivPrune keeps half) every kept token reaches the first decoder layer at its
    image's start position plus its own (t, h, w) in the grid."""
    _, path = qwen_checkpoint
    rows, cols = 2, 300
    text = [10, 11, tiny.QWEN_START]
    request = {"prompt_token_ids": text + [tiny.QWEN_IMAGE, tiny.QWEN_END, 12],
               "multi_modal_data": {"image": _qwen_embeds(rows, cols)}}

    def work(llm):
        seen = []

        def setup(model):
            model.visprune.record = []
            model.language_model.model.layers[0].register_forward_pre_hook(
                lambda module, args, kwargs: seen.append(kwargs.get("positions", args[0])),
                with_kwargs=True)

        llm.apply_model(setup)
        (output,) = llm.generate([request], SamplingParams(max_tokens=1, temperature=0.0))
        return output, seen[0], llm.apply_model(_recorded)[0]

    output, positions, recorded = _run(path, {"method": "divprune", "keep": 0.5}, work,
                                       dtype="bfloat16", enable_mm_embeds=True)
    (kept,) = recorded
    kept = torch.tensor(kept)
    assert len(kept) == rows * cols // 2 and int((kept % cols).max()) > 256
    start = len(text)          # the image's first position: text before it is numbered 0, 1, ...
    expected = start + torch.stack([torch.zeros_like(kept), kept // cols, kept % cols])
    assert torch.equal(positions[:, start:start + len(kept)].cpu(), expected)


@pytest.mark.parametrize("config,message", [
    ({"method": "visionzip", "keep": 4}, "no original M-RoPE position"),
    ({"method": "fastv", "keep": 4}, "inside the language model"),
    ({"method": "divprune", "keep": 1.5}, r"keep must be an int >= 1 or a float in \(0, 1\]"),
    ({"method": "holov", "keep": 4, "redistribute": False}, "redistribute=True"),
    ({"method": "trimtokenator", "keep": 0.9}, r"stage1_keep must be a fraction >= keep=0.9"),
], ids=["visionzip", "fastv", "bad-keep", "holov-redistribute", "stage1-below-keep"])
def test_qwen_bad_configuration_fails_at_start_up(qwen_checkpoint, config, message):
    _, path = qwen_checkpoint
    with pytest.raises(Exception, match=message):
        _run(path, config, lambda llm: None)
