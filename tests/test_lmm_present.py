"""How the reference LMM is shown its frames (``present``): every family of tests/tiny_lmm.py
in both presentations — the model's native video input with the frames' real times, or images
each after a "frame at t s" marker. Oracles: the model's own processor and full forward on the
same frames and times, the processor's own token counts, the prompt text itself, the README."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_lmm import BUILDERS

from flows.cli import EXIT_OK, EXIT_USAGE, main
from pipelines.decode import DecodeSettings, VideoDecoder
from refocus.lmm import Item, LMMScorer
from refocus.lmm_families import BY_MODEL_TYPE
from refocus.lmm_reference import scorer_identity
from stores.errors import UserError
from stores.reference import ReferenceStore

FAMILIES = list(BUILDERS)
PRESENTATIONS = ("video", "images")
CACHE_TOLERANCE = 2e-5  # float32 on CPU
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def scorers(tiny_lmms) -> dict:
    """(family, presentation) → a scorer, or the one-line refusal of that presentation."""
    out: dict = {}
    for name, path in tiny_lmms.items():
        for present in PRESENTATIONS:
            try:
                out[name, present] = LMMScorer.load(str(path), device="cpu", present=present)
            except UserError as e:
                out[name, present] = e
    return out


@pytest.fixture(scope="module")
def clips(shared_data) -> list[tuple[list[np.ndarray], list[float]]]:
    """Two real videos (NASA 320×180 at 1 fps, an ASL clip 640×480 at 2 fps): frames, times."""
    out = []
    for name, fps in (("nasa_13013.mp4", 1), ("asl_book.mkv", 2)):
        with VideoDecoder(shared_data / "videos" / name,
                          DecodeSettings(fps=fps, max_frames=5, size=112)) as video:
            candidates = list(video.candidates())
        out.append(([c.rgb for c in candidates], [c.time for c in candidates]))
    return out


def items_for(clips, shift: float = 0.0) -> list[Item]:
    """Subsets of one video each (a video is of one frame size), uneven times; ``shift``
    moves every time."""
    (a, ta), (b, tb) = clips

    def item(question, options, frames, times, at):  # noqa: ANN001, ANN202
        return Item(question, options, [frames[i] for i in at],
                    [times[i] + shift for i in at])

    return [item("What colour was the circle?", ["red", "green", "blue"], a, ta, [0, 1, 3]),
            item("How many shapes appeared?", ["one", "two"], a, ta, [1, 2, 3, 4]),
            item("Which sign is shown?", ["book", "milk", "yes", "no"], b, tb, [0, 2, 4]),
            item("What appeared first?", ["a square", "a cross"], b, tb, [3])]


def cached(scorer: LMMScorer, clips, items: list[Item]) -> list[Item]:
    """Vision once over each whole video; each subset assembled from that cache."""
    out = []
    views = {}
    for frames, _ in clips:
        for f, v in zip(frames, scorer.vision(frames, multi=True), strict=True):
            views[id(f)] = v
    for it in items:
        frames = [views[id(f)] for f in it.frames] if scorer.as_multi(len(it.frames)) \
            else scorer.vision(list(it.frames), multi=False)
        out.append(Item(it.question, it.options, frames, it.times))
    return out


def scorer_or_refusal(scorers, family: str, present: str) -> LMMScorer | None:
    got = scorers[family, present]
    if isinstance(got, UserError):  # a refused presentation: one line, naming the fallback
        message = str(got)
        assert present == "video" and BY_MODEL_TYPE[family].video is None
        assert "\n" not in message and "no native video input" in message
        assert "use --present images" in message
        return None
    return got


@pytest.mark.parametrize("present", PRESENTATIONS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_the_models_own_forward(scorers, clips, family, present):
    """Vision once per video; each subset from the cache == the model's own processor and
    forward on the same frames and times, within ``CACHE_TOLERANCE``; other frames move the
    logits far more than that (so a cache that mixed frames up would show)."""
    scorer = scorer_or_refusal(scorers, family, present)
    if scorer is None:
        return
    items = items_for(clips)
    full = scorer.logits_from_images(items)
    got = scorer.logits_from_vision(cached(scorer, clips, items))
    assert torch.equal(torch.isfinite(got), torch.isfinite(full))
    torch.testing.assert_close(got, full, atol=CACHE_TOLERANCE, rtol=0)
    (a, ta), (b, tb) = clips
    swapped = [Item(items[0].question, items[0].options, b[:3], tb[:3]),
               Item(items[2].question, items[2].options, a[:3], ta[:3])]
    moved = (scorer.logits_from_images(swapped) - full[[0, 2]]).nan_to_num(0, 0, 0).abs()
    assert (moved.amax(1) > 1000 * CACHE_TOLERANCE).all(), moved


def test_onevision_video_pools_each_frame_to_fewer_tokens_than_an_image(scorers, clips):
    """LLaVA-OneVision: a video frame's tokens (2×2 pooled) are fewer than an image's, and as
    many as its processor counts for a video ((tokens − 1 newline) / frames)."""
    video, images = scorers["llava_onevision", "video"], scorers["llava_onevision", "images"]
    frames, _ = clips[0]
    per_video = [v.tokens.shape[0] for v in video.vision(frames)]
    per_image = [v.tokens.shape[0] for v in images.vision(frames)]
    h, w = frames[0].shape[:2]
    counted = video.processor._get_num_multimodal_tokens(
        video_sizes=[(len(frames), h, w)]).num_video_tokens[0]
    assert per_video == [(counted - 1) // len(frames)] * len(frames)
    assert (counted - 1) % len(frames) == 0
    # an image of several: its patches and a newline row, as the processor counts them
    assert per_image == [images.processor.num_image_tokens + 1] * len(frames)
    assert max(per_video) < min(per_image)
    assert per_video[0] * 4 == images.processor.num_image_tokens  # 4×4 patches pooled to 2×2


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_times_move_the_logits_in_video_mode(scorers, clips, family):
    """The same frames at other times: other logits (by far more than the tolerance), in the
    full forward and alike from the cache."""
    scorer = scorers[family, "video"]
    # stretched: the times spread twice as far (Qwen2.5-VL reads the step between frames)
    items = items_for(clips)[:3]
    later = [Item(it.question, it.options, it.frames, [2 * t + 30 for t in it.seconds()])
             for it in items]
    full, moved = scorer.logits_from_images(items), scorer.logits_from_images(later)
    change = (moved - full).nan_to_num(0, 0, 0).abs().amax(1)
    assert (change > 1000 * CACHE_TOLERANCE).all(), change
    torch.testing.assert_close(scorer.logits_from_vision(cached(scorer, clips, later)), moved,
                               atol=CACHE_TOLERANCE, rtol=0)


def test_qwen3_vl_writes_each_frames_real_time_before_it(scorers, clips):
    """Qwen3-VL's processor writes "<t seconds>" before each frame: the frames' own times,
    each frame once (repeated to fill its temporal patch, never merged with the next)."""
    scorer = scorers["qwen3_vl", "video"]
    item = items_for(clips, shift=10.0)[0]
    inputs = scorer._process_video([item], blank=False)
    text = scorer.tokenizer.decode(inputs["input_ids"][0])
    stamps = [float(x) for x in re.findall(r"<(\d+\.\d) seconds>", text)]
    assert stamps == [round(t, 1) for t in item.seconds()]
    assert inputs["video_grid_thw"][0, 0].item() == len(item.frames)


def test_qwen2_5_vl_steps_its_time_positions_by_the_frames_mean_gap(scorers, clips):
    scorer = scorers["qwen2_5_vl", "video"]
    item = items_for(clips)[1]
    times = item.seconds()
    inputs = scorer._process_video([item], blank=False)
    gap = (times[-1] - times[0]) / (len(times) - 1)
    assert inputs["second_per_grid_ts"].tolist() == pytest.approx([gap])
    assert inputs["video_grid_thw"][0, 0].item() == len(item.frames)


@pytest.mark.parametrize("family", FAMILIES)
def test_images_mode_marks_each_frame_with_its_time(scorers, clips, family):
    """The prompt holds "frame at t s" before each frame's image, in order, at the frames' own
    times — in the text the model's own processor reads."""
    scorer = scorers[family, "images"]
    item = items_for(clips, shift=12.46)[2]
    text = scorer.chat(item.question, item.options, item.seconds())
    markers = [f"frame at {t:.1f} s" for t in item.seconds()]
    assert [m for m in re.findall(r"frame at \d+\.\d s", text)] == markers
    positions = [text.index(m) for m in markers]
    assert positions == sorted(positions)
    assert "frame at 12.5 s" in text  # 0.0 + 12.46, as a user reads it
    ids = scorer._process([text], [list(item.frames)])["input_ids"][0]
    assert re.findall(r"frame at \d+\.\d s", scorer.tokenizer.decode(ids)) == markers


