"""One execution path: a stage maps its per-shard step through a runner. The local runner
(in this process, a spawn pool, embed's one DataLoader) and the Prefect runner write the same
shards and features, both equal to independent oracles (PyAV's decode, an unbatched forward of
the model); a shard whose step fails is a typed, one-line failure and the other shards land;
``refocus ingest --runner prefect`` runs the stage in a flow end to end."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_video
from PIL import Image

from flows.cli import EXIT_FAILURES, main
from flows.orchestrate import embed_flow, ingest_flow
from flows.runners import with_runner
from flows.runtime import Orchestration
from pipelines.decode import DecodeSettings, VideoDecoder
from pipelines.embed import EmbedSettings, embed
from pipelines.encoder import load_encoder
from pipelines.ingest import Failure, IngestSettings, ingest
from pipelines.runners import Done, Failed, LocalRunner, Step
from stores.features import FeatureStore
from stores.manifest import read_manifest
from stores.owned import claim
from stores.shards import ShardSet

FPS = 5.0  # candidates per second of the 25 fps test videos


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Three small videos and a text file posing as one, a shard each."""
    root = tmp_path_factory.mktemp("runner-corpus")
    rows = []
    for i, frames in enumerate((20, 31, 12)):
        path = make_video(root / f"v{i}.mp4", frames)
        rows.append({"id": f"v{i}", "path": str(path)})
    (root / "notes.mp4").write_text("not a video\n")
    rows.insert(2, {"id": "notes", "path": str(root / "notes.mp4")})
    manifest = root / "corpus.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


SETTINGS = IngestSettings(decode=DecodeSettings(fps=FPS), shard_size=1, workers=2)


def decoded_times(path: str) -> list[float]:
    with VideoDecoder(path, SETTINGS.decode) as video:
        return [frame.time for frame in video.candidates()]


def markers(out: Path) -> list[dict]:
    """The done markers without their timings."""
    found = []
    for marker in ShardSet(out).markers():
        found.append({k: v for k, v in marker.items() if k not in ("seconds", "timings")})
    return found


def assert_shards_match_the_decoder(out: Path, corpus: Path) -> None:
    shard_set = ShardSet(out)
    rows = read_manifest(corpus).videos
    landed = [v for v in rows if v.id != "notes"]
    assert list(shard_set.lookup()) == [v.id for v in landed]
    for video in landed:
        sample = shard_set.read(video.id)
        assert sample.meta["timestamps"] == decoded_times(video.path)
        for jpeg in sample.frames:
            assert Image.open(io.BytesIO(jpeg)).format == "JPEG"


def assert_features_equal_an_unbatched_forward(out: Path, shards: Path, clip) -> None:
    encoder = load_encoder(str(clip[0]), str(clip[1]))
    features = FeatureStore(out).load()
    shard_set = ShardSet(shards)
    for row, video_id in enumerate(features.video_ids):
        sample = shard_set.read(video_id)
        start = int(features.offsets[row])
        assert np.array_equal(features.frame_time[start:start + len(sample.frames)],
                              sample.meta["timestamps"])
        pixels = [encoder.preprocess(Image.open(io.BytesIO(j)).convert("RGB"))
                  for j in sample.frames]
        expected = encoder.encode_images(torch.stack(pixels))
        stored = features.frame_embedding[start:start + len(sample.frames)].astype(np.float32)
        np.testing.assert_allclose(stored, expected, atol=2e-3, rtol=0)


# Session-scoped: built by the first test of this file, which conftest runs before any Prefect
# test; a DataLoader forked after a Prefect client has run in this process loses its workers.
@pytest.fixture(scope="session")
def local(corpus, tiny_clip, tmp_path_factory) -> Path:
    """Both stages on the local runner: ingest's spawn pool, embed's DataLoader."""
    root = tmp_path_factory.mktemp("local-runner")
    events = []
    summary = ingest(read_manifest(corpus), root / "shards", SETTINGS, report=events.append)
    assert sorted(e.video_id for e in events) == ["notes", "v0", "v1", "v2"]  # from the pool
    assert [f.video_id for f in summary.failures] == ["notes"]
    embed(root / "shards", root / "features", load_encoder(str(tiny_clip[0]),
                                                           str(tiny_clip[1])),
          EmbedSettings(batch_size=4, workers=1, index=None))
    return root


