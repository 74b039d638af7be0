"""Models, training checkpoints and run records on disk — safetensors and JSON only, so
nothing is ever loaded through unrestricted pickle. Everything is written inside folders
refocus owns (``stores/owned.py``) and nothing outside them is touched.

* **Model folder** (a trained reader, an exported policy): ``config.json`` (``kind``, the
  architecture config, anything else worth keeping — metrics, settings) and
  ``weights.safetensors``. Both are written as ``*.tmp`` and renamed, the config last (the old
  one is removed first), so a folder with ``config.json`` holds a complete model.
* **Checkpoint** (``RUN/checkpoint/``): ``state.safetensors`` (weights, optimizer moments,
  random generator state …), ``reward_cache.jsonl`` and, written last, ``state.json`` (step,
  settings, numpy generator state …): a copy holding ``state.json`` is complete. Written to
  ``checkpoint.tmp`` and swapped in by renames (the previous one kept as ``checkpoint.old``
  until the new one is in place); loading takes the newest complete copy of the three, so a
  kill at any moment loses at most the checkpoint being written.
* **Metrics** (``RUN/metrics.jsonl``): one JSON object per line; on resume, lines after the
  checkpoint's step are dropped so the log matches an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stores.errors import UserError
from stores.owned import Owned, claim
from stores.safe_load import load_safetensors

CONFIG = "config.json"
WEIGHTS = "weights.safetensors"
# a model exported for the Hugging Face Hub (huggingface_hub.PyTorchModelHubMixin's file name)
HUB_WEIGHTS = "model.safetensors"
CHECKPOINT = "checkpoint"
CHECKPOINT_TMP, CHECKPOINT_OLD = CHECKPOINT + ".tmp", CHECKPOINT + ".old"
STATE = "state.json"  # written last: a checkpoint copy that holds it is complete
TMP = ".tmp"
MODEL_REMEDY = "the model folder is damaged; copy it again or re-create it"


def save_model(folder: str | os.PathLike[str], kind: str, config: dict[str, Any],
               state_dict: dict[str, torch.Tensor], **extra: Any) -> Path:
    """Write a model into ``folder`` (an output folder of ``kind``, made or reused through
    :func:`stores.owned.claim`), touching nothing beside it."""
    write_model(claim(folder, kind), kind, config, state_dict, **extra)
    return Path(folder)


def write_model(owned: Owned, kind: str, config: dict[str, Any],
                state_dict: dict[str, torch.Tensor], **extra: Any) -> None:
    """Write a model's ``config.json`` and weights into a folder refocus owns, of any kind
    (a training run's folder holds its best policy this way)."""
    weights, meta = owned.path / (WEIGHTS + TMP), owned.path / (CONFIG + TMP)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, weights)
    meta.write_text(json.dumps({"kind": kind, "config": config, **extra}, indent=1))
    owned.remove(CONFIG)  # from here until the last rename the folder holds no complete model
    os.replace(weights, owned.path / WEIGHTS)
    os.replace(meta, owned.path / CONFIG)


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


def save_checkpoint(run: Owned, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                    cache: Iterable[tuple[Any, float]] = (), resumed_from: str = CHECKPOINT,
                    ) -> Path:
    """Write the run's checkpoint. ``resumed_from`` names the copy this run was loaded from
    (:attr:`Checkpoint.copy`); when it is not ``checkpoint/`` it is made so first, so that the
    copy the run stands on is never the one overwritten."""
    final, tmp, old = (run.path / name for name in (CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD))
    if resumed_from != CHECKPOINT and (run.path / resumed_from / STATE).is_file():
        run.remove(CHECKPOINT)  # incomplete or damaged: the run resumed from another copy
        os.replace(run.path / resumed_from, final)
    run.remove(CHECKPOINT_TMP)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()},
              tmp / "state.safetensors")
    with open(tmp / "reward_cache.jsonl", "w") as f:
        for (qid, subset), margin in cache:
            f.write(json.dumps([qid, list(subset), margin]) + "\n")
    (tmp / STATE).write_text(json.dumps(meta))
    run.remove(CHECKPOINT_OLD)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    run.remove(CHECKPOINT_OLD)
    return final


@dataclass
class Checkpoint:
    """A checkpoint: tensors, state.json, reward-cache entries (what ``GRPOTrainer.state()``
    returns, whole); when loaded, also the copy it came from (``checkpoint``,
    ``checkpoint.tmp`` or ``checkpoint.old``) and the copies skipped as damaged (one line
    each)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    cache: list[tuple[tuple[str, tuple[int, ...]], float]]
    copy: str = CHECKPOINT
    skipped: list[str] = field(default_factory=list)


def _read_copy(folder: Path) -> Checkpoint:
    meta = json.loads((folder / STATE).read_text())
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise ValueError(f"{STATE} holds no step")
    tensors = load_file(folder / "state.safetensors")
    cache = []
    path = folder / "reward_cache.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            qid, subset, margin = json.loads(line)
            cache.append(((qid, tuple(subset)), margin))
    return Checkpoint(tensors, meta, cache, folder.name)


def _step(folder: Path) -> int:
    try:
        return int(json.loads((folder / STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # damaged: tried last, and skipped with a warning


def load_checkpoint(run: str | os.PathLike[str]) -> Checkpoint | None:
    """The newest complete checkpoint copy of a run (checkpoint/, else a complete
    checkpoint.tmp a kill left between the renames, else checkpoint.old), or None when the run
    has none. A damaged copy is skipped with a warning; when copies exist and none can be read,
    the run is refused rather than silently started over."""
    root = Path(run)
    order = (CHECKPOINT, CHECKPOINT_TMP, CHECKPOINT_OLD)
    complete = [root / name for name in order if (root / name / STATE).is_file()]
    complete.sort(key=_step, reverse=True)  # stable: ties keep checkpoint/ first
    skipped: list[str] = []
    for folder in complete:
        try:
            chosen = _read_copy(folder)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
            line = str(e).splitlines()[0] if str(e) else type(e).__name__
            skipped.append(f"{folder}: damaged checkpoint skipped ({line[:200]})")
            warnings.warn(skipped[-1], stacklevel=2)
            continue
        chosen.skipped = skipped
        return chosen
    if skipped or (root / CHECKPOINT).exists() or (root / CHECKPOINT_OLD).exists():
        raise UserError(f"{root}: no readable checkpoint ({'; '.join(skipped) or 'incomplete'})"
                        f"; remove {root / CHECKPOINT}* to start the run over")
    return None


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
