"""The encoder factory: tiny open_clip models built from configs, loaded offline by path."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY_CLIP, make_tiny_clip
from PIL import Image
from safetensors.torch import save_file

from pipelines.encoder import format_question, load_encoder, load_encoder_of
from stores.errors import UserError
from stores.features import same_encoder


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)) for _ in range(n)]


def test_weights_saved_to_a_file_load_back_to_identical_embeddings(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY_CLIP))
    torch.manual_seed(3)
    random = load_encoder(str(config), "random")
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in random.model.state_dict().items()}, weights)
    loaded = load_encoder(str(config), str(weights))
    pixels = torch.stack([random.preprocess(im) for im in images()])
    assert pixels.shape == (3, 3, 32, 32)
    a, b = random.encode_images(pixels), loaded.encode_images(pixels)
    assert np.array_equal(a, b)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    texts = ["a red circle", format_question("What colour?", ["red", "blue"])]
    assert np.array_equal(random.encode_texts(texts), loaded.encode_texts(texts))
    # the identity names the weights by content: same file → same encoder; random never
    assert same_encoder(loaded.identity, load_encoder(str(config), str(weights)).identity)
    assert not same_encoder(random.identity, random.identity)
    assert loaded.identity["dim"] == 32 and loaded.identity["model"] == str(config)


def test_other_weights_are_another_encoder(tmp_path):
    config, first = make_tiny_clip(tmp_path, seed=0)
    _, second = make_tiny_clip(tmp_path, seed=1)
    a, b = load_encoder(str(config), str(first)), load_encoder(str(config), str(second))
    assert not same_encoder(a.identity, b.identity)
    pixels = torch.stack([a.preprocess(im) for im in images(1)])
    assert not np.allclose(a.encode_images(pixels), b.encode_images(pixels))


def test_a_long_question_is_truncated_to_the_context_length(tiny_clip):
    encoder = load_encoder(str(tiny_clip[0]), str(tiny_clip[1]))
    long = format_question("why " * 200, ["a", "b", "c", "d"])
    out = encoder.encode_texts([long, "short"])
    assert out.shape == (2, 32) and np.isfinite(out).all()


def test_local_dir_models_load_with_their_own_weights(tmp_path, tiny_clip):
    config, weights = tiny_clip
    folder = tmp_path / "bundle"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP,
        "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    }))
    (folder / "open_clip_model.safetensors").write_bytes(weights.read_bytes())
    bundled = load_encoder(f"local-dir:{folder}")
    by_path = load_encoder(str(config), str(weights))
    assert bundled.identity["weights_sha256"] == by_path.identity["weights_sha256"]
    assert bundled.identity["preprocess"]["mean"] == [0.5, 0.5, 0.5]
    text = ["the same text tower"]
    assert np.array_equal(bundled.encode_texts(text), by_path.encode_texts(text))
    reloaded = load_encoder_of(bundled.identity)
    assert same_encoder(reloaded.identity, bundled.identity)


@pytest.mark.parametrize(
    "model, pretrained, message",
    [
        ("ViT-B-32", "laion2b_s34b_b79k",
         "ViT-B-32 weights 'laion2b_s34b_b79k' are not in the local cache (looked for "
         "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
        ("ViT-B-32", None, "no weights given; pass --pretrained"),
        ("ViT-B-32", "no-such-tag", "no such file, and not a tag of ViT-B-32"),
        ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None,
         "open_clip_config.json is not in the Hugging Face cache"),
        ("Not-A-Model", "random", "not an open_clip architecture"),
        ("missing.json", "random", "architecture config not found"),
        ("local-dir:/nonexistent", None, "cannot read open_clip_config.json"),
    ],
)
def test_weights_that_cannot_be_found_offline_fail_in_one_line(monkeypatch, model, pretrained,
                                                                message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as caught:
        load_encoder(model, pretrained)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_weights_of_another_architecture_are_refused(tmp_path, tiny_clip):
    other = dict(TINY_CLIP, embed_dim=16)
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(UserError, match="cannot load into other"):
        load_encoder(str(tmp_path / "other.json"), str(tiny_clip[1]))


def test_the_bundled_encoder_is_recorded_by_name_not_by_this_install_s_path():
    """A store or policy made with the bundled encoder must load its encoder on another
    install (a policy from the Hub): the identity names it, and holds no path of this one."""
    from pipelines.encoder import ASSETS, encoder_spec

    identity = load_encoder("refocus-synth", device="cpu").identity
    assert str(ASSETS) not in json.dumps(identity)
    assert encoder_spec(identity) == ("refocus-synth", None)
    # the oracle: the bundled weights file's own hash, read directly
    import hashlib
    digest = hashlib.sha256((ASSETS / "refocus-synth.safetensors").read_bytes()).hexdigest()
    assert identity["weights_sha256"] == digest
