"""The command line as a user meets it: help, import, validate, exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import EXIT_FAILURES, EXIT_OK, build_parser, main
from stores.manifest import read_manifest

REFOCUS = str(Path(sys.executable).parent / "refocus")


def test_console_command_is_installed_and_helps():
    result = subprocess.run([REFOCUS, "--help"], capture_output=True, text=True, check=True)
    for command in ("ingest", "import", "validate", "embed", "search"):
        assert command in result.stdout
    assert "exit status" in result.stdout


@pytest.mark.parametrize("command", ["ingest", "import", "validate", "embed", "search"])
def test_every_command_has_help_with_a_description(command, capsys):
    with pytest.raises(SystemExit) as caught:
        main([command, "--help"])
    assert caught.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: refocus {command}" in text and len(text.splitlines()) > 5
    assert "(default: None)" not in text and "(default: False)" not in text


def test_unknown_options_fail_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), "--fsp", "2"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --fsp" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--fps", "inf", "not a finite number: 'inf'"),
        ("--fps", "-1", "must be at least 0.0"),
        ("--max-frames", "2.5", "not an integer: '2.5'"),
        ("--workers", "0", "must be at least 1"),
        ("--jpeg-quality", "0", "must be in 1..100"),
    ],
)
def test_bad_option_values_are_named(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as caught:
        main(["ingest", str(tmp_path), "--out", str(tmp_path / "o"), option, value])
    assert caught.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_import_nextgqa_writes_a_manifest_that_validates(tmp_path, shared_data, capsys):
    ann = shared_data / "annotations"
    out = tmp_path / "gqa.jsonl"
    code = main(["import", "nextgqa", str(ann / "nextgqa_val.csv"),
                 str(ann / "nextgqa_gsub_val.json"), "-o", str(out)])
    assert code == EXIT_OK
    assert "3358 questions, 0 rows left out" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert len(manifest.questions) == 3358 and all(q.evidence for q in manifest.questions)
    assert main(["validate", str(out)]) == EXIT_OK


def test_validate_lists_every_problem_and_exits_1(tmp_path, capsys):
    path = tmp_path / "m.jsonl"
    rows = [
        {"id": "v1", "path": "v1.mp4", "duration": 10},
        {"qid": "q1", "video_id": "v1", "question": "?", "options": ["a", "b"], "answer": 2},
        {"qid": "q2", "video_id": "v9", "question": "?", "options": ["a", "b"], "answer": 0},
        {"qid": "q3", "video_id": "v1", "question": "?", "options": ["a", "b"], "answer": 0,
         "evidence": [[8, 12]]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["validate", str(path)]) == EXIT_FAILURES
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{path}: 1 videos, 0 questions, 3 problems"
    assert lines[1:] == [
        f"  {path}:2: answer: index 2 out of range for 2 options",
        f"  {path}:3: video_id: unknown video 'v9' (no video row with this id)",
        f"  {path}:4: evidence: span [8, 12] outside [0, 10] s of video 'v1'",
    ]


def test_parser_builds_without_importing_heavy_libraries():
    code = ("import sys, flows.cli; flows.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'prefect', 'open_clip', 'transformers') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert build_parser().prog == "refocus"
