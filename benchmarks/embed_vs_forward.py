"""The embed stage against its ceiling, and the feature store's reads against ``np.load``.

1. **Stage vs ceiling** — same model, same batch size, same frames, in one run:
   * *stage*: ``pipelines.embed.embed`` from WebDataset shards to the Zarr store (JPEG decoding
     and preprocessing in DataLoader workers, model forward, Zarr writes), index off;
   * *ceiling*: the bare model forward over the same frames already decoded and preprocessed
     into tensors in memory (nothing else to do).
   Reported as frames/s each and the ratio stage / ceiling (goal ≥ 0.8 on CPU). The model is
   built with random weights: speed does not depend on their values.
2. **Store read vs np.load** — a synthetic store of ``--read-frames`` L2-normalised float16
   vectors: ``FeatureStore.array`` of the embeddings (and ``load()`` of everything) versus
   ``np.load`` of the same array saved as ``.npy``; best of ``--repeats``, warm page cache
   for both. Goal ≥ 0.5. A plain Zarr read of the same array is shown for reference.

Run from the repository root in the project's virtualenv::

    python benchmarks/embed_vs_forward.py                       # ViT-B-32, bundled samples
    python benchmarks/embed_vs_forward.py --model ViT-B-16 --batch-size 128 --workers 4
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipelines.embed import EmbedSettings, embed  # noqa: E402
from pipelines.encoder import Encoder, load_encoder  # noqa: E402
from pipelines.ingest import IngestSettings, ingest  # noqa: E402
from stores.features import FeatureStore, FeatureWriter, Layout  # noqa: E402
from stores.importers import from_inputs  # noqa: E402
from stores.shards import ShardSet  # noqa: E402


def make_shards(videos: Path, out: Path) -> Path:
    summary = ingest(from_inputs([str(videos)]), out, IngestSettings(shard_size=3))
    if summary.failures:
        raise SystemExit(f"ingest failed: {summary.failures[0]}")
    return out


def preprocessed_frames(shards: Path, encoder: Encoder) -> torch.Tensor:
    shard_set = ShardSet(shards)
    tensors = []
    for video_id, location in shard_set.lookup().items():
        for jpeg in shard_set.read(video_id, location).frames:
            tensors.append(encoder.preprocess(Image.open(io.BytesIO(jpeg)).convert("RGB")))
    return torch.stack(tensors)


def ceiling(encoder: Encoder, pixels: torch.Tensor, batch_size: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        encoder.encode_images(pixels[i:i + batch_size])
    return time.perf_counter() - started


def stage(encoder: Encoder, shards: Path, out: Path, batch_size: int, workers: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    embed(shards, out, encoder, EmbedSettings(batch_size=batch_size, workers=workers,
                                              index=None))
    return time.perf_counter() - started


def read_benchmark(folder: Path, frames: int, dim: int, repeats: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((frames, dim)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    counts = [512] * (frames // 512) + ([frames % 512] if frames % 512 else [])
    layout = Layout([f"v{i}" for i in range(len(counts))], counts)
    identity = {"dim": dim, "model": "synthetic", "weights_sha256": "synthetic"}
    writer = FeatureWriter(folder / "store", layout, identity, {})
    writer.group["frames/embedding"][...] = vectors
    np.save(folder / "embedding.npy", vectors)
    store = FeatureStore(folder / "store")

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return min(times)

    return {
        "npy": best(lambda: np.load(folder / "embedding.npy")),
        "store_embedding": best(lambda: store.array("frames/embedding")),
        "zarr_embedding": best(lambda: store.group["frames/embedding"][...]),
        "store_load_all": best(store.load),
        "bytes": vectors.nbytes,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--videos", type=Path, default=REPO / "samples" / "videos")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read-frames", type=int, default=200_000)
    p.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="refocus-bench-") as tmp:
        root = Path(tmp)
        shards = make_shards(args.videos, root / "shards")
        torch.manual_seed(0)
        encoder = load_encoder(args.model, "random")
        pixels = preprocessed_frames(shards, encoder)
        n = len(pixels)
        encoder.encode_images(pixels[: args.batch_size])  # warm-up
        runs = {"stage": [], "ceiling": []}
        for _ in range(args.repeats):
            runs["ceiling"].append(ceiling(encoder, pixels, args.batch_size))
            runs["stage"].append(stage(encoder, shards, root / "features", args.batch_size,
                                       args.workers))
        best = {k: min(v) for k, v in runs.items()}
        reads = read_benchmark(root, args.read_frames, encoder.dim, args.repeats)

    result = {
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                    "device": str(encoder.device), "threads": torch.get_num_threads()},
        "settings": {"model": args.model, "batch_size": args.batch_size,
                     "workers": args.workers, "frames": n, "repeats": args.repeats},
        "stage_fps": n / best["stage"], "ceiling_fps": n / best["ceiling"],
        "stage_over_ceiling": best["ceiling"] / best["stage"],
        "read": reads,
        "read_ratio_embedding": reads["npy"] / reads["store_embedding"],
        "read_ratio_load_all": reads["npy"] / reads["store_load_all"],
    }
    mb = reads["bytes"] / 2**20
    print(f"model {args.model} (random weights), batch {args.batch_size}, {args.workers} "
          f"DataLoader workers, {n} frames, {encoder.device}, {torch.get_num_threads()} torch "
          f"threads, best of {args.repeats}\n")
    print("| measurement | refocus | baseline | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| embed stage vs bare forward (frames/s) | {result['stage_fps']:.1f} | "
          f"{result['ceiling_fps']:.1f} | **{result['stage_over_ceiling']:.2f}×** |")
    print(f"| read {mb:.0f} MiB of embeddings vs np.load (s) | {reads['store_embedding']:.3f} | "
          f"{reads['npy']:.3f} | **{result['read_ratio_embedding']:.2f}×** |")
    print(f"| FeatureStore.load() of everything vs np.load (s) | {reads['store_load_all']:.3f} "
          f"| {reads['npy']:.3f} | **{result['read_ratio_load_all']:.2f}×** |")
    print(f"| (plain zarr read of the embeddings, for reference) | {reads['zarr_embedding']:.3f} "
          f"| {reads['npy']:.3f} | {reads['npy'] / reads['zarr_embedding']:.2f}× |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
