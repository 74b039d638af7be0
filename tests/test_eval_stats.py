"""Evaluation statistics against independent oracles: the bootstrap interval against the
normal approximation's width and a hand-written bootstrap on another generator; the table's
intervals, seeds and all-frames ceiling on a generated corpus whose per-question scores are
known by construction; `refocus eval --seeds`; the plots' stages and best step."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image
from toy import video_per_question

from flows.cli import EXIT_OK, EXIT_USAGE, main
from pipelines.learn import markdown_table
from pipelines.plots import best_step, budget_stages, evaluation_chart, training_curves
from refocus.data import Corpus
from refocus.evaluation import (
    AllFrames,
    IdealObserver,
    Statistics,
    bootstrap_interval,
    ceiling_cap,
    evaluate,
)
from refocus.selectors import Random, Uniform
from stores.manifest import Question

Z95 = 1.959964  # the standard normal's 97.5 % quantile


def normal_interval(scores: np.ndarray) -> tuple[float, float]:
    """The normal approximation: mean ± z · sd / √n."""
    half = Z95 * scores.std() / math.sqrt(len(scores))
    return scores.mean() - half, scores.mean() + half


def hand_bootstrap(scores: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """A bootstrap written out: a loop of draws from the legacy Mersenne Twister, the 2.5 %
    and 97.5 % order statistics of the sorted means."""
    draw = np.random.RandomState(seed)
    means = sorted(scores[draw.randint(0, len(scores), len(scores))].mean()
                   for _ in range(resamples))
    return means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]


def test_the_bootstrap_interval_agrees_with_the_normal_approximation_and_a_hand_bootstrap():
    hits = (np.random.default_rng(7).random(2000) < 0.54).astype(float)
    low, high = bootstrap_interval(hits)
    n_low, n_high = normal_interval(hits)
    h_low, h_high = hand_bootstrap(hits, 1000, seed=3)
    half = (n_high - n_low) / 2  # about 2.2 points here
    assert low < hits.mean() < high
    for got in ((low, high), (h_low, h_high)):  # Monte Carlo error: ~4 % of the half-width
        assert got[0] == pytest.approx(n_low, abs=0.15 * half)
        assert got[1] == pytest.approx(n_high, abs=0.15 * half)
    assert bootstrap_interval(hits) == (low, high)  # a fixed seed
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)
    # a skewed vector: the percentile interval is not symmetric about the mean, as it should
    rare = np.zeros(400)
    rare[:8] = 1.0
    r_low, r_high = bootstrap_interval(rare)
    assert r_high - rare.mean() > rare.mean() - r_low > 0
    with pytest.raises(ValueError):
        bootstrap_interval([])


# ----------------------------------------------------------------------------- generated

FRAMES = 10  # per video, frame i at i seconds


def spanned_corpus(n: int, options: int = 2, seed: int = 0) -> Corpus:
    """``n`` questions, one 10-frame video each, ``options`` options, one evidence span
    around frame q mod 10; kinds alternate 'a' / 'b'."""
    features = video_per_question([options] * n, FRAMES, np.random.default_rng(seed))
    questions = [Question(f"q{i}", f"v{i}", "which?", tuple("abcdef"[:options]), 0,
                          ((float(i % FRAMES) - 0.2, float(i % FRAMES) + 0.2),), "test",
                          "ab"[i % 2]) for i in range(n)]
    return Corpus(features, questions)


def hits_first_of_five(q: int) -> bool:
    """Whether ``Lucky`` hits question q: 3 of every 5 questions."""
    return q % 5 < 3


class Lucky:
    """Hits the evidence frame of 3 questions in 5, else picks a frame beside it."""

    name = "lucky"

    def select(self, corpus: Corpus, questions: list[int], k: int) -> list[list[int]]:
        return [[q % FRAMES if hits_first_of_five(q) else (q + 5) % FRAMES] for q in questions]


def by_hand(picks: list[list[int]], options: int = 2) -> np.ndarray:
    """The ideal observer's rule written out for ``spanned_corpus``: 1 when a pick is the
    question's evidence frame, else a guess among the options."""
    return np.array([1.0 if q % FRAMES in p else 1 / options for q, p in enumerate(picks)])


