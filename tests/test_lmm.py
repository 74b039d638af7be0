"""The LMM reference: a tiny random model of every supported family (Qwen2-VL, Qwen2.5-VL,
Qwen3-VL, LLaVA-OneVision, LLaVA, InternVL, Idefics3, SmolVLM, Gemma3) built from its real
transformers classes (a tokenizer trained here, weights drawn at std 0.2 so the frames move
the logits), fed frames of the real videos. Oracles: one-at-a-time forwards, the model's own
processor-and-forward path, the raw logits at the letters' token ids, float32 for bf16."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny_lmm import BUILDERS, build_qwen2_vl

from flows.cli import EXIT_OK, main
from pipelines.decode import DecodeSettings, VideoDecoder
from refocus.lmm import Item, LMMScorer, letter_token_ids, question_prompt
from refocus.lmm_reference import LMMReference, ShardFrames, StoreFrames
from refocus.rewards import RewardModel
from stores.errors import UserError
from stores.reference import ReferenceStore

FAMILIES = list(BUILDERS)
# InternVL with its processor's tiling on (off by default for frames): several tiles a frame
SCORED = [*FAMILIES, "internvl_tiled"]
CACHE_TOLERANCE = 2e-5  # float32 on CPU: cached and full differ at most in summation order


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def scorers(tiny_lmms) -> dict:
    # the images presentation (its frames mix sizes); both are in tests/test_lmm_present.py
    out = {name: LMMScorer.load(str(path), device="cpu", batch_size=8, present="images")
           for name, path in tiny_lmms.items()}
    tiled = LMMScorer.load(str(tiny_lmms["internvl"]), device="cpu", batch_size=8,
                           present="images")
    tiled.family = replace(tiled.family, frame_kwargs={})
    out["internvl_tiled"] = tiled
    return out


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


@pytest.mark.parametrize("family", SCORED)
def test_batched_margins_equal_one_at_a_time(scorers, frames, family):
    scorer = scorers[family]
    items = items_for(frames)
    batched = scorer.logits_from_images(items)
    alone = [scorer.logits_from_images([it])[0] for it in items]
    for row, single in zip(batched, alone, strict=True):
        n = torch.isfinite(single).sum()
        assert torch.isinf(row[n:]).all() and torch.isfinite(row[:n]).all()
        torch.testing.assert_close(row[:n], single[:n], atol=2e-5, rtol=1e-5)


def cached_items(scorer: LMMScorer, frames: list, items: list[Item]) -> list[Item]:
    """The items with their frames as vision features computed once over all frames."""
    cache = scorer.vision(frames, multi=True)
    index = {id(f): i for i, f in enumerate(frames)}
    out = []
    for it in items:
        if scorer.as_multi(len(it.frames)):
            views = [cache[index[id(f)]] for f in it.frames]
        else:  # a lone frame, as the model reads one image alone
            views = scorer.vision(list(it.frames), multi=False)
        out.append(Item(it.question, it.options, views))
    return out


def unused(frames: list, used: list) -> list:
    """As many frames as ``used`` holds, none of them in it (from the end of the list)."""
    return [f for f in reversed(frames) if not any(f is u for u in used)][:len(used)][::-1]


@pytest.mark.parametrize("family", SCORED)
def test_vision_cache_gives_the_same_logits(scorers, frames, family):
    """Vision run once over all frames; each subset assembled from the cache equals the
    model's own full forward within ``CACHE_TOLERANCE``; and the frames matter: the same
    question over other frames moves the logits by far more than that tolerance, so a cache
    that mixed up or dropped frames (or their deepstack features or token types) would show."""
    scorer = scorers[family]
    items = items_for(frames)
    full = scorer.logits_from_images(items)
    torch.testing.assert_close(scorer.logits_from_vision(cached_items(scorer, frames, items)),
                               full, atol=CACHE_TOLERANCE, rtol=0)
    other = [Item(it.question, it.options, unused(frames, it.frames)) for it in items[:3]]
    moved = (scorer.logits_from_images(other) - full[:3]).nan_to_num(0, 0, 0).abs().amax(1)
    assert (moved > 1000 * CACHE_TOLERANCE).all(), moved


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
        [{"role": "user", "content": [
            part for t in (0, 1, 2) for part in ({"type": "text", "text": f"frame at {t}.0 s: "},
                                                 {"type": "image"})] + [
            {"type": "text", "text": question_prompt(item.question, item.options)}]}],
        add_generation_prompt=True, tokenize=False)
    assert text.rstrip().endswith("assistant")
    assert "A. red\nB. green\nC. blue\nD. yellow" in text
    inputs = scorer.processor(text=[text], images=[list(item.frames)], return_tensors="pt",
                              **scorer.family.frame_kwargs)
    with torch.no_grad():
        vocab = scorer.model(**inputs).logits[0, -1]
    expected = torch.stack([torch.logsumexp(vocab[torch.tensor(
        [i for i in (tok.convert_tokens_to_ids(c), tok.convert_tokens_to_ids("Ġ" + c))
         if i is not None and i != tok.unk_token_id])], 0) for c in "ABCD"])
    torch.testing.assert_close(scorer.logits_from_images([item])[0], expected,
                               atol=1e-5, rtol=1e-5)


BF16_TOLERANCE = 0.25  # absolute; measured at most 0.19 (bf16 keeps 8 bits of mantissa)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_under_cpu_autocast_stays_near_float32(tiny_lmms, scorers, frames, family):
    """The model in bf16 on the CPU under bf16 autocast (as on CUDA), cached path, against the
    float32 full forward: within ``BF16_TOLERANCE``, and the same answer where float32 is
    sure of it (its margin over the runner-up is beyond twice the tolerance)."""
    scorer = LMMScorer.load(str(tiny_lmms[family]), device="cpu", dtype=torch.bfloat16,
                            present="images")
    assert scorer.model.dtype == torch.bfloat16
    items = items_for(frames)
    low = scorer.logits_from_vision(cached_items(scorer, frames, items))
    high = scorers[family].logits_from_images(items)
    assert torch.equal(torch.isfinite(low), torch.isfinite(high))
    finite = torch.isfinite(high)
    assert (low[finite] - high[finite]).abs().max() <= BF16_TOLERANCE
    for row_low, row_high in zip(low, high, strict=True):
        top = row_high[torch.isfinite(row_high)].topk(2).values
        if top[0] - top[1] > 2 * BF16_TOLERANCE:
            assert row_low.argmax() == row_high.argmax()


def test_a_tokenizer_whose_letters_are_not_single_tokens_is_refused(tmp_path):
    folder = build_qwen2_vl(tmp_path / "split", split_letters=True)
    with pytest.raises(UserError, match="letter 'A' is 2 tokens"):
        LMMScorer.load(str(folder), device="cpu")


def test_a_prompt_longer_than_the_context_is_a_clear_error(tmp_path, frames):
    scorer = LMMScorer.load(str(build_qwen2_vl(tmp_path / "short", max_positions=64)),
                            device="cpu", present="images")
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


@pytest.mark.parametrize(("config", "architecture", "model_type"), [
    ("Qwen2Config", "Qwen2ForCausalLM", "qwen2"),  # text only
    ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration", "paligemma"),  # image-text
])
def test_an_unsupported_family_is_refused_at_load_in_one_line(tmp_path, config, architecture,
                                                              model_type):
    """Only the configuration is there: the refusal comes before any weights are read."""
    import transformers

    folder = tmp_path / model_type
    getattr(transformers, config)(architectures=[architecture]).save_pretrained(folder)
    with pytest.raises(UserError) as e:
        LMMScorer.load(str(folder), device="cpu")
    message = str(e.value)
    assert "\n" not in message
    assert message == (f"{folder}: {architecture} (model_type {model_type!r}) is not a "
                       "reference family refocus can score; supported: Qwen2-VL, Qwen2.5-VL, "
                       "Qwen3-VL, LLaVA-OneVision, LLaVA, InternVL, SmolVLM, Idefics3, Gemma3")


@pytest.mark.parametrize("family", FAMILIES)
def test_precomputed_features_score_like_features_from_the_shards(
        tiny_lmms, scorers, sample_shards, tmp_path, family, capsys):
    out = tmp_path / "reference"
    args = ["precompute-reference", "--model", str(tiny_lmms[family]), "--shards",
            str(sample_shards), "--out", str(out), "--device", "cpu", "--frames-per-pass", "5",
            "--present", "images"]
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
    other = FAMILIES[(FAMILIES.index(family) + 1) % len(FAMILIES)]
    with pytest.raises(UserError, match="features of"):
        StoreFrames(ReferenceStore(out), scorers[other])


@pytest.mark.slow
def test_training_with_lmm_rewards(tiny_lmms, synth_store, tmp_path):
    """The LMM through the same reward interface as the reader: a short GRPO run, and its
    rewards equal the scorer's margins computed by hand."""
    from pipelines.learn import load_corpus, reference

    store = synth_store / "features"
    run = tmp_path / "run"
    assert main(["train", "--store", str(store), "--reward", f"lmm:{tiny_lmms['qwen2_vl']}",
                 "--out", str(run), "--steps", "2", "--questions-per-step", "2", "--group", "2",
                 "--budgets", "3", "--eval-every", "2", "--device", "cpu"]) == EXIT_OK
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["reward"].startswith(f"lmm:{tiny_lmms['qwen2_vl']}:")
    corpus = load_corpus(store, None)
    ref = reference(f"lmm:{tiny_lmms['qwen2_vl']}", corpus, str(synth_store / "shards"))
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


def test_the_precompute_flow_writes_what_the_command_writes(prefect_api, tiny_lmms, scorers,
                                                           sample_shards, tmp_path):
    from flows.orchestrate import precompute_flow

    model = str(tiny_lmms["qwen2_vl"])
    scorer = LMMScorer.load(model, device="cpu")  # the family's default, as the flow runs
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
