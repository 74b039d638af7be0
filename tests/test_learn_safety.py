"""The learning stages never lose a user's files and never guess: train-reader, train and
eval write only into folders refocus owns (a foreign folder, the store itself: exit 2, nothing
touched); a run folder is locked (a second concurrent run: exit 2); a run killed right after
its best policy, or between the renames of a checkpoint, finishes its outputs (or resumes from
the complete copy) when re-run; a damaged checkpoint is skipped for an older complete one; a
policy carries the encoder and candidate settings it needs to be scored elsewhere; questions
without a split, train/val sharing a video, a missing val split, --group 1 and --temperature 0
are refused in one line; evidence spans without a candidate frame are reported and left out of
the evidence recall.

A small feature store is written straight from random features (no videos, no encoder)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import kill_parent_and_wait_for_workers
from safetensors.torch import load_file

from flows.cli import EXIT_USAGE, main
from pipelines.learn import (
    RunSettings,
    evaluate_stage,
    load_policy,
    train_policy_stage,
    train_reader_stage,
)
from refocus.settings import GRPOSettings, ReaderTrainSettings
from stores import checkpoints
from stores.errors import UserError
from stores.features import FeatureWriter, Layout
from stores.manifest import Question, Video
from stores.shards import MANIFEST_FILE

REPO = Path(__file__).resolve().parents[1]
VIDEOS, FRAMES, DIM = 24, 10, 16  # frames every 0.5 s: a video spans 0 … 4.5 s
# candidates other than the defaults (fps 4, 512 frames, 384 px), as `ingest` records them
CANDIDATES = {"fps": 2.0, "max_frames": 64, "size": 96, "stream": 0, "max_decode_errors": 0,
              "jpeg_quality": 80, "shard_size": 5}
ENCODER = {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k", "dim": DIM,
           "weights_sha256": "ab" * 32, "config_sha256": "cd" * 32}
SETTINGS = GRPOSettings(steps=6, questions_per_step=8, group=4, budgets=(2, 3), warmup=2)
RUN = RunSettings(eval_every=2, checkpoint_every=2, hidden=16)
TRAIN_ARGS = ["--questions-per-step", "8", "--group", "4", "--budgets", "2,3", "--hidden", "16"]


def split_of(i: int) -> str:
    return "val" if i % 4 == 0 else "test" if i % 4 == 1 else "train"


def questions(**changes: dict) -> list[Question]:
    """One question per video (q<i>) and a second one on videos 0-3 (x<i>), split by video;
    ``changes`` maps a qid to fields replaced."""
    rows = [Question(f"q{i}", f"v{i}", "which one?", ("a", "b", "c"), i % 3,
                     split=split_of(i)) for i in range(VIDEOS)]
    rows += [Question(f"x{i}", f"v{i}", "and this?", ("a", "b", "c"), (i + 1) % 3,
                      split=split_of(i)) for i in range(4)]
    return [Question(**{**asdict(q), **changes.get(q.qid, {})}) for q in rows]


def write_manifest(path: Path, rows: list[Question]) -> Path:
    lines = [Video(f"v{i}", f"/videos/v{i}.mp4").to_row() for i in range(VIDEOS)]
    lines += [q.to_row() for q in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def write_store(root: Path) -> Path:
    """A feature store of random unit features with its ingested manifest; returns it."""
    rng = np.random.default_rng(5)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    shards = root / "shards"
    shards.mkdir(parents=True)
    ids = [f"v{i}" for i in range(VIDEOS)]
    writer = FeatureWriter(root / "features", Layout(ids, [FRAMES] * VIDEOS), ENCODER,
                           {"shards": str(shards), "settings": CANDIDATES})
    writer.write_shard(0, slice(0, VIDEOS * FRAMES),
                       unit(rng.standard_normal((VIDEOS * FRAMES, DIM))),
                       np.tile(np.arange(FRAMES) * 0.5, VIDEOS), slice(0, VIDEOS),
                       np.full(VIDEOS, FRAMES * 0.5), {})
    rows = questions()
    asked = unit(rng.standard_normal((len(rows), DIM)))
    writer.write_questions([q.qid for q in rows], np.array([int(q.video_id[1:]) for q in rows]),
                           np.array([q.answer for q in rows]), asked, asked,
                           np.arange(0, 3 * len(rows) + 1, 3),
                           unit(rng.standard_normal((3 * len(rows), DIM))), digest="toy")
    write_manifest(shards / MANIFEST_FILE, rows)
    return root / "features"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread here as in the subprocesses (OMP_NUM_THREADS=1): the same float sums
    in both, and no oversubscribed cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> tuple[Path, str]:
    """(feature folder, reward spec of a reader briefly trained on it)."""
    root = tmp_path_factory.mktemp("learn-safety")
    store = write_store(root)
    train_reader_stage(store, None, root / "reader", ReaderTrainSettings(steps=30, batch_size=16))
    return store, f"reader:{root / 'reader'}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    """A folder of the user's: their own files, some named like refocus's."""
    for name in ("thesis.tex", "policy/notes.txt", "checkpoint/mine.bin", "notes.tmp",
                 "draft.old/a.txt"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(f"the user's {name}\n")
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)


ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------- owned folders

def test_out_folders_that_are_not_refocus_own_are_refused_and_left_alone(toy, tmp_path,
                                                                           capsys):
    store, reward = toy
    mine = user_folder(tmp_path / "mine")
    before, store_before = snapshot(mine), snapshot(store)
    commands = [
        ["train-reader", "--store", str(store), "--out", str(mine), "--steps", "2"],
        ["train-reader", "--store", str(store), "--out", str(store), "--steps", "2"],
        ["train", "--store", str(store), "--reward", reward, "--out", str(mine), "--steps", "2",
         *TRAIN_ARGS],
        ["train", "--store", str(store), "--reward", reward, "--out", str(store),
         "--steps", "2", *TRAIN_ARGS],
        ["eval", "--store", str(store), "--reward", reward, "--split", "val", "--k", "2",
         "--methods", "uniform", "--out", str(mine)],
    ]
    for command in commands:
        assert main(command) == EXIT_USAGE, command
        err = capsys.readouterr().err
        assert "--out" in err and ("not empty" in err or "input" in err), err
    assert snapshot(mine) == before and snapshot(store) == store_before


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(toy, tmp_path):
    store, reward = toy
    run = tmp_path / "run"
    command = [sys.executable, "-m", "flows.cli", "train", "--store", str(store), "--reward",
               reward, "--out", str(run), "--steps", "100000", "--eval-every", "100000",
               "--checkpoint-every", "100000", *TRAIN_ARGS]
    first = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / "metrics.jsonl").is_file() or \
                not (run / "metrics.jsonl").read_text().strip():
            assert first.poll() is None and time.monotonic() < deadline, "first run not training"
            time.sleep(0.1)
        second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None  # the first is still training
    finally:
        kill_parent_and_wait_for_workers(first)
    assert second.returncode == EXIT_USAGE, second.stdout + second.stderr
    assert "in use by another process" in " ".join(second.stderr.split())
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if line.strip()]
    assert steps == list(range(1, len(steps) + 1))  # one writer: no interleaved rows


# ----------------------------------------------------------------------------- completion

KILL = """
import json, os, signal, sys
from pathlib import Path
from stores import checkpoints
from pipelines.learn import RunSettings, train_policy_stage
from refocus.settings import GRPOSettings
store, reward, out, point, settings, run = sys.argv[1:7]
if point == "after-policy":  # SIGKILL right after the best policy is saved
    write = checkpoints.write_model
    def write_then_die(owned, *args, **kwargs):
        write(owned, *args, **kwargs)
        if owned.path == Path(out).resolve():  # the run folder: its best policy
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoints.write_model = write_then_die
else:  # SIGKILL after checkpoint/ became checkpoint.old, before the new one is renamed in
    replace = os.replace
    def replace_then_die(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if str(dst).endswith("checkpoint.old"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace_then_die
train_policy_stage(store, None, reward, out, GRPOSettings(**json.loads(settings)),
                   RunSettings(**json.loads(run)))
"""


def killed_run(toy, out: Path, point: str) -> None:
    store, reward = toy
    done = subprocess.run([sys.executable, "-c", KILL, str(store), reward, str(out), point,
                           json.dumps(SETTINGS.as_dict()), json.dumps(asdict(RUN))],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr


def assert_final_outputs_match_the_checkpoint(run: Path) -> None:
    state = load_file(run / "checkpoint" / "state.safetensors")
    for folder, prefix in ((".", "best."), ("policy-last", "policy.")):
        weights = load_policy(run / folder).state_dict()
        assert weights.keys() == {k[len(prefix):] for k in state if k.startswith(prefix)}
        for key, value in weights.items():
            assert torch.equal(value, state[prefix + key]), (folder, key)
    assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    complete = json.loads((run / "complete.json").read_text())
    assert complete["steps"] == SETTINGS.steps


@pytest.mark.slow
def test_a_run_killed_right_after_its_policy_writes_the_rest_when_re_run(toy, tmp_path):
    run = tmp_path / "run"
    killed_run(toy, run, "after-policy")
    assert (run / "config.json").is_file()
    assert not (run / "policy-last").exists() and not (run / "training.png").exists()
    assert not (run / "complete.json").exists()
    store, reward = toy
    summary = train_policy_stage(store, None, reward, run, SETTINGS, RUN)
    assert summary["finished"] and summary["steps"] == SETTINGS.steps
    assert_final_outputs_match_the_checkpoint(run)


def test_missing_final_outputs_of_a_finished_run_come_back(toy, tmp_path):
    store, reward = toy
    run = tmp_path / "run"
    train_policy_stage(store, None, reward, run, SETTINGS, RUN)
    shutil.rmtree(run / "policy-last")
    (run / "training.png").unlink()
    train_policy_stage(store, None, reward, run, SETTINGS, RUN)
    assert_final_outputs_match_the_checkpoint(run)


@pytest.mark.slow
def test_a_kill_between_checkpoint_renames_resumes_from_the_complete_copy(toy, tmp_path):
    store, reward = toy
    straight = tmp_path / "straight"
    train_policy_stage(store, None, reward, straight, SETTINGS, RUN)
    run = tmp_path / "run"
    killed_run(toy, run, "between-renames")  # during the step-4 checkpoint
    assert not (run / "checkpoint").exists()
    assert json.loads((run / "checkpoint.tmp" / "state.json").read_text())["step"] == 4
    started = []
    summary = train_policy_stage(store, None, reward, run, SETTINGS, RUN,
                                 on_start=lambda total, done: started.append(done))
    assert started == [4] and summary["steps"] == SETTINGS.steps
    a = load_file(straight / "checkpoint" / "state.safetensors")
    b = load_file(run / "checkpoint" / "state.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    strip = lambda p: [{k: v for k, v in json.loads(line).items()  # noqa: E731
                        if not k.endswith("seconds") and k != "cache_hits"}
                       for line in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(run) == strip(straight)
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint"]


def test_a_damaged_checkpoint_is_skipped_for_the_older_complete_one(toy, tmp_path):
    store, reward = toy
    run = tmp_path / "run"
    train_policy_stage(store, None, reward, run, SETTINGS, RUN, stop_after=2)
    shutil.copytree(run / "checkpoint", tmp_path / "at-2")
    train_policy_stage(store, None, reward, run, SETTINGS, RUN, stop_after=2)
    (tmp_path / "at-2").rename(run / "checkpoint.old")  # as a kill before its removal leaves
    (run / "checkpoint" / "state.safetensors").write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match="damaged checkpoint skipped"):
        loaded = checkpoints.load_checkpoint(run)
    assert loaded.copy == "checkpoint.old" and loaded.meta["step"] == 2
    started = []
    with pytest.warns(UserWarning, match="damaged checkpoint skipped"):
        train_policy_stage(store, None, reward, run, SETTINGS, RUN,
                           on_start=lambda total, done: started.append(done))
    assert started == [2]
    assert json.loads((run / "complete.json").read_text())["steps"] == SETTINGS.steps
    (run / "checkpoint" / "state.safetensors").write_bytes(b"\x00" * 64)  # the only copy
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no readable checkpoint"):
        train_policy_stage(store, None, reward, run, SETTINGS, RUN)


# ----------------------------------------------------------------------------- scoring elsewhere

def test_a_policy_carries_its_encoder_and_candidates_to_another_machine(toy, tmp_path):
    from pipelines.decode import DecodeSettings
    from pipelines.ingest import IngestSettings
    from pipelines.score import ScoreSettings, encoder_args, find_policy, ingest_settings

    store, reward = toy
    moved_store = tmp_path / "features"
    shutil.copytree(store, moved_store)
    run = tmp_path / "run"
    train_policy_stage(moved_store, None, reward, run, SETTINGS, RUN)
    shutil.rmtree(moved_store)  # the training store is not where run.json says
    elsewhere = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, elsewhere)
    for path in (elsewhere, elsewhere / "policy-last"):
        policy = find_policy(path)
        expected = IngestSettings(decode=DecodeSettings(fps=2.0, max_frames=64, size=96),
                                  jpeg_quality=80, shard_size=5, workers=3)
        assert ingest_settings(policy, 3) == expected
        assert encoder_args(policy, ScoreSettings()) == ("ViT-B-32", "laion2b_s34b_b79k")


def test_another_encoder_than_the_policys_is_refused_in_one_line(toy, tmp_path, tiny_clip):
    from pipelines.score import ScoreSettings, encoder_args, find_policy

    store, reward = toy
    run = tmp_path / "run"
    train_policy_stage(store, None, reward, run, SETTINGS, RUN)
    policy = find_policy(run)
    same = ScoreSettings(model="ViT-B-32", pretrained="laion2b_s34b_b79k")
    assert encoder_args(policy, same) == ("ViT-B-32", "laion2b_s34b_b79k")
    config, weights = tiny_clip
    with pytest.raises(UserError) as caught:
        encoder_args(policy, ScoreSettings(model=str(config), pretrained=str(weights)))
    message = str(caught.value)
    assert "\n" not in message and str(config) in message and "ViT-B-32" in message


def test_a_policy_without_records_and_without_its_store_is_refused(tmp_path):
    from pipelines.score import ScoreSettings, encoder_args, find_policy, ingest_settings
    from refocus.policy import FrameSelector, PolicyConfig

    config = PolicyConfig(dim=DIM, hidden=16)
    checkpoints.save_model(tmp_path / "policy", "policy", config.as_dict(),
                           FrameSelector(config).state_dict())  # as older versions saved it
    policy = find_policy(tmp_path / "policy")
    with pytest.raises(UserError, match="records no candidate-frame settings"):
        ingest_settings(policy, 1)
    with pytest.raises(UserError, match="--model/--pretrained"):
        encoder_args(policy, ScoreSettings())


# ----------------------------------------------------------------------------- bad training input

@pytest.mark.parametrize(("changes", "expected"), [
    ({"q6": {"split": None}}, "question q6 has no split (1 of 28 questions"),
    ({"x1": {"split": "train"}}, "video v1 has train questions and test question q1"),
    ({f"q{i}": {"split": "train"} for i in range(0, VIDEOS, 4)}
     | {f"x{i}": {"split": "train"} for i in (0,)}, "no questions in the 'val' split"),
])
def test_questions_unfit_to_learn_from_are_refused(toy, tmp_path, capsys, changes, expected):
    store, reward = toy
    qa = write_manifest(tmp_path / "qa.jsonl", questions(**changes))
    assert main(["train", "--store", str(store), "--qa", str(qa), "--reward", reward,
                 "--out", str(tmp_path / "run"), "--steps", "2", *TRAIN_ARGS]) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err and str(qa) in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    if "val" not in expected:
        assert main(["train-reader", "--store", str(store), "--qa", str(qa), "--out",
                     str(tmp_path / "reader"), "--steps", "2"]) == EXIT_USAGE
        assert expected in " ".join(capsys.readouterr().err.split())


def test_training_without_val_needs_asking_for_it(toy, tmp_path):
    store, reward = toy
    qa = write_manifest(tmp_path / "qa.jsonl", questions(
        **{q.qid: {"split": "train"} for q in questions() if q.split == "val"}))
    summary = train_policy_stage(store, [str(qa)], reward, tmp_path / "run", SETTINGS,
                                 RunSettings(**{**asdict(RUN), "val_split": "train"}))
    assert summary["finished"] and summary["best"]["validation"]


@pytest.mark.parametrize("option", [["--group", "1"], ["--temperature", "0"]])
def test_a_group_of_one_and_temperature_zero_are_refused(toy, tmp_path, capsys, option):
    store, reward = toy
    command = ["train", "--store", str(store), "--reward", reward, "--out",
               str(tmp_path / "run"), "--steps", "2", *TRAIN_ARGS, *option]
    assert main(command) == EXIT_USAGE
    err = " ".join(capsys.readouterr().err.split())
    assert option[0] in err and "must be" in err
    assert not (tmp_path / "run").exists()
    field, value = option[0][2:], float(option[1])
    with pytest.raises(ValueError, match=option[0]):
        GRPOSettings(**{field: int(value) if field == "group" else value})


# ----------------------------------------------------------------------------- evaluation

def test_evidence_spans_without_a_candidate_frame_are_reported_not_missed(toy, tmp_path):
    store, reward = toy
    # q0 (val, video v0: frames at 0, 0.5 … 4.5 s): one span with frames, one past the end
    qa = write_manifest(tmp_path / "qa.jsonl", questions(
        q0={"evidence": ((1.0, 2.0), (20.0, 21.0))}))
    out = tmp_path / "eval"
    table = evaluate_stage(store, [str(qa)], "val", [FRAMES], reward, (), ["uniform"], out)
    row = next(r for r in table if r.category == "all")
    assert row.evidence_recall == 1.0  # all frames chosen: the one span that has frames is hit
    assert row.spans_without_frames == 1
    assert "1 evidence span(s)" in (out / "eval.md").read_text()
