"""Every error a user can cause is one line, and so is one nobody foresaw (its traceback goes
to a log file, exit 2). Paths and ids print as they are. Damaged plan, marker and weights
files, refused pickles and oversized frames are one line or one left-out frame each.

The command line runs as a real process (``python -m flows.cli``) wherever what a user sees
on the terminal is the point."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, make_video
from PIL import Image

from pipelines.decode import DecodeSettings
from pipelines.encoder import ASSETS, SYNTH_ENCODER
from pipelines.ingest import IngestSettings, ingest
from stores import checkpoints
from stores.errors import UserError
from stores.manifest import build_manifest
from stores.owned import claim
from stores.shards import ShardSet

MARKUP = ("[bold]x[/]", "[/oops]")  # a path holding these must print as it is


def run_cli(*args: str, env: dict[str, str] | None = None, code: str | None = None,
            ) -> subprocess.CompletedProcess:
    """``python -m flows.cli ARGS`` (or ``python -c CODE``) with this tree first on the path."""
    environ = {**os.environ, **(env or {})}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO),
                                                          os.environ.get("PYTHONPATH")]))
    command = ["-c", code] if code else ["-m", "flows.cli", *args]
    return subprocess.run([sys.executable, *command], capture_output=True, text=True,
                          env=environ, timeout=300)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line of a run that could not run (exit 2), no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    return lines[0]


VIDEOS = {"v0": 6, "v1": 5}  # id → frames (every frame kept)


@pytest.fixture(scope="module")
def ingested(tmp_path_factory) -> Path:
    """A real ingest folder: two small videos, one shard each, a question each."""
    root = tmp_path_factory.mktemp("ingested")
    rows: list[tuple[str, dict]] = []
    for vid, frames in VIDEOS.items():
        path = make_video(root / f"{vid}.mp4", frames, fps=10, size=(48, 32))
        rows.append((vid, {"id": vid, "path": str(path)}))
        rows.append((f"q_{vid}", {"qid": f"q_{vid}", "video_id": vid, "question": "What?",
                                  "options": ["a", "b"], "answer": 0}))
    manifest = build_manifest(rows)
    assert not manifest.issues
    summary = ingest(manifest, root / "shards", INGEST)
    assert summary.failed == 0 and summary.shards == 2
    return root / "shards"


INGEST = IngestSettings(decode=DecodeSettings(fps=None, max_frames=None, size=None),
                        shard_size=1, workers=1)


@pytest.fixture
def shards(ingested: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ingested, tmp_path / "shards"))


# ------------------------------------------------------------------------------ catch-all

BUG = """
import sys
import flows.commands.manifests as commands
from flows.cli import main

def read_manifest(path):
    raise RuntimeError("a bug [/oops] in refocus\\nsecond line of the message")

