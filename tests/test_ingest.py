"""refocus ingest end to end: real videos in, WebDataset shards out, read back with
webdataset's own reader; bad input recorded; resume after kill -9 ends as an uninterrupted
run would."""

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from conftest import GOOD_VIDEOS, held_by_another_process, kill_parent_and_wait_for_workers
from PIL import Image

from flows.cli import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, main
from pipelines.decode import DecodeSettings, VideoDecoder
from stores.shards import ShardSet

REFOCUS = str(Path(sys.executable).parent / "refocus")


def run_cli(*args) -> int:
    return main([str(a) for a in args])


def read_back(out: Path) -> dict[str, dict]:
    """Every sample in the shards, read by webdataset's WebDataset."""
    tars = sorted(str(p) for p in out.glob("shard-*.tar"))
    samples = {}
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        frames = sorted(k for k in sample if k.endswith(".jpg"))
        samples[sample["__key__"]] = {
            "meta": json.loads(sample["json"]),
            "frames": [sample[k] for k in frames],
            "names": frames,
        }
    return samples


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.glob("shard-*.tar"))}


def test_every_real_video_and_every_bad_input(tmp_path, videos, bad_inputs):
    out = tmp_path / "out"
    inputs = [videos, *bad_inputs.values()]  # the shared folder holds corrupted.mp4 too
    code = run_cli("ingest", *inputs, "--out", out, "--shard-size", "3", "--workers", "2")
    assert code == EXIT_FAILURES

    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    reasons = {Path(f["where"]).name: f["error"] for f in failures}
    assert set(reasons) == {"corrupted.mp4", "missing.mp4", "empty.mp4", "notes.mp4",
                            "zero_stream.mp4"}
    assert "Invalid data found when processing input" in reasons["corrupted.mp4"]
    assert reasons["missing.mp4"] == "file not found"
    assert reasons["empty.mp4"] == "empty file (0 bytes)"
    assert reasons["notes.mp4"].startswith("cannot open as a video")
    assert reasons["zero_stream.mp4"] == "no frames: the video stream is empty"
    assert all("\n" not in r for r in reasons.values())

    summary = json.loads((out / "summary.json").read_text())
    assert (summary["videos"], summary["failed"]) == (10, 5)
    assert len(summary["failures"]) == 5

    samples = read_back(out)
    assert sorted(samples) == sorted(Path(n).stem for n in GOOD_VIDEOS)
    assert summary["frames"] == sum(len(s["frames"]) for s in samples.values())
    for key, sample in samples.items():
        meta = sample["meta"]
        assert meta["video_id"] == key
        for field in ("source", "duration", "fps", "width", "height", "timestamps"):
            assert field in meta
        times = meta["timestamps"]
        assert len(times) == len(sample["frames"]) > 0
        assert all(b > a for a, b in zip(times, times[1:], strict=False))
        assert sample["names"] == [f"{i:06d}.jpg" for i in range(len(times))]
        first = Image.open(io.BytesIO(sample["frames"][0]))
        assert first.format == "JPEG" and first.size == (meta["width"], meta["height"])
        assert min(first.size) <= 384


def test_shards_hold_the_decoded_frames_at_their_timestamps(tmp_path, videos):
    out = tmp_path / "out"
    assert run_cli("ingest", videos / "nasa_13013.mp4", "--out", out, "--fps", "2",
                   "--jpeg-quality", "95") == EXIT_OK
    sample = read_back(out)["nasa_13013"]
    with VideoDecoder(videos / "nasa_13013.mp4", DecodeSettings(fps=2)) as video:
        direct = list(video.candidates())
    assert sample["meta"]["timestamps"] == [f.time for f in direct]
    for jpeg, frame in zip(sample["frames"], direct, strict=True):
        decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).astype(int)
        assert np.abs(decoded - frame.rgb.astype(int)).mean() < 3.0  # JPEG loss only


