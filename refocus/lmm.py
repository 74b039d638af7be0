"""The reference LMM: a Hugging Face image/video-text-to-text model answers a multiple-choice
question from a frame subset; its option-letter logits at the answer position, read in one
forward pass (no generation), give the margin of the reward.

* **Loading** — an ``AutoModelForImageTextToText`` by hub id or local path with its own
  processor and chat template, of a family in ``refocus.lmm_families`` (Qwen2-VL, Qwen2.5-VL,
  Qwen3-VL, LLaVA-OneVision, LLaVA, InternVL, SmolVLM, Idefics3, Gemma3); any other model is
  refused at load, before its weights are read, in one line. The frames go in as a
  multi-image turn, in time order.
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

from refocus.lmm_families import Family, family_of
from stores.errors import UserError
from stores.manifest import MAX_OPTIONS
from stores.safe_load import DAMAGED_WEIGHTS, weights_problem

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:MAX_OPTIONS]  # one per option a manifest allows
INSTRUCTION = "Answer with the option's letter from the given choices directly."
PER_IMAGE_KEYS = ("image_grid_thw", "image_sizes")  # processor outputs with a row per image


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


class Snippet(NamedTuple):
    """What the processor puts in place of one image placeholder for a frame of a size."""

    ids: list[int]
    types: list[int] | None  # token types, where the family's forward reads them
    features: int  # how many of ``ids`` take a vision feature row


def _accepts(fn: Any) -> set[str]:
    return set(inspect.signature(fn).parameters)


class LMMScorer:
    """A frozen video-LLM that scores (question, frames) pairs by option-letter logits."""

    def __init__(self, model: Any, processor: Any, name: str, batch_size: int = 8) -> None:
        self.family: Family = family_of(model.config, name)
        self.forward_args = _accepts(model.forward)
        if "mm_encoder_outputs" not in self.forward_args:
            import transformers

            raise UserError(f"{name}: {type(model).__name__}.forward takes no "
                            f"mm_encoder_outputs in transformers {transformers.__version__}; "
                            "the vision cache needs the version constraints.txt pins")
        self.model, self.processor, self.name = model.eval(), processor, name
        self.batch_size = batch_size
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
        self._prompts: dict[tuple[str, tuple[str, ...], int], list[int]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, spec: str, device: str | torch.device | None = None,
             dtype: torch.dtype | None = None, batch_size: int = 8) -> LMMScorer:
        """By hub id or local path; bf16 and SDPA on CUDA, float32 on CPU."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            family_of(AutoConfig.from_pretrained(spec), spec)  # before any weights are read
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
        return cls(model.to(device), processor, spec, batch_size)

    # ------------------------------------------------------------------ prompts
    def chat(self, question: str, options: Sequence[str], images: int) -> str:
        content = [{"type": "image"} for _ in range(images)]
        content.append({"type": "text", "text": question_prompt(question, options)})
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)

    def _prompt_ids(self, question: str, options: Sequence[str], images: int) -> list[int]:
        key = (question, tuple(options), images)
        ids = self._prompts.get(key)
        if ids is None:
            ids = self.tokenizer(self.chat(question, options, images))["input_ids"]
            if sum(t == self.image_token_id for t in ids) != images:
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
            raw = self._prompt_ids("x", ["y", "z"], n)
            blank = np.zeros((*size, 3), dtype=np.uint8)
            full = self._process([self.chat("x", ["y", "z"], n)], [[blank] * n])
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
        if self.counts_images and multi and len(images) == 1:  # a lone frame of a multi set
            return self.vision([images[0], images[0]], multi=True)[:1]
        # through the processor itself, as one prompt of several images (or each alone), so
        # the pixels are prepared exactly as for scoring
        groups = [list(images)] if multi else [[image] for image in images]
        inputs = self._process([self.chat("x", ["y", "z"], len(g)) for g in groups], groups)
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

    def as_multi(self, frames: int) -> bool:
        """Whether k frames are fed as several images (else as a lone one)."""
        return frames > 1 or not self.counts_images

    # ------------------------------------------------------------------ scoring
    def logits_from_vision(self, items: Sequence[Item]) -> torch.Tensor:
        """[B, options] letter logits, the language model run over cached frame features."""
        return self._batched(items, self._forward_cached)

    def logits_from_images(self, items: Sequence[Item]) -> torch.Tensor:
        """The same through the model's own processor and full forward (vision included)."""
        return self._batched(items, self._forward_images)

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
        texts = [self.chat(it.question, it.options, len(it.frames)) for it in items]
        inputs = self._process(texts, [list(it.frames) for it in items])
        self._check_length(inputs["input_ids"].shape[1], max(len(it.frames) for it in items))
        inputs = {k: (v.to(self.device, self.model.dtype) if k.startswith("pixel_values")
                      else v.to(self.device)) for k, v in inputs.items()}
        return self._last_logits(inputs)

    @torch.no_grad()
    def _forward_cached(self, items: Sequence[Item]) -> torch.Tensor:
        rows, types, features = [], [], []
        extras: dict[str, list[torch.Tensor]] = {}
        for it in items:
            multi = self.as_multi(len(it.frames))
            raw = self._prompt_ids(it.question, it.options, len(it.frames))
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
        return logits[:, -1].float().cpu()
