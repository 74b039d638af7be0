"""Bounded memory on the reference-LMM path: the per-frame feature caches (host and device)
and the reference store's read cache stay within their byte budgets over many videos, the
vision tower runs in passes that halve on out-of-memory, and precompute streams features
with their exact bits. The model is the tiny Qwen2-VL of tests/tiny_lmm.py (real transformers
classes and processor) fed the real videos of shared/data; oracles are its own one-shot
``vision()`` over a video's frames and bytes counted from the tensors' storages here."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from tiny_lmm import build_llava_onevision, build_qwen2_vl

from flows.cli import build_parser
from pipelines.decode import DecodeSettings
from pipelines.ingest import IngestSettings, ingest
from pipelines.reference import PrecomputeSettings, precompute_reference
from refocus.lmm import LMMScorer
from refocus.lmm_reference import ShardFrames, StoreFrames, VisionPass
from stores.errors import UserError
from stores.manifest import read_manifest
from stores.owned import claim
from stores.reference import ReferenceStore
from stores.shards import ShardSet

GIB = 1 << 30
VIDEOS = 30
SOURCES = ["asl_book.mkv", "asl_help.mkv", "asl_milk.mkv", "nasa_13013.mp4", "asl_no.mkv",
           "realshort.mp4", "asl_thanks.mkv", "asl_yes.mkv", "rotated_90.mov"]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return build_qwen2_vl(tmp_path_factory.mktemp("qwen") / "qwen2_vl")


@pytest.fixture(scope="module")
def scorer(model) -> LMMScorer:
    return LMMScorer.load(str(model), device="cpu")


@pytest.fixture(scope="module")
def bf16_scorer(model) -> LMMScorer:
    return LMMScorer.load(str(model), device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory, shared_data) -> Path:
    """30 videos (the real clips under several ids), 1 frame a second, at most 4 each, in
    shards of 4 videos."""
    root = tmp_path_factory.mktemp("many")
    rows = [{"id": f"v{i:02d}", "path": str(shared_data / "videos" / SOURCES[i % len(SOURCES)])}
            for i in range(VIDEOS)]
    manifest = root / "corpus.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest(read_manifest(manifest), root / "shards", IngestSettings(
        decode=DecodeSettings(fps=1, max_frames=4, size=64), shard_size=4, workers=1))
    return root / "shards"


@pytest.fixture(scope="module")
def images(many_shards) -> dict[str, list[np.ndarray]]:
    reader = ShardFrames(str(many_shards), scorer=None)  # type: ignore[arg-type] (pixels only)
    return {v: reader.images(v) for v in sorted(reader.lookup)}


def storage_bytes(frame) -> int:  # noqa: ANN001
    """Bytes of the storages behind every tensor a frame holds (a view of a larger tensor
    counts the whole of it)."""
    total = 0
    for value in vars(frame).values():
        items = value.values() if isinstance(value, dict) else value \
            if isinstance(value, list | tuple) else [value]
        total += sum(t.untyped_storage().nbytes() for t in items if isinstance(t, torch.Tensor))
    return total


def same_bits(a, b) -> bool:  # noqa: ANN001
    """Every field equal; tensors of the same dtype with equal bits."""
    def equal(x, y) -> bool:  # noqa: ANN001
        if isinstance(x, torch.Tensor):
            return (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                    and torch.equal(x.contiguous().view(torch.uint8) if x.ndim else x,
                                    y.contiguous().view(torch.uint8) if y.ndim else y))
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(equal(x[k], y[k])
                                                                        for k in x)
        if isinstance(x, list | tuple):
            return type(x) is type(y) and len(x) == len(y) and all(map(equal, x, y))
        return x == y
    return type(a) is type(b) and equal(vars(a), vars(b))


def passes(scorer: LMMScorer, frames: list, size: int, multi: bool = True) -> list:
    """The model's own vision over consecutive groups of ``size`` frames. (Float results of
    a CPU matrix product can differ in the last bit with the number of rows it is given, so
    bit-for-bit oracles use the same grouping as the code under test.)"""
    return [v for i in range(0, len(frames), size) for v in scorer.vision(frames[i:i + size],
                                                                          multi=multi)]


def close(a, b) -> bool:  # noqa: ANN001
    """Tokens equal to float32 precision (1e-6 of the features' largest magnitude: the
    products' summation order differs; the test models' weights are drawn large, so features
    reach ~20), everything else exactly."""
    scale = max(1.0, float(b.tokens.abs().max()))
    return (a.size == b.size and a.extras.keys() == b.extras.keys()
            and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)
            and torch.allclose(a.tokens, b.tokens, atol=1e-6 * scale, rtol=1e-5))


def test_shard_frames_stay_within_their_byte_budgets_over_many_videos(many_shards, scorer,
                                                                       images):
    """30 videos, twice over, with room for about 3 videos on the device and 5 on the host:
    after every access the bytes held (counted from the tensors' storages) are within each
    budget, and every frame — first computed, or evicted and computed again — equals the
    model's own vision (in passes of 3 frames) bit for bit, and its one-shot vision over
    the whole video to float precision."""
    assert len(images) == VIDEOS
    oracle = {v: passes(scorer, frames, 3) for v, frames in images.items()}
    for v in ("v00", "v03", "v08"):  # three frame sizes
        assert all(map(close, oracle[v], scorer.vision(images[v])))
    video = max(sum(storage_bytes(f) for f in frames) for frames in oracle.values())
    device, host = 3 * video, 5 * video
    source = ShardFrames(str(many_shards), scorer, cache_gb=device / GIB,
                         host_cache_gb=host / GIB, frames_per_pass=3)
    total = sum(len(frames) for frames in images.values())
    for _ in range(2):
        for v, frames in oracle.items():
            got = source.frames(v, list(range(len(frames))), True)
            assert all(same_bits(x, y) for x, y in zip(got, frames, strict=True))
            for tier, budget in ((source.cache.device, device), (source.cache.host, host)):
                held = sum(storage_bytes(f) for f in tier.values())
                assert held == tier.held <= budget
                assert len(tier) > 0
    assert source.loaded == 2 * total  # the first videos were evicted before the second round
    assert source.cache.host.evictions > 0
    last = list(oracle)[-1]
    source.frames(last, [0, 1], True)  # still held: not computed again
    assert source.loaded == 2 * total
    some = [2, 0]  # any frames, in any order (computed in another grouping: float precision)
    got = source.frames("v00", some, True)
    assert all(close(x, oracle["v00"][i]) for x, i in zip(got, some, strict=True))


@pytest.mark.parametrize("build", [build_qwen2_vl, build_llava_onevision])
def test_vision_in_small_passes_equals_one_pass(build, tmp_path, images):
    """Frames of three sizes in passes of 1, 2 and 5 (a lone frame of a multi-image set
    included) equal one pass over all of them to float precision."""
    scorer = LMMScorer.load(str(build(tmp_path / "model")), device="cpu")
    frames = [f for v in ("v00", "v03", "v08") for f in images[v]]
    whole = scorer.vision(frames, multi=True)
    for per_pass in (1, 2, 5):
        chunked = VisionPass(scorer, per_pass)(frames, multi=True)
        assert len(chunked) == len(whole)
        assert all(close(a, b) for a, b in zip(chunked, whole, strict=True))


class TightGPU:
    """A test double for the GPU only (this machine has none): the real scorer, whose vision
    tower raises CUDA's own out-of-memory error when given more than ``fits`` frames."""

    def __init__(self, scorer: LMMScorer, fits: int) -> None:
        self.scorer, self.fits, self.sizes = scorer, fits, []

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.scorer, name)

    def vision(self, images, multi=True):  # noqa: ANN001, ANN201
        self.sizes.append(len(images))
        if len(images) > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.scorer.vision(images, multi=multi)


