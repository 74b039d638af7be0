"""CLIP encoders (open_clip): one entry point that builds any model by name, with its weights.

``load_encoder(model, pretrained)`` accepts

* ``model``: ``refocus-synth`` (the small encoder shipped in ``pipelines/assets`` for the
  synthetic world, weights checked against their recorded sha256), a built-in open_clip
  architecture (``ViT-B-32``), a JSON architecture config file
  (``arch.json``: open_clip's ``{"embed_dim", "vision_cfg", "text_cfg"}``, or a
  ``{"model_cfg", "preprocess_cfg"}`` file as open_clip saves them), a Hugging Face hub id
  (``hf-hub:org/repo``) or a local folder (``local-dir:/path`` with ``open_clip_config.json``
  and weights);
* ``pretrained``: a tag (``laion2b_s34b_b79k``), a weights file (``.safetensors``, ``.bin``,
  ``.pt``), or ``random`` for random initialisation — only when asked for (tests, benchmarks).
  Pickles (``.bin``, ``.pt``) load only when they hold plain tensors (``weights_only``); one
  with other objects, or a damaged file, is refused with one line.
  Hub ids and local folders carry their own weights.

Weights are never downloaded silently in offline mode and never replaced by random ones: when
they cannot be found, loading fails with one line saying what was looked for and how to
provide it. ``Encoder.identity`` records architecture, weights (tag/path and sha256), dim and
preprocessing; stores keep it and refuse features from another encoder.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from pipelines.settings import SYNTH_ENCODER  # declared once, torch-free for the CLI
from refocus.device import pick_device
from stores.errors import UserError
from stores.features import RANDOM_WEIGHTS as RANDOM
from stores.safe_load import DAMAGED_WEIGHTS, weights_problem

QUESTION_TEMPLATE = "Question: {question} Options: {options}"
ASSETS = Path(__file__).resolve().parent / "assets"
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def format_question(question: str, options: list[str] | tuple[str, ...]) -> str:
    """The one text template for a question with its lettered options."""
    lettered = " ".join(f"({OPTION_LETTERS[i]}) {o}" for i, o in enumerate(options))
    return QUESTION_TEMPLATE.format(question=question.strip(), options=lettered)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Encoder:
    """A loaded CLIP model with its image preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: Any  # PIL image → tensor [3, H, W]
    tokenizer: Any
    device: torch.device
    identity: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.identity["dim"])

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return torch.autocast("cpu", enabled=False)

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """Preprocessed images [B, 3, H, W] → L2-normalised float32 embeddings [B, dim]."""
        with self._autocast():
            features = self.model.encode_image(pixels.to(self.device, non_blocking=True))
        return _normalise(features)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts (truncated to the context length) → L2-normalised float32 [B, dim]."""
        tokens = self.tokenizer(texts).to(self.device)
        with self._autocast():
            features = self.model.encode_text(tokens)
        return _normalise(features)


def _normalise(features: torch.Tensor) -> np.ndarray:
    features = features.float()
    features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return features.cpu().numpy()


# ----------------------------------------------------------------------------- resolution

@dataclass(frozen=True)
class _Resolved:
    source: str  # the model as given, with files made absolute: how to load it again
    name: str  # what open_clip.create_model gets
    pretrained: str | None  # tag or file for create_model (None: none, or they come with name)
    weights: str | None  # what the user named (tag, path, hub id, random; None: bundled)
    weights_file: str | None  # the file actually loaded (for its hash)
    config: dict[str, Any]  # the architecture config


WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _folder_model(folder: Path, label: str) -> _Resolved:
    """A folder with open_clip_config.json and weights (local-dir:, or a hub snapshot)."""
    try:
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{label}: cannot read open_clip_config.json ({e})") from None
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return _Resolved(label, f"local-dir:{folder}", None, label, str(folder / name),
                             config.get("model_cfg", {}))
    raise UserError(f"{label}: no weights ({' or '.join(WEIGHT_FILES)}) in {folder}")


def _hub_model(repo: str) -> _Resolved:
    """An open_clip model on the Hugging Face hub, from the local cache when offline."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    missing = (LocalEntryNotFoundError, EntryNotFoundError, OSError)
    how = ("download it where the hub is reachable (huggingface-cli download "
           f"{repo}), or pass --model local-dir:/path")
    try:
        folder = Path(hf_hub_download(repo, "open_clip_config.json")).parent
    except missing:
        raise UserError(f"hf-hub:{repo}: open_clip_config.json is not in the Hugging Face "
                        f"cache; {how}") from None
    for name in WEIGHT_FILES:
        try:
            hf_hub_download(repo, name)
            return _folder_model(folder, f"hf-hub:{repo}")
        except missing:
            continue
    raise UserError(f"hf-hub:{repo}: no weights ({' or '.join(WEIGHT_FILES)}) in the Hugging "
                    f"Face cache; {how}")


def _tag_weights(name: str, tag: str) -> str:
    config = open_clip.get_pretrained_cfg(name, tag)
    try:
        return open_clip.download_pretrained(config)
    except (OSError, RuntimeError) as e:
        source = (config.get("hf_hub") or config.get("url") or "?").rstrip("/")
        raise UserError(
            f"{name} weights '{tag}' are not in the local cache (looked for {source} in the "
            f"Hugging Face / open_clip cache: {type(e).__name__}); download them where the hub "
            "is reachable, or pass --pretrained /path/to/weights.safetensors"
        ) from None


