"""Owned output folders: refocus writes only into folders it made, and deletes only what it made.

Every command that writes takes its output folder through :func:`claim`:

* a folder that does not exist is created and gets a marker file, ``.refocus-output.json``,
  naming the kind of output (``ingest``, ``features``, ``run`` …);
* an existing empty folder gets the marker too;
* an existing folder with the marker of the same kind is reused (resume, re-run);
* anything else is refused with one line, and nothing is touched: a non-empty folder without
  the marker (the user's own files), a folder that holds another kind of refocus output, a
  path that is a file, or a folder that is (or holds, or lies inside) one of the command's
  inputs.

Inside an owned folder, :meth:`Owned.remove` deletes only entries whose names refocus makes
(:data:`MADE_NAMES`: temporaries, shards, checkpoints …); a name outside that list is an
error in refocus, never a deletion. :meth:`Owned.lock` refuses a second process on the same
folder (a POSIX record lock, which worker processes forked while it is held do not keep).
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from stores.errors import UserError

MARKER = ".refocus-output.json"
LOCKS = ".locks"
FORMAT_VERSION = 1

# Names (fnmatch patterns) of the entries refocus writes inside its own folders; nothing
# else is ever deleted.
MADE_NAMES = (
    "*.tmp", "*.old", "*.partial", "shard-??????.tar", "shard-??????.done.json",
    "checkpoint", "policy", "policy-last", "reader", "config.json", "weights.safetensors",
    "metrics.jsonl", "summary.json", "training.png", "complete.json", "videos.jsonl",
    "failures.jsonl", "selections.*", "frames", "frames-??????.tar", "exported-*",
    "q-*", LOCKS, "shard-??????", "???_*s.jpg", "selection.json",
    "chunk-??????.npz", "chunk-??????.done.json", "meta.json", "margins",
    "model",  # refocus train-vlm
    "resolved-config.yaml",  # every command's resolved options (flows/config.py)
    "tensorboard", "wandb",  # --report-to's trackers in run and reader folders
    "model.safetensors", "README.md",  # a policy exported for the Hub (pipelines/hub.py)
)


def is_made(name: str) -> bool:
    """Is ``name`` one refocus makes inside its folders (:data:`MADE_NAMES`)?"""
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in MADE_NAMES)


def output_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind of refocus output ``path`` holds, or None when it carries no marker."""
    marker = Path(path) / MARKER
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise UserError(f"{marker}: damaged refocus marker; if this folder is yours, remove "
                        "the file, else choose another output folder") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if not isinstance(kind, str):
        raise UserError(f"{marker}: damaged refocus marker (no kind); choose another folder")
    return kind


def _related(out: Path, inputs: Iterable[str | os.PathLike[str] | None]) -> Path | None:
    """The first input that is ``out``, lies inside it, or holds it (for a folder input)."""
    for item in inputs:
        if item is None or "://" in str(item):
            continue
        given = Path(item)
        if not given.exists():
            continue
        p = given.resolve()
        if p == out or out in p.parents or (p.is_dir() and p in out.parents):
            return given
    return None


