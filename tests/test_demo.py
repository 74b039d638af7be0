"""refocus demo end to end at a small size: every stage runs, the report says what the
evaluation measured, and a re-run resumes instead of redoing the work."""

from __future__ import annotations

import csv
import json

from pipelines.demo import DemoSettings, run_demo
from pipelines.synth import SynthSettings
from refocus.settings import GRPOSettings, ReaderTrainSettings

SMALL = DemoSettings(synth=SynthSettings(videos=16, workers=2),
                     reader=ReaderTrainSettings(steps=60),
                     grpo=GRPOSettings(steps=6, questions_per_step=8, group=4), timelines=2)


def test_demo_writes_a_report_that_matches_the_evaluation(tmp_path):
    said: list[str] = []
    summary = run_demo(tmp_path, SMALL, say=said.append)
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
        f"[{i}/6] {name} …" for i, name in
        enumerate(["synth", "ingest", "embed", "train-reader", "train", "eval"], 1)]
    # a re-run resumes: nothing is generated, ingested, embedded or trained again
    weights = [tmp_path / "reader" / "weights.safetensors",
               tmp_path / "policy" / "policy" / "weights.safetensors"]
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = run_demo(tmp_path, SMALL, say=lambda _: None)
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    assert again["seconds"]["synth"] == 0.0
    assert json.loads((tmp_path / "shards" / "summary.json").read_text())["shards_written"] == 0
    assert json.loads((tmp_path / "features" / "summary.json").read_text())["shards_written"] == 0
    assert again["accuracy_at_k"] == summary["accuracy_at_k"]
