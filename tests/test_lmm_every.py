"""Offline to online: GRPO against a cheap surrogate (a reader) that the reward model (a tiny
real Qwen2-VL) refreshes every n-th step (`refocus train --surrogate ... --lmm-every n`).

The oracle for "how often the LMM was asked" is independent of refocus's counters: the
transformers model class's own ``forward`` is wrapped and every real call (and the rows of its
batch) is tallied there."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_lmm import build_qwen2_vl
from transformers import Qwen2VLForConditionalGeneration

from flows.cli import EXIT_OK, EXIT_USAGE, main
from pipelines.learn import (
    RunSettings,
    load_corpus,
    load_reader,
    reference,
    train_policy_stage,
    train_reader_stage,
)
from refocus.rewards import RewardCache, RewardModel, subset_key
from refocus.settings import GRPOSettings, ReaderTrainSettings
from stores.errors import UserError

STEPS = 6
TRAIN = ["--steps", str(STEPS), "--questions-per-step", "2", "--group", "2", "--budgets", "3",
         "--eval-every", str(STEPS), "--device", "cpu", "--hidden", "32"]


class ForwardTally:
    """Real forwards of the LMM's model class, and the (question, subset) rows they held."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = self.rows = 0
        real = Qwen2VLForConditionalGeneration.forward

        @functools.wraps(real)
        def counted(model, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            self.calls += 1
            self.rows += int(kwargs["input_ids"].shape[0])
            return real(model, *args, **kwargs)

        monkeypatch.setattr(Qwen2VLForConditionalGeneration, "forward", counted)

    def snapshot(self) -> tuple[int, int]:
        return self.calls, self.rows


@pytest.fixture(scope="module")
def lmm(tmp_path_factory) -> str:
    return f"lmm:{build_qwen2_vl(tmp_path_factory.mktemp('lmm') / 'qwen2_vl')}"


@pytest.fixture(scope="module")
def surrogate(synth_store, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("surrogate") / "reader"
    train_reader_stage(synth_store / "features", None, folder,
                       ReaderTrainSettings(steps=30, batch_size=32))
    return f"reader:{folder}"


@pytest.fixture(scope="module")
def runs(synth_store, lmm, surrogate, tmp_path_factory) -> dict[str, dict]:
    """The same training (steps, seed) on the LMM alone, with the reader surrogate refreshed
    every 3rd step, and with --lmm-every 1; each with the LMM forwards it really ran."""
    root = tmp_path_factory.mktemp("runs")
    store = str(synth_store / "features")
    out = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        tally = ForwardTally(monkeypatch)
        for name, extra in (("alone", []), ("every3", ["--lmm-every", "3"]),
                            ("every1", ["--lmm-every", "1"])):
            before = tally.snapshot()
            surrogate_args = ["--surrogate", surrogate] if extra else []
            assert main(["train", "--store", store, "--reward", lmm, "--out",
                         str(root / name), *TRAIN, *surrogate_args, *extra]) == EXIT_OK
            calls, rows = (a - b for a, b in zip(tally.snapshot(), before, strict=True))
            out[name] = {"folder": root / name, "forwards": calls, "subsets": rows,
                         "summary": json.loads((root / name / "summary.json").read_text())}
    return out


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lmm_every_makes_fewer_lmm_calls_and_counts_them_as_the_model_ran_them(runs):
    alone, online = runs["alone"], runs["every3"]
    assert 0 < online["subsets"] < alone["subsets"]
    assert online["forwards"] < alone["forwards"]
    for run in (alone, online):  # refocus's counter equals the real forwards, validation too
        calls = run["summary"]["reward_calls"]
        assert calls["reward_subsets"] == run["subsets"]
        assert calls["reward_forwards"] == run["forwards"]
        assert calls["validation"]["reward_subsets"] > 0
    train = online["summary"]["reward_calls"]["train"]
    assert (train["steps_on_reward"], train["steps_on_surrogate"]) == (2, 4)  # steps 0 and 3
    assert train["surrogate_subsets"] > 0
    assert runs["alone"]["summary"]["reward_calls"]["train"]["surrogate_subsets"] == 0
    rows = [r for r in metrics(online["folder"]) if r["kind"] == "train"]
    assert [r["reward_from"] for r in rows] == ["reward", "surrogate", "surrogate"] * 2
    assert all(r["reward_subsets"] == 0 == r["reward_forwards"] for r in rows
               if r["reward_from"] == "surrogate")
    # the LMM's cache holds what the LMM scored and nothing of the surrogate's
    cache = (online["folder"] / "checkpoint" / "reward_cache.jsonl").read_text().splitlines()
    assert len(cache) == train["reward_subsets"]


@pytest.mark.slow
def test_the_run_and_its_policy_record_both_models(runs, lmm, surrogate):
    folder = runs["every3"]["folder"]
    run = json.loads((folder / "run.json").read_text())
    policy = json.loads((folder / "config.json").read_text())
    for record in (run, policy):
        assert record["reward"].startswith(lmm + ":")
        assert record["surrogate"].startswith("reader:") and record["lmm_every"] == 3
        assert record["settings"]["lmm_every"] == 3
    alone = json.loads((runs["alone"]["folder"] / "config.json").read_text())
    assert "surrogate" not in alone and alone["reward"] == policy["reward"]


@pytest.mark.slow
def test_lmm_every_1_trains_exactly_as_the_lmm_alone(runs):
    strip = lambda folder: [{k: v for k, v in row.items() if not k.endswith("seconds")}  # noqa: E731
                            for row in metrics(folder)]
    assert strip(runs["every1"]["folder"]) == strip(runs["alone"]["folder"])
    a = load_file(runs["alone"]["folder"] / "policy-last" / "weights.safetensors")
    b = load_file(runs["every1"]["folder"] / "policy-last" / "weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs["every1"]["subsets"] == runs["alone"]["subsets"]


@pytest.mark.slow
def test_a_surrogate_step_takes_the_lmms_cached_value_and_never_asks_it(
        synth_store, lmm, surrogate, monkeypatch):
    corpus = load_corpus(synth_store / "features", None)
    truth = reference(lmm, corpus, str(synth_store / "shards"))
    reward_model = RewardModel(truth, RewardCache(truth.id))
    cheap = RewardModel(reference(surrogate, corpus))
    tally = ForwardTally(monkeypatch)
    q = torch.tensor([0, 9, 20])
    seen = torch.tensor([[0, 4, 7], [1, 2, 3], [5, 8, 9]])
    valid = torch.ones_like(seen, dtype=torch.bool)
    scored = reward_model.margins(corpus, q, seen, valid)  # an LMM step
    asked = tally.snapshot()
    assert asked[1] == 3 and len(reward_model.cache) == 3

    # a surrogate step: two subsets the LMM scored (frames in another order), two new ones
    q2 = torch.tensor([9, 0, 9, 20])
    picks = torch.tensor([[3, 1, 2], [7, 0, 4], [0, 1, 2], [2, 4, 6]])
    mixed = reward_model.margins(corpus, q2, picks, torch.ones_like(picks, dtype=torch.bool),
                                 fallback=cheap)
    assert tally.snapshot() == asked  # the LMM was not asked again
    assert mixed[0] == scored[1] and mixed[1] == scored[0]  # its own values, bit for bit
    # the new subsets: the reader's margin, computed here by hand from its logits
    reader = load_reader(surrogate.partition(":")[2])
    for row in (2, 3):
        question = int(q2[row])
        logits = reader_logits(reader, corpus, question, picks[row])
        answer = int(corpus.answer[question])
        wrong = torch.cat([logits[:answer], logits[answer + 1:]])
        wrong = wrong[torch.isfinite(wrong)]
        torch.testing.assert_close(mixed[row], logits[answer] - wrong.max())
    # the surrogate's values differ from the LMM's (so reusing the wrong one would show)
    # and are not stored as the LMM's
    assert not torch.allclose(cheap.margins(corpus, q, seen, valid), scored)
    assert len(reward_model.cache) == 3
    assert subset_key(corpus.qids[9], picks[2], valid[0]) not in reward_model.cache.margins
    assert (reward_model.counts.subsets, cheap.counts.subsets) == (3, 2 + 3)


def reader_logits(reader, corpus, question: int, picks: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    from refocus.reader import read

    q = torch.tensor([question])
    return read(reader, corpus, q, picks[None], torch.ones(1, len(picks), dtype=torch.bool))[0]


@pytest.mark.parametrize("args, message", [
    (["--lmm-every", "3"], "--lmm-every needs --surrogate"),
    (["--surrogate", "reader:x"], "--surrogate needs --lmm-every"),
    (["--surrogate", "reader:x", "--lmm-every", "0"], "must be at least 1"),
    (["--surrogate", "reader:x", "--lmm-every", "-2"], "must be at least 1"),
])
def test_bad_combinations_are_one_line_errors(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--store", str(tmp_path), "--reward", "reader:x", "--out", str(out),
                 *args]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_the_stage_refuses_lmm_every_without_a_surrogate(tmp_path):
    with pytest.raises(UserError, match="needs --surrogate"):
        train_policy_stage(tmp_path, None, "reader:x", tmp_path / "run",
                           GRPOSettings(lmm_every=2), RunSettings())
    assert not (tmp_path / "run").exists()


def test_a_run_written_before_a_setting_existed_still_resumes():
    """run.json of a run written before ``lmm_every`` existed names the same run when the
    new setting is at its default, and another run when it is not."""
    from dataclasses import replace

    from pipelines.learn import same_run
    from refocus.settings import GRPOSettings

    identity = {"store": "/s", "reward": "reader:ab", "settings": GRPOSettings().as_dict()}
    old = {**identity, "settings": {k: v for k, v in identity["settings"].items()
                                    if k != "lmm_every"}}
    old = json.loads(json.dumps(old))
    assert same_run(old, identity)
    assert not same_run(old, {**identity, "settings": replace(GRPOSettings(),
                                                               lmm_every=3).as_dict()})
    assert not same_run(old, {**identity, "reward": "reader:cd"})
