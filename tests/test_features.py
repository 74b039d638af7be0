"""refocus embed end to end: shards → Zarr feature store (+ questions, + FAISS index),
checked against an unbatched forward of the model, plain zarr, brute-force search, and an
uninterrupted run after kill -9."""

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import kill_parent_and_wait_for_workers, make_tiny_clip
from PIL import Image

from flows.cli import EXIT_FAILURES, EXIT_OK, EXIT_USAGE, main
from pipelines.embed import EmbedSettings, embed
from pipelines.encoder import format_question, load_encoder
from stores.errors import UserError
from stores.features import FeatureStore, read_array
from stores.index import FrameIndex, IndexSettings, build_index
from stores.manifest import read_manifest
from stores.shards import ShardSet

REFOCUS = str(Path(sys.executable).parent / "refocus")


def embed_cli(shards, out, clip, *extra) -> int:
    config, weights = clip
    return main(["embed", "--shards", str(shards), "--out", str(out), "--model", str(config),
                 "--pretrained", str(weights), "--batch-size", "7", "--workers", "2", *extra])


@pytest.fixture(scope="module")
def store(tmp_path_factory, sample_shards, tiny_clip) -> Path:
    out = tmp_path_factory.mktemp("features") / "store"
    # a question about the failed video is reported; everything else lands
    assert embed_cli(sample_shards, out, tiny_clip) == EXIT_FAILURES
    return out


def test_store_values_equal_an_unbatched_forward_of_the_model(store, sample_shards, tiny_clip):
    encoder = load_encoder(str(tiny_clip[0]), str(tiny_clip[1]))
    features = FeatureStore(store).load()
    shard_set = ShardSet(sample_shards)
    lookup = shard_set.lookup()
    assert features.video_ids == [v for v in lookup]  # plan order, the failed video left out
    assert "corrupted" not in features.video_ids and len(features.video_ids) == 10
    for row, video_id in enumerate(features.video_ids):
        sample = shard_set.read(video_id)
        rows = slice(int(features.offsets[row]), int(features.offsets[row + 1]))
        assert rows.stop - rows.start == len(sample.frames)
        assert np.array_equal(features.frame_time[rows], sample.meta["timestamps"])
        assert (features.frame_video[rows] == row).all()
        assert features.duration[row] == pytest.approx(sample.meta["duration"])
        for i, jpeg in enumerate(sample.frames):
            pixels = encoder.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
            expected = encoder.encode_images(pixels)[0]
            stored = features.frame_embedding[rows.start + i].astype(np.float32)
            np.testing.assert_allclose(stored, expected, atol=2e-3, rtol=0)
    assert features.frame_embedding.dtype == np.float16
    norms = np.linalg.norm(features.frame_embedding.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_questions_and_their_options_are_embedded(store, sample_shards, tiny_clip):
    encoder = load_encoder(str(tiny_clip[0]), str(tiny_clip[1]))
    features = FeatureStore(store).load()
    manifest = read_manifest(sample_shards / "manifest.jsonl")
    usable = [q for q in manifest.questions if q.video_id != "corrupted"]
    assert features.qids == [q.qid for q in usable]
    expected = encoder.encode_texts([format_question(q.question, q.options) for q in usable])
    np.testing.assert_allclose(features.question_embedding.astype(np.float32), expected,
                               atol=2e-3)
    np.testing.assert_allclose(features.question_text_embedding.astype(np.float32),
                               encoder.encode_texts([q.question for q in usable]), atol=2e-3)
    assert [features.video_ids[v] for v in features.question_video] == [
        q.video_id for q in usable]
    assert list(features.answer) == [q.answer for q in usable]
    q = usable[2]
    options = features.option_embedding[features.option_offsets[2]:features.option_offsets[3]]
    np.testing.assert_allclose(options.astype(np.float32), encoder.encode_texts(list(q.options)),
                               atol=2e-3)
    summary = json.loads((store / "summary.json").read_text())
    assert summary["failures"] == ["question q_broken: video 'corrupted' is not in the shards "
                                   "(it failed to ingest, or was never ingested)"]
    assert summary["questions"] == 6 and summary["frames"] == len(features.frame_time)


def test_reading_api_slices_agree_with_the_full_load(store):
    reader = FeatureStore(store)
    features = reader.load()
    embedding, times = reader.video("nasa_13013")
    row = features.video_ids.index("nasa_13013")
    rows = slice(int(features.offsets[row]), int(features.offsets[row + 1]))
    assert np.array_equal(embedding, features.frame_embedding[rows])
    assert np.array_equal(times, features.frame_time[rows])
    assert np.array_equal(reader.question("q_milk"),
                          features.question_embedding[features.qids.index("q_milk")])
    with pytest.raises(UserError, match="no video 'nope'"):
        reader.video("nope")
    with pytest.raises(UserError, match="no question 'nope'"):
        reader.question("nope")


def test_plain_zarr_reads_the_store(store):
    group = zarr.open(store / "features.zarr", mode="r")
    features = FeatureStore(store).load()
    assert np.array_equal(group["frames/embedding"][:], features.frame_embedding)
    assert list(group["videos/id"][:]) == features.video_ids
    assert np.array_equal(group["videos/offsets"][:], features.offsets)
    attrs = dict(group.attrs)
    assert attrs["encoder"]["dim"] == 32 and attrs["n_frames"] == len(features.frame_time)
    assert attrs["ingest"]["settings"]["fps"] == 2 and attrs["ingest"]["settings"]["size"] == 96


def brute_force_top_k(vectors: np.ndarray, query: np.ndarray, k: int) -> tuple:
    scores = vectors.astype(np.float32) @ query.astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], order


