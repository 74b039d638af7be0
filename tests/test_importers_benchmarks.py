"""Video-MME, LongVideoBench and MLVU annotations → manifests: values, bad rows, the CLI."""

import json
from pathlib import Path

import pytest
from conftest import make_video

from flows.cli import EXIT_FAILURES, main
from stores.errors import UserError
from stores.importers import import_longvideobench, import_mlvu, import_videomme
from stores.manifest import Manifest, read_manifest


def write_json(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def same_as_written(manifest: Manifest, out: Path) -> None:
    """The manifest the CLI wrote loads back with the same videos and questions."""
    loaded = read_manifest(out)
    assert loaded.issues == []
    assert loaded.questions == manifest.questions
    assert [q.meta for q in loaded.questions] == [q.meta for q in manifest.questions]
    assert [(v.id, Path(v.path).resolve(), v.duration, v.split, v.meta) for v in loaded.videos] \
        == [(v.id, Path(v.path).resolve(), v.duration, v.split, v.meta) for v in manifest.videos]


# --- Video-MME ---------------------------------------------------------------------------

def videomme_row(n: int, video: str, qid: str, answer: str, **extra) -> dict:
    row = {
        "video_id": f"{n:03d}", "duration": "short", "domain": "Knowledge",
        "sub_category": "Humanity & History", "url": f"https://www.youtube.com/watch?v={video}",
        "videoID": video, "question_id": qid, "task_type": "Counting Problem",
        "question": f"How many people are in clip {qid}?",
        "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."], "answer": answer,
    }
    row.update(extra)
    return row


VIDEOMME_ROWS = [
    videomme_row(1, "fFjv93ACGo8", "001-1", "C"),
    videomme_row(1, "fFjv93ACGo8", "001-2", "A", task_type="Object Recognition",
                 options=["A. A red car.", "B. B-movie poster.", "C) A dog.", "D. A cat."]),
    videomme_row(1, "fFjv93ACGo8", "001-3", "E"),  # no option E
    {k: v for k, v in videomme_row(2, "-x9Pq_Z", "002-1", "B").items() if k != "question"},
    videomme_row(3, "-x9Pq_Z", "003-1", "D", duration="long", domain="Sports"),
    ["not", "a", "row"],
    videomme_row(4, "abc", "004-1", "B", options="A. yes"),
    videomme_row(5, "abc", "005-1", "maybe"),
]


@pytest.fixture
def videomme_files(tmp_path):
    data = tmp_path / "data"
    (data / "chunk1").mkdir(parents=True)
    make_video(data / "chunk1" / "fFjv93ACGo8.mp4", frames=10)
    return data, write_json(tmp_path / "videomme" / "test.json", VIDEOMME_ROWS)


def test_videomme_rows_become_questions_and_bad_rows_issues(videomme_files):
    data, path = videomme_files
    m = import_videomme(path, data)
    assert [q.qid for q in m.questions] == ["001-1", "001-2", "003-1"]
    q1, q2, q3 = m.questions
    assert q1.options == ("One.", "Two.", "Three.", "Four.")
    assert (q1.answer, q1.category, q1.video_id, q1.split) == (2, "Counting Problem",
                                                               "fFjv93ACGo8", "test")
    assert q1.question == "How many people are in clip 001-1?"
    # prefixes "A. " and "C) " go; "B-movie" is text, not a prefix
    assert q2.options == ("A red car.", "B-movie poster.", "A dog.", "A cat.")
    assert (q2.answer, q2.category) == (0, "Object Recognition")
    assert (q3.answer, q3.video_id) == (3, "-x9Pq_Z")
    assert [str(i) for i in m.issues] == [
        f"{path}:2: answer: 'E' is not one of the option letters A-D",
        f"{path}:3: question: empty or missing",
        f"{path}:5: row: must be a JSON object, got list",
        f"{path}:6: options: must be a list of strings",
        f"{path}:7: answer: expected an option letter A-D, got 'maybe'",
    ]
    found, missing = m.videos
    assert found.path == str(data / "chunk1" / "fFjv93ACGo8.mp4")  # searched by stem
    assert found.meta == {
        "duration_category": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
        "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videomme_id": "001",
    }
    assert found.duration is None and found.split == "test"
    # the first valid row of a video gives its meta (row 3 lacks its question: left out)
    assert missing.id == "-x9Pq_Z" and missing.meta["videomme_id"] == "003"
    assert missing.meta["duration_category"] == "long"
    assert missing.path == str(data / "-x9Pq_Z.mp4") and not Path(missing.path).exists()


