"""Offline to online: GRPO on the LMM alone against GRPO on a cheap surrogate that the LMM
refreshes every n-th step (``refocus train --surrogate reader:... --lmm-every n``).

On a small synthetic corpus made here (``pipelines.synth``, ingested and embedded with the
bundled encoder), in one run and with the same GRPO settings and seed:

* **(a) LMM alone** — ``--reward lmm:MODEL``: every step's subsets scored by the LMM (its
  reward cache on);
* **(b) online** — ``--reward lmm:MODEL --surrogate reader:PATH --lmm-every N``: the LMM scores
  steps 0, N, 2N, …, the reader the others (subsets the LMM has scored keep its margin).

Reported for each: LMM subsets scored and LMM forwards (counted by ``RewardModel``, on training
steps and in validation — the best step is judged by the LMM in both), surrogate subsets,
wall time of the training, and the test-split accuracy of the trained policies judged by a
model-free judge, the **ideal observer**: a question is answered right when the chosen frames
hit every one of its evidence spans, and otherwise guessed uniformly (1 / options); its
evidence recall beside it. Ratios (a) / (b) in the same run.

The LMM is a ``--reward`` argument: by default a tiny random LLaVA built here
(``tests/tiny_lmm.build_llava``, nothing downloaded) — its margins carry no knowledge of the
world, so with it only the call counts and times mean something; rerun with the bundled
``lmm:refocus-synth-vlm`` (and a reader distilled on its margins, ``--surrogate``) for
accuracies that do. Run from the repository root::

    python benchmarks/offline_online.py                      # tiny LLaVA, 40 videos
    python benchmarks/offline_online.py --reward lmm:refocus-synth-vlm \\
        --surrogate reader:runs/reader-distilled --steps 200 --json results.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.embed import EmbedSettings, embed  # noqa: E402
from pipelines.encoder import SYNTH_ENCODER, load_encoder  # noqa: E402
from pipelines.ingest import IngestSettings, ingest  # noqa: E402
from pipelines.learn import (  # noqa: E402
    RunSettings,
    load_corpus,
    load_policy,
    train_policy_stage,
    train_reader_stage,
)
from pipelines.synth import SynthSettings, generate  # noqa: E402
from refocus.data import Corpus  # noqa: E402
from refocus.selectors import BASELINES, Learned, Selector  # noqa: E402
from refocus.settings import GRPOSettings, ReaderTrainSettings  # noqa: E402
from stores.manifest import read_manifest  # noqa: E402


def make_store(root: Path, videos: int, seed: int) -> Path:
    """A synthetic corpus, ingested and embedded with the bundled encoder; its feature store."""
    generate(root / "corpus", SynthSettings(videos=videos, seed=seed, workers=2))
    ingest(read_manifest(root / "corpus" / "manifest.jsonl"), root / "shards",
           IngestSettings(workers=2))
    embed(root / "shards", root / "features", load_encoder(SYNTH_ENCODER),
          EmbedSettings(workers=1, index=None),
          questions=read_manifest(root / "shards" / "manifest.jsonl"))
    return root / "features"


def tiny_lmm(root: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_lmm import build_llava

    return f"lmm:{build_llava(root / 'tiny-llava')}"


def ideal_observer(corpus: Corpus, questions: list[int], picks: list[list[int]],
                   ) -> tuple[float, float, int]:
    """(expected accuracy, evidence recall, questions judged) of the ideal observer: right
    when the picks hit every evidence span of the question (a span without a candidate frame
    cannot be hit), else a uniform guess over the options. Questions without evidence are
    left out."""
    scores, recalls = [], []
    for q, chosen in zip(questions, picks, strict=True):
        spans = corpus.evidence_frames(q)
        if not spans:
            continue
        hit = all(set(chosen).intersection(s) for s in spans)
        scores.append(1.0 if hit else 1.0 / len(corpus.options_text[q]))
        recall = corpus.evidence_recall(q, chosen)
        if recall is not None:
            recalls.append(recall)
    return (float(np.mean(scores)) if scores else float("nan"),
            float(np.mean(recalls)) if recalls else float("nan"), len(scores))


def judge(corpus: Corpus, selector: Selector, split: str, ks: tuple[int, ...],
          ) -> dict[str, float]:
    rows = corpus.rows(split)
    out: dict[str, float] = {}
    for k in ks:
        accuracy, recall, n = ideal_observer(corpus, rows, selector.select(corpus, rows, k))
        out[f"ideal@{k}"] = round(accuracy, 4)
        out[f"recall@{k}"] = round(recall, 4)
        out["questions"] = n
    return out


def train(store: Path, out: Path, reward: str, settings: GRPOSettings, run: RunSettings,
          ) -> dict[str, Any]:
    started = time.perf_counter()
    summary = train_policy_stage(store, None, reward, out, settings, run)
    seconds = time.perf_counter() - started
    calls = summary["reward_calls"]
    return {"wall_seconds": round(seconds, 2),
            "lmm_subsets": calls["reward_subsets"], "lmm_forwards": calls["reward_forwards"],
            "lmm_subsets_train": calls["train"]["reward_subsets"],
            "lmm_forwards_train": calls["train"]["reward_forwards"],
            "lmm_subsets_validation": calls["validation"]["reward_subsets"],
            "lmm_seconds_train": calls["train"]["reward_seconds"],
            "surrogate_subsets": calls["train"]["surrogate_subsets"],
            "cache_hits": calls["train"]["cache_hits"],
            "steps_on_lmm": calls["train"]["steps_on_reward"]}


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward", help="the LMM, lmm:MODEL (default: a tiny random LLaVA)")
    p.add_argument("--surrogate", help="reader:PATH (default: a reader trained here)")
    p.add_argument("--lmm-every", type=int, default=4)
    p.add_argument("--videos", type=int, default=40)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--questions-per-step", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--budgets", default="4,8")
    p.add_argument("--reader-steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="refocus-offline-online-"))
    started = time.perf_counter()
    store = make_store(work, args.videos, args.seed) if not (work / "features").exists() \
        else work / "features"
    prepared = time.perf_counter() - started
    reward = args.reward or tiny_lmm(work)
    surrogate = args.surrogate
    if surrogate is None:
        train_reader_stage(store, None, work / "reader",
                           ReaderTrainSettings(steps=args.reader_steps, seed=args.seed),
                           args.device)
        surrogate = f"reader:{work / 'reader'}"
    budgets = tuple(int(k) for k in args.budgets.split(","))
    base = dict(steps=args.steps, questions_per_step=args.questions_per_step, group=args.group,
                budgets=budgets, seed=args.seed)
    run = RunSettings(eval_every=max(1, args.steps // 4), checkpoint_every=args.steps,
                      device=args.device)
    results: dict[str, Any] = {
        "corpus": {"videos": args.videos, "prepare_seconds": round(prepared, 1)},
        "reward": reward, "surrogate": surrogate, "lmm_every": args.lmm_every,
        "settings": {**base, "budgets": list(budgets)},
    }
    runs = {"lmm_alone": (GRPOSettings(**base), run),
            "online": (GRPOSettings(**base, lmm_every=args.lmm_every),
                       replace(run, surrogate=surrogate))}
    corpus = None
    for name, (settings, run_settings) in runs.items():
        out = work / "runs" / name
        results[name] = train(store, out, reward, settings, run_settings)
        corpus = corpus or load_corpus(store, None)
        for chosen in ("policy", "policy-last"):
            policy = Learned(load_policy(out / chosen, corpus.device))
            results[name][f"judged_{chosen.replace('-', '_')}"] = judge(
                corpus, policy, "test", budgets)
    assert corpus is not None
    results["baselines"] = {m: judge(corpus, BASELINES[m](), "test", budgets)
                            for m in ("uniform", "random")}
    a, b = results["lmm_alone"], results["online"]
    results["ratio_alone_over_online"] = {
        key: ratio(a[key], b[key]) for key in ("lmm_subsets", "lmm_forwards",
                                               "lmm_subsets_train", "wall_seconds")}
    print(report(results, budgets))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


def report(results: dict[str, Any], budgets: tuple[int, ...]) -> str:
    a, b = results["lmm_alone"], results["online"]
    lines = [f"reward (LMM): {results['reward']}", f"surrogate: {results['surrogate']} "
             f"(LMM every {results['lmm_every']} steps)", "",
             "| | LMM alone | online | alone / online |", "|---|---:|---:|---:|"]
    for key in ("lmm_subsets", "lmm_forwards", "lmm_subsets_train", "lmm_subsets_validation",
                "surrogate_subsets", "cache_hits", "steps_on_lmm", "wall_seconds"):
        r = ratio(a[key], b[key])
        lines.append(f"| {key} | {a[key]} | {b[key]} | {'' if r is None else r} |")
    lines += ["", "test accuracy judged by the ideal observer (evidence recall), best / last:",
              "", "| policy | " + " | ".join(f"k={k}" for k in budgets) + " |",
              "|---|" + "---:|" * len(budgets)]
    cell = lambda j, k: f"{100 * j[f'ideal@{k}']:.1f} ({100 * j[f'recall@{k}']:.1f})"  # noqa: E731
    for name in ("lmm_alone", "online"):
        for chosen in ("judged_policy", "judged_policy_last"):
            label = f"{name} ({'best' if chosen == 'judged_policy' else 'last'})"
            j = results[name][chosen]
            lines.append(f"| {label} | " + " | ".join(cell(j, k) for k in budgets) + " |")
    for method, j in results["baselines"].items():
        lines.append(f"| {method} | " + " | ".join(cell(j, k) for k in budgets) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
