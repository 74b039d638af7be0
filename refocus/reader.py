"""The ``reader``: a small network that answers a multiple-choice question from a subset of a
video's cached frame embeddings — the cheap reference model of the rewards.

Tokens: the question, each option (its own text embedding, compared with the question), and
each chosen frame (embedding, time, and its cosine with the question and with every option).
A transformer mixes them; each option's logit is read from its token, so the answer does not
depend on the order of the options. Trained on random frame subsets of many sizes, half of them
holding the evidence, it answers when the evidence is there and stays unsure when it is not.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from refocus.data import Corpus
from refocus.settings import ReaderTrainSettings


@dataclass(frozen=True)
class ReaderConfig:
    dim: int
    max_options: int
    hidden: int = 128
    question_features: int = 64
    option_features: int = 32

    def as_dict(self) -> dict:
        return asdict(self)


N_POOLED = 19  # per-option features pooled over the frames (see Reader.pooled)


class Reader(nn.Module):
    """Scores each option from features pooled over the chosen frames.

    For option o and frame f: s = cos(f, o) (does the frame show the option?) and
    r = cos(f, question) (is the frame what the question is about?). Pooled with learned
    sharpness: how well and where (time) the option is seen, how relevant the frames that show
    it are, when the question's subject is seen (so "right after" is a time difference), a soft
    count of relevant frames, and each of these relative to the other options. An MLP turns
    them, with the option's and the question's own embeddings, into the option's logit; the
    answer does not depend on the order of the options.
    """

    def __init__(self, config: ReaderConfig) -> None:
        super().__init__()
        self.config = c = config
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(20.0)))
        self.count_scale = nn.Parameter(torch.tensor(20.0))
        self.count_threshold = nn.Parameter(torch.tensor(0.3))
        self.question_in = nn.Linear(2 * c.dim, c.question_features)
        self.option_in = nn.Linear(c.dim, c.option_features)
        width = N_POOLED + c.question_features + c.option_features
        self.mlp = nn.Sequential(nn.Linear(width, c.hidden), nn.GELU(),
                                 nn.Linear(c.hidden, c.hidden), nn.GELU(),
                                 nn.Linear(c.hidden, 1))

    def pooled(self, question: torch.Tensor, question_text: torch.Tensor,
               options: torch.Tensor, option_valid: torch.Tensor, frames: torch.Tensor,
               times: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """[B, O, N_POOLED] features of each option over the chosen frames."""
        qf = F.normalize(question.float(), dim=-1)
        qt = F.normalize(question_text.float(), dim=-1)
        o = F.normalize(options.float(), dim=-1)
        f = F.normalize(frames.float(), dim=-1)
        t = times.float()
        sharp = self.log_sharpness.exp()
        none = ~frame_valid
        s = f @ o.transpose(1, 2)  # [B, k, O]
        r = (f @ qt[:, :, None]).squeeze(-1)  # [B, k]
        # padding frames get a large negative score after scaling (finite, so no 0·inf in
        # the gradients of the sharpness)
        scaled = (sharp * s).masked_fill(none[..., None], -1e9)
        w = scaled.softmax(dim=1)  # [B, k, O]
        s_masked = s.masked_fill(none[..., None], -2.0)
        s_max = s_masked.max(dim=1).values
        s_soft = torch.logsumexp(scaled, dim=1) / sharp
        when = (w * t[..., None]).sum(1)
        relevance_at = (w * r[..., None]).sum(1)
        joint = (s_masked + r[..., None]).max(dim=1).values
        anchor_w = (sharp * r).masked_fill(none, -1e9).softmax(dim=1)
        anchor = (anchor_w * t).sum(1, keepdim=True)
        count = (torch.sigmoid(self.count_scale * (r - self.count_threshold)) * frame_valid).sum(
            1, keepdim=True)
        # frames nearly as relevant as the most relevant one, at three margins
        r_top = r.masked_fill(none, -2.0).max(dim=1, keepdim=True).values
        near = [(torch.sigmoid(40 * (r - r_top + m)) * frame_valid).sum(1, keepdim=True)
                for m in (0.05, 0.1, 0.2)]
        def relative(x: torch.Tensor, best: str = "max") -> torch.Tensor:
            filled = x.masked_fill(~option_valid, -math.inf if best == "max" else math.inf)
            ref = filled.max(dim=1, keepdim=True).values if best == "max" else filled.min(
                dim=1, keepdim=True).values
            return x - ref
        n = frame_valid.float().sum(1, keepdim=True)
        o_q = (o @ qt[:, :, None]).squeeze(-1)
        o_qf = (o @ qf[:, :, None]).squeeze(-1)
        features = [
            s_max, s_soft, when, relevance_at, joint, when - anchor,
            relative(s_max), relative(s_soft), relative(joint), relative(when),
            relative(when, "min"), o_q, o_qf,
            count.expand_as(s_max) / 4, n.expand_as(s_max) / 16, r_top.expand_as(s_max),
            *(c.expand_as(s_max) / 4 for c in near),
        ]
        return torch.stack(features, dim=-1)

    def forward(self, question: torch.Tensor, question_text: torch.Tensor,
                options: torch.Tensor, option_valid: torch.Tensor, frames: torch.Tensor,
                times: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """Option logits [B, O] (−inf for missing options) from the chosen frames [B, k, d]
        with times [B, k] in [0, 1]."""
        pooled = self.pooled(question, question_text, options, option_valid, frames, times,
                             frame_valid)
        q = self.question_in(torch.cat([F.normalize(question.float(), dim=-1),
                                        F.normalize(question_text.float(), dim=-1)], dim=-1))
        o = self.option_in(F.normalize(options.float(), dim=-1))
        x = torch.cat([pooled, o, q[:, None].expand(-1, options.shape[1], -1)], dim=-1)
        logits = self.mlp(x).squeeze(-1)
        return logits.masked_fill(~option_valid, -math.inf)


def margins(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """z_right − max z_wrong per row."""
    right = logits.gather(1, answer[:, None]).squeeze(1)
    wrong = logits.scatter(1, answer[:, None], -math.inf).max(dim=1).values
    return right - wrong


def gather_frames(corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
                  pick_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings [B, k, d] and normalised times [B, k] of chosen local frames."""
    videos = corpus.video[questions]
    rows = (corpus.offsets[videos][:, None] + picks).clamp(max=len(corpus.frame_time) - 1)
    start = corpus.frame_time[corpus.offsets[videos]][:, None]
    span = (corpus.duration[videos][:, None] - start).clamp_min(1e-6)
    times = ((corpus.frame_time[rows] - start) / span).clamp(0, 1).float()
    return corpus.frame_embedding[rows] * pick_valid[..., None], times * pick_valid


