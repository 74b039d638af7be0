"""What the annotation importers share: reading JSON/JSONL/parquet rows, checking their
fields (a bad field is a :class:`RowProblem`, which the importer records as an ``Issue`` and
moves on), finding videos by file stem, and putting the importer's issues among the
manifest's."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from stores.errors import UserError
from stores.ids import safe_component
from stores.importers.folder import VIDEO_EXTENSIONS
from stores.manifest import Issue, Manifest, build_manifest, sort_issues

SPLITS = ("train", "val", "validation", "dev", "test")


class RowProblem(Exception):
    """One field of one source row is unusable; becomes an :class:`Issue`."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def read_records(path: Path, what: str) -> tuple[list[tuple[str, dict[str, Any]]], list[Issue]]:
    """``(where, row)`` for every object in a ``.json`` list, a ``.jsonl`` file or (with
    pyarrow) a ``.parquet`` table; a line that is not a JSON object is an issue.

    ``where`` is ``file:line`` for JSONL, ``file:index`` (0-based) for a list or a table.
    A file that cannot be read at all is a :class:`UserError` naming it and ``what`` it
    should have been."""
    if not path.is_file():
        raise UserError(f"{path}: annotation file not found")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        records: Iterable[Any] = _read_parquet(path)
        numbered = enumerate(records)
    elif suffix == ".jsonl":
        return _read_jsonl(path)
    elif suffix == ".json":
        try:
            data = json.loads(read_text(path))
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: not in the {what} format (expected a JSON list of "
                            f"rows, got a JSON {type(data).__name__})")
        numbered = enumerate(data)
    else:
        raise UserError(f"{path}: unknown kind of annotation file (expected .json, .jsonl "
                        "or .parquet)")
    rows: list[tuple[str, dict[str, Any]]] = []
    issues: list[Issue] = []
    for index, record in numbered:
        where = f"{path}:{index}"
        if isinstance(record, dict):
            rows.append((where, record))
        else:
            issues.append(Issue(where, "row",
                                f"must be a JSON object, got {type(record).__name__}"))
    return rows, issues


def read_text(path: Path) -> str:
    """A text file's content, read as UTF-8 (a leading byte-order mark is dropped). Other
    encodings are refused with one line: guessing one (Latin-1 reads any bytes at all) would
    turn names and questions into wrong text without a word."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(
            f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}; Latin-1 or "
            f"Windows-1252 perhaps); convert it, e.g. iconv -f latin1 -t utf-8 FILE > NEW"
        ) from None


def _read_jsonl(path: Path) -> tuple[list[tuple[str, dict[str, Any]]], list[Issue]]:
    rows: list[tuple[str, dict[str, Any]]] = []
    issues: list[Issue] = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    issues.append(Issue(where, "row", f"not valid JSON ({e.msg} at column "
                                                      f"{e.colno})"))
                    continue
                if isinstance(record, dict):
                    rows.append((where, record))
                else:
                    issues.append(Issue(where, "row",
                                        f"must be a JSON object, got {type(record).__name__}"))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    return rows, issues


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq  # only when a parquet file is read
    except ImportError:  # pragma: no cover - pyarrow is a dependency of the project
        raise UserError(f"{path}: reading parquet needs pyarrow (pip install pyarrow); "
                        "or convert the file to .json/.jsonl") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several kinds for a damaged file
        raise UserError(f"{path}: not a readable parquet file ({e})") from None


def check_fields_present(
    path: Path, rows: list[tuple[str, dict[str, Any]]], fields: Iterable[str], what: str,
) -> None:
    """Refuse a file whose rows never carry one of ``fields``: it is another format, and
    reporting every row would bury the one thing wrong."""
    if not rows:
        return
    seen = set().union(*(row.keys() for _, row in rows))
    missing = [name for name in fields if name not in seen]
    if missing:
        raise UserError(f"{path}: not in the {what} format (no row has: {', '.join(missing)})")


def text_field(row: dict[str, Any], name: str) -> str:
    """A required non-empty string (a number is taken as its text, as ids sometimes are)."""
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RowProblem(name, "empty or missing")
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise RowProblem(name, f"must be a string, got {type(value).__name__}")
    return str(value).strip()


def string_list(row: dict[str, Any], name: str) -> list[str]:
    """A required list of at least two strings."""
    value = row.get(name)
    if value is None:
        raise RowProblem(name, "empty or missing")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RowProblem(name, "must be a list of strings")
    if len(value) < 2:
        raise RowProblem(name, f"needs at least 2 options, got {len(value)}")
    return value


def seconds(row: dict[str, Any], name: str) -> float | None:
    """An optional positive, finite number of seconds."""
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowProblem(name, f"must be a number of seconds, got {value!r}")
    if value <= 0:
        raise RowProblem(name, f"must be positive, got {value!r}")
    return float(value)


def split_from_name(path: Path) -> str | None:
    """``val`` for ``lvb_val.json``, ``test`` for ``test-00000-of-00001.parquet``."""
    words = re.split(r"[^a-z]+", path.stem.lower())
    for split in SPLITS:
        if split in words:
            return "val" if split == "validation" else split
    return None


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute against the current folder (without following links), so a
    manifest written elsewhere still finds it."""
    return Path(os.path.abspath(path))


def inside_root(name: str, field_name: str) -> str:
    """``name``, a video path from an annotation file, when it stays inside the videos
    folder: an absolute path or one that climbs out with ``..`` is a :class:`RowProblem`
    (an annotation file must not make refocus read any file on the machine)."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).anchor:
        raise RowProblem(field_name, f"{name!r} is an absolute path; annotation paths must "
                                     "lie inside the videos folder (--videos)")
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        raise RowProblem(field_name, f"{name!r} leaves the videos folder ('..'); annotation "
                                     "paths must lie inside it (--videos)")
    return name


class DerivedIds:
    """Video ids made from a dataset's own names (``safe_component``), one per name: two
    names that become the same id (``a.b`` and ``a_b``) are a :class:`RowProblem` naming both,
    never one video standing for the other."""

    def __init__(self) -> None:
        self._original: dict[str, str] = {}

    def make(self, original: str, field_name: str) -> tuple[str, bool]:
        """(the id for ``original``, whether it is new)."""
        vid = safe_component(original)
        taken = self._original.get(vid)
        if taken is None:
            self._original[vid] = original
            return vid, True
        if taken != original:
            raise RowProblem(field_name, f"{taken!r} and {original!r} both become video id "
                                         f"{vid!r}; rename one of them")
        return vid, False


def original_id(vid: str, original: str) -> dict[str, str]:
    """Meta that keeps the dataset's own id when the video id had to differ from it."""
    return {} if vid == original else {"original_id": original}


def find_video(found: dict[str, Path], root: Path, name: str) -> str:
    """The video whose stem is ``name``'s under ``root`` (searched recursively), or the
    path ``root/name`` where it would be (a missing video fails at decode time)."""
    return str(found.get(Path(name).stem, root / name))


def finish(rows: list[tuple[str, dict[str, Any]]], issues: list[Issue]) -> Manifest:
    """Validate the rows and put the importer's own issues among the manifest's, in file
    order."""
    manifest = build_manifest(rows)
    manifest.issues = sort_issues(issues + manifest.issues)
    return manifest




def video_index(video_root: Path | None) -> dict[str, Path]:
    """Video files under ``video_root`` (recursively) by file stem."""
    if video_root is None or not video_root.is_dir():
        return {}
    return {
        p.stem: p
        for p in sorted(video_root.rglob("*"))
        if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS
    }
