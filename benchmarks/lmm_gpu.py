"""Reference-LMM scoring at real size on a GPU: random bf16 weights, the real configs.

InternVL3-2B and Qwen2.5-VL-7B are built from the published configs in
``pipelines/lmm_budget.py`` (their real transformers classes, random weights, bf16, on CUDA)
with processors made of the real processor classes and a small word-level tokenizer, so
nothing is downloaded. ``refocus.lmm.LMMScorer`` then scores (question, k-frame subset) pairs
drawn from random 384 × 683 frames, at k = 8 and 32:

* **cached** (``vision`` once per candidate frame, then ``logits_from_vision``: the language
  model alone per subset) against **full** (``logits_from_images``: the model's own forward,
  vision included, per subset);
* **batched** (``--batch`` subsets per forward) against **one at a time**.

Each figure: subsets per second, peak GPU memory (``torch.cuda.max_memory_allocated``) and
the share of the GPU's dense bf16 peak, from a FLOPs estimate of 2 × parameters × tokens per
forward (decoder parameters × prompt tokens; the full path adds vision parameters × the
vision patches, 4 per merged token). A family that refocus refuses (``UserError``) is
recorded as "unsupported (reason)"; any other error as "failed (reason)".

``--smoke`` runs the same code on CPU with tiny configs (a Qwen2-VL of 2 layers of width 64 by
default) in seconds: the test suite checks its JSON. Run from the repository root::

    python benchmarks/lmm_gpu.py --out bench-out              # CUDA, real size
    python benchmarks/lmm_gpu.py --smoke --out /tmp/smoke     # CPU, tiny

It writes ``lmm_gpu.json`` and ``lmm_gpu.md`` into ``--out`` and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipelines import lmm_budget as lb  # noqa: E402
from refocus.lmm import Item, LMMScorer  # noqa: E402
from stores.errors import UserError  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, by device-name substring
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
PATCHES_PER_TOKEN = 4  # both families merge 2 × 2 vision patches into one LM token
QUESTION, OPTIONS = "What happens in the video?", ["a", "b", "c", "d", "e"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}@IMAGE@"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class Built:
    model: Any
    processor: Any
    frame_size: tuple[int, int]


def with_template(processor: Any, image_slot: str) -> Any:
    processor.chat_template = CHAT_TEMPLATE.replace("@IMAGE@", image_slot)
    return processor


def point_at_tokenizer(config: Any, processor: Any) -> Any:
    """The config's special-token ids set to the small tokenizer's (the sizes stay real)."""
    tok = processor.tokenizer
    names = {"image_token_id": processor.image_token,
             "video_token_id": getattr(processor, "video_token", None),
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
    for attr, token in names.items():
        if token is not None and getattr(config, attr, None) is not None:
            setattr(config, attr, tok.convert_tokens_to_ids(token))
    return config


def instantiate(class_name: str, config: Any, device: torch.device,
                dtype: torch.dtype) -> Any:
    """The real class with random weights, created in ``dtype`` directly on ``device``."""
    import transformers

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return getattr(transformers, class_name)(config).eval()
    finally:
        torch.set_default_dtype(before)


def build_real(key: str) -> Callable[[torch.device, torch.dtype], Built]:
    def build(device: torch.device, dtype: torch.dtype) -> Built:
        spec = lb.MODELS[key]
        processor = with_template(spec.processor(), spec.image_slot)
        config = point_at_tokenizer(spec.config(), processor)
        return Built(instantiate(spec.model_class, config, device, dtype), processor,
                     lb.FRAME_SIZE)
    return build


def tiny_qwen2_vl(device: torch.device, dtype: torch.dtype) -> Built:
    """Qwen2-VL with 2 text layers of width 64 and a 2-block vision tower; 112 px frames give
    16 tokens each (the size tests/tiny_lmm.py uses)."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    processor = with_template(Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        video_processor=Qwen2VLVideoProcessor(), tokenizer=lb.word_tokenizer(lb.QWEN_SPECIALS)),
        lb.QWEN_IMAGE)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=0, video_token_id=0, vision_start_token_id=0, vision_end_token_id=0)
    config = point_at_tokenizer(config, processor)
    return Built(instantiate("Qwen2VLForConditionalGeneration", config, device, dtype),
                 processor, (112, 112))


