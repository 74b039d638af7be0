"""Policies as Hugging Face models: export-policy writes the mixin's files and a model card;
the folder, laid out as the Hugging Face cache holds a downloaded model, loads offline by its
id into a policy that decides as the run's own did; refocus score --policy ORG/NAME scores
with it end to end (in a fresh process, HF_HUB_OFFLINE=1, HF_HUB_CACHE a temporary folder);
a push with the Hub unreachable is one line, and old run folders still score."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants
from safetensors.torch import load_file

from flows.cli import main
from pipelines.decode import DecodeSettings
from pipelines.encoder import SYNTH_ENCODER, load_encoder
from pipelines.hub import HUB_FILES, resolve_policy
from pipelines.ingest import IngestSettings
from pipelines.policies import load_policy
from pipelines.synth import SynthSettings, generate
from refocus.policy import FrameSelector, PolicyConfig
from stores.errors import UserError
from stores.runs import RunFolder
from stores.selections import read_selections

REPO = Path(__file__).resolve().parents[1]
SHA = "0123456789abcdef0123456789abcdef01234567"  # a snapshot's commit in the fake cache
CANDIDATES = IngestSettings(decode=DecodeSettings(fps=3.0, max_frames=12, size=64),
                            jpeg_quality=85).output_settings()


def make_run(root: Path, seed: int = 0) -> Path:
    """A finished run folder as refocus train writes it (untrained weights): run.json, the
    best policy with its record, resolved-config.yaml beside it."""
    run = RunFolder.claim(root)
    run.write_identity({"store": str(root.parent / "features"), "qa": None,
                        "reward": "reader:/runs/reader", "settings": {"budgets": [2, 4]}})
    torch.manual_seed(seed)
    config = PolicyConfig(dim=64, hidden=32)
    record = {"settings": {"budgets": [2, 4], "steps": 7, "questions_per_step": 8, "group": 4},
              "reward": "reader:/runs/reader", "encoder": load_encoder(SYNTH_ENCODER).identity,
              "candidates": CANDIDATES}
    run.write_policy(config.as_dict(), FrameSelector(config).state_dict(),
                     chosen="best validation", best={"step": 5, "reward": 0.25}, **record)
    (root / "resolved-config.yaml").write_text(
        "command: train\nrefocus-version: 0.1.0\nstore: data/features\nsteps: 7\n")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("trained") / "run")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eval")
    (folder / "eval.md").write_text(
        "| method | rewards by | k | acc[judge=reader] | acc[judge=ideal] |\n|---|---|---:|---:|"
        "---:|\n| refocus | reader | 4 | 61.0 * | 55.5 |\n")
    return folder


@pytest.fixture(scope="module")
def exported(run, evaluation, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "policy"
    assert main(["export-policy", str(run), "--eval", str(evaluation), "--out", str(out)]) == 0
    return out


def as_cached(exported: Path, cache: Path, repo: str) -> Path:
    """The export laid out as huggingface_hub's cache holds a downloaded model: blobs, a
    snapshot of links to them, and refs/main naming the snapshot."""
    model = cache / ("models--" + repo.replace("/", "--"))
    snapshot = model / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (model / "blobs").mkdir()
    for name in HUB_FILES:
        blob = model / "blobs" / f"blob-{name}"
        shutil.copy(exported / name, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (model / "refs").mkdir()
    (model / "refs" / "main").write_text(SHA)
    return snapshot


def test_export_holds_the_mixins_files_and_the_record(run, exported):
    names = {p.name for p in exported.iterdir() if not p.name.startswith(".")}
    assert names >= set(HUB_FILES) and "weights.safetensors" not in names
    assert constants.SAFETENSORS_SINGLE_FILE in names and constants.CONFIG_NAME in names
    record = json.loads((exported / "config.json").read_text())
    original = json.loads((run / "config.json").read_text())
    assert record == original  # shape, encoder, candidates, settings, reward: all kept
    weights = load_file(exported / "model.safetensors")
    theirs = load_file(run / "weights.safetensors")
    assert weights.keys() == theirs.keys()
    assert all(torch.equal(weights[k], theirs[k]) for k in weights)


def test_model_card_fields(run, exported):
    card = ModelCard.load(exported / "README.md")
    assert card.data.library_name == "refocus"
    assert card.data.license == "apache-2.0"
    assert {"refocus", "frame-selection", "pytorch_model_hub_mixin"} <= set(card.data.tags)
    text = card.text
    identity = load_encoder(SYNTH_ENCODER).identity
    assert identity["weights_sha256"] in text and f'"{identity["model"]}"' in text
    assert "- fps: `3.0`" in text and "- max_frames: `12`" in text
    assert "- jpeg_quality: `85`" in text
    assert "rewards given by: `reader:/runs/reader`" in text
    assert "Rewards were given by `reader:/runs/reader`" in text
    assert "| refocus | reader | 4 | 61.0 * | 55.5 |" in text  # the cross-judged scores
    assert "frame budgets (k): [2, 4]" in text and "k=4" in text
    assert "refocus train --config resolved-config.yaml" in text and "steps: 7" in text
    assert '{"step": 5, "reward": 0.25}' in text


def decisions(policy: FrameSelector, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy picks and their log-probabilities on one fixed random input."""
    g = torch.Generator().manual_seed(seed)
    q, t, f = (torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g),
               torch.randn(3, 20, 64, generator=g))
    times = torch.linspace(0, 1, 20).expand(3, -1)
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[2, 15:] = False
    with torch.no_grad():
        s = policy.eval().sample(policy.encode(q, t, f, times, valid), 4, greedy=True)
    return s.picks, s.log_probs


