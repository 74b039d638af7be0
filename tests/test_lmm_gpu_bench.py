"""benchmarks/lmm_gpu.py: the smoke mode runs on CPU with a tiny Qwen2-VL and writes the JSON
and Markdown the GPU run will; a family refocus refuses is recorded, not a crash."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "lmm_gpu.py"


def load_bench():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("lmm_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_writes_every_figure(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "lmm_gpu.json").read_text())
    assert (result["device"], result["dtype"], result["smoke"]) == ("cpu", "float32", True)
    assert result["bf16_peak_flops"] is None  # no GPU: no share of a peak is claimed
    (family,) = result["families"]
    assert (family["family"], family["status"]) == ("qwen2-vl-tiny", "ok")
    assert family["vision_frames_per_s"] > 0 and family["decoder_parameters"] > 0
    figures = {(r["k"], r["path"], r["mode"]) for r in family["rows"]}
    assert figures == {(k, path, mode) for k in (2, 4) for path in ("cached", "full")
                       for mode in ("batched", "one at a time")}
    for r in family["rows"]:
        # 112 px frames: (112 / 28)² = 16 merged tokens each, wrapped in vision start/end
        assert r["vision_tokens"] == 16 * r["k"]
        assert r["prompt_tokens"] > r["vision_tokens"] + 2 * r["k"]
        assert r["subsets_per_s"] > 0 and r["seconds"] > 0
        assert abs(r["subsets_per_s"] * r["seconds"] - r["pairs"]) < 1e-9
        assert r["peak_memory_bytes"] is None and r["bf16_peak_share"] is None
        lm = 2 * family["decoder_parameters"] * r["prompt_tokens"] * r["pairs"]
        assert r["flops"] == (lm if r["path"] == "cached" else
                              lm + 2 * family["vision_parameters"] * r["vision_tokens"] * 4
                              * r["pairs"])
    table = (tmp_path / "lmm_gpu.md").read_text()
    assert table.count("| qwen2-vl-tiny |") == len(family["rows"])
    assert table in done.stdout


def test_a_family_refocus_refuses_is_recorded_as_unsupported():
    bench = load_bench()
    from tokenizers import normalizers

    def split_letters(device: torch.device, dtype: torch.dtype):  # noqa: ANN202
        built = bench.tiny_qwen2_vl(device, dtype)
        # a real tokenizer in which the answer letter 'A' is two tokens: refocus refuses it
        built.processor.tokenizer.backend_tokenizer.normalizer = normalizers.Replace("A", "a a")
        return built

    args = argparse.Namespace(batch=2, candidates=2, seed=0, k=[2], pairs=1, repeats=1)
    record = bench.measure_family("split", split_letters, args, torch.device("cpu"),
                                  torch.float32)
    assert record["status"].startswith("unsupported (tokenizer")
    assert "'A' is 2 tokens" in record["status"] and record["rows"] == []


def test_real_size_run_without_a_gpu_says_so():
    if torch.cuda.is_available():
        return  # the real run is what a GPU machine does; nothing to refuse there
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", "unused"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "needs a CUDA GPU" in done.stderr and not (REPO / "unused").exists()
