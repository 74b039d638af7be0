"""``refocus demo``: the whole method on the embedded default, start to finish.

synthetic grounded corpus → ingest → embed (bundled encoder) + index → train the reader →
a selector trained against the reader → the bundled video-LLM (``refocus-synth-vlm``): its
per-frame vision features once, its margins on random subsets (offline), a reader distilled
on them → a selector trained against the VLM alone and one trained online (the distilled
reader on most steps, the VLM every few) → every selector and baseline on the test split,
judged by the reader, by the VLM and by the ideal observer (cross-judged: no headline
number comes from the model that gave the rewards) → a fresh set scored with
``refocus score`` → a report folder: README.md, PNG plots (training curves, accuracy per
judge, timelines of chosen frames). Every stage resumes, so an interrupted demo re-run
continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import plots
from pipelines.corpus import load_corpus
from pipelines.distill import distill_reader_stage
from pipelines.embed import EmbedSettings, embed
from pipelines.encoder import SYNTH_ENCODER, load_encoder
from pipelines.ingest import IngestSettings, ingest
from pipelines.learn import (
    RunSettings,
    evaluate_stage,
    train_policy_stage,
    train_reader_stage,
)
from pipelines.margins import ReferenceOptions
from pipelines.policies import load_policy
from pipelines.reference import precompute_reference
from pipelines.score import ScoreSettings, score
from pipelines.synth import SynthSettings, generate
from pipelines.vlm import VLM_NAME, load_lmm
from refocus.evaluation import Row
from refocus.selectors import Learned, Uniform, uniform_indices
from refocus.settings import GRPOSettings, MarginSettings, ReaderTrainSettings
from stores.manifest import read_manifest
from stores.owned import claim
from stores.selections import read_selections
from stores.shards import ShardSet

DEMO_KIND, REPORT_KIND = "demo", "demo-report"  # markers (stores/owned.py)
VLM = f"lmm:{VLM_NAME}"
IDEAL = "ideal"
FOLDERS = ("corpus", "shards", "features", "reader", "policy-reader", "vlm-features",
           "distilled", "policy-vlm", "policy-online", "eval", "fresh", "scored", "report")
POLICIES = ("policy-reader", "policy-vlm", "policy-online")
FRESH_POLICY = "policy-reader"  # the selector refocus score uses on the fresh set


@dataclass(frozen=True)
class DemoSettings:
    synth: SynthSettings = field(default_factory=SynthSettings)
    reader: ReaderTrainSettings = field(default_factory=ReaderTrainSettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)  # the selector on reader rewards
    # the selectors on the VLM's rewards (alone, and online with the distilled reader)
    vlm_grpo: GRPOSettings = field(default_factory=lambda: GRPOSettings(
        steps=48, questions_per_step=8, budgets=(4, 8)))
    lmm_every: int = 4  # online: the VLM scores one step in 4, the distilled reader the rest
    # the VLM's runs: subsets per forward, and validation (the VLM judging) at the end only
    vlm_run: RunSettings = field(default_factory=lambda: RunSettings(
        eval_every=48, reference_batch=32))
    margins: MarginSettings = field(default_factory=lambda: MarginSettings(
        subsets_per_question=4, budgets=(4, 8)))
    distill: ReaderTrainSettings = field(default_factory=lambda: ReaderTrainSettings(
        steps=800))
    ks: tuple[int, ...] = (4, 8)  # every judge scores every budget: the VLM's cost grows with k
    timelines: int = 4  # test videos drawn in the timeline plot
    fresh_videos: int = 24  # a fresh set (another seed) scored by refocus score at the end


# A small setting for a quick look and for the test suite (about two minutes).
QUICK = DemoSettings(synth=SynthSettings(videos=16, workers=2),
                     reader=ReaderTrainSettings(steps=60),
                     grpo=GRPOSettings(steps=6, questions_per_step=8, group=4),
                     vlm_grpo=GRPOSettings(steps=4, questions_per_step=4, group=4,
                                           budgets=(4,)),
                     lmm_every=2, vlm_run=RunSettings(eval_every=4, reference_batch=32),
                     margins=MarginSettings(subsets_per_question=4, budgets=(4,)),
                     distill=ReaderTrainSettings(steps=40), ks=(4, 8), timelines=2,
                     fresh_videos=4)


def run_demo(out: str | os.PathLike[str], settings: DemoSettings = DemoSettings(),
             say: Callable[[str], None] = print) -> dict[str, Any]:
    # Refused before any work when ``out`` is a user's folder or another kind of output;
    # each stage then claims its own sub-folder (synth, ingest, features, …).
    owned = claim(out, DEMO_KIND)
    with owned.lock():
        return _run_demo(Path(out), settings, say)


STAGES = ("synth", "ingest", "embed", "train-reader", "train (reader)", "vlm-features",
          "distill", "train (vlm)", "train (online)", "eval", "score")


class Stages:
    """Runs the demo's stages in order, saying and timing each."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say, self.seconds = say, {}

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        self.say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name} …")
        started = time.perf_counter()
        result = fn()
        self.seconds[name] = round(time.perf_counter() - started, 1)
        self.say(f"      {name} done in {self.seconds[name]} s")
        return result


