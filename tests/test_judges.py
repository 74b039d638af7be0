"""Judges that are not the reward model: the ideal observer on a hand-built corpus against
hand-computed expected accuracy; `refocus eval --judge ideal --judge reader:PATH` end to end
(a column per judge, the policy's reward model named, the self-judged cell marked, the ideal
observer's numbers recomputed from the manifest's spans and the store's frame times); bad
judge specs in one line; a tiny real LMM as a judge against its own logits computed by hand."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from toy import video_per_question

from flows.cli import EXIT_OK, EXIT_USAGE, main
from pipelines.learn import markdown_table
from refocus.data import Corpus
from refocus.evaluation import IdealObserver, accuracy_by_judge, evaluate, labels
from refocus.selectors import uniform_indices
from stores.features import FeatureStore
from stores.manifest import Question, read_manifest

# ----------------------------------------------------------------------------- by hand

FRAMES = 10  # per video, one a second: frame i at i s
# (options, evidence spans in seconds, kind, the frames a fixed selector picks)
HAND = [
    (4, [(2.0, 2.5)], "colour", [2, 7]),  # the span holds frame 2: hit → right, 1
    (5, [(5.0, 6.0)], "colour", [0, 4]),  # frames 5, 6 missed → a guess among 5: 1/5
    (2, [(1.0, 1.0), (8.0, 9.0), (3.2, 3.4)], "count", [1, 3]),  # 2nd span missed: 1/2
    # (3.2, 3.4) holds no candidate frame: left out, as in the evidence recall
    (3, [], "count", [0]),  # no spans: not scored by the ideal observer
    (3, [(4.2, 4.8)], "order", [4, 5]),  # its only span holds no frame: not scored
]


def hand_corpus() -> Corpus:
    options = [o for o, *_ in HAND]
    features = video_per_question(options, FRAMES, np.random.default_rng(0))
    questions = [Question(f"q{i}", f"v{i}", "which?", tuple("abcde"[:o]), 0, tuple(spans),
                          "test", kind) for i, (o, spans, kind, _) in enumerate(HAND)]
    return Corpus(features, questions)


class Fixed:
    """A selector that picks the frames of HAND."""

    name = "fixed"

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        return [HAND[q][3] for q in questions]


def test_the_ideal_observer_matches_a_hand_computed_case():
    corpus = hand_corpus()
    questions = list(range(len(HAND)))
    assert IdealObserver().scores(corpus, questions, [h[3] for h in HAND]) == \
        [1.0, pytest.approx(1 / 5), 0.5, None, None]
    rows = evaluate(corpus, questions, [Fixed()], (2,), [IdealObserver()])
    by_kind = {r.category: r for r in rows}
    assert set(by_kind) == {"all", "colour", "count"}  # 'order': nothing the judge can score
    everything = by_kind["all"]
    assert everything.judge == "ideal" and everything.questions == 5
    assert everything.judged == 3
    assert everything.accuracy == pytest.approx((1 + 1 / 5 + 1 / 2) / 3)
    assert everything.chance == pytest.approx((1 / 4 + 1 / 5 + 1 / 2) / 3)
    assert by_kind["colour"].accuracy == pytest.approx((1 + 1 / 5) / 2)
    assert (by_kind["count"].accuracy, by_kind["count"].judged) == (pytest.approx(0.5), 1)
    assert accuracy_by_judge(rows) == {("fixed", 2, "ideal"): pytest.approx(17 / 30)}
    # the recall is the judge's rule counted per span: 1, 0, 1/2 (and 0 for the last question
    # has no span with a frame: left out)
    assert everything.evidence_recall == pytest.approx((1 + 0 + 1 / 2) / 3)
    # the exact bootstrap distribution of a mean of three draws from (1, 1/5, 1/2) puts 1/27
    # (3.7 %, more than each 2.5 % tail) on all three being 1/5 and on all three being 1:
    # the 95 % percentile interval is [1/5, 1]
    assert (everything.ci_low, everything.ci_high) == (pytest.approx(0.2), pytest.approx(1.0))
    assert everything.ceiling == 1.0  # every frame shown: every span with a frame is hit
    table = markdown_table(rows, "test")
    assert "| fixed | – | 2 | 56.7 [20.0, 100.0] | 50.0 |" in table  # accuracy, recall (%)
    assert "| all frames (ceiling) | – | | 100.0 (10 frames) | |" in table
    assert "| chance | – | | 31.7 | |" in table
    assert "ideal scores 3 of the 5 questions (those with an evidence span" in table


def test_judge_labels_are_short_and_tell_apart_what_differs():
    reader_a, reader_b = "reader:ab12" + "0" * 12, "reader:cd34" + "0" * 12
    vlm = "lmm:/models/refocus-synth-vlm:video:" + "9" * 16
    hub = "lmm:Qwen/Qwen2.5-VL-7B-Instruct:video:" + "8" * 16
    assert labels([reader_a, vlm, hub, "ideal", reader_a]) == {
        reader_a: "reader", vlm: "lmm:refocus-synth-vlm", hub: "lmm:Qwen2.5-VL-7B-Instruct",
        "ideal": "ideal"}
    assert labels([reader_a, reader_b]) == {reader_a: "reader:ab12", reader_b: "reader:cd34"}
    shown_as_images = vlm.replace(":video:", ":images:")
    both = labels([vlm, shown_as_images])
    assert len(set(both.values())) == 2
    assert all(v.startswith("lmm:refocus-synth-vlm:") for v in both.values())


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def trained(synth_store, tmp_path_factory):
    """A reader and a short GRPO run trained against it, on the session's synthetic store."""
    root = tmp_path_factory.mktemp("judged")
    store = str(synth_store / "features")
    reader, run = root / "reader", root / "run"
    assert main(["train-reader", "--store", store, "--out", str(reader), "--steps", "60"]) \
        == EXIT_OK
    assert main(["train", "--store", store, "--reward", f"reader:{reader}", "--out", str(run),
                 "--steps", "2", "--questions-per-step", "4", "--group", "3", "--budgets",
                 "2", "--eval-every", "2", "--hidden", "16"]) == EXIT_OK
    return reader, run


