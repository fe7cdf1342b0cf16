"""What every model family of the vLLM plugin shares: the ``visprune`` entry of the HF config,
its checks at start-up, the prompt's text for text-conditioned methods, and the method call on
the encoder step's images (:class:`Pruner`, :class:`QwenPruner`) or videos
(:class:`VideoPruner`, the methods of :data:`VIDEO_METHODS`).

The method calls are the transformers integrations' (:class:`PruningHandle`'s ``_call``,
``_prune_varlen`` and ``_dry_run`` for LLaVA, :class:`QwenPruningHandle`'s ``_select``,
``_batched`` and ``_dry_run`` for Qwen), so both integrations feed every method the same inputs
and keep the same tokens.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.nn.utils.rnn import pad_sequence

from ... import checks, methods
from ...backends import checked_name
from ...common import stage1_count
from ..transformers.llava import _NEEDS_CLS, _NEEDS_TEXT, _PRE_PROJECTOR, _SUPPLIED
from ..transformers.llava import METHODS as _TRANSFORMERS_METHODS
from ..transformers.llava import _VARLEN, PruningHandle
from ..transformers.qwen import _SUPPLIED as _QWEN_SUPPLIED
from ..transformers.qwen import QWEN_METHODS, QWEN_REFUSED, QwenPruningHandle, _check_stage1, \
    unit_budget

__all__ = ["METHODS", "REFUSED", "QWEN_METHODS", "QWEN_REFUSED_ALL", "VIDEO_METHODS",
           "VideoMethod", "Settings", "settings", "Pruner", "QwenPruner", "VideoPruner",
           "NEEDS_TEXT", "NEEDS_CLS", "PRE_PROJECTOR", "EMBEDDING_METHODS", "TEXT_FIELD",
           "text_hashes", "prompt_text"]

# Fixed-budget pre-LLM methods: vLLM fixes each image's placeholder count before its encoder
# runs, so the method must return exactly ``keep`` tokens whatever the image shows.
METHODS = tuple(m for m in _TRANSFORMERS_METHODS if m != "prumerge")
REFUSED = {
    "prumerge": "PruMerge / PruMerge+ choose each image's token count from its content "
                "(adaptive), but vLLM fixes the placeholder count before the encoder runs",
    "prumerge+": "PruMerge / PruMerge+ choose each image's token count from its content "
                 "(adaptive), but vLLM fixes the placeholder count before the encoder runs",
    "fastv": "FastV prunes inside the language model (between decoder layers), which vLLM's "
             "placeholder model cannot express",
    "fitprune": "FitPrune prunes inside the language model (between decoder layers), which "
                "vLLM's placeholder model cannot express",
    "dart": "DART prunes inside the language model (between decoder layers), which vLLM's "
            "placeholder model cannot express",
}
# Qwen2.5-VL: the transformers Qwen integration's methods; PruMerge and VisionZip synthesise
# tokens that have no original M-RoPE position.
QWEN_REFUSED_ALL = {**REFUSED, **QWEN_REFUSED}
NEEDS_TEXT = _NEEDS_TEXT
NEEDS_CLS = _NEEDS_CLS
# The methods that read no vision-tower attention: they prune precomputed image embeddings and
# work with any tower (the same on LLaVA and Qwen2.5-VL).
EMBEDDING_METHODS = tuple(m for m in METHODS if m not in NEEDS_CLS)
PRE_PROJECTOR = _PRE_PROJECTOR
# The multimodal-kwargs field that carries the prompt's text token ids to the encoder step.
TEXT_FIELD = "visprune_text"


def _dropped(keep: float) -> float:
    """The share of tokens a method drops when it keeps ``keep``: ``1 - keep``."""
    return 1.0 - keep


@dataclass(frozen=True)
class VideoMethod:
    """How the plugin serves one video method of :mod:`visprune.methods` (the function of the
    same name) on Qwen2.5-VL: one entry of :data:`VIDEO_METHODS`.

    The method is called on the merged tokens of the videos of an encoder step,
    ``video[B, T, P, D]`` with ``frames=`` (videos with ``P`` tokens per frame go together, the
    shorter ones padded), with ``{rate: from_keep(keep)}`` and the configured options.  Its
    :class:`~visprune.common.PruneResult` is read row by row: ``tokens[b, :lengths[b]]`` are
    placed in that order, each at the original M-RoPE position of ``indices[b, j]`` (a position
    in the video's frame-major ``T·P``): a token merged from several keeps its anchor's position.
    A result token without a position (``-1``) is an error.

    ``rate``: the method's argument that ``keep`` (a fraction of each video's tokens, in
    ``(0, 1]``) sets, through ``from_keep`` (default ``1 - keep``: the share dropped).
    ``fixed``: arguments always passed (e.g. which model's variant of the method), not options
    a user sets.
    ``count``: the tokens the method keeps of a video of ``T`` frames of ``P`` tokens,
    ``count(P, T, **arguments)``, called with the method's arguments (the rate and options) that
    it names; the processor announces that many placeholders.  ``None``: the method's count
    depends on the video's content; it is refused at start-up with ``refused`` as the reason,
    since vLLM fixes each video's placeholder count before its encoder runs (padding the prompt
    to a bound would make the language model attend to tokens the method did not produce, and
    truncating would change the method).

    A method that reads more than the merged tokens (e.g. a statistic of the vision tower's
    attention) needs that input computed in the model's encoder step besides its entry."""

    rate: str
    count: Optional[Callable[..., int]]
    from_keep: Callable[[float], float] = _dropped
    fixed: Mapping[str, object] = field(default_factory=dict)
    refused: str = ""

    def arguments(self, keep: float, options: Mapping[str, object]) -> Dict[str, object]:
        """The method's keyword arguments: its options, the fixed ones and the rate ``keep``
        sets."""
        return {**options, **self.fixed, self.rate: self.from_keep(keep)}

    def tokens(self, tokens_per_frame: int, num_frames: int,
               arguments: Mapping[str, object]) -> int:
        """``count(P, T, ...)`` with the ``arguments`` it names."""
        names = inspect.signature(self.count).parameters
        return int(self.count(tokens_per_frame, num_frames,
                              **{k: v for k, v in arguments.items() if k in names}))


