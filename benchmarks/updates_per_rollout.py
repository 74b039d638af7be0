"""Several updates per rollout: what reusing each reward call N times buys.

GRPO against the reader reference on a small synthetic corpus made here (``pipelines.synth``,
ingested and embedded with the bundled encoder, a reader trained on it), in one run, with the
same settings and seed: ``--updates-per-rollout`` N = 1 (one optimizer step per rollout, the
plain policy gradient) against N = 2 and 4 (PPO's ratio and clipping on the later steps,
``--clip-eps``). Every arm takes the same number of rollouts, so the reward model scores the
same number of subsets (no reward cache: every sampled subset is a call). Reported per arm,
every ``--eval-every`` rollouts: the reward calls so far and the validation accuracy of the
greedy selections, judged by the **ideal observer** (``refocus.evaluation.IdealObserver``: right
when the frames hit every evidence span, else a uniform guess), averaged over the budgets; the
mean clip fraction and approx. KL of the later updates; training time. Run from the repository
root::

    python benchmarks/updates_per_rollout.py                       # 24 videos, ~5 min on 2 cores
    python benchmarks/updates_per_rollout.py --work /tmp/upr --json upr.json  # keeps the corpus
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from offline_online import make_store  # noqa: E402

from pipelines.learn import load_corpus, reference, train_reader_stage  # noqa: E402
from refocus.data import Corpus  # noqa: E402
from refocus.evaluation import IdealObserver  # noqa: E402
from refocus.policy import PolicyConfig  # noqa: E402
from refocus.rewards import RewardModel  # noqa: E402
from refocus.selectors import Learned  # noqa: E402
from refocus.settings import GRPOSettings, ReaderTrainSettings  # noqa: E402
from refocus.trainer import GRPOTrainer  # noqa: E402


def ideal_accuracy(corpus: Corpus, trainer: GRPOTrainer, rows: list[int],
                   budgets: tuple[int, ...]) -> dict[str, float]:
    """The ideal observer's mean score of the policy's greedy selections, per budget."""
    selector, judge = Learned(trainer.policy), IdealObserver()
    out = {}
    for k in budgets:
        scores = [s for s in judge.scores(corpus, rows, selector.select(corpus, rows, k))
                  if s is not None]
        out[f"ideal@{k}"] = round(float(np.mean(scores)), 4)
    trainer.policy.train()
    return out


def run_arm(corpus: Corpus, reader: str, settings: GRPOSettings, hidden: int,
            eval_every: int, split: str) -> dict[str, Any]:
    rows = [q for name in split.split(",") for q in corpus.rows(name)]
    budgets = tuple(sorted(set(settings.budgets)))
    model = RewardModel(reference(reader, corpus))  # no cache: every subset is a call
    trainer = GRPOTrainer(corpus, model, settings,
                          PolicyConfig(dim=corpus.frame_embedding.shape[1], hidden=hidden))
    curve = [{"rollouts": 0, "reward_calls": 0, **ideal_accuracy(corpus, trainer, rows,
                                                                  budgets)}]
    clip, drift, seconds = [], [], 0.0
    while trainer.step_count < settings.steps:
        started = time.perf_counter()
        m = trainer.step()
        seconds += time.perf_counter() - started
        clip.append(m.clip_fraction)
        drift.append(m.approx_kl)
        if trainer.step_count % eval_every == 0 or trainer.step_count == settings.steps:
            curve.append({"rollouts": trainer.step_count,
                          "reward_calls": model.counts.subsets,
                          **ideal_accuracy(corpus, trainer, rows, budgets)})
    for point in curve:
        point["ideal_mean"] = round(float(np.mean([point[f"ideal@{k}"] for k in budgets])), 4)
    return {"curve": curve, "train_seconds": round(seconds, 1),
            "clip_fraction": round(float(np.mean(clip)), 4),
            "approx_kl": round(float(np.mean(drift)), 6),
            "best_ideal_mean": max(p["ideal_mean"] for p in curve),
            "last_ideal_mean": curve[-1]["ideal_mean"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--updates", default="1,2,4", help="the N to compare, e.g. 1,2,4")
    p.add_argument("--steps", type=int, default=40, help="rollouts per arm")
    p.add_argument("--questions-per-step", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--budgets", default="4,8")
    p.add_argument("--lr", type=float, default=1e-3,
                   help="(above refocus's 1e-4 default: the arms are short)")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--split", default="val,test",
                   help="the questions judged (splits, comma-separated; never trained on)")
    p.add_argument("--reader-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="working folder, reused when it holds a corpus")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)

    work = args.work or Path(tempfile.mkdtemp(prefix="refocus-updates-per-rollout-"))
    started = time.perf_counter()
    store = work / "features" if (work / "features").exists() else make_store(
        work, args.videos, args.seed)
    if not (work / "reader" / "config.json").exists():
        train_reader_stage(store, None, work / "reader",
                           ReaderTrainSettings(steps=args.reader_steps, seed=args.seed))
    prepared = time.perf_counter() - started
    corpus = load_corpus(store, None)
    budgets = tuple(int(k) for k in args.budgets.split(","))
    results: dict[str, Any] = {
        "corpus": {"store": str(store), "questions": {s: len(corpus.rows(s)) for s in
                                                      ("train", "val", "test")},
                   "prepare_seconds": round(prepared, 1)},
        "settings": {"steps": args.steps, "questions_per_step": args.questions_per_step,
                     "group": args.group, "budgets": list(budgets), "lr": args.lr,
                     "hidden": args.hidden, "seed": args.seed, "split": args.split},
        "arms": {}}
    for n in (int(x) for x in args.updates.split(",")):
        settings = GRPOSettings(steps=args.steps, questions_per_step=args.questions_per_step,
                                group=args.group, budgets=budgets, lr=args.lr,
                                warmup=max(1, args.steps // 20), seed=args.seed,
                                updates_per_rollout=n)
        results["arms"][f"N={n}"] = run_arm(corpus, f"reader:{work / 'reader'}", settings,
                                            args.hidden, args.eval_every, args.split)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def report(results: dict[str, Any]) -> str:
    arms = results["arms"]
    names = list(arms)
    lines = [f"{results['settings']} on {results['corpus']['questions']}", "",
             f"{results['settings']['split']} accuracy (ideal observer, mean over budgets) "
             "by reward calls:", "",
             "| rollouts | reward calls | " + " | ".join(names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    first = arms[names[0]]["curve"]
    for i, point in enumerate(first):
        cells = [f"{100 * arms[n]['curve'][i]['ideal_mean']:.1f}" for n in names]
        lines.append(f"| {point['rollouts']} | {point['reward_calls']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in ("best_ideal_mean", "last_ideal_mean", "clip_fraction", "approx_kl",
                "train_seconds"):
        lines.append(f"| {key} | " + " | ".join(str(arms[n][key]) for n in names) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