def test_videomme_options_without_their_letters_are_kept_whole(tmp_path):
    rows = [videomme_row(1, "v1", "001-1", "B", options=["A.M. shift", "Noon", "P.M. shift"]),
            videomme_row(1, "v1", "001-2", "A", options=["A. yes", "C. no"])]
    m = import_videomme(write_json(tmp_path / "videomme.json", rows))
    assert [q.options for q in m.questions] == [("A.M. shift", "Noon", "P.M. shift"),
                                                ("A. yes", "C. no")]
    assert [q.answer for q in m.questions] == [1, 0]
    assert m.videos[0].path == str(tmp_path / "videos" / "v1.mp4")


def test_videomme_jsonl_names_lines(tmp_path, videomme_files):
    data, _ = videomme_files
    path = write_jsonl(tmp_path / "videomme.jsonl", VIDEOMME_ROWS[:4])
    m = import_videomme(path, data, split="eval")
    assert [q.qid for q in m.questions] == ["001-1", "001-2"]
    assert {q.split for q in m.questions} == {v.split for v in m.videos} == {"eval"}
    assert [str(i) for i in m.issues] == [
        f"{path}:3: answer: 'E' is not one of the option letters A-D",
        f"{path}:4: question: empty or missing",
    ]


def test_videomme_parquet(tmp_path, videomme_files):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, _ = videomme_files
    rows = [VIDEOMME_ROWS[0], VIDEOMME_ROWS[2], VIDEOMME_ROWS[4]]
    path = tmp_path / "videomme" / "test-00000-of-00001.parquet"
    path.parent.mkdir(exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    m = import_videomme(path, data)
    assert [(q.qid, q.answer, q.options[q.answer]) for q in m.questions] == [
        ("001-1", 2, "Three."), ("003-1", 3, "Four.")]
    assert [str(i) for i in m.issues] == [
        f"{path}:1: answer: 'E' is not one of the option letters A-D"]
    assert [v.split for v in m.videos] == ["test", "test"]


def test_videomme_refuses_another_format(tmp_path):
    path = write_json(tmp_path / "lvb_val.json", [{"video_id": "x", "question": "?"}])
    with pytest.raises(UserError, match=r"not in the Video-MME format \(no row has: videoID, "
                                        r"question_id, options, answer\)"):
        import_videomme(path)
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match="expected .json, .jsonl or .parquet"):
        import_videomme(tmp_path / "a.csv")
    with pytest.raises(UserError, match="annotation file not found"):
        import_videomme(tmp_path / "nothing.json")


def test_cli_import_videomme(tmp_path, videomme_files, capsys):
    data, path = videomme_files
    out = tmp_path / "out" / "videomme.jsonl"
    code = main(["import", "videomme", str(path), "--videos", str(data), "-o", str(out)])
    assert code == EXIT_FAILURES  # some rows were left out
    printed = capsys.readouterr().out
    assert "2 videos, 3 questions, 5 rows left out" in printed
    assert f"{path}:2: answer" in printed
    same_as_written(import_videomme(path, data), out)


# --- LongVideoBench ----------------------------------------------------------------------

def lvb_row(vid: str, index: int, candidates: list, choice, **extra) -> dict:
    row = {
        "video_id": vid, "question": f"What happens after event {index}?",
        "question_wo_referring_query": "What happens?", "candidates": candidates,
        "correct_choice": choice, "position": [120, 345], "topic_category": "NP-News-Programs",
        "question_category": "S2E", "level": "L2-Relation", "id": f"{vid}_{index}",
        "video_path": f"{vid}.mp4", "subtitle_path": f"{vid}_en.json", "duration": 12.5,
        "starting_timestamp_for_subtitles": 0, "view_count": 1234,
    }
    row.update(extra)
    return row


FIVE = ["a man waves", "a dog barks", "it rains", "a car stops", "nothing"]
FOUR = ["red", "green", "blue", "yellow"]
LVB_ROWS = [
    lvb_row("86CxyhFV9MI", 0, FIVE, 2),
    lvb_row("7F9IrtSHmc0", 0, FOUR, 0, duration=30, question_category="T3O", level="L1"),
    lvb_row("86CxyhFV9MI", 1, FOUR, 4),  # only 4 candidates
    {k: v for k, v in lvb_row("86CxyhFV9MI", 2, FOUR, 1).items() if k != "candidates"},
    lvb_row("86CxyhFV9MI", 3, FOUR, "1"),
    lvb_row("zzMissing_1", 0, FOUR, 3, duration=-3),
    lvb_row("86CxyhFV9MI", 4, FOUR, 3),
    lvb_row("no-file", 0, FOUR, 1, duration=None),
]


