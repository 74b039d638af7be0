"""Embed's plan and batching on their own: ``plan`` (rows and batches of a finished ingest),
``FrameBatches`` (the reader, alone and under a DataLoader's workers), ``decode_frame`` and
``_questions_digest``, against hand-computed expectations. The ingest folders are written
with the shard writer itself (stores/shards.py) from tiny generated JPEGs, so each test takes
well under a second."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from torch.utils.data import DataLoader

from pipelines.embed import (
    EmbedPlan,
    FrameBatch,
    FrameBatches,
    FrameError,
    ShardPlan,
    _questions_digest,
    decode_frame,
    plan,
)
from stores.errors import UserError
from stores.frames import MAX_FRAME_PIXELS
from stores.manifest import Question
from stores.shards import ShardSet, ShardTarWriter, write_plan

FPS = 4.0  # timestamps of the generated samples: frame i at i / FPS seconds


def colour(row: int) -> tuple[int, int, int]:
    """The flat colour of the frame at store row ``row`` (distinct for rows < 64, and far
    apart: steps of 4 levels survive JPEG rounding)."""
    return (4 * row % 256, 255 - 4 * row % 256, 16 * (row % 8))


def jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (16, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, rgb).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_ingest(folder: Path, shards: list[list[int]], broken: set[int] = frozenset(),
                 ) -> Path:
    """An ingest folder: ``shards[s]`` lists the frame counts of shard s's videos (video ids
    v0, v1, ... in order). Frame f of the video whose first row is r shows ``colour(r + f)``;
    the store rows in ``broken`` hold bytes that are no JPEG."""
    ids = [[f"v{i}" for i in range(sum(len(s) for s in shards[:n]),
                                   sum(len(s) for s in shards[:n + 1]))] for n in
           range(len(shards))]
    write_plan(folder, {"settings": {"fps": FPS}, "shards": ids})
    row = 0
    for index, (counts, names) in enumerate(zip(shards, ids, strict=True)):
        writer = ShardTarWriter(folder, index)
        for video, frames in zip(names, counts, strict=True):
            data = [b"not a jpeg" if row + f in broken else jpeg(colour(row + f))
                    for f in range(frames)]
            meta = {"timestamps": [f / FPS for f in range(frames)], "duration": frames / FPS}
            writer.add(video, meta, data)
            row += frames
        writer.commit({"failures": []})
    return folder


# ----------------------------------------------------------------------------- plan


def test_plan_rows_and_batches_of_a_known_shard_set(tmp_path):
    # shard 0: v0 (6 frames), v1 (5); shard 1: v2 (3), v3 (7); shard 2: no video landed;
    # shard 3: v4 (2)
    shards = ShardSet(write_ingest(tmp_path, [[6, 5], [3, 7], [], [2]]))
    got = plan(shards, batch_size=4)
    assert isinstance(got, EmbedPlan)
    assert got.layout.video_ids == ["v0", "v1", "v2", "v3", "v4"]
    assert got.layout.frame_counts == [6, 5, 3, 7, 2]
    assert got.layout.n_frames == 23
    assert got.shards == [
        ShardPlan(0, slice(0, 2), slice(0, 11), [FrameBatch(0, 0, 4), FrameBatch(0, 4, 8),
                                                 FrameBatch(0, 8, 11)]),
        ShardPlan(1, slice(2, 4), slice(11, 21), [FrameBatch(1, 11, 15), FrameBatch(1, 15, 19),
                                                  FrameBatch(1, 19, 21)]),
        ShardPlan(2, slice(4, 4), slice(21, 21), []),
        ShardPlan(3, slice(4, 5), slice(21, 23), [FrameBatch(3, 21, 23)]),
    ]
    assert [(loc.video_id, loc.shard, loc.position, loc.frames) for loc in got.locations] == [
        ("v0", "shard-000000.tar", 0, 6), ("v1", "shard-000000.tar", 1, 5),
        ("v2", "shard-000001.tar", 0, 3), ("v3", "shard-000001.tar", 1, 7),
        ("v4", "shard-000003.tar", 0, 2)]


def test_a_batch_larger_than_every_shard_is_one_batch_per_shard(tmp_path):
    got = plan(ShardSet(write_ingest(tmp_path, [[1, 2], [4]])), batch_size=100)
    assert [s.batches for s in got.shards] == [[FrameBatch(0, 0, 3)], [FrameBatch(1, 3, 7)]]


def batches_by_walking(frame_counts: list[list[int]], batch_size: int) -> list[FrameBatch]:
    """The oracle: walk the rows one at a time, closing a batch when it is full or the next
    row belongs to another shard."""
    out: list[FrameBatch] = []
    row = 0
    for shard, counts in enumerate(frame_counts):
        for _ in range(sum(counts)):
            if out and out[-1].shard == shard and out[-1].stop - out[-1].start < batch_size:
                out[-1] = FrameBatch(shard, out[-1].start, row + 1)
            else:
                out.append(FrameBatch(shard, row, row + 1))
            row += 1
    return out


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame_counts=st.lists(st.lists(st.integers(0, 9), max_size=3), min_size=1, max_size=4)
       .filter(lambda shards: sum(map(sum, shards)) > 0),
       batch_size=st.integers(1, 12))
def test_batches_cover_every_row_once_and_never_cross_a_shard(tmp_path_factory, frame_counts,
                                                              batch_size):
    folder = write_ingest(tmp_path_factory.mktemp("ingest"), frame_counts)
    got = plan(ShardSet(folder), batch_size)
    batches = [b for s in got.shards for b in s.batches]
    assert batches == batches_by_walking(frame_counts, batch_size)
    rows = [r for b in batches for r in range(b.start, b.stop)]
    assert rows == list(range(sum(map(sum, frame_counts))))  # every row once, in order
    for shard in got.shards:
        assert all(shard.rows.start <= b.start < b.stop <= shard.rows.stop and
                   b.shard == shard.index for b in shard.batches)
        assert all(1 <= b.stop - b.start <= batch_size for b in shard.batches)


def test_an_unfinished_ingest_is_refused_in_one_line(tmp_path):
    folder = write_ingest(tmp_path, [[2], [3]])
    (folder / "shard-000001.done.json").unlink()
    with pytest.raises(UserError) as caught:
        plan(ShardSet(folder), 4)
    message = str(caught.value)
    assert "\n" not in message and str(folder) in message
    assert "1 of 2 shards done" in message and "refocus ingest again" in message


def test_an_ingest_where_no_video_landed_is_refused(tmp_path):
    folder = write_ingest(tmp_path, [[], []])
    with pytest.raises(UserError, match="no frames to embed"):
        plan(ShardSet(folder), 4)


# ----------------------------------------------------------------------------- the reader


def mean_colour(image: Image.Image) -> torch.Tensor:
    """The preprocessing under test's place: an image's mean RGB (module level: DataLoader
    workers get it by pickling)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32).mean(axis=(0, 1)))


