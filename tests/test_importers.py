import csv
import hashlib
import json
from pathlib import Path

import pytest

from flows.cli import main
from stores.errors import UserError
from stores.importers import from_inputs, import_folder, import_nextgqa, import_nextqa
from stores.manifest import read_manifest, write_manifest


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_nextqa_imports_every_row_with_the_right_answer(shared_data):
    path = shared_data / "annotations" / "nextqa_val.csv"
    rows = csv_rows(path)
    m = import_nextqa(path, video_root=shared_data / "no-such-folder")
    assert len(rows) == 4996
    assert m.issues == []
    assert len(m.questions) == 4996
    assert len(m.videos) == len({r["video_id"] for r in rows})
    by_qid = {q.qid: q for q in m.questions}
    for r in rows:
        q = by_qid[f"{r['video_id']}_{r['qid']}"]
        assert list(q.options) == [r[f"a{i}"] for i in range(5)]
        assert q.options[q.answer] == r["answer"]  # the CSV gives the right option's text
        assert (q.video_id, q.question, q.category, q.split) == (
            r["video_id"], r["question"], r["type"], "val")
    v = m.video(rows[0]["video_id"])
    assert v.meta["frame_count"] == int(rows[0]["frame_count"])
    assert v.path == str(shared_data / "no-such-folder" / f"{rows[0]['video_id']}.mp4")


def test_nextqa_finds_videos_in_subfolders_by_id(tmp_path, shared_data):
    path = shared_data / "annotations" / "nextqa_val.csv"
    first = csv_rows(path)[0]["video_id"]
    (tmp_path / "1021").mkdir()
    (tmp_path / "1021" / f"{first}.mp4").write_bytes(b"x")
    m = import_nextqa(path, video_root=tmp_path)
    assert m.video(first).path == str(tmp_path / "1021" / f"{first}.mp4")


def test_nextgqa_attaches_evidence_spans_to_their_questions(shared_data):
    ann = shared_data / "annotations"
    rows = csv_rows(ann / "nextgqa_val.csv")
    grounding = json.loads((ann / "nextgqa_gsub_val.json").read_text())
    m = import_nextgqa(ann / "nextgqa_val.csv", ann / "nextgqa_gsub_val.json")
    assert m.issues == []
    assert len(m.questions) == len(rows) == 3358
    clipped = 0
    for q in m.questions:
        vid, local = q.qid.rsplit("_", 1)
        expected = grounding[vid]["location"][local]
        duration = m.video(vid).duration
        assert len(q.evidence) == len(expected) > 0
        for (start, end), (e_start, e_end) in zip(q.evidence, expected, strict=True):
            assert start == e_start
            # ends past the last frame by less than the 0.1 s annotation step mean "to the end"
            assert end == e_end or (end == duration and 0 < e_end - duration <= 0.1)
            clipped += end != e_end
            assert 0 <= start <= end <= duration
    assert 0 < clipped < 200
    # duration from frame_count / fps, finer than the JSON's whole seconds
    r = rows[0]
    assert m.video(r["video_id"]).duration == pytest.approx(
        int(r["frame_count"]) / grounding[r["video_id"]]["fps"], abs=1e-6)


def test_nextgqa_reports_spans_far_outside_the_video(tmp_path, shared_data):
    ann = shared_data / "annotations"
    grounding = json.loads((ann / "nextgqa_gsub_val.json").read_text())
    rows = csv_rows(ann / "nextgqa_val.csv")
    vid, local = rows[4]["video_id"], rows[4]["qid"]
    grounding[vid]["location"][local] = [[1.0, 999.0]]
    (tmp_path / "gsub.json").write_text(json.dumps(grounding))
    m = import_nextgqa(ann / "nextgqa_val.csv", tmp_path / "gsub.json")
    # row 5 of the data is line 6 of the file (after the header)
    assert [str(i).split(": ", 1)[0] for i in m.issues] == [f"{ann / 'nextgqa_val.csv'}:6"]
    assert "span [1, 999] outside" in str(m.issues[0])
    assert len(m.questions) == 3357


def test_nextqa_bad_rows_are_reported_and_the_rest_lands(tmp_path, shared_data):
    src = (shared_data / "annotations" / "nextqa_val.csv").read_text().splitlines()
    header, body = src[0], src[1:11]
    cols = body[2].split(",")
    cols[5] = "an answer that is no option"
    body[2] = ",".join(cols)
    body[5] = ",".join(body[5].split(",")[:-1]) + ","  # a4 empty
    (tmp_path / "val.csv").write_text("\n".join([header, *body]) + "\n")
    m = import_nextqa(tmp_path / "val.csv")
    assert [str(i) for i in m.issues] == [
        f"{tmp_path / 'val.csv'}:4: answer: 'an answer that is no option' matches none of "
        "the options",
        f"{tmp_path / 'val.csv'}:7: a4: empty or missing column",
    ]
    assert len(m.questions) == 8


def test_not_a_nextqa_file_is_a_user_error(tmp_path):
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="not a NExT-QA CSV"):
        import_nextqa(tmp_path / "x.csv")