@pytest.fixture
def lvb_files(tmp_path):
    root = tmp_path / "LongVideoBench"
    (root / "videos" / "more").mkdir(parents=True)
    make_video(root / "videos" / "86CxyhFV9MI.mp4", frames=8)
    make_video(root / "videos" / "more" / "7F9IrtSHmc0.mp4", frames=8)  # found by stem
    return root / "videos", write_json(root / "lvb_val.json", LVB_ROWS)


def test_longvideobench_rows_become_questions_and_bad_rows_issues(lvb_files):
    videos, path = lvb_files
    m = import_longvideobench(path)  # videos/ beside the annotation file by default
    assert [q.qid for q in m.questions] == [
        "86CxyhFV9MI_0", "7F9IrtSHmc0_0", "86CxyhFV9MI_4", "no-file_0"]
    q0, q1, q4, qn = m.questions
    assert (q0.options, q0.answer, q0.category, q0.split) == (tuple(FIVE), 2, "S2E", "val")
    assert q0.options[q0.answer] == "it rains"
    assert (q1.options, q1.answer, q1.category) == (tuple(FOUR), 0, "T3O")
    assert (q4.answer, qn.answer) == (3, 1)
    assert q0.meta == {"level": "L2-Relation", "position": [120, 345],
                       "question_wo_referring_query": "What happens?"}
    assert [str(i) for i in m.issues] == [
        f"{path}:2: correct_choice: index 4 out of range for 4 candidates",
        f"{path}:3: candidates: empty or missing",
        f"{path}:4: correct_choice: must be an integer index, got '1'",
        f"{path}:5: duration: must be positive, got -3",
    ]
    by_id = {v.id: v for v in m.videos}
    assert list(by_id) == ["86CxyhFV9MI", "7F9IrtSHmc0", "no-file"]
    assert by_id["86CxyhFV9MI"].path == str(videos / "86CxyhFV9MI.mp4")
    assert by_id["7F9IrtSHmc0"].path == str(videos / "more" / "7F9IrtSHmc0.mp4")
    assert by_id["no-file"].path == str(videos / "no-file.mp4")
    assert not Path(by_id["no-file"].path).exists()
    assert [v.duration for v in by_id.values()] == [12.5, 30.0, None]
    assert by_id["86CxyhFV9MI"].meta == {
        "topic_category": "NP-News-Programs", "view_count": 1234,
        "subtitle_path": "86CxyhFV9MI_en.json", "starting_timestamp_for_subtitles": 0,
    }


def test_longvideobench_test_file_without_answers_is_refused(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "correct_choice"} for r in LVB_ROWS[:2]]
    path = write_json(tmp_path / "lvb_test_wo_gt.json", rows)
    with pytest.raises(UserError, match="no row has 'correct_choice'"):
        import_longvideobench(path)
    (tmp_path / "broken.json").write_text('[{"video_id": ')
    with pytest.raises(UserError, match=r"broken.json: not valid JSON"):
        import_longvideobench(tmp_path / "broken.json")
    write_json(tmp_path / "obj.json", {"video_id": "x"})
    with pytest.raises(UserError, match="expected a JSON list of rows, got a JSON dict"):
        import_longvideobench(tmp_path / "obj.json")


def test_cli_import_longvideobench(tmp_path, lvb_files, capsys):
    videos, path = lvb_files
    out = tmp_path / "lvb.jsonl"
    code = main(["import", "longvideobench", str(path), "--videos", str(videos),
                 "-o", str(out)])
    assert code == EXIT_FAILURES
    assert "3 videos, 4 questions, 4 rows left out" in capsys.readouterr().out
    same_as_written(import_longvideobench(path, videos), out)


# --- MLVU --------------------------------------------------------------------------------

def mlvu_row(video: str, qtype: str, answer: str, candidates: list, **extra) -> dict:
    row = {"video": video, "duration": 498.1, "question": f"What is shown in {video}?",
           "candidates": candidates, "answer": answer, "question_type": qtype}
    row.update(extra)
    return row


PLOT = ["A boy runs", "A girl sings", "A dog sleeps", "A man cooks"]