def _run_demo(root: Path, s: DemoSettings, say: Callable[[str], None]) -> dict[str, Any]:
    paths = {name: root / name for name in FOLDERS}
    features = paths["features"]
    stage = Stages(say)
    manifest_path = paths["corpus"] / "manifest.jsonl"
    if not manifest_path.exists():
        stage("synth", lambda: generate(paths["corpus"], s.synth))
    else:
        stage.seconds["synth"] = 0.0
    stage("ingest", lambda: ingest(read_manifest(manifest_path), paths["shards"],
                                   IngestSettings()))
    stage("embed", lambda: embed(paths["shards"], features, load_encoder(SYNTH_ENCODER),
                                 EmbedSettings(),
                                 questions=read_manifest(paths["shards"] / "manifest.jsonl")))
    reader = stage("train-reader", lambda: train_reader_stage(features, None, paths["reader"],
                                                              s.reader))
    reader_spec = f"reader:{paths['reader']}"
    policies = {"policy-reader": stage("train (reader)", lambda: train_policy_stage(
        features, None, reader_spec, paths["policy-reader"], s.grpo, RunSettings()))}
    stage("vlm-features", lambda: precompute_reference(paths["shards"], paths["vlm-features"],
                                                       load_lmm(VLM_NAME)))
    on_vlm = replace(s.vlm_run, reference_features=str(paths["vlm-features"]))
    distilled = stage("distill", lambda: distill_reader_stage(
        features, None, paths["distilled"], VLM, s.distill, margin_settings=s.margins,
        options=ReferenceOptions(reference_features=str(paths["vlm-features"]),
                                 reference_batch=s.vlm_run.reference_batch)))
    policies["policy-vlm"] = stage("train (vlm)", lambda: train_policy_stage(
        features, None, VLM, paths["policy-vlm"], s.vlm_grpo, on_vlm))
    policies["policy-online"] = stage("train (online)", lambda: train_policy_stage(
        features, None, VLM, paths["policy-online"], replace(s.vlm_grpo, lmm_every=s.lmm_every),
        replace(on_vlm, surrogate=f"reader:{paths['distilled']}")))
    table = stage("eval", lambda: evaluate_stage(
        features, None, "test", s.ks, None, [str(paths[p]) for p in POLICIES],
        out=paths["eval"], judges=[reader_spec, VLM, IDEAL],
        reference_features=str(paths["vlm-features"]), reference_batch=s.vlm_run.reference_batch))
    fresh = stage("score", lambda: score_fresh(paths, s))
    return write_report(paths, s, stage.seconds, reader, distilled, policies, table, fresh)


