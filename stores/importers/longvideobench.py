"""LongVideoBench annotations (``longvideobench/LongVideoBench`` on Hugging Face).

``lvb_val.json`` is a JSON list with one object per question: ``video_id``, ``video_path``
(the file name inside the dataset's ``videos/`` folder, ``"86CxyhFV9MI.mp4"``),
``duration`` (seconds), ``question``, ``candidates`` (4 or 5 option texts),
``correct_choice`` (the right candidate's index), ``id`` (the question id),
``question_category``, ``topic_category``, ``level``, ``position``,
``starting_timestamp_for_subtitles``, ``view_count`` and ``subtitle_path``. The test file
(``lvb_test_wo_gt.json``) has no ``correct_choice`` and is refused: a manifest question needs
its answer.

The question id is ``id``, the category ``question_category``, the video's duration
``duration``. The video row keeps ``topic_category``, ``view_count``, ``subtitle_path`` and
``starting_timestamp_for_subtitles`` in its ``meta``; the question keeps ``level``,
``position`` and ``question_wo_referring_query`` (where given) in its ``meta``.

The video is ``<video_root>/<video_path>``; when that file is not there it is looked up by
file stem under ``video_root`` (recursively), and when that fails too the row keeps the path
``<video_root>/<video_path>`` and fails at decode time, recorded like any broken video.
A ``video_path`` that is absolute or climbs out of ``video_root`` with ``..`` is an issue (an
annotation file must not make refocus read any file on the machine), and so is a
``video_id`` that becomes the same video id as another one once made safe (``a.b``,
``a_b``); a changed id keeps the dataset's own in the video's ``original_id``.
Issues name the row as ``file:index``, its 0-based position in the list.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stores.errors import UserError
from stores.importers.records import (
    DerivedIds,
    RowProblem,
    absolute,
    check_fields_present,
    finish,
    inside_root,
    original_id,
    read_records,
    seconds,
    split_from_name,
    string_list,
    text_field,
    video_index,
)
from stores.manifest import Issue, Manifest

REQUIRED_FIELDS = ("video_id", "video_path", "question", "candidates", "id")
VIDEO_META = ("topic_category", "view_count", "subtitle_path", "starting_timestamp_for_subtitles")
QUESTION_META = ("level", "position", "question_wo_referring_query")


def _choice(row: dict[str, Any], count: int) -> int:
    value = row.get("correct_choice")
    if value is None:
        raise RowProblem("correct_choice", "missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RowProblem("correct_choice", f"must be an integer index, got {value!r}")
    if not 0 <= value < count:
        raise RowProblem("correct_choice",
                         f"index {value} out of range for {count} candidates")
    return value


def _video_path(found: dict[str, Path], root: Path, name: str) -> str:
    direct = root / name
    if direct.is_file():
        return str(direct)
    return str(found.get(Path(name).stem, direct))


def import_longvideobench(
    path: str | os.PathLike[str],
    video_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> Manifest:
    """LongVideoBench multiple-choice questions (e.g. ``lvb_val.json``) and their videos.

    ``video_root`` defaults to ``videos/`` beside the annotation file, as the dataset ships;
    ``split`` to the one in the file name (``val`` for ``lvb_val.json``)."""
    p = Path(path)
    records, issues = read_records(p, "LongVideoBench")
    check_fields_present(p, records, REQUIRED_FIELDS, "LongVideoBench")
    if records and not any("correct_choice" in row for _, row in records):
        raise UserError(f"{p}: no row has 'correct_choice' (the test set's answers are not "
                        "published; import an annotated file such as lvb_val.json)")
    root = absolute(video_root if video_root is not None else p.parent / "videos")
    split = split if split is not None else split_from_name(p)
    found = video_index(root)
    out: list[tuple[str, dict[str, Any]]] = []
    made = DerivedIds()
    for where, row in records:
        try:
            video_id = text_field(row, "video_id")
            video_path = inside_root(text_field(row, "video_path"), "video_path")
            duration = seconds(row, "duration")
            qid = text_field(row, "id")
            question = text_field(row, "question")
            options = string_list(row, "candidates")
            answer = _choice(row, len(options))
            vid, new = made.make(video_id, "video_id")
        except RowProblem as e:
            issues.append(Issue(where, e.field, e.message))
            continue
        if new:
            video: dict[str, Any] = {
                "type": "video", "id": vid, "path": _video_path(found, root, video_path),
                **original_id(vid, video_id),
            }
            if duration is not None:
                video["duration"] = duration
            if split:
                video["split"] = split
            video.update({k: row[k] for k in VIDEO_META if row.get(k) is not None})
            out.append((where, video))
        item: dict[str, Any] = {
            "type": "question", "qid": qid, "video_id": vid, "question": question,
            "options": options, "answer": answer,
        }
        category = row.get("question_category")
        if isinstance(category, str) and category.strip():
            item["category"] = category.strip()
        if split:
            item["split"] = split
        item.update({k: row[k] for k in QUESTION_META if row.get(k) is not None})
        out.append((where, item))
    return finish(out, issues)
