"""refocus precompute-margins: a tiny LMM's option logits and margins on frame subsets,
stored per chunk with its identity, resumable, and equal to the LMM's own full forward."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.cli import main
from flows.options import EXIT_OK, EXIT_USAGE
from pipelines.learn import load_corpus
from refocus.lmm import Item, LMMScorer
from refocus.lmm_reference import ShardFrames
from refocus.reader import margins
from stores.margins import MarginStore


def small_qa(synth_store: Path, folder: Path, train: int, val: int) -> Path:
    """The ingested manifest with only the first ``train`` train and ``val`` val questions
    (every video kept), so the LMM scores few subsets."""
    rows = [json.loads(line) for line in
            (synth_store / "shards" / "manifest.jsonl").read_text().splitlines()]
    wanted = {"train": train, "val": val}
    kept = []
    for row in rows:
        if "qid" in row:
            if wanted.get(row.get("split"), 0) <= 0:
                continue
            wanted[row["split"]] -= 1
        kept.append(row)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return path


@pytest.fixture(scope="module")
def scored_folder(tiny_lmms, synth_store, tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """Margins of 4 train and 2 val questions, 4 subsets each, 3 chunks of 2 questions."""
    root = tmp_path_factory.mktemp("margins")
    qa = small_qa(synth_store, root, 4, 2)
    out = root / "margins"
    args = ["precompute-margins", "--store", str(synth_store / "features"), "--qa", str(qa),
            "--reward", f"lmm:{tiny_lmms['llava']}", "--out", str(out),
            "--subsets-per-question", "4", "--subset-sizes", "2,3",
            "--questions-per-chunk", "2", "--device", "cpu"]
    assert main(args) == EXIT_OK
    return out, qa, args


def test_stored_margins_are_the_lmms_own_full_forward(scored_folder, tiny_lmms, synth_store):
    out, qa, _ = scored_folder
    store = MarginStore(out)
    meta = store.meta()
    assert meta["reference"].startswith(f"lmm:{tiny_lmms['llava']}:")
    assert len(meta["chunks"]) == 3 and store.missing() == []
    data = store.load()
    assert len(data) == 6 * 4 and sorted(set(data.qid.tolist())) == sorted(
        q for chunk in meta["chunks"] for q in chunk)
    corpus = load_corpus(synth_store / "features", [qa])
    row_of = {qid: i for i, qid in enumerate(corpus.qids)}
    # per question: the first half of the subsets holds a frame of every evidence span
    # (spans as times in the manifest), the others no evidence frame at all
    for qid in set(data.qid.tolist()):
        q = row_of[qid]
        video = int(corpus.video[q])
        times = corpus.frame_time[corpus.offsets[video]:corpus.offsets[video + 1]].numpy()
        inside = [{i for i, t in enumerate(times) if a - 1e-6 <= t <= b + 1e-6}
                  for a, b in corpus.evidence[q]]
        subsets = [set(f[f >= 0].tolist()) for f in data.frames[data.qid == qid]]
        assert all(len(s) in (2, 3) for s in subsets)
        assert all(all(s & span for span in inside if span) for s in subsets[:2])
        assert all(not (s & set().union(*inside)) for s in subsets[2:])
    # the LMM's own processor and full forward (vision included) on frames from the shards
    scorer = LMMScorer.load(str(tiny_lmms["llava"]), device="cpu")
    shards = ShardFrames(str(synth_store / "shards"), scorer)
    for i in (0, 5, 13, 22):
        q = row_of[str(data.qid[i])]
        local = sorted(int(f) for f in data.frames[i] if f >= 0)
        video = corpus.video_ids[int(corpus.video[q])]
        start = int(corpus.offsets[int(corpus.video[q])])
        item = Item(corpus.text[q], corpus.options_text[q], shards.images(video, local),
                    corpus.frame_time[[start + j for j in local]].tolist())
        full = scorer.logits_from_images([item])
        n = len(corpus.options_text[q])
        torch.testing.assert_close(torch.as_tensor(data.logits[i, :n]), full[0, :n],
                                   atol=1e-4, rtol=1e-4)
        by_hand = margins(full[:, :n], corpus.answer[[q]])
        assert abs(float(data.margin[i]) - float(by_hand)) < 1e-4


def test_a_chunk_without_its_done_marker_is_recomputed_alone(scored_folder):
    out, _, args = scored_folder
    files = sorted(out.glob("chunk-*.npz"))
    before = {p.name: (p.stat().st_mtime_ns, np.load(p)["logits"]) for p in files}
    (out / "chunk-000001.done.json").unlink()
    assert main(args) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["chunks_written"], summary["chunks_skipped"]) == (1, 2)
    assert summary["subsets_written"] == 2 * 4
    for p in files:
        mtime, logits = before[p.name]
        if p.name == "chunk-000001.npz":
            assert p.stat().st_mtime_ns != mtime  # written again, to the same values
            np.testing.assert_array_equal(np.load(p)["logits"], logits)
        else:
            assert p.stat().st_mtime_ns == mtime  # untouched
    assert len(MarginStore(out).load()) == 6 * 4  # nothing doubled


def test_margins_of_another_model_are_refused_in_one_line(scored_folder, tiny_lmms, capsys):
    out, _, args = scored_folder
    listing = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    other = [a.replace(str(tiny_lmms["llava"]), str(tiny_lmms["qwen2_vl"])) for a in args]
    capsys.readouterr()
    assert main(other) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (lines above: the model's loading progress)
    assert "holds margins of lmm:" in last and "one reference per folder" in last
    assert "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == listing
    changed = [a if a != "4" else "5" for a in args]  # other subsets per question
    assert main(changed) == EXIT_USAGE
    assert "other settings" in capsys.readouterr().err


def test_the_margins_flow_maps_chunks_and_writes_what_the_command_writes(
        prefect_api, scored_folder, tiny_lmms, synth_store, tmp_path):
    from flows.orchestrate import margins_flow
    from pipelines.margins import ReferenceOptions
    from refocus.settings import MarginSettings

    out, qa, _ = scored_folder
    flowed = tmp_path / "flowed"
    settings = MarginSettings(subsets_per_question=4, budgets=(2, 3), questions_per_chunk=2)
    summary = margins_flow(str(synth_store / "features"), str(flowed),
                           f"lmm:{tiny_lmms['llava']}", settings, ReferenceOptions(device="cpu"),
                           qa=[str(qa)])
    assert summary["chunks_written"] == 3 and summary["failed"] == []
    [record] = list((flowed / "flow-runs").glob("*-precompute-margins.json"))
    run = json.loads(record.read_text())
    assert run["status"] == "completed" and sorted(run["tasks"]) == [
        "chunk-000000", "chunk-000001", "chunk-000002"]
    a, b = MarginStore(flowed).load(), MarginStore(out).load()
    assert a.qid.tolist() == b.qid.tolist()
    np.testing.assert_array_equal(a.frames, b.frames)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-5)
