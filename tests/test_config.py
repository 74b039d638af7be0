"""--config FILE.yaml (issue 16) and each default declared once (issue 15)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_video

from flows.cli import build_parser, main
from flows.config import CONFIG_FILE, apply_config, command_of
from flows.runtime import Orchestration
from pipelines.decode import DecodeSettings
from pipelines.ingest import IngestSettings
from pipelines.settings import EmbedSettings, ScoreSettings, TrainSettings
from refocus import __version__
from refocus.settings import GRPOSettings, PolicyConfig, ReaderTrainSettings, RunSettings
from stores.errors import UserError
from stores.shards import question_manifests, read_questions

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str]):
    parser = build_parser()
    apply_config(parser, argv)
    return parser.parse_args(argv)


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    return make_video(tmp_path / "clip.mp4", frames=30, fps=25)


def plan_settings(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())["settings"]


# ----------------------------------------------------------------------------- --config

def test_a_config_file_sets_the_settings_and_a_flag_overrides_it(tmp_path, clip):
    config = write_yaml(tmp_path / "ingest.yaml", {
        "inputs": [str(clip)], "out": str(tmp_path / "shards"), "fps": 5,
        "max_frames": 3, "size": 32, "jpeg-quality": 55, "shard-size": 2, "workers": 1})
    assert main(["ingest", "--config", str(config), "--fps", "10"]) == 0
    # the plan records the IngestSettings the run used (their output-changing part)
    assert plan_settings(tmp_path / "shards") == {
        "fps": 10.0, "max_frames": 3, "size": 32, "stream": 0, "max_decode_errors": 0,
        "jpeg_quality": 55, "shard_size": 2}


def test_config_values_go_through_the_flags_types(tmp_path):
    config = write_yaml(tmp_path / "train.yaml", {
        "store": "feats", "reward": "reader:r", "out": "run", "budgets": [4, 8],
        "loss_norm": "sequence", "drop-zero-variance": True, "qa": ["a.jsonl", "b.jsonl"],
        "hidden": 32, "lr": "1e-3"})
    args = parse(["train", "--config", str(config), "--hidden", "16"])
    assert (args.store, args.out, args.reward) == (Path("feats"), Path("run"), "reader:r")
    assert args.budgets == (4, 8) and args.loss_norm == "sequence"
    assert args.drop_zero_variance is True and args.qa == ["a.jsonl", "b.jsonl"]
    assert (args.hidden, args.lr) == (16, 0.001)
    assert args.steps == GRPOSettings().steps  # not in the file: the default


def run_cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *argv], capture_output=True,
                          text=True, cwd=cwd, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin"})


@pytest.mark.parametrize(("values", "expected"), [
    ({"max-frame": 8}, "unknown key 'max-frame' for refocus ingest (its options: refocus "
                       "ingest --help)"),
    ({"max_frames": "many"}, "max_frames: not an integer: 'many'"),
    ({"retry-failed": 3}, "retry-failed: expected true or false, got 3"),
    ({"jpeg-quality": [1, 2]}, "jpeg-quality: not an integer: '1,2'"),
    ({"size": None}, "size: expected a value, got null"),
    ({"shard-size": 0}, "shard-size: must be at least 1, got 0"),
])
def test_an_unknown_key_or_a_wrong_type_is_one_line_naming_key_and_file(tmp_path, values,
                                                                        expected):
    config = write_yaml(tmp_path / "bad.yaml", values)
    with pytest.raises(UserError) as e:
        parse(["ingest", "clip.mp4", "--out", "shards", "--config", str(config)])
    assert str(e.value) == f"{config}: {expected}"


def test_a_bad_config_exits_2_with_one_line_and_writes_nothing(tmp_path, clip):
    config = write_yaml(tmp_path / "bad.yaml", {"max-frame": 8})
    result = run_cli("ingest", str(clip), "--out", "shards", "--config", str(config),
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {config}: unknown key 'max-frame' for "
                                          "refocus ingest (its options: refocus ingest --help)"]
    assert not (tmp_path / "shards").exists()


def test_a_config_written_for_another_command_is_refused(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"command": "ingest", "batch-size": 8})
    with pytest.raises(UserError, match=r"c.yaml: written for refocus ingest, not refocus "
                                        r"embed$"):
        parse(["embed", "--shards", "s", "--out", "o", "--config", str(config)])


def test_the_resolved_config_lands_in_the_output_folder_and_reruns_the_same(tmp_path, clip):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["ingest", str(clip), "--out", str(first), "--max-frames", "4", "--size",
                 "16", "--workers", "1"]) == 0
    resolved = yaml.safe_load((first / CONFIG_FILE).read_text())
    assert resolved["command"] == "ingest" and resolved["refocus-version"] == __version__
    assert resolved["max-frames"] == 4 and resolved["size"] == 16
    assert resolved["fps"] == DecodeSettings().fps
    assert resolved["inputs"] == [str(clip)] and resolved["out"] == str(first)

    argv = ["ingest", "--config", str(first / CONFIG_FILE), "--out", str(second)]
    assert main(argv) == 0
    assert plan_settings(second) == plan_settings(first)
    again = yaml.safe_load((second / CONFIG_FILE).read_text())
    assert again == {**resolved, "out": str(second)}
    original = vars(parse(["ingest", str(clip), "--out", str(second), "--max-frames", "4",
                           "--size", "16", "--workers", "1"]))
    assert {k: v for k, v in vars(parse(argv)).items() if k != "config"} == \
        {k: v for k, v in original.items() if k != "config"}


def test_a_folder_refocus_does_not_own_gets_no_config(tmp_path, clip):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own")
    assert main(["ingest", str(clip), "--out", str(mine)]) == 2  # refused, nothing written
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------- defaults

# (command, flag's dest, settings dataclass, field): the flag's default is that field's
FIELD_FLAGS = [
    *((["ingest"], name, DecodeSettings, name)
      for name in ("fps", "max_frames", "size", "stream", "threads", "max_decode_errors")),
    *((["ingest"], name, IngestSettings, name)
      for name in ("jpeg_quality", "shard_size", "workers")),
    *((["flow", "preprocess"], name, DecodeSettings, name)
      for name in ("fps", "max_frames", "size")),
    (["flow", "preprocess"], "shard_size", IngestSettings, "shard_size"),
    (["flow", "preprocess"], "batch_size", EmbedSettings, "batch_size"),
    (["embed"], "batch_size", EmbedSettings, "batch_size"),
    (["embed"], "workers", EmbedSettings, "workers"),
    (["score"], "workers", ScoreSettings, "ingest_workers"),
    (["score"], "embed_workers", EmbedSettings, "workers"),
    (["score"], "batch_size", EmbedSettings, "batch_size"),
    (["score"], "export", ScoreSettings, "export"),
    (["flow", "score"], "export", ScoreSettings, "export"),
    *((["train"], name, RunSettings, name)
      for name in ("eval_every", "checkpoint_every", "hidden", "reference_batch", "val_split")),
    *((["flow", "preprocess"], name, Orchestration, name)
      for name in ("workers", "retries", "retry_delay")),
    *((["train-encoder"], name, TrainSettings, name)
      for name in ("minutes", "seed", "batch_size")),
]


def test_each_flag_reads_its_default_from_the_settings_dataclass(monkeypatch):
    """Change each field's default: the flag follows (the number is declared only there)."""
    expected = {}
    for i, (_command, _dest, settings, name) in enumerate(FIELD_FLAGS):
        field = next(f for f in dataclasses.fields(settings) if f.name == name)
        changed = "changed" if isinstance(getattr(settings(), name, None), str) else 7000 + i
        if field.default_factory is not dataclasses.MISSING:
            monkeypatch.setattr(field, "default_factory", lambda value=changed: value)
        else:
            monkeypatch.setattr(field, "default", changed)
        expected[(settings, name)] = changed
    parser = build_parser()
    for command, dest, settings, name in FIELD_FLAGS:
        leaf, _ = command_of(parser, command)
        assert leaf.get_default(dest) == expected[(settings, name)], (command, dest)


