"""Reference-LMM scoring speed on CPU, one run, against baselines in the same run.

A tiny random Qwen2-VL (built from a config, as in the tests; 16 vision tokens a frame)
scores (question, k-frame subset) pairs drawn from real video frames:

1. **batched** — ``--batch`` pairs per left-padded forward, vision cached once per frame —
   against **one at a time** (one pair per forward, same cache);
2. **vision cache** — the same batched scoring with the vision tower run once per candidate
   frame and reused, against running the model's own full path per batch (vision inside).

Run from the repository root::

    python benchmarks/lmm_scoring.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tiny_lmm import build_llava_onevision, build_qwen2_vl  # noqa: E402

from pipelines.decode import DecodeSettings, VideoDecoder  # noqa: E402
from refocus.lmm import Item, LMMScorer  # noqa: E402


def shared_video() -> Path:
    for base in [ROOT, *ROOT.parents]:
        path = base / "shared" / "data" / "videos" / "big_buck_bunny_0_30.webm"
        if path.exists():
            return path
    raise SystemExit("needs ../shared/data/videos/big_buck_bunny_0_30.webm")


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=32)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--family", choices=["qwen2_vl", "llava_onevision"], default="qwen2_vl")
    p.add_argument("--present", choices=["video", "images"],
                   help="how the frames are shown (default: the family's, video for both)")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    with VideoDecoder(shared_video(), DecodeSettings(fps=2, max_frames=64, size=112)) as video:
        frames = [c.rgb for c in video.candidates()]
    with tempfile.TemporaryDirectory() as tmp:
        build = build_qwen2_vl if args.family == "qwen2_vl" else build_llava_onevision
        scorer = LMMScorer.load(str(build(Path(tmp) / args.family)), device="cpu",
                                batch_size=args.batch, present=args.present)
        g = torch.Generator().manual_seed(0)
        subsets = [sorted(torch.randperm(len(frames), generator=g)[:args.k].tolist())
                   for _ in range(args.pairs)]
        question, options = "What happens in the video?", ["a", "b", "c", "d"]
        image_items = [Item(question, options, [frames[i] for i in s]) for s in subsets]
        cache = scorer.vision(frames)
        cached_items = [Item(question, options, [cache[i] for i in s]) for s in subsets]

        def one_at_a_time() -> None:
            for it in cached_items:
                scorer.logits_from_vision([it])

        rates = {
            "batched, cached": args.pairs / timed(
                lambda: scorer.logits_from_vision(cached_items), args.repeats),
            "one at a time, cached": args.pairs / timed(one_at_a_time, args.repeats),
            "batched, vision per subset": args.pairs / timed(
                lambda: scorer.logits_from_images(image_items), args.repeats),
        }
        vision_once = timed(lambda: scorer.vision(frames), 1)
    print(f"CPU, {torch.get_num_threads()} threads; tiny {args.family}; {args.pairs} pairs of "
          f"k={args.k} frames from {len(frames)} candidates; batch {args.batch}")
    print("\n| scoring | subsets/s |\n|---|---:|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} |")
    batched = rates["batched, cached"]
    print(f"\nbatched vs one at a time: **{batched / rates['one at a time, cached']:.1f}×**; "
          f"vision cache vs vision per subset: "
          f"**{rates['batched, cached'] / rates['batched, vision per subset']:.1f}×** "
          f"(the cache itself: {len(frames)} frames in {vision_once:.2f} s, once)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
