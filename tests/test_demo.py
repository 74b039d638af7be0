"""refocus demo end to end at a small size: every stage runs, the report says what the
evaluation measured, and a re-run resumes instead of redoing the work."""

from __future__ import annotations

import csv
import json

from flows.cli import main
from pipelines.demo import QUICK, run_demo
from stores.selections import read_selections


def test_demo_writes_a_report_that_matches_the_evaluation(tmp_path):
    said: list[str] = []
    summary = run_demo(tmp_path, QUICK, say=said.append)
    report = tmp_path / "report"
    for name in ("README.md", "training.png", "accuracy.png", "timelines.png", "summary.json"):
        assert (report / name).stat().st_size > 0, name
    with open(tmp_path / "eval" / "eval.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] == "all" and r["k"] == "4"]
    assert {r["method"] for r in rows} == {"uniform", "random", "clip-top-k", "bolt", "aks",
                                          "refocus"}
    for r in rows:
        assert abs(summary["accuracy_at_k"][r["method"]] - float(r["accuracy"])) < 1e-4
    text = (report / "README.md").read_text()
    refocus = next(r for r in rows if r["method"] == "refocus")
    assert f"**{100 * float(refocus['accuracy']):.1f} %**" in text
    assert "![timelines](timelines.png)" in text
    assert [s for s in said if s.startswith("[")] == [
        f"[{i}/7] {name} …" for i, name in
        enumerate(["synth", "ingest", "embed", "train-reader", "train", "eval", "score"], 1)]
    # the fresh set was scored: selections for its questions, recall measured on them
    fresh = summary["fresh"]
    assert len(read_selections(tmp_path / "scored")) == fresh["questions"] > 0
    assert 0 <= fresh["evidence_recall"]["refocus"] <= 1
    assert "## Scoring a fresh corpus" in text
    # a re-run resumes: nothing is generated, ingested, embedded or trained again
    weights = [tmp_path / "reader" / "weights.safetensors",
               tmp_path / "policy" / "policy" / "weights.safetensors"]
    stamps = [w.stat().st_mtime_ns for w in weights]
    assert main(["demo", "--quick", "--out", str(tmp_path)]) == 0  # the CLI's --quick = QUICK
    again = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    assert again["seconds"]["synth"] == 0.0
    assert json.loads((tmp_path / "shards" / "summary.json").read_text())["shards_written"] == 0
    assert json.loads((tmp_path / "features" / "summary.json").read_text())["shards_written"] == 0
    assert again["accuracy_at_k"] == summary["accuracy_at_k"]
