"""The ``reader``: a small network that answers a multiple-choice question from a subset of a
video's cached frame embeddings — the cheap reference model of the rewards.

Two architectures (``ReaderConfig.architecture``, saved with the weights):

* ``hand`` (``Reader``): features pooled over the chosen frames by hand — how well and when each
  option is seen, relevance to the question, counts — tuned to the synthetic question kinds;
* ``generic`` (``GenericReader``): only the frame embeddings, their times, and the question's
  and options' text embeddings — the question and each option attend over the frames, the
  options attend to each other, and each option's logit is read from its token — so the same
  recipe serves any corpus (and learns an LMM's outputs by distillation, refocus/distill.py).

Trained on random frame subsets of many sizes, half of them holding the evidence, a reader
answers when the evidence is there and stays unsure when it is not.
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
    architecture: str = "hand"  # or "generic" (no synthetic-specific features)
    heads: int = 4  # generic: attention heads
    time_frequencies: int = 8  # generic: sine/cosine pairs encoding a frame's time

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"reader architecture must be one of {', '.join(ARCHITECTURES)}, "
                             f"not {self.architecture!r}")

    def as_dict(self) -> dict:
        return asdict(self)


ARCHITECTURES = ("hand", "generic")


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


class GenericReader(nn.Module):
    """Option logits from the frame embeddings, their times and the text embeddings alone.

    Frame tokens: the frame's embedding and a sine/cosine code of its time, projected; a
    learned "no frame" token is always present (an empty subset still reads). Query tokens:
    the question (its text alone and with its options), and one per option (its embedding, the
    question's, its place in the list — an LMM reads options by letter, and may favour some —
    and how well its text matches the chosen frames: the best and the mean cosine of the
    shared text-image embedding, the one signal every corpus has). The queries attend over
    the frames, then over each other (options compared), and an MLP reads each option's logit
    from its token."""

    def __init__(self, config: ReaderConfig) -> None:
        super().__init__()
        self.config = c = config
        h = c.hidden
        self.frame_in = nn.Linear(c.dim + 2 * c.time_frequencies, h)
        self.no_frame = nn.Parameter(torch.zeros(1, 1, h))
        self.question_in = nn.Linear(2 * c.dim, h)
        self.option_in = nn.Linear(c.dim, h)
        self.position = nn.Embedding(max(1, c.max_options), h)
        self.match_in = nn.Linear(2, h)
        self.read_frames = nn.MultiheadAttention(h, c.heads, batch_first=True)
        self.norm_frames = nn.LayerNorm(h)
        self.mix = nn.TransformerEncoderLayer(h, c.heads, 2 * h, dropout=0.0, batch_first=True,
                                              norm_first=True)
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.GELU(), nn.Linear(h, 1))
        self.register_buffer("frequencies", math.pi * 2.0 ** torch.arange(c.time_frequencies),
                             persistent=False)

    def forward(self, question: torch.Tensor, question_text: torch.Tensor,
                options: torch.Tensor, option_valid: torch.Tensor, frames: torch.Tensor,
                times: torch.Tensor, frame_valid: torch.Tensor) -> torch.Tensor:
        """Option logits [B, O] (−inf for missing options); the arguments as ``Reader``'s."""
        b, n_options = options.shape[:2]
        angle = times.float()[..., None] * self.frequencies
        f = self.frame_in(torch.cat([F.normalize(frames.float(), dim=-1), angle.sin(),
                                     angle.cos()], dim=-1))
        f = torch.cat([self.no_frame.expand(b, -1, -1), f], dim=1)
        present = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=f.device),
                             frame_valid], dim=1)
        q = self.question_in(torch.cat([F.normalize(question.float(), dim=-1),
                                        F.normalize(question_text.float(), dim=-1)], dim=-1))
        place = torch.arange(n_options, device=f.device).clamp(max=self.config.max_options - 1)
        unit = F.normalize(options.float(), dim=-1)
        cos = F.normalize(frames.float(), dim=-1) @ unit.transpose(1, 2)  # [B, k, O]
        count = frame_valid.float().sum(1)[:, None].clamp_min(1)
        best = cos.masked_fill(~frame_valid[..., None], -1.0).max(dim=1).values
        best = best.masked_fill(~frame_valid.any(1, keepdim=True), 0.0)
        mean = (cos * frame_valid[..., None]).sum(1) / count
        o = self.option_in(unit) + self.position(place)[None] + self.match_in(
            torch.stack([best, mean], dim=-1) * 10)
        queries = torch.cat([q[:, None], o + q[:, None]], dim=1)  # [B, 1 + O, h]
        seen, _ = self.read_frames(queries, f, f, key_padding_mask=~present, need_weights=False)
        x = self.norm_frames(queries + seen)
        missing = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=f.device),
                             ~option_valid], dim=1)
        x = self.mix(x, src_key_padding_mask=missing)
        logits = self.out(x[:, 1:]).squeeze(-1)
        return logits.masked_fill(~option_valid, -math.inf)


AnyReader = Reader | GenericReader


def build_reader(config: ReaderConfig) -> AnyReader:
    """The reader network of ``config.architecture``."""
    return GenericReader(config) if config.architecture == "generic" else Reader(config)


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


def read(reader: AnyReader, corpus: Corpus, questions: torch.Tensor, picks: torch.Tensor,
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


def default_config(corpus: Corpus, architecture: str = "hand") -> ReaderConfig:
    return ReaderConfig(dim=corpus.frame_embedding.shape[1], max_options=corpus.max_options,
                        architecture=architecture)


def train_reader(corpus: Corpus, settings: ReaderTrainSettings, config: ReaderConfig | None = None,
                 log: Callable[[dict], None] | None = None) -> AnyReader:
    """Train a reader on the corpus's ``train`` questions."""
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    reader = build_reader(config or default_config(corpus)).to(corpus.device)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=settings.lr,
                                  weight_decay=settings.weight_decay)
    train_rows = corpus.rows("train")
    if not train_rows:
        raise ValueError("no questions in the train split")
    started = time.perf_counter()
    for step in range(settings.steps):
        lr = schedule(optimizer, settings, step)
        whole = settings.all_frames_every > 0 and step % settings.all_frames_every == 0
        size = settings.all_frames_batch if whole else settings.batch_size
        batch = [int(q) for q in rng.choice(train_rows, size)]
        questions, picks, valid = random_subsets(corpus, batch, rng, settings, whole)
        logits = read(reader, corpus, questions.to(corpus.device), picks.to(corpus.device),
                      valid.to(corpus.device))
        loss = F.cross_entropy(logits, corpus.answer[questions])
        update(reader, optimizer, loss)
        if log is not None and (step + 1) % 100 == 0:
            log({"step": step + 1, "loss": round(loss.item(), 4), "lr": lr,
                 "seconds": round(time.perf_counter() - started, 1)})
    return reader.eval()


def schedule(optimizer: torch.optim.Optimizer, settings: ReaderTrainSettings, step: int,
             ) -> float:
    """Set (and return) the learning rate of ``step``: linear warm-up, cosine decay."""
    lr = settings.lr * min(1.0, (step + 1) / 100) * 0.5 * (
        1 + math.cos(math.pi * step / settings.steps))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def update(reader: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
    optimizer.step()


@torch.no_grad()
def accuracy(reader: AnyReader, corpus: Corpus, questions: list[int],
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