FAMILIES: dict[str, Callable[[torch.device, torch.dtype], Built]] = {
    "internvl3-2b": build_real("internvl3-2b"),
    "qwen2.5-vl-7b": build_real("qwen2.5-vl-7b"),
    "qwen2-vl-tiny": tiny_qwen2_vl,
}
REAL, SMOKE = ["internvl3-2b", "qwen2.5-vl-7b"], ["qwen2-vl-tiny"]


# --------------------------------------------------------------------------- measuring
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, int | None]:
    """Seconds per call after one warm-up call, and the peak memory allocated meanwhile."""
    fn()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return seconds, peak


def bf16_peak(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, next((v for k, v in BF16_PEAK.items() if k in name), None)


def parameter_split(model: Any) -> tuple[int, int]:
    """(decoder parameters without the embedding table, vision tower + projector)."""
    language = model.model.language_model
    embed = language.get_input_embeddings().weight.numel()
    decoder = sum(p.numel() for p in language.parameters()) - embed
    total = sum(p.numel() for p in model.parameters())
    return decoder, total - decoder - embed - (
        0 if model.lm_head.weight is language.get_input_embeddings().weight
        else model.lm_head.weight.numel())


def frames_for(count: int, size: tuple[int, int], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def prompt_length(scorer: LMMScorer, frames: Sequence[np.ndarray]) -> tuple[int, int]:
    """(prompt tokens, vision tokens) of one subset, from the processor itself."""
    times = [float(i) for i in range(len(frames))]  # one frame a second
    out = scorer.processor(text=[scorer.chat(QUESTION, OPTIONS, times)],
                           images=[list(frames)], return_tensors="pt")
    ids = out["input_ids"][0]
    return int(ids.numel()), int((ids == scorer.image_token_id).sum())


def measure_k(scorer: LMMScorer, frames: list[np.ndarray], cache: list[Any], k: int,
              args: argparse.Namespace, device: torch.device, params: tuple[int, int],
              peak: float | None) -> list[dict[str, Any]]:
    pairs, batch = args.pairs, args.batch
    g = torch.Generator().manual_seed(k)
    subsets = [sorted(torch.randperm(len(frames), generator=g)[:k].tolist())
               for _ in range(pairs)]
    cached = [Item(QUESTION, OPTIONS, [cache[i] for i in s]) for s in subsets]
    images = [Item(QUESTION, OPTIONS, [frames[i] for i in s]) for s in subsets]
    tokens, vision_tokens = prompt_length(scorer, frames[:k])
    decoder, vision = params
    lm_flops = 2 * decoder * tokens * pairs
    full_flops = lm_flops + 2 * vision * vision_tokens * PATCHES_PER_TOKEN * pairs

    def run(score: Callable[[Sequence[Item]], torch.Tensor], items: list[Item],
            size: int) -> Callable[[], None]:
        def go() -> None:
            scorer.batch_size = size
            for start in range(0, len(items), size):
                score(items[start:start + size])
        return go

    rows = []
    for path, score, items, flops in [("cached", scorer.logits_from_vision, cached, lm_flops),
                                      ("full", scorer.logits_from_images, images, full_flops)]:
        for mode, size in [("batched", batch), ("one at a time", 1)]:
            seconds, memory = timed(run(score, items, size), args.repeats, device)
            rows.append({
                "k": k, "path": path, "mode": mode, "batch": size, "pairs": pairs,
                "prompt_tokens": tokens, "vision_tokens": vision_tokens,
                "subsets_per_s": pairs / seconds, "seconds": seconds,
                "peak_memory_bytes": memory, "flops": flops,
                "bf16_peak_share": flops / seconds / peak if peak else None})
    return rows


def measure_family(name: str, build: Callable[[torch.device, torch.dtype], Built],
                   args: argparse.Namespace, device: torch.device,
                   dtype: torch.dtype) -> dict[str, Any]:
    """One family's figures, or its status when refocus refuses it (or it fails)."""
    record: dict[str, Any] = {"family": name, "status": "ok", "rows": []}
    try:
        built = build(device, dtype)
        # frames as images (the benchmark's processors carry an images-only chat template)
        scorer = LMMScorer(built.model, built.processor, name, batch_size=args.batch,
                           present="images")
        params = parameter_split(built.model)
        record.update(decoder_parameters=params[0], vision_parameters=params[1],
                      frame_size=list(built.frame_size))
        frames = frames_for(args.candidates, built.frame_size, args.seed)
        started = time.perf_counter()
        cache = scorer.vision(frames)
        synchronize(device)
        record["vision_frames_per_s"] = len(frames) / (time.perf_counter() - started)
        _, peak = bf16_peak(device)
        for k in args.k:
            record["rows"] += measure_k(scorer, frames, cache, k, args, device, params, peak)
    except UserError as e:
        record["status"] = f"unsupported ({e})"
    except Exception as e:  # noqa: BLE001  (one family's failure is a result, not a crash)
        record["status"] = f"failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return record


# --------------------------------------------------------------------------- output
def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['device']}, {result['dtype']}; {result['pairs']} subsets per figure, "
             f"batch {result['batch']}, {result['candidates']} candidate frames", "",
             "| family | k | path | mode | subsets/s | prompt tokens | peak GB | bf16 peak |",
             "|---|---:|---|---|---:|---:|---:|---:|"]
    for fam in result["families"]:
        if fam["status"] != "ok":
            lines.append(f"| {fam['family']} | | {fam['status']} | | | | | |")
        for r in fam["rows"]:
            memory = f"{r['peak_memory_bytes'] / 1e9:.1f}" if r["peak_memory_bytes"] else "–"
            share = f"{100 * r['bf16_peak_share']:.0f}%" if r["bf16_peak_share"] else "–"
            lines.append(f"| {fam['family']} | {r['k']} | {r['path']} | {r['mode']} | "
                         f"{r['subsets_per_s']:.2f} | {r['prompt_tokens']} | {memory} | "
                         f"{share} |")
    return "\n".join(lines)


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny configs, a few seconds")
    p.add_argument("--family", action="append", choices=list(FAMILIES),
                   help=f"(repeatable; default: {', '.join(REAL)}; smoke: {', '.join(SMOKE)})")
    p.add_argument("--k", type=int, action="append",
                   help="frames per subset (repeatable; default 8 and 32; smoke 2 and 4)")
    p.add_argument("--pairs", type=int, help="subsets per figure (default 32; smoke 4)")
    p.add_argument("--batch", type=int, help="subsets per forward (default 16; smoke 2)")
    p.add_argument("--candidates", type=int, help="candidate frames (default 64; smoke 8)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("lmm-gpu-bench"))
    args = p.parse_args(argv)
    families, ks, pairs, batch, candidates = \
        (SMOKE, [2, 4], 4, 2, 8) if args.smoke else (REAL, [8, 32], 32, 16, 64)
    args.family = args.family or families
    args.k = args.k or ks
    args.pairs = args.pairs or pairs
    args.batch = args.batch or batch
    args.candidates = max(args.candidates or candidates, max(args.k))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
    else:
        print("lmm_gpu: the real-size benchmark needs a CUDA GPU; --smoke runs on CPU",
              file=sys.stderr)
        return 2
    name, peak = bf16_peak(device)
    result = {"device": name, "dtype": str(dtype).removeprefix("torch."),
              "bf16_peak_flops": peak, "smoke": args.smoke, "pairs": args.pairs,
              "batch": args.batch, "candidates": args.candidates, "k": args.k,
              "families": [measure_family(f, FAMILIES[f], args, device, dtype)
                           for f in args.family]}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lmm_gpu.json").write_text(json.dumps(result, indent=1))
    table = markdown(result)
    (args.out / "lmm_gpu.md").write_text(table + "\n")
    print(table)
    return 1 if any(f["status"].startswith("failed") for f in result["families"]) else 0


if __name__ == "__main__":
    sys.exit(main())