def score_fresh(paths: dict[str, Path], settings: DemoSettings) -> dict[str, Any]:
    """Generate videos the selector never saw (another seed), score them with refocus score,
    and measure how often the chosen frames hit the evidence, against uniform frames."""
    manifest_path = paths["fresh"] / "manifest.jsonl"
    if not manifest_path.exists():
        generate(paths["fresh"], replace(settings.synth, videos=settings.fresh_videos,
                                         seed=settings.synth.seed + 1000))
    manifest = read_manifest(manifest_path)
    k = settings.ks[0]
    summary = score(manifest, paths[FRESH_POLICY], paths["scored"], ScoreSettings(k=k))
    spans = {q.qid: q.evidence for q in manifest.questions if q.evidence}
    hit = {"refocus": [], "uniform": []}
    shards = ShardSet(paths["scored"] / "shards")
    candidate_times: dict[str, list[float]] = {}  # per video, read once
    for row in read_selections(paths["scored"]):
        if row.qid not in spans:
            continue
        if row.video_id not in candidate_times:
            candidate_times[row.video_id] = shards.read(row.video_id).meta["timestamps"]
        times = candidate_times[row.video_id]
        uniform = [times[i] for i in uniform_indices(len(times), k)]
        for method, chosen in (("refocus", row.timestamps), ("uniform", uniform)):
            hit[method].append(np.mean([any(a - 1e-6 <= t <= b + 1e-6 for t in chosen)
                                        for a, b in spans[row.qid]]))
    return {"videos": summary["videos"], "questions": summary["questions"], "k": k,
            "selections": summary["selections"]["jsonl"],
            "evidence_recall": {m: round(float(np.mean(v)), 4) if v else None
                                for m, v in hit.items()}}


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _timelines(paths: dict[str, Path], settings: DemoSettings, image: Path) -> None:
    corpus = load_corpus(paths["features"], None)
    learned = {f"refocus ({name.removeprefix('policy-')} rewards)":
               Learned(load_policy(paths[name])) for name in ("policy-reader", "policy-vlm")}
    seen, rows = set(), []
    k = settings.ks[0]
    for q in corpus.rows("test"):
        video = int(corpus.video[q])
        if video in seen or not corpus.evidence[q]:
            continue
        seen.add(video)
        times = corpus.frame_time[corpus.offsets[video]:corpus.offsets[video + 1]].tolist()
        picks = {"uniform": Uniform().select(corpus, [q], k)[0],
                 **{m: sel.select(corpus, [q], k)[0] for m, sel in learned.items()}}
        rows.append({"title": f"{corpus.video_ids[video]}: {corpus.text[q]} (k={k})",
                     "duration": float(corpus.duration[video]), "evidence": corpus.evidence[q],
                     "picks": {m: [times[i] for i in p] for m, p in picks.items()}})
        if len(rows) == settings.timelines:
            break
    plots.selection_timelines(rows, image)


def method_name(policy: str) -> str:
    """The evaluation's name of a demo policy folder (``refocus eval`` names several
    policies by their folder)."""
    return f"refocus:{policy}"


JUDGE_TITLES = {"reader": "reader", f"lmm:{VLM_NAME}": "VLM", IDEAL: "ideal observer"}


def cross_judged(table: list[Row], k: int) -> dict[str, dict[str, Any]]:
    """Per method at budget ``k`` (all questions): which model gave its rewards, its accuracy
    under every judge (with whether that judge gave the rewards) and its evidence recall."""
    out: dict[str, dict[str, Any]] = {}
    for r in table:
        if r.category != "all" or r.k != k:
            continue
        row = out.setdefault(r.method, {"rewards_by": r.rewards_by, "judged": {},
                                        "self_judged": [], "evidence_recall": r.evidence_recall,
                                        "chance": {}, "interval": {}})
        row["judged"][r.judge] = r.accuracy
        row["interval"][r.judge] = [r.ci_low, r.ci_high]  # the 95 % bootstrap interval
        row["chance"][r.judge] = r.chance
        if r.self_judged:
            row["self_judged"].append(r.judge)
    return out


