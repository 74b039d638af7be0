"""The margin store: a reference LMM's option logits and margins on many frame subsets per
question, computed offline (refocus precompute-margins) for distilling a reader.

Layout of a margins folder (claimed with ``stores.owned.claim(out, "margins")``)::

    meta.json                  format, version, the reference identity, the subset settings,
                               the store and the plan: the questions of every chunk (fixed
                               by the first run)
    chunk-000003.npz           per scored subset: qid, frames (local indices, −1 padded),
                               logits (all options, −inf padded), margin
    chunk-000003.done.json     the chunk's questions and subset count; written last
    summary.json

A chunk without its done marker is not done: the next run writes it again (its file is
replaced atomically). One folder holds the outputs of one reference with one set of
settings: a run with another reference or other settings is refused in one line.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stores.errors import UserError
from stores.owned import is_made, output_kind
from stores.shards import write_json_atomic

FORMAT = "refocus-margins"
VERSION = 1
KIND = "margins"  # the marker of a margins folder (stores/owned.py)
META = "meta.json"


def chunk_name(index: int) -> str:
    return f"chunk-{index:06d}"


@dataclass
class Chunk:
    """The scored subsets of one chunk, as arrays."""

    qid: np.ndarray  # [S] str
    frames: np.ndarray  # [S, k] int64, −1 = no frame
    logits: np.ndarray  # [S, O] float32, −inf = no option
    margin: np.ndarray  # [S] float32

    def __len__(self) -> int:
        return len(self.qid)


def concatenate(chunks: list[Chunk]) -> Chunk:
    """One ``Chunk`` of many (frames and options padded to the widest)."""
    if not chunks:
        return Chunk(np.zeros(0, dtype=str), np.zeros((0, 1), np.int64),
                     np.zeros((0, 1), np.float32), np.zeros(0, np.float32))
    k = max(c.frames.shape[1] for c in chunks)
    o = max(c.logits.shape[1] for c in chunks)
    pad = lambda a, width, value: np.pad(a, ((0, 0), (0, width - a.shape[1])),  # noqa: E731
                                         constant_values=value)
    return Chunk(np.concatenate([c.qid for c in chunks]),
                 np.concatenate([pad(c.frames, k, -1) for c in chunks]),
                 np.concatenate([pad(c.logits, o, -np.inf) for c in chunks]),
                 np.concatenate([c.margin for c in chunks]))


class MarginStore:
    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    # ------------------------------------------------------------------ writing
    def open_for_writing(self, reference: str, settings: dict[str, Any],
                         chunks: list[list[str]], store: str) -> list[list[str]]:
        """Create the store with its plan, or check that an existing one holds the same
        reference's margins under the same settings; the plan to follow (the first run's)."""
        if output_kind(self.directory) != KIND:
            raise ValueError(f"{self.directory}: write margins only into a folder claimed "
                             f"with stores.owned.claim(..., {KIND!r})")
        if (self.directory / META).exists():
            meta = self.meta()
            if meta["reference"] != reference:
                raise UserError(f"{self.directory}: holds margins of {meta['reference']}, not "
                                f"{reference}; choose another --out (one reference per folder)")
            if meta["settings"] != json.loads(json.dumps(settings)):
                raise UserError(f"{self.directory}: holds margins drawn with other settings "
                                f"({meta['settings']}); re-run with those or choose another "
                                "--out")
            return meta["chunks"]
        write_json_atomic(self.directory / META, {
            "format": FORMAT, "version": VERSION, "reference": reference, "settings": settings,
            "store": store, "chunks": chunks})
        return chunks

    def done(self, index: int) -> bool:
        return (self.directory / f"{chunk_name(index)}.done.json").exists()

    def write_chunk(self, index: int, chunk: Chunk) -> dict[str, Any]:
        """The chunk's file (atomically), then its done marker; returns the marker."""
        name = chunk_name(index)
        assert is_made(f"{name}.npz") and is_made(f"{name}.done.json")
        buffer = io.BytesIO()
        np.savez(buffer, qid=chunk.qid.astype(str), frames=chunk.frames.astype(np.int64),
                 logits=chunk.logits.astype(np.float32), margin=chunk.margin.astype(np.float32))
        tmp = self.directory / f"{name}.npz.tmp"
        with open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / f"{name}.npz")
        marker = {"chunk": index, "subsets": len(chunk),
                  "questions": list(dict.fromkeys(chunk.qid.tolist()))}
        write_json_atomic(self.directory / f"{name}.done.json", marker)
        return marker

    # ------------------------------------------------------------------ reading
    def meta(self) -> dict[str, Any]:
        path = self.directory / META
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.directory}: no margins here (refocus precompute-margins "
                            "--out)") from None
        except ValueError as e:
            raise UserError(f"{path}: damaged ({e}); compute the margins again into a new "
                            "folder") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or \
                meta.get("version") != VERSION:
            raise UserError(f"{path}: not a refocus margins folder of version {VERSION}")
        return meta

    def reference(self) -> str:
        return self.meta()["reference"]

    def missing(self) -> list[int]:
        """Chunks of the plan without their done marker."""
        return [i for i in range(len(self.meta()["chunks"])) if not self.done(i)]

    def read_chunk(self, index: int) -> Chunk:
        path = self.directory / f"{chunk_name(index)}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                return Chunk(data["qid"], data["frames"], data["logits"], data["margin"])
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{path}: damaged ({type(e).__name__}); remove "
                            f"{chunk_name(index)}.done.json beside it and re-run refocus "
                            "precompute-margins") from None

    def load(self) -> Chunk:
        """Every chunk's subsets; refused while any chunk is unfinished."""
        missing = self.missing()
        if missing:
            raise UserError(f"{self.directory}: {len(missing)} chunk(s) of margins are not "
                            f"finished (e.g. {chunk_name(missing[0])}); re-run refocus "
                            "precompute-margins to finish them")
        return concatenate([self.read_chunk(i) for i in range(len(self.meta()["chunks"]))])