def test_every_cell_carries_an_interval_of_the_right_width_and_the_ceiling():
    n = 600
    corpus = spanned_corpus(n)
    questions = list(range(n))
    rows = evaluate(corpus, questions, [Lucky()], (1,), [IdealObserver()])
    scores = by_hand(Lucky().select(corpus, questions, 1))
    expected = {"all": scores, "a": scores[0::2], "b": scores[1::2]}
    assert {r.category for r in rows} == set(expected)
    for row in rows:
        mine = expected[row.category]
        n_low, n_high = normal_interval(mine)
        half = (n_high - n_low) / 2
        assert row.accuracy == pytest.approx(mine.mean())
        assert row.ci_low == pytest.approx(n_low, abs=0.15 * half)
        assert row.ci_high == pytest.approx(n_high, abs=0.15 * half)
        assert row.ceiling == 1.0  # every frame shown: every span hit
        assert (row.seeds, row.seed_std) == (1, None)  # not a stochastic selector
    # no intervals when asked for none
    bare = evaluate(corpus, questions[:20], [Lucky()], (1,), [IdealObserver()],
                    statistics=Statistics(resamples=0))
    assert all(r.ci_low is None and r.ci_high is None for r in bare)


def test_a_random_selector_is_averaged_over_seeds_with_its_spread():
    n = 300
    corpus = spanned_corpus(n, options=4)
    questions = list(range(n))
    seeds = (0, 1, 2)
    rows = evaluate(corpus, questions, [Random(), Uniform()], (2,), [IdealObserver()],
                    statistics=Statistics(seeds=seeds))
    random_row = next(r for r in rows if r.method == "random" and r.category == "all")
    per_seed = np.stack([by_hand(Random(seed=s).select(corpus, questions, 2), options=4)
                         for s in seeds])
    accuracies = per_seed.mean(axis=1)
    assert len(set(accuracies.round(6))) == 3  # the seeds really differ
    assert random_row.seeds == 3
    assert random_row.accuracy == pytest.approx(accuracies.mean())
    assert random_row.seed_std == pytest.approx(np.std(accuracies, ddof=1))
    averaged = per_seed.mean(axis=0)  # per question, over the seeds
    n_low, n_high = normal_interval(averaged)
    half = (n_high - n_low) / 2
    assert random_row.ci_low == pytest.approx(n_low, abs=0.15 * half)
    assert random_row.ci_high == pytest.approx(n_high, abs=0.15 * half)
    uniform_row = next(r for r in rows if r.method == "uniform" and r.category == "all")
    assert (uniform_row.seeds, uniform_row.seed_std) == (1, None)
    assert uniform_row.accuracy == pytest.approx(
        by_hand(Uniform().select(corpus, questions, 2), options=4).mean())
    # the table: interval and spread in the cell, what they mean below it
    table = markdown_table(rows, "test", {"statistics": Statistics(seeds=seeds).as_dict()})
    cell = (f"{100 * random_row.accuracy:.1f} [{100 * random_row.ci_low:.1f}, "
            f"{100 * random_row.ci_high:.1f}] sd {100 * random_row.seed_std:.1f}")
    assert f"| random | – | 2 | {cell} |" in table
    assert "| all frames (ceiling) | – | | 100.0 (10 frames) | |" in table
    assert "random: the mean over seeds 0, 1, 2; sd: the standard deviation" in table
    assert "the 95 % percentile bootstrap interval over the questions (1000 resamples" in table


def test_the_all_frames_selection_and_its_cap():
    corpus = spanned_corpus(3)
    assert AllFrames().select(corpus, [0, 2], 4) == [list(range(FRAMES))] * 2
    # at most 4 of 10 frames, spread uniformly: int((i + 0.5) · 10 / 4)
    assert AllFrames(cap=4).select(corpus, [1], 1) == [[1, 3, 6, 8]]
    assert ceiling_cap("lmm:Qwen/Qwen2.5-VL-7B-Instruct:video:00", 64) == 64
    assert ceiling_cap("reader:ab12", 64) is None and ceiling_cap("ideal", 64) is None


