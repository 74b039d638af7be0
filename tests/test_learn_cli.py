"""The learning commands end to end on a small synthetic corpus."""

import csv

import pytest
from PIL import Image

from flows.cli import EXIT_OK, EXIT_USAGE, main


@pytest.mark.slow
def test_train_reader_train_and_eval_from_the_command_line(synth_store, tmp_path, capsys):
    store = str(synth_store / "features")
    reader, run, report = tmp_path / "reader", tmp_path / "run", tmp_path / "eval"
    assert main(["train-reader", "--store", store, "--out", str(reader), "--steps", "150"]) \
        == EXIT_OK
    out = capsys.readouterr().out
    assert "val accuracy over" in out and "evidence" in out and "random_4" in out
    assert main(["train", "--store", store, "--reward", f"reader:{reader}", "--out", str(run),
                 "--steps", "4", "--questions-per-step", "4", "--group", "3", "--budgets",
                 "2,3", "--eval-every", "2", "--hidden", "32"]) == EXIT_OK
    assert "best validation at step" in capsys.readouterr().out
    assert main(["eval", "--store", store, "--reward", f"reader:{reader}", "--policy", str(run),
                 "--k", "2,4", "--out", str(report)]) == EXIT_OK
    printed = capsys.readouterr().out
    for method in ("uniform", "random", "clip-top-k", "bolt", "aks", "refocus"):
        assert f"| {method} |" in printed
    with open(report / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["method"], r["k"]) for r in rows if r["category"] == "all"} == {
        (m, k) for m in ("uniform", "random", "clip-top-k", "bolt", "aks", "refocus")
        for k in ("2", "4")}
    assert {r["category"] for r in rows} >= {"all", "colour", "first", "after"}
    assert "### colour" in (report / "eval.md").read_text()
    assert Image.open(report / "eval.png").format == "PNG"
    assert Image.open(run / "training.png").size[0] > 1000


def test_learning_commands_explain_bad_input(synth_store, tmp_path, capsys):
    store = str(synth_store / "features")
    assert main(["eval", "--store", store, "--reward", "reader:/nowhere"]) == EXIT_USAGE
    assert "not a refocus model folder" in capsys.readouterr().err
    assert main(["eval", "--store", store, "--reward", "reader:/nowhere", "--split",
                 "holdout"]) == EXIT_USAGE
    assert "no questions in split 'holdout'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train-reader", "--store", str(tmp_path / "empty"), "--out",
                 str(tmp_path / "r")]) == EXIT_USAGE
    assert "no feature store here" in capsys.readouterr().err