def tar_jpegs(folder: Path) -> dict[tuple[str, int], bytes]:
    """(video id, frame index) → JPEG bytes, by scanning every shard with tarfile."""
    out = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if ext != "json":
                    out[key, int(ext.split(".")[0])] = tar.extractfile(member).read()
    return out


COUNTS = [[6, 5], [3, 7], [], [2]]  # rows as in the known shard set above
BROKEN = {7, 12}  # v1 frame 1 (shard 0), v2 frame 1 (shard 1)


def check_loaded(loaded, counts: list[list[int]], broken: set[int]) -> None:
    """Every row of every batch: its timestamp, whether it decoded, and for those that did
    the colour its frame was made with; each video's duration in the batch it starts in."""
    starts = np.concatenate([[0], np.cumsum([c for s in counts for c in s])])
    for item in loaded:
        b = item.batch
        rows = range(b.start, b.stop)
        video_of = [int(np.searchsorted(starts, r, side="right") - 1) for r in rows]
        assert item.time.tolist() == [(r - starts[v]) / FPS for r, v in zip(rows, video_of,
                                                                             strict=True)]
        assert item.good.tolist() == [r not in broken for r in rows]
        good_rows = [r for r in rows if r not in broken]
        assert item.pixels.shape == ((len(good_rows), 3) if good_rows else (0,))
        for got, r in zip(item.pixels, good_rows, strict=True):
            assert np.allclose(got.numpy(), colour(r), atol=3), (r, got)
        assert item.duration == {v: (starts[v + 1] - starts[v]) / FPS
                                 for r, v in zip(rows, video_of, strict=True)
                                 if r == starts[v]}
        expected = [f"video v{v} frame {r - starts[v]} (shard-{b.shard:06d}.tar): unreadable "
                    "JPEG (" for r, v in zip(rows, video_of, strict=True) if r in broken]
        assert len(item.failures) == len(expected)
        assert all(f.startswith(e) and "\n" not in f
                   for f, e in zip(item.failures, expected, strict=True)), item.failures


def test_the_reader_gives_each_batch_its_frames_times_and_failures(tmp_path):
    folder = write_ingest(tmp_path, COUNTS, BROKEN)
    embed_plan = plan(ShardSet(folder), batch_size=4)
    batches = [b for s in embed_plan.shards for b in s.batches]
    loaded = list(FrameBatches(folder, embed_plan, batches, mean_colour))
    assert [item.batch for item in loaded] == batches  # one process: every batch, in order
    check_loaded(loaded, COUNTS, BROKEN)
    failures = [f for item in loaded for f in item.failures]
    assert [f.split(": ")[0] for f in failures] == [
        "video v1 frame 1 (shard-000000.tar)", "video v2 frame 1 (shard-000001.tar)"]
    assert all("\n" not in f for f in failures)