def test_the_plots_label_budget_stages_and_mark_the_best_step(tmp_path):
    stages = [(1, 4, 4), (5, 8, 8), (9, 12, 16)]
    train = [{"kind": "train", "step": s, "budget": k, "reward": 0.1 * s, "entropy": 2.0,
              "loss": 0.5, "reward_std": 0.3, "advantage_abs": 0.8}
             for first, last, k in stages for s in range(first, last + 1)]
    val = [{"kind": "val", "step": s, "accuracy@4": a, "accuracy@8": b,
            "evidence_recall@4": 0.5} for s, a, b in
           ((4, 0.4, 0.5), (8, 0.6, 0.5), (12, 0.5, 0.6))]  # 8 and 12 tie: the first
    assert budget_stages(list(reversed(train))) == stages
    cumulative = [2, 2, 4, 2, 4, 8, 4, 2]  # each stage also draws the smaller budgets
    assert budget_stages([{"step": s, "budget": k} for s, k in enumerate(cumulative, 1)]) \
        == [(1, 2, 2), (3, 5, 4), (6, 8, 8)]
    assert best_step(val) == 8
    image = training_curves([*train, *val], tmp_path / "training.png")
    assert Image.open(image).size == (1760, 880)
    # an older metrics file without reward_std / advantage_abs still plots
    old = [{k: v for k, v in r.items() if k not in ("reward_std", "advantage_abs")}
           for r in train]
    assert Image.open(training_curves(old, tmp_path / "old.png", best=4)).format == "PNG"
    corpus = spanned_corpus(40)
    rows = evaluate(corpus, list(range(40)), [Lucky(), Random()], (1, 2), [IdealObserver()],
                    statistics=Statistics(seeds=(0, 1)))
    assert Image.open(evaluation_chart(rows, tmp_path / "eval.png")).format == "PNG"


# ----------------------------------------------------------------------------- command line

def test_eval_seeds_from_the_command_line(synth_store, tmp_path, capsys):
    from pipelines.learn import load_corpus

    store = str(synth_store / "features")
    out = tmp_path / "eval"
    assert main(["eval", "--store", store, "--judge", "ideal", "--methods", "random",
                 "uniform", "--k", "2", "--seeds", "0,2", "--resamples", "200",
                 "--out", str(out)]) == EXIT_OK
    with open(out / "eval.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f) if r["category"] == "all"}
    corpus = load_corpus(store, None)
    questions = [q for q in corpus.rows("test")
                 if IdealObserver.can_judge(corpus, q)]
    per_seed = []
    for seed in (0, 2):  # the ideal observer's rule by hand on the seeds' own picks
        scores = []
        for q, picks in zip(questions, Random(seed=seed).select(corpus, questions, 2),
                            strict=True):
            spans = [s for s in corpus.evidence_frames(q) if s]
            hit = all(set(picks) & set(s) for s in spans)
            scores.append(1.0 if hit else 1 / int(corpus.option_valid[q].sum()))
        per_seed.append(np.mean(scores))
    assert rows["random"]["seeds"] == "2" and rows["uniform"]["seeds"] == "1"
    assert float(rows["random"]["accuracy"]) == pytest.approx(np.mean(per_seed))
    assert float(rows["random"]["seed_std"]) == pytest.approx(np.std(per_seed, ddof=1))
    assert rows["uniform"]["seed_std"] == ""
    assert float(rows["random"]["ci_low"]) < float(rows["random"]["accuracy"]) \
        < float(rows["random"]["ci_high"])
    assert float(rows["uniform"]["ceiling"]) == 1.0
    about = json.loads((out / "eval.json").read_text())
    assert about["statistics"]["seeds"] == [0, 2] and about["statistics"]["resamples"] == 200
    assert about["judges"][0]["ceiling"] == "every candidate frame"
    again = tmp_path / "again"
    assert main(["eval", "--store", store, "--judge", "ideal", "--methods", "random", "--k",
                 "2", "--seeds", "3", "--out", str(again)]) == EXIT_OK
    assert json.loads((again / "eval.json").read_text())["statistics"]["seeds"] == [0, 1, 2]
    for bad in ("0", "0,0", "x", "-1,"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            main(["eval", "--store", store, "--judge", "ideal", "--seeds", bad])
        assert stop.value.code == EXIT_USAGE
        assert "--seeds" in capsys.readouterr().err
