"""A tiny hand-made corpus for the learning core's unit tests: every video has noise frames
and two marked frames, A and B; a question asks for one of them (its embedding says which,
in a code unrelated to the frames' own, so a policy has to learn the mapping)."""

from __future__ import annotations

import numpy as np
import torch

from refocus.data import Corpus
from stores.features import Features
from stores.manifest import Question

DIM = 16


def toy_corpus(videos: int = 40, frames: int = 20, seed: int = 0,
               split_every: int = 4) -> tuple[Corpus, dict[int, tuple[int, int]]]:
    """Returns the corpus and, per question row, (local index of the asked frame, of the
    other marked frame)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0]
    mark_a, mark_b, code_a, code_b = basis[0], basis[1], basis[2], basis[3]
    embeddings, times, video_of, offsets, qids, qvideo, answers = [], [], [], [0], [], [], []
    questions, targets = [], {}
    for v in range(videos):
        noise = rng.standard_normal((frames, DIM)) * 0.3
        a, b = rng.choice(frames, 2, replace=False)
        noise[a] += 2 * mark_a
        noise[b] += 2 * mark_b
        embeddings.append(noise / np.linalg.norm(noise, axis=1, keepdims=True))
        times.append(np.arange(frames) * 0.5)
        video_of += [v] * frames
        offsets.append(offsets[-1] + frames)
        asks_a = v % 2 == 0
        qid = f"q{v}"
        qids.append(qid)
        qvideo.append(v)
        answers.append(0)
        split = "val" if v % split_every == 0 else "train"
        questions.append(Question(qid, f"v{v}", "find it", ("yes", "no"), 0, (), split,
                                  "a" if asks_a else "b"))
        targets[v] = (int(a), int(b)) if asks_a else (int(b), int(a))
    q_emb = np.stack([code_a if v % 2 == 0 else code_b for v in range(videos)])
    features = Features(
        frame_embedding=np.concatenate(embeddings).astype(np.float16),
        frame_time=np.concatenate(times), frame_video=np.array(video_of, dtype=np.int32),
        video_ids=[f"v{v}" for v in range(videos)], offsets=np.array(offsets),
        duration=np.full(videos, frames * 0.5), qids=qids,
        question_video=np.array(qvideo, dtype=np.int32),
        answer=np.array(answers, dtype=np.int16),
        question_embedding=q_emb.astype(np.float16),
        question_text_embedding=q_emb.astype(np.float16),
        option_offsets=np.arange(0, 2 * videos + 1, 2),
        option_embedding=rng.standard_normal((2 * videos, DIM)).astype(np.float16),
    )
    return Corpus(features, questions), targets


class ToyReference:
    """Answers right (margin +1) when the asked frame is among the picks, else −1."""

    id = "toy"

    def __init__(self, targets: dict[int, tuple[int, int]]) -> None:
        self.targets = targets
        self.calls = 0

    def logits(self, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
               valid: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = torch.zeros(len(questions), 2)
        for i, (q, p, v) in enumerate(zip(questions.tolist(), picks.tolist(), valid.tolist(),
                                          strict=True)):
            seen = {x for x, ok in zip(p, v, strict=True) if ok}
            out[i, 0] = 1.0 if self.targets[q][0] in seen else 0.0
            out[i, 1] = 0.0 if self.targets[q][0] in seen else 1.0
        return out


def video_per_question(option_counts: list[int] | np.ndarray, frames: int,
                       rng: np.random.Generator) -> Features:
    """Random 8-d features for one ``frames``-frame video per question (frame i at i seconds),
    question i on video i with answer 0 and ``option_counts[i]`` options."""
    n = len(option_counts)
    offsets = np.concatenate([[0], np.cumsum(option_counts)]).astype(np.int64)
    return Features(
        frame_embedding=rng.standard_normal((n * frames, 8)).astype(np.float16),
        frame_time=np.tile(np.arange(frames, dtype=np.float64), n),
        frame_video=np.repeat(np.arange(n, dtype=np.int32), frames),
        video_ids=[f"v{i}" for i in range(n)], offsets=np.arange(n + 1) * frames,
        duration=np.full(n, float(frames)), qids=[f"q{i}" for i in range(n)],
        question_video=np.arange(n, dtype=np.int32), answer=np.zeros(n, dtype=np.int16),
        question_embedding=rng.standard_normal((n, 8)).astype(np.float16),
        question_text_embedding=rng.standard_normal((n, 8)).astype(np.float16),
        option_offsets=offsets,
        option_embedding=rng.standard_normal((int(offsets[-1]), 8)).astype(np.float16))