def test_each_flag_default_equals_its_settings_default():
    parser = build_parser()

    def default(command: list[str], dest: str):
        return command_of(parser, command)[0].get_default(dest)

    for command, dest, settings, name in FIELD_FLAGS:
        assert default(command, dest) == getattr(settings(), name), (command, dest)
    grpo = GRPOSettings()
    for dest, name in [("steps", "steps"), ("group", "group"), ("budgets", "budgets"),
                       ("questions_per_step", "questions_per_step"), ("lr", "lr"),
                       ("entropy", "entropy_coef"), ("temperature", "temperature"),
                       ("curriculum", "curriculum"), ("seed", "seed"),
                       ("filter_statistic", "filter_statistic"), ("loss_norm", "loss_norm"),
                       ("scale_rewards", "scale_rewards"), ("std_floor", "std_floor"),
                       ("updates_per_rollout", "updates_per_rollout"),
                       ("clip_eps", "clip_eps"), ("kl_coef", "kl_coef")]:
        assert default(["train"], dest) == getattr(grpo, name), dest
    reader = ReaderTrainSettings()
    for name in ("steps", "batch_size", "lr", "seed"):
        assert default(["train-reader"], name) == getattr(reader, name), name
    # the policy's width is PolicyConfig's
    assert (RunSettings().hidden, RunSettings().layers) == (PolicyConfig(dim=8).hidden,
                                                            PolicyConfig(dim=8).layers)


@pytest.mark.slow  # imports prefect
def test_the_preprocess_flow_takes_the_settings_defaults():
    import inspect

    from flows.orchestrate import preprocess_flow
    from flows.runtime import Orchestration

    signature = inspect.signature(preprocess_flow.fn).parameters
    decode = DecodeSettings()
    assert {k: signature[k].default for k in ("fps", "max_frames", "size", "shard_size",
                                                "batch_size", "retries")} == {
        "fps": decode.fps, "max_frames": decode.max_frames, "size": decode.size,
        "shard_size": IngestSettings().shard_size, "batch_size": EmbedSettings().batch_size,
        "retries": Orchestration().retries}


# ----------------------------------------------------------------------------- questions

def test_the_question_manifests_are_the_given_ones_else_the_ingested_one(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    assert question_manifests(None, shards) == []  # ingested from bare videos: none
    assert question_manifests(None, None) == []
    (shards / "manifest.jsonl").write_text("")
    assert question_manifests(None, shards) == [shards / "manifest.jsonl"]
    assert question_manifests(["a.jsonl"], shards) == [Path("a.jsonl")]
    with pytest.raises(UserError, match=r"missing.jsonl: manifest not found$"):
        read_questions([tmp_path / "missing.jsonl"], shards)  # a given one must exist