def test_a_vision_pass_that_runs_out_of_memory_halves(scorer, images, many_shards):
    frames = [f for v in ("v00", "v01", "v03") for f in images[v]]
    tight = TightGPU(scorer, fits=2)
    got = VisionPass(tight, 8)(frames, multi=True)  # type: ignore[arg-type]
    assert tight.sizes[:3] == [8, 4, 2] and max(tight.sizes[3:]) <= 2
    assert all(same_bits(a, b) for a, b in zip(got, passes(scorer, frames, 2), strict=True))
    source = ShardFrames(str(many_shards), TightGPU(scorer, fits=1),  # type: ignore[arg-type]
                         frames_per_pass=4)
    local = list(range(len(images["v03"])))
    assert all(same_bits(a, b) for a, b in zip(source.frames("v03", local, True),
                                               passes(scorer, images["v03"], 1), strict=True))
    with pytest.raises(UserError) as caught:
        VisionPass(TightGPU(scorer, fits=0), 4)(frames, multi=True)  # type: ignore[arg-type]
    height, width = frames[0].shape[:2]
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{scorer.name}: the vision tower runs out of GPU memory on a "
                              f"single {width}×{height} frame")


def test_precompute_keeps_bf16_bits_and_reads_stay_bounded(many_shards, bf16_scorer, images,
                                                           tmp_path):
    """A bfloat16 model (on CPU): the stored features are its vision output bit for bit
    (bfloat16, not rounded to float16), computed in passes that ran out of memory above 2
    frames; the store's reader keeps at most its budget of open shards while every video of
    8 shards is read, twice."""
    out = tmp_path / "reference"
    tight = TightGPU(bf16_scorer, fits=2)
    summary = precompute_reference(many_shards, out, tight,  # type: ignore[arg-type]
                                   PrecomputeSettings(frames_per_pass=4))
    assert summary["shards_written"] == 8 and summary["frames_per_pass"] == 2
    budget = 1000  # bytes: the offsets of about two open shards
    store = ReferenceStore(out, read_cache_bytes=budget)
    source = StoreFrames(store, bf16_scorer, cache_gb=0, host_cache_gb=0)  # read every time
    reads = 0
    oracle = {v: passes(bf16_scorer, frames, 2) for v, frames in images.items()}
    assert oracle["v00"][0].tokens.dtype == torch.bfloat16
    for _ in range(2):
        for v, frames in images.items():
            got = source.frames(v, list(range(len(frames))), True)
            assert all(same_bits(a, b) for a, b in zip(got, oracle[v], strict=True))
            held = sum(o.nbytes for s in store.open_shards.values() for o in s.offsets.values())
            assert held == store.open_shards.held <= budget and len(store.open_shards) >= 1
            reads += 1
    # every shard opened twice (dropped before its second use), every frame read twice
    assert store.open_shards.evictions + len(store.open_shards) == 2 * 8
    assert source.loaded == 2 * sum(len(frames) for frames in images.values())
    assert reads == 2 * VIDEOS