commands.read_manifest = read_manifest
sys.exit(main(["validate", "corpus.jsonl"]))
"""


@pytest.mark.parametrize("where", ["REFOCUS_LOG_DIR", "XDG_STATE_HOME", "unwritable"])
def test_an_unexpected_error_is_one_line_and_its_traceback_is_in_a_log(tmp_path, where):
    env = {"REFOCUS_LOG_DIR": "", "XDG_STATE_HOME": str(tmp_path / "state"),
           "TMPDIR": str(tmp_path / "tmp")}
    (tmp_path / "tmp").mkdir()
    expected = tmp_path / "state" / "refocus" / "logs"
    if where == "REFOCUS_LOG_DIR":
        env["REFOCUS_LOG_DIR"] = str(tmp_path / "my logs")
        expected = tmp_path / "my logs"
    elif where == "unwritable":  # a regular file where the folder should be: the temp folder
        (tmp_path / "a file").write_text("")
        env["REFOCUS_LOG_DIR"] = str(tmp_path / "a file" / "logs")
        expected = tmp_path / "tmp" / "refocus-logs"
    result = run_cli(code=BUG, env=env)
    line = one_error_line(result)
    logs = list(expected.glob("*-validate.log"))
    assert len(logs) == 1, (line, list(tmp_path.rglob("*.log")))
    assert line == ("error: RuntimeError: a bug [/oops] in refocus; "
                    f"traceback in {logs[0]}")
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "second line of the message" in text
    assert "validate corpus.jsonl" in text  # the command line, to reproduce it


def test_an_unforeseen_error_from_a_real_command_is_one_line_not_a_traceback(
        tmp_path, videos):
    """``import -o`` naming a folder failed deep in a rename with a traceback."""
    (tmp_path / "taken").mkdir()
    result = run_cli("import", "folder", str(videos), "-o", str(tmp_path / "taken"),
                     env={"REFOCUS_LOG_DIR": str(tmp_path / "logs")})
    assert "taken" in one_error_line(result)


# ------------------------------------------------------------------------ literal printing

def markup_path(root: Path, name: str) -> Path:
    path = root.joinpath(*f"{MARKUP[0]}/{MARKUP[1]}{name}".split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_validate_prints_a_path_holding_markup_as_it_is(tmp_path):
    manifest = markup_path(tmp_path, ".jsonl")
    manifest.write_text(json.dumps({"id": "v", "path": "[/oops].mp4"}) + "\n"
                        + json.dumps({"qid": "q", "video_id": "[red]w", "question": "?",
                                      "options": ["a", "b"], "answer": 0}) + "\n")
    result = run_cli("validate", str(manifest))
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [
        f"{manifest}: 1 videos, 0 questions, 1 problems",
        f"  {manifest}:2: video_id: unknown video '[red]w' (no video row with this id)",
    ]


def test_an_error_naming_a_path_with_markup_prints_it_as_it_is(tmp_path):
    missing = markup_path(tmp_path, "-missing.jsonl")
    line = one_error_line(run_cli("validate", str(missing)))
    assert line == f"error: {missing}: manifest not found"


def test_ingest_prints_its_summary_and_failures_with_markup_paths_as_they_are(tmp_path):
    """The data landed, then printing the summary crashed (exit 1 expected, not 0 or a
    traceback)."""
    good = make_video(tmp_path / "good.mp4", 4, fps=10, size=(48, 32))
    gone = markup_path(tmp_path, "-gone.mp4")
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_text(json.dumps({"id": "good", "path": str(good)}) + "\n"
                        + json.dumps({"id": "gone", "path": str(gone)}) + "\n")
    out = markup_path(tmp_path, "-out")
    result = run_cli("ingest", str(manifest), "--out", str(out), "--workers", "1")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"ingest → {out}"
    failures = [line for line in lines if line.startswith("  ✗ ")]
    assert len(failures) == 1 and str(gone) in failures[0], result.stdout
    assert set(ShardSet(out).lookup()) == {"good"}


# ------------------------------------------------------------- damaged plan and done markers

DAMAGED = [
    ("plan.json", b'{"version": 1, "settings": {"decode": '),  # cut short (a full disk)
    ("plan.json", b"[]"),
    ("plan.json", b'{"settings": {}, "shards": [["v0"], "v1"]}'),
    ("shard-000001.done.json", b'{"version": 1, "shard": "shard-00'),
    ("shard-000001.done.json", b"\xff\xfe\x00garbage"),
    ("shard-000001.done.json", b'{"shard": "shard-000001.tar"}'),
    ("shard-000001.done.json", b'{"shard": "shard-000001.tar", "samples": [{"video_id": 3}]}'),
]


def remedy(name: str) -> str:
    return "run ingest again" if name == "plan.json" else "run the same ingest again"


@pytest.mark.parametrize("name, content", DAMAGED)
def test_reading_a_damaged_plan_or_done_marker_is_one_line_naming_it(shards, name, content):
    (shards / name).write_bytes(content)
    with pytest.raises(UserError) as caught:
        ShardSet(shards).lookup()
    message = str(caught.value)
    assert message.startswith(f"{shards / name}: damaged (") and remedy(name) in message
    assert "\n" not in message


@pytest.mark.parametrize("name, content", [DAMAGED[0], DAMAGED[3]])
def test_ingest_again_over_a_damaged_plan_or_marker_is_one_line(shards, tmp_path, name,
                                                                  content):
    corpus = Path(shutil.copy(shards / "manifest.jsonl", tmp_path / "corpus.jsonl"))
    (shards / name).write_bytes(content)
    before = {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()}
    result = run_cli("ingest", str(corpus), "--out", str(shards), "--fps", "0", "--max-frames",
                     "0", "--size", "0", "--shard-size", "1", "--workers", "1")
    line = one_error_line(result)
    assert line.startswith(f"error: {shards / name}: damaged (") and remedy(name) in line
    assert {p.name: p.read_bytes() for p in shards.iterdir() if p.is_file()} == before


def test_following_the_damaged_marker_message_rewrites_the_shard(shards):
    marker = shards / "shard-000001.done.json"
    marker.write_text('{"shard": ')
    from stores.manifest import read_manifest

    corpus = read_manifest(shards / "manifest.jsonl")
    with pytest.raises(UserError, match="delete it and run the same ingest again") as caught:
        ingest(corpus, shards, INGEST)
    assert "\n" not in str(caught.value)
    marker.unlink()
    assert ingest(corpus, shards, INGEST).failed == 0
    assert set(ShardSet(shards).lookup()) == set(VIDEOS)


def test_a_damaged_questions_marker_of_the_feature_store_is_written_again(ingested, tmp_path):
    from pipelines.embed import EmbedSettings, embed
    from pipelines.encoder import load_encoder
    from stores.features import FeatureStore
    from stores.manifest import read_manifest

    encoder = load_encoder(SYNTH_ENCODER)
    questions = read_manifest(ingested / "manifest.jsonl")
    settings = EmbedSettings(workers=0, index=None)
    embed(ingested, tmp_path / "features", encoder, settings, questions=questions)
    marker = tmp_path / "features" / "progress" / "questions.done.json"
    written = json.loads(marker.read_text())
    marker.write_text('{"digest": "')  # cut short
    embed(ingested, tmp_path / "features", encoder, settings, questions=questions)
    assert json.loads(marker.read_text()) == written
    assert sorted(FeatureStore(tmp_path / "features").load().qids) == ["q_v0", "q_v1"]


# ------------------------------------------------------------------------- weights files

def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_model_folder_is_one_line(tmp_path):
    folder = checkpoints.save_model(tmp_path / "reader", "reader", {"dim": 3},
                                    {"w": torch.ones(3, 4)})
    cut_in_half(folder / checkpoints.WEIGHTS)
    with pytest.raises(UserError) as caught:
        checkpoints.load_model(folder, "reader")
    message = str(caught.value)
    assert message.startswith(f"{folder / checkpoints.WEIGHTS}: damaged safetensors file")
    assert "\n" not in message
    (folder / checkpoints.CONFIG).write_text('{"kind": "rea')
    with pytest.raises(UserError, match="config.json: damaged"):
        checkpoints.load_model(folder, "reader")


def test_a_damaged_checkpoint_is_one_line(tmp_path):
    run = claim(tmp_path / "run", "run")
    checkpoints.save_checkpoint(run, {"w": torch.ones(64)}, {"step": 3})
    state = run.path / checkpoints.CHECKPOINT / "state.safetensors"
    state.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(UserError) as caught, pytest.warns(UserWarning):
        checkpoints.load_checkpoint(run.path)
    assert str(caught.value).startswith(
        f"{run.path}: no readable checkpoint ({state.parent}: damaged checkpoint skipped")
    assert "\n" not in str(caught.value)


class _Payload:
    """Unpickling this would create a file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def bad_weights(folder: Path, kind: str) -> Path:
    if kind == "truncated":
        weights = folder / "weights.safetensors"
        shutil.copy(ASSETS / f"{SYNTH_ENCODER}.safetensors", weights)
        cut_in_half(weights)
    elif kind == "garbage":
        weights = folder / "weights.safetensors"
        weights.write_bytes(b"this is not a weights file at all" * 8)
    else:  # a pickle whose loading would create the file "ran"
        weights = folder / "open_clip_pytorch_model.bin"
        torch.save({"visual.proj": _Payload(folder / "ran")}, weights)
    return weights


