"""Videos from files and folders: one video row per file, ids derived from file names.

A symbolic link that loops (points back to itself, directly or through other links) is
reported as one issue and left out; every other file still lands."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from stores.errors import UserError
from stores.ids import safe_component, unique_ids
from stores.manifest import Issue, Manifest, build_manifest, sort_issues

VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
    ".3gp", ".ogv",
})


def _is_loop(path: Path) -> bool:
    """Does following ``path``'s links go round in a circle?"""
    try:
        os.stat(path)
    except OSError as e:
        return e.errno == errno.ELOOP
    return False


def import_video_files(paths: list[Path], root: Path | None = None) -> Manifest:
    """One video row per path. The id is the path relative to ``root`` (or the file name)
    without its extension, made safe (``a/b.c.mp4`` → ``a__b_c``; a long one is cut and gets a
    short hash of the whole); of files that clash, the first keeps the id and the others get
    ``-2``, ``-3`` (``stores.ids.unique_ids``). An ingest that grows a corpus keeps the ids it
    stored for files it already holds (``stores.ids.stable_ids``)."""
    loops: list[Issue] = []
    found: list[Path] = []
    for p in paths:
        if _is_loop(p):
            loops.append(Issue(str(p), "path", "symbolic link loop (it leads back to itself); "
                                               "left out"))
        else:
            found.append(p)
    stems = [p.relative_to(root).with_suffix("").as_posix() if root else p.stem for p in found]
    ids = unique_ids([safe_component(stem) for stem in stems])
    rows = [(str(p), {"type": "video", "id": vid, "path": str(p.resolve())})
            for p, vid in zip(found, ids, strict=True)]
    manifest = build_manifest(rows)
    manifest.issues = sort_issues(loops + manifest.issues)
    return manifest


def import_video_url(url: str) -> Manifest:
    """One video row for a URL that PyAV can open (http, https, rtmp, ...); the id is the
    last path component without its extension."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return build_manifest([(url, {"type": "video", "id": safe_component(stem), "path": url})])


def import_folder(root: str | os.PathLike[str]) -> Manifest:
    """Every video file under ``root`` (recursive, by extension), in sorted path order."""
    base = Path(root)
    if not base.is_dir():
        raise UserError(f"{base}: not a folder")
    paths = sorted(
        p for p in base.rglob("*")
        if p.suffix.lower() in VIDEO_EXTENSIONS and (p.is_file() or _is_loop(p))
    )
    return import_video_files(paths, root=base)
