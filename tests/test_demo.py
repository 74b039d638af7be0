"""refocus demo end to end at a small size: every stage runs, the report's headline is
cross-judged (no number in it comes from the model that gave that selector its rewards) and
agrees with the evaluation, the online run asks the VLM less, and a re-run resumes instead of
redoing the work."""

from __future__ import annotations

import csv
import json
import re

import pytest

from flows.cli import main
from pipelines.demo import POLICIES, QUICK, STAGES, run_demo
from stores.selections import read_selections

VLM = "lmm:refocus-synth-vlm"


def _eval_rows(root) -> dict[tuple[str, str], float]:
    with open(root / "eval" / "eval.csv") as f:
        return {(r["method"], r["judge"]): float(r["accuracy"]) for r in csv.DictReader(f)
                if r["category"] == "all" and r["k"] == "4"}


@pytest.mark.slow
def test_demo_writes_a_cross_judged_report_that_matches_the_evaluation(tmp_path):
    said: list[str] = []
    summary = run_demo(tmp_path, QUICK, say=said.append)
    report = tmp_path / "report"
    for name in ("README.md", "training.png", "training-vlm.png", "accuracy.png",
                 "timelines.png", "summary.json"):
        assert (report / name).stat().st_size > 0, name
    assert [s for s in said if s.startswith("[")] == [
        f"[{i}/{len(STAGES)}] {name} …" for i, name in enumerate(STAGES, 1)]
    acc = _eval_rows(tmp_path)
    methods = {"uniform", "random", "clip-top-k", "bolt", "aks",
               *(f"refocus:{p}" for p in POLICIES)}
    assert {m for m, _ in acc} == methods
    assert {j for _, j in acc} == {"reader", VLM, "ideal"}
    # every cell of the summary is the evaluation's, and the self-judged ones are exactly the
    # (selector, its own reward model) pairs
    for method, row in summary["cross_judged"].items():
        for judge, value in row["judged"].items():
            assert abs(value - acc[method, judge]) < 1e-9
    rewards = {m: r["rewards_by"] for m, r in summary["cross_judged"].items()}
    assert rewards["refocus:policy-reader"] == "reader"
    assert rewards["refocus:policy-vlm"] == rewards["refocus:policy-online"] == VLM
    for method, row in summary["cross_judged"].items():
        assert row["self_judged"] == ([rewards[method]] if rewards[method] else [])
    # the headline: each selector judged by the other model, and by the ideal observer
    text = (report / "README.md").read_text()
    head = text.split("| method |")[0]
    expected = [acc["refocus:policy-reader", VLM], acc["refocus:policy-vlm", "reader"],
                acc["refocus:policy-reader", "ideal"], acc["refocus:policy-vlm", "ideal"]]
    bold = [float(v) / 100 for v in re.findall(r"\*\*([0-9.]+) %\*\*", head)]
    assert bold == [round(100 * v, 1) / 100 for v in expected]
    # offline to online: the online run asked the VLM for fewer subsets (its own counts)
    o2o = summary["offline_online"]
    for name in ("policy-vlm", "policy-online"):
        calls = json.loads((tmp_path / name / "summary.json").read_text())["reward_calls"]
        assert o2o[name]["vlm_subsets"] == calls["reward_subsets"]
    assert o2o["policy-online"]["vlm_subsets"] < o2o["policy-vlm"]["vlm_subsets"]
    assert "## Offline to online" in text and "## Scoring a fresh corpus" in text
    # the distilled reader came from the VLM's margins
    distilled = json.loads((tmp_path / "distilled" / "config.json").read_text())
    assert VLM.removeprefix("lmm:") in json.dumps(distilled)
    # the fresh set was scored: selections for its questions, recall measured on them
    fresh = summary["fresh"]
    assert len(read_selections(tmp_path / "scored")) == fresh["questions"] > 0
    assert 0 <= fresh["evidence_recall"]["refocus"] <= 1
    # a re-run resumes: nothing is generated, ingested, embedded or trained again
    weights = [tmp_path / "reader" / "weights.safetensors",
               tmp_path / "distilled" / "weights.safetensors",
               *(tmp_path / p / "weights.safetensors" for p in POLICIES)]
    stamps = [w.stat().st_mtime_ns for w in weights]
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0  # the CLI's --quick = QUICK
    again = json.loads((report / "summary.json").read_text())
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    assert again["seconds"]["synth"] == 0.0
    assert json.loads((tmp_path / "shards" / "summary.json").read_text())["shards_written"] == 0
    assert json.loads((tmp_path / "features" / "summary.json").read_text())["shards_written"] == 0
    assert again["cross_judged"] == summary["cross_judged"]