@dataclass(frozen=True)
class Owned:
    """A folder refocus owns, of one kind of output."""

    path: Path
    kind: str

    def __fspath__(self) -> str:
        return str(self.path)

    def remove(self, *names: str) -> None:
        """Delete entries of this folder by name (files or folders); only names refocus makes
        are allowed, and missing ones are skipped."""
        for name in names:
            if "/" in name or name in ("", ".", "..") or not is_made(name):
                raise ValueError(f"refocus does not delete {name!r}: not a name it makes")
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)

    def remove_stale(self, pattern: str = "*.tmp", under: str | None = None) -> list[str]:
        """Delete the entries matching ``pattern`` (a made name: temporaries a killed run
        left) in this folder, or, with ``under``, files anywhere below that sub-folder (one
        refocus made here, e.g. its Zarr store). Returns their paths relative to the folder."""
        if under is None:
            names = sorted(p.name for p in self.path.glob(pattern))
            self.remove(*names)
            return names
        found = sorted(p for p in (self.path / under).rglob(pattern) if p.is_file())
        for path in found:
            if not is_made(path.name):
                raise ValueError(f"refocus does not delete {path.name!r}: not a name it makes")
            path.unlink()
        return [str(p.relative_to(self.path)) for p in found]

    def child(self, name: str, kind: str | None = None) -> Owned:
        """A sub-folder of this one, owned on its own (``kind`` defaults to ``name``)."""
        return claim(self.path / name, kind or name)

    @contextmanager
    def lock(self, name: str | None = None, wait: float = 0.0) -> Iterator[None]:
        """Hold the folder's lock (``name`` picks one of several) for the block."""
        lock_name = f"{name or self.kind}.lock"
        with exclusive_lock(self.path / LOCKS / lock_name, f"{self.kind} folder {self.path}",
                            wait=wait):
            yield


def claim(path: str | os.PathLike[str], kind: str, *,
          inputs: Iterable[str | os.PathLike[str] | None] = (), option: str = "--out") -> Owned:
    """Take ``path`` as an output folder of ``kind`` (see the module's text), or refuse."""
    given = Path(path)
    if given.exists() and not given.is_dir():
        raise UserError(f"{option} {given}: exists and is not a folder; choose a folder path")
    out = given.resolve()
    clash = _related(out, inputs)
    if clash is not None:
        raise UserError(f"{option} {given}: is, holds or lies inside the input {clash}; "
                        "choose a separate output folder")
    if out.is_dir():
        kind_there = output_kind(out)
        if kind_there == kind:
            return Owned(out, kind)
        if kind_there is not None:
            raise UserError(f"{option} {given}: holds refocus {kind_there!r} output, not "
                            f"{kind!r}; choose another folder")
        if any(out.iterdir()):
            raise UserError(f"{option} {given}: is not empty and was not made by refocus; "
                            "choose a new or empty folder (nothing was changed)")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"kind": kind, "version": FORMAT_VERSION,
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))
    os.replace(tmp, out / MARKER)
    return Owned(out, kind)


def write_made(folder: str | os.PathLike[str], name: str, text: str) -> Path | None:
    """Write ``text`` as ``name`` (a name refocus makes) into ``folder`` when refocus owns it
    (it carries the marker), atomically; a folder refocus does not own is left alone."""
    if not is_made(name):
        raise ValueError(f"refocus does not write {name!r}: not a name it makes")
    path = Path(folder)
    if not path.is_dir() or output_kind(path) is None:
        return None
    tmp = path / f"{name}.{os.getpid()}.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path / name)
    return path / name


def check_output_file(path: str | os.PathLike[str], *, overwrite: bool = False,
                      inputs: Iterable[str | os.PathLike[str] | None] = (),
                      option: str = "-o") -> Path:
    """An output *file*: refused when it is an input or a folder, or when it exists and
    ``overwrite`` was not asked for."""
    given = Path(path)
    if given.is_dir():
        raise UserError(f"{option} {given}: is a folder; give a file path")
    if _related(given.resolve(), inputs) is not None:
        raise UserError(f"{option} {given}: is one of the inputs; choose another file")
    if given.exists() and not overwrite:
        raise UserError(f"{option} {given}: exists; choose another file or pass --overwrite")
    return given


@contextmanager
def exclusive_lock(path: Path, what: str, wait: float = 0.0) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file); wait up to ``wait`` seconds for it,
    then fail naming ``what``.

    A POSIX record lock (``lockf``): it belongs to this process alone, so worker processes
    forked while it is held do not keep it alive after this process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    with open(path, "a") as handle:
        while True:
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if time.monotonic() >= deadline:
                    raise UserError(f"{what} is in use by another process (lock {path})") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)
