"""refocus train-reader --distill: a reader learns a tiny LMM's stored outputs, and its margin
error against held-out LMM margins falls; the generic reader architecture."""

from __future__ import annotations

import json

import pytest
import torch
from test_margins import small_qa

from flows.cli import main
from flows.options import EXIT_OK, EXIT_USAGE
from pipelines.learn import load_corpus, load_reader, reader_reference_id
from pipelines.margins import scored
from refocus.reader import GenericReader, Reader, accuracy, margins, read
from stores.margins import MarginStore


def held_out_error(reader, corpus, data) -> float:  # noqa: ANN001
    """Mean |reader margin − LMM margin| over the val questions' stored subsets."""
    val = [i for i, q in enumerate(data.questions.tolist()) if corpus.split[q] == "val"]
    rows = torch.tensor(val)
    q = data.questions[rows]
    with torch.no_grad():
        logits = read(reader, corpus, q, data.picks[rows], data.valid[rows])
    return float((margins(logits, corpus.answer[q]) - data.margin[rows]).abs().mean())


@pytest.mark.slow
def test_distillation_lowers_the_margin_error_on_held_out_lmm_margins(
        tiny_lmms, synth_store, tmp_path, capsys):
    qa = small_qa(synth_store, tmp_path, 12, 4)
    out = tmp_path / "reader"
    store = str(synth_store / "features")
    model = f"lmm:{tiny_lmms['llava']}"
    assert main(["train-reader", "--store", store, "--qa", str(qa), "--out", str(out),
                 "--distill", model, "--architecture", "generic", "--steps", "80",
                 "--batch-size", "32", "--subsets-per-question", "4", "--subset-sizes", "2,3",
                 "--device", "cpu"]) == EXIT_OK
    assert "margin error" in capsys.readouterr().out
    meta = json.loads((out / "config.json").read_text())
    margin_store = MarginStore(out / "margins")  # computed first, into OUT/margins
    assert meta["distilled_from"] == margin_store.reference()
    assert meta["distilled_from"].startswith(model + ":")
    assert meta["config"]["architecture"] == "generic"
    report = meta["report"]
    assert report["train_subsets"] == 12 * 4 and report["margin_error"]["held_out"] == "val"
    corpus = load_corpus(store, [qa])
    data = scored(margin_store, corpus)
    reader = load_reader(out)
    assert isinstance(reader, GenericReader)
    after = held_out_error(reader, corpus, data)
    assert abs(after - report["margin_error"]["after"]["margin_mae"]) < 1e-3
    torch.manual_seed(0)  # the reader before training: the same architecture at its init
    before = held_out_error(GenericReader(reader.config), corpus, data)
    assert abs(before - report["margin_error"]["before"]["margin_mae"]) < 1e-3
    assert after < 0.9 * before
    # a policy trained against it says what it stands for
    assert reader_reference_id(out).endswith(f" distilled from {meta['distilled_from']}")
    # margins of another model are refused in one line, and nothing is trained
    other = tmp_path / "other"
    assert main(["train-reader", "--store", store, "--qa", str(qa), "--out", str(other),
                 "--distill", f"lmm:{tiny_lmms['qwen2_vl']}", "--margins",
                 str(out / "margins"), "--device", "cpu"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("refocus: error: --margins") or "holds margins of" in err
    assert len(err.splitlines()) == 1 and not (other / "config.json").exists()


@pytest.mark.slow
def test_the_generic_reader_learns_the_answers_and_reloads(synth_store, tmp_path):
    store = str(synth_store / "features")
    out = tmp_path / "generic"
    assert main(["train-reader", "--store", store, "--out", str(out), "--architecture",
                 "generic", "--steps", "150", "--batch-size", "32", "--device",
                 "cpu"]) == EXIT_OK
    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["architecture"] == "generic"
    reader = load_reader(out)
    assert isinstance(reader, GenericReader) and not isinstance(reader, Reader)
    corpus = load_corpus(store, None)
    val = corpus.rows("val")
    evidence = [q for q in val if corpus.evidence[q]]
    picks = lambda q: [s[len(s) // 2] for s in corpus.evidence_frames(q) if s]  # noqa: E731
    got = accuracy(reader, corpus, evidence, picks)
    assert abs(got - meta["report"]["evidence"]) < 1e-4  # the saved reader is the one reported
    torch.manual_seed(0)
    untrained = accuracy(GenericReader(reader.config).eval(), corpus, evidence, picks)
    assert got > untrained + 0.1