def cross_table(rows: dict[str, dict[str, Any]], judges: list[str]) -> list[str]:
    """The report's headline table: one row per method, one column per judge; a cell judged by
    the model that gave that selector its rewards carries a star; [a, b] is its 95 % bootstrap
    interval over the test questions."""
    head = ["method", "rewards by", *(f"judged by {JUDGE_TITLES.get(j, j)}" for j in judges),
            "evidence recall"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(judges) + 1)]
    for method, row in rows.items():
        cells = [method, row["rewards_by"] or "–"]
        for j in judges:
            value = row["judged"].get(j)
            star = " *" if j in row["self_judged"] else ""
            low, high = row.get("interval", {}).get(j) or (None, None)
            ci = f" [{100 * low:.1f}, {100 * high:.1f}]" if low is not None and high is not None \
                else ""
            cells.append("–" if value is None else f"{100 * value:.1f}{ci}{star}")
        cells.append(_percent(row["evidence_recall"]))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def offline_online(policies: dict[str, dict[str, Any]], rows: dict[str, dict[str, Any]],
                   seconds: dict[str, float]) -> dict[str, Any]:
    """What training against the VLM alone and online (distilled reader + the VLM every few
    steps) cost in VLM calls and time, and what each selector scored."""
    out: dict[str, Any] = {}
    for name, stage in (("policy-vlm", "train (vlm)"), ("policy-online", "train (online)")):
        calls = policies[name].get("reward_calls", {})
        out[name] = {"vlm_subsets": calls.get("reward_subsets"),
                     "vlm_forwards": calls.get("reward_forwards"),
                     "vlm_subsets_training": calls.get("train", {}).get("reward_subsets"),
                     "seconds": seconds.get(stage),  # this call's (a resumed run: less)
                     "judged": rows.get(method_name(name), {}).get("judged", {})}
    alone, online = out["policy-vlm"]["vlm_subsets"], out["policy-online"]["vlm_subsets"]
    out["saved"] = round(1 - online / alone, 4) if alone and online is not None else None
    return out