def test_the_reader_sees_the_bytes_the_shards_hold(tmp_path):
    """Each decoded frame is the JPEG member the tar holds for (video, frame), as tarfile
    reads it: the byte ranges of the plan point at the right members."""
    folder = write_ingest(tmp_path, COUNTS)
    embed_plan = plan(ShardSet(folder), batch_size=3)
    members = tar_jpegs(folder)
    assert len(members) == embed_plan.layout.n_frames
    offsets = embed_plan.layout.offsets
    loaded = list(FrameBatches(folder, embed_plan, [b for s in embed_plan.shards
                                                    for b in s.batches], mean_colour))
    seen = {}
    for item in loaded:
        for r, pixels in zip(range(item.batch.start, item.batch.stop), item.pixels,
                             strict=True):
            v = int(np.searchsorted(offsets, r, side="right") - 1)
            seen[r] = (f"v{v}", r - int(offsets[v]), pixels)
    assert sorted(seen) == list(range(embed_plan.layout.n_frames))
    for video, frame, pixels in seen.values():
        with Image.open(io.BytesIO(members[video, frame])) as image:
            assert torch.equal(pixels, mean_colour(image.convert("RGB")))


def test_dataloader_workers_share_the_batches_each_once(tmp_path):
    folder = write_ingest(tmp_path, COUNTS, BROKEN)
    embed_plan = plan(ShardSet(folder), batch_size=2)
    batches = [b for s in embed_plan.shards for b in s.batches]
    assert len(batches) == 12
    loader = DataLoader(FrameBatches(folder, embed_plan, batches, mean_colour),
                        batch_size=None, collate_fn=lambda item: item, num_workers=2)
    loaded = list(loader)
    assert sorted((i.batch for i in loaded), key=lambda b: b.start) == batches
    # worker w of 2 read batches w, w + 2, ...: each batch's content is still its own
    check_loaded(loaded, COUNTS, BROKEN)


def test_a_subset_of_batches_reads_only_those(tmp_path):
    """A resumed run hands the reader the batches of the shards still to do."""
    folder = write_ingest(tmp_path, COUNTS)
    embed_plan = plan(ShardSet(folder), batch_size=4)
    todo = embed_plan.shards[1].batches + embed_plan.shards[3].batches
    loaded = list(FrameBatches(folder, embed_plan, todo, mean_colour))
    assert [i.batch for i in loaded] == todo
    check_loaded(loaded, COUNTS, set())


# ----------------------------------------------------------------------------- decode_frame


def test_decode_frame_gives_rgb_of_a_good_jpeg():
    grey = io.BytesIO()
    Image.new("L", (5, 3), 200).save(grey, format="JPEG")
    image = decode_frame(grey.getvalue())
    assert image.mode == "RGB" and image.size == (5, 3)
    assert np.abs(np.asarray(image, dtype=int) - 200).max() <= 1


@pytest.mark.parametrize("data", [b"", b"not a jpeg", jpeg((1, 2, 3))[:40]],
                         ids=["empty", "text", "truncated"])
def test_an_unreadable_frame_is_a_one_line_frame_error(data):
    with pytest.raises(FrameError) as caught:
        decode_frame(data)
    message = str(caught.value)
    assert message.startswith("unreadable JPEG (") and "\n" not in message


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` × ``height`` grey pixels and holds none (its header
    alone: what a decompression bomb's opening looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (len(data).to_bytes(4, "big") + kind + data
                + zlib.crc32(kind + data).to_bytes(4, "big"))

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_a_frame_error_not_a_crash():
    side = 8200  # 67.24 Mpx: over the 8192 × 8192 cap, under PIL's own refusal
    assert side * side > MAX_FRAME_PIXELS
    with pytest.raises(FrameError) as caught:
        decode_frame(png_header(side, side))
    assert f"{side}×{side} pixels, over refocus's cap" in str(caught.value)
    assert "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- questions


def question(qid: str = "q1", video: str = "v1", text: str = "What?",
             options: tuple[str, ...] = ("a", "b"), answer: int = 0) -> Question:
    return Question(qid, video, text, options, answer)


def test_the_questions_digest_is_sha256_of_the_questions_and_weights():
    expected = hashlib.sha256(
        b'[["q1", "v1", "What?", ["a", "b"], 0], "abc", "text"]').hexdigest()
    assert _questions_digest([question()], {"weights_sha256": "abc", "device": "cpu"}) \
        == expected


@pytest.mark.parametrize("change", [
    {"qid": "q2"}, {"video": "v2"}, {"text": "Why?"}, {"options": ("a", "c")},
    {"options": ("a", "b", "c")}, {"answer": 1}])
def test_the_questions_digest_changes_with_every_field(change):
    identity = {"weights_sha256": "abc"}
    assert _questions_digest([question(**change)], identity) != \
        _questions_digest([question()], identity)


def test_the_questions_digest_follows_order_and_weights_not_other_identity():
    a, b = question("q1"), question("q2")
    weights = {"weights_sha256": "abc"}
    assert _questions_digest([a, b], weights) != _questions_digest([b, a], weights)
    assert _questions_digest([a], weights) != _questions_digest([a], {"weights_sha256": "abd"})
    assert _questions_digest([a], weights) == \
        _questions_digest([question("q1")], {**weights, "device": "cuda"})
    assert _questions_digest([], weights) == hashlib.sha256(b'["abc", "text"]').hexdigest()