# The video methods on Qwen2.5-VL.  Their counts depend on the video's size only, so the
# processor computes them; a method whose count depends on the content is entered with
# count=None and a reason, and refused at start-up.
VIDEO_METHODS: Dict[str, VideoMethod] = {
    "evs": VideoMethod(rate="q", count=methods.evs_count),
    "vidcom2": VideoMethod(rate="q", count=methods.vidcom2_count),
    "dycoke": VideoMethod(rate="k", count=methods.dycoke_count),
    "fastvid": VideoMethod(rate="r", count=None, refused="its segments, cut where adjacent "
                           "frames differ, decide how many tokens each keeps"),
    "prunevid": VideoMethod(rate="cluster_ratio", count=None, refused="it merges the static "
                            "positions it finds over each window into one token each"),
    "holitom": VideoMethod(rate="retain_ratio", count=None, refused="it merges the static "
                           "tokens of the windows it finds, and rescales the budget for them"),
}
# What the plugin passes to a video method itself (besides the rate).
_VIDEO_SUPPLIED = {"video", "frames"}


@dataclass(frozen=True)
class Settings:
    """The ``visprune`` entry of a model's HF config: ``{"method": ..., "keep": ..., **options}``.

    ``keep``: LLaVA, an int (tokens kept per image); Qwen, an int or a float fraction of each
    image's tokens (:func:`budget`)."""

    method: str
    keep: Union[int, float]
    options: Dict[str, object] = field(default_factory=dict)

    def budget(self, n: int) -> int:
        """Tokens kept of an image of ``n`` tokens (its placeholder count); a video method
        keeps every token of an image."""
        return n if self.video is not None else unit_budget(self.keep, n)

    @property
    def video(self) -> Optional[VideoMethod]:
        """The :data:`VIDEO_METHODS` entry of a video method, else ``None``."""
        return VIDEO_METHODS.get(self.method)

    def video_budget(self, tokens_per_frame: int, num_frames: int) -> int:
        """Tokens a video method keeps of a video of ``num_frames`` frames (merged: Qwen2.5-VL's
        grid ``t``) of ``tokens_per_frame`` tokens (its placeholder count)."""
        spec = self.video
        return spec.tokens(tokens_per_frame, num_frames, spec.arguments(self.keep, self.options))

    @property
    def needs_text(self) -> bool:
        return self.method in NEEDS_TEXT

    @property
    def needs_cls(self) -> bool:
        return self.method in NEEDS_CLS


