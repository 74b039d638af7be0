"""refocus-synth-vlm: the converted vision tower against open_clip, the processor against the
encoder's preprocessing, the shipped asset loaded offline and scored through the cached path,
its answers on a fresh corpus, and the train-vlm loop (resumed = uninterrupted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_STORE
from PIL import Image

from pipelines.encoder import SYNTH_ENCODER, load_encoder
from pipelines.vlm import (
    VLM_ASSET,
    VLM_NAME,
    VLMSettings,
    build_tokenizer,
    clip_tower,
    load_lmm,
    measure,
    resolve_lmm,
    train_vlm,
)
from pipelines.vlm_settings import TextSettings


@pytest.fixture(scope="module")
def encoder():
    return load_encoder(SYNTH_ENCODER, device="cpu")


@pytest.fixture(scope="module")
def fresh(synth_chain) -> Path:
    """A tiny synthetic corpus of a seed neither the demo nor train-vlm uses, ingested with
    the default settings: corpus/ and shards/ (and features/, which these tests ignore)."""
    return synth_chain(SMALL_STORE)


def shard_frames(root: Path, count: int = 3) -> list[np.ndarray]:
    from refocus.lmm_reference import decode_jpeg
    from stores.shards import ShardSet

    shards = ShardSet(root / "shards")
    video = sorted(shards.lookup())[0]
    sample = shards.read(video)
    return [decode_jpeg(f) for f in sample.frames[:count]]


def test_the_converted_tower_is_the_open_clip_encoder(encoder):
    tower = clip_tower(encoder)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = encoder.model.encode_image(pixels)  # open_clip's own forward
        ours = tower(pixel_values=pixels).image_embeds
    assert ours.shape == theirs.shape == (3, encoder.dim)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_the_processor_prepares_frames_as_the_encoder_does(encoder, fresh):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(VLM_ASSET)
    frames = shard_frames(fresh)
    ours = processor.image_processor(images=frames, return_tensors="pt")["pixel_values"]
    theirs = torch.stack([encoder.preprocess(Image.fromarray(f)) for f in frames])
    assert ours.shape == theirs.shape == (3, 3, 64, 64)
    # within one grey level of open_clip's PIL resize (transformers resizes in float)
    step = 1.01 / 255 / min(processor.image_processor.image_std)
    assert (ours - theirs).abs().max() <= step
    with torch.no_grad():
        a, b = encoder.model.encode_image(ours), encoder.model.encode_image(theirs)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_every_option_letter_is_one_token_and_the_world_has_no_unknown_words():
    from refocus.lmm import LETTERS, letter_token_ids

    tokenizer = build_tokenizer()
    assert [len(ids) for ids in letter_token_ids(tokenizer)] == [1] * len(LETTERS)
    unknown = tokenizer.convert_tokens_to_ids("[UNK]")
    text = "frame at 27.5 s: How many purple shapes appeared? What appeared right after the " \
           "orange cross? Answer with the option's letter from the given choices directly."
    assert unknown not in tokenizer.encode(text)


def test_the_asset_loads_offline_by_name_and_by_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_lmm(VLM_NAME) == str(VLM_ASSET)
    assert resolve_lmm("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    by_name = load_lmm(VLM_NAME, device="cpu")
    by_path = load_lmm(str(VLM_ASSET), device="cpu")
    assert by_name.name == VLM_NAME and by_path.name == str(VLM_ASSET)
    assert by_name.family.label == "LLaVA" and by_name.present == "images"
    meta = json.loads((VLM_ASSET / "meta.json").read_text())
    assert meta["validation"]["evidence"]["questions"] >= 100
    assert sum(p.stat().st_size for p in VLM_ASSET.iterdir()) <= 30 * 2**20


def test_the_asset_scores_through_the_cache_as_through_its_full_forward(fresh):
    from refocus.lmm import Item

    scorer = load_lmm(VLM_NAME, device="cpu")
    frames = shard_frames(fresh, 4)
    question, options = "What colour was the circle?", ["red", "green", "blue", "yellow"]
    items = [Item(question, options, frames[:k], [0.5 * i for i in range(k)])
             for k in (1, 2, 4)]
    cached = scorer.logits_from_vision(
        [Item(it.question, it.options, scorer.vision(list(it.frames)), it.times)
         for it in items])
    full = scorer.logits_from_images(items)
    assert torch.isfinite(full).all()
    assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()


def test_the_asset_answers_fresh_questions_from_their_evidence_frames(fresh):
    scores = measure(VLM_ASSET, fresh / "shards", fresh / "corpus" / "manifest.jsonl",
                     split=None)
    evidence = scores["evidence"]
    assert evidence["questions"] >= 20
    assert evidence["accuracy"] >= 0.6  # chance is 0.25 (four options)
    # the frames matter: 4 evenly spaced frames usually miss the evidence
    assert scores["uniform4"]["accuracy"] <= evidence["accuracy"] - 0.2


@pytest.mark.slow
def test_train_vlm_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import pipelines.vlm as vlm

    tiny = TextSettings(hidden=32, layers=1, heads=2, intermediate=64)
    # step 3 is the first to show every token of a frame (the cut run resumes across it)
    settings = VLMSettings(videos=6, seed=5, duration=(13.0, 14.0), steps=4, pick_steps=1,
                           class_steps=1, align_steps=20, batch_size=4, micro_batch=2,
                           text=tiny, eval_every=2, checkpoint_every=2, eval_questions=4,
                           threads=1)
    whole = train_vlm(tmp_path / "whole", settings, say=lambda line: None)
    assert whole["steps"] == 4 and (tmp_path / "whole" / "training.png").is_file()
    # the same prepared corpus, shards and vision cache; stopped after step 2's checkpoint
    shutil.copytree(tmp_path / "whole", tmp_path / "cut", ignore=shutil.ignore_patterns(
        "checkpoint*", "model", "metrics.jsonl", "report.json", "README.md", "training.png"))
    real, calls = vlm.accumulate, []

    def dies_at_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(vlm, "accumulate", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_vlm(tmp_path / "cut", settings, say=lambda line: None)
    monkeypatch.setattr(vlm, "accumulate", real)
    said: list[str] = []
    resumed = train_vlm(tmp_path / "cut", settings, say=said.append)
    assert any("resumed at step 2" in line for line in said)
    a = load_file(tmp_path / "whole" / "model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
    steps = [r["step"] for r in map(json.loads, (tmp_path / "cut" / "metrics.jsonl")
                                    .read_text().splitlines()) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4] and resumed["steps"] == 4


def test_precompute_reference_takes_the_bundled_name(fresh, tmp_path, monkeypatch):
    """`refocus precompute-reference --model refocus-synth-vlm` loads the asset offline, as
    it would a hub model, and the store records the name."""
    from flows.cli import main
    from refocus.lmm_reference import frame_from_rows
    from stores.reference import ReferenceStore
    from stores.shards import ShardSet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["precompute-reference", "--model", VLM_NAME, "--shards",
                 str(fresh / "shards"), "--out", str(tmp_path / "ref"), "--device", "cpu"]) == 0
    store = ReferenceStore(tmp_path / "ref")
    identity = store.identity()
    assert identity["model"] == VLM_NAME
    assert identity["model_id"].startswith(f"lmm:{VLM_NAME}:images:")
    video = sorted(ShardSet(fresh / "shards").lookup())[0]  # the one shard_frames reads
    meta, rows = store.frames(video, [0, 1])
    stored = [frame_from_rows(meta["frame_layout"], r) for r in rows]
    computed = load_lmm(VLM_NAME, device="cpu").vision(shard_frames(fresh, 2))
    for a, b in zip(stored, computed, strict=True):
        assert torch.equal(a.tokens, b.tokens)


def test_standardising_the_projector_equals_the_projector_on_standardised_features(encoder):
    """After the fold, the projector on raw tower features equals the original projector on
    features standardised by hand with the cache's per-dimension mean and std."""
    from pipelines.vlm import VisionCache, build_model, standardise_projector

    torch.manual_seed(0)
    features = [torch.randn(5, 65, 128) * 3 + torch.linspace(-4, 4, 128) for _ in range(3)]
    cache = VisionCache(features, [[0.0] * 5] * 3, [(64, 64)] * 3, ["a", "b", "c"])
    model, _ = build_model(TextSettings(hidden=32, layers=1, heads=2, intermediate=64),
                           encoder=encoder)
    projector = model.model.multi_modal_projector
    original = {k: v.clone() for k, v in projector.state_dict().items()}
    standardise_projector(model, cache)
    rows = torch.cat([f.reshape(-1, 128) for f in features])
    z = (rows - rows.mean(0)) / rows.std(0)
    hand = torch.nn.functional.linear(z, original["linear_1.weight"], original["linear_1.bias"])
    with torch.no_grad():
        assert torch.allclose(projector.linear_1(rows), hand, atol=1e-4)


