"""Corpora that grow: videos added to the inputs between two runs become new shards, new
feature rows and new index entries; what the first run wrote is never rewritten. Checked
against a fresh run over all the videos, the first run's files (bytes and mtimes), and a
brute-force search."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import make_video
from hypothesis import given, settings
from hypothesis import strategies as st

from flows.cli import EXIT_OK, EXIT_USAGE, main
from pipelines.ingest import plan_shards
from pipelines.synth import SynthSettings, generate
from stores.features import STORE_DIR, FeatureStore, FeatureWriter, Layout
from stores.ids import stable_ids
from stores.index import INDEX_DIR, INDEX_FILE, FrameIndex, IndexSettings, build_index
from stores.manifest import Video

VIDEOS = 5
FIRST = ["synth_0003_00000", "synth_0003_00001", "synth_0003_00002"]  # run 1
SECOND = ["synth_0003_00001", "synth_0003_00002", "synth_0003_00003", "synth_0003_00004"]
ALL = FIRST + SECOND[2:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grow") / "corpus"
    generate(out, SynthSettings(videos=VIDEOS, seed=3, duration=(8.0, 9.0), events=(1, 2),
                                questions_per_video=2, workers=1))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for name, ids in (("first", FIRST), ("second", SECOND), ("all", ALL)):
        keep = [r for r in rows if r.get("id", r.get("video_id")) in ids]
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    return out


def ingest(manifest: Path, out: Path, *extra: str) -> int:
    return main(["ingest", str(manifest), "--out", str(out), "--shard-size", "2",
                 "--workers", "1", "--fps", "4", "--size", "64", *extra])


def embed(shards: Path, out: Path) -> int:
    return main(["embed", "--shards", str(shards), "--out", str(out), "--model",
                 "refocus-synth", "--workers", "0", "--batch-size", "8"])


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and mtime (ns)."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def rows_of(store: FeatureStore, video_id: str) -> slice:
    row = store.video_row(video_id)
    return slice(int(store.offsets[row]), int(store.offsets[row + 1]))


@pytest.fixture(scope="module")
def grown(corpus, tmp_path_factory) -> dict:
    """Run 1 on three videos; run 2 after two videos were added and one left the inputs;
    a fresh run over all five. What run 1 left is kept for comparison."""
    root = tmp_path_factory.mktemp("runs")
    shards, features, fresh = root / "shards", root / "features", root / "fresh"
    assert ingest(corpus / "first.jsonl", shards) == EXIT_OK
    assert embed(shards, features) == EXIT_OK
    before = {"shards": files(shards), "features": files(features / STORE_DIR),
              "store": FeatureStore(features).load(),
              "index": faiss.read_index(str(features / INDEX_DIR / INDEX_FILE))}
    assert ingest(corpus / "second.jsonl", shards) == EXIT_OK
    assert embed(shards, features) == EXIT_OK
    assert ingest(corpus / "all.jsonl", fresh / "shards") == EXIT_OK
    assert embed(fresh / "shards", fresh / "features") == EXIT_OK
    return {"root": root, "shards": shards, "features": features, "fresh": fresh,
            "before": before}


def test_new_videos_become_new_shards_and_old_shard_files_are_untouched(grown):
    plan = json.loads((grown["shards"] / "plan.json").read_text())
    assert plan["shards"] == [FIRST[:2], FIRST[2:], SECOND[2:]]
    after = files(grown["shards"])
    for name, (data, mtime) in grown["before"]["shards"].items():
        if name.startswith("shard-"):  # tars and done markers of run 1
            assert after[name] == (data, mtime), name
    assert "shard-000002.tar" in after and "shard-000002.tar" not in grown["before"]["shards"]
    summary = json.loads((grown["shards"] / "summary.json").read_text())
    assert (summary["shards_written"], summary["shards_skipped"]) == (1, 2)
    assert summary["videos"] == len(ALL)  # the video gone from the inputs stays
    stored = [json.loads(line) for line in (grown["shards"] / "manifest.jsonl").read_text()
              .splitlines()]
    assert [r["id"] for r in stored if r["type"] == "video"] == ALL
    assert sum(r["type"] == "question" for r in stored) == 2 * len(ALL)


def test_old_rows_and_chunk_files_are_untouched_and_the_store_equals_a_fresh_one(grown):
    old, store = grown["before"]["store"], FeatureStore(grown["features"])
    new = store.load()
    assert new.video_ids == ALL and new.video_ids[:3] == old.video_ids
    n_old = len(old.frame_time)
    assert np.array_equal(new.offsets[:4], old.offsets)
    for name in ("frame_embedding", "frame_time", "frame_video"):
        assert np.array_equal(getattr(new, name)[:n_old], getattr(old, name), equal_nan=True)
    assert np.array_equal(new.duration[:3], old.duration)
    # chunk files that hold old rows only are the same files; the one shared with new rows
    # starts with the same bytes (uncompressed, row-major)
    after = files(grown["features"] / STORE_DIR)
    chunk_rows = store.group["frames/embedding"].chunks[0]
    for index in range(n_old // chunk_rows):
        name = f"frames/embedding/c/{index}/0"
        assert after[name] == grown["before"]["features"][name]
    boundary = f"frames/embedding/c/{n_old // chunk_rows}/0"
    kept = (n_old % chunk_rows) * store.dim * 2
    assert after[boundary][0][:kept] == grown["before"]["features"][boundary][0][:kept]
    # every video's rows equal a fresh store of all five videos (row order differs)
    fresh_store = FeatureStore(grown["fresh"] / "features")
    fresh = fresh_store.load()
    assert sorted(fresh.video_ids) == sorted(ALL) and len(fresh.frame_time) == len(new.frame_time)
    for video_id in ALL:
        a, b = rows_of(store, video_id), rows_of(fresh_store, video_id)
        assert np.array_equal(new.frame_embedding[a], fresh.frame_embedding[b]), video_id
        assert np.array_equal(new.frame_time[a], fresh.frame_time[b]), video_id
    # the questions of the new videos were embedded too, as the fresh store embeds them
    assert sorted(new.qids) == sorted(fresh.qids) and len(new.qids) == 2 * len(ALL)
    for qid in new.qids:
        i, j = new.qids.index(qid), fresh.qids.index(qid)
        assert new.video_ids[new.question_video[i]] == fresh.video_ids[fresh.question_video[j]]
        assert np.array_equal(new.question_embedding[i], fresh.question_embedding[j]), qid


def test_the_index_grew_old_ids_keep_their_frames_and_new_frames_are_found(grown):
    index = FrameIndex(grown["features"])
    store = index.store
    features = store.load()
    n_old = len(grown["before"]["store"].frame_time)
    assert index.index.ntotal == len(features.frame_time)
    old_index = grown["before"]["index"]
    for row in range(n_old):  # the old ids hold the same vectors: the old frames
        assert np.array_equal(index.index.reconstruct(row), old_index.reconstruct(row))
        assert np.array_equal(index.index.reconstruct(row),
                              features.frame_embedding[row].astype(np.float32))
    for video_id in SECOND[2:]:  # a new video's frame is its own nearest neighbour
        rows = rows_of(store, video_id)
        query = features.frame_embedding[rows.start + 1].astype(np.float32)
        scores = features.frame_embedding.astype(np.float32) @ query
        [hit] = index.hits(query, 1)
        assert hit.score == pytest.approx(scores.max(), abs=1e-5)
        assert hit.video_id == video_id or scores[rows.start + 1] == pytest.approx(
            scores[hit.row], abs=1e-6)
    summary = json.loads((grown["features"] / "summary.json").read_text())
    assert summary["index"]["built"] is False
    assert summary["index"]["added"] == len(features.frame_time) - n_old


def test_other_settings_are_still_refused_in_one_line(grown, corpus, capsys):
    before = files(grown["shards"])
    assert ingest(corpus / "all.jsonl", grown["shards"], "--size", "96") == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings (size; see plan.json)" in err[0]
    assert files(grown["shards"]) == before


def test_a_scheduled_preprocess_flow_picks_up_videos_added_to_its_folder(prefect_api, corpus,
                                                                        tmp_path):
    from flows.orchestrate import preprocess_flow

    watched, root = tmp_path / "watched", tmp_path / "root"
    watched.mkdir()
    for video_id in FIRST:
        shutil.copy(corpus / "videos" / f"{video_id}.mp4", watched)
    first = preprocess_flow([str(watched)], str(root), shard_size=2, size=64)
    shard_files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns)
                   for p in (root / "shards").glob("shard-*")}
    for video_id in SECOND[2:]:
        shutil.copy(corpus / "videos" / f"{video_id}.mp4", watched)
    second = preprocess_flow([str(watched)], str(root), shard_size=2, size=64)
    assert (first["ingest"]["videos"], second["ingest"]["videos"]) == (3, 5)
    assert (second["ingest"]["shards_written"], second["ingest"]["shards_skipped"]) == (1, 2)
    assert second["embed"]["shards_written"] == 1 and second["embed"]["frames"] > first[
        "embed"]["frames"]
    for name, value in shard_files.items():
        assert (root / "shards" / name).read_bytes() == value[0]
        assert (root / "shards" / name).stat().st_mtime_ns == value[1]
    store = FeatureStore(root / "features")
    assert store.video_ids == ALL
    index = FrameIndex(root / "features")
    assert index.index.ntotal == store.n_frames
    embedding, _ = store.video(SECOND[-1])
    [hit] = index.hits(embedding[0].astype(np.float32), 1)
    assert hit.row >= first["embed"]["frames"]  # a frame of a new video


# ----------------------------------------------------------------------------- units

ids = st.lists(st.sampled_from([f"v{i}" for i in range(12)]), unique=True, max_size=12)


@given(first=ids, second=ids, size=st.integers(1, 4))
@settings(max_examples=200, deadline=None)
def test_a_plan_only_grows(first, second, size):
    old = plan_shards([Video(i, f"/{i}.mp4") for i in first], size)
    new = plan_shards([Video(i, f"/{i}.mp4") for i in second], size, old)
    assert new[:len(old)] == old  # the old shards, as they were
    added = [i for ids in new[len(old):] for i in ids]
    assert added == [i for i in second if i not in first]  # the new videos, in input order
    assert all(1 <= len(ids) <= size for ids in new[len(old):])
    assert sorted(i for ids in new for i in ids) == sorted(set(first) | set(second))


DIM = 8
ENCODER = {"model": "test", "pretrained": "none", "dim": DIM, "config_sha256": "c",
           "weights_sha256": "w", "preprocess": {}, "text_template": "t"}


def _write(folder: Path, counts: list[int], rng: np.random.Generator) -> np.ndarray:
    """A store for videos of ``counts`` frames (grown when it exists); the rows written for
    the videos it lacked, one shard per video."""
    layout = Layout([f"v{i}" for i in range(len(counts))], counts)
    writer = FeatureWriter(folder, layout, ENCODER, {})
    written = []
    for shard, (start, stop) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:],
                                              strict=True)):
        if writer.done(shard):
            continue
        vectors = rng.standard_normal((stop - start, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        writer.write_shard(shard, slice(int(start), int(stop)), vectors,
                           np.arange(stop - start, dtype=float), slice(shard, shard + 1),
                           np.array([1.0]), {})
        written.append(vectors.astype(np.float16))
    return np.concatenate(written)


def _centroids(folder: Path) -> np.ndarray:
    index = faiss.read_index(str(folder / INDEX_DIR / INDEX_FILE))  # kept alive while read
    quantizer = faiss.extract_index_ivf(index).quantizer
    return quantizer.reconstruct_n(0, quantizer.ntotal)


def test_an_ivf_index_gets_the_new_rows_added_and_a_kind_change_rebuilds(tmp_path):
    rng = np.random.default_rng(0)
    ivf = IndexSettings(ivf_threshold=100, nlist=4, nprobe=4)  # nprobe = nlist: exhaustive
    old = _write(tmp_path, [150, 150], rng)
    first = build_index(tmp_path, ivf)
    assert (first["kind"], first["built"], first["added"]) == ("ivf", True, 300)
    centroids = _centroids(tmp_path)
    new = _write(tmp_path, [150, 150, 120, 90], rng)
    again = build_index(tmp_path, ivf)
    assert (again["built"], again["added"], again["frames"]) == (False, 210, 510)
    assert np.array_equal(_centroids(tmp_path), centroids)  # not retrained
    vectors = np.concatenate([old, new]).astype(np.float32)
    index = FrameIndex(tmp_path)
    for row in (0, 299, 300, 509):
        scores, found = index.search(vectors[row], 3)
        expected = np.sort(vectors @ vectors[row])[::-1][:3]
        np.testing.assert_allclose(scores[0], expected, atol=1e-5)
        assert found[0][0] == row
    assert build_index(tmp_path, ivf)["added"] == 0  # up to date: left as it is
    # a killed run saved the index but not its description: nothing is added twice
    info = json.loads((tmp_path / "index" / "index.json").read_text())
    (tmp_path / "index" / "index.json").write_text(json.dumps({**info, "frames": 300}))
    assert build_index(tmp_path, ivf)["added"] == 0
    # grown past the threshold of a flat index: rebuilt as IVF, ids still the rows
    flat = IndexSettings(ivf_threshold=520)
    assert build_index(tmp_path, flat)["kind"] == "flat"  # other settings: rebuilt (flat)
    assert build_index(tmp_path, flat)["built"] is False
    _write(tmp_path, [150, 150, 120, 90, 50], rng)
    rebuilt = build_index(tmp_path, flat)
    assert (rebuilt["kind"], rebuilt["built"], rebuilt["added"]) == ("ivf", True, 560)


def test_a_damaged_stored_manifest_is_refused_in_one_line(grown, corpus, tmp_path, capsys):
    shards = tmp_path / "shards"
    shutil.copytree(grown["shards"], shards)
    with open(shards / "manifest.jsonl", "a") as f:
        f.write('{"type": "video"}\n')  # a row refocus never writes
    assert ingest(corpus / "all.jsonl", shards) == EXIT_USAGE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "manifest.jsonl: damaged (" in line and "run ingest again" in line


# ----------------------------------------------------------------------------- stable ids

def samples(folder: Path) -> dict[str, list[tuple[str, str, int]]]:
    """Per shard tar, read with tarfile: (key, source, source width) of each sample."""
    out = {}
    for tar_path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            metas = [(m.name.removesuffix(".json"), json.load(tar.extractfile(m)))
                     for m in tar.getmembers() if m.name.endswith(".json")]
        out[tar_path.name] = [(key, meta["source"], meta["source_width"]) for key, meta in metas]
    return out


def test_a_file_added_beside_one_of_the_same_name_is_ingested_once_under_a_new_id(tmp_path):
    watched, out = tmp_path / "watched", tmp_path / "shards"
    watched.mkdir()
    mp4 = str(make_video(watched / "a.mp4", 12, size=(64, 48)).resolve())
    assert ingest(watched, out) == EXIT_OK
    tar = out / "shard-000000.tar"
    first = (tar.read_bytes(), tar.stat().st_mtime_ns)
    mkv = str(make_video(watched / "a.mkv", 12, size=(96, 64)).resolve())  # sorts before a.mp4
    assert ingest(watched, out) == EXIT_OK
    expected = {"shard-000000.tar": [("a", mp4, 64)], "shard-000001.tar": [("a-2", mkv, 96)]}
    assert samples(out) == expected
    assert (tar.read_bytes(), tar.stat().st_mtime_ns) == first
    assert json.loads((out / "plan.json").read_text())["shards"] == [["a"], ["a-2"]]
    stored = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["id"]: r["path"] for r in stored} == {"a": mp4, "a-2": mkv}
    # again: the importer numbers them the other way round (a.mkv first); nothing changes
    assert ingest(watched, out) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["videos"], summary["shards_written"], summary["shards_skipped"]) == (2, 0, 2)
    assert samples(out) == expected
    assert (tar.read_bytes(), tar.stat().st_mtime_ns) == first


STORED = {"a": "/v/a.mp4", "a-2": "/v/a.mkv", "b": "/v/b.mp4", "gone": "/v/gone.mp4",
          "x1": "/v/same.mp4", "x2": "/v/same.mp4"}


@pytest.mark.parametrize("items, expected", [
    # the stored places keep their ids, whatever the importer calls them this time
    ([("a", "/v/a.mkv"), ("a-2", "/v/a.mp4"), ("b", "/v/b.mp4")], ["a-2", "a", "b"]),
    # a new file never takes a stored id, not even one of a video gone from the inputs
    ([("a", "/v/a.avi"), ("a-2", "/v/a.mkv"), ("a-3", "/v/a.mp4")], ["a-3", "a-2", "a"]),
    ([("gone", "/v/new/gone.mp4")], ["gone-2"]),
    # new ids keep what they want when free; a suffix never takes the id a new file wants
    ([("c", "/v/c.mp4"), ("b", "/v/b.webm"), ("b-2", "/v/b-2.mp4")], ["c", "b-3", "b-2"]),
    # one place stored under two ids: each keeps its own; a third name for it is new
    ([("x2", "/v/same.mp4"), ("x1", "/v/same.mp4"), ("x3", "/v/same.mp4")], ["x2", "x1", "x3"]),
    ([("y", "/v/same.mp4"), ("z", "/v/same.mp4"), ("w", "/v/same.mp4")], ["x1", "x2", "w"]),
    ([], []),
])
def test_stable_ids_follow_the_stored_places(items, expected):
    assert stable_ids(STORED, items) == expected
