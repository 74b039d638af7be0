"""The encoder shipped for the synthetic world, and the code that trains it."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from pipelines import encoder as encoder_module
from pipelines.encoder import ASSETS, SYNTH_ENCODER, file_sha256, load_encoder
from pipelines.train_encoder import (
    TrainSettings,
    evaluate,
    matches,
    multi_positive_loss,
    text_for,
    train,
)
from stores.errors import UserError


def test_the_bundled_encoder_loads_offline_and_sees_the_world(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = ASSETS / f"{SYNTH_ENCODER}.safetensors"
    meta = json.loads((ASSETS / f"{SYNTH_ENCODER}.meta.json").read_text())
    assert weights.stat().st_size <= 20 * 2**20
    assert file_sha256(weights) == meta["weights_sha256"]
    encoder = load_encoder(SYNTH_ENCODER)
    assert encoder.identity["weights_sha256"] == meta["weights_sha256"]
    # by path, like any other checkpoint: the same encoder
    by_path = load_encoder(str(ASSETS / f"{SYNTH_ENCODER}.json"), str(weights))
    assert by_path.identity["weights_sha256"] == encoder.identity["weights_sha256"]
    # held-out videos of a seed it never saw (the full measurement is in the meta file)
    metrics = evaluate(encoder, seed=4242, videos=3)
    assert metrics["frames_with_shape"] >= 20 and metrics["frames_without"] >= 50
    assert metrics["colour_shape_top1"] >= 0.75, metrics  # chance is 1/24
    assert metrics["shape_vs_none_balanced_accuracy"] >= 0.9, metrics
    assert meta["held_out"]["colour_shape_top1"] >= 0.9


def test_damaged_bundled_weights_are_refused(tmp_path, monkeypatch):
    for path in ASSETS.glob(f"{SYNTH_ENCODER}.*"):  # its files, not refocus-synth-vlm/
        shutil.copy(path, tmp_path / path.name)
    with open(tmp_path / f"{SYNTH_ENCODER}.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    monkeypatch.setattr(encoder_module, "ASSETS", tmp_path)
    with pytest.raises(UserError, match="sha256 differs from the recorded"):
        load_encoder(SYNTH_ENCODER)


def test_texts_match_the_images_they_describe():
    images = [("red", "circle", True), ("red", "square", True), (None, None, False)]
    texts = [("red", None, True), (None, "circle", True), ("red", "square", True),
             (None, None, False)]
    assert matches(images, texts).tolist() == [
        [True, True, False, False],
        [True, False, True, False],
        [False, False, False, True],
    ]
    rng = np.random.default_rng(0)
    for label in images * 20:
        text, named = text_for(rng, label)
        assert matches([label], [named]).item(), (label, text)


def test_multi_positive_loss_against_a_direct_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 4)
    positive = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    expected_rows = []
    for i in range(3):
        p = torch.softmax(logits[i], 0)
        expected_rows.append(-math.log(float(p[positive[i]].sum())))
    expected_cols = []
    for j in range(4):
        p = torch.softmax(logits[:, j], 0)
        expected_cols.append(-math.log(float(p[positive[:, j]].sum())) if positive[:, j].any()
                             else math.inf)
    got = multi_positive_loss(logits, positive)
    # column 1 has one positive (row 0); every column has at least one here
    assert torch.isfinite(got)
    assert float(got) == pytest.approx(0.5 * (np.mean(expected_rows) + np.mean(expected_cols)),
                                       rel=1e-5)





@pytest.mark.slow
def test_training_writes_a_loadable_encoder_with_its_hash_and_scores(tmp_path):
    meta = train(tmp_path, TrainSettings(minutes=0.05, batch_size=32, warmup=5, eval_videos=1,
                                         draw_workers=0), log=lambda line: None)
    assert meta["steps"] >= 1 and math.isfinite(meta["final_loss"])
    weights = tmp_path / f"{SYNTH_ENCODER}.safetensors"
    assert meta["weights_sha256"] == file_sha256(weights)
    assert 0.0 <= meta["held_out"]["colour_shape_top1"] <= 1.0
    loaded = load_encoder(str(tmp_path / f"{SYNTH_ENCODER}.json"), str(weights))
    assert loaded.dim == 64