def test_folder_import_is_recursive_by_extension_with_safe_unique_ids(tmp_path):
    for rel in ["a.mp4", "sub/b.MKV", "sub/deeper/c.webm", "sub/a.mp4", "notes.txt", "x.y.mov"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    m = import_folder(tmp_path)
    assert {v.id: Path(v.path).relative_to(tmp_path).as_posix() for v in m.videos} == {
        "a": "a.mp4", "sub__a": "sub/a.mp4", "sub__b": "sub/b.MKV",
        "sub__deeper__c": "sub/deeper/c.webm", "x_y": "x.y.mov",
    }


def test_a_clash_is_numbered_without_taking_the_id_of_another_file(tmp_path):
    for rel in ["x/a.mkv", "x/a.mp4", "x__a-2.mp4", "b.mp4"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    m = import_folder(tmp_path)
    assert {v.id: Path(v.path).relative_to(tmp_path).as_posix() for v in m.videos} == {
        "b": "b.mp4", "x__a": "x/a.mkv", "x__a-3": "x/a.mp4", "x__a-2": "x__a-2.mp4",
    }


def test_inputs_combine_files_folders_and_manifests(tmp_path, videos):
    write_manifest(tmp_path / "m.jsonl", from_inputs([str(videos / "realshort.mp4")]))
    m = from_inputs([str(videos / "nasa_13013.mp4"), str(tmp_path / "m.jsonl")])
    assert [v.id for v in m.videos] == ["realshort", "nasa_13013"]
    stored = Path(read_manifest(tmp_path / "m.jsonl").videos[0].path)
    # both sides resolved: the shared data may be reached through a symlink
    assert stored.is_absolute() and stored.resolve() == (videos / "realshort.mp4").resolve()
    with pytest.raises(UserError, match="no such file or folder"):
        from_inputs([str(tmp_path / "nothing-here")])
    url = from_inputs(["https://example.org/media/clip.v2.mp4?token=1"])
    assert [(v.id, v.path) for v in url.videos] == [
        ("clip_v2", "https://example.org/media/clip.v2.mp4?token=1")]
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match="refocus import"):
        from_inputs([str(tmp_path / "a.csv")])


# --- encodings, symlink loops, long nested names, relative --videos ------------------------

NEXTQA_HEADER = "video_id,frame_count,width,height,question,answer,qid,type,a0,a1,a2,a3,a4"


def nextqa_line(vid: str, question: str = "what is the man doing") -> str:
    return f"{vid},10,64,48,{question},waves,0,CW,waves,sits,runs,eats,sleeps"


def test_a_latin1_nextqa_csv_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "val.csv"
    path.write_bytes("\n".join([NEXTQA_HEADER, nextqa_line("1", "why is the café shut"), ""])
                     .encode("latin-1"))
    with pytest.raises(UserError) as caught:
        import_nextqa(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: not UTF-8 text (byte 0xe9 on line 2")
    assert "\n" not in message and "iconv" in message


def test_a_nextqa_csv_with_a_byte_order_mark_reads(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text("\n".join([NEXTQA_HEADER, nextqa_line("1", "why is the café shut"), ""]),
                    encoding="utf-8-sig")
    m = import_nextqa(path)
    assert m.issues == [] and [q.question for q in m.questions] == ["why is the café shut"]


def test_a_nextqa_video_id_that_leaves_the_videos_folder_is_one_issue(tmp_path):
    path = tmp_path / "val.csv"
    path.write_text("\n".join([NEXTQA_HEADER, nextqa_line("../../etc/x"), nextqa_line("2"),
                               nextqa_line("/abs"), ""]))
    m = import_nextqa(path, video_root=tmp_path / "videos")
    assert [i.where for i in m.issues] == [f"{path}:2", f"{path}:4"]  # one line per row
    assert [i.field for i in m.issues] == ["video_id", "video_id"]
    assert [v.id for v in m.videos] == ["2"]


def test_a_symlink_loop_in_a_folder_is_one_issue_and_the_rest_lands(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.mp4").write_bytes(b"")
    (tmp_path / "loop.mp4").symlink_to("loop.mp4")
    (tmp_path / "sub" / "up").symlink_to("..")  # a folder loop, not followed
    m = import_folder(tmp_path)
    assert [v.id for v in m.videos] == ["a", "sub__b"]
    assert [str(i) for i in m.issues] == [
        f"{tmp_path / 'loop.mp4'}: path: symbolic link loop (it leads back to itself); left out"]
    # given by name, the loop used to end the import with a traceback
    loose = from_inputs([str(tmp_path / "loop.mp4"), str(tmp_path / "a.mp4")])
    assert [v.id for v in loose.videos] == ["a"] and len(loose.issues) == 1


def test_long_nested_folder_names_give_short_distinct_ids_with_the_full_path_kept(tmp_path):
    nested = Path(*["a_rather_long_dataset_folder_name"] * 7)  # 230 bytes of folders
    for name in ("clip_one.mp4", "clip_two.mp4"):
        (tmp_path / nested / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / nested / name).write_bytes(b"")
    m = import_folder(tmp_path)
    assert m.issues == []
    for video, name in zip(m.videos, ("clip_one", "clip_two"), strict=True):
        original = (nested / name).as_posix()
        digest = hashlib.sha256(original.encode()).hexdigest()[:10]
        assert video.id.startswith("a_rather_long_dataset_folder_name__a_rather")
        assert video.id.endswith(f"-{digest}") and len(video.id.encode()) <= 120
        assert video.path == str(tmp_path / nested / f"{name}.mp4")  # the original, whole


def test_cli_import_writes_videos_given_relative_to_the_current_folder_as_found(
        tmp_path, monkeypatch):
    (tmp_path / "NExTVideo" / "1021").mkdir(parents=True)
    (tmp_path / "NExTVideo" / "1021" / "7.mp4").write_bytes(b"")
    (tmp_path / "val.csv").write_text("\n".join([NEXTQA_HEADER, nextqa_line("7"), ""]))
    monkeypatch.chdir(tmp_path)
    code = main(["import", "nextqa", "val.csv", "--videos", "NExTVideo",
                 "-o", "manifests/nextqa.jsonl"])
    assert code == 0
    [video] = read_manifest(tmp_path / "manifests" / "nextqa.jsonl").videos
    assert video.path == str(tmp_path / "NExTVideo" / "1021" / "7.mp4")