def _tags(name: str) -> str:
    return ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"


def _bundled(pretrained: str | None) -> tuple[str, str]:
    """Config and weights of the encoder shipped with refocus, its weights' hash checked."""
    config = ASSETS / f"{SYNTH_ENCODER}.json"
    weights = Path(pretrained) if pretrained else ASSETS / f"{SYNTH_ENCODER}.safetensors"
    meta = ASSETS / f"{SYNTH_ENCODER}.meta.json"
    if not (config.is_file() and weights.is_file() and meta.is_file()):
        raise UserError(f"{SYNTH_ENCODER}: the bundled encoder is missing from {ASSETS}; "
                        "reinstall refocus or train one (refocus train-encoder)")
    if pretrained is None:
        recorded = json.loads(meta.read_text())["weights_sha256"]
        if file_sha256(weights) != recorded:
            raise UserError(f"{weights}: sha256 differs from the recorded {recorded[:12]}…; "
                            "the bundled weights are damaged, reinstall refocus")
    return str(config), str(weights)


def _resolve(model: str, pretrained: str | None) -> _Resolved:
    if model == SYNTH_ENCODER:
        spec = _resolve(*_bundled(pretrained))
        if pretrained is None:  # recorded by name, so it loads again on any install
            spec = replace(spec, source=SYNTH_ENCODER, weights=None)
        return spec
    if model.startswith("hf-hub:"):
        return _hub_model(model[len("hf-hub:"):])
    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:"):]).resolve()
        return _folder_model(folder, f"local-dir:{folder}")
    name = source = model
    if model.endswith(".json"):
        path = Path(model).resolve()
        if not path.is_file():
            raise UserError(f"{model}: architecture config not found")
        open_clip.add_model_config(path)
        name, source = path.stem, str(path)
    config = open_clip.get_model_config(name)
    if config is None or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise UserError(f"{model}: not an open_clip architecture (a built-in name such as "
                        "ViT-B-32, a JSON config with embed_dim/vision_cfg/text_cfg, "
                        "hf-hub:org/repo or local-dir:/path)")
    if pretrained is None:
        raise UserError(f"{model}: no weights given; pass --pretrained TAG or FILE (tags: "
                        f"{_tags(name)}), or --pretrained {RANDOM} for random initialisation")
    if pretrained == RANDOM:
        return _Resolved(source, name, None, RANDOM, None, config)
    if Path(pretrained).is_file():
        weights = str(Path(pretrained).resolve())
        return _Resolved(source, name, weights, weights, weights, config)
    if open_clip.get_pretrained_cfg(name, pretrained):
        return _Resolved(source, name, pretrained, pretrained, _tag_weights(name, pretrained),
                         config)
    raise UserError(f"--pretrained {pretrained!r}: no such file, and not a tag of {name} "
                    f"(tags: {_tags(name)})")


def load_encoder(model: str, pretrained: str | None = None, device: str | None = None) -> Encoder:
    """Build an open_clip model by name, config file, hub id or local folder (module notes)."""
    spec = _resolve(model, pretrained)
    target = pick_device(device)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, pretrained=spec.pretrained, load_weights=spec.weights != RANDOM,
            device=target, pretrained_text=False,
        )
    except DAMAGED_WEIGHTS as e:
        raise UserError(weights_problem(spec.weights_file or spec.name, e)) from None
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        where = spec.weights_file or spec.name
        raise UserError(f"{where}: cannot load into {spec.name} "
                        f"({str(e).splitlines()[0][:200]})") from None
    clip.eval()
    tokenizer = open_clip.get_tokenizer(spec.name)
    return Encoder(clip, preprocess, tokenizer, target, _identity(spec, clip))


def encoder_spec(identity: dict[str, Any]) -> tuple[str, str | None]:
    """The (model, pretrained) arguments of ``load_encoder`` that an identity records."""
    model = str(identity.get("model"))
    is_bundle = model.startswith(("hf-hub:", "local-dir:"))  # they carry their own weights
    return model, None if is_bundle else identity.get("pretrained")


def load_encoder_of(identity: dict[str, Any], device: str | None = None) -> Encoder:
    """The encoder an identity was recorded from (model and weights as recorded)."""
    return load_encoder(*encoder_spec(identity), device)


def _identity(spec: _Resolved, clip: torch.nn.Module) -> dict[str, Any]:
    preprocess = getattr(clip.visual, "preprocess_cfg", {}) or {}
    return {
        "model": spec.source,
        "pretrained": spec.weights,
        "config": spec.config,
        "config_sha256": hashlib.sha256(
            json.dumps(spec.config, sort_keys=True).encode()).hexdigest(),
        "weights_sha256": file_sha256(spec.weights_file) if spec.weights_file else RANDOM,
        "dim": int(spec.config["embed_dim"]),
        "context_length": int(spec.config["text_cfg"].get("context_length", 77)),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()},
        "text_template": QUESTION_TEMPLATE,
    }