def test_the_default_presentation_is_what_the_readme_says(scorers, tiny_lmms):
    """README's family table names each family's default presentation; a scorer loaded with
    no ``present`` uses it."""
    table = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        label = cells[0].split(" (")[0]  # "InternVL (InternVL3 / 3.5 ports)"
        if len(cells) > 2 and label in {f.label for f in BY_MODEL_TYPE.values()}:
            table[label] = cells
    header = next(line for line in README.read_text().splitlines()
                  if line.startswith("| family"))
    column = [c.strip() for c in header.strip().strip("|").split("|")].index(
        "default presentation")
    for name, path in tiny_lmms.items():
        family = BY_MODEL_TYPE[name]
        scorer = LMMScorer.load(str(path), device="cpu")
        assert scorer.present == table[family.label][column] == family.present, name
    assert {BY_MODEL_TYPE[n].present for n in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                                               "llava_onevision")} == {"video"}


def test_the_presentation_is_part_of_the_reference_identity(scorers):
    video, images = scorers["qwen2_5_vl", "video"], scorers["qwen2_5_vl", "images"]
    assert scorer_identity(video) != scorer_identity(images)
    assert ":video:" in scorer_identity(video) and ":images:" in scorer_identity(images)


def test_a_bad_presentation_is_one_line(tiny_lmms):
    with pytest.raises(UserError, match=r"^--present 'movie': choose from video, images$"):
        LMMScorer.load(str(tiny_lmms["qwen2_vl"]), device="cpu", present="movie")


def test_precompute_records_the_presentation_and_the_cli_refuses_a_missing_one(
        tiny_lmms, scorers, sample_shards, tmp_path, capsys):
    out = tmp_path / "reference"
    base = ["precompute-reference", "--model", str(tiny_lmms["qwen2_vl"]), "--shards",
            str(sample_shards), "--device", "cpu", "--frames-per-pass", "8"]
    assert main([*base, "--out", str(out), "--present", "images"]) == EXIT_OK
    identity = ReferenceStore(out).identity()
    assert identity["present"] == "images"
    assert identity["model_id"] == scorer_identity(scorers["qwen2_vl", "images"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["frames"] > 0
    from refocus.lmm_reference import StoreFrames

    with pytest.raises(UserError):  # features of images, asked for by a video scorer
        StoreFrames(ReferenceStore(out), scorers["qwen2_vl", "video"])
    capsys.readouterr()
    llava = ["precompute-reference", "--model", str(tiny_lmms["llava"]), "--shards",
             str(sample_shards), "--device", "cpu", "--present", "video",
             "--out", str(tmp_path / "llava")]
    assert main(llava) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no native video input" in err[0], err
