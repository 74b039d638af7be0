"""Owned output folders: refocus writes only into folders it made, deletes only what it made.

First ``stores/owned.py`` itself (claim, made-name removal, the folder lock against a real
second process), then every writing command at the command line: a non-empty folder of the
user's, a folder of another kind of refocus output, and an output that is one of the inputs
are refused with exit 2 and one line, before any work, and every byte of the user's files is
still there afterwards."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from conftest import held_by_another_process

from flows import orchestrate
from flows.cli import main
from flows.options import EXIT_OK, EXIT_USAGE
from stores.errors import UserError
from stores.owned import MARKER, check_output_file, claim, output_kind

# ----------------------------------------------------------------------------- helpers


def tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path → sha256) and every folder (→ "dir")."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def users_folder(path: Path) -> Path:
    """A folder of the user's own, with names refocus also writes."""
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work\n")
    (path / "notes.tmp").write_text("draft\n")
    (path / "manifest.jsonl").write_text('{"mine": true}\n')
    (path / "summary.json").write_text('{"mine": true}\n')
    (path / "shard-000000.tar").write_bytes(b"my own tar")
    (path / "policy").mkdir()
    (path / "policy" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    return path


def other_kind(path: Path, kind: str = "synth") -> Path:
    """A folder refocus made for another kind of output, with a file in it."""
    claim(path, kind)
    (path / "videos.jsonl").write_text("{}\n")
    return path


def refused(capsys: pytest.CaptureFixture, argv: list, folder: Path) -> str:
    """Run the command; assert exit 2, one line on stderr, and ``folder`` byte-identical."""
    before = tree(folder)
    capsys.readouterr()
    assert main([str(a) for a in argv]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    assert tree(folder) == before
    return err


# ----------------------------------------------------------------------------- stores/owned.py


def test_claim_creates_marks_and_reuses(tmp_path):
    new = claim(tmp_path / "a" / "b", "ingest")
    assert output_kind(new.path) == "ingest"
    assert json.loads((new.path / MARKER).read_text())["kind"] == "ingest"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim(empty, "features").path == empty.resolve()
    assert output_kind(empty) == "features"
    (empty / "progress").mkdir()  # made by an earlier run
    before = tree(empty)
    assert claim(empty, "features").path == empty.resolve()
    assert tree(empty) == before


@pytest.mark.parametrize("case", ["foreign", "other-kind", "file", "damaged-marker"])
def test_claim_refuses_and_touches_nothing(tmp_path, case):
    if case == "foreign":
        out = users_folder(tmp_path / "out")
    elif case == "other-kind":
        out = other_kind(tmp_path / "out")
    elif case == "file":
        out = tmp_path / "out"
        out.write_text("a file")
    else:
        out = tmp_path / "out"
        out.mkdir()
        (out / MARKER).write_text("{not json")
    before = tree(tmp_path)
    with pytest.raises(UserError) as error:
        claim(out, "ingest")
    assert "\n" not in str(error.value) and str(out) in str(error.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("where", ["same", "inside", "holds"])
def test_claim_refuses_an_output_related_to_an_input(tmp_path, where):
    data = tmp_path / "data"
    data.mkdir()
    video = data / "clip.mp4"
    video.write_bytes(b"video")
    out, inputs = {"same": (data, [data]), "inside": (data / "out", [data]),
                   "holds": (tmp_path, [video])}[where]
    before = tree(tmp_path)
    with pytest.raises(UserError, match="input"):
        claim(out, "ingest", inputs=inputs)
    assert tree(tmp_path) == before


def test_remove_deletes_only_made_names(tmp_path):
    owned = claim(tmp_path / "out", "run")
    for name in ("policy", "checkpoint"):
        (owned.path / name).mkdir()
        (owned.path / name / "x").write_text("x")
    (owned.path / "a.tmp").write_text("x")
    (owned.path / "keep.txt").write_text("mine")
    owned.remove("policy", "a.tmp", "missing.old")
    assert sorted(p.name for p in owned.path.iterdir()) == [MARKER, "checkpoint", "keep.txt"]
    for name in ("keep.txt", "../out", "", "checkpoint/x", MARKER):
        with pytest.raises(ValueError):
            owned.remove(name)
    assert (owned.path / "keep.txt").read_text() == "mine"
    assert owned.remove_stale("*.tmp") == []
    deep = owned.path / "store.zarr" / "a" / "c"
    deep.mkdir(parents=True)
    (deep / "0.partial").write_text("x")
    (deep / "0").write_text("chunk")
    assert owned.remove_stale("*.partial", under="store.zarr") == ["store.zarr/a/c/0.partial"]
    assert sorted(p.name for p in deep.iterdir()) == ["0"]
    (deep / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):  # a pattern that reaches a name refocus does not make
        owned.remove_stale("*.txt", under="store.zarr")
    assert (deep / "notes.txt").read_text() == "mine"


def test_the_folder_lock_refuses_a_second_process(tmp_path):
    owned = claim(tmp_path / "out", "ingest")
    with held_by_another_process(owned.path, "ingest"), pytest.raises(
            UserError, match="in use by another process"), owned.lock():
        pass
    with owned.lock():  # released with the process
        pass


def test_check_output_file(tmp_path):
    existing = tmp_path / "m.jsonl"
    existing.write_text("x\n")
    with pytest.raises(UserError, match="--overwrite"):
        check_output_file(existing)
    assert check_output_file(existing, overwrite=True) == existing
    with pytest.raises(UserError, match="inputs"):
        check_output_file(existing, overwrite=True, inputs=[existing])
    with pytest.raises(UserError, match="folder"):
        check_output_file(tmp_path)
    assert existing.read_text() == "x\n"


# ----------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def small_shards(sample_shards) -> Path:
    """A finished ingest folder (the session's: these tests only see refusals, which leave
    every folder as it was)."""
    return sample_shards


@pytest.fixture
def corpus(tmp_path, shared_data) -> Path:
    """A manifest with one video and one question (for score)."""
    path = tmp_path / "inputs" / "corpus.jsonl"
    path.parent.mkdir()
    rows = [{"id": "clip", "path": str(shared_data / "videos" / "realshort.mp4")},
            {"qid": "q1", "video_id": "clip", "question": "What?", "options": ["a", "b"],
             "answer": 0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _argv(command: str, out: Path, small_shards: Path, corpus: Path, shared: Path) -> list:
    video = shared / "videos" / "realshort.mp4"
    return {
        "ingest": ["ingest", video, "--out", out, "--workers", "1"],
        "embed": ["embed", "--shards", small_shards, "--out", out, "--workers", "0"],
        "score": ["score", corpus, "--policy", corpus.parent, "--out", out, "--workers", "1"],
        "synth": ["synth", "--out", out, "--videos", "1", "--workers", "1"],
        "train-encoder": ["train-encoder", "--out", out, "--minutes", "5"],
        "demo": ["demo", "--out", out, "--quick"],
        "precompute-reference": ["precompute-reference", "--model", out.parent / "no-model",
                                 "--shards", small_shards, "--out", out],
    }[command]


COMMANDS = ["ingest", "embed", "score", "synth", "train-encoder", "demo",
            "precompute-reference"]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("folder", ["users", "other-kind"])
def test_a_command_refuses_a_folder_it_does_not_own(command, folder, tmp_path, small_shards,
                                                    corpus, shared_data, capsys):
    if folder == "users":
        out = users_folder(tmp_path / "out")
    else:
        out = other_kind(tmp_path / "out", "ingest" if command == "synth" else "synth")
    err = refused(capsys, _argv(command, out, small_shards, corpus, shared_data), out)
    expected = "not empty and was not made by refocus" if folder == "users" else "holds refocus"
    assert expected in err and str(out) in err


KINDS = {"ingest": "ingest", "embed": "features", "score": "score", "synth": "synth",
         "train-encoder": "encoder", "demo": "demo"}


@pytest.mark.parametrize("command", list(KINDS))
def test_a_command_refuses_its_folder_while_another_run_holds_it(command, tmp_path, small_shards,
                                                                 corpus, shared_data, capsys):
    """A second run on the same folder (here: a real process holding the folder's lock, as a
    first run does) is one line, exit 2, and the folder is unchanged."""
    out = tmp_path / "out"
    with held_by_another_process(out, KINDS[command]):
        err = refused(capsys, _argv(command, out, small_shards, corpus, shared_data), out)
    assert "in use by another process" in err


@pytest.mark.parametrize("command", ["embed", "precompute-reference"])
@pytest.mark.parametrize("where", ["shards", "inside"])
def test_the_shards_are_never_an_output(command, where, small_shards, corpus, shared_data,
                                        capsys):
    out = small_shards if where == "shards" else small_shards / "features"
    err = refused(capsys, _argv(command, out, small_shards, corpus, shared_data), small_shards)
    assert "input" in err


def test_score_refuses_the_policy_and_the_inputs_as_output(corpus, small_shards, shared_data,
                                                           capsys):
    err = refused(capsys, _argv("score", corpus.parent, small_shards, corpus, shared_data),
                  corpus.parent)
    assert "input" in err


def test_ingest_keeps_a_users_files_inside_its_own_folder(tmp_path, shared_data):
    """Inside an ingest folder, a re-run removes only the temporaries ingest writes (a killed
    run's), never other *.tmp files, and a re-run over a user's folder writes nothing."""
    video = shared_data / "videos" / "realshort.mp4"
    out = tmp_path / "shards"
    args = ["ingest", str(video), "--out", str(out), "--fps", "1", "--size", "64",
            "--workers", "1", "--shard-size", "1"]
    assert main(args) == EXIT_OK
    (out / "notes.tmp").write_text("the user's")
    (out / "shard-000005.tar.tmp").write_bytes(b"half a shard of a killed run")
    (out / "summary.json.tmp").write_text("half")
    assert main(args) == EXIT_OK
    assert (out / "notes.tmp").read_text() == "the user's"
    assert not (out / "shard-000005.tar.tmp").exists()
    assert not (out / "summary.json.tmp").exists()


@pytest.mark.parametrize("case", ["exists", "is-input"])
def test_import_refuses_an_existing_file_and_its_input(case, tmp_path, shared_data, capsys):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    csv = annotations / "nextqa_val.csv"
    csv.write_bytes((shared_data / "annotations" / "nextqa_val.csv").read_bytes())
    if case == "exists":
        out = annotations / "manifest.jsonl"
        out.write_text('{"mine": true}\n')
        argv = ["import", "nextqa", csv, "--videos", shared_data / "videos", "-o", out]
    else:
        argv = ["import", "nextqa", csv, "--videos", shared_data / "videos", "-o", csv,
                "--overwrite"]
    err = refused(capsys, argv, annotations)
    assert ("--overwrite" if case == "exists" else "input") in err


def test_import_overwrites_when_asked(tmp_path, shared_data):
    out = tmp_path / "manifest.jsonl"
    out.write_text('{"mine": true}\n')
    argv = ["import", "folder", str(shared_data / "videos"), "-o", str(out), "--overwrite"]
    assert main(argv) in (EXIT_OK, 1)
    assert '"mine"' not in out.read_text() and out.read_text()


@pytest.mark.parametrize("flow", ["preprocess", "ingest", "embed", "score"])
def test_the_flows_claim_their_folders_before_writing_records(flow, tmp_path, small_shards,
                                                              corpus):
    """The flows call the stages' own claims before they write logs/ and flow-runs/ (their
    bodies run here without Prefect's engine: the refusal comes before any task)."""
    out = users_folder(tmp_path / "out")
    before = tree(out)
    call = {
        "preprocess": lambda: orchestrate.preprocess_flow.fn([str(corpus)], str(out)),
        "ingest": lambda: orchestrate.ingest_flow.fn([str(corpus)], str(out)),
        "embed": lambda: orchestrate.embed_flow.fn(str(small_shards), str(out)),
        "score": lambda: orchestrate.score_flow.fn([str(corpus)], str(corpus.parent),
                                                   str(out)),
    }[flow]
    with pytest.raises(UserError, match="not empty and was not made by refocus"):
        call()
    assert tree(out) == before
