"""A corpus in memory as tensors: the feature store's frames, questions and options, joined
with the manifest's splits, question kinds and evidence spans.

Everything the learning core needs is here; nothing in ``refocus/`` reads files. Frame
indices are *local* to a video (0 … n-1, in time order) unless named ``row``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stores.features import Features
from stores.manifest import Question


@dataclass
class QuestionBatch:
    """Padded candidate frames of a batch of questions."""

    questions: torch.Tensor  # [B] question rows
    question_embedding: torch.Tensor  # [B, d] question with its options
    question_text: torch.Tensor  # [B, d] the question alone
    frames: torch.Tensor  # [B, N, d]
    times: torch.Tensor  # [B, N] normalised to [0, 1] by the video's duration
    seconds: torch.Tensor  # [B, N] timestamps in seconds
    valid: torch.Tensor  # [B, N] bool


class Corpus:
    """Questions (rows) and their videos' candidate frames, as tensors."""

    def __init__(self, features: Features, questions: Sequence[Question],
                 device: str | torch.device = "cpu") -> None:
        by_qid = {q.qid: q for q in questions}
        keep = [i for i, qid in enumerate(features.qids) if qid in by_qid]
        self.device = torch.device(device)
        self.qids = [features.qids[i] for i in keep]
        meta = [by_qid[qid] for qid in self.qids]
        self.split = [q.split or "train" for q in meta]
        self.unsplit = [i for i, q in enumerate(meta) if not q.split]  # counted as train
        self.category = [q.category or "all" for q in meta]
        self.evidence = [list(q.evidence) for q in meta]
        self.text = [q.question for q in meta]
        self.options_text = [list(q.options) for q in meta]
        self.video_ids = features.video_ids
        t = lambda a, dtype=torch.float32: torch.as_tensor(np.asarray(a), dtype=dtype,  # noqa: E731
                                                          device=self.device)
        self.frame_embedding = t(features.frame_embedding)
        self.frame_time = t(features.frame_time, torch.float64)
        self.offsets = t(features.offsets, torch.long)
        duration = np.asarray(features.duration, dtype=np.float64)
        last = features.frame_time[features.offsets[1:] - 1] if len(features.offsets) > 1 else []
        self.duration = t(np.where(np.isfinite(duration) & (duration > 0), duration,
                                   np.asarray(last) + 1e-3), torch.float64)
        self.video = t(features.question_video[keep], torch.long)
        self.answer = t(features.answer[keep], torch.long)
        self.question_embedding = t(features.question_embedding[keep])
        self.question_text = t(features.question_text_embedding[keep])
        starts = features.option_offsets[keep]
        counts = features.option_offsets[np.asarray(keep, dtype=int) + 1] - starts
        self.max_options = int(counts.max()) if len(keep) else 0
        rows = starts[:, None] + np.arange(self.max_options)[None]
        option_valid = np.arange(self.max_options)[None] < counts[:, None]
        self.option_valid = t(option_valid, torch.bool)
        self.option_embedding = t(features.option_embedding[np.where(option_valid, rows, 0)])
        self.n_frames = self.offsets[1:] - self.offsets[:-1]
        self._evidence_frames: dict[int, list[list[int]]] = {}
        mismatch = [q.qid for q, a in zip(meta, self.answer.tolist(), strict=True)
                    if q.answer != a]
        if mismatch:
            raise ValueError(f"answers in the store and the manifest differ for {mismatch[:3]}")

    def __len__(self) -> int:
        return len(self.qids)

    def rows(self, split: str | None = None) -> list[int]:
        return [i for i, s in enumerate(self.split) if split is None or s == split]

    def split_problem(self) -> str | None:
        """What makes these questions unfit to learn from, in one line, or None: questions
        without a split, or a video whose questions are in train and in another split (its
        frames would be seen in training and again in validation or testing)."""
        if self.unsplit:
            return (f"question {self.qids[self.unsplit[0]]} has no split ({len(self.unsplit)} "
                    f"of {len(self)} questions have none); give every question a split "
                    "(train, val or test)")
        train_videos = {int(v) for v in self.video[self.rows("train")].tolist()}
        for q, split in enumerate(self.split):
            video = int(self.video[q])
            if split != "train" and video in train_videos:
                return (f"video {self.video_ids[video]} has train questions and {split} "
                        f"question {self.qids[q]}; keep all questions of a video in one split")
        return None

    def frames_of(self, questions: torch.Tensor | Sequence[int]) -> QuestionBatch:
        """Padded candidates of the questions' videos."""
        q = torch.as_tensor(questions, dtype=torch.long, device=self.device)
        videos = self.video[q]
        counts = self.n_frames[videos]
        n = int(counts.max())
        local = torch.arange(n, device=self.device)
        valid = local[None] < counts[:, None]
        rows = (self.offsets[videos][:, None] + local[None]).clamp(max=len(self.frame_time) - 1)
        seconds = self.frame_time[rows]
        start = seconds[:, :1]
        span = (self.duration[videos][:, None] - start).clamp_min(1e-6)
        times = ((seconds - start) / span).clamp(0, 1).float().masked_fill(~valid, 0)
        frames = self.frame_embedding[rows] * valid[..., None]
        return QuestionBatch(q, self.question_embedding[q], self.question_text[q], frames, times,
                     seconds.float().masked_fill(~valid, 0), valid)

    def evidence_frames(self, question: int) -> list[list[int]]:
        """Per evidence span, the local indices of the candidate frames inside it."""
        cached = self._evidence_frames.get(question)
        if cached is None:
            video = int(self.video[question])
            times = self.frame_time[self.offsets[video]:self.offsets[video + 1]].cpu().numpy()
            cached = [np.flatnonzero((times >= a - 1e-6) & (times <= b + 1e-6)).tolist()
                      for a, b in self.evidence[question]]
            self._evidence_frames[question] = cached
        return cached

    def spans_without_frames(self, question: int) -> int:
        """Evidence spans of the question that hold no candidate frame (no selection can hit
        them: they are left out of the evidence recall)."""
        return sum(not s for s in self.evidence_frames(question))

    def evidence_recall(self, question: int, picks: Sequence[int]) -> float | None:
        """Share of the question's evidence spans hit by at least one picked frame, over the
        spans that hold a candidate frame (None when it has no such span)."""
        spans = [s for s in self.evidence_frames(question) if s]
        if not spans:
            return None
        chosen = set(int(p) for p in picks)
        return sum(bool(chosen.intersection(s)) for s in spans) / len(spans)
