"""GRPO runs: exact resume, safe checkpoints, the data filter, records and plots."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from toy import ToyReference, toy_corpus

from flows.cli import build_parser
from pipelines.learn import (
    RunSettings,
    load_corpus,
    load_policy,
    reference,
    train_policy_stage,
    train_reader_stage,
)
from pipelines.score import ScoreSettings, find_policy, with_trained_k
from refocus.rewards import RewardModel
from refocus.selectors import uniform_indices
from refocus.settings import GRPOSettings, ReaderTrainSettings
from refocus.trainer import GRPOTrainer, window_filter
from stores.errors import UserError
from stores.runs import RunFolder

SETTINGS = GRPOSettings(steps=6, questions_per_step=8, group=4, budgets=(2, 3), warmup=2)
RUN = RunSettings(eval_every=2, checkpoint_every=2, hidden=32)


@pytest.fixture(scope="module")
def reader_dir(synth_store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reader") / "reader"
    train_reader_stage(synth_store / "features", None, out, ReaderTrainSettings(steps=200))
    return out


def run_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in rows]


@pytest.mark.slow
def test_half_then_resume_equals_straight_bit_for_bit(tmp_path, synth_store, reader_dir):
    store, reward = synth_store / "features", f"reader:{reader_dir}"
    straight = train_policy_stage(store, None, reward, tmp_path / "a", SETTINGS, RUN)
    assert straight["finished"] and straight["steps"] == 6
    first = train_policy_stage(store, None, reward, tmp_path / "b", SETTINGS, RUN, stop_after=3)
    assert not first["finished"] and first["steps"] == 3
    assert not (tmp_path / "b" / "config.json").exists()  # no policy before the end
    second = train_policy_stage(store, None, reward, tmp_path / "b", SETTINGS, RUN)
    assert second["finished"] and second["steps"] == 6
    a = load_file(tmp_path / "a" / "checkpoint" / "state.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert run_rows(tmp_path / "a") == run_rows(tmp_path / "b")
    assert second["best"] == straight["best"]
    for name in (".", "policy-last"):
        pa, pb = load_policy(tmp_path / "a" / name), load_policy(tmp_path / "b" / name)
        for (ka, va), (kb, vb) in zip(pa.state_dict().items(), pb.state_dict().items(),
                                      strict=True):
            assert ka == kb and torch.equal(va, vb)


@pytest.mark.slow
def test_runs_keep_records_and_nothing_needs_pickle(tmp_path, synth_store, reader_dir):
    run = tmp_path / "run"
    summary = train_policy_stage(synth_store / "features", None, f"reader:{reader_dir}", run,
                                 SETTINGS, RUN)
    files = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
    assert {"run.json", "metrics.jsonl", "summary.json", "training.png",
            "checkpoint/state.safetensors", "checkpoint/state.json",
            "checkpoint/reward_cache.jsonl", "config.json", "weights.safetensors",
            "policy-last/config.json", "policy-last/weights.safetensors"} <= files
    locks = {f for f in files if f.startswith(".locks/")}  # the run's lock: an empty file
    assert locks == {".locks/run.lock"} and (run / ".locks" / "run.lock").stat().st_size == 0
    assert all(Path(f).suffix in {".json", ".jsonl", ".safetensors", ".png"}
               for f in files - locks)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    budgets = [r["budget"] for r in train_rows]  # the cumulative curriculum
    assert budgets[:3] == [2, 2, 2] and set(budgets[3:]) <= {2, 3}
    val = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val] == [2, 4, 6] and "evidence_recall@3" in val[0]
    cache_lines = (run / "checkpoint" / "reward_cache.jsonl").read_text().splitlines()
    assert len(cache_lines) == summary["cache"]["entries"] > 0


@pytest.mark.slow
def test_other_settings_on_an_existing_run_are_refused(tmp_path, synth_store, reader_dir):
    run = tmp_path / "run"
    store, reward = synth_store / "features", f"reader:{reader_dir}"
    train_policy_stage(store, None, reward, run, SETTINGS, RUN, stop_after=1)
    other = GRPOSettings(**{**SETTINGS.as_dict(), "group": 5})
    with pytest.raises(UserError, match="holds a run with other settings"):
        train_policy_stage(store, None, reward, run, other, RUN)


def test_bad_reward_specs_are_refused(synth_store, tmp_path):
    with pytest.raises(UserError, match="expected reader:PATH"):
        train_policy_stage(synth_store / "features", None, "oracle", tmp_path / "r", SETTINGS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not a refocus model folder"):
        train_policy_stage(synth_store / "features", None, f"reader:{empty}", tmp_path / "r",
                           SETTINGS)


def test_window_filter_keeps_questions_whose_reward_varies():
    corpus, targets = toy_corpus(videos=24, frames=20)
    questions = list(range(24))
    kept, variances = window_filter(corpus, questions, RewardModel(ToyReference(targets)),
                                    windows=4, k=1, threshold=0.1)
    # a window's single frame is its middle one: the reward varies only when that frame is
    # the asked one
    middles = {w * 5 + uniform_indices(5, 1)[0] for w in range(4)}
    assert kept == [q for q in questions if targets[q][0] in middles]
    assert 0 < len(kept) < 24
    assert all(v == pytest.approx(0.0) for q, v in zip(questions, variances, strict=True)
               if q not in kept)


def test_the_corpus_matches_the_store_and_manifest(synth_store):
    corpus = load_corpus(synth_store / "features", None)
    assert set(corpus.split) == {"train", "val", "test"}
    assert set(corpus.category) == {"colour", "shape", "first", "last", "count", "after"}
    q = corpus.rows("test")[0]
    batch = corpus.frames_of([q])
    n = int(corpus.n_frames[corpus.video[q]])
    assert batch.valid[0].sum() == n and batch.times[0, 0] == 0
    assert 0.9 < float(batch.times[0, n - 1]) <= 1.0


@pytest.mark.slow
@pytest.mark.parametrize("curriculum", ["stages", "cumulative"])
def test_the_curriculum_grows_the_budget(synth_store, reader_dir, curriculum):
    corpus = load_corpus(synth_store / "features", None)
    settings = GRPOSettings(steps=400, budgets=(4, 8, 16), curriculum=curriculum)
    trainer = GRPOTrainer(corpus, RewardModel(reference(f"reader:{reader_dir}", corpus)), settings)
    drawn = []
    for step in range(settings.steps):
        trainer.step_count = step
        drawn.append(trainer.budget())
    thirds = [drawn[:133], drawn[134:266], drawn[267:]]
    if curriculum == "stages":  # the paper: one budget per stage
        assert [set(t) for t in thirds] == [{4}, {8}, {16}]
    else:  # every budget reached so far, in about equal shares
        assert [set(t) for t in thirds] == [{4}, {4, 8}, {4, 8, 16}]
        last = np.bincount(thirds[2], minlength=17)[[4, 8, 16]] / len(thirds[2])
        assert np.all(np.abs(last - 1 / 3) < 0.12)


class WindowMargins:
    """A reference whose margin is known: answer 0's logit is the largest of the picked
    frames' values (``values[question][frame]``), the other option's logit is 0."""

    id = "window-margins"

    def __init__(self, values: dict[int, list[float]]) -> None:
        self.values = values

    def logits(self, corpus, questions, picks, valid):
        out = torch.zeros(len(questions), 2)
        for i, (q, p, v) in enumerate(zip(questions.tolist(), picks.tolist(), valid.tolist(),
                                          strict=True)):
            out[i, 0] = max(self.values[q][f] for f, ok in zip(p, v, strict=True) if ok)
        return out


def known_margins() -> tuple[list[int], dict[int, list[float]]]:
    """Six questions on 20-frame videos; with 4 windows of 5 frames and one frame per window,
    the frames scored are each window's middle one: 2, 7, 12 and 17."""
    rng = np.random.default_rng(3)
    values = {q: rng.normal(0, 0.2, 20).round(3).tolist() for q in range(6)}
    values[1][2] = values[1][7] = values[1][12] = 3.0  # evidence everywhere but window 4:
    values[1][17] = 0.0  # margin variance 1.69, but tanh(m/2) variance 0.15
    values[2][2], values[2][7], values[2][12], values[2][17] = -3.0, 3.0, -3.0, 3.0
    values[3][2], values[3][7] = -1.0, 1.0  # margin variance ≈ 0.5, reward ≈ 0.1
    return list(range(6)), values