def ideal_by_hand(synth_store: Path, k: int) -> float:
    """The ideal observer's expected accuracy of uniform frames on the test split, from the
    ingested manifest's spans and options and the feature store's frame times."""
    features = FeatureStore(synth_store / "features").load()
    row_of = {v: i for i, v in enumerate(features.video_ids)}
    scores = []
    for q in read_manifest(synth_store / "shards" / "manifest.jsonl").questions:
        if q.split != "test" or q.video_id not in row_of:
            continue
        v = row_of[q.video_id]
        times = features.frame_time[features.offsets[v]:features.offsets[v + 1]]
        chosen = times[uniform_indices(len(times), k)]
        spans = [(a, b) for a, b in q.evidence
                 if ((times >= a - 1e-6) & (times <= b + 1e-6)).any()]
        if not spans:
            continue
        hit = all(((chosen >= a - 1e-6) & (chosen <= b + 1e-6)).any() for a, b in spans)
        scores.append(1.0 if hit else 1 / len(q.options))
    assert scores
    return float(np.mean(scores))


def reader_on_every_frame(store: str, reader: Path) -> float:
    """The reader's accuracy on the test questions from all of each video's frames."""
    from pipelines.learn import load_corpus, load_reader
    from refocus.reader import read

    corpus, model = load_corpus(store, None), load_reader(reader)
    right = []
    with torch.no_grad():
        for q in corpus.rows("test"):
            n = int(corpus.n_frames[corpus.video[q]])
            logits = read(model, corpus, torch.tensor([q]), torch.arange(n)[None])[0]
            options = int(corpus.option_valid[q].sum())
            right.append(int(logits[:options].argmax()) == int(corpus.answer[q]))
    return float(np.mean(right))