def test_a_grounding_example_asks_what_its_one_frame_shows():
    from pipelines.synth import COLOURS, SHAPES
    from pipelines.vlm import Example, ground_example

    events = [("red circle", [3, 4, 5]), ("blue cross", []), ("green square", [9])]
    ex = Example("What colour was the circle?", ["red", "blue"], 0, "colour", 0, [[3]], events)
    rng = np.random.default_rng(1)
    names = {f"{c} {s}" for c in COLOURS for s in SHAPES}
    for _ in range(20):
        question, frames = ground_example(ex, rng)
        (frame,) = frames
        shown = question.options[question.answer]
        assert frame in dict(events)[shown] and shown != "blue cross"  # never an unseen event
        assert len(set(question.options)) == 4 and set(question.options) <= names
    assert ground_example(Example("q", ["a"], 0, "k", 0, [], [("red circle", [])]), rng) is None


def test_a_fresh_question_is_answered_by_what_its_evidence_frames_show():
    """Fresh questions drawn from a video's plan, checked against a hand-made plan: each
    evidence span's frames show exactly one event, and the answer is what those frames show
    (the attribute asked, the first or last shown, the one after, or how many)."""
    from pipelines.synth import Event
    from pipelines.vlm import Example, fresh_question

    fps = 4
    plan = tuple(Event(c, s, first, n, 0.5, 0.5, 0.2) for c, s, first, n in (
        ("red", "circle", 4, 3), ("blue", "cross", 12, 2), ("red", "square", 20, 4),
        ("green", "circle", 30, 3)))
    times = [i / fps for i in range(40)]
    shows = {f: e for e in plan for f in range(e.first, e.first + e.frames)}  # frame -> event
    ex = Example("q", ["a", "b"], 0, "colour", 0, [], [], plan, fps)
    rng = np.random.default_rng(3)
    kinds = set()
    for _ in range(60):
        q = fresh_question(ex, times, rng)
        kinds.add(q.kind)
        seen = [{shows[f] for f in span} for span in q.spans]
        assert all(len(s) == 1 for s in seen)  # every span shows one event, all its frames
        events = [next(iter(s)) for s in seen]
        right = q.options[q.answer]
        if q.kind == "colour":
            assert right == events[0].colour and events[0].shape in q.question
        elif q.kind == "shape":
            assert right == events[0].shape and events[0].colour in q.question
        elif q.kind in ("first", "last"):
            ordered = sorted(events, key=lambda e: e.first)
            assert right == (ordered[0] if q.kind == "first" else ordered[-1]).name
        elif q.kind == "after":
            assert events[0].name in q.question and right == events[1].name
        else:
            assert right == ["zero", "one", "two", "three"][len(events)]
    assert kinds == {"colour", "shape", "first", "last", "count", "after"}
    assert fresh_question(Example("q", ["a"], 0, "k", 0, []), times, rng) is None


