"""Train the offline encoder: a small open_clip model that sees the synthetic world.

Images are frames drawn by ``pipelines.synth`` (random background and distractors, with one
coloured shape or none), JPEG-compressed, scaled to the model's input, freshly drawn for every
step in a DataLoader worker (so the model never sees the same frame twice) and randomly shifted
and mirrored; texts are captions ("a red circle"), partial captions ("red",
"a circle"), the generator's own questions in the one question template, and background
captions ("no shape"). A text matches an image when everything it names is in the image
(a "none" text matches only frames without a shape), and the loss is a contrastive loss with
several positives per row: the probability mass each image puts on all its matching texts
in the batch, and each text on all its matching images.

``evaluate`` measures the result the way it is used: held-out videos from another seed,
decoded by the ingest decoder, JPEG-encoded as in the shards, preprocessed by the model's own
transform; zero-shot top-1 over the 24 colour × shape prompts on frames with a shape, and
shape / no-shape accuracy with a "no shape" prompt added.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines import synth
from pipelines.decode import DecodeSettings, VideoDecoder
from pipelines.encoder import SYNTH_ENCODER, Encoder, file_sha256, format_question, load_encoder
from pipelines.ingest import encode_jpeg
from pipelines.settings import TrainSettings
from pipelines.workers import dataloader_worker_init
from stores.owned import claim

NAME = SYNTH_ENCODER
ENCODER_KIND = "encoder"  # the marker of a train-encoder folder (stores/owned.py)
ARCHITECTURE: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32,
                   "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 4,
                 "layers": 2},
}
NONE_TEXTS = ("no shape", "an empty background", "only the background", "nothing but grey "
              "blobs", "no coloured shape", "the background with moving blobs")
Label = tuple[str | None, str | None, bool]  # colour, shape, has a shape




# ----------------------------------------------------------------------------- data

def draw_frame(rng: np.random.Generator, s: TrainSettings) -> tuple[np.ndarray, Label]:
    """One synthetic frame at the model's input size, with its label."""
    n_blobs = int(rng.integers(s.distractors[0], s.distractors[1] + 1))
    moment = int(rng.integers(0, 300))  # a random moment of the background's drift
    events: tuple[synth.Event, ...] = ()
    label: Label = (None, None, False)
    if rng.uniform() >= s.none_share:
        event = synth.random_event(rng, moment, 1)
        events, label = (event,), (event.colour, event.shape, True)
    scene = synth.Scene(frames=moment + 1, fps=8, size=s.frame_size,
                        blobs=synth.random_blobs(rng, n_blobs), events=events,
                        **synth.random_background(rng, 1.0))
    # compressed like a frame that went through H.264 and the shards' JPEG
    buffer = io.BytesIO()
    Image.fromarray(synth.render(scene, moment, None)).save(
        buffer, format="JPEG", quality=int(rng.integers(40, 95)))
    size = ARCHITECTURE["vision_cfg"]["image_size"]
    small = Image.open(buffer).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(small), label


class FreshFrames(torch.utils.data.IterableDataset):
    """An endless stream of batches of newly drawn frames (never the same frame twice), drawn
    in a DataLoader worker while the model trains."""

    def __init__(self, settings: TrainSettings) -> None:
        self.settings = settings

    def __iter__(self):  # noqa: ANN204
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.settings.seed, info.id if info else 0])
        while True:
            frames, labels = zip(*(draw_frame(rng, self.settings)
                                   for _ in range(self.settings.batch_size)), strict=True)
            yield torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2), list(labels)


