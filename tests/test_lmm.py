"""The LMM reference: tiny random Qwen2-VL and LLaVA-OneVision built from configs (a tokenizer
trained here), fed frames of the real videos. Oracles: one-at-a-time forwards, the model's own
processor-and-forward path, the raw logits at the letters' token ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_lmm import build_llava_onevision, build_qwen2_vl

from flows.cli import EXIT_OK, main
from pipelines.decode import DecodeSettings, VideoDecoder
from refocus.lmm import Item, LMMScorer, letter_token_ids, question_prompt
from refocus.lmm_reference import LMMReference, ShardFrames, StoreFrames
from refocus.rewards import RewardModel
from stores.errors import UserError
from stores.reference import ReferenceStore

FAMILIES = ["qwen2_vl", "llava_onevision"]
BUILDERS = {"qwen2_vl": build_qwen2_vl, "llava_onevision": build_llava_onevision}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lmm")
    return {name: build(root / name) for name, build in BUILDERS.items()}


@pytest.fixture(scope="module")
def scorers(models) -> dict:
    return {name: LMMScorer.load(str(path), device="cpu", batch_size=8)
            for name, path in models.items()}


@pytest.fixture(scope="module")
def frames(shared_data) -> list[np.ndarray]:
    """Frames of two real videos of different sizes (NASA 320×180, an ASL clip 640×480)."""
    out = []
    for name, fps in (("nasa_13013.mp4", 1), ("asl_book.mkv", 2)):
        with VideoDecoder(shared_data / "videos" / name,
                          DecodeSettings(fps=fps, max_frames=5, size=112)) as video:
            out += [c.rgb for c in video.candidates()]
    return out


def items_for(frames: list) -> list[Item]:
    return [
        Item("What colour was the circle?", ["red", "green", "blue", "yellow"], frames[0:3]),
        Item("How many shapes appeared?", ["one", "two", "three"], frames[3:7]),
        Item("Which sign is shown?", ["book", "milk", "yes", "no", "help"], frames[5:9]),
        Item("What appeared first?", ["a square", "a cross"], frames[8:9]),
        Item("What happens?", ["a door opens", "a person walks", "nothing"], frames[1:8]),
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_margins_equal_one_at_a_time(scorers, frames, family):
    scorer = scorers[family]
    items = items_for(frames)
    batched = scorer.logits_from_images(items)
    alone = [scorer.logits_from_images([it])[0] for it in items]
    for row, single in zip(batched, alone, strict=True):
        n = torch.isfinite(single).sum()
        assert torch.isinf(row[n:]).all() and torch.isfinite(row[:n]).all()
        torch.testing.assert_close(row[:n], single[:n], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_cache_gives_the_same_logits(scorers, frames, family):
    """Vision run once over all frames; each subset assembled from the cache. Tolerance:
    2e-5 absolute (float32 on CPU; the two paths differ only in summation order)."""
    scorer = scorers[family]
    items = items_for(frames)
    cache = scorer.vision(frames, multi=True)
    index = {id(f): i for i, f in enumerate(frames)}
    cached = []
    for it in items:
        if scorer.as_multi(len(it.frames)):
            views = [cache[index[id(f)]] for f in it.frames]
        else:  # a lone frame, as the model reads one image alone
            views = scorer.vision(list(it.frames), multi=False)
        cached.append(Item(it.question, it.options, views))
    torch.testing.assert_close(scorer.logits_from_vision(cached),
                               scorer.logits_from_images(items), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_letter_logits_are_read_at_the_answer_position(scorers, frames, family):
    scorer = scorers[family]
    tok = scorer.tokenizer
    letters = letter_token_ids(tok, 4)
    for letter, ids in zip("ABCD", letters, strict=True):
        assert tok.decode(ids[0]) == letter
        assert all(tok.decode(i).strip() == letter for i in ids)
    item = items_for(frames)[0]
    # independently: the processor, the plain forward, the full vocabulary at the last position
    text = scorer.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * 3 + [
            {"type": "text", "text": question_prompt(item.question, item.options)}]}],
        add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("assistant")
    assert "A. red\nB. green\nC. blue\nD. yellow" in text
    inputs = scorer.processor(text=[text], images=[list(item.frames)], return_tensors="pt")
    with torch.no_grad():
        vocab = scorer.model(**inputs).logits[0, -1]
    expected = torch.stack([torch.logsumexp(vocab[torch.tensor(
        [i for i in (tok.convert_tokens_to_ids(c), tok.convert_tokens_to_ids("Ġ" + c))
         if i is not None and i != tok.unk_token_id])], 0) for c in "ABCD"])
    torch.testing.assert_close(scorer.logits_from_images([item])[0], expected,
                               atol=1e-5, rtol=1e-5)


def test_a_tokenizer_whose_letters_are_not_single_tokens_is_refused(tmp_path):
    folder = build_qwen2_vl(tmp_path / "split", split_letters=True)
    with pytest.raises(UserError, match="letter 'A' is 2 tokens"):
        LMMScorer.load(str(folder), device="cpu")


def test_a_prompt_longer_than_the_context_is_a_clear_error(tmp_path, frames):
    scorer = LMMScorer.load(str(build_qwen2_vl(tmp_path / "short", max_positions=64)),
                            device="cpu")
    item = Item("What colour was the circle?", ["red", "green"], frames[:6])
    for score in (scorer.logits_from_images,
                  lambda items: scorer.logits_from_vision(
                      [Item(item.question, item.options, scorer.vision(item.frames))])):
        with pytest.raises(UserError, match=r"tokens \(6 frames\) is longer than the "
                                            r"model's context of 64"):
            score([item])


def test_a_model_that_is_not_there_is_one_line(tmp_path):
    with pytest.raises(UserError) as e:
        LMMScorer.load(str(tmp_path / "nowhere"), device="cpu")
    assert "\n" not in str(e.value) and "could not load the reference model" in str(e.value)
    with pytest.raises(UserError, match="huggingface-cli download org/not-cached"):
        LMMScorer.load("org/not-cached", device="cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_features_score_like_features_from_the_shards(
        models, scorers, sample_shards, tmp_path, family, capsys):
    out = tmp_path / "reference"
    args = ["precompute-reference", "--model", str(models[family]), "--shards",
            str(sample_shards), "--out", str(out), "--device", "cpu", "--frames-per-pass", "5"]
    assert main(args) == EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_written"] == 4 and summary["frames"] > 0
    assert main(args) == EXIT_OK  # resumes: nothing left to do
    assert json.loads((out / "summary.json").read_text())["shards_skipped"] == 4
    scorer = scorers[family]
    store, shards = StoreFrames(ReferenceStore(out), scorer), ShardFrames(str(sample_shards),
                                                                          scorer)
    for video, local in (("asl_book", [0, 2, 3]), ("nasa_13013", [1, 5, 9, 20])):
        a, b = store.frames(video, local, True), shards.frames(video, local, True)
        for x, y in zip(a, b, strict=True):
            assert x.size == y.size and x.extras.keys() == y.extras.keys()
            torch.testing.assert_close(x.tokens.float(), y.tokens.float(), atol=2e-3, rtol=2e-3)
        items = [Item("Which sign is shown?", ["book", "milk", "yes"], a)]
        torch.testing.assert_close(
            scorer.logits_from_vision(items),
            scorer.logits_from_vision([Item(items[0].question, items[0].options, b)]),
            atol=2e-3, rtol=2e-3)
    other = "llava_onevision" if family == "qwen2_vl" else "qwen2_vl"
    with pytest.raises(UserError, match="features of"):
        StoreFrames(ReferenceStore(out), scorers[other])


def test_training_with_lmm_rewards(models, synth_store, tmp_path):
    """The LMM through the same reward interface as the reader: a short GRPO run, and its
    rewards equal the scorer's margins computed by hand."""
    from pipelines.learn import load_corpus, reference

    store = synth_store / "features"
    run = tmp_path / "run"
    assert main(["train", "--store", str(store), "--reward", f"lmm:{models['qwen2_vl']}",
                 "--out", str(run), "--steps", "2", "--questions-per-step", "2", "--group", "2",
                 "--budgets", "3", "--eval-every", "2", "--device", "cpu"]) == EXIT_OK
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["reward"].startswith(f"lmm:{models['qwen2_vl']}:")
    corpus = load_corpus(store, None)
    ref = reference(f"lmm:{models['qwen2_vl']}", corpus, str(synth_store / "shards"))
    assert isinstance(ref, LMMReference)
    q = torch.tensor([0, 5])
    picks = torch.tensor([[0, 7, 3], [2, 4, 6]])
    valid = torch.ones_like(picks, dtype=torch.bool)
    margins = RewardModel(ref).margins(corpus, q, picks, valid)
    video_ids = [corpus.video_ids[int(corpus.video[i])] for i in q]
    by_hand = []
    for row, (i, video) in enumerate(zip(q.tolist(), video_ids, strict=True)):
        frames = ShardFrames(str(synth_store / "shards"), ref.scorer).images(video)
        chosen = [frames[j] for j in sorted(picks[row].tolist())]
        logits = ref.scorer.logits_from_images(
            [Item(corpus.text[i], corpus.options_text[i], chosen)])[0]
        answer = int(corpus.answer[i])
        by_hand.append(logits[answer] - torch.cat([logits[:answer], logits[answer + 1:]]).max())
    torch.testing.assert_close(margins, torch.stack(by_hand), atol=1e-4, rtol=1e-4)


