"""Distillation of a reference LMM into a reader: the frame subsets the LMM scores offline,
the reader trained on its option distributions (soft cross-entropy, i.e. KL up to a constant,
plus a margin regression), and the reader's margin error against held-out LMM margins.

Scored subsets arrive as tensors (``Scored``); reading and writing them is stores/margins.py's
and pipelines/margins.py's."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refocus.data import Corpus
from refocus.reader import AnyReader, ReaderConfig, build_reader, margins, read, schedule, update
from refocus.settings import DistillSettings, MarginSettings, ReaderTrainSettings


def draw_subsets(corpus: Corpus, question: int, settings: MarginSettings,
                 rng: np.random.Generator) -> list[list[int]]:
    """``subsets_per_question`` sorted frame subsets of one question, sizes among the budgets
    (capped by the video): the first ``evidence_share`` of them hold one frame of every
    evidence span, the others no evidence frame at all (when the video has other frames)."""
    n = int(corpus.n_frames[corpus.video[question]])
    spans = [s for s in corpus.evidence_frames(question) if s]
    inside = {f for s in spans for f in s}
    outside = [f for f in range(n) if f not in inside] or list(range(n))
    with_evidence = round(settings.subsets_per_question * settings.evidence_share) if spans else 0
    subsets = []
    for i in range(settings.subsets_per_question):
        size = min(n, int(settings.budgets[rng.integers(len(settings.budgets))]))
        if i < with_evidence:
            picks = list(dict.fromkeys(int(rng.choice(s)) for s in spans))
            rest = [int(f) for f in rng.permutation(n) if int(f) not in picks]
            picks += rest[:max(0, size - len(picks))]
        else:
            picks = [int(f) for f in rng.choice(outside, min(size, len(outside)), replace=False)]
        subsets.append(sorted(picks))
    return subsets


@dataclass
class Scored:
    """Frame subsets of corpus questions with a reference's option logits and margins."""

    questions: torch.Tensor  # [S] corpus rows
    picks: torch.Tensor  # [S, k] local frame indices
    valid: torch.Tensor  # [S, k]
    logits: torch.Tensor  # [S, O] (−inf for missing options)
    margin: torch.Tensor  # [S]

    def __len__(self) -> int:
        return len(self.questions)

    def take(self, rows: torch.Tensor) -> Scored:
        return Scored(self.questions[rows], self.picks[rows], self.valid[rows],
                      self.logits[rows], self.margin[rows])

    def of_questions(self, keep: set[int]) -> Scored:
        rows = [i for i, q in enumerate(self.questions.tolist()) if q in keep]
        return self.take(torch.tensor(rows, dtype=torch.long))

    def to(self, device: torch.device) -> Scored:
        return Scored(*(t.to(device) for t in (self.questions, self.picks, self.valid,
                                                self.logits, self.margin)))


def soft_cross_entropy(student: torch.Tensor, teacher: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Mean over rows of −Σ p_teacher · log p_student over the options both have (KL up to
    the teacher's entropy, which does not depend on the student)."""
    valid = torch.isfinite(teacher) & torch.isfinite(student)
    target = (teacher / temperature).masked_fill(~valid, -torch.inf).softmax(dim=1)
    log_p = (student / temperature).masked_fill(~valid, -torch.inf).log_softmax(dim=1)
    return -(target * log_p).masked_fill(~valid, 0.0).sum(dim=1).mean()


def distill_loss(logits: torch.Tensor, batch: Scored, answer: torch.Tensor,
                 settings: DistillSettings) -> torch.Tensor:
    loss = soft_cross_entropy(logits, batch.logits, settings.temperature)
    if settings.margin_weight:
        loss = loss + settings.margin_weight * F.smooth_l1_loss(margins(logits, answer),
                                                                batch.margin)
    return loss


def distill_reader(corpus: Corpus, scored: Scored, settings: ReaderTrainSettings,
                   distill: DistillSettings, config: ReaderConfig,
                   log: Callable[[dict], None] | None = None) -> AnyReader:
    """A reader of ``config`` trained to give the reference's option distribution (and
    margin) on the scored subsets."""
    if not len(scored):
        raise ValueError("no scored subsets to distill from")
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    reader = build_reader(config).to(corpus.device)
    scored = scored.to(corpus.device)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    started = time.perf_counter()
    for step in range(settings.steps):
        lr = schedule(optimizer, settings, step)
        rows = torch.as_tensor(rng.integers(len(scored), size=settings.batch_size),
                               device=corpus.device)
        batch = scored.take(rows)
        logits = read(reader, corpus, batch.questions, batch.picks, batch.valid)
        loss = distill_loss(logits, batch, corpus.answer[batch.questions], distill)
        update(reader, optimizer, loss)
        if log is not None and (step + 1) % 100 == 0:
            log({"step": step + 1, "loss": round(loss.item(), 4), "lr": lr,
                 "seconds": round(time.perf_counter() - started, 1)})
    return reader.eval()


@torch.no_grad()
def margin_error(reader: AnyReader, corpus: Corpus, scored: Scored,
                 batch_size: int = 512) -> dict[str, float]:
    """The reader against the reference on the scored subsets: mean absolute error of the
    margin, share of subsets where both pick the same option, and their KL (nats)."""
    reader.eval()
    errors, agree, kl = [], [], []
    for start in range(0, len(scored), batch_size):
        part = scored.take(torch.arange(start, min(start + batch_size, len(scored)))).to(
            corpus.device)
        logits = read(reader, corpus, part.questions, part.picks, part.valid)
        errors.append((margins(logits, corpus.answer[part.questions]) - part.margin).abs())
        agree.append((logits.argmax(1) == part.logits.argmax(1)).float())
        teacher = part.logits.log_softmax(1)
        entropy = -(teacher.exp() * teacher).nan_to_num(0.0).sum(1)
        kl.append(soft_cross_entropy(logits, part.logits).expand(len(part)) - entropy)
    if not errors:
        return {"subsets": 0}
    return {"subsets": len(scored), "margin_mae": round(float(torch.cat(errors).mean()), 4),
            "agreement": round(float(torch.cat(agree).mean()), 4),
            "kl": round(float(torch.cat(kl).mean()), 4)}