def test_flat_index_equals_brute_force_top_k(store):
    index = FrameIndex(store)
    assert index.info["kind"] == "flat"
    vectors = FeatureStore(store).load().frame_embedding
    rng = np.random.default_rng(0)
    for _ in range(5):
        query = rng.standard_normal(vectors.shape[1]).astype(np.float32)
        scores, rows = index.search(query, 10)
        expected_scores, expected_rows = brute_force_top_k(vectors, query, 10)
        np.testing.assert_allclose(scores[0], expected_scores, rtol=1e-5, atol=1e-5)
        # equal scores may swap places; the score multisets and the rows' scores must agree
        assert set(rows[0]) == set(expected_rows) or np.allclose(
            np.sort(vectors[rows[0]].astype(np.float32) @ query), np.sort(expected_scores))


def test_ivf_index_searched_exhaustively_equals_brute_force(store, tmp_path):
    info = build_index(store, IndexSettings(ivf_threshold=10, nlist=8, nprobe=8))
    try:
        assert info["kind"] == "ivf" and info["nlist"] == 8
        index = FrameIndex(store)
        vectors = FeatureStore(store).load().frame_embedding
        query = vectors[17].astype(np.float32)
        scores, rows = index.search(query, 5)
        expected_scores, _ = brute_force_top_k(vectors, query, 5)
        np.testing.assert_allclose(scores[0], expected_scores, rtol=1e-5, atol=1e-5)
        hits = index.hits(query, 3)
        features = FeatureStore(store).load()
        for hit in hits:
            video = features.video_ids.index(hit.video_id)
            assert hit.row == features.offsets[video] + hit.frame
            assert hit.time == features.frame_time[hit.row]
    finally:
        build_index(store)  # back to the default flat index for the other tests


def test_search_command_prints_hits_and_writes_a_contact_sheet(store, tiny_clip, capsys,
                                                               tmp_path):
    sheet = tmp_path / "hits.png"
    assert main(["search", "--store", str(store), "a hand sign", "--k", "4",
                 "--sheet", str(sheet)]) == EXIT_OK
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "video", "time", "(s)", "score"]
    encoder = load_encoder(str(tiny_clip[0]), str(tiny_clip[1]))
    query = encoder.encode_texts(["a hand sign"])[0]
    features = FeatureStore(store).load()
    _, expected_rows = brute_force_top_k(features.frame_embedding, query, 4)
    for line, row in zip(lines[1:5], expected_rows, strict=True):
        rank, video, t, score = line.split()
        assert video == features.video_ids[features.frame_video[row]]
        assert float(t) == pytest.approx(features.frame_time[row], abs=1e-3)
    image = Image.open(sheet)
    assert image.format == "PNG" and image.size[0] == 4 * 256
    mine = sheet.read_bytes()  # from here on the user's file: refused unless --overwrite
    capsys.readouterr()
    assert main(["search", "--store", str(store), "a hand sign", "--k", "2",
                 "--sheet", str(sheet)]) == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err and sheet.read_bytes() == mine
    assert main(["search", "--store", str(store), "a hand sign", "--k", "2",
                 "--sheet", str(sheet), "--overwrite"]) == EXIT_OK
    assert sheet.read_bytes() != mine


def test_another_encoder_is_refused(store, tmp_path, sample_shards, capsys):
    other = make_tiny_clip(tmp_path / "other", seed=5)
    assert embed_cli(sample_shards, store, other) == EXIT_USAGE
    assert "features were made by" in capsys.readouterr().err
    with pytest.raises(UserError, match="features were made by"):
        FeatureStore(store).check_encoder(load_encoder(str(other[0]), str(other[1])).identity)