@pytest.mark.parametrize("kind", ["truncated", "garbage", "pickle"])
def test_bad_encoder_weights_are_one_line(tmp_path, kind):
    from pipelines.encoder import load_encoder

    weights = bad_weights(tmp_path, kind)
    with pytest.raises(UserError) as caught:
        load_encoder(SYNTH_ENCODER, str(weights), "cpu")
    message = str(caught.value)
    assert message.startswith(f"{weights}: ") and "\n" not in message
    assert ("refused as a pickle" if kind == "pickle" else "damaged or not a weights file") \
        in message
    assert "convert it with safetensors" in message  # what to do
    assert not (tmp_path / "ran").exists()


@pytest.mark.slow
def test_embed_with_pickle_weights_is_one_line_and_runs_nothing(shards, tmp_path):
    weights = bad_weights(tmp_path, "pickle")
    result = run_cli("embed", "--shards", str(shards), "--out", str(tmp_path / "features"),
                     "--model", SYNTH_ENCODER, "--pretrained", str(weights))
    assert one_error_line(result).startswith(f"error: {weights}: refused as a pickle")
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------------ oversized frames

def claim_size(jpeg: bytes, width: int, height: int) -> bytes:
    """The same JPEG with its frame header (SOF0..SOF2) claiming another size."""
    at = 2
    while True:
        assert jpeg[at] == 0xFF
        marker, length = jpeg[at + 1], int.from_bytes(jpeg[at + 2:at + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            size = height.to_bytes(2, "big") + width.to_bytes(2, "big")
            return jpeg[:at + 5] + size + jpeg[at + 9:]
        at += 2 + length


def plant_huge_frame(shards: Path, video: str, frame: int) -> bytes:
    """Replace one frame in its shard tar (in place, same length) by one claiming
    20000 × 20000 pixels (400 Mpx); returns the original JPEG."""
    shard_set = ShardSet(shards)
    original = shard_set.read(video).frames[frame]
    tar = shards / shard_set.lookup()[video].shard
    blob = tar.read_bytes()
    assert blob.count(original) == 1
    tar.write_bytes(blob.replace(original, claim_size(original, 20000, 20000)))
    return original


def rgb(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def test_lmms_eval_leaves_an_oversized_frame_out_and_names_it(shards, tmp_path):
    from pipelines.lmms_eval import SelectedFrames
    from stores.selections import FrameSelection, SelectionsMeta, write_selections

    plant_huge_frame(shards, "v0", 2)
    sample = ShardSet(shards).read("v0")
    times = sample.meta["timestamps"]
    picks = [1, 2, 4]
    write_selections(tmp_path / "scored", [FrameSelection(
        qid="q", video_id="v0", question="What?", options=["a", "b"], k=3,
        frame_indices=picks, timestamps=[times[i] for i in picks], probabilities=[0.5] * 3,
        source="v0.mp4")], SelectionsMeta(policy="test", k=3, shards=str(shards), features=""))
    got = SelectedFrames(tmp_path / "scored").frames("q")
    assert got.frame_indices == [1, 4] and got.timestamps == [times[1], times[4]]
    shard = shards / ShardSet(shards).lookup()["v0"].shard
    with tarfile.open(shard) as tar:  # an independent read of the two frames kept
        expected = [rgb(tar.extractfile(f"v0.{i:06d}.jpg").read()) for i in (1, 4)]
    for image, want in zip(got.images, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(image), want)
    assert len(got.failed) == 1
    assert "'v0' frame 2: 400000000 pixels, over refocus's cap" in got.failed[0]


def test_the_lmm_reference_refuses_an_oversized_frame_in_one_line(shards):
    from refocus.lmm_reference import ShardFrames

    plant_huge_frame(shards, "v1", 3)
    frames = ShardFrames(str(shards), scorer=None)  # type: ignore[arg-type]  (images only)
    assert len(frames.images("v0")) == VIDEOS["v0"]
    with pytest.raises(UserError) as caught:
        frames.images("v1")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{shards / 'shard-000001.tar'}: video 'v1' frame 3: "
                              "400000000 pixels, over refocus's cap")


def test_a_frame_over_the_cap_but_under_pils_own_limit_is_refused_before_decoding(ingested):
    from refocus.lmm_reference import decode_jpeg

    jpeg = ShardSet(ingested).read("v0").frames[0]
    with pytest.raises(UserError) as caught:
        decode_jpeg(claim_size(jpeg, 9000, 9000))  # 81 Mpx: over 67, under PIL's 89
    assert str(caught.value).startswith("frame: 9000×9000 pixels, over refocus's cap")
    assert decode_jpeg(jpeg).shape == (32, 48, 3)
