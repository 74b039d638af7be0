"""Shared test fixtures: the real test data beside the project, and small generated files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import av
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD_VIDEOS = [
    "asl_book.mkv", "asl_help.mkv", "asl_milk.mkv", "asl_no.mkv", "asl_thanks.mkv",
    "asl_yes.mkv", "big_buck_bunny_0_30.webm", "nasa_13013.mp4", "realshort.mp4",
    "rotated_90.mov",
]


def _find_shared_data() -> Path | None:
    env = os.environ.get("REFOCUS_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [parent / "shared" / "data" for parent in REPO.parents]
    for candidate in candidates:
        if (candidate / "videos" / "nasa_13013.mp4").is_file():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    found = _find_shared_data()
    if found is None:
        pytest.fail("real test data not found: expected ../shared/data beside the project "
                    "(or set REFOCUS_SHARED_DATA)")
    return found


@pytest.fixture(scope="session")
def videos(shared_data: Path) -> Path:
    return shared_data / "videos"


def make_zero_length_stream(path: Path) -> Path:
    """An MP4 with an H.264 video stream that holds no packets (a fragmented MP4 whose
    header was written and nothing after it; a plain MP4 would drop the empty track)."""
    options = {"movflags": "frag_keyframe+empty_moov"}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path


def make_video(path: Path, frames: int, fps: int = 25, size: tuple[int, int] = (64, 48),
               rotation: int | None = None) -> Path:
    """A small H.264 video whose frame i is a flat grey of level 4*i (mod 256)."""
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "10"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(frames):
            image = np.full((height, width, 3), (4 * i) % 256, np.uint8)
            image[: height // 4, : width // 4] = [255, 0, 0]  # a red top-left corner marker
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    """The kinds of bad input a corpus meets, each in its own file."""
    folder = tmp_path / "bad"
    folder.mkdir()
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    text = folder / "notes.mp4"
    text.write_text("these are meeting notes, not a video\n")
    return {
        "missing": folder / "missing.mp4",
        "empty": empty,
        "text": text,
        "zero_stream": make_zero_length_stream(folder / "zero_stream.mp4"),
    }


@pytest.fixture
def good_corpus(tmp_path: Path, videos: Path) -> Path:
    """A folder with copies of the good real videos (never write beside the shared data)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in GOOD_VIDEOS:
        shutil.copy(videos / name, folder / name)
    return folder