def test_the_local_runner_matches_the_decoder_and_the_model(local, corpus, tiny_clip):
    assert_shards_match_the_decoder(local / "shards", corpus)
    assert_features_equal_an_unbatched_forward(local / "features", local / "shards", tiny_clip)


def test_the_prefect_runner_writes_what_the_local_runner_writes(prefect_api, local, corpus,
                                                                tiny_clip, tmp_path):
    o = Orchestration(runner="prefect", workers=2)
    ingested = with_runner(ingest_flow, o)([str(corpus)], str(tmp_path / "shards"), SETTINGS,
                                           orchestration=o)
    embedded = with_runner(embed_flow, o)(str(tmp_path / "shards"), str(tmp_path / "features"),
                                          str(tiny_clip[0]), str(tiny_clip[1]),
                                          settings=EmbedSettings(batch_size=4, index=None),
                                          orchestration=o)
    assert [(f["kind"], f["video_id"]) for f in ingested["failures"]] == [("video", "notes")]
    assert embedded["shards_written"] == 4 and not embedded["failures"]
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "shards" / name).read_bytes() == (local / "shards" / name).read_bytes()
    assert markers(tmp_path / "shards") == markers(local / "shards")
    assert_shards_match_the_decoder(tmp_path / "shards", corpus)
    assert_features_equal_an_unbatched_forward(tmp_path / "features", tmp_path / "shards",
                                               tiny_clip)
    [record] = [json.loads(p.read_text())
                for p in (tmp_path / "shards" / "flow-runs").glob("*-ingest.json")]
    assert record["tasks"] == {f"shard-{i:06d}.tar": "Completed" for i in range(4)}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_shard_that_fails_is_a_typed_failure_and_the_rest_lands(workers, corpus, local,
                                                                   tmp_path):
    """Shard 1's file cannot be put in place (a folder is in the way): in this process
    (workers 1) and in the pool alike, it is one failure line and shards 0, 2, 3 land."""
    out = tmp_path / "shards"
    claim(out, "ingest")
    (out / "shard-000001.tar").mkdir()
    (out / "shard-000001.tar" / "in-the-way").write_text("x")
    settings = IngestSettings(decode=SETTINGS.decode, shard_size=1, workers=workers)
    summary = ingest(read_manifest(corpus), out, settings)
    [failure] = [f for f in summary.failures if f.kind == "shard"]
    assert failure.where == "shard-000001.tar"
    assert failure.error.startswith("IsADirectoryError: ") and "\n" not in failure.error
    assert summary.shards_written == 3
    for i in (0, 2, 3):
        name = f"shard-{i:06d}.tar"
        assert (out / name).read_bytes() == (local / "shards" / name).read_bytes()
    assert not (out / "shard-000001.done.json").exists()
    recorded = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert Failure(**recorded[-1]) == failure


def _halve(item: int, report) -> float:
    report(item)
    if item == 3:
        raise ValueError("three is odd\nand this line is not kept")
    return item / 2


def test_the_local_runner_hands_back_done_and_failed_in_this_process():
    step = Step("halve", _halve, name=lambda i: f"item-{i}", title=str)
    seen: list[int] = []
    outcomes = list(LocalRunner().map(step, [2, 3, 4], seen.append))
    assert outcomes == [Done("item-2", 1.0), Failed("item-3", "ValueError: three is odd"),
                        Done("item-4", 2.0)]
    assert seen == [2, 3, 4]
    assert str(outcomes[1]) == "item-3: ValueError: three is odd"


def test_the_ingest_command_runs_on_the_prefect_runner(prefect_api, corpus, local, tmp_path,
                                                       capsys):
    out = tmp_path / "shards"
    code = main(["ingest", str(corpus), "--out", str(out), "--fps", str(FPS),
                 "--shard-size", "1", "--workers", "2", "--runner", "prefect"])
    assert code == EXIT_FAILURES  # the text file
    printed = capsys.readouterr().out
    assert "3 landed, 1 failed" in printed and "notes.mp4" in printed
    for i in range(4):
        name = f"shard-{i:06d}.tar"
        assert (out / name).read_bytes() == (local / "shards" / name).read_bytes()
    [record] = [json.loads(p.read_text()) for p in (out / "flow-runs").glob("*-ingest.json")]
    assert record["status"] == "completed"
    assert record["parameters"]["orchestration"]["runner"] == "prefect"