@pytest.fixture
def mlvu_files(tmp_path):
    root = tmp_path / "MLVU"
    for task, name in [("1_plotQA", "movie101_66.mp4"), ("2_needle", "needle.v2_32.mp4")]:
        (root / "video" / task).mkdir(parents=True)
        make_video(root / "video" / task / name, frames=6)
    plot = write_json(root / "json" / "1_plotQA.json", [
        mlvu_row("movie101_66.mp4", "plotQA", "A dog sleeps", PLOT),
        mlvu_row("movie101_66.mp4", "plotQA", " A boy runs ", PLOT, duration=1.0),
        mlvu_row("movie101_66.mp4", "plotQA", "A cat flies", PLOT),
        {k: v for k, v in mlvu_row("x.mp4", "plotQA", "A boy runs", PLOT).items()
         if k != "video"},
        mlvu_row("movie101_66.mp4", "plotQA", "same", ["same", "same", "other"]),
        mlvu_row("movie9.mp4", "plotQA", "A man cooks", PLOT, duration="long"),
    ])
    needle = write_json(root / "json" / "2_needle.json", [
        mlvu_row("needle.v2_32.mp4", "findNeedle", "3", ["1", "2", "3", "4"], duration=180),
        mlvu_row("lost_video.mp4", "findNeedle", "2", ["1", "2", "3", "4"], duration=60),
    ])
    summary = write_json(root / "json" / "9_summary.json", [
        {"video": "surveil_1.mp4", "duration": 600, "question": "Summarise the video.",
         "answer": "People walk by.", "question_type": "summary", "scoring_points": ["walk"]},
    ])
    return root / "video", [plot, needle, summary]


def test_mlvu_rows_become_questions_with_made_ids(mlvu_files):
    videos, (plot, needle, summary) = mlvu_files
    m = import_mlvu([plot, needle, summary], videos)
    assert [q.qid for q in m.questions] == [
        "movie101_66_plotQA_0", "movie101_66_plotQA_1", "needle_v2_32_findNeedle_0",
        "lost_video_findNeedle_1"]
    q0, q1, qn, ql = m.questions
    assert (q0.options, q0.answer, q0.category, q0.split) == (tuple(PLOT), 2, "plotQA", "dev")
    assert q1.answer == 0  # the answer text matches once whitespace is trimmed
    assert (qn.options[qn.answer], qn.category, qn.video_id) == ("3", "findNeedle",
                                                                 "needle_v2_32")
    assert [str(i) for i in m.issues] == [
        f"{plot}:2: answer: 'A cat flies' matches none of the candidates",
        f"{plot}:3: video: empty or missing",
        f"{plot}:4: answer: 'same' matches 2 of the candidates",
        f"{plot}:5: duration: must be a number of seconds, got 'long'",
        f"{summary}: candidates: no row has candidates: an open-ended task, not multiple "
        "choice; file left out",
    ]
    by_id = {v.id: v for v in m.videos}
    assert list(by_id) == ["movie101_66", "needle_v2_32", "lost_video"]
    assert by_id["movie101_66"].path == str(videos / "1_plotQA" / "movie101_66.mp4")
    assert by_id["needle_v2_32"].path == str(videos / "2_needle" / "needle.v2_32.mp4")
    assert by_id["lost_video"].path == str(videos / "lost_video.mp4")
    assert [v.duration for v in by_id.values()] == [498.1, 180.0, 60.0]  # first row's
    assert read_back_ids_are_valid(m)


def read_back_ids_are_valid(m: Manifest) -> bool:
    from stores.ids import id_problem

    return all(id_problem(q.qid) is None for q in m.questions) and all(
        id_problem(v.id, allow_dot=False) is None for v in m.videos)


def test_mlvu_single_file_and_split(mlvu_files):
    videos, (plot, _, _) = mlvu_files
    m = import_mlvu(plot, videos, split="val")
    assert [q.qid for q in m.questions] == ["movie101_66_plotQA_0", "movie101_66_plotQA_1"]
    assert {q.split for q in m.questions} == {"val"}
    with pytest.raises(UserError,
                       match=r"not in the MLVU format \(no row has: video, question_type\)"):
        import_mlvu([write_json(plot.parent / "x.json", [{"question": "?", "answer": "a"}])])


def test_cli_import_mlvu(tmp_path, mlvu_files, capsys):
    videos, files = mlvu_files
    out = tmp_path / "mlvu.jsonl"
    code = main(["import", "mlvu", *map(str, files), "--videos", str(videos), "-o", str(out)])
    assert code == EXIT_FAILURES
    assert "3 videos, 4 questions, 5 rows left out" in capsys.readouterr().out
    same_as_written(import_mlvu(files, videos), out)


