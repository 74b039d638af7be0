"""Ids: what validation accepts, that all of it can be written, and the ids refocus derives."""

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from hypothesis import given, settings
from hypothesis import strategies as st

from stores.ids import (
    DERIVED_ID_BYTES,
    MAX_ID_BYTES,
    check_id,
    export_key,
    export_keys,
    id_problem,
    safe_component,
    unique_ids,
)
from stores.shards import ShardSet, ShardTarWriter, write_plan


@pytest.mark.parametrize("value", ["v001", "4010069381", "clip-1_a", "é" * 100, "a" * 200])
def test_valid_ids_pass(value):
    assert id_problem(value) is None
    assert check_id(value) == value


@pytest.mark.parametrize(
    "value, reason",
    [
        ("a/b", "'/'"),
        ("a\\b", "'\\'"),
        ("..", "'..'"),
        ("x..y", "'..'"),
        ("bad\x00id", "control"),
        ("tab\tid", "control"),
        ("bell\x07", "control"),
        ("", "empty"),
        (" padded", "whitespace"),
        ("a" * 201, "200 bytes"),
        ("é" * 101, "200 bytes"),  # 202 bytes of UTF-8
        (42, "string"),
    ],
)
def test_unsafe_ids_are_refused_with_the_reason(value, reason):
    problem = id_problem(value)
    assert problem is not None and reason in problem
    with pytest.raises(ValueError, match="video id"):
        check_id(value, what="video id")


def test_dots_are_refused_only_where_they_split_webdataset_keys():
    assert id_problem("clip.v2") is None
    assert "'.'" in id_problem("clip.v2", allow_dot=False)


@pytest.mark.parametrize("stem", ["a/b.c", "x\\y", "..", "dots.in.name", "ctl\x01", "a" * 300])
def test_safe_component_always_yields_a_valid_video_id(stem):
    out = safe_component(stem)
    assert id_problem(out, allow_dot=False) is None
    assert len(out.encode()) <= MAX_ID_BYTES


def test_safe_component_keeps_the_path_readable():
    assert safe_component("cooking/day1.part2") == "cooking__day1_part2"


# --- ids that validate can be written ----------------------------------------------------


LONG_IDS = ["a" * 95, "b" * 150, "c" * 200, "é" * 100, "漢" * 66, "mixed-é" + "x" * 150]


def write_shard(folder: Path, samples: dict[str, list[bytes]]) -> Path:
    """A finished shard of ``samples`` (id → frames) with its plan, as ingest leaves it."""
    write_plan(folder, {"settings": {}, "shards": [list(samples)]})
    writer = ShardTarWriter(folder, 0)
    for key, frames in samples.items():
        writer.add(key, {"id": key, "frames": len(frames)}, frames)
    writer.commit({})
    return folder / "shard-000000.tar"


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.mark.parametrize("key", LONG_IDS)
def test_every_valid_id_is_written_and_read_back(tmp_path, key):
    # ids of 90-200 bytes passed validation but overflowed USTAR's 100-byte member names
    assert id_problem(key, allow_dot=False) is None
    frames = [b"\xff\xd8first", b"\xff\xd8second" * 100]
    shard = write_shard(tmp_path, {key: frames, "short": [b"s"]})
    assert tar_names(shard) == [f"{key}.json", f"{key}.000000.jpg", f"{key}.000001.jpg",
                                "short.json", "short.000000.jpg"]
    sample = ShardSet(tmp_path).read(key)
    assert sample.frames == frames and sample.meta == {"id": key, "frames": 2}
    read = {s["__key__"]: s for s in wds.WebDataset(str(shard), shardshuffle=False)}
    assert list(read) == [key, "short"]
    assert [read[key]["000000.jpg"], read[key]["000001.jpg"]] == frames
    assert json.loads(read[key]["json"]) == {"id": key, "frames": 2}


def test_a_sample_that_fails_leaves_nothing_in_the_shard(tmp_path):
    write_plan(tmp_path, {"settings": {}, "shards": [["bad", "good"]]})
    writer = ShardTarWriter(tmp_path, 0)
    with pytest.raises(TypeError):
        writer.add("bad", {"id": "bad"}, [b"\xff\xd8ok", "not bytes"])  # type: ignore[list-item]
    writer.add("good", {"id": "good"}, [b"\xff\xd8g"])
    writer.commit({})
    assert tar_names(tmp_path / "shard-000000.tar") == ["good.json", "good.000000.jpg"]
    assert ShardSet(tmp_path).read("good").frames == [b"\xff\xd8g"]


