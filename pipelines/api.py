"""One call for users who never touch the pipeline:

```python
from pipelines import select_frames

picked = select_frames("clip.mp4", "What does she pick up?", ["a cup", "a book"], k=8,
                       policy="runs/policy")  # or an export folder, or a Hub id ORG/NAME
picked.timestamps  # seconds, in time order
picked.images      # PIL images of those frames (as decoded, before any JPEG)
```

It does for one video what ``refocus score`` does for a corpus, in memory: candidates decoded
with the policy's candidate settings (pipelines/decode.py), each kept frame JPEG-encoded at the
policy's quality and read back exactly as the embed stage reads a shard (so the encoder sees
the same pixels), embedded with the policy's encoder, stored to float16 as the feature store
does, and the policy decodes greedily over them (``refocus.selectors.Learned``). The policy,
its encoder and settings are loaded once per (policy, device) and kept.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.decode import VideoDecoder, VideoError
from pipelines.embed import decode_frame
from pipelines.encoder import Encoder, format_question, load_encoder
from pipelines.hub import resolve_policy
from pipelines.ingest import IngestSettings, encode_jpeg
from pipelines.policies import find_policy, load_policy
from pipelines.score import encoder_args, ingest_settings, trained_k
from pipelines.settings import EmbedSettings, ScoreSettings
from refocus.data import Corpus
from refocus.policy import FrameSelector
from refocus.selectors import Learned
from stores.errors import UserError
from stores.features import Features
from stores.manifest import Question

FRAME_BATCH = EmbedSettings.batch_size  # frames per encoder call, as refocus embed


@dataclass(frozen=True)
class SelectedFrames:
    """The policy's k frames of one video, in time order."""

    timestamps: list[float]  # seconds
    images: list[Image.Image]  # RGB, as decoded (resized to the candidate settings)
    frame_indices: list[int]  # among the video's candidate frames
    probabilities: list[float]  # the policy's probability of each pick when it was chosen


@dataclass(frozen=True)
class ReadyPolicy:
    """A policy with what it needs to see a video: its encoder and candidate settings."""

    path: Path
    selector: FrameSelector
    encoder: Encoder
    candidates: IngestSettings
    default_k: int | None


@functools.lru_cache(maxsize=4)
def ready_policy(policy: str, device: str | None = None) -> ReadyPolicy:
    """The policy a path or Hub id names, with its encoder and candidate settings (kept for
    the next call)."""
    path = resolve_policy(policy)
    trained = find_policy(path)
    encoder = load_encoder(*encoder_args(trained, ScoreSettings()), device)
    try:
        default_k: int | None = trained_k(trained, None)
    except UserError:
        default_k = None
    return ReadyPolicy(path, load_policy(path, encoder.device), encoder,
                       ingest_settings(trained, workers=1), default_k)


@dataclass
class _Candidates:
    times: list[float]
    rgb: list[np.ndarray]
    jpegs: list[bytes]
    duration: float | None


def _decode(video: str, settings: IngestSettings) -> _Candidates:
    """The candidate frames as ingest takes them (and their JPEGs, as a shard holds them)."""
    found = _Candidates([], [], [], None)
    try:
        with VideoDecoder(video, settings.decode, settings.network) as decoder:
            for candidate in decoder.candidates():
                found.times.append(candidate.time)
                found.rgb.append(candidate.rgb)
                found.jpegs.append(encode_jpeg(candidate.rgb, settings.jpeg_quality))
            found.duration = decoder.info.duration
    except VideoError as e:
        raise UserError(f"{video}: {e}") from None
    if not found.times:
        raise UserError(f"{video}: no frames could be decoded")
    return found


def _embed_frames(encoder: Encoder, jpegs: list[bytes]) -> np.ndarray:
    """Frame embeddings as refocus embed computes them from a shard's JPEGs."""
    parts = []
    for start in range(0, len(jpegs), FRAME_BATCH):
        pixels = [encoder.preprocess(decode_frame(j)) for j in jpegs[start:start + FRAME_BATCH]]
        parts.append(encoder.encode_images(torch.stack(pixels)))
    return np.concatenate(parts)


def _features(ready: ReadyPolicy, found: _Candidates, question: str,
              options: list[str]) -> Features:
    """A one-video, one-question feature store in memory, in the store's dtypes."""
    encoder = ready.encoder
    half = lambda a: np.asarray(a, dtype=np.float16)  # noqa: E731  (the store's precision)
    n = len(found.times)
    return Features(
        frame_embedding=half(_embed_frames(encoder, found.jpegs)),
        frame_time=np.asarray(found.times, dtype=np.float64),
        frame_video=np.zeros(n, dtype=np.int32), video_ids=["video"],
        offsets=np.asarray([0, n], dtype=np.int64),
        duration=np.asarray([np.nan if found.duration is None else found.duration]),
        qids=["question"], question_video=np.zeros(1, dtype=np.int32),
        answer=np.zeros(1, dtype=np.int16),
        question_embedding=half(encoder.encode_texts([format_question(question, options)])),
        question_text_embedding=half(encoder.encode_texts([question])),
        option_offsets=np.asarray([0, len(options)], dtype=np.int64),
        option_embedding=half(encoder.encode_texts(list(options))))


def select_frames(video: str | os.PathLike[str], question: str, options: list[str],
                  k: int | None = None, policy: str | os.PathLike[str] = "",
                  device: str | None = None) -> SelectedFrames:
    """The ``k`` frames of ``video`` that ``policy`` (a refocus train --out folder, a policy
    or export folder, or a Hugging Face model id) picks for a multiple-choice question;
    ``k`` defaults to the largest budget the policy was trained on."""
    if not policy:
        raise UserError("select_frames: name the policy (a run folder or a Hub id ORG/NAME)")
    if not options:
        raise UserError("select_frames: give the question's answer options")
    ready = ready_policy(str(policy), device)
    k = k if k is not None else ready.default_k
    if k is None or k < 1:
        raise UserError(f"{policy}: records no training budgets; give k (frames to pick)")
    found = _decode(str(video), ready.candidates)
    asked = Question("question", "video", question, tuple(options), 0)
    corpus = Corpus(_features(ready, found, question, options), [asked], ready.encoder.device)
    [(picks, probs)] = Learned(ready.selector).select_scored(corpus, [0], k)
    return SelectedFrames(
        timestamps=[float(found.times[p]) for p in picks],
        images=[Image.fromarray(found.rgb[p]) for p in picks],
        frame_indices=[int(p) for p in picks],
        probabilities=[float(p) for p in probs])