def test_an_interrupted_precompute_redoes_its_unfinished_shard_whole(many_shards, scorer,
                                                                      images, tmp_path):
    """The vision tower fails in the middle of the third shard (as a killed run stops): the
    next run skips the two finished shards, rewrites the third whole, and the store equals
    the model's vision."""
    out = tmp_path / "reference"

    class Crashing(TightGPU):
        def vision(self, images, multi=True):  # noqa: ANN001, ANN201
            if len(self.sizes) == 9:  # shards of 4 videos, one pass each: shard 3's second
                raise RuntimeError("killed")
            return super().vision(images, multi)

    with pytest.raises(RuntimeError, match="killed"):
        precompute_reference(many_shards, out, Crashing(scorer, fits=8))  # type: ignore[arg-type]
    assert sorted(p.name for p in (out / "progress").iterdir()) == [
        "shard-000000.done.json", "shard-000001.done.json"]
    assert (out / "reference.zarr" / "shard-000002").is_dir()  # half written
    summary = precompute_reference(many_shards, out, scorer)
    assert summary["shards_skipped"] == 2 and summary["shards_written"] == 6
    source = StoreFrames(ReferenceStore(out), scorer)
    for v, frames in images.items():
        got = source.frames(v, list(range(len(frames))), True)
        assert all(same_bits(a, b) for a, b in zip(got, scorer.vision(frames), strict=True))