def test_a_batch_that_runs_out_of_memory_is_halved(scorers, frames, monkeypatch):
    """Forwards of more than 2 pairs raise CUDA's out-of-memory error: the scorer halves its
    batch until they fit, and the logits are those of the unbatched path."""
    scorer = scorers["qwen2_vl"]
    items = items_for(frames)
    real = scorer._forward_images
    sizes = []

    def tight(chunk):  # noqa: ANN001, ANN202
        sizes.append(len(chunk))
        if len(chunk) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(chunk)

    alone = [scorer.logits_from_images([it])[0] for it in items]
    monkeypatch.setattr(scorer, "_forward_images", tight)
    got = scorer.logits_from_images(items)
    assert sizes[:3] == [5, 4, 2] and max(sizes[3:]) <= 2
    for row, single in zip(got, alone, strict=True):
        n = torch.isfinite(single).sum()
        torch.testing.assert_close(row[:n], single[:n], atol=2e-5, rtol=1e-5)


def test_the_precompute_flow_writes_what_the_command_writes(prefect_api, models, scorers,
                                                           sample_shards, tmp_path):
    from flows.orchestrate import precompute_flow

    model, scorer = str(models["qwen2_vl"]), scorers["qwen2_vl"]
    plain, flowed = tmp_path / "plain", tmp_path / "flow"
    assert main(["precompute-reference", "--model", model, "--shards", str(sample_shards),
                 "--out", str(plain), "--device", "cpu", "--frames-per-pass", "5"]) == EXIT_OK
    summary = precompute_flow(str(sample_shards), str(flowed), model, "cpu", 5)
    assert summary["shards_written"] == 4
    a, b = StoreFrames(ReferenceStore(flowed), scorer), StoreFrames(ReferenceStore(plain), scorer)
    for video, local in (("asl_book", [0, 2, 3]), ("nasa_13013", [1, 5, 9, 20])):
        for x, y in zip(a.frames(video, local, True), b.frames(video, local, True), strict=True):
            assert x.size == y.size
            assert torch.equal(x.tokens, y.tokens)
    [record] = list((flowed / "flow-runs").glob("*-precompute-reference.json"))
    assert json.loads(record.read_text())["status"] == "completed"