def settings(hf_config, family: str = "llava") -> Optional[Settings]:
    """The checked :class:`Settings` of ``hf_config`` (``None``: the model does not prune).
    ``family``: ``"llava"`` or ``"qwen"`` (their methods and ``keep`` differ).

    Every error here is raised while vLLM builds the model or its processor, before any
    request."""
    raw = getattr(hf_config, "visprune", None)
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f'visprune: the "visprune" entry of the model config must be a dict '
                         f'such as {{"method": "divprune", "keep": 64}}, got {raw!r}')
    qwen = family == "qwen"
    supported, refused = (QWEN_METHODS, QWEN_REFUSED_ALL) if qwen else (METHODS, REFUSED)
    supplied = _QWEN_SUPPLIED if qwen else _SUPPLIED
    model = "Qwen2.5-VL" if qwen else "LLaVA"
    raw = dict(raw)
    method, keep = raw.pop("method", None), raw.pop("keep", None)
    if not isinstance(method, str):
        raise ValueError(f"visprune: method must be a string naming one of "
                         f"{', '.join(supported)} on {model}, got {method!r} "
                         f"({type(method).__name__})")
    if method in refused:
        raise ValueError(f"visprune: method {method!r} is not supported in vLLM on {model}: "
                         f"{refused[method]}. Supported: {', '.join(supported)}")
    if method in VIDEO_METHODS:
        if not qwen:
            raise ValueError(f"visprune: {method} prunes videos, which the vLLM plugin serves on "
                             f"Qwen2.5-VL only; on {model} it supports {', '.join(supported)}")
        return _video_settings(method, keep, raw)
    if method not in supported:
        videos = f" (videos: {', '.join(VIDEO_METHODS)})" if qwen else ""
        raise ValueError(f"visprune: unknown method {method!r}; the vLLM plugin supports "
                         f"{', '.join(supported)} on {model}{videos}")
    if qwen:
        try:
            keep = checks.keep("keep", keep, "image or video")
        except (TypeError, ValueError) as e:
            raise ValueError(f"visprune: {method} needs keep (visual tokens kept per image): "
                             f"{e}") from None
    else:
        try:
            keep = checks.count("keep", keep)
        except (TypeError, ValueError) as e:
            raise ValueError(f"visprune: {method} needs keep (visual tokens kept per image), an "
                             f"int >= 1: {e}") from None
        if keep < 1:
            raise ValueError(f"visprune: {method} needs keep >= 1, got {keep}")
    accepted = sorted(set(inspect.signature(getattr(methods, method)).parameters) - supplied)
    unknown = sorted(set(raw) - set(accepted))
    if unknown:
        raise ValueError(f"visprune: {method} takes no option(s) {unknown}; its options are "
                         f"{accepted}")
    if qwen and method == "holov" and raw.get("redistribute", True) is not True:
        raise ValueError("visprune: holov on Qwen2.5-VL needs redistribute=True: the original's "
                         "zero-padded tokens have no M-RoPE position")
    if method == "cdpruner" and raw.get("relevance_scope", "image") != "image":
        raise ValueError(f"visprune: cdpruner in vLLM needs relevance_scope='image', got "
                         f"{raw['relevance_scope']!r}: vLLM encodes the images of several "
                         f"requests in one call, and a relevance normalised over that batch "
                         f"would make each request's kept tokens depend on the others")
    return Settings(method, keep, raw)


def _video_settings(method: str, keep, options: Dict[str, object]) -> Settings:
    """The checked :class:`Settings` of a video method (:data:`VIDEO_METHODS`)."""
    spec = VIDEO_METHODS[method]
    if spec.count is None:
        raise ValueError(f"visprune: method {method!r} is not supported in vLLM: its token count "
                         f"depends on the video's content ({spec.refused}), but vLLM fixes each "
                         f"video's placeholder count before the encoder runs")
    if isinstance(keep, bool) or not isinstance(keep, float) or not 0.0 < keep <= 1.0:
        raise ValueError(f"visprune: {method} needs keep, the fraction of each video's tokens "
                         f"kept: a float in (0, 1] (e.g. 0.25; it sets {method}'s {spec.rate}), "
                         f"got {keep!r} ({type(keep).__name__})")
    if spec.rate in options:
        raise ValueError(f"visprune: {method}'s {spec.rate} is set by keep (the fraction of "
                         f"each video's tokens kept); remove the option "
                         f"{spec.rate}={options[spec.rate]!r}")
    taken = set(inspect.signature(getattr(methods, method)).parameters)
    accepted = sorted(taken - _VIDEO_SUPPLIED - {spec.rate} - set(spec.fixed))
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"visprune: {method} takes no option(s) {unknown}; its options are "
                         f"{accepted}")
    return Settings(method, float(keep), options)


