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
time, recorded like any broken video. A ``videoID`` that is absolute or climbs out of
``video_root`` is an issue, and so are two that become the same video id once made safe (a
changed id keeps the ``videoID`` in the video's ``original_id``). Issues name the row as
``file:N`` where N is the line of a ``.jsonl`` file and the 0-based position of the row in a
``.json`` list or a parquet table.

"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from stores.importers.records import (
    DerivedIds,
    RowProblem,
    absolute,
    check_fields_present,
    find_video,
    finish,
    inside_root,
    original_id,
    read_records,
    split_from_name,
    string_list,
    text_field,
    video_index,
)
from stores.manifest import Issue, Manifest

REQUIRED_FIELDS = ("videoID", "question_id", "question", "options", "answer")
# Video-MME field → key in the video row's meta
VIDEO_META = {
    "duration": "duration_category", "domain": "domain", "sub_category": "sub_category",
    "url": "url", "language": "language", "video_id": "videomme_id",
}
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
    found = video_index(root)
    out: list[tuple[str, dict[str, Any]]] = []
    issues: list[Issue] = []
    made = DerivedIds()
    for where, row in records:
        try:
            youtube_id = inside_root(text_field(row, "videoID"), "videoID")
            qid = text_field(row, "question_id")
            question = text_field(row, "question")
            options = strip_letters(string_list(row, "options"))
            answer = letter_index(text_field(row, "answer"), len(options))
            vid, new = made.make(youtube_id, "videoID")
        except RowProblem as e:
            issues.append(Issue(where, e.field, e.message))
            continue
        if new:
            video: dict[str, Any] = {
                "type": "video", "id": vid, "path": find_video(found, root, f"{youtube_id}.mp4"),
                **original_id(vid, youtube_id),
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
    root = absolute(video_root if video_root is not None else p.parent / "videos")
    split = split if split is not None else (split_from_name(p) or "test")
    rows, row_issues = _rows(records, root, split)
    return finish(rows, issues + row_issues)