def augment(x: torch.Tensor, rng: np.random.Generator, shift: int = 4) -> torch.Tensor:
    """Random translation (edge-padded crop) and horizontal flip: shapes keep their class."""
    n, _, h, w = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    dy, dx = rng.integers(0, 2 * shift + 1, 2)
    x = padded[:, :, dy:dy + h, dx:dx + w]
    flip = torch.from_numpy(rng.uniform(size=n) < 0.5)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def text_for(rng: np.random.Generator, label: Label) -> tuple[str, Label]:
    """A text that matches ``label``, with the label of what the text itself names."""
    colour, shape, has_shape = label
    if not has_shape:
        return str(rng.choice(NONE_TEXTS)), (None, None, False)
    colours, shapes = list(synth.COLOURS), list(synth.SHAPES)
    kind = int(rng.integers(9))
    if kind <= 2:
        template = ["a {c} {s}", "a photo of a {c} {s}", "{c} {s}"][kind]
        return template.format(c=colour, s=shape), (colour, shape, True)
    if kind == 3:
        return str(rng.choice([f"{colour}", f"a {colour} shape", f"something {colour}"])), (
            colour, None, True)
    if kind == 4:
        return str(rng.choice([f"{shape}", f"a {shape}", f"a {shape} of some colour"])), (
            None, shape, True)
    options = [str(o) for o in rng.permutation(colours)[:4]]
    if kind == 5:
        return format_question(f"What colour was the {shape}?", options), (None, shape, True)
    if kind == 6:
        options = [str(o) for o in rng.permutation(shapes)]
        return format_question(f"What shape was the {colour} one?", options), (colour, None, True)
    if kind == 7:
        counts = ["one", "two", "three", "four"]
        if rng.uniform() < 0.5:
            return format_question(f"How many {colour} shapes appeared?", counts), (
                colour, None, True)
        return format_question(f"How many {shape}s appeared?", counts), (None, shape, True)
    names = [f"{c} {s}" for c, s in zip(rng.permutation(colours)[:4],
                                         rng.permutation(shapes), strict=True)]
    return format_question(f"What appeared right after the {colour} {shape}?", names), (
        colour, shape, True)


def _codes(labels: list[Label]) -> np.ndarray:
    colours, shapes = list(synth.COLOURS), list(synth.SHAPES)
    return np.array([(colours.index(c) if c else -1, shapes.index(s) if s else -1, int(h))
                     for c, s, h in labels]).reshape(-1, 3)


def matches(images: list[Label], texts: list[Label]) -> torch.Tensor:
    """[n_images, n_texts] bool: the text names nothing the image does not show."""
    i, t = _codes(images)[:, None, :], _codes(texts)[None, :, :]
    same_kind = i[..., 2] == t[..., 2]
    colour_ok = (t[..., 0] < 0) | (t[..., 0] == i[..., 0])
    shape_ok = (t[..., 1] < 0) | (t[..., 1] == i[..., 1])
    return torch.from_numpy(same_kind & colour_ok & shape_ok)


def multi_positive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Mean over rows and columns of −log(probability mass on the positives)."""
    def one_way(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        log_p = x.log_softmax(dim=1)
        return -(log_p.masked_fill(~pos, -math.inf).logsumexp(dim=1)).mean()

    return 0.5 * (one_way(logits, positive) + one_way(logits.t(), positive.t()))


# ----------------------------------------------------------------------------- training

def train(out: str | os.PathLike[str], settings: TrainSettings,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train for ``settings.minutes`` and write ``<NAME>.json`` (architecture),
    ``<NAME>.safetensors`` (float16 weights) and ``<NAME>.meta.json`` (hash, settings,
    held-out metrics) under ``out``."""
    owned = claim(out, ENCODER_KIND)  # refocus's own folder or a new one
    with owned.lock():
        return _train(owned.path, settings, log)


