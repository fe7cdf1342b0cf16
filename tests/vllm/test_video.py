"""The vLLM plugin's video methods on Qwen2.5-VL (EVS, VidCom2, DyCoke): vLLM's own EVS / VidCom2
selection functions on the same embeddings, the prompt's placeholder count, the kept tokens'
original M-RoPE positions (against unpruned vLLM's numbering of the same prompt), images left
whole, start-up and per-request refusals.  Run by scripts/vllm_check.sh in its own environment."""
from __future__ import annotations

import gc
import os

import numpy as np
import pytest
import torch
from vllm.multimodal.video_prune import evs as vllm_evs
from vllm.multimodal.video_prune import vidcom2 as vllm_vidcom2

import tiny
from test_plugin import GREEDY, NEW_TOKENS, _engine, _recorded, _refused, _start_recording

from visprune import methods
from visprune.integrations.vllm import VIDEO_METHODS
from visprune.integrations.vllm._core import Settings, VideoMethod, VideoPruner, settings

VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
P_IMAGE = tiny.QWEN_PLACEHOLDER
FPS = 3.0     # second_per_grid_ts = 2 / 3: the temporal positions int(t · 2/3 · 4) are truncated


@pytest.fixture(scope="module", autouse=True)
def _cache_root(tmp_path_factory):
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm_cache_video"))


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return tiny.save_qwen(tiny.build_qwen(), str(tmp_path_factory.mktemp("qwen2_5_vl_video")))


