"""Models, training checkpoints and run records on disk — safetensors and JSON only, so
nothing is ever loaded through unrestricted pickle.

* **Model folder** (a trained reader, an exported policy): ``config.json`` (``kind``, the
  architecture config, anything else worth keeping — metrics, settings) and
  ``weights.safetensors``.
* **Checkpoint** (``RUN/checkpoint/``): ``state.safetensors`` (weights, optimizer moments,
  random generator state …), ``state.json`` (step, settings, numpy generator state …) and
  ``reward_cache.jsonl``. Written to ``checkpoint.tmp`` and swapped in by renames, so a kill at
  any moment leaves the previous checkpoint or the new one.
* **Metrics** (``RUN/metrics.jsonl``): one JSON object per line; on resume, lines after the
  checkpoint's step are dropped so the log matches an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from stores.errors import UserError
from stores.safe_load import load_safetensors

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
CHECKPOINT = "checkpoint"
MODEL_REMEDY = "the model folder is damaged; copy it again or re-create it"


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap ``tmp`` in as ``final`` by renames (the old one is removed last)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def _fresh(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_model(folder: str | os.PathLike[str], kind: str, config: dict[str, Any],
               state_dict: dict[str, torch.Tensor], **extra: Any) -> Path:
    final = Path(folder)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh(final.with_name(final.name + ".tmp"))
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp / WEIGHTS)
    (tmp / CONFIG).write_text(json.dumps({"kind": kind, "config": config, **extra}, indent=1))
    _replace_dir(tmp, final)
    return final


def load_model(folder: str | os.PathLike[str], kind: str,
               ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(architecture config, weights, everything else in config.json) of a model folder."""
    path = Path(folder)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise UserError(f"{path}: not a refocus model folder (needs {CONFIG} and {WEIGHTS})")
    try:
        meta = json.loads((path / CONFIG).read_bytes())
    except ValueError as e:
        raise UserError(f"{path / CONFIG}: damaged ({e}); {MODEL_REMEDY}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise UserError(f"{path}: holds a {found!r} model, not a {kind!r}")
    return meta["config"], load_safetensors(path / WEIGHTS, MODEL_REMEDY), meta


def save_checkpoint(run: str | os.PathLike[str], tensors: dict[str, torch.Tensor],
                    meta: dict[str, Any], cache: Iterable[tuple[Any, float]] = ()) -> Path:
    final = Path(run) / CHECKPOINT
    tmp = _fresh(Path(run) / (CHECKPOINT + ".tmp"))
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              tmp / "state.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta))
    with open(tmp / "reward_cache.jsonl", "w") as f:
        for (qid, subset), margin in cache:
            f.write(json.dumps([qid, list(subset), margin]) + "\n")
    _replace_dir(tmp, final)
    return final


def load_checkpoint(run: str | os.PathLike[str],
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], list] | None:
    """(tensors, meta, reward-cache entries) of a run's checkpoint, or None when it has none."""
    folder = Path(run) / CHECKPOINT
    if not (folder / "state.json").exists():
        return None
    tensors = load_safetensors(folder / "state.safetensors",
                               f"delete {folder} to train again from the start")
    meta = json.loads((folder / "state.json").read_text())
    cache = []
    path = folder / "reward_cache.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            qid, subset, margin = json.loads(line)
            cache.append(((qid, tuple(subset)), margin))
    return tensors, meta, cache


class MetricsLog:
    """Append-only JSON lines."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def rows(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)

    def truncate_after(self, step: int) -> None:
        """Drop rows written after ``step`` (work a killed run did past its checkpoint)."""
        kept = [row for row in self.rows() if row.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        os.replace(tmp, self.path)