def test_exact_mode_keeps_every_frame_and_ffmpeg_timestamps(tmp_path, videos, shared_data):
    out = tmp_path / "out"
    assert run_cli("ingest", videos / "nasa_13013.mp4", "--out", out, "--fps", "0",
                   "--max-frames", "0", "--size", "0") == EXIT_OK
    meta = read_back(out)["nasa_13013"]["meta"]
    ref = json.loads((shared_data / "reference" /
                      "nasa_13013.mp4.stream0.all_frames_info.json").read_text())
    assert len(meta["timestamps"]) == 325
    assert max(abs(a - float(r["pts_time"])) for a, r in
               zip(meta["timestamps"], ref, strict=True)) < 1e-6
    assert (meta["width"], meta["height"]) == (320, 180)


def test_lookup_gives_random_access_equal_to_a_full_read(tmp_path, good_corpus):
    out = tmp_path / "out"
    assert run_cli("ingest", good_corpus, "--out", out, "--shard-size", "4",
                   "--workers", "1") == EXIT_OK
    samples = read_back(out)
    store = ShardSet(out)
    lookup = store.lookup()
    assert sorted(lookup) == sorted(samples)
    rows = [json.loads(line) for line in (out / "videos.jsonl").read_text().splitlines()]
    assert {r["video_id"]: (r["shard"], r["position"]) for r in rows} == {
        k: (v.shard, v.position) for k, v in lookup.items()}
    for key, location in lookup.items():
        sample = store.read(key)
        assert sample.meta == samples[key]["meta"]
        assert sample.frames == samples[key]["frames"]
        assert location.frames == len(sample.frames)
    # positions follow the manifest order within each shard
    plan = json.loads((out / "plan.json").read_text())
    for index, ids in enumerate(plan["shards"]):
        assert [k for k, v in sorted(lookup.items(), key=lambda kv: kv[1].position)
                if v.shard == f"shard-{index:06d}.tar"] == ids


def test_rerun_skips_finished_shards_and_output_is_deterministic(tmp_path, good_corpus):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli("ingest", good_corpus, "--out", a, "--shard-size", "3",
                   "--workers", "2") == EXIT_OK
    first = digests(a)
    mtimes = {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*")}
    assert run_cli("ingest", good_corpus, "--out", a, "--shard-size", "3",
                   "--workers", "2") == EXIT_OK
    summary = json.loads((a / "summary.json").read_text())
    assert (summary["shards_written"], summary["shards_skipped"]) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in a.glob("shard-*")} == mtimes
    # another folder, one worker instead of two: byte-identical shards
    assert run_cli("ingest", good_corpus, "--out", b, "--shard-size", "3",
                   "--workers", "1") == EXIT_OK
    assert digests(b) == first and len(first) == 4


def test_other_settings_on_an_existing_folder_are_refused(tmp_path, videos, capsys):
    out = tmp_path / "out"
    assert run_cli("ingest", videos / "realshort.mp4", "--out", out) == EXIT_OK
    assert run_cli("ingest", videos / "realshort.mp4", "--out", out, "--fps", "2") == EXIT_USAGE
    assert "holds an ingest made with other settings (fps; see plan.json)" in (
        capsys.readouterr().err)


def test_a_folder_in_use_is_refused(tmp_path, videos, capsys):
    out = tmp_path / "out"
    with held_by_another_process(out, "ingest"):
        assert run_cli("ingest", videos / "realshort.mp4", "--out", out) == EXIT_USAGE
    assert "in use by another process" in capsys.readouterr().err
    assert run_cli("ingest", videos / "realshort.mp4", "--out", out) == EXIT_OK  # released


def test_retry_failed_redoes_only_shards_with_failures(tmp_path, videos):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for name in ("asl_no.mkv", "asl_yes.mkv", "realshort.mp4"):
        shutil.copy(videos / name, corpus / name)
    (corpus / "late.mp4").write_bytes(b"")  # in the last shard: empty for now
    out = tmp_path / "out"
    args = ("ingest", corpus, "--out", out, "--shard-size", "2", "--workers", "1")
    assert run_cli(*args) == EXIT_FAILURES
    mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    shutil.copy(videos / "asl_book.mkv", corpus / "late.mp4")  # the file arrives
    assert run_cli(*args) == EXIT_FAILURES  # a plain re-run keeps the recorded failure
    assert run_cli(*args, "--retry-failed") == EXIT_OK
    assert sorted(read_back(out)) == ["asl_no", "asl_yes", "late", "realshort"]
    assert (out / "shard-000000.tar").stat().st_mtime_ns == mtime


