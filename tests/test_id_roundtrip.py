"""Any manifest row either loads and goes all the way through — a frame shard (read back by
``ShardSet`` and by WebDataset), a feature store key, and ``refocus score``'s JPEG and
WebDataset exports — or is exactly one ``file:line: field: problem`` issue. And exports keep
questions apart: ids that sanitise alike, re-exports with fewer frames."""

from __future__ import annotations

import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipelines.score import export_frames
from stores.errors import UserError
from stores.features import FeatureStore, FeatureWriter, Layout
from stores.manifest import read_manifest
from stores.selections import FrameSelection
from stores.shards import ShardSet, ShardTarWriter, write_plan

DIM = 4
ENCODER = {"model": "test", "pretrained": "none", "dim": DIM, "config_sha256": "c",
           "weights_sha256": "w", "preprocess": {}, "text_template": "t"}


def jpeg(shade: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 255 - shade, 40)).save(out, format="JPEG")
    return out.getvalue()


FRAMES = [jpeg(10), jpeg(120), jpeg(230)]
TIMES = [0.0, 0.5, 1.0]


def make_shards(folder: Path, videos: dict[str, list[bytes]]) -> Path:
    """A real, finished ingest folder: one shard holding ``videos`` (id → JPEG frames)."""
    write_plan(folder, {"settings": {}, "shards": [list(videos)]})
    writer = ShardTarWriter(folder, 0)
    for vid, frames in videos.items():
        writer.add(vid, {"id": vid, "timestamps": TIMES[:len(frames)]}, frames)
    writer.commit({"videos": len(videos)})
    return folder


def selection(qid: str, vid: str, picks: list[int]) -> FrameSelection:
    return FrameSelection(qid=qid, video_id=vid, question="which?", options=["a", "b"],
                          k=len(picks), frame_indices=picks,
                          timestamps=[TIMES[i] for i in picks],
                          probabilities=[0.5] * len(picks))


def jpeg_export(out: Path) -> dict[str, list[bytes]]:
    """qid → the JPEGs of its export folder, in name order (read back independently)."""
    found: dict[str, list[bytes]] = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        qid = json.loads((folder / "selection.json").read_text(encoding="utf-8"))["qid"]
        assert qid not in found, f"two folders hold {qid!r}"
        found[qid] = [f.read_bytes() for f in sorted(folder.glob("*.jpg"))]
    return found


def webdataset_export(out: Path) -> dict[str, list[bytes]]:
    """qid → its sample's JPEGs, read by the webdataset library."""
    found: dict[str, list[bytes]] = {}
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    for sample in wds.WebDataset(shards, shardshuffle=False):
        qid = json.loads(sample["json"])["qid"]
        assert qid not in found, f"two samples hold {qid!r}"
        found[qid] = [sample[k] for k in sorted(k for k in sample if k.endswith(".jpg"))]
    return found


# --- the property: a row loads and round-trips, or it is one issue ------------------------