def prompt_text(embed, text_ids) -> Dict[str, torch.Tensor]:
    """``text[I, M, D]`` and ``text_mask[I, M]``: each image's prompt text (``text_ids``: a
    tensor ``[I, M]`` or ``I`` tensors, the token ids that field :data:`TEXT_FIELD` carries)
    through ``embed`` (the LLM's input embeddings), in one call for the encoder step."""
    ids = list(text_ids) if not isinstance(text_ids, torch.Tensor) else list(text_ids.unbind())
    lengths = torch.tensor([len(t) for t in ids], device=ids[0].device)
    embeds = embed(torch.cat(ids))
    text = pad_sequence(list(embeds.split(lengths.tolist())), batch_first=True)
    mask = torch.arange(text.shape[1], device=lengths.device) < lengths[:, None]
    return {"text": text, "text_mask": mask}


def text_hashes(hashes: Mapping[str, List[str]], text_ids: Sequence[int]) -> Dict[str, List[str]]:
    """``hashes`` (vLLM's per-item multimodal hashes) made to depend on the prompt's text too:
    the encoder cache, the processor cache and the prefix cache are keyed by them, and a
    text-conditioned method prunes one image differently for two prompts."""
    digest = hashlib.sha256(repr(list(text_ids)).encode()).hexdigest()[:32]
    return {modality: [f"{h}.visprune-text-{digest}" for h in items]
            for modality, items in hashes.items()}


@contextlib.contextmanager
def _named(config: Settings):
    """The method's own argument checks, failing at start-up with a message that names the
    setting."""
    try:
        yield
    except (TypeError, ValueError) as e:
        raise ValueError(f"visprune: {config.method} with {dict(config.options)} and "
                         f"keep={config.keep}: {e}") from None


def _setup(pruner, config: Settings, device: torch.device) -> None:
    """What both pruners hold: the method, its options and keep, and ``record``, a list to
    append each pruned image's kept indices to (tests, debugging) or None."""
    pruner.record = None
    pruner.method, pruner.keep = config.method, config.keep
    pruner.method_kwargs = dict(config.options)
    pruner._fn = getattr(methods, pruner.method)
    with _named(config):
        if pruner.method == "trimtokenator":
            pruner._stage1 = checks.fraction_or_count("stage1_keep", pruner.method_kwargs.get(
                "stage1_keep", inspect.signature(pruner._fn).parameters["stage1_keep"].default))
        checked_name(pruner.method_kwargs.get("backend"), device)