# --- annotation paths, sanitised collisions, relative --videos (all three importers) -------

def importer_files(kind: str, folder: Path, names: list[str]) -> Path:
    """A one-question-per-video annotation file of ``kind`` naming the videos ``names``."""
    if kind == "videomme":
        rows = [videomme_row(i, name, f"{i:03d}-1", "A") for i, name in enumerate(names)]
        return write_json(folder / "videomme.json", rows)
    if kind == "longvideobench":
        rows = [lvb_row(name, i, FOUR, 1) for i, name in enumerate(names)]
        return write_json(folder / "lvb_val.json", rows)
    rows = [mlvu_row(name, "plotQA", "A boy runs", PLOT) for name in names]
    return write_json(folder / "1_plotQA.json", rows)


IMPORTERS = {"videomme": import_videomme, "longvideobench": import_longvideobench,
             "mlvu": import_mlvu}
# what each importer reads a video's path from, and how a name is written there (lvb_row
# and the Video-MME importer add ".mp4" themselves)
PATH_FIELD = {"videomme": ("videoID", "{}"), "longvideobench": ("video_path", "{}"),
              "mlvu": ("video", "{}.mp4")}


@pytest.mark.parametrize("kind", list(IMPORTERS))
def test_annotation_paths_that_leave_the_videos_folder_are_one_issue_each(tmp_path, kind):
    field, pattern = PATH_FIELD[kind]
    outside = tmp_path / "secret"
    outside.write_bytes(b"not a video")
    hostile = [f"{outside}", "../secret", "sub/../../secret", "ok"]
    path = importer_files(kind, tmp_path / "ann", [pattern.format(h) for h in hostile])
    if kind == "longvideobench":  # video_id and video_path are separate fields there
        rows = json.loads(path.read_text())
        for i, row in enumerate(rows):
            row["video_id"] = f"v{i}"
        write_json(path, rows)
    (tmp_path / "videos").mkdir()
    m = IMPORTERS[kind](path, tmp_path / "videos")
    assert [(i.where, i.field) for i in m.issues] == [
        (f"{path}:0", field), (f"{path}:1", field), (f"{path}:2", field)]
    assert "absolute path" in m.issues[0].message
    assert all("leaves the videos folder" in i.message for i in m.issues[1:])
    assert len(m.videos) == 1 and len(m.questions) == 1
    assert Path(m.videos[0].path).parent == tmp_path / "videos"


COLLIDING = {"videomme": ("clip.v2", "clip_v2"), "longvideobench": ("clip.v2", "clip_v2"),
             "mlvu": ("clip.v2.mp4", "clip_v2.mp4")}


@pytest.mark.parametrize("kind", list(IMPORTERS))
def test_video_ids_that_sanitise_alike_are_refused_naming_both(tmp_path, kind):
    first, second = COLLIDING[kind]
    path = importer_files(kind, tmp_path, [first, second, first])
    m = IMPORTERS[kind](path, tmp_path / "videos")
    field = {"videomme": "videoID", "longvideobench": "video_id", "mlvu": "video"}[kind]
    [issue] = m.issues
    a, b = (name.removesuffix(".mp4") for name in (first, second))
    assert str(issue) == (f"{path}:1: {field}: '{a}' and '{b}' both become video id "
                          "'clip_v2'; rename one of them")
    assert [v.id for v in m.videos] == ["clip_v2"]
    assert m.videos[0].meta["original_id"] == a  # the dataset's own id is kept
    assert [q.video_id for q in m.questions] == ["clip_v2", "clip_v2"]  # rows 0 and 2


@pytest.mark.parametrize("kind", list(IMPORTERS))
def test_cli_import_resolves_videos_against_the_current_folder(tmp_path, monkeypatch, kind):
    field, pattern = PATH_FIELD[kind]
    (tmp_path / "data" / "videos").mkdir(parents=True)
    (tmp_path / "data" / "videos" / "clip1.mp4").write_bytes(b"")
    path = importer_files(kind, tmp_path / "ann", [pattern.format("clip1")])
    monkeypatch.chdir(tmp_path)
    code = main(["import", kind, str(path.relative_to(tmp_path)), "--videos", "data/videos",
                 "-o", "manifests/out.jsonl"])
    assert code == 0
    [video] = read_manifest(tmp_path / "manifests" / "out.jsonl").videos
    assert video.path == str(tmp_path / "data" / "videos" / "clip1.mp4")