KEY = st.text(alphabet=st.sampled_from("ab_-é漢"), min_size=1, max_size=16)
PLAIN = st.text(alphabet=st.sampled_from("ab_-é漢 ."), min_size=1, max_size=16)
LONG = st.text(alphabet=st.sampled_from("ab_-é漢"), min_size=50, max_size=100)  # 50-300 bytes
HOSTILE = st.one_of(
    st.text(alphabet=st.sampled_from("ab./\\ é\x00\t\x7f"), max_size=8),
    st.text(alphabet=st.one_of(st.sampled_from("ab"),
                               st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
            min_size=1, max_size=4),  # lone surrogates, as a JSON "\ud800" escape makes them
    st.integers(), st.none(), st.just(["v"]),
)
# Mostly ids that load: a strategy picked from a list with repeats (one_of would flatten
# HOSTILE's branches and pick among all of them alike).
VIDEO_ID = st.sampled_from([KEY, KEY, LONG, LONG, PLAIN, HOSTILE]).flatmap(lambda s: s)
QUESTION_ID = st.sampled_from([PLAIN, PLAIN, LONG, LONG, HOSTILE]).flatmap(lambda s: s)


def check_round_trip(folder: Path, vid: str, qid: str) -> None:
    shards = make_shards(folder / "shards", {vid: FRAMES})
    sample = ShardSet(shards).read(vid)
    assert sample.frames == FRAMES and sample.meta["id"] == vid
    [read] = list(wds.WebDataset(str(shards / "shard-000000.tar"), shardshuffle=False))
    assert read["__key__"] == vid
    assert [read[f"{i:06d}.jpg"] for i in range(3)] == FRAMES

    writer = FeatureWriter(folder / "features", Layout([vid], [3]), ENCODER, {})
    vector = np.arange(DIM, dtype=np.float16)
    writer.write_questions([qid], np.zeros(1), np.zeros(1), vector[None], vector[None],
                           np.array([0, 2]), np.zeros((2, DIM)), "digest")
    store = FeatureStore(folder / "features")
    assert store.video_ids == [vid] and store.video_row(vid) == 0
    assert store.question(qid).tolist() == vector.tolist()

    rows = [selection(qid, vid, [0, 2])]
    assert export_frames(rows, shards, folder / "jpeg", "jpeg") == 2
    assert jpeg_export(folder / "jpeg") == {qid: [FRAMES[0], FRAMES[2]]}
    assert export_frames(rows, shards, folder / "wds", "webdataset") == 2
    assert webdataset_export(folder / "wds") == {qid: [FRAMES[0], FRAMES[2]]}


@settings(max_examples=30, deadline=None, database=None)
@given(vid=VIDEO_ID, qid=QUESTION_ID)
def test_a_row_round_trips_or_is_one_issue(vid, qid):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        manifest_path = folder / "m.jsonl"
        rows = [{"type": "video", "id": vid, "path": "v.mp4"},
                {"type": "question", "qid": qid, "video_id": vid, "question": "which?",
                 "options": ["a", "b"], "answer": 0}]
        manifest_path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        manifest = read_manifest(manifest_path)
        issue = re.compile(rf"^{re.escape(str(manifest_path))}:(\d+): (\w+): \S.*$")
        lines = []
        for item in manifest.issues:
            match = issue.match(str(item))
            assert match, str(item)
            assert "\n" not in str(item)
            lines.append(int(match.group(1)))
        assert sorted(set(lines)) == lines  # at most one issue per row
        assert [v.id for v in manifest.videos] == ([] if 1 in lines else [vid])
        assert [q.qid for q in manifest.questions] == ([] if 2 in lines else [qid])
        event(f"rows with an issue: {len(lines)}")
        if not lines:
            longest = max(len(vid.encode()), len(qid.encode()))
            event("round trip, an id over 100 bytes" if longest > 100 else "round trip")
            check_round_trip(folder, vid, qid)


# --- exports keep questions apart -----------------------------------------------------------

def test_qids_that_sanitise_alike_export_their_own_frames(tmp_path):
    shards = make_shards(tmp_path / "shards", {"va": FRAMES, "vb": FRAMES[::-1]})
    rows = [selection("q.1", "va", [0, 1]), selection("q_1", "vb", [2])]
    want = {"q.1": [FRAMES[0], FRAMES[1]], "q_1": [FRAMES[0]]}
    assert export_frames(rows, shards, tmp_path / "jpeg", "jpeg") == 3
    assert jpeg_export(tmp_path / "jpeg") == want
    assert (tmp_path / "jpeg" / "q_1").is_dir()  # a qid that is a valid key keeps its name
    assert export_frames(rows, shards, tmp_path / "wds", "webdataset") == 3
    assert webdataset_export(tmp_path / "wds") == want


def test_a_qid_made_to_look_like_another_export_key_is_refused(tmp_path):
    shards = make_shards(tmp_path / "shards", {"va": FRAMES})
    from stores.ids import export_key

    rows = [selection("q.1", "va", [0]), selection(export_key("q.1"), "va", [1])]
    with pytest.raises(UserError, match=r"'q\.1' and 'q_1-[0-9a-f]+'"):
        export_frames(rows, shards, tmp_path / "jpeg", "jpeg")
    assert not (tmp_path / "jpeg").exists()  # refused before anything is written


def test_exporting_again_with_fewer_frames_leaves_no_stale_ones(tmp_path):
    shards = make_shards(tmp_path / "shards", {"va": FRAMES, "vb": FRAMES})
    many = [selection(f"q{i}", vid, [0, 1, 2]) for i, vid in enumerate(["va", "vb", "va"])]
    few = [selection("q0", "va", [1])]
    for kind, read in (("jpeg", jpeg_export), ("webdataset", webdataset_export)):
        out = tmp_path / kind
        export_frames(many, shards, out, kind, shard_size=1)
        assert read(out) == {r.qid: FRAMES for r in many}
        export_frames(few, shards, out, kind, shard_size=1)
        expected = {"q0": [FRAMES[1]]}
        if kind == "jpeg":  # other questions' folders are left alone; q0 holds only its frame
            expected |= {"q1": FRAMES, "q2": FRAMES}
        else:  # the shards of the larger export are gone
            assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
        assert read(out) == expected