@pytest.mark.slow
def test_eval_with_two_judges_names_the_reward_model_and_marks_self_judging(
        synth_store, trained, tmp_path, capsys):
    reader, run = trained
    store = str(synth_store / "features")
    out = tmp_path / "eval"
    capsys.readouterr()
    assert main(["eval", "--store", store, "--judge", "ideal", "--judge", f"reader:{reader}",
                 "--policy", str(run), "--k", "2,4", "--methods", "uniform", "clip-top-k",
                 "--out", str(out)]) == EXIT_OK
    printed = capsys.readouterr().out
    assert "acc[judge=ideal]" in printed and "acc[judge=reader]" in printed
    with open(out / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    overall = [r for r in rows if r["category"] == "all"]
    assert {(r["method"], r["k"], r["judge"]) for r in overall} == {
        (m, k, j) for m in ("uniform", "clip-top-k", "refocus") for k in ("2", "4")
        for j in ("ideal", "reader")}
    for r in overall:
        learned = r["method"] == "refocus"
        assert r["rewards_by"] == ("reader" if learned else "")
        assert r["self_judged"] == str(learned and r["judge"] == "reader")
    for k in (2, 4):
        ideal = next(r for r in overall if (r["method"], r["k"], r["judge"])
                     == ("uniform", str(k), "ideal"))
        assert float(ideal["accuracy"]) == pytest.approx(ideal_by_hand(synth_store, k))
    # the all-frames ceilings: the ideal observer's is 1 by its rule; the reader's, its own
    # answers when shown every candidate frame of each test question, one at a time
    expected = {"ideal": 1.0, "reader": reader_on_every_frame(store, reader)}
    for r in overall:
        assert float(r["ceiling"]) == pytest.approx(expected[r["judge"]])
        assert float(r["ci_low"]) <= float(r["accuracy"]) <= float(r["ci_high"])
    # the full identities: the reader by its weights' digest, as the run recorded its reward
    digest = hashlib.sha256((reader / "weights.safetensors").read_bytes()).hexdigest()[:16]
    about = json.loads((out / "eval.json").read_text())
    assert [(j["label"], j["id"]) for j in about["judges"]] == [
        ("ideal", "ideal"), ("reader", f"reader:{digest}")]
    assert about["policies"] == [{"method": "refocus", "path": str(run.resolve()),
                                  "reward": f"reader:{digest}", "rewards_by": "reader"}]
    assert json.loads((run / "run.json").read_text())["reward"] == f"reader:{digest}"
    table = (out / "eval.md").read_text()
    header = "| method | rewards by | k | acc[judge=ideal] | acc[judge=reader] | evidence recall |"
    assert header in table
    learned_rows = [line for line in table.splitlines() if line.startswith("| refocus |")]
    assert learned_rows and all(line.startswith("| refocus | reader |") and
                                line.count(" *") == 1 for line in learned_rows)
    assert all(" *" not in line for line in table.splitlines() if line.startswith("| uniform"))
    assert "self-judged: this judge is the model that gave the policy its rewards" in table
    assert f"reader = `reader:{digest}`" in table
    image = Image.open(out / "eval.png")
    assert image.format == "PNG" and image.size[0] > 1500  # three panels: two judges, recall
    # --reward alone still works, as one judge, and is labelled the same
    again = tmp_path / "again"
    assert main(["eval", "--store", store, "--reward", f"reader:{reader}", "--policy", str(run),
                 "--k", "2", "--methods", "uniform", "--out", str(again)]) == EXIT_OK
    with open(again / "eval.csv") as f:
        old = [r for r in csv.DictReader(f) if r["category"] == "all"]
    assert {(r["method"], r["judge"], r["self_judged"]) for r in old} == {
        ("uniform", "reader", "False"), ("refocus", "reader", "True")}
    same = {(r["method"], r["accuracy"]) for r in overall
            if r["k"] == "2" and r["judge"] == "reader"}
    assert {(r["method"], r["accuracy"]) for r in old} <= same


def test_bad_judges_are_one_line(synth_store, tmp_path, capsys):
    store = str(synth_store / "features")
    for args, message in (
            (["--judge", "oracle"], "--judge 'oracle': expected ideal (the ideal observer"),
            (["--judge", "ideal", "--judge", "reader:"], "--judge 'reader:': expected ideal"),
            ([], "eval: no judge; pass --judge SPEC")):
        capsys.readouterr()
        assert main(["eval", "--store", store, *args]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    # questions without evidence spans: the ideal observer has nothing to judge
    rows = [json.loads(line) for line in
            (synth_store / "shards" / "manifest.jsonl").read_text().splitlines() if line]
    for row in rows:
        row.pop("evidence", None)
    bare = tmp_path / "no-evidence.jsonl"
    bare.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["eval", "--store", store, "--qa", str(bare), "--judge", "ideal"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "--judge ideal: none of the" in err and "'test' questions has an evidence span" \
        in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_a_tiny_lmm_judges_beside_the_ideal_observer(synth_store, tmp_path, monkeypatch):
    from tiny_lmm import build_qwen2_vl

    from pipelines.learn import evaluate_stage, load_corpus
    from refocus.lmm import Item, LMMScorer
    from refocus.lmm_reference import ShardFrames
    from stores.shards import ShardSet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build_qwen2_vl(tmp_path / "tiny-vlm")
    # a few test questions only: the tiny model runs on CPU
    rows = [json.loads(line) for line in
            (synth_store / "shards" / "manifest.jsonl").read_text().splitlines() if line]
    asked = [r for r in rows if r.get("split") == "test" and "qid" in r][:8]
    qa = tmp_path / "few.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in
                          [r for r in rows if "qid" not in r] + asked))
    ks = (1, 2, 3)
    table = evaluate_stage(synth_store / "features", [str(qa)], "test", ks, None,
                           methods=["uniform"], device="cpu", present="images",
                           judges=["ideal", f"lmm:{model}"], out=tmp_path / "eval")
    accuracy = accuracy_by_judge(table)
    assert set(accuracy) == {("uniform", k, j) for k in ks for j in ("ideal", "lmm:tiny-vlm")}
    # the oracle: the scorer's own image path (no vision cache) on the same frames and times
    # (from the shards' metadata), one question at a time
    corpus = load_corpus(synth_store / "features", [str(qa)])
    scorer = LMMScorer.load(str(model), device="cpu", present="images")
    frames = ShardFrames(str(synth_store / "shards"), scorer)
    shards = ShardSet(synth_store / "shards")
    right = {k: [] for k in ks}
    for q in corpus.rows("test"):
        video = corpus.video_ids[int(corpus.video[q])]
        images, times = frames.images(video), shards.read(video).meta["timestamps"]
        for k in ks:
            chosen = uniform_indices(len(images), k)
            logits = scorer.logits_from_images([Item(
                corpus.text[q], corpus.options_text[q], [images[i] for i in chosen],
                [times[i] for i in chosen])])[0]
            right[k].append(int(torch.argmax(logits[:len(corpus.options_text[q])])) ==
                            int(corpus.answer[q]))
    assert 0 < sum(map(sum, right.values())) < 8 * len(ks)  # neither always right nor wrong
    # the ceiling: 64 frames do not fit the tiny model's context, so fewer, halved until they
    # fit; the scorer's own answers from that many frames, spread uniformly
    row = next(r for r in table if r.judge == "lmm:tiny-vlm" and r.category == "all")
    lengths = [len(frames.images(corpus.video_ids[int(corpus.video[q])]))
               for q in corpus.rows("test")]
    cap = next(c for c in (64, 32, 16, 8, 4, 2, 1)
               if np.mean([min(n, c) for n in lengths]) == pytest.approx(row.ceiling_frames))
    assert cap < 64 < max(lengths)
    on_all = []
    for q in corpus.rows("test"):
        video = corpus.video_ids[int(corpus.video[q])]
        images, times = frames.images(video), shards.read(video).meta["timestamps"]
        chosen = uniform_indices(len(images), cap)
        logits = scorer.logits_from_images([Item(
            corpus.text[q], corpus.options_text[q], [images[i] for i in chosen],
            [times[i] for i in chosen])])[0]
        on_all.append(int(torch.argmax(logits[:len(corpus.options_text[q])]))
                      == int(corpus.answer[q]))
    assert row.ceiling == pytest.approx(np.mean(on_all))
    for k in ks:
        assert len(right[k]) == 8
        assert accuracy[("uniform", k, "lmm:tiny-vlm")] == pytest.approx(np.mean(right[k]))
    about = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert about["judges"][1]["label"] == "lmm:tiny-vlm"
    assert about["judges"][1]["id"].startswith(f"lmm:{model}:images:")