def _train(folder: Path, settings: TrainSettings, log: Callable[[str], None]) -> dict[str, Any]:
    from safetensors.torch import save_file

    config = folder / f"{NAME}.json"
    config.write_text(json.dumps(ARCHITECTURE, indent=1))
    torch.manual_seed(settings.seed)
    encoder = load_encoder(str(config), "random")
    model = encoder.model.train()
    started = time.perf_counter()
    batches = iter(torch.utils.data.DataLoader(
        FreshFrames(settings), batch_size=None, num_workers=settings.draw_workers,
        prefetch_factor=2 if settings.draw_workers else None,
        worker_init_fn=dataloader_worker_init() if settings.draw_workers else None))
    mean = torch.tensor(encoder.identity["preprocess"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(encoder.identity["preprocess"]["std"]).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=settings.lr)
    rng = np.random.default_rng(settings.seed + 1)
    deadline = started + settings.minutes * 60
    step, losses = 0, []
    while time.perf_counter() < deadline:
        fraction = min(1.0, (time.perf_counter() - started) / (settings.minutes * 60))
        lr = settings.lr * min(1.0, (step + 1) / settings.warmup) * 0.5 * (
            1 + math.cos(math.pi * fraction))
        for group in optimizer.param_groups:
            group["lr"] = lr
        pixels, batch_labels = next(batches)
        texts, text_labels = zip(*(text_for(rng, lab) for lab in batch_labels), strict=True)
        x = (augment(pixels.float(), rng) / 255 - mean) / std
        image_features = F.normalize(model.encode_image(x), dim=-1)
        text_features = F.normalize(model.encode_text(encoder.tokenizer(list(texts))), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image_features @ text_features.t()
        loss = multi_positive_loss(logits, matches(batch_labels, list(text_labels)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            log(f"step {step}  loss {np.mean(losses[-100:]):.3f}  lr {lr:.2e}  "
                f"{time.perf_counter() - started:.0f} s")
    model.eval()
    weights = folder / f"{NAME}.safetensors"
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              weights)
    trained = load_encoder(str(config), str(weights))
    metrics = evaluate(trained, videos=settings.eval_videos)
    meta = {"name": NAME, "weights_sha256": file_sha256(weights), "steps": step,
            "final_loss": float(np.mean(losses[-100:])), "settings": asdict(settings),
            "held_out": metrics, "seconds": round(time.perf_counter() - started)}
    (folder / f"{NAME}.meta.json").write_text(json.dumps(meta, indent=1))
    return meta


# ----------------------------------------------------------------------------- evaluation

PROMPT = "a {c} {s}"


def evaluate(encoder: Encoder, seed: int = 12345, videos: int = 30,
             fps: float = 4.0) -> dict[str, Any]:
    """Zero-shot accuracy on frames of held-out synthetic videos (see the module notes)."""
    classes = [(c, s) for c in synth.COLOURS for s in synth.SHAPES]
    prompts = [PROMPT.format(c=c, s=s) for c, s in classes] + ["no shape"]
    text = torch.from_numpy(encoder.encode_texts(prompts))
    with tempfile.TemporaryDirectory(prefix="refocus-eval-") as tmp:
        synth.generate(tmp, synth.SynthSettings(videos=videos, seed=seed, questions_per_video=1))
        truth, embeddings = [], []
        for line in (Path(tmp) / "manifest.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("type") != "video":
                continue
            events = row["events"]
            with VideoDecoder(Path(tmp) / row["path"], DecodeSettings(fps=fps)) as video:
                for frame in video.candidates():
                    jpeg = encode_jpeg(frame.rgb, 90)
                    image = Image.open(io.BytesIO(jpeg)).convert("RGB")
                    embeddings.append(encoder.preprocess(image))
                    index = round(frame.time * row["fps"])
                    shown = [e for e in events if e["first"] <= index < e["first"] + e["frames"]]
                    truth.append((shown[0]["colour"], shown[0]["shape"]) if shown else None)
        features = torch.cat([
            torch.from_numpy(encoder.encode_images(torch.stack(embeddings[i:i + 256])))
            for i in range(0, len(embeddings), 256)])
    scores = features @ text.t()
    with_shape = [i for i, t in enumerate(truth) if t is not None]
    without = [i for i, t in enumerate(truth) if t is None]
    best24 = scores[:, :24].argmax(dim=1)
    top1 = np.mean([classes[int(best24[i])] == truth[i] for i in with_shape])
    says_shape = scores.argmax(dim=1) < 24
    detect_shape = float(says_shape[with_shape].float().mean())
    detect_none = float((~says_shape[without]).float().mean())
    return {
        "frames_with_shape": len(with_shape), "frames_without": len(without),
        "colour_shape_top1": round(float(top1), 4),
        "shape_frames_called_shape": round(detect_shape, 4),
        "background_frames_called_none": round(detect_none, 4),
        "shape_vs_none_balanced_accuracy": round((detect_shape + detect_none) / 2, 4),
    }