def test_shard_bytes_are_fixed_and_plain_ustar_for_short_names(tmp_path):
    samples = {"v001": [b"x" * 1000, b"y" * 513], "clip-2": []}
    one = write_shard(tmp_path / "one", samples).read_bytes()
    assert write_shard(tmp_path / "two", samples).read_bytes() == one
    # the oracle: Python's own tar writer in USTAR format, members as ShardTarWriter documents
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, frames in samples.items():
            members = [("json", json.dumps({"id": key, "frames": len(frames)}).encode())]
            members += [(f"{i:06d}.jpg", f) for i, f in enumerate(frames)]
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    assert one == buffer.getvalue()
    long_key = "é" * 100
    first = write_shard(tmp_path / "three", {long_key: [b"f"]}).read_bytes()
    assert write_shard(tmp_path / "four", {long_key: [b"f"]}).read_bytes() == first
    with tarfile.open(tmp_path / "three" / "shard-000000.tar") as tar:
        for member in tar:
            assert member.pax_headers == {"path": member.name}  # no mtime, atime or ctime
            assert member.mtime == 0


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "."])
def test_ids_that_are_no_text_or_name_the_folder_itself_are_refused(value):
    # a JSON "\ud800" escape gives a lone surrogate, which crashed the UTF-8 length check
    assert id_problem(value) is not None


def test_long_derived_ids_are_shortened_with_a_hash_of_the_whole_name():
    base = "dataset/" + "deeply_nested_folder/" * 12
    one, two = safe_component(base + "clip_1"), safe_component(base + "clip_2")
    assert one != two
    for name, out in ((base + "clip_1", one), (base + "clip_2", two)):
        assert len(out.encode()) <= DERIVED_ID_BYTES
        assert out.endswith("-" + hashlib.sha256(name.encode()).hexdigest()[:10])
        assert out.startswith("dataset__deeply_nested_folder__")
        assert safe_component(name) == out  # deterministic
        assert id_problem(out, allow_dot=False) is None
    assert safe_component("short/name") == "short__name"  # short ids stay readable


def test_export_keys_keep_qids_that_sanitise_alike_apart():
    keys = export_keys(["q.1", "q_1", "q 1", "Q.1"])
    assert keys["q_1"] == "q_1" and keys["q 1"] == "q 1"  # a dot-free valid qid is its own key
    assert keys["q.1"].startswith("q_1-") and keys["Q.1"].startswith("Q_1-")
    assert len(set(keys.values())) == 4
    with pytest.raises(ValueError, match=r"'q\.1' and 'q_1-"):
        export_keys(["q.1", export_key("q.1")])  # a qid chosen to look like another's key


ANY_TEXT = st.text(
    alphabet=st.one_of(st.sampled_from("ab._/\\ é漢\x00\t\x7f"),
                       st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    max_size=260,
)


@settings(max_examples=50, deadline=None, database=None)
@given(ANY_TEXT, ANY_TEXT)
def test_safe_component_gives_valid_ids_that_differ_when_their_sanitised_names_do(a, b):
    one, two = safe_component(a), safe_component(b)
    assert id_problem(one, allow_dot=False) is None
    assert len(one.encode()) <= DERIVED_ID_BYTES
    if one == two:
        # only names that read the same once '/', '.', control characters are replaced
        assert a == b or (len(one.encode()) < DERIVED_ID_BYTES - 11
                          and safe_component(a, 10_000) == safe_component(b, 10_000))


VALID_QIDS = st.text(alphabet=st.sampled_from("ab._ -é"), min_size=1, max_size=40).filter(
    lambda q: id_problem(q) is None)


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(VALID_QIDS, unique=True, max_size=8))
def test_export_keys_are_distinct_valid_webdataset_keys(qids):
    keys = export_keys(qids)
    assert len(set(keys.values())) == len(qids)
    assert all(id_problem(k, allow_dot=False) is None for k in keys.values())


@pytest.mark.parametrize("wanted, reserved, expected", [
    (["a", "b", "c"], [], ["a", "b", "c"]),  # no clash: every id as wanted
    (["a", "a", "a"], [], ["a", "a-2", "a-3"]),
    (["a", "a", "a-2"], [], ["a", "a-3", "a-2"]),  # a suffix never takes a wanted id
    (["a", "a-2", "a"], [], ["a", "a-2", "a-3"]),
    (["a", "b"], ["a", "a-2"], ["a-3", "b"]),  # reserved ids are never given
    (["a-2", "a"], ["a"], ["a-2", "a-3"]),
    ([], ["a"], []),
])
def test_unique_ids_against_a_table(wanted, reserved, expected):
    assert unique_ids(wanted, reserved) == expected
