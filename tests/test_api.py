"""pipelines.select_frames: one call picks the same frames as refocus score on the same video
and question (a real video of the shared data and a synthetic one), with the policy's own
candidate settings, and returns the frames themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_hub import make_run

from flows.cli import main
from pipelines import select_frames
from pipelines.decode import DecodeSettings, VideoDecoder
from pipelines.synth import SynthSettings, generate
from stores.errors import UserError
from stores.selections import read_selections

OPTIONS = ["a rocket launch", "the Earth from orbit", "an astronaut", "a control room"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("trained") / "run", seed=4)


def scored_by_pipeline(run: Path, video: Path, question: str, options: list[str],
                       out: Path, k: int) -> tuple[list[int], list[float]]:
    """What refocus score picks for one question on one video."""
    manifest = out.parent / f"{out.name}.jsonl"
    manifest.write_text(
        json.dumps({"id": "v", "path": str(video)}) + "\n"
        + json.dumps({"qid": "q", "video_id": "v", "question": question, "options": options,
                      "answer": 0}) + "\n")
    assert main(["score", str(manifest), "--policy", str(run), "--k", str(k), "--out",
                 str(out), "--workers", "1", "--embed-workers", "0"]) == 0
    [row] = read_selections(out)
    return row.frame_indices, row.timestamps


def test_real_video_same_picks_as_score(run, videos, tmp_path):
    video = tmp_path / "nasa_13013.mp4"  # 13 s: 39 candidates at 3 fps, capped to 12
    shutil.copy(videos / "nasa_13013.mp4", video)
    question = "What does the camera show?"
    picked = select_frames(video, question, OPTIONS, k=3, policy=run)
    indices, times = scored_by_pipeline(run, video, question, OPTIONS, tmp_path / "scored", 3)
    assert picked.frame_indices == indices and picked.timestamps == times
    assert len(picked.images) == 3
    # the images are the candidates at those times, decoded with the policy's settings
    # (fps 3, short side 64), independently of the call
    with VideoDecoder(str(video), DecodeSettings(fps=3.0, max_frames=12, size=64)) as d:
        candidates = {c.time: c.rgb for c in d.candidates()}
    assert len(candidates) == 12  # the policy's frame cap, not the default 512
    for image, t in zip(picked.images, picked.timestamps, strict=True):
        assert image.mode == "RGB" and min(image.size) == 64
        assert np.array_equal(np.asarray(image), candidates[t])


def test_synthetic_video_same_picks_as_score(run, tmp_path):
    generate(tmp_path / "world", SynthSettings(videos=1, seed=21, workers=1))
    rows = [json.loads(line) for line in
            (tmp_path / "world" / "manifest.jsonl").read_text().splitlines()]
    video = next(r for r in rows if "path" in r)
    asked = next(r for r in rows if "qid" in r)
    path = tmp_path / "world" / video["path"]
    picked = select_frames(str(path), asked["question"], asked["options"], policy=str(run))
    indices, times = scored_by_pipeline(run, path, asked["question"], asked["options"],
                                        tmp_path / "scored", 4)
    assert len(picked.timestamps) == 4  # the largest budget the run records
    assert picked.frame_indices == indices and picked.timestamps == times
    assert picked.timestamps == sorted(picked.timestamps)


def test_user_errors_are_one_line(run, tmp_path):
    with pytest.raises(UserError, match="nothing.mp4"):
        select_frames(tmp_path / "nothing.mp4", "What?", ["a", "b"], k=2, policy=run)
    with pytest.raises(UserError, match="no such policy"):
        select_frames(tmp_path / "nothing.mp4", "What?", ["a", "b"], policy=tmp_path / "none")