def read(reader: Reader, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
         pick_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Option logits for each (question, local frame picks) row."""
    pick_valid = torch.ones_like(picks, dtype=torch.bool) if pick_valid is None else pick_valid
    frames, times = gather_frames(corpus, questions, picks, pick_valid)
    return reader(corpus.question_embedding[questions], corpus.question_text[questions],
                  corpus.option_embedding[questions], corpus.option_valid[questions], frames,
                  times, pick_valid)


# ----------------------------------------------------------------------------- training

def random_subsets(corpus: Corpus, questions: list[int], rng: np.random.Generator,
                   s: ReaderTrainSettings, whole: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One random frame subset per question (or the whole video): sizes log-uniform in
    1..max_subset; a share of them holds one frame of every evidence span."""
    chosen: list[list[int]] = []
    for q in questions:
        n = int(corpus.n_frames[corpus.video[q]])
        if whole:
            chosen.append(list(range(n)))
            continue
        size = min(n, int(np.exp(rng.uniform(0, np.log(s.max_subset + 1)))))
        picks: list[int] = []
        if rng.uniform() < s.evidence_share:
            picks = [int(rng.choice(span)) for span in corpus.evidence_frames(q) if span]
        rest = rng.permutation(n)
        picks = list(dict.fromkeys(picks + [int(i) for i in rest]))[:max(size, len(picks))]
        chosen.append(sorted(picks))
    k = max(len(c) for c in chosen)
    picks = torch.zeros(len(chosen), k, dtype=torch.long)
    valid = torch.zeros(len(chosen), k, dtype=torch.bool)
    for i, c in enumerate(chosen):
        picks[i, :len(c)] = torch.tensor(c)
        valid[i, :len(c)] = True
    return torch.tensor(questions), picks, valid


def train_reader(corpus: Corpus, settings: ReaderTrainSettings, config: ReaderConfig | None = None,
                 log: Callable[[dict], None] | None = None) -> Reader:
    """Train a reader on the corpus's ``train`` questions."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    config = config or ReaderConfig(dim=corpus.frame_embedding.shape[1],
                                    max_options=corpus.max_options)
    reader = Reader(config).to(corpus.device)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    train_rows = corpus.rows("train")
    if not train_rows:
        raise ValueError("no questions in the train split")
    started = time.perf_counter()
    for step in range(settings.steps):
        lr = settings.lr * min(1.0, (step + 1) / 100) * 0.5 * (
            1 + math.cos(math.pi * step / settings.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        whole = settings.all_frames_every > 0 and step % settings.all_frames_every == 0
        size = settings.all_frames_batch if whole else settings.batch_size
        batch = [int(q) for q in rng.choice(train_rows, size)]
        questions, picks, valid = random_subsets(corpus, batch, rng, settings, whole)
        logits = read(reader, corpus, questions.to(corpus.device), picks.to(corpus.device),
                      valid.to(corpus.device))
        loss = F.cross_entropy(logits, corpus.answer[questions])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        optimizer.step()
        if log is not None and (step + 1) % 100 == 0:
            log({"step": step + 1, "loss": round(loss.item(), 4), "lr": lr,
                 "seconds": round(time.perf_counter() - started, 1)})
    return reader.eval()


@torch.no_grad()
def accuracy(reader: Reader, corpus: Corpus, questions: list[int],
             picks_for: Callable[[int], list[int]], batch_size: int = 256) -> float:
    """Share of questions answered right from the frames ``picks_for(question)``."""
    correct = 0
    for i in range(0, len(questions), batch_size):
        part = questions[i:i + batch_size]
        chosen = [picks_for(q) or [0] for q in part]
        k = max(len(c) for c in chosen)
        picks = torch.zeros(len(part), k, dtype=torch.long)
        valid = torch.zeros(len(part), k, dtype=torch.bool)
        for j, c in enumerate(chosen):
            picks[j, :len(c)] = torch.tensor(sorted(c))
            valid[j, :len(c)] = True
        q = torch.tensor(part, device=corpus.device)
        logits = read(reader, corpus, q, picks.to(corpus.device), valid.to(corpus.device))
        correct += int((logits.argmax(1) == corpus.answer[q]).sum())
    return correct / max(1, len(questions))