def test_rerun_skips_everything_and_changes_nothing(store, sample_shards, tiny_clip):
    before = FeatureStore(store).load().frame_embedding
    assert embed_cli(sample_shards, store, tiny_clip) == EXIT_FAILURES
    summary = json.loads((store / "summary.json").read_text())
    assert summary["shards_written"] == 0 and summary["shards_skipped"] == 4
    assert np.array_equal(FeatureStore(store).load().frame_embedding, before)


def test_unfinished_ingest_is_refused(tmp_path, sample_shards, tiny_clip, capsys):
    copy = tmp_path / "shards"
    copy.mkdir()
    for p in sample_shards.iterdir():
        if p.is_file() and p.name != "shard-000002.done.json":
            (copy / p.name).write_bytes(p.read_bytes())
    assert embed_cli(copy, tmp_path / "f", tiny_clip) == EXIT_USAGE
    assert "ingest is unfinished (3 of 4 shards done)" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_embedding_in_python_with_batch_sizes_that_split_videos(store, sample_shards, tiny_clip,
                                                                tmp_path):
    encoder = load_encoder(str(tiny_clip[0]), str(tiny_clip[1]))
    summary = embed(sample_shards, tmp_path / "f", encoder,
                    EmbedSettings(batch_size=5, workers=0, index=None))
    assert summary.frames_written == summary.frames and summary.index is None
    a = FeatureStore(tmp_path / "f").load().frame_embedding.astype(np.float32)
    b = FeatureStore(store).load().frame_embedding.astype(np.float32)
    np.testing.assert_allclose(a, b, atol=2e-3)


# ----------------------------------------------------------------------------- kill -9

@pytest.fixture(scope="module")
def kill_shards(tmp_path_factory, videos) -> Path:
    root = tmp_path_factory.mktemp("kill")
    corpus = root / "videos"
    corpus.mkdir()
    for copy in range(2):
        for name in ("big_buck_bunny_0_30.webm", "nasa_13013.mp4", "asl_book.mkv"):
            os.symlink(videos / name, corpus / f"c{copy}_{name}")
    assert main(["ingest", str(corpus), "--out", str(root / "shards"), "--shard-size", "1",
                 "--fps", "8", "--size", "64"]) == EXIT_OK
    return root / "shards"


def embed_command(shards: Path, out: Path, clip) -> list[str]:
    return [REFOCUS, "embed", "--shards", str(shards), "--out", str(out), "--model",
            str(clip[0]), "--pretrained", str(clip[1]), "--batch-size", "4", "--workers", "1"]


