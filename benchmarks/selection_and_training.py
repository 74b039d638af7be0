"""Selection latency and training throughput of the learned selector, on CPU.

1. **Latency** — one question, ``--candidates`` frames (512), ``--k`` picks (32), greedy:
   refocus (decoder with cached keys/values) against, in the same run, the same policy
   decoding naively (the whole prefix again at every step) and against CLIP top-k (a single
   similarity ranking, the floor). Median of ``--repeats`` runs after warm-up. The published
   ReFoCUS selector takes about 9 s per video on a GPU.
2. **Training throughput** — GRPO steps (``--questions`` × ``--group`` sampled subsets per
   step, reward by the reader included) per second, against the same steps with the reward
   computed one subset at a time (no batching) as the baseline.

Random weights and random features of the shipped encoder's size (64) and of ViT-B's (512):
speed does not depend on their values. Run from the repository root::

    python benchmarks/selection_and_training.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refocus.data import Corpus  # noqa: E402
from refocus.policy import FrameSelector, PolicyConfig  # noqa: E402
from refocus.reader import Reader, ReaderConfig  # noqa: E402
from refocus.rewards import ReaderReference, RewardModel  # noqa: E402
from refocus.settings import GRPOSettings  # noqa: E402
from refocus.trainer import GRPOTrainer  # noqa: E402
from stores.features import Features  # noqa: E402
from stores.manifest import Question  # noqa: E402


def naive_greedy(policy: FrameSelector, ctx, k: int) -> torch.Tensor:  # noqa: ANN001
    """Greedy decoding that re-runs the decoder over the whole prefix at every step."""
    picks = torch.zeros(ctx.valid.shape[0], 0, dtype=torch.long)
    taken = ~ctx.valid
    for _ in range(k):
        query = policy._queries(ctx, picks)[:, -1:]
        logits = policy._logits(ctx, query, 1.0)[:, 0].masked_fill(taken, -math.inf)
        choice = logits.argmax(dim=-1)
        picks = torch.cat([picks, choice[:, None]], dim=1)
        taken = taken.scatter(1, choice[:, None], True)
    return picks


def median_ms(fn, repeats: int) -> float:  # noqa: ANN001
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


@torch.inference_mode()
def latency(dim: int, hidden: int, candidates: int, k: int, repeats: int) -> dict[str, float]:
    torch.manual_seed(0)
    policy = FrameSelector(PolicyConfig(dim=dim, hidden=hidden)).eval()
    q, qt = torch.randn(1, dim), torch.randn(1, dim)
    frames = torch.randn(1, candidates, dim)
    times = torch.linspace(0, 1, candidates)[None]
    valid = torch.ones(1, candidates, dtype=torch.bool)

    def cached() -> None:
        policy.sample(policy.encode(q, qt, frames, times, valid), k, greedy=True,
                      with_entropy=False)

    def naive() -> None:
        naive_greedy(policy, policy.encode(q, qt, frames, times, valid), k)

    def top_k() -> None:
        scores = F.normalize(frames[0], dim=-1) @ F.normalize(qt[0], dim=-1)
        scores.topk(k).indices.sort()

    ctx = policy.encode(q, qt, frames, times, valid)
    same = torch.equal(naive_greedy(policy, ctx, k),
                       policy.sample(ctx, k, greedy=True, with_entropy=False).picks)
    return {"refocus_ms": median_ms(cached, repeats),
            "naive_decoding_ms": median_ms(naive, repeats),
            "clip_top_k_ms": median_ms(top_k, repeats), "same_picks": same}


def random_corpus(videos: int, frames: int, dim: int) -> Corpus:
    rng = np.random.default_rng(0)
    n = videos * frames

    def unit(*shape: int) -> np.ndarray:
        x = rng.standard_normal(shape)
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)

    answers = rng.integers(0, 4, videos).astype(np.int16)
    features = Features(
        frame_embedding=unit(n, dim), frame_time=np.tile(np.arange(frames) * 0.25, videos),
        frame_video=np.repeat(np.arange(videos), frames).astype(np.int32),
        video_ids=[f"v{i}" for i in range(videos)], offsets=np.arange(videos + 1) * frames,
        duration=np.full(videos, frames * 0.25), qids=[f"q{i}" for i in range(videos)],
        question_video=np.arange(videos, dtype=np.int32),
        answer=answers,
        question_embedding=unit(videos, dim), question_text_embedding=unit(videos, dim),
        option_offsets=np.arange(videos + 1) * 4, option_embedding=unit(4 * videos, dim))
    questions = [Question(f"q{i}", f"v{i}", "?", ("a", "b", "c", "d"), int(answers[i]), (),
                          "train", "x") for i in range(videos)]
    return Corpus(features, questions)


class OneAtATime:
    """The same reader, called for one subset at a time (no batching)."""

    def __init__(self, reference: ReaderReference) -> None:
        self.reference, self.id = reference, reference.id

    def logits(self, corpus, questions, picks, valid):  # noqa: ANN001, ANN201
        return torch.cat([self.reference.logits(corpus, questions[i:i + 1], picks[i:i + 1],
                                                valid[i:i + 1]) for i in range(len(questions))])


def throughput(dim: int, hidden: int, k: int, questions: int, group: int, steps: int,
               ) -> dict[str, float]:
    corpus = random_corpus(videos=200, frames=128, dim=dim)
    torch.manual_seed(0)
    reader = Reader(ReaderConfig(dim=dim, max_options=4)).eval()
    reference = ReaderReference(reader, "reader:bench")
    settings = GRPOSettings(steps=steps, questions_per_step=questions, group=group, budgets=(k,))
    out = {}
    for name, ref in (("batched", reference), ("one_at_a_time", OneAtATime(reference))):
        trainer = GRPOTrainer(corpus, RewardModel(ref), settings,
                              PolicyConfig(dim=dim, hidden=hidden))
        trainer.step()  # warm-up
        started = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        out[f"{name}_samples_per_s"] = steps * questions * group / (time.perf_counter() - started)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=512)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--train-k", type=int, default=4)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results: dict = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                     "settings": vars(args) | {"out": None}}
    print(f"CPU, {torch.get_num_threads()} torch threads; policy hidden {args.hidden}; "
          f"latency: 1 question, {args.candidates} candidates, k={args.k}, median of "
          f"{args.repeats}; training: {args.questions} questions × {args.group} samples per "
          f"step, k={args.train_k}\n")
    print("| embedding dim | refocus (ms) | naive decoding (ms) | speed-up | CLIP top-k (ms) | "
          "train samples/s | one at a time | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dim in (64, 512):
        lat = latency(dim, args.hidden, args.candidates, args.k, args.repeats)
        thr = throughput(dim, args.hidden, args.train_k, args.questions, args.group, args.steps)
        results[f"dim{dim}"] = lat | thr
        print(f"| {dim} | {lat['refocus_ms']:.1f} | {lat['naive_decoding_ms']:.1f} | "
              f"**{lat['naive_decoding_ms'] / lat['refocus_ms']:.1f}×** | "
              f"{lat['clip_top_k_ms']:.2f} | {thr['batched_samples_per_s']:.0f} | "
              f"{thr['one_at_a_time_samples_per_s']:.0f} | **"
              f"{thr['batched_samples_per_s'] / thr['one_at_a_time_samples_per_s']:.1f}×** |")
        assert lat["same_picks"], "cached and naive decoding must pick the same frames"
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
