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
import urllib.request

import numpy as np
import pytest
import torch

import tiny

from vllm import LLM, SamplingParams  # noqa: E402

import visprune  # noqa: E402

NEW_TOKENS = 6
# min_tokens: EOS is not chosen before the last token, as transformers' min_new_tokens does
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0,
                        ignore_eos=True)
METHODS = ["divprune", "trimtokenator", "holov", "visionzip", "vispruner", "cdpruner"]
KEEP = 5
# two prompts (text around one image each) and their images; NeXT images of different sizes
TEXTS = ["w5 w6 <image> w7 w8", "w9 <image> w10 w11 w12 w13"]
SIZES = {"llava": [(28, 28), (28, 28)], "llava_next": [(20, 50), (56, 40)]}


@pytest.fixture(scope="session", autouse=True)
def _cache_root(tmp_path_factory):
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm_cache"))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """``{family: (transformers model, saved directory)}``."""
    out = {}
    for family in ("llava", "llava_next"):
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
    return LLM(model=path, enforce_eager=True, max_model_len=512, dtype="float32", seed=0,
               hf_overrides=overrides, **kwargs)


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


# ------------------------------------------------------------------------------ start-up errors
@pytest.mark.parametrize("config,message", [
    ({"method": "prumerge"}, "adaptive"),
    ({"method": "fastv", "keep": 4}, "inside the language model"),
    ({"method": "nope", "keep": 4}, "unknown method 'nope'"),
    ({"method": "divprune"}, "needs keep"),
    ({"method": "divprune", "keep": 4, "colour": 1}, r"takes no option\(s\) \['colour'\]"),
    ({"method": "trimtokenator", "keep": 4, "stage1_keep": 2}, "stage1_keep"),
    ({"method": "divprune", "keep": 17}, "larger than the 16 visual tokens"),
], ids=["prumerge", "fastv", "unknown", "no-keep", "bad-option", "bad-stage1", "keep-too-large"])
def test_bad_configuration_fails_at_start_up(checkpoints, config, message):
    _, path = checkpoints["llava"]
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
    request = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def test_openai_server_serves_pruned_model(checkpoints, tmp_path):
    _, path = checkpoints["llava"]
    port = _free_port()
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1")
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", path,
         "--host", "127.0.0.1", "--port", str(port), "--enforce-eager", "--dtype", "float32",
         "--max-model-len", "512",
         "--hf-overrides", json.dumps({"visprune": {"method": "divprune", "keep": KEEP}})],
        stdout=log, stderr=subprocess.STDOUT, env=env)
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
        png = io.BytesIO()
        tiny.image(3).save(png, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", {
            "model": path, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "text", "text": "w5 w6"}]}]})
        # "<image> w5 w6 w1 w2" (the chat template): 4 text tokens + KEEP visual tokens
        assert reply["usage"]["prompt_tokens"] == 4 + KEEP
        assert reply["usage"]["completion_tokens"] == 4
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


def _qwen_work(llm):
    """The first two prompts in one ``generate`` (three images of different sizes in one
    encoder step), then the two prompts that share an image, one after the other (the image is
    in vLLM's caches for the second); the kept indices the engine recorded; the error a video
    request raises (``None``: it ran)."""
    requests, _ = _qwen_requests()
    llm.apply_model(_start_recording)
    outputs = llm.generate(requests[:2], GREEDY)
    outputs += llm.generate(requests[2:3], GREEDY)
    outputs += llm.generate(requests[3:], GREEDY)
    recorded = llm.apply_model(_recorded)[0]
    frames = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    metadata = {"total_num_frames": 4, "fps": 2.0, "duration": 2.0, "video_backend": "opencv",
                "frames_indices": [0, 1, 2, 3], "do_sample_frames": False}
    video = {"prompt_token_ids": [10, tiny.QWEN_START, tiny.QWEN_VIDEO, tiny.QWEN_END],
             "multi_modal_data": {"video": (frames, metadata)}}
    try:
        llm.generate([video], GREEDY)
        error = None
    except Exception as e:          # noqa: BLE001  (the test reads the message)
        error = str(e)
    return outputs, recorded, error


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
            cache[key] = _run(path, config, _qwen_work,
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
    outputs, recorded, video_error = qwen_runs(method, keep, options)
    assert video_error is not None and "At most 0 video" in video_error, video_error
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
    unpruned, _, video_error = qwen_runs(None, None)
    assert video_error is None          # the video request is valid for vLLM's own model
    everything, recorded, _ = qwen_runs("divprune", 1.0)
    assert [len(k) for k in recorded] == [12, 10, 9, 12]
    for a, b in zip(unpruned, everything):
        assert len(a.prompt_token_ids) == len(b.prompt_token_ids)
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
    # unpruned vLLM is the transformers model
    assert [list(a.outputs[0].token_ids) for a in unpruned] == [
        _transformers_generate(model, x) for x in inputs]


@pytest.mark.parametrize("config,message", [
    ({"method": "visionzip", "keep": 4}, "no original M-RoPE position"),
    ({"method": "fastv", "keep": 4}, "inside the language model"),
    ({"method": "divprune", "keep": 1.5}, r"keep must be an int >= 1 or a float in \(0, 1\]"),
    ({"method": "holov", "keep": 4, "redistribute": False}, "redistribute=True"),
], ids=["visionzip", "fastv", "bad-keep", "holov-redistribute"])
def test_qwen_bad_configuration_fails_at_start_up(qwen_checkpoint, config, message):
    _, path = qwen_checkpoint
    with pytest.raises(Exception, match=message):
        _run(path, config, lambda llm: None)