def test_stage_one_puts_each_frame_on_the_words_of_what_it_shows(encoder):
    """On features whose class token has a direction per content (plus noise), the aligned
    projector puts held-out frames nearest to the embeddings of their own words, summed by
    hand from the tokenizer's ids; before alignment it does not."""
    from pipelines.vlm import (
        Example,
        VisionCache,
        align_projector,
        alignment_accuracy,
        alignment_data,
        build_model,
        standardise_projector,
    )

    gen = torch.Generator().manual_seed(0)
    names = ["red circle", "blue cross", "green square"]
    direction = {n: torch.randn(128, generator=gen) * 2 for n in [*names, "none", "patch"]}
    features, events = [], []
    for v in range(6):
        shown = {f: names[(v + f // 4) % 3] for f in range(12) if f % 4 < 2}
        rows = torch.randn(12, 65, 128, generator=gen) * 0.3 + direction["patch"]
        for f in range(12):  # the class token carries the content, as the tower's does
            rows[f, 0] += direction[shown.get(f, "none")] - direction["patch"]
        features.append(rows)
        events.append([(n, [f for f, m in shown.items() if m == n]) for n in names])
    cache = VisionCache(features, [[0.25 * f for f in range(12)]] * 6, [(64, 64)] * 6,
                        [str(v) for v in range(6)])
    exs = [Example("q", ["a"], 0, "k", v, [], events[v]) for v in range(6)]
    model, processor = build_model(TextSettings(hidden=32, layers=1, heads=2, intermediate=64),
                                   encoder=encoder)
    tok = processor.tokenizer
    frames, targets, _ = alignment_data(model, tok, exs[:1], cache)
    table = model.get_input_embeddings().weight.detach()
    assert [v for v, _ in frames] == [0] * 12
    for (_, f), target in zip(frames, targets, strict=True):
        words = names[f // 4 % 3].split() if f % 4 < 2 else ["frame"]
        assert torch.equal(target, table[tok.convert_tokens_to_ids(words)].sum(0))
    standardise_projector(model, cache)  # as training does first
    before = alignment_accuracy(model, tok, exs[4:], cache)
    s = VLMSettings(align_steps=150, align_frames=32)
    after = align_projector(model, tok, exs[:4], exs[4:], cache, s, say=lambda line: None)
    assert before < 0.6 and after["align_val"] == 1.0
