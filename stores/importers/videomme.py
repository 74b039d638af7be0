"""Video-MME annotations (``lmms-lab/Video-MME`` on Hugging Face).

One row per question, as the dataset card publishes them: ``video_id`` (the benchmark's
own number, ``"001"``), ``duration`` (``"short"``, ``"medium"`` or ``"long"``), ``domain``,
``sub_category``, ``url``, ``videoID`` (the YouTube id, which is the video's file stem),
``question_id`` (``"001-1"``), ``task_type``, ``question``, ``options`` (four strings
``"A. text"``) and ``answer`` (a letter). Some revisions add ``language`` (kept) and
``Subtitle`` (not kept).

Read from the published ``.parquet`` files (with pyarrow) or from ``.json`` (a list of rows)
and ``.jsonl`` (a row per line). The question id is ``question_id``, the category
``task_type``; options lose their ``"A. "`` prefixes (when every option has its own) and
the answer letter becomes an index.
The video row keeps ``duration_category`` (Video-MME's short/medium/long — ``duration`` is
the length in seconds in a manifest), ``domain``, ``sub_category``, ``url``, ``language`` and
``videomme_id`` (the benchmark's number) in its ``meta``.

Videos are looked up under ``video_root`` by file stem (``<videoID>.<ext>``, recursively); a
video that is not found keeps the path ``<video_root>/<videoID>.mp4`` and fails at decode
time, recorded like any broken video. Issues name the row as ``file:N`` where N is the line
of a ``.jsonl`` file and the 0-based position of the row in a ``.json`` list or a parquet
table.

The helpers for JSON rows here (:func:`read_records`, :class:`RowProblem` and the field
checks) are shared with the LongVideoBench and MLVU importers.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stores.errors import UserError
from stores.ids import safe_component
from stores.importers.nextqa import _video_index
from stores.manifest import Issue, Manifest, build_manifest, sort_issues

REQUIRED_FIELDS = ("videoID", "question_id", "question", "options", "answer")
# Video-MME field → key in the video row's meta
VIDEO_META = {
    "duration": "duration_category", "domain": "domain", "sub_category": "sub_category",
    "url": "url", "language": "language", "video_id": "videomme_id",
}
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
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}: not a UTF-8 text file ({e.reason})") from None
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


_LETTER_PREFIX = re.compile(r"\s*([A-Z])\s*[.):]\s*")


def strip_letters(options: list[str]) -> list[str]:
    """``["A. red", "B. blue"]`` → ``["red", "blue"]``. Only when every option starts with
    its own letter: otherwise the letters are not prefixes and all options are kept whole."""
    stripped = []
    for i, option in enumerate(options):
        match = _LETTER_PREFIX.match(option)
        if not match or match.group(1) != chr(ord("A") + i) or not option[match.end():].strip():
            return [o.strip() for o in options]
        stripped.append(option[match.end():].strip())
    return stripped


def letter_index(answer: str, count: int) -> int:
    """``"C"`` → 2 for ``count`` options; raises :class:`RowProblem` otherwise."""
    letters = f"A-{chr(ord('A') + count - 1)}"
    text = answer.strip().rstrip(".").upper()
    if len(text) != 1 or not "A" <= text <= "Z":
        raise RowProblem("answer", f"expected an option letter {letters}, got {answer!r}")
    index = ord(text) - ord("A")
    if index >= count:
        raise RowProblem("answer", f"{answer!r} is not one of the option letters {letters}")
    return index


def _rows(
    records: list[tuple[str, dict[str, Any]]], root: Path, split: str | None,
) -> tuple[list[tuple[str, dict[str, Any]]], list[Issue]]:
    found = _video_index(root)
    out: list[tuple[str, dict[str, Any]]] = []
    issues: list[Issue] = []
    seen: set[str] = set()
    for where, row in records:
        try:
            youtube_id = text_field(row, "videoID")
            qid = text_field(row, "question_id")
            question = text_field(row, "question")
            options = strip_letters(string_list(row, "options"))
            answer = letter_index(text_field(row, "answer"), len(options))
        except RowProblem as e:
            issues.append(Issue(where, e.field, e.message))
            continue
        vid = safe_component(youtube_id)
        if vid not in seen:
            seen.add(vid)
            video: dict[str, Any] = {
                "type": "video", "id": vid, "path": find_video(found, root, f"{youtube_id}.mp4"),
            }
            if split:
                video["split"] = split
            for source, key in VIDEO_META.items():
                value = row.get(source)
                if isinstance(value, str) and value.strip():
                    video[key] = value.strip()
            out.append((where, video))
        item: dict[str, Any] = {
            "type": "question", "qid": qid, "video_id": vid, "question": question,
            "options": options, "answer": answer,
        }
        if isinstance(row.get("task_type"), str) and row["task_type"].strip():
            item["category"] = row["task_type"].strip()
        if split:
            item["split"] = split
        out.append((where, item))
    return out, issues


def import_videomme(
    path: str | os.PathLike[str],
    video_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> Manifest:
    """Video-MME questions (``.parquet``, ``.json`` or ``.jsonl``) and their videos.

    ``video_root`` defaults to ``videos/`` beside the annotation file; ``split`` to the one
    named in the file name, else ``test`` (Video-MME's only split)."""
    p = Path(path)
    records, issues = read_records(p, "Video-MME")
    check_fields_present(p, records, REQUIRED_FIELDS, "Video-MME")
    root = Path(video_root) if video_root is not None else p.parent / "videos"
    split = split if split is not None else (split_from_name(p) or "test")
    rows, row_issues = _rows(records, root, split)
    return finish(rows, issues + row_issues)
