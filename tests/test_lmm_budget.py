"""refocus lmm-budget: parameter counts on the meta device against a count by hand from the
config, tokens per frame from the real processors against the published formulas, and the
command offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import lmm_budget as lb

REPO = Path(__file__).resolve().parents[1]


def qwen2_5_vl_7b_by_hand() -> int:
    """Qwen2.5-VL-7B's parameters from its config.json numbers alone (an independent count:
    every weight and bias of the published architecture written out)."""
    vocab, h, inter, layers, heads, kv = 152064, 3584, 18944, 28, 28, 4
    d = h // heads
    attention = (h * h + h) + 2 * (h * kv * d + kv * d) + h * h  # q, k, v with bias; o without
    mlp = 3 * h * inter  # gate, up, down; no biases
    text = vocab * h + layers * (attention + mlp + 2 * h) + h + vocab * h  # + final norm, head
    vh, vinter, depth, patch, temporal, out, merge = 1280, 3420, 32, 14, 2, 3584, 2
    patch_embed = 3 * temporal * patch * patch * vh  # Conv3d, no bias
    block = (2 * vh  # two RMSNorms
             + vh * 3 * vh + 3 * vh + vh * vh + vh  # fused qkv and proj, with biases
             + 2 * (vh * vinter + vinter) + vinter * vh + vh)  # gated MLP with biases
    merged = vh * merge * merge
    merger = vh + merged * merged + merged + merged * out + out  # RMSNorm, 2-layer MLP
    return text + patch_embed + depth * block + merger


def test_meta_device_count_equals_the_count_by_hand():
    counted = lb.count_parameters(lb.MODELS["qwen2.5-vl-7b"])
    assert counted.total == qwen2_5_vl_7b_by_hand()  # exact: same architecture, same numbers
    assert counted.bytes == 2 * counted.total


# Totals the model cards publish (billions, as the hub shows them, rounded to 0.01 B)
PUBLISHED = {"qwen2.5-vl-7b": 8.29, "qwen3-vl-8b": 8.77, "internvl3-2b": 2.09,
             "llava-onevision-7b": 8.03}


@pytest.mark.parametrize("key", list(lb.MODELS))
def test_parameter_totals_match_the_published_sizes(key):
    counted = lb.count_parameters(lb.MODELS[key])
    assert counted.total / 1e9 == pytest.approx(PUBLISHED[key], abs=0.006)
    assert 0 < counted.vision < counted.language


def vision_tokens(key: str, present: str, frames: int, size: tuple[int, int]) -> lb.Prompt:
    spec = lb.MODELS[key]
    return lb.prompt_tokens(spec, spec.processor(), present, frames, size)


def test_qwen2_5_vl_frame_tokens_follow_the_published_formula():
    # H, W multiples of 28: (H/28) × (W/28) merged tokens per image; as video refocus repeats
    # each frame to fill the temporal patch of 2, so a frame costs what one image does
    height, width = 392, 672
    per_image = (height // 28) * (width // 28)
    assert vision_tokens("qwen2.5-vl-7b", "images", 3, (height, width)).vision == 3 * per_image
    assert vision_tokens("qwen2.5-vl-7b", "video", 4, (height, width)).vision == 4 * per_image


def test_qwen3_vl_frame_tokens_follow_the_published_formula():
    height, width = 384, 672  # multiples of 32 (patch 16 × merge 2)
    per_image = (height // 32) * (width // 32)
    assert vision_tokens("qwen3-vl-8b", "images", 2, (height, width)).vision == 2 * per_image
    video = vision_tokens("qwen3-vl-8b", "video", 4, (height, width))
    assert video.vision == 4 * per_image
    # plus a "<t seconds>" stamp and vision start/end per frame
    assert video.tokens - video.text > video.vision + 4 * 2


def test_llava_onevision_and_internvl_frame_tokens():
    size = (384, 683)
    # video: each frame pooled from 27 × 27 to 14 × 14 patches, one newline for the video
    assert vision_tokens("llava-onevision-7b", "video", 3, size).vision == 3 * 196 + 1
    # several images: the 729-token base view plus a newline each; a lone one is tiled
    assert vision_tokens("llava-onevision-7b", "images", 2, size).vision == 2 * 730
    assert vision_tokens("llava-onevision-7b", "images", 1, size).vision > 730
    # InternVL: 256 tokens per 448 px tile; a square frame is one tile, a video frame too
    assert vision_tokens("internvl3-2b", "images", 2, (448, 448)).vision == 2 * 256
    assert vision_tokens("internvl3-2b", "video", 3, size).vision == 3 * 256
    # a 16:9 frame as refocus gives it (one tile, crop_to_patches off): 256 tokens, where the
    # processor's default tiling would give 2 × 1 tiles plus a thumbnail
    assert vision_tokens("internvl3-2b", "images", 1, size).vision == 256
    spec = lb.MODELS["internvl3-2b"]
    tiled = spec.processor()(text=[lb.chat(spec.image_slot)], images=[lb.blank_frames(1, size)],
                             return_tensors="pt")["input_ids"][0]
    context = spec.processor().tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert int((tiled == context).sum()) == 3 * 256


def test_memory_formulas_by_hand():
    shape = lb.text_shape(lb.MODELS["qwen2.5-vl-7b"])
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (28, 4, 128)
    assert lb.kv_bytes(shape, 1000) == 28 * 2 * 4 * 128 * 1000 * 2
    assert lb.activation_bytes(shape, 1000) == 1000 * (3 * 3584 + 3 * 18944) * 2
    # 0.9 × 100 GiB − 10 GiB weights − 5 GiB cache = 75 GiB of room, 1 GiB a subset
    gib = 1 << 30
    assert lb.recommended_batch(100 * gib, 10 * gib, 5 * gib, gib) == 75
    assert lb.recommended_batch(10 * gib, 10 * gib, 0, gib) == 0


@pytest.mark.slow
def test_command_prints_every_model_in_both_presentations_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "flows.cli", "lmm-budget", "--k", "2",
                           "--markdown"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(rows) == 2 * len(lb.MODELS)  # one per model and presentation at k = 2
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert [c[0] for c in cells[::2]] == list(lb.MODELS)
    assert [c[2] for c in cells] == list(lb.PRESENTATIONS) * len(lb.MODELS)
    assert all(int(c[8]) > 0 and int(c[-1]) > 0 for c in cells)  # prompt tokens, batch