def write_report(paths: dict[str, Path], settings: DemoSettings, seconds: dict[str, float],
                 reader: dict[str, Any], distilled: dict[str, Any],
                 policies: dict[str, dict[str, Any]], table: list[Row],
                 fresh: dict[str, Any]) -> dict[str, Any]:
    report = paths["report"]
    claim(report, REPORT_KIND)
    for name, source in (("training.png", paths["policy-reader"] / "training.png"),
                         ("training-vlm.png", paths["policy-vlm"] / "training.png"),
                         ("accuracy.png", paths["eval"] / "eval.png")):
        if source.exists():
            (report / name).write_bytes(source.read_bytes())
    _timelines(paths, settings, report / "timelines.png")
    k0 = settings.ks[0]
    rows = cross_judged(table, k0)
    judges = [j for j in JUDGE_TITLES if any(j in r["judged"] for r in rows.values())]
    o2o = offline_online(policies, rows, seconds)
    lines = [*_report_head(settings, rows, k0), *cross_table(rows, judges), "",
             "A star marks a cell judged by the model that gave that selector its rewards; the "
             "headline above uses none of them. The ideal observer answers right exactly when "
             "the frames hit every evidence span of the question and guesses uniformly "
             "otherwise (no model at all). [a, b]: the 95 % bootstrap interval over the "
             "test questions. Every budget, per question kind: "
             "[eval.md](../eval/eval.md).", "",
             "![accuracy per judge](accuracy.png)", "",
             *_report_o2o(o2o, settings), "",
             *_report_training(reader, distilled, policies), "",
             "## Where the frames go", "",
             "Evidence spans shaded; ticks are the chosen frames.", "",
             "![timelines](timelines.png)", "",
             *_report_fresh(fresh), "",
             "## Time per stage (s)", "",
             "| " + " | ".join(seconds) + " |", "|" + "---:|" * len(seconds),
             "| " + " | ".join(str(v) for v in seconds.values()) + " |", "",
             f"Folders: {', '.join(f'`{p}`' for p in paths.values())}."]
    (report / "README.md").write_text("\n".join(lines) + "\n")
    summary = {"report": str(report), "seconds": seconds, "k": k0,
               "cross_judged": rows, "offline_online": o2o, "fresh": fresh}
    (report / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _judged(rows: dict[str, dict[str, Any]], method: str, judge: str) -> str:
    value = rows.get(method, {}).get("judged", {}).get(judge)
    return "–" if value is None else f"{100 * value:.1f} %"


def _report_head(settings: DemoSettings, rows: dict[str, dict[str, Any]], k: int) -> list[str]:
    reader, vlm = method_name("policy-reader"), method_name("policy-vlm")
    return [
        "# refocus demo", "",
        "The whole method on the embedded default: a synthetic grounded video-QA corpus "
        f"({settings.synth.videos} videos), the bundled encoder, two reward models — the "
        "reader (a small network trained on the answers) and the bundled video-LLM "
        f"`{VLM_NAME}` (a LLaVA-family model: the encoder as its vision tower) — GRPO-trained "
        "selectors against each, and the baselines, on the test split that training never "
        "saw.", "",
        f"## Result at k = {k} (cross-judged)", "",
        f"- Trained against the reader, judged by the VLM: **{_judged(rows, reader, VLM)}** "
        f"(uniform {_judged(rows, 'uniform', VLM)}).",
        f"- Trained against the VLM, judged by the reader: **{_judged(rows, vlm, 'reader')}** "
        f"(uniform {_judged(rows, 'uniform', 'reader')}).",
        f"- Judged by the ideal observer: reader-trained **{_judged(rows, reader, IDEAL)}**, "
        f"VLM-trained **{_judged(rows, vlm, IDEAL)}**, uniform "
        f"{_judged(rows, 'uniform', IDEAL)}.", ""]


def _report_o2o(o2o: dict[str, Any], settings: DemoSettings) -> list[str]:
    alone, online = o2o["policy-vlm"], o2o["policy-online"]
    saved = "–" if o2o["saved"] is None else f"{100 * o2o['saved']:.0f} %"

    def cells(row: dict[str, Any]) -> str:
        judged = row["judged"]
        return (f"{row['vlm_subsets']} | {row['vlm_forwards']} | {row['seconds']} | "
                f"{_percent(judged.get(IDEAL))} | {_percent(judged.get('reader'))} |")

    return ["## Offline to online", "",
            f"The VLM scored random subsets of every training question once, offline "
            f"({settings.margins.subsets_per_question} per question); a reader distilled on "
            f"those margins stands in for it on most GRPO steps, and the VLM scores one step in "
            f"{settings.lmm_every} (and validation), filling its reward cache. "
            f"VLM calls saved: **{saved}**.", "",
            "| selector | VLM subsets scored | VLM forwards | training s | ideal observer | "
            "judged by reader |", "|---|---:|---:|---:|---:|---:|",
            f"| VLM alone | {cells(alone)}", f"| online (distilled + VLM) | {cells(online)}"]


def _report_training(reader: dict[str, Any], distilled: dict[str, Any],
                     policies: dict[str, dict[str, Any]]) -> list[str]:
    error = distilled.get("margin_error", {})
    before, after = error.get("before", {}), error.get("after", {})
    best = policies["policy-reader"]["best"]
    return ["## Training", "",
            f"Reader (validation): all frames {100 * reader['all_frames']:.1f} %, evidence "
            f"only {100 * reader['evidence']:.1f} %, 4 uniform frames "
            f"{100 * reader['uniform_4']:.1f} %.",
            f"Distilled reader (generic architecture, on the VLM's margins): held-out margin "
            f"error {_number(before.get('margin_mae'))} → {_number(after.get('margin_mae'))}, "
            "agreement "
            f"with the VLM's answer {_percent(before.get('agreement'))} → "
            f"{_percent(after.get('agreement'))}.",
            f"Selector on reader rewards: {policies['policy-reader']['steps']} GRPO steps, best "
            f"validation at step {best['step']}.", "",
            "![training curves](training.png)", "",
            "![training curves, VLM rewards](training-vlm.png)"]


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _report_fresh(fresh: dict[str, Any]) -> list[str]:
    return ["## Scoring a fresh corpus", "",
            f"`refocus score` on {fresh['videos']} new videos (another seed, "
            f"{fresh['questions']} questions) at k = {fresh['k']} with the selector trained "
            f"against the reader: the chosen frames hit "
            f"{_percent(fresh['evidence_recall']['refocus'])} of the evidence spans, uniform "
            f"frames {_percent(fresh['evidence_recall']['uniform'])}. Selections: "
            f"`{fresh['selections']}` (and `.parquet`)."]
