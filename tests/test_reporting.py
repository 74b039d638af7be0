"""--report-to: training metrics streamed to TensorBoard, read back with TensorBoard's own
reader (EventAccumulator) and compared with metrics.jsonl row by row; W&B and TensorBoard
refused in one line when their package is missing."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from flows.cli import EXIT_OK, EXIT_USAGE, main
from pipelines.learn import train_policy_stage, train_reader_stage
from refocus.settings import GRPOSettings, ReaderTrainSettings, RunSettings
from stores.errors import UserError

Points = dict[str, list[tuple[int, float]]]
SETTINGS = GRPOSettings(steps=4, questions_per_step=4, group=3, budgets=(2, 3))
TRAIN_FLAGS = ["--steps", "4", "--questions-per-step", "4", "--group", "3", "--budgets", "2,3",
               "--eval-every", "2", "--hidden", "32"]


def read_events(folder: Path) -> Points:
    """Every scalar of the event files in ``folder``, by tag, as TensorBoard loads them."""
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def expected_points(rows: list[dict[str, Any]]) -> Points:
    """What the rows should show: each number (a nested one as KEY/SUB) under KIND/KEY at the
    row's step, as a float32, and each train row's reward again under train/reward@kBUDGET."""
    points: Points = defaultdict(list)
    for row in rows:
        kind, step = row.get("kind", "train"), row["step"]
        for key, value in row.items():
            if key in ("kind", "step"):
                continue
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, number in items:
                if isinstance(number, int | float):
                    tag = f"{kind}/{key}" if sub is None else f"{kind}/{key}/{sub}"
                    points[tag].append((step, float(np.float32(number))))
        if "budget" in row:
            points[f"{kind}/reward@k{row['budget']}"].append((step, float(np.float32(
                row["reward"]))))
    return dict(points)


def metrics_rows(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reader(synth_store, tmp_path_factory) -> tuple[Path, list[dict]]:
    """A reader trained with --report-to tensorboard, and the log rows it reported."""
    out = tmp_path_factory.mktemp("reporting") / "reader"
    rows: list[dict] = []
    train_reader_stage(synth_store / "features", None, out,
                       ReaderTrainSettings(steps=200, batch_size=32), log=rows.append,
                       report_to="tensorboard")
    return out, rows


def test_train_reader_log_rows_land_in_tensorboard(reader):
    out, rows = reader
    assert [row["step"] for row in rows] == [100, 200]
    assert read_events(out / "tensorboard") == expected_points(rows)


def test_train_streams_every_metrics_row_to_tensorboard(synth_store, reader, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--store", str(synth_store / "features"), "--reward",
                 f"reader:{reader[0]}", "--out", str(run), *TRAIN_FLAGS,
                 "--report-to", "tensorboard"]) == EXIT_OK
    rows = metrics_rows(run)
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 1), ("train", 2), ("val", 2), ("train", 3), ("train", 4), ("val", 4)]
    seen = read_events(run / "tensorboard")
    assert seen == expected_points(rows)
    assert {"train/reward@k2", "train/reward@k3", "train/grad_norm", "train/entropy",
            "val/accuracy@2", "val/reward_subsets"} <= set(seen)


def test_a_resumed_run_shows_each_step_once_as_metrics_jsonl_keeps_it(synth_store, reader,
                                                                      tmp_path):
    """Step 1 without reporting, then (the same run: --report-to is not part of its identity)
    steps 2-3 reported until a crash after step 3's rows, past the checkpoint at step 2; the
    resumed run re-does step 3 and TensorBoard shows it once, as metrics.jsonl does."""
    store, reward, run = synth_store / "features", f"reader:{reader[0]}", tmp_path / "run"
    quiet = RunSettings(eval_every=2, checkpoint_every=2, hidden=32)
    train_policy_stage(store, None, reward, run, SETTINGS, quiet, stop_after=1)
    assert not (run / "tensorboard").exists()
    reporting = dataclasses.replace(quiet, report_to="tensorboard")

    class Killed(Exception):
        pass

    def crash(m) -> None:  # noqa: ANN001
        if m.step == 3:
            raise Killed

    with pytest.raises(Killed):
        train_policy_stage(store, None, reward, run, SETTINGS, reporting, on_step=crash)
    assert read_events(run / "tensorboard")["train/reward"][-1][0] == 3  # written, then lost
    assert max(r["step"] for r in metrics_rows(run)) == 3
    train_policy_stage(store, None, reward, run, SETTINGS, reporting)
    rows = [r for r in metrics_rows(run) if r["step"] >= 2]
    assert [(r["kind"], r["step"]) for r in rows] == [
        ("train", 2), ("val", 2), ("train", 3), ("train", 4), ("val", 4)]
    assert read_events(run / "tensorboard") == expected_points(rows)


@pytest.mark.parametrize("tracker", ["wandb", "tensorboard"])
def test_a_missing_tracker_package_is_refused_in_one_line(synth_store, reader, tmp_path, capsys,
                                                          monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # import fails: as when not installed
    store = str(synth_store / "features")
    for command in (["train", "--reward", f"reader:{reader[0]}", *TRAIN_FLAGS],
                    ["train-reader", "--steps", "100"],
                    ["train-reader", "--distill", "lmm:no/model"]):
        out = tmp_path / "-".join(command[:2])
        assert main([command[0], "--store", store, "--out", str(out), *command[1:],
                     "--report-to", tracker]) == EXIT_USAGE
        err = capsys.readouterr().err.strip()
        assert f"pip install {tracker}" in err and f"--report-to {tracker}" in err
        assert len(err.splitlines()) == 1
        assert not out.exists()  # refused before anything was written


def test_an_unknown_tracker_is_refused(synth_store, tmp_path):
    with pytest.raises(UserError, match="expected one of none, tensorboard, wandb"):
        train_reader_stage(synth_store / "features", None, tmp_path / "r",
                           ReaderTrainSettings(steps=1), report_to="mlflow")
    assert not (tmp_path / "r").exists()