class Pruner:
    """One model's method, called on the encoder step's images.

    ``fewest`` / ``most``: the fewest and the most tokens the method chooses among in one image
    of this model (equal on LLaVA-1.5).  ``keep`` and TrimTokenator's stage 1 are checked
    against them at start-up, before the dry run: a setting that fails on some image of the
    model fails there, not in the encoder step of a request."""

    # The transformers integration's method call and start-up dry run, shared as they are: the
    # two integrations must feed every method the same inputs.
    _call = PruningHandle._call
    _prune_varlen = PruningHandle._prune_varlen
    _dry_run = PruningHandle._dry_run

    def __init__(self, config: Settings, fewest: int, most: int, device: torch.device):
        one_size = fewest == most
        if config.keep > most:
            raise ValueError(f"visprune: keep={config.keep} is larger than the {most} visual "
                             f"tokens of {'every' if one_size else 'the largest'} image of this "
                             f"model: nothing would be pruned")
        # the dry run's budget: images have at least this many tokens
        self._crop_tokens = fewest
        # The varlen path (DivPrune / TrimTokenator on images of different sizes) returns tokens
        # only and records nothing.
        _setup(self, config, device)
        if self.method == "trimtokenator":
            self._check_stage1(fewest, one_size)
        with _named(config):
            self._dry_run()

    def _check_stage1(self, fewest: int, one_size: bool) -> None:
        """Stage 1 keeps between ``keep`` and ``N`` tokens of every image it prunes (``N >=
        keep``; a smaller image keeps all its tokens).  Its count never falls as ``N`` grows,
        so the smallest pruned image decides."""
        n = max(self.keep, fewest)
        stage1 = stage1_count(n, self._stage1)
        if self.keep <= stage1 <= n:
            return
        why = (f"every image of this model has {n}" if one_size else
               f"this model's smallest images have {n}" if n == fewest else
               f"an image with at least keep={n} tokens is pruned")
        raise ValueError(f"visprune: trimtokenator's stage1_keep={self._stage1!r} keeps {stage1} "
                         f"of an image's {n} visual tokens ({why}), but stage 1 must keep "
                         f"between keep={self.keep} and all {n}")

    def prune(self, visual: Sequence[torch.Tensor], *, text: Optional[torch.Tensor] = None,
              text_mask: Optional[torch.Tensor] = None, attn: Optional[List[torch.Tensor]] = None,
              keys: Optional[List[torch.Tensor]] = None,
              cls_token: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """The kept tokens ``[min(keep, N_i), D]`` of every image ``visual[i]: [N_i, D]``.

        ``text[I, M, D]`` / ``text_mask[I, M]``: each image's prompt text (padded), ``attn[i]:
        [N_i]`` / ``keys[i]: [N_i, Dk]``: its CLS attention and keys, ``cls_token[I, D]``: its
        CLS token (VisionZip).  DivPrune and TrimTokenator prune every image in one varlen call
        (the transformers integration's); for the other methods, images with the same token
        count go through the method in one batched call.  An image with fewer than ``keep``
        tokens keeps them all."""
        kept: List[Optional[torch.Tensor]] = [None] * len(visual)
        pruned = []
        for i, v in enumerate(visual):
            if v.shape[0] < self.keep:
                kept[i] = v
            else:
                pruned.append(i)
        if self.method in _VARLEN and pruned:
            images = [visual[i] for i in pruned]
            row = torch.tensor(pruned, device=images[0].device)
            # _prune_varlen reads the images' token counts from its ``sources`` argument
            for i, tokens in zip(pruned, self._prune_varlen(images, images, text, text_mask, row)):
                kept[i] = tokens
            return kept
        groups: Dict[int, List[int]] = {}
        for i in pruned:
            groups.setdefault(visual[i].shape[0], []).append(i)
        for n, members in groups.items():
            index = torch.tensor(members, device=visual[members[0]].device)
            inputs = {}
            if text is not None:
                inputs.update(text=text[index], text_mask=text_mask[index])
            if attn is not None:
                inputs["attn"] = torch.stack([attn[i] for i in members])
            if keys is not None:
                inputs["keys"] = torch.stack([keys[i] for i in members])
            overrides = {}
            if cls_token is not None:
                overrides["cls_token"] = cls_token[index]
            result = self._call(torch.stack([visual[i] for i in members]), **inputs, **overrides)
            for row, i in enumerate(members):
                kept[i] = result.tokens[row]
                if self.record is not None:
                    self.record.append(result.indices[row].cpu())
        return kept

    def prune_dense(self, visual: torch.Tensor, **inputs) -> torch.Tensor:
        """:meth:`prune` for images of one size, ``visual[I, N, D]`` -> ``[I, keep, D]``: one
        call, no per-image work (LLaVA-1.5, precomputed embeddings of one size)."""
        if visual.shape[1] < self.keep:
            return visual
        result = self._call(visual, **inputs)
        if self.record is not None:
            self.record.extend(result.indices.cpu())
        return result.tokens


class QwenPruner:
    """A Qwen2.5-VL model's method, called on the encoder step's images: the transformers Qwen
    integration's selection (DivPrune and TrimTokenator in one varlen call over all images,
    the other methods batched over images of one size)."""

    _select = QwenPruningHandle._select
    _batched = QwenPruningHandle._batched
    _dry_run = QwenPruningHandle._dry_run
    _survivors = QwenPruningHandle._survivors

    def __init__(self, config: Settings, device: torch.device):
        _setup(self, config, device)
        with _named(config):
            if self.method == "trimtokenator":       # the transformers integration's rule
                self._stage1 = _check_stage1(self.keep, self._stage1)
            self._dry_run()

    def select(self, visual: Sequence[torch.Tensor], *, text: Optional[torch.Tensor] = None,
               text_mask: Optional[torch.Tensor] = None,
               score: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Per image ``visual[i]: [N_i, D]``, ``int64[unit_budget(keep, N_i)]``: the kept token
        indices, ascending.  ``text[I, M, D]`` / ``text_mask[I, M]``: each image's prompt text;
        ``score[ΣN_i]``: each token's attention substitute (HoloV / VisPruner)."""
        sizes = [v.shape[0] for v in visual]
        feats = torch.cat(list(visual), 0)
        cu = torch.tensor([0, *itertools.accumulate(sizes)], device=feats.device)
        budgets = [unit_budget(self.keep, n) for n in sizes]
        rows = torch.arange(len(sizes), device=feats.device)
        with torch.no_grad():
            mask = self._select(feats, cu, budgets, text, text_mask, rows, score)
        kept = [m.nonzero()[:, 0] for m in mask.split(sizes)]
        if self.record is not None:
            self.record.extend(k.cpu() for k in kept)
        return kept


class VideoPruner:
    """A Qwen2.5-VL model's video method (:data:`VIDEO_METHODS`), called on the encoder step's
    videos; images are not pruned.  ``record``: a list to append each pruned video's result
    positions to (tests, debugging), or ``None``."""

    def __init__(self, config: Settings, device: torch.device):
        self.record = None
        self.method, self.keep = config.method, config.keep
        self.spec = config.video
        self.method_kwargs = self.spec.arguments(config.keep, config.options)
        self._fn = getattr(methods, self.method)
        with _named(config):
            checked_name(self.method_kwargs.get("backend"), device)
            self._dry_run()

    def count(self, tokens_per_frame: int, num_frames: int) -> int:
        """Tokens kept of a video of ``num_frames`` frames of ``tokens_per_frame`` tokens: the
        count the processor announced for it."""
        return self.spec.tokens(tokens_per_frame, num_frames, self.method_kwargs)

    def _dry_run(self) -> None:
        """The method's own option checks, at once, on dummy videos of 1 to 6 frames (reference
        backend), and its table entry's count checked against what it returns."""
        video = torch.randn(6, 6, 4, 8, generator=torch.Generator().manual_seed(0))
        frames = list(range(1, 7))
        result = self._fn(video, frames=frames, **{**self.method_kwargs, "backend": "reference"})
        got = result.lengths.tolist()
        counts = [self.count(4, t) for t in frames]
        if got != counts:
            raise ValueError(f"the method keeps {got} tokens of videos of {frames} frames of 4 "
                             f"tokens, but its count function says {counts}")

    def prune(self, videos: Sequence[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per video ``videos[i]: [T_i, P_i, D]`` (frame-major, each frame's tokens in raster
        order), ``(tokens[K_i, D], positions int64[K_i])``: the method's tokens in its order and
        each one's position in the video's ``T_i·P_i`` (an anchor's, for a merged token);
        ``K_i = count(P_i, T_i)``.  The videos with the same ``P`` go through the method in one
        call, the shorter ones padded with zero frames (``frames=``: never read)."""
        out: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(videos)
        groups: Dict[int, List[int]] = {}
        for i, v in enumerate(videos):
            groups.setdefault(v.shape[1], []).append(i)
        for P, members in groups.items():
            frames = [videos[i].shape[0] for i in members]
            if len(set(frames)) == 1:
                batch = torch.stack([videos[i] for i in members])
            else:
                batch = pad_sequence([videos[i] for i in members], batch_first=True)
            with torch.no_grad():
                result = self._fn(batch, frames=frames, **self.method_kwargs)
            lengths = result.lengths.tolist()
            for row, i in enumerate(members):
                n, expected = lengths[row], self.count(P, frames[row])
                positions = result.indices[row, :n]
                if n != expected or bool((positions < 0).any()):
                    raise RuntimeError(
                        f"visprune: {self.method} returned {n} tokens ({int((positions < 0).sum())}"
                        f" without a position) of a video of {frames[row]} frames of {P} "
                        f"tokens; the prompt holds {expected} placeholders for it")
                out[i] = result.tokens[row, :n], positions
        if self.record is not None:
            self.record.extend(positions.cpu() for _, positions in out)
        return out
