"""MLVU dev-set annotations (``MLVU/MVLU`` on Hugging Face).

One JSON file per task (``1_plotQA.json``, ``2_needle.json``, ...), each a list of
questions: ``video`` (the file name, ``"movie101_66.mp4"``), ``duration`` (seconds),
``question``, ``candidates`` (option texts), ``answer`` (the right candidate's text) and
``question_type`` (``"plotQA"``). The open-ended tasks (``8_sub_scene.json``,
``9_summary.json``) have no ``candidates``: such a file is reported as one issue and left
out, so ``json/*.json`` can be passed whole.

MLVU has no question ids; ours is ``<video id>_<question_type>_<index>``, the index being
the question's 0-based position in its file's list (its line number in a ``.jsonl`` file).
Video ids are the file stems made safe (dots become ``_``); the category is
``question_type``; ``duration`` is the video's. Videos are looked up under ``video_root`` by
file stem (recursively: the dataset ships them in one folder per task); a video that is not
found keeps the path ``<video_root>/<video>`` and fails at decode time, recorded like any
broken video. A ``video`` that is absolute or climbs out of ``video_root`` with ``..`` is an
issue, and so are two file stems that become the same video id once made safe (``a.b``,
``a_b``); a changed id keeps the stem in the video's ``original_id``. Issues name the row as
``file:index``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stores.ids import MAX_ID_BYTES, safe_component
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
    seconds,
    split_from_name,
    string_list,
    text_field,
    video_index,
)
from stores.manifest import Issue, Manifest

REQUIRED_FIELDS = ("video", "question", "answer", "question_type")


def _answer_index(answer: str, options: list[str]) -> int:
    matches = [i for i, option in enumerate(options) if option.strip() == answer]
    if len(matches) != 1:
        which = "none" if not matches else f"{len(matches)}"
        raise RowProblem("answer", f"{answer!r} matches {which} of the candidates")
    return matches[0]


def import_mlvu(
    paths: str | os.PathLike[str] | list[str | os.PathLike[str]],
    video_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> Manifest:
    """MLVU multiple-choice questions from one or more task files, and their videos.

    ``video_root`` defaults to ``videos/`` beside the first annotation file; ``split`` to
    the one in the file name, else ``dev`` (these files are MLVU's dev set)."""
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    root = absolute(video_root if video_root is not None
                    else (files[0].parent if files else Path()) / "videos")
    found = video_index(root)
    out: list[tuple[str, dict[str, Any]]] = []
    issues: list[Issue] = []
    made = DerivedIds()
    for path in files:
        records, file_issues = read_records(path, "MLVU")
        issues.extend(file_issues)
        check_fields_present(path, records, REQUIRED_FIELDS, "MLVU")
        if records and not any("candidates" in row for _, row in records):
            issues.append(Issue(str(path), "candidates", "no row has candidates: an "
                                "open-ended task, not multiple choice; file left out"))
            continue
        file_split = split if split is not None else (split_from_name(path) or "dev")
        for where, row in records:
            index = where.rpartition(":")[2]  # position in a .json list, line in a .jsonl
            try:
                video_name = inside_root(text_field(row, "video"), "video")
                duration = seconds(row, "duration")
                question = text_field(row, "question")
                qtype = text_field(row, "question_type")
                options = string_list(row, "candidates")
                answer = _answer_index(text_field(row, "answer"), options)
                stem = Path(video_name).stem
                vid, new = made.make(stem, "video")
            except RowProblem as e:
                issues.append(Issue(where, e.field, e.message))
                continue
            if new:
                video: dict[str, Any] = {
                    "type": "video", "id": vid, "path": find_video(found, root, video_name),
                    "split": file_split, **original_id(vid, stem),
                }
                if duration is not None:
                    video["duration"] = duration
                out.append((where, video))
            out.append((where, {
                "type": "question", "qid": safe_component(f"{vid}_{qtype}_{index}", MAX_ID_BYTES),
                "video_id": vid, "question": question, "options": options, "answer": answer,
                "category": qtype, "split": file_split,
            }))
    return finish(out, issues)