def test_a_store_of_the_earlier_format_is_refused_in_one_line(many_shards, scorer, tmp_path):
    """A version-1 store (one float16 token array per shard) is neither read nor added to."""
    out = tmp_path / "old"
    claim(out, "reference")
    (out / "progress").mkdir()
    root = zarr.open_group(str(out / "reference.zarr"), mode="w")
    root.attrs.update({"format": "refocus-reference", "version": 1,
                       "identity": {"model": scorer.name}})
    shard = root.create_group("shard-000000")
    shard.create_array("tokens", data=np.zeros((4, 64), np.float16))
    (out / "progress" / "shard-000000.done.json").write_text(json.dumps(
        {"shard": "shard-000000", "videos": ["v00"], "video_offsets": [0, 4]}))
    expected = (f"{out}: a reference store in refocus's earlier format (float16 features, not "
                "the model's exact bits); re-run refocus precompute-reference into a new --out "
                "folder")
    for attempt in (lambda: StoreFrames(ReferenceStore(out), scorer),
                    lambda: ReferenceStore(out).frames("v00", [0]),
                    lambda: precompute_reference(many_shards, out, scorer)):
        with pytest.raises(UserError) as caught:
            attempt()
        assert str(caught.value) == expected
    assert sorted(p.name for p in (out / "progress").iterdir()) == ["shard-000000.done.json"]


def test_the_cache_budget_reaches_the_frame_source(many_shards, model):
    from pipelines.learn import reference

    for command in ("train", "eval"):
        args = build_parser().parse_args([command, "--store", "s", "--reward", "lmm:m", "--out",
                                          "o", "--reference-cache-gb", "0.5"])
        assert args.reference_cache_gb == 0.5
    ref = reference(f"lmm:{model}", None, str(many_shards), cache_gb=0.25)  # type: ignore[arg-type]
    assert ref.source.cache.device.budget == GIB // 4  # type: ignore[attr-defined]
    assert ShardSet(many_shards).lookup().keys() == ref.source.lookup.keys()  # type: ignore


def test_whatever_a_frame_carries_is_stored_with_its_bits(tmp_path):
    """Synthetic frames (no model needed) carrying more than tokens — a nested list of
    per-frame tensors (as deepstack features are), a 0-d tensor, float and integer rows —
    go through the store's writer and reader unchanged, bit for bit, in any frame order."""
    from refocus.lmm import FrameVision
    from refocus.lmm_reference import frame_from_rows, frame_rows

    generator = torch.Generator().manual_seed(0)

    def frame(n: int) -> FrameVision:
        tokens = (torch.randn(n, 8, generator=generator) * 1e5).bfloat16()  # beyond float16
        return FrameVision(tokens, {"image_grid_thw": torch.tensor([[1, n, 2]]),
                                    "deep": [tokens.float() / 3, tokens[:, :4].clone()],
                                    "scale": torch.tensor(0.5)}, (n, 2 * n))

    frames = [frame(n) for n in (3, 1, 4, 2, 5)]
    claim(tmp_path / "store", "reference")
    store = ReferenceStore(tmp_path / "store")
    store.open_for_writing({"model": "synthetic"})
    writer = store.writer("shard-000000")
    layouts = []
    for chunk, video in ((frames[:2], "a"), (frames[2:], "b")):
        rows = [frame_rows(f) for f in chunk]
        layouts += [layout for _, layout in rows]
        writer.add([r for r, _ in rows])
        writer.end_video(video)
    writer.finish({"frame_layout": layouts[0]})
    assert all(layout == layouts[0] for layout in layouts)
    meta, rows = ReferenceStore(tmp_path / "store").frames("b", [2, 0, 1])
    back = [frame_from_rows(meta["frame_layout"], r) for r in rows]
    assert all(same_bits(a, b) for a, b in zip(back, [frames[4], frames[2], frames[3]],
                                               strict=True))
    assert abs(back[0].tokens.float()).max() > 65504  # would not fit float16