def store_arrays(out: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(out / "features.zarr", mode="r")
    return {name: np.asarray(group[name][...]) for name in
            ("frames/embedding", "frames/time", "frames/video", "videos/offsets",
             "videos/duration", "videos/id")}


@pytest.mark.slow
def test_kill_9_then_rerun_equals_an_uninterrupted_run(tmp_path, kill_shards, tiny_clip):
    reference = tmp_path / "reference"  # uninterrupted, in this process, same settings
    encoder = load_encoder(str(tiny_clip[0]), str(tiny_clip[1]))
    embed(kill_shards, reference, encoder, EmbedSettings(batch_size=4, workers=1))
    expected = store_arrays(reference)
    for moment in ("first-shard", "third-shard"):
        out = tmp_path / moment
        proc = subprocess.Popen(embed_command(kill_shards, out, tiny_clip),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        want = 1 if moment == "first-shard" else 3
        deadline = time.monotonic() + 120
        while (len(list((out / "progress").glob("shard-*.done.json"))) < want
               and time.monotonic() < deadline):
            time.sleep(0.005)
        kill_parent_and_wait_for_workers(proc)
        done = len(list((out / "progress").glob("shard-*.done.json")))
        assert 0 < done < 6, moment
        result = subprocess.run(embed_command(kill_shards, out, tiny_clip), capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "summary.json").read_text())["shards_skipped"] == done
        got = store_arrays(out)
        for name, array in expected.items():
            assert np.array_equal(got[name], array, equal_nan=array.dtype.kind == "f"), name
        assert not list(out.rglob("*.partial"))


def test_fast_whole_array_reads_equal_zarr_reads(store, tmp_path):
    reader = FeatureStore(store)
    for name in ("frames/embedding", "frames/time", "frames/video", "questions/embedding",
                 "questions/text_embedding", "options/embedding"):
        fast, plain = reader.array(name), reader.group[name][...]
        assert fast.dtype == plain.dtype and np.array_equal(fast, plain, equal_nan=True), name
    # a store whose last chunk was never written reads the fill value, as zarr does
    group = zarr.open_group(tmp_path / "z", mode="w")
    array = group.create_array("a", shape=(10, 3), chunks=(4, 3), dtype="float16",
                               compressors=None, fill_value=0)
    array[:4] = 1.0
    assert np.array_equal(read_array(array, tmp_path / "z" / "a"), array[...])
    compressed = group.create_array("b", shape=(10, 3), chunks=(4, 3), dtype="float32")
    compressed[...] = np.arange(30, dtype=np.float32).reshape(10, 3)
    assert np.array_equal(read_array(compressed, tmp_path / "z" / "b"), compressed[...])


# ----------------------------------------------------------------------------- failed inputs


def test_a_shard_whose_videos_all_failed_is_done_and_the_index_is_built(tmp_path, videos,
                                                                        tiny_clip, capsys):
    """Shard 0 holds only corrupted.mp4 (zero rows), shard 1 a good video: embed marks both
    done and builds the index; a second run does no work and ends the same way."""
    manifest = tmp_path / "corpus.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in (
        {"id": "broken", "path": str(videos / "corrupted.mp4")},
        {"id": "good", "path": str(videos / "realshort.mp4")})))
    shards, out = tmp_path / "shards", tmp_path / "features"
    assert main(["ingest", str(manifest), "--out", str(shards), "--shard-size", "1",
                 "--workers", "1", "--fps", "2", "--size", "64"]) == EXIT_FAILURES
    assert [m["videos"] for m in ShardSet(shards).markers()] == [0, 1]
    first = embed_cli(shards, out, tiny_clip)
    summary = json.loads((out / "summary.json").read_text())
    assert first == EXIT_OK, summary["failures"]
    assert summary["shards_written"] == 2 and summary["index"]["frames"] == summary["frames"]
    assert sorted(p.name for p in (out / "progress").glob("shard-*.done.json")) == [
        "shard-000000.done.json", "shard-000001.done.json"]
    n_frames = len(ShardSet(shards).read("good").frames)
    assert FrameIndex(out).store.n_frames == n_frames > 0
    again = embed_cli(shards, out, tiny_clip)
    summary = json.loads((out / "summary.json").read_text())
    assert again == first
    assert summary["shards_written"] == 0 and summary["shards_skipped"] == 2
    assert summary["frames_written"] == 0


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to declare ``width``×``height``
    pixels: tiny on disk, a decompression bomb to a decoder."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_frame_over_the_pixel_cap_fails_alone(tmp_path, videos, tiny_clip):
    """Two frames of a shard declare 400 and 81 Mpx: each is one recorded failure (its row a
    zero vector), every other frame lands equal to the model's forward, exit 1, and a re-run
    still reports them."""
    from stores import shards as shard_files
    from stores.frames import MAX_FRAME_PIXELS

    assert 2 * MAX_FRAME_PIXELS < 20000 * 20000 and MAX_FRAME_PIXELS < 9000 * 9000
    shards = tmp_path / "shards"
    assert main(["ingest", str(videos / "realshort.mp4"), "--out", str(shards), "--fps", "4",
                 "--size", "64", "--workers", "1"]) == EXIT_OK
    sample = ShardSet(shards).read("realshort")
    frames = list(sample.frames)
    assert len(frames) >= 4
    bombs = {1: jpeg_declaring(20000, 20000), 3: jpeg_declaring(9000, 9000)}
    for i, data in bombs.items():
        frames[i] = data
    old = shard_files.read_marker(shards, 0)
    writer = shard_files.ShardTarWriter(shards, 0)  # the shard rewritten with the crafted frames
    writer.add("realshort", sample.meta, frames)
    writer.commit({k: v for k, v in old.items() if k not in ("version", "shard", "bytes",
                                                              "samples")})
    out = tmp_path / "features"
    assert embed_cli(shards, out, tiny_clip) == EXIT_FAILURES
    failures = json.loads((out / "summary.json").read_text())["failures"]
    assert len(failures) == 2
    for i, line in zip(sorted(bombs), failures, strict=True):
        assert f"video realshort frame {i} " in line and "pixels" in line and "\n" not in line
    features = FeatureStore(out).load()
    assert len(features.frame_embedding) == len(frames)
    np.testing.assert_array_equal(features.frame_time, sample.meta["timestamps"])
    encoder = load_encoder(str(tiny_clip[0]), str(tiny_clip[1]))
    for i, jpeg in enumerate(frames):
        stored = features.frame_embedding[i].astype(np.float32)
        if i in bombs:
            assert not stored.any()
            continue
        pixels = encoder.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB"))[None]
        np.testing.assert_allclose(stored, encoder.encode_images(pixels)[0], atol=2e-3, rtol=0)
    assert embed_cli(shards, out, tiny_clip) == EXIT_FAILURES
    assert json.loads((out / "summary.json").read_text())["failures"] == failures