def test_bad_manifest_rows_are_recorded_and_the_rest_lands(tmp_path, videos):
    manifest = tmp_path / "m.jsonl"
    rows = [
        {"id": "short", "path": str(videos / "realshort.mp4")},
        {"id": "../evil", "path": str(videos / "asl_no.mkv")},
        {"id": "yes", "path": str(videos / "asl_yes.mkv")},
    ]
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n{oops\n")
    out = tmp_path / "out"
    assert run_cli("ingest", manifest, "--out", out) == EXIT_FAILURES
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["kind"], f["where"]) for f in failures] == [
        ("row", f"{manifest}:2"), ("row", f"{manifest}:4")]
    assert sorted(read_back(out)) == ["short", "yes"]
    assert not any(p.name.startswith("..") for p in tmp_path.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.jsonl", "out"]


def test_usage_errors_exit_2_with_one_line(tmp_path, capsys):
    assert run_cli("ingest", tmp_path / "absent", "--out", tmp_path / "o") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "no such file or folder" in err and err.count("\n") == 1
    with pytest.raises(SystemExit) as caught:
        run_cli("ingest", tmp_path, "--out", tmp_path / "o", "--jpeg-quality", "101")
    assert caught.value.code == 2
    assert "must be in 1..100" in capsys.readouterr().err


# ----------------------------------------------------------------------------- kill -9

def kill_corpus(tmp_path: Path, videos: Path) -> Path:
    folder = tmp_path / "kcorpus"
    folder.mkdir()
    for copy in range(3):
        for name in ("big_buck_bunny_0_30.webm", "nasa_13013.mp4", "asl_book.mkv"):
            os.symlink(videos / name, folder / f"c{copy}_{name}")
    return folder


def ingest_command(corpus: Path, out: Path) -> list[str]:
    return [REFOCUS, "ingest", str(corpus), "--out", str(out), "--shard-size", "2",
            "--workers", "2", "--fps", "2", "--size", "256"]


def shard_contents(out: Path) -> dict:
    markers = {p.name: json.loads(p.read_text()) for p in sorted(out.glob("*.done.json"))}
    return {
        "digests": digests(out),
        "samples": {k: m["samples"] for k, m in markers.items()},
        "frames": {k: m["frames"] for k, m in markers.items()},
    }


@pytest.mark.slow
def test_kill_9_at_any_moment_then_rerun_equals_an_uninterrupted_run(tmp_path, videos):
    corpus = kill_corpus(tmp_path, videos)
    reference = tmp_path / "reference"
    subprocess.run(ingest_command(corpus, reference), check=True, capture_output=True)
    expected = shard_contents(reference)
    assert len(expected["digests"]) == 5

    # kill during start-up, while the first shards are written, and near the end
    for trial, moment in enumerate(["startup", "first-marker", "third-marker"]):
        out = tmp_path / f"killed{trial}"
        proc = subprocess.Popen(ingest_command(corpus, out), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 60
        if moment == "startup":
            time.sleep(0.5)
        else:
            want = 1 if moment == "first-marker" else 3
            while len(list(out.glob("*.done.json"))) < want and time.monotonic() < deadline:
                time.sleep(0.01)
        kill_parent_and_wait_for_workers(proc)
        done_before = len(list(out.glob("*.done.json")))
        assert done_before < 5, f"{moment}: the run finished before it could be killed"
        # re-run to completion
        result = subprocess.run(ingest_command(corpus, out), capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["shards_skipped"] == done_before
        assert shard_contents(out) == expected, moment
        assert not list(out.glob("*.tmp"))