def test_loads_offline_from_the_hub_cache_by_id(run, exported, tmp_path, monkeypatch):
    as_cached(exported, tmp_path / "hub", "someone/refocus-policy")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = FrameSelector.from_pretrained("someone/refocus-policy")
    # the oracle: the policy the run wrote, built from its own files without the mixin
    record = json.loads((run / "config.json").read_text())
    original = FrameSelector(PolicyConfig(**record["config"]))
    original.load_state_dict(load_file(run / "weights.safetensors"))
    picks, log_probs = decisions(loaded)
    want_picks, want_log_probs = decisions(original)
    assert torch.equal(picks, want_picks) and torch.equal(log_probs, want_log_probs)
    folder = resolve_policy("someone/refocus-policy")
    assert folder.parts[-2:] == ("snapshots", SHA)
    assert torch.equal(decisions(load_policy(folder))[0], want_picks)


def test_missing_from_the_offline_cache_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match=r"someone/absent: no such folder.*not in the local "
                                        r"cache \(offline\)") as e:
        resolve_policy("someone/absent")
    assert "\n" not in str(e.value)


def test_push_without_the_hub_is_one_line(run, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "flows.cli", "export-policy", str(run),
                           "--push-to-hub", "someone/refocus-policy"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0]


def test_refuses_a_policy_without_its_inputs(tmp_path, capsys):
    bare = RunFolder.claim(tmp_path / "bare")
    config = PolicyConfig(dim=8, hidden=16)
    bare.write_policy(config.as_dict(), FrameSelector(config).state_dict())
    assert main(["export-policy", str(bare.path), "--out", str(tmp_path / "x")]) == 2
    assert "records no encoder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fresh")
    generate(root, SynthSettings(videos=2, seed=5, workers=1))
    return root / "manifest.jsonl"


@pytest.mark.slow
def test_score_by_hub_id_end_to_end(run, exported, fresh, tmp_path):
    """refocus score --policy ORG/NAME in a fresh process, offline, from a cache folder: the
    same selections as scoring with the run folder itself."""
    as_cached(exported, tmp_path / "hub", "someone/refocus-policy")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "PYTHONPATH": str(REPO)}
    common = ["--workers", "1", "--embed-workers", "0"]
    by_id = subprocess.run(
        [sys.executable, "-m", "flows.cli", "score", str(fresh), "--policy",
         "someone/refocus-policy", "--out", str(tmp_path / "by-id"), *common],
        env=env, capture_output=True, text=True, timeout=600)
    assert by_id.returncode == 0, by_id.stderr
    assert main(["score", str(fresh), "--policy", str(run), "--out", str(tmp_path / "by-run"),
                 *common]) == 0
    got, want = (read_selections(tmp_path / name) for name in ("by-id", "by-run"))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        assert (a.qid, a.k, a.frame_indices, a.timestamps) == (b.qid, 4, b.frame_indices,
                                                               b.timestamps)
    meta = json.loads((tmp_path / "by-id" / "summary.json").read_text())
    assert f"models--someone--refocus-policy/snapshots/{SHA}" in meta["policy"]
