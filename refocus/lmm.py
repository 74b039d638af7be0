"""The reference LMM: a Hugging Face image/video-text-to-text model answers a multiple-choice
question from a frame subset; its option-letter logits at the answer position, read in one
forward pass (no generation), give the margin of the reward.

* **Loading** — an ``AutoModelForImageTextToText`` by hub id or local path with its own
  processor and chat template, of a family in ``refocus.lmm_families`` (Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL, LLaVA-OneVision, LLaVA, InternVL, SmolVLM, Idefics3, Gemma3); any other model is
  refused at load, before its weights are read, in one line.
* **Presentation** (``present``, default per family in ``refocus.lmm_families``) — the frames
  in time order with their times: ``"video"``, the model's native video input (the processor's
  ``videos=`` with video metadata whose frame indices / fps give the real times: Qwen3-VL
  writes them as "<t seconds>" before each frame; Qwen2.5-VL's positions step by one time per
  frame — its video positions are evenly spaced, so the frames sit at even steps over their
  real span, exact when they are evenly spaced; Qwen2-VL and LLaVA-OneVision take no times),
  each frame repeated to fill Qwen's temporal patch of 2 so frames are never merged in pairs;
  or ``"images"``, the fallback: interleaved images, each after a "frame at 12.5 s" marker.
* **Letters** — ``A``, ``B``, … are looked up with and without a leading space; each variant
  that is a single token counts (log-sum-exp), and a tokenizer in which a bare letter is not
  one token is refused.
* **Batched** — many (question, subset) pairs per left-padded forward; the batch halves itself
  on CUDA out-of-memory.
* **Vision once** — ``vision()`` runs the vision tower over frames and returns one
  ``FrameVision`` per frame; ``logits_from_vision()`` assembles each subset's token ids from the
  prompt and per-frame placeholder snippets (learned once per frame size from the processor
  itself) and passes the cached features back as the family's ``mm_encoder_outputs``, so the
  language model alone runs per subset. ``logits_from_images()`` is the model's own full
  path, the oracle.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from refocus.device import pick_device
from refocus.lmm_families import Family, family_of
from stores.errors import UserError
from stores.manifest import MAX_OPTIONS
from stores.safe_load import DAMAGED_WEIGHTS, weights_problem

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:MAX_OPTIONS]  # one per option a manifest allows
INSTRUCTION = "Answer with the option's letter from the given choices directly."
PER_IMAGE_KEYS = ("image_grid_thw", "image_sizes")  # processor outputs with a row per image
PRESENTATIONS = ("video", "images")
MARKER = "frame at {:.1f} s: "  # before each frame in the images presentation
VIDEO_KWARGS = {"do_sample_frames": False}  # the frames given are the frames shown


def question_prompt(question: str, options: Sequence[str]) -> str:
    lines = [question.strip()]
    lines += [f"{LETTERS[i]}. {option.strip()}" for i, option in enumerate(options)]
    return "\n".join([*lines, INSTRUCTION])


def letter_token_ids(tokenizer: Any, count: int = len(LETTERS)) -> list[list[int]]:
    """Per letter, the single-token ids of ``X`` and `` X``; refuses a tokenizer in which a
    bare letter is not one token."""
    out = []
    for letter in LETTERS[:count]:
        bare = tokenizer.encode(letter, add_special_tokens=False)
        if len(bare) != 1:
            raise UserError(f"tokenizer {type(tokenizer).__name__}: the answer letter "
                            f"{letter!r} is {len(bare)} tokens, not one; this model cannot be "
                            "scored by its letter logits")
        ids = [bare[0]]
        spaced = tokenizer.encode(" " + letter, add_special_tokens=False)
        if len(spaced) == 1 and spaced[0] != bare[0]:
            ids.append(spaced[0])
        out.append(ids)
    return out


@dataclass
class FrameVision:
    """One frame's vision features (after the projector) and its per-image processor rows."""

    tokens: torch.Tensor  # [n_tokens, hidden × parts] (parts > 1: Qwen3-VL's deepstack)
    extras: dict[str, torch.Tensor]  # e.g. image_grid_thw [1, 3]
    size: tuple[int, int]  # (height, width) of the frame given to the processor