def _video(seed: int, frames: int, height: int, width: int):
    """``(frames uint8[T, H, W, 3], metadata)``: a random picture in which a random third of the
    28×28 blocks changes from one frame to the next (static regions, as in real videos)."""
    rng = np.random.default_rng(seed)
    video = np.repeat(rng.integers(0, 256, (1, height, width, 3), dtype=np.uint8), frames, 0)
    for t in range(1, frames):
        video[t] = video[t - 1]
        for by in range(height // 28):
            for bx in range(width // 28):
                if rng.random() < 1 / 3:
                    video[t, 28 * by:28 * by + 28, 28 * bx:28 * bx + 28] = rng.integers(
                        0, 256, (28, 28, 3), dtype=np.uint8)
    metadata = {"total_num_frames": frames, "fps": FPS, "duration": frames / FPS,
                "video_backend": "opencv", "frames_indices": list(range(frames)),
                "do_sample_frames": False}
    return video, metadata


def _ids(text):
    return tiny.qwen_processor().tokenizer(text, add_special_tokens=False)["input_ids"]


# (prompt, images, videos): a video of 4 merged frames of 3 × 4 tokens; an image and a video of
# 3 frames of 2 × 3 tokens; a video of 6 frames of 2 × 2 tokens
VIDEO_PROMPTS = [
    (f"w5 w6 {VIDEO_PLACEHOLDER} w7 w8", [], [(0, 8, 84, 112)]),
    (f"w9 {P_IMAGE} w10 {VIDEO_PLACEHOLDER} w11", [(1, (84, 112))], [(1, 6, 56, 84)]),
    (f"w30 {VIDEO_PLACEHOLDER} w31 w32 w33", [], [(2, 12, 56, 56)]),
]


def _video_requests():
    requests = []
    for text, images, videos in VIDEO_PROMPTS:
        data = {}
        if images:
            data["image"] = [tiny.image(seed, size) for seed, size in images]
        if videos:
            data["video"] = [_video(*v) for v in videos]
        requests.append({"prompt_token_ids": _ids(text), "multi_modal_data": data})
    return requests


def _image_request():
    return {"prompt_token_ids": _ids(f"w40 {P_IMAGE} w41"),
            "multi_modal_data": {"image": tiny.image(9, (112, 84))}}


def _video_work(llm):
    """All prompts in one ``generate`` (three videos of different sizes and an image in one
    encoder step), each video's merged tokens and grid as the encoder step computed them, the
    kept positions recorded; then each prompt alone (the encoder outputs come from vLLM's
    cache), with the positions the first decoder layer sees in its prefill; then an image
    request."""
    requests = _video_requests()
    seen = {"features": [], "grids": [], "positions": []}

    def setup(model):
        _start_recording(model)
        encode = model._process_video_input

        def recorded(video_input):
            out = encode(video_input)
            seen["features"] += [f.detach().clone() for f in out]
            seen["grids"] += video_input["video_grid_thw"].tolist()
            return out

        model._process_video_input = recorded
        model.language_model.model.layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: seen["positions"].append(
                kwargs.get("positions", args[0]).clone()), with_kwargs=True)

    llm.apply_model(setup)
    batched = llm.generate(requests, GREEDY)
    recorded = llm.apply_model(_recorded)[0]
    alone, positions, steps = [], [], []
    for request in requests:
        seen["positions"].clear()
        alone += llm.generate([request], GREEDY)
        # the prompt's positions: its prefill steps (one, or several chunks), then decoding
        prefill = torch.cat([p.cpu() for p in seen["positions"]], 1)
        positions.append(prefill[:, :len(alone[-1].prompt_token_ids)])
        steps.append(len(seen["positions"]))
    image = llm.generate([_image_request()], GREEDY)[0]
    return {"batched": batched, "alone": alone, "positions": positions, "steps": steps,
            "recorded": recorded,
            "features": seen["features"], "grids": seen["grids"], "image": image}


@pytest.fixture(scope="module")
def video_runs(qwen_path):
    """``{(method, keep, chunk): _video_work's result}``, one engine per configuration
    (``chunk``: tokens per step, ``None``: vLLM's default, each prompt in one step)."""
    cache = {}

    def get(method, keep, chunk=None):
        if (method, keep, chunk) not in cache:
            config = None if method is None else {"method": method, "keep": keep}
            llm = _engine(qwen_path, config, enable_prefix_caching=False,
                          max_num_batched_tokens=chunk)
            try:
                cache[method, keep, chunk] = _video_work(llm)
            finally:
                del llm
                gc.collect()
        return cache[method, keep, chunk]

    return get


def _expected_positions(unpruned_ids, unpruned_positions, pruned_ids, kept):
    """The positions unpruned vLLM gives the tokens the pruned prompt keeps: text and image
    tokens their own, each video's kept tokens those of their positions in the video
    (``kept``: per video, in prompt order)."""
    kept = iter(kept)
    columns, u, p = [], 0, 0
    while p < len(pruned_ids):
        if pruned_ids[p] != tiny.QWEN_VIDEO:
            assert unpruned_ids[u] == pruned_ids[p]
            columns.append(u)
            u, p = u + 1, p + 1
            continue
        n = next(i for i in range(u, len(unpruned_ids) + 1)
                 if i == len(unpruned_ids) or unpruned_ids[i] != tiny.QWEN_VIDEO) - u
        k = next(i for i in range(p, len(pruned_ids) + 1)
                 if i == len(pruned_ids) or pruned_ids[i] != tiny.QWEN_VIDEO) - p
        index = next(kept)
        assert len(index) == k and int(index.max()) < n
        columns += (u + index).tolist()
        u, p = u + n, p + k
    assert u == len(unpruned_ids)
    return unpruned_positions[:, columns]


VIDEO_RUNS = [("evs", 0.5), ("vidcom2", 0.4), ("dycoke", 0.5)]


@pytest.mark.parametrize("method,keep,chunk", [(m, k, None) for m, k in VIDEO_RUNS] + [
    ("evs", 0.5, 8)], ids=[f"{m}-{k}" for m, k in VIDEO_RUNS] + ["evs-0.5-chunked"])
def test_video_methods_prune_videos_at_their_original_positions(video_runs, method, keep,
                                                                 chunk):
    """Each video keeps the method's tokens of the merged tokens vLLM computed (EVS and VidCom2:
    exactly vLLM's own ``compute_retention_mask`` of that video), the prompt holds the method's
    count of placeholders, and every kept token (text and image tokens too) reaches the first
    decoder layer at the position unpruned vLLM gives it in the unpruned prompt (also with the
    prefill split into 8-token chunks, inside the videos); one prompt alone generates what it
    generates in the batch."""
    unpruned = video_runs(None, None)
    run = video_runs(method, keep, chunk)
    rate = 1.0 - keep
    videos = [v for _, _, vs in VIDEO_PROMPTS for v in vs]
    assert len(run["features"]) == len(run["recorded"]) == len(videos)
    for features, (t, h, w), kept in zip(run["features"], run["grids"], run["recorded"]):
        P = (h // 2) * (w // 2)
        fn = getattr(methods, method)
        result = fn(features.view(t, P, -1)[None], rate)
        assert kept == result.indices[0].tolist()
        assert len(kept) == Settings(method, keep).video_budget(P, t) < t * P
        if method in ("evs", "vidcom2"):
            vllm = vllm_evs if method == "evs" else vllm_vidcom2
            mask = vllm.compute_retention_mask(features, (t, h, w), 2, q=rate)
            assert kept == mask.nonzero()[:, 0].tolist()
            assert len(kept) == vllm.compute_retained_tokens_count(P, t, rate)
    kept = iter(torch.tensor(k) for k in run["recorded"])
    for i, (before, after) in enumerate(zip(unpruned["alone"], run["alone"])):
        videos_here = [next(kept) for _ in VIDEO_PROMPTS[i][2]]
        text_and_images = sum(t != tiny.QWEN_VIDEO for t in before.prompt_token_ids)
        assert len(after.prompt_token_ids) == text_and_images + sum(map(len, videos_here))
        expected = _expected_positions(before.prompt_token_ids, unpruned["positions"][i],
                                       after.prompt_token_ids, videos_here)
        assert torch.equal(run["positions"][i], expected)
        # the prefill steps, then one per further token
        prefill_steps = 1 if chunk is None else -(-len(after.prompt_token_ids) // chunk)
        assert run["steps"][i] == prefill_steps + NEW_TOKENS - 1
        assert list(after.outputs[0].token_ids) == list(run["batched"][i].outputs[0].token_ids)


def test_video_temporal_positions_are_scaled_as_vllm_numbers_frames(video_runs):
    """The unpruned prompt's video positions step by ``int(t · second_per_grid_t · 4)``
    (truncated: 2/3 s per merged frame), which the kept tokens carry."""
    unpruned = video_runs(None, None)
    ids, positions = unpruned["alone"][0].prompt_token_ids, unpruned["positions"][0]
    start = ids.index(tiny.QWEN_VIDEO)
    frames = positions[0, start:start + 4 * 12:12] - positions[0, start]
    assert frames.tolist() == [int(t * (2 / FPS) * 4) for t in range(4)] == [0, 2, 5, 8]


def test_video_method_keeping_everything_is_unpruned_vllm(video_runs):
    unpruned, everything = video_runs(None, None), video_runs("evs", 1.0)
    for a, b in zip(unpruned["batched"] + [unpruned["image"]],
                    everything["batched"] + [everything["image"]]):
        assert a.prompt_token_ids == b.prompt_token_ids
        assert list(a.outputs[0].token_ids) == list(b.outputs[0].token_ids)
    assert all(torch.equal(a, b) for a, b in zip(unpruned["positions"], everything["positions"]))


@pytest.mark.parametrize("method,keep", VIDEO_RUNS[:1] + VIDEO_RUNS[2:],
                         ids=["evs", "dycoke"])
def test_video_methods_leave_images_whole(video_runs, method, keep):
    """A video method prunes no image: an image request is unpruned vLLM's."""
    unpruned, run = video_runs(None, None), video_runs(method, keep)
    assert run["image"].prompt_token_ids == unpruned["image"].prompt_token_ids
    assert list(run["image"].outputs[0].token_ids) == list(unpruned["image"].outputs[0].token_ids)


# ------------------------------------------------------------------------------ function level
def _embeddings(t, rows, cols, dtype, seed, repeat=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, rows * cols, 16, generator=g)
    if repeat:        # frames equal to the one before: ties in every score
        x[1::2] = x[::2][:len(x[1::2])]
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_evs_plugin_selection_is_vllms_retention_mask(dtype):
    """The plugin's EVS (one call over a ragged batch of videos of different sizes, padded per
    tokens-per-frame) keeps, per video, the tokens vLLM's ``compute_retention_mask`` keeps of it
    alone, as many as vLLM's ``compute_retained_tokens_count``; also for VidCom2."""
    shapes = [(5, 2, 3), (3, 2, 3), (1, 2, 3), (8, 4, 4), (6, 4, 4), (4, 1, 5), (7, 3, 2)]
    for method, vllm in (("evs", vllm_evs), ("vidcom2", vllm_vidcom2)):
        for keep in (0.1, 0.25, 0.5, 0.9, 1.0):
            pruner = VideoPruner(Settings(method, keep), torch.device("cpu"))
            pruner.record = []
            videos = [_embeddings(t, r, c, dtype, seed, repeat=seed % 2 == 1)
                      for seed, (t, r, c) in enumerate(shapes)]
            out = pruner.prune(videos)
            for video, (t, r, c), (tokens, kept) in zip(videos, shapes, out):
                mask = vllm.compute_retention_mask(video.flatten(0, 1), (t, 2 * r, 2 * c), 2,
                                                   q=1.0 - keep)
                assert kept.tolist() == mask.nonzero()[:, 0].tolist(), (method, keep, t, r, c)
                assert len(kept) == vllm.compute_retained_tokens_count(r * c, t, 1.0 - keep)
                assert torch.equal(tokens, video.flatten(0, 1)[kept])
            assert [k.tolist() for k in pruner.record] == [k.tolist() for _, k in out]


class _Config:
    def __init__(self, visprune):
        self.visprune = visprune


@pytest.mark.parametrize("config,message", [
    ({"method": "evs", "keep": 64}, r"evs needs keep, the fraction of each video's tokens kept: "
                                    r"a float in \(0, 1\] .*got 64 \(int\)"),
    ({"method": "evs", "keep": 0.0}, r"a float in \(0, 1\]"),
    ({"method": "dycoke", "keep": 1.5}, r"a float in \(0, 1\]"),
    ({"method": "vidcom2"}, r"vidcom2 needs keep"),
    ({"method": "evs", "keep": True}, r"got True \(bool\)"),
    ({"method": "evs", "keep": 0.5, "q": 0.5}, r"evs's q is set by keep"),
    ({"method": "dycoke", "keep": 0.5, "k": 0.7}, r"dycoke's k is set by keep"),
    ({"method": "evs", "keep": 0.5, "frames": [2]}, r"takes no option\(s\) \['frames'\]"),
    ({"method": "evs", "keep": 0.5, "backend": "nope"}, r"backend"),
], ids=["int-keep", "zero-keep", "keep-above-1", "no-keep", "bool-keep", "q-option",
        "k-option", "frames-option", "bad-backend"])
def test_video_settings_are_checked(config, message):
    with pytest.raises(ValueError, match=message):
        config = settings(_Config(config), "qwen")
        VideoPruner(config, torch.device("cpu"))


def test_video_method_on_llava_is_refused():
    with pytest.raises(ValueError, match="evs prunes videos, which the vLLM plugin serves on "
                                         "Qwen2.5-VL only"):
        settings(_Config({"method": "evs", "keep": 0.5}), "llava")


def test_content_dependent_video_count_is_refused(monkeypatch):
    """A video method whose count depends on the content is entered with ``count=None`` and
    refused at start-up, naming the reason."""
    monkeypatch.setitem(VIDEO_METHODS, "evs", VideoMethod(
        rate="q", count=None, refused="it merges the static tokens it finds"))
    with pytest.raises(ValueError, match=r"its token count depends on the video's content \(it "
                                         r"merges the static tokens it finds\)"):
        settings(_Config({"method": "evs", "keep": 0.5}), "qwen")


@pytest.mark.parametrize("method", ["fastvid", "prunevid", "holitom"])
def test_merging_video_methods_are_refused_in_serving(method):
    """FastVID, PruneVid and HoliTom keep as many tokens as the video's content gives: refused
    at start-up with the reason (vLLM fixes the placeholder count before the encoder runs)."""
    with pytest.raises(ValueError, match=rf"method '{method}' is not supported in vLLM: its "
                                         r"token count depends on the video's content"):
        settings(_Config({"method": method, "keep": 0.5}), "qwen")


def test_a_wrong_count_function_fails_at_start_up(monkeypatch):
    monkeypatch.setitem(VIDEO_METHODS, "evs", VideoMethod(rate="q",
                                                          count=methods.vidcom2_count))
    with pytest.raises(ValueError, match=r"but its count function says"):
        VideoPruner(settings(_Config({"method": "evs", "keep": 0.25}), "qwen"),
                    torch.device("cpu"))


# ------------------------------------------------------------------------------ engine level
@pytest.mark.parametrize("config,message", [
    ({"method": "evs", "keep": 16}, r"evs needs keep, the fraction of each video's tokens kept"),
    ({"method": "dycoke", "keep": 0.5, "k": 0.7}, r"dycoke's k is set by keep"),
], ids=["int-keep", "rate-option"])
def test_bad_video_configuration_fails_at_start_up(qwen_path, config, message):
    with pytest.raises(Exception, match=message):
        _engine(qwen_path, config)
    gc.collect()


def test_requests_refused_under_a_video_method_leave_the_engine_serving(qwen_path):
    """Under EVS no request is refused for the method's sake (every video has a count from its
    size, images pass whole); vLLM refuses a video whose pruned count does not fit
    ``max_model_len`` (and accepts one that fits only pruned), and then answers a plain-text and
    an image request.  Precomputed ``video_embeds`` are pruned as the embeddings of a video."""
    prompt = _ids(f"w5 {VIDEO_PLACEHOLDER} w6")
    long_video = {"prompt_token_ids": prompt,
                  "multi_modal_data": {"video": _video(3, 40, 56, 56)}}    # 20 × 4 tokens
    longer_video = {"prompt_token_ids": prompt,
                    "multi_modal_data": {"video": _video(4, 80, 56, 56)}}  # 40 × 4 tokens
    embeds = torch.randn(4 * 6, 128, generator=torch.Generator().manual_seed(5))
    embedded = {"prompt_token_ids": prompt, "multi_modal_data": {"video": {
        "video_embeds": embeds, "video_grid_thw": torch.tensor([[4, 4, 6]])}}}   # 4 × 2 × 3

    def work(llm):
        llm.apply_model(_start_recording)
        (fits,) = llm.generate([long_video], GREEDY)
        (from_embeds,) = llm.generate([embedded], GREEDY)
        return fits, from_embeds, llm.apply_model(_recorded)[0], _refused(llm, longer_video,
                                                                          _image_request())

    llm = _engine(qwen_path, {"method": "evs", "keep": 0.5}, max_model_len=72,
                  enable_mm_embeds=True)
    try:
        fits, from_embeds, recorded, (error, serves) = work(llm)
    finally:
        del llm
        gc.collect()
    # 4 text tokens + evs_count(4, 20, 0.5) = 40 video tokens, of 80 unpruned
    assert len(fits.prompt_token_ids) == 4 + 40 and len(fits.outputs[0].token_ids) == NEW_TOKENS
    mask = vllm_evs.compute_retention_mask(embeds, (4, 4, 6), 2, q=0.5)
    assert recorded[1] == mask.nonzero()[:, 0].tolist() and len(recorded[1]) == 12
    assert len(from_embeds.prompt_token_ids) == 4 + 12
    assert error is not None and "longer than the maximum model length" in error, error
    assert serves