def test_window_filter_takes_the_margin_variance_across_windows():
    corpus, _ = toy_corpus(videos=6, frames=20, split_every=100)
    questions, values = known_margins()
    model = RewardModel(WindowMargins(values))
    middles = [2, 7, 12, 17]
    margins = {q: np.array([values[q][f] for f in middles], dtype=np.float32) for q in questions}
    by_hand = {"margin": [float(np.var(margins[q].astype(np.float64))) for q in questions],
               "reward": [float(np.var(np.tanh(margins[q].astype(np.float64) / 2)))
                          for q in questions]}
    for statistic, expected in by_hand.items():
        kept, variances = window_filter(corpus, questions, model, windows=4, k=1,
                                        threshold=0.2, statistic=statistic)
        np.testing.assert_allclose(variances, expected, rtol=1e-6, atol=1e-9)
        assert kept == [q for q, v in zip(questions, expected, strict=True) if v > 0.2]
    # the default is the paper's margin, and the two statistics keep different questions
    assert window_filter(corpus, questions, model, 4, 1, 0.2)[0] == [1, 2, 3]
    assert window_filter(corpus, questions, model, 4, 1, 0.2, "reward")[0] == [2]


def test_the_trainer_filters_on_the_margin_and_keeps_its_statistics():
    corpus, _ = toy_corpus(videos=6, frames=20, split_every=100)  # 1 … 5 in train
    questions, values = known_margins()
    settings = GRPOSettings(steps=2, questions_per_step=4, group=2, budgets=(1, 2),
                            filter_threshold=0.2)
    trainer = GRPOTrainer(corpus, RewardModel(WindowMargins(values)), settings)
    middles = [2, 7, 12, 17]
    variances = [np.var(np.array([values[q][f] for f in middles], dtype=np.float32)
                        .astype(np.float64)) for q in questions[1:]]
    assert trainer.questions == [1, 2, 3]
    stats = trainer.state().meta["filter"]
    assert stats["statistic"] == "margin" and stats["before"] == 5 and stats["after"] == 3
    assert stats["mean_variance"] == pytest.approx(np.mean(variances), rel=1e-6)
    assert stats["threshold"] == 0.2 and stats["windows"] == 4
    # resuming from the saved state keeps the filtered questions without scoring again
    again = RewardModel(WindowMargins(values))
    resumed = GRPOTrainer(corpus, again, settings, state=trainer.state())
    assert resumed.questions == [1, 2, 3] and resumed.filter_stats == stats
    assert again.counts.subsets == 0 and trainer.reward_model.counts.subsets == 5 * 4
    with pytest.raises(ValueError, match="kept no question"):
        GRPOTrainer(corpus, RewardModel(WindowMargins(values)),
                    GRPOSettings(**{**settings.as_dict(), "filter_threshold": 50.0}))
    with pytest.raises(ValueError, match="filter statistic"):
        GRPOSettings(filter_statistic="variance")