@dataclass
class Item:
    question: str
    options: Sequence[str]
    frames: Sequence[Any]  # images (uncached path) or FrameVision (cached path)
    times: Sequence[float] | None = None  # seconds of each frame; None: 0, 1, 2, …

    def seconds(self) -> list[float]:
        if self.times is None:
            return [float(i) for i in range(len(self.frames))]
        if len(self.times) != len(self.frames):
            raise ValueError(f"{len(self.times)} times for {len(self.frames)} frames")
        return [float(t) for t in self.times]


class Snippet(NamedTuple):
    """What the processor puts in place of one image placeholder for a frame of a size."""

    ids: list[int]
    types: list[int] | None  # token types, where the family's forward reads them
    features: int  # how many of ``ids`` take a vision feature row


def _accepts(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


class LMMScorer:
    """A frozen video-LLM that scores (question, frames) pairs by option-letter logits."""

    def __init__(self, model: Any, processor: Any, name: str, batch_size: int = 8,
                 present: str | None = None) -> None:
        self.family: Family = family_of(model.config, name)
        self.present = present_for(self.family, name, present)
        self.forward_args = _accepts(model.forward)
        if "mm_encoder_outputs" not in self.forward_args:
            import transformers

            raise UserError(f"{name}: {type(model).__name__}.forward takes no "
                            f"mm_encoder_outputs in transformers {transformers.__version__}; "
                            "the vision cache needs the version constraints.txt pins")
        self.model, self.processor, self.name = model.eval(), processor, name
        self.batch_size = batch_size
        self.forwards = 0  # language-model forwards run (batches scored), a plain tally
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"  # the answer position is the last one
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.letters = letter_token_ids(self.tokenizer)
        self.image_token = getattr(processor, "image_token", None)
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token) \
            if self.image_token else None
        if self.image_token_id is None:
            raise UserError(f"{name}: its processor names no image token; not an image-text "
                            "model refocus can feed frames to")
        text = getattr(model.config, "text_config", model.config)
        self.max_positions = int(getattr(text, "max_position_embeddings", 1 << 30))
        self.base = model.model if hasattr(model, "model") else model
        self.vision_args = _accepts(self.base.get_image_features)
        self.feature_token_id = int(model.config.image_token_id)  # where vision rows go
        self.parts = self.family.parts(model.config)
        # LLaVA-OneVision tiles a lone image (anyres) but not one of several
        self.counts_images = "batch_num_images" in self.vision_args
        self._snippets: dict[tuple[int, int, bool], Snippet] = {}
        self._prompts: dict[tuple[str, tuple[str, ...], tuple[float, ...]], list[int]] = {}
        # a frame is repeated to fill one temporal patch (Qwen: 2), so none is merged with
        # another
        self.repeat = int(getattr(getattr(processor, "video_processor", None),
                                  "temporal_patch_size", 1) or 1)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, spec: str, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, batch_size: int = 8,
             present: str | None = None) -> LMMScorer:
        """By hub id or local path; bf16 and SDPA on CUDA, float32 on CPU."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        device = pick_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            # family and presentation before any weights are read
            present_for(family_of(AutoConfig.from_pretrained(spec), spec), spec, present)
            processor = AutoProcessor.from_pretrained(spec)
            model = AutoModelForImageTextToText.from_pretrained(
                spec, dtype=dtype, attn_implementation="sdpa")
        except DAMAGED_WEIGHTS as e:
            raise UserError(f"reference model {weights_problem(spec, e)}") from None
        except (OSError, ValueError) as e:
            where = "a local folder" if os.path.isdir(spec) else "a hub id"
            hint = (" (offline: it must be in the Hugging Face cache; download it where the "
                    f"hub is reachable with `huggingface-cli download {spec}`, or pass a local "
                    "path)") if offline or not os.path.isdir(spec) else ""
            raise UserError(f"could not load the reference model {spec!r} as {where}: "
                            f"{str(e).splitlines()[0]}{hint}") from e
        return cls(model.to(device), processor, spec, batch_size, present)

    # ------------------------------------------------------------------ prompts
    def chat(self, question: str, options: Sequence[str], times: Sequence[float]) -> str:
        """The prompt: one video, or an image after a time marker per frame (``times``)."""
        content: list[dict[str, Any]] = [{"type": "video"}] if self.present == "video" else [
            part for t in times
            for part in ({"type": "text", "text": MARKER.format(t)}, {"type": "image"})]
        content.append({"type": "text", "text": question_prompt(question, options)})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    def _prompt_ids(self, question: str, options: Sequence[str],
                    times: Sequence[float]) -> list[int]:
        key = (question, tuple(options), tuple(times))
        ids = self._prompts.get(key)
        if ids is None:
            ids = self.tokenizer(self.chat(question, options, times))["input_ids"]
            if sum(t == self.image_token_id for t in ids) != len(times):
                raise UserError(f"{self.name}: the chat template does not give one "
                                f"{self.image_token} per frame")
            self._prompts[key] = ids
        return ids

    def _process(self, texts: list[str], images: list[list[Any]]) -> Any:
        """The processor over prompts and their frames, as the family feeds frames."""
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt",
                              **self.family.frame_kwargs)

    def _snippet(self, size: tuple[int, int], multi: bool) -> Snippet:
        """The token ids (and token types) the processor puts in place of one image
        placeholder for a frame of this size, learned from the processor itself."""
        key = (*size, multi)
        if key not in self._snippets:
            n = 2 if multi else 1
            raw = self._prompt_ids("x", ["y", "z"], [0.0] * n)
            blank = np.zeros((*size, 3), dtype=np.uint8)
            full = self._process([self.chat("x", ["y", "z"], [0.0] * n)], [[blank] * n])
            ids = full["input_ids"][0].tolist()
            key_types = self.family.token_types
            if key_types is not None and key_types not in full:
                raise UserError(f"{self.name}: its processor gives no {key_types}, which the "
                                f"{self.family.label} forward reads")
            types = full[key_types][0].tolist() if key_types else None
            length = (len(ids) - len(raw)) // n + 1
            at = raw.index(self.image_token_id)
            snippet = ids[at:at + length]
            rebuilt = self._expand(raw, [snippet] * n)
            if rebuilt != ids:
                raise UserError(f"{self.name}: its processor expands images in a way refocus "
                                "cannot reassemble from cached features; use the uncached path")
            self._snippets[key] = Snippet(snippet, types[at:at + length] if types else None,
                                          snippet.count(self.feature_token_id))
        return self._snippets[key]

    def _expand(self, raw: list[int], snippets: list[list[int]]) -> list[int]:
        out, it = [], iter(snippets)
        for token in raw:
            out.extend(next(it) if token == self.image_token_id else [token])
        return out

    # ------------------------------------------------------------------ vision
    @torch.no_grad()
    def vision(self, images: Sequence[Any], multi: bool = True) -> list[FrameVision]:
        """Vision-tower features of each frame, computed together, one ``FrameVision`` each.
        ``multi``: as one of several images in a prompt (False: a lone image)."""
        if self.present == "video":
            return self._video_vision(images)
        if self.counts_images and multi and len(images) == 1:  # a lone frame of a multi set
            return self.vision([images[0], images[0]], multi=True)[:1]
        # through the processor itself, as one prompt of several images (or each alone), so
        # the pixels are prepared exactly as for scoring
        groups = [list(images)] if multi else [[image] for image in images]
        inputs = self._process([self.chat("x", ["y", "z"], [0.0] * len(g)) for g in groups],
                               groups)
        kwargs = {k: v.to(self.device) for k, v in inputs.items() if k in self.vision_args
                  and k not in ("input_ids", "attention_mask")}
        if "pixel_values" in kwargs:
            kwargs["pixel_values"] = kwargs["pixel_values"].to(self.model.dtype)
        sizes = [tuple(int(x) for x in np.asarray(image).shape[:2]) for image in images]
        counts = [self._snippet(size, multi).features for size in sizes]  # type: ignore[arg-type]
        output = self.base.get_image_features(**kwargs, return_dict=True)
        features = self.family.per_frame(output, counts, self.name)
        out = []
        for i, (size, tokens) in enumerate(zip(sizes, features, strict=True)):
            extras = {k: inputs[k][i:i + 1] for k in PER_IMAGE_KEYS if k in inputs}
            out.append(FrameVision(tokens.detach(), extras, size))  # type: ignore[arg-type]
        return out

    def _video_vision(self, images: Sequence[Any]) -> list[FrameVision]:
        """Each frame's video features: the frames of one size as one video through the video
        processor and ``get_video_features``, cut per frame (a frame's features are its own:
        see ``refocus.lmm_families``)."""
        sizes = [tuple(int(x) for x in np.asarray(image).shape[:2]) for image in images]
        out: list[FrameVision | None] = [None] * len(images)
        for size in dict.fromkeys(sizes):
            at = [i for i, s in enumerate(sizes) if s == size]
            inputs = self.processor.video_processor(
                videos=[self._clip([images[i] for i in at])], return_tensors="pt",
                **VIDEO_KWARGS, **self.family.video_kwargs,
                **self._video_size(len(at)))
            args = _accepts(self.base.get_video_features)
            kwargs = {k: v.to(self.device) for k, v in inputs.items() if k in args}
            kwargs["pixel_values_videos"] = kwargs["pixel_values_videos"].to(self.model.dtype)
            output = self.base.get_video_features(**kwargs, return_dict=True)
            rows = _rows_of(output.pooler_output) - (1 if self.family.video_newline else 0)
            if rows % len(at):
                raise UserError(f"{self.name}: {rows} video feature rows for {len(at)} frames; "
                                "refocus cannot cut them per frame (use --present images)")
            features = self.family.per_frame(output, [rows // len(at)] * len(at), self.name,
                                             video=True)
            for i, tokens in zip(at, features, strict=True):
                out[i] = FrameVision(tokens.detach(), {}, size)  # type: ignore[arg-type]
        return out  # type: ignore[return-value]

    def _video_size(self, frames: int) -> dict[str, Any]:
        """The video processor's size for a clip of ``frames`` frames where it shares one
        pixel budget over the clip: each frame's share fixed (``Family.budget_frames``)."""
        if not self.family.budget_frames:
            return {}
        size = self.processor.video_processor.size
        share = frames * self.repeat / self.family.budget_frames
        return {"size": {"shortest_edge": int(size["shortest_edge"] * share),
                         "longest_edge": int(size["longest_edge"] * share)}}

    def _clip(self, frames: Sequence[Any]) -> list[Any]:
        """The frames as the video given to the processor: each repeated ``self.repeat``
        times."""
        return [frame for frame in frames for _ in range(self.repeat)]

    def _metadata(self, times: Sequence[float], size: tuple[int, int]) -> Any:
        """Video metadata whose frame indices / fps are the frames' real times: Qwen3-VL's
        timestamps (the mean time of a temporal patch's frames), and a sampled fps whose time
        step per temporal patch (Qwen2.5-VL's ``second_per_grid_ts``) is the mean gap between
        the frames."""
        from transformers.video_utils import VideoMetadata

        span = times[-1] - times[0] if len(times) > 1 else 0.0
        gap = span / (len(times) - 1) if span > 0 else 1.0
        fps = self.repeat / gap
        return VideoMetadata(total_num_frames=len(times) * self.repeat, fps=fps,
                             frames_indices=[t * fps for t in times for _ in range(self.repeat)],
                             height=size[0], width=size[1])

    def _process_video(self, items: Sequence[Item], blank: bool) -> Any:
        """The processor over prompts and their videos with the frames' times; ``blank``:
        black frames of each frame's size (for the cached path, which needs only the text,
        token types and grids)."""
        videos, metadata = [], []
        for it in items:
            sizes = {_size_of(f) for f in it.frames}
            if len(sizes) != 1:
                raise UserError(f"{self.name}: frames of several sizes {sorted(sizes)} cannot "
                                "be one video; use --present images")
            [size] = sizes
            frames = [np.zeros((*size, 3), dtype=np.uint8)] * len(it.frames) if blank \
                else list(it.frames)
            videos.append(self._clip(frames))
            metadata.append(self._metadata(it.seconds(), size))
        texts = [self.chat(it.question, it.options, it.seconds()) for it in items]
        inputs = self.processor(text=texts, videos=videos, video_metadata=metadata,
                                padding=True, return_tensors="pt", **VIDEO_KWARGS,
                                **self.family.video_kwargs,
                                **self._video_size(len(items[0].frames)))
        self._check_length(inputs["input_ids"].shape[1], max(len(it.frames) for it in items))
        return inputs

    def _collate(self, parts: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Single-prompt processor outputs as one left-padded batch: per-token rows padded,
        per-video rows concatenated."""
        width = max(p["input_ids"].shape[1] for p in parts)
        out: dict[str, torch.Tensor] = {}
        for key, first in parts[0].items():
            if not isinstance(first, torch.Tensor) or key.startswith("pixel_values"):
                continue
            if first.ndim == 2 and first.shape[1] == parts[0]["input_ids"].shape[1]:
                fill = self.tokenizer.pad_token_id if key == "input_ids" else 0
                out[key] = torch.cat([torch.nn.functional.pad(
                    p[key], (width - p[key].shape[1], 0), value=fill) for p in parts])
            else:
                out[key] = torch.cat([p[key] for p in parts])
        return out

    def as_multi(self, frames: int) -> bool:
        """Whether k frames are fed as several images (else as a lone one); a video is
        always of several frames."""
        return frames > 1 or not self.counts_images or self.present == "video"

    # ------------------------------------------------------------------ scoring
    def logits_from_vision(self, items: Sequence[Item]) -> torch.Tensor:
        """[B, options] letter logits, the language model run over cached frame features."""
        video = self.present == "video"
        return self._batched(items, self._forward_video_cached if video else self._forward_cached)

    def logits_from_images(self, items: Sequence[Item]) -> torch.Tensor:
        """The same through the model's own processor and full forward (vision included)."""
        video = self.present == "video"
        return self._batched(items, self._forward_video if video else self._forward_images)

    def _batched(self, items: Sequence[Item], forward: Any) -> torch.Tensor:
        width = max(len(it.options) for it in items)
        out = torch.full((len(items), width), -torch.inf)
        start, size = 0, self.batch_size
        while start < len(items):
            chunk = items[start:start + size]
            try:
                last = forward(chunk)
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                torch.cuda.empty_cache()
                size = max(1, size // 2)
                continue
            for row, item in enumerate(chunk):
                for i, ids in enumerate(self.letters[:len(item.options)]):
                    out[start + row, i] = torch.logsumexp(last[row, ids], dim=0)
            start += len(chunk)
        return out

    def _check_length(self, length: int, frames: int) -> None:
        if length > self.max_positions:
            raise UserError(f"{self.name}: a prompt of {length} tokens ({frames} frames) is "
                            f"longer than the model's context of {self.max_positions}; use "
                            "fewer frames or smaller ones")

    @torch.no_grad()
    def _forward_images(self, items: Sequence[Item]) -> torch.Tensor:
        texts = [self.chat(it.question, it.options, it.seconds()) for it in items]
        inputs = self._process(texts, [list(it.frames) for it in items])
        self._check_length(inputs["input_ids"].shape[1], max(len(it.frames) for it in items))
        return self._last_logits(self._on_device(inputs))

    def _on_device(self, inputs: Any) -> dict[str, Any]:
        return {k: (v.to(self.device, self.model.dtype) if k.startswith("pixel_values")
                    else v.to(self.device)) for k, v in inputs.items()
                if isinstance(v, torch.Tensor)}

    @torch.no_grad()
    def _forward_video(self, items: Sequence[Item]) -> torch.Tensor:
        if (self.family.video_newline or self.family.budget_frames) \
                and len({len(it.frames) for it in items}) > 1:
            # LLaVA-OneVision's processor stacks videos, Qwen3-VL's sizes frames by the
            # clip's length: one item at a time
            return torch.cat([self._forward_video([it]) for it in items])
        inputs = self._on_device(self._process_video(items, blank=False))
        return self._last_logits({k: v for k, v in inputs.items() if k in self.forward_args})

    @torch.no_grad()
    def _forward_video_cached(self, items: Sequence[Item]) -> torch.Tensor:
        """The processor's own text, token types, grids and times over black frames of the
        same size, one item at a time, left-padded together; the cached features in place of
        the vision tower's."""
        inputs = self._on_device(self._collate(
            [self._process_video([it], blank=True) for it in items]))
        inputs = {k: v for k, v in inputs.items()
                  if k in self.forward_args and not k.startswith("pixel_values")}
        newline = self.base.image_newline if self.family.video_newline else None
        inputs["mm_encoder_outputs"] = {"video": self.family.video_outputs(
            [[f.tokens.to(self.device, self.model.dtype) for f in it.frames] for it in items],
            self.parts, newline)}
        return self._last_logits(inputs)

    @torch.no_grad()
    def _forward_cached(self, items: Sequence[Item]) -> torch.Tensor:
        rows, types, features = [], [], []
        extras: dict[str, list[torch.Tensor]] = {}
        for it in items:
            multi = self.as_multi(len(it.frames))
            raw = self._prompt_ids(it.question, it.options, it.seconds())
            snippets = [self._snippet(f.size, multi) for f in it.frames]
            ids = self._expand(raw, [s.ids for s in snippets])
            self._check_length(len(ids), len(it.frames))
            rows.append(ids)
            if self.family.token_types:
                types.append(self._expand([0 if t != self.image_token_id else t for t in raw],
                                          [s.types or [] for s in snippets]))
            for f in it.frames:
                features.append(f.tokens)
                for k, v in f.extras.items():
                    extras.setdefault(k, []).append(v)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows],
                            device=self.device)
        dtype = self.model.dtype
        inputs: dict[str, Any] = {
            "input_ids": ids, "attention_mask": mask,
            "mm_encoder_outputs": {"image": self.family.encoder_outputs(
                [f.to(self.device, dtype) for f in features], self.parts)}}
        if self.family.token_types:
            inputs[self.family.token_types] = torch.tensor(
                [[0] * (width - len(t)) + t for t in types], device=self.device)
        for k, v in extras.items():
            if k in self.forward_args:
                inputs[k] = torch.cat(v).to(self.device)
        return self._last_logits(inputs)

    def _last_logits(self, inputs: dict[str, Any]) -> torch.Tensor:
        if "logits_to_keep" in self.forward_args:
            inputs["logits_to_keep"] = 1
        # bf16 autocast on CUDA, and wherever the weights are bf16 (the CPU too)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.device.type == "cuda"
                                  or self.model.dtype == torch.bfloat16)
        with autocast:
            logits = self.model(**inputs, use_cache=False).logits
        self.forwards += 1
        return logits[:, -1].float().cpu()


def present_for(family: Family, name: str, present: str | None) -> str:
    """The presentation asked for (default: the family's), or one line refusing it."""
    chosen = present or family.present
    if chosen not in PRESENTATIONS:
        raise UserError(f"--present {chosen!r}: choose from {', '.join(PRESENTATIONS)}")
    if chosen == "video" and family.video is None:
        raise UserError(f"{name}: refocus shows {family.label} no native video input; "
                        "use --present images (frames with time markers)")
    return chosen


def _size_of(frame: Any) -> tuple[int, int]:
    if isinstance(frame, FrameVision):
        return frame.size
    return tuple(int(x) for x in np.asarray(frame).shape[:2])  # type: ignore[return-value]


def _rows_of(features: torch.Tensor | Sequence[torch.Tensor]) -> int:
    if isinstance(features, torch.Tensor):
        return int(features.reshape(-1, features.shape[-1]).shape[0])
    return sum(int(f.reshape(-1, f.shape[-1]).shape[0]) for f in features)
