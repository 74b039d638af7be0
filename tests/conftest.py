"""Shared test fixtures: the real test data beside the project, and small generated files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Prefect: a private home for the test session, and time for its temporary server to start
# (11-19 s on a small machine, near the 20 s default).
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="refocus-prefect-"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
GOOD_VIDEOS = [
    "asl_book.mkv", "asl_help.mkv", "asl_milk.mkv", "asl_no.mkv", "asl_thanks.mkv",
    "asl_yes.mkv", "big_buck_bunny_0_30.webm", "nasa_13013.mp4", "realshort.mp4",
    "rotated_90.mov",
]


def _live_members(session: int) -> list[int]:
    """Processes of a session that are not zombies (which may never be reaped in a
    container whose init does not reap)."""
    live = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":  # fields: state, ppid, pgrp, sid
            live.append(int(stat.parent.name))
    return live


def kill_parent_and_wait_for_workers(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGKILL a run's main process (started with ``start_new_session=True``), then wait until
    every process of its session is gone: its workers die with it, but a worker may still
    finish an atomic rename in the moment before its death signal lands."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while _live_members(proc.pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"workers of {proc.pid} outlived it by {timeout} s")
        time.sleep(0.01)


@contextmanager
def held_by_another_process(folder: Path, kind: str) -> Iterator[None]:
    """Another real process claims ``folder`` as ``kind`` and holds its lock (as a first run
    does) for the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from stores.owned import claim\n"
         f"with claim({str(folder)!r}, {kind!r}).lock():\n"
         "    print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


@pytest.fixture(scope="session")
def tiny_lmms(tmp_path_factory) -> dict[str, Path]:
    """Every reference-LMM family of tests/tiny_lmm.py, built once for the session (model
    folders the tests only read)."""
    from tiny_lmm import BUILDERS

    root = tmp_path_factory.mktemp("tiny-lmms")
    return {name: build(root / name) for name, build in BUILDERS.items()}


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


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def make_tiny_clip(folder: Path, name: str = "tiny-clip", seed: int = 0) -> tuple[Path, Path]:
    """A tiny open_clip architecture (JSON config) and random weights saved as safetensors."""
    import json

    import torch
    from safetensors.torch import save_file

    from pipelines.encoder import load_encoder

    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(seed)
    encoder = load_encoder(str(config), "random")
    weights = folder / f"{name}-seed{seed}.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, weights)
    return config, weights


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> tuple[Path, Path]:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory, shared_data) -> Path:
    """The real videos (corrupted.mp4 included) ingested once, in 4 shards, with questions."""
    import json

    from flows.cli import main

    root = tmp_path_factory.mktemp("ingested")
    videos = shared_data / "videos"
    rows = [{"id": Path(n).stem, "path": str(videos / n)} for n in GOOD_VIDEOS]
    rows.insert(3, {"id": "corrupted", "path": str(videos / "corrupted.mp4")})
    signs = ["book", "help", "milk", "no", "thanks", "yes"]
    for sign in signs:
        rows.append({"qid": f"q_{sign}", "video_id": f"asl_{sign}",
                     "question": "Which sign is shown?", "options": signs,
                     "answer": signs.index(sign)})
    rows.append({"qid": "q_broken", "video_id": "corrupted", "question": "What happens?",
                 "options": ["a", "b"], "answer": 0})
    manifest = root / "corpus.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = root / "shards"
    assert main(["ingest", str(manifest), "--out", str(out), "--shard-size", "3",
                 "--workers", "1", "--fps", "2", "--size", "96"]) == 1  # corrupted.mp4 fails
    return out


@dataclass(frozen=True)
class SynthChain:
    """A synthetic corpus taken through synth → ingest → embed (the one way tests make one):
    ``corpus/`` (manifest.jsonl and videos), ``shards/`` and, unless ``embed_workers`` is
    None, ``features/`` (the bundled synth encoder, with the questions). Settings left None
    are the stages' defaults."""

    videos: int
    seed: int
    duration: tuple[float, float] | None = None
    shard_size: int | None = None
    ingest_workers: int = 2
    embed_workers: int | None = 1  # None: stop after ingest
    index: bool = False  # build the FAISS index too


def build_synth_chain(root: Path, chain: SynthChain) -> Path:
    from pipelines.embed import EmbedSettings, embed
    from pipelines.encoder import SYNTH_ENCODER, load_encoder
    from pipelines.ingest import IngestSettings, ingest
    from pipelines.synth import SynthSettings, generate
    from stores.manifest import read_manifest

    def given(**settings):  # the settings a chain names; the rest are the stages' defaults
        return {k: v for k, v in settings.items() if v is not None}

    generate(root / "corpus", SynthSettings(videos=chain.videos, seed=chain.seed, workers=2,
                                            **given(duration=chain.duration)))
    ingest(read_manifest(root / "corpus" / "manifest.jsonl"), root / "shards",
           IngestSettings(workers=chain.ingest_workers, **given(shard_size=chain.shard_size)))
    if chain.embed_workers is not None:
        embed(root / "shards", root / "features", load_encoder(SYNTH_ENCODER),
              EmbedSettings(workers=chain.embed_workers, **({} if chain.index else
                                                            {"index": None})),
              questions=read_manifest(root / "shards" / "manifest.jsonl"))
    return root


@pytest.fixture(scope="session")
def synth_chain(tmp_path_factory) -> Callable[[SynthChain], Path]:
    """``synth_chain(SynthChain(...))``: the folder of that chain, built once per session
    (tests only read it)."""
    built: dict[SynthChain, Path] = {}

    def get(chain: SynthChain) -> Path:
        if chain not in built:
            built[chain] = build_synth_chain(tmp_path_factory.mktemp("synth-chain"), chain)
        return built[chain]

    return get


TRAINING_STORE = SynthChain(videos=48, seed=11)  # synth_store: what the learning tests train on
# four short videos of a seed neither the demo nor train-vlm uses: test_vlm's fresh corpus,
# and the training store a test_score policy names
SMALL_STORE = SynthChain(videos=4, seed=97, duration=(13.0, 14.0))


@pytest.fixture(scope="session")
def synth_store(synth_chain) -> Path:
    """The session's small training corpus, ingested and embedded with the bundled encoder;
    returns the folder holding corpus/, shards/ and features/."""
    return synth_chain(TRAINING_STORE)


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One Prefect test server for the whole session (it takes seconds to start); returns
    its API URL, which subprocesses can be pointed at."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield PREFECT_API_URL.value()


# Fixtures that cost more than a few seconds to build: a test that uses one is ``slow``.
SLOW_FIXTURES = ("prefect_api", "synth_store")  # the Prefect test server; the 48-video store


def pytest_itemcollected(item) -> None:
    """Every test on the Prefect test server or on the trained synthetic store is ``slow``
    (make test-fast leaves it out); other slow tests carry ``@pytest.mark.slow`` themselves."""
    if set(SLOW_FIXTURES) & set(getattr(item, "fixturenames", ())):
        item.add_marker(pytest.mark.slow)


def pytest_collection_modifyitems(session, config, items) -> None:
    """Tests on the Prefect test server run last, and those that start a Dask cluster in this
    process after all others: once a Dask client has run here, processes forked later (the
    DataLoader workers of the embed fixtures) inherit its state and exit with status 1."""
    def rank(item) -> int:
        fixtures = getattr(item, "fixturenames", ())
        return 2 if "dask" in item.name else 1 if "prefect_api" in fixtures else 0

    items.sort(key=rank)  # stable: the order within each group is kept