def test_the_default_budgets_are_the_papers_stages():
    assert GRPOSettings().budgets == (4, 8, 16, 32)
    assert GRPOSettings().filter_statistic == "margin"


@pytest.mark.slow
def test_score_defaults_to_the_largest_budget_the_policy_trained_on(tmp_path, synth_store,
                                                                    reader_dir):
    run = tmp_path / "run"
    train_policy_stage(synth_store / "features", None, f"reader:{reader_dir}", run, SETTINGS,
                       RUN)
    assert ScoreSettings().k is None  # not a fixed k the policy may never have trained on
    for path in (run, run / "policy", run / "policy-last"):  # run/policy: the old path
        policy = find_policy(path)
        assert policy.budgets == SETTINGS.budgets
        k = with_trained_k(ScoreSettings(), policy).k
        assert k == 3 and k in SETTINGS.budgets
        assert with_trained_k(ScoreSettings(k=7), policy).k == 7  # --k still wins
    parsed = build_parser().parse_args(["score", "m.jsonl", "--policy", str(run), "--out",
                                        str(tmp_path / "s")])
    assert parsed.k is None
    bare = RunFolder.claim(tmp_path / "bare")  # a policy whose run records no settings
    bare.write_identity({"store": str(synth_store / "features")})
    trained = load_policy(run)
    bare.write_policy(trained.config.as_dict(), trained.state_dict())
    with pytest.raises(UserError, match="--k"):
        with_trained_k(ScoreSettings(), find_policy(bare))
