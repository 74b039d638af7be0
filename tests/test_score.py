"""refocus score on a fresh synthetic corpus with a policy trained on another one: the
selections say what the policy picks, their times are the shard's, JSONL and Parquet agree,
exported frames are the shard's JPEG bytes (read back with tarfile and with webdataset), a
broken video is reported while the rest is scored, a re-run reuses ingest and embed, and the
Prefect flow writes the same selections."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
import webdataset as wds
from conftest import SMALL_STORE

from flows.cli import main
from flows.orchestrate import score_flow, with_runner
from flows.runtime import Orchestration
from pipelines.corpus import load_corpus
from pipelines.embed import EmbedSettings
from pipelines.policies import load_policy
from pipelines.score import ScoreSettings, score
from pipelines.synth import SynthSettings, generate
from refocus.policy import FrameSelector, PolicyConfig
from refocus.selectors import Learned
from stores.manifest import read_manifest
from stores.runs import RunFolder
from stores.selections import read_selections

K = 4


@pytest.fixture(scope="module")
def policy(synth_chain, tmp_path_factory) -> Path:
    """A run folder as refocus train leaves it: run.json naming its training store, and the
    policy model folder (untrained weights: what is tested is the plumbing around it)."""
    root = tmp_path_factory.mktemp("trained")
    run = RunFolder.claim(root / "run")
    run.write_identity({"store": str(synth_chain(SMALL_STORE) / "features")})
    torch.manual_seed(0)
    config = PolicyConfig(dim=64, hidden=32)
    run.write_policy(config.as_dict(), FrameSelector(config).state_dict())
    return run.path


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    """New videos with questions, plus one video row whose file is missing."""
    root = tmp_path_factory.mktemp("fresh")
    generate(root, SynthSettings(videos=4, seed=77, workers=1))
    manifest = root / "manifest.jsonl"
    rows = manifest.read_text().splitlines()
    rows.append(json.dumps({"type": "video", "id": "lost", "path": "videos/lost.mp4"}))
    rows.append(json.dumps({"type": "question", "qid": "lost_q", "video_id": "lost",
                            "question": "What colour?", "options": ["red", "blue"],
                            "answer": 0}))
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


@pytest.fixture(scope="module")
def scored(policy, fresh, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("scored")
    summary = score(read_manifest(fresh), policy, out,
                    ScoreSettings(k=K, export="webdataset", ingest_workers=1,
                                  embed=EmbedSettings(workers=0, index=None)))
    return out, summary


def _shard_members(shards: Path) -> dict[str, bytes]:
    members = {}
    for path in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                members[m.name] = tar.extractfile(m).read()
    return members


def test_selections_are_the_policys_picks_at_the_shards_times(scored, policy, fresh):
    out, summary = scored
    rows = read_selections(out)
    questions = [q for q in read_manifest(fresh).questions if q.video_id != "lost"]
    assert sorted(r.qid for r in rows) == sorted(q.qid for q in questions)
    corpus = load_corpus(out / "features", [out / "shards" / "manifest.jsonl"])
    expected = Learned(load_policy(policy)).select(corpus, corpus.rows(), K)
    by_qid = {r.qid: r for r in rows}
    members = _shard_members(out / "shards")
    for q, picks in zip(corpus.rows(), expected, strict=True):
        row = by_qid[corpus.qids[q]]
        assert row.frame_indices == picks and len(picks) == K
        meta = json.loads(members[f"{row.video_id}.json"])
        assert row.timestamps == [meta["timestamps"][i] for i in picks]
        assert row.timestamps == sorted(row.timestamps)
        assert all(0 < p <= 1 for p in row.probabilities)
        assert row.source.endswith(f"{row.video_id}.mp4")
    assert read_selections(out / "selections.parquet") == read_selections(
        out / "selections.jsonl")
    assert summary["questions"] == len(questions)


def test_a_missing_video_is_reported_and_the_rest_is_scored(scored):
    out, summary = scored
    assert any("lost" in f for f in summary["failures"])
    assert any("lost_q" in f for f in summary["failures"])
    assert "lost_q" not in {r.qid for r in read_selections(out)}


def test_webdataset_export_holds_the_shard_jpegs(scored):
    out, _ = scored
    members = _shard_members(out / "shards")
    rows = {r.qid: r for r in read_selections(out)}
    tars = sorted(str(p) for p in (out / "frames-webdataset").glob("shard-*.tar"))
    seen = set()
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        row = rows[meta["qid"]]
        frames = sorted(k for k in sample if k.endswith("jpg"))
        assert len(frames) == K
        for name, index in zip(frames, row.frame_indices, strict=True):
            assert sample[name] == members[f"{row.video_id}.{index:06d}.jpg"]
        seen.add(meta["qid"])
    assert seen == set(rows)


def test_jpeg_export_and_rerun_reuse_ingest_and_embed(scored, policy, fresh, capsys):
    out, _ = scored
    code = main(["score", str(fresh), "--policy", str(policy / "policy"), "--k", str(K),  # old path
                 "--out", str(out), "--export", "jpeg", "--workers", "1",
                 "--embed-workers", "0"])
    assert code == 1  # the missing video
    assert json.loads((out / "shards" / "summary.json").read_text())["shards_written"] == 0
    assert json.loads((out / "features" / "summary.json").read_text())["shards_written"] == 0
    members = _shard_members(out / "shards")
    for row in read_selections(out):
        files = sorted((out / "frames-jpeg" / row.qid).glob("*.jpg"))
        assert [members[f"{row.video_id}.{i:06d}.jpg"] for i in row.frame_indices] == [
            f.read_bytes() for f in files]
    assert "questions" in capsys.readouterr().out


def test_the_score_flow_writes_the_same_selections(prefect_api, scored, policy, fresh, tmp_path):
    out, _ = scored
    o = Orchestration(workers=2)
    summary = with_runner(score_flow, o)([str(fresh)], str(policy), str(tmp_path),
                                         ScoreSettings(k=K), orchestration=o)
    assert read_selections(tmp_path) == read_selections(out)
    assert any("lost" in f for f in summary["failures"])
