import json
from pathlib import Path

import pytest

from stores.errors import UserError
from stores.manifest import Manifest, Question, Video, merge, read_manifest, write_manifest


def write_rows(path: Path, rows: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def video(vid="v1", **kw):
    return {"type": "video", "id": vid, "path": f"videos/{vid}.mp4", **kw}


def question(qid="q1", **kw):
    row = {"type": "question", "qid": qid, "video_id": "v1", "question": "What colour?",
           "options": ["red", "green", "blue", "yellow"], "answer": 2}
    row.update(kw)
    return row


def test_round_trip_keeps_every_field(tmp_path):
    m = Manifest(
        videos=[Video("v1", str(tmp_path / "v1.mp4"), 12.5, "train", {"fps": 30})],
        questions=[Question("q1", "v1", "Which came first?", ("a", "b", "c"), 1,
                            ((1.0, 2.5), (4.0, 5.0)), "train", "order", {"source": "synth"})],
    )
    write_manifest(tmp_path / "m.jsonl", m)
    back = read_manifest(tmp_path / "m.jsonl")
    assert back.issues == []
    assert back.videos == m.videos and back.videos[0].meta == {"fps": 30}
    assert back.questions == m.questions and back.questions[0].meta == {"source": "synth"}


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    m = read_manifest(write_rows(tmp_path / "m.jsonl", [video()]))
    assert m.videos[0].path == str(tmp_path / "videos" / "v1.mp4")


def test_type_is_inferred_when_left_out(tmp_path):
    rows = [{"id": "v1", "path": "a.mp4"}, {k: v for k, v in question().items() if k != "type"}]
    m = read_manifest(write_rows(tmp_path / "m.jsonl", rows))
    assert (len(m.videos), len(m.questions), m.issues) == (1, 1, [])


@pytest.mark.parametrize(
    "bad_row, field, words",
    [
        (question(video_id="nope"), "video_id", "unknown video 'nope'"),
        (question(answer=4), "answer", "index 4 out of range for 4 options"),
        (question(answer=-1), "answer", "out of range"),
        (question(answer="blue"), "answer", "integer index"),
        (question(options=["only one"], answer=0), "options", "at least 2 options"),
        (question(evidence=[[1.0, 30.0]]), "evidence", "outside [0, 20]"),
        (question(evidence=[[-1.0, 2.0]]), "evidence", "outside"),
        (question(evidence=[[5.0, 2.0]]), "evidence", "outside"),
        (question(qid="a/b"), "qid", "'/'"),
        (question(qid="bad\x00"), "qid", "control"),
        (question(question=""), "question", "non-empty"),
        (video("v2", path=None), "path", "missing"),
        (video("x.y"), "id", "'.'"),
        (video("..", ), "id", "'..'"),
        (video("v2", duration=-3), "duration", "positive"),
        ({"type": "clip", "id": "v3"}, "type", "'video' or 'question'"),
        ({"hello": 1}, "type", "cannot tell"),
        ("{not json", "row", "not valid JSON"),
        ("[1, 2]", "row", "JSON object"),
    ],
)
def test_each_bad_row_is_one_line_naming_file_line_and_field(tmp_path, bad_row, field, words):
    rows = [video("v1", duration=20.0), question("good1"), bad_row, question("good2")]
    path = write_rows(tmp_path / "m.jsonl", rows)
    m = read_manifest(path)
    assert len(m.issues) == 1, m.issues
    text = str(m.issues[0])
    assert text.startswith(f"{path}:3: {field}: "), text
    assert words in text and "\n" not in text
    # the rest of the manifest still loads
    assert [q.qid for q in m.questions] == ["good1", "good2"]
    assert [v.id for v in m.videos] == ["v1"]


def test_duplicate_ids_keep_the_first_and_name_the_second(tmp_path):
    rows = [video("v1"), video("v1"), question("q1"), question("q1", answer=0)]
    path = write_rows(tmp_path / "m.jsonl", rows)
    m = read_manifest(path)
    assert [str(i) for i in m.issues] == [
        f"{path}:2: id: duplicate video id 'v1'",
        f"{path}:4: qid: duplicate question id 'q1'",
    ]
    assert len(m.videos) == 1 and m.questions[0].answer == 2


def test_questions_may_precede_their_video(tmp_path):
    m = read_manifest(write_rows(tmp_path / "m.jsonl", [question(), video()]))
    assert m.issues == [] and m.questions[0].video_id == "v1"


def test_missing_or_binary_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="manifest not found"):
        read_manifest(tmp_path / "none.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        read_manifest(tmp_path / "bin.jsonl")


def test_merge_reports_ids_repeated_across_inputs():
    a = Manifest(videos=[Video("v1", "/a.mp4")])
    b = Manifest(videos=[Video("v1", "/b.mp4"), Video("v2", "/c.mp4")])
    m = merge([a, b])
    assert [v.path for v in m.videos] == ["/a.mp4", "/c.mp4"]
    assert [str(i) for i in m.issues] == ["/b.mp4: id: duplicate video id 'v1' across inputs"]


# Caps documented in stores/manifest.py: 4096 characters per question, 1024 per option,
# 10 options (letters A–J), 1 Mi characters per JSONL line.
def test_text_and_options_over_the_caps_are_one_issue_each_and_the_rest_loads(tmp_path):
    letters = [f"option {c}" for c in "ABCDEFGHIJK"]
    path = write_rows(tmp_path / "m.jsonl", [
        video(),
        question("at_cap", question="q" * 4096, options=["a", "o" * 1024], answer=0),
        question("long_question", question="q" * 4097),
        question("long_option", options=["a", "o" * 1025, "c"]),
        question("ten", options=letters[:10], answer=9),
        question("eleven", options=letters, answer=0),
    ])
    m = read_manifest(path)
    assert [q.qid for q in m.questions] == ["at_cap", "ten"]
    assert [str(i) for i in m.issues] == [
        f"{path}:3: question: 4097 characters, over the cap of 4096",
        f"{path}:4: options: option 1 has 1025 characters, over the cap of 1024",
        f"{path}:6: options: at most 10 options, got 11",
    ]


def test_a_line_over_the_cap_is_one_issue_and_is_not_held_in_memory(tmp_path):
    import tracemalloc

    cap = 1 << 20
    at_cap = json.dumps(video("v2", note=""))
    at_cap = at_cap.replace('"note": ""', '"note": "' + "n" * (cap - len(at_cap)) + '"')
    assert len(at_cap) == cap
    huge = json.dumps(question("huge", question="q" * (16 * cap)))
    path = write_rows(tmp_path / "m.jsonl", [video(), huge, question("after"), at_cap])
    tracemalloc.start()
    try:
        m = read_manifest(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [str(i) for i in m.issues] == [
        f"{path}:2: row: line longer than the cap of {cap} characters"]
    assert [q.qid for q in m.questions] == ["after"] and [v.id for v in m.videos] == ["v1", "v2"]
    assert len(m.videos[1].meta["note"]) > cap - 100
    assert peak < 8 * cap, peak  # the 16 Mi-character line was never held whole
