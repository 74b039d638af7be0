"""Does the learned selector still learn on harder synthetic settings than the demo's?

A held-out world — longer videos, shorter events, more distractors than the demo's — built,
ingested and embedded with the real pipeline; a reader trained on it; a selector trained
against the reader with the **default** GRPO settings of the code being measured (so the same
command, run before and after a change of the objective, compares the two defaults); every
selector on the test split, judged by the ideal observer (no model) and by the reader (the
model that gave the rewards, marked as such). Uniform and AKS are the baselines of the same run.

    python benchmarks/heldout_learning.py --out /tmp/heldout [--steps N] [--label before]

Writes ``heldout.json`` (and prints a markdown table) in ``--out``; each stage resumes, so a
second label may reuse the corpus, shards, features and reader of the first (``--reuse``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.embed import EmbedSettings, embed  # noqa: E402
from pipelines.encoder import SYNTH_ENCODER, load_encoder  # noqa: E402
from pipelines.ingest import IngestSettings, ingest  # noqa: E402
from pipelines.learn import (  # noqa: E402
    RunSettings,
    evaluate_stage,
    train_policy_stage,
    train_reader_stage,
)
from pipelines.synth import SynthSettings, generate  # noqa: E402
from refocus.settings import GRPOSettings, ReaderTrainSettings  # noqa: E402
from stores.manifest import read_manifest  # noqa: E402

# harder than the demo's default world (16–32 s, events 0.75–1.25 s, 3 distractors)
HELD_OUT = SynthSettings(videos=160, seed=7, duration=(40.0, 64.0), event_seconds=(0.4, 0.7),
                         distractors=6)
KS = (4, 8, 16)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--label", default="run", help="names the policy folder and the result")
    p.add_argument("--steps", type=int, default=None,
                   help="GRPO steps (default: GRPOSettings' default)")
    args = p.parse_args()
    root: Path = args.out
    root.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(name: str, fn):  # noqa: ANN001, ANN202
        started = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - started, 1)
        print(f"{name}: {seconds[name]} s", flush=True)
        return result

    if not (root / "corpus" / "manifest.jsonl").exists():
        timed("synth", lambda: generate(root / "corpus", HELD_OUT))
    timed("ingest", lambda: ingest(read_manifest(root / "corpus" / "manifest.jsonl"),
                                   root / "shards", IngestSettings()))
    timed("embed", lambda: embed(root / "shards", root / "features", load_encoder(SYNTH_ENCODER),
                                 EmbedSettings(),
                                 questions=read_manifest(root / "shards" / "manifest.jsonl")))
    features = root / "features"
    timed("train-reader", lambda: train_reader_stage(features, None, root / "reader",
                                                     ReaderTrainSettings()))
    grpo = GRPOSettings() if args.steps is None else replace(GRPOSettings(), steps=args.steps)
    policy = root / f"policy-{args.label}"
    timed("train", lambda: train_policy_stage(features, None, f"reader:{root / 'reader'}",
                                              policy, grpo, RunSettings()))
    table = timed("eval", lambda: evaluate_stage(
        features, None, "test", KS, None, [str(policy)], methods=("uniform", "aks"),
        out=root / f"eval-{args.label}", judges=[f"reader:{root / 'reader'}", "ideal"]))
    rows = [r.as_dict() for r in table if r.category == "all"]
    result = {"label": args.label, "world": HELD_OUT.__dict__ | {"workers": None},
              "grpo": grpo.as_dict(), "seconds": seconds, "rows": rows}
    (root / f"heldout-{args.label}.json").write_text(json.dumps(result, indent=2, default=str))
    print("\n| method | judge | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|---|" + "---:|" * len(KS))
    cells: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        cells.setdefault((r["method"], r["judge"]), {})[r["k"]] = r["accuracy"]
    for (method, judge), by_k in cells.items():
        print(f"| {method} | {judge} | "
              + " | ".join(f"{100 * by_k.get(k, float('nan')):.1f}" for k in KS) + " |")


if __name__ == "__main__":
    main()
