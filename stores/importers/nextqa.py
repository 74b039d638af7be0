"""NExT-QA and NExT-GQA annotations.

NExT-QA CSV columns: ``video_id, frame_count, width, height, question, answer, qid, type,
a0..a4``. ``answer`` is the right option's text in the released files (an index is accepted
too); ``qid`` counts questions within a video, so our question id is ``{video_id}_{qid}``.
NExT-GQA uses the same CSV plus ``gsub_*.json``:
``{video_id: {"duration", "fps", "location": {qid: [[start, end], ...]}}}`` — human-marked
evidence spans in seconds, attached here to their questions.

Videos are looked up under ``video_root`` by file name (``<video_id>.<ext>``, recursively,
as the dataset ships them in sub-folders); a video that is not found keeps the path
``<video_root>/<video_id>.mp4`` and fails at decode time, recorded like any broken video.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from stores.errors import UserError
from stores.ids import id_problem
from stores.importers.records import absolute, read_text, video_index
from stores.manifest import Issue, Manifest, build_manifest, sort_issues

OPTION_COLUMNS = ("a0", "a1", "a2", "a3", "a4")
REQUIRED_COLUMNS = ("video_id", "question", "answer", "qid", *OPTION_COLUMNS)


def _answer_index(answer: str, options: list[str]) -> int:
    """The answer as an index: an integer column, or the text of exactly one option."""
    text = answer.strip()
    if text.isdigit():
        return int(text)
    matches = [i for i, o in enumerate(options) if o.strip() == text]
    if len(matches) != 1:
        which = "none" if not matches else f"{len(matches)}"
        raise ValueError(f"{text!r} matches {which} of the options")
    return matches[0]


def _split_from_name(path: Path) -> str | None:
    for split in ("train", "val", "test"):
        if split in path.stem.lower().split("_"):
            return split
    return None


def _csv(csv_path: Path) -> csv.DictReader:
    """The CSV's rows (UTF-8, with or without a byte-order mark; another encoding is one
    line naming the file)."""
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: annotation file not found")
    return csv.DictReader(io.StringIO(read_text(csv_path), newline=""))


def _read_rows(csv_path: Path) -> tuple[list[tuple[str, dict[str, str]]], list[Issue]]:
    reader = _csv(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise UserError(
            f"{csv_path}: not a NExT-QA CSV (missing columns: {', '.join(missing)})"
        )
    rows: list[tuple[str, dict[str, str]]] = []
    issues: list[Issue] = []
    for row in reader:
        where = f"{csv_path}:{reader.line_num}"
        empty = [c for c in REQUIRED_COLUMNS if not (row.get(c) or "").strip()]
        if empty:
            issues.append(Issue(where, empty[0], "empty or missing column"))
        elif bad_id := id_problem(row["video_id"].strip(), allow_dot=False):
            issues.append(Issue(where, "video_id", f"{row['video_id']!r} {bad_id}"))
        else:
            rows.append((where, row))
    return rows, issues


def _to_manifest(
    csv_path: Path,
    video_root: Path | None,
    split: str | None,
    durations: dict[str, float],
    spans: dict[tuple[str, str], list[list[float]]],
) -> Manifest:
    rows, issues = _read_rows(csv_path)
    root = absolute(video_root if video_root is not None else csv_path.parent / "videos")
    found = video_index(video_root)
    split = split if split is not None else _split_from_name(csv_path)
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for where, row in rows:
        vid = row["video_id"].strip()
        if vid not in seen:
            seen.add(vid)
            video: dict[str, Any] = {
                "type": "video", "id": vid, "path": str(found.get(vid, root / f"{vid}.mp4")),
            }
            if vid in durations:
                video["duration"] = durations[vid]
            for column in ("frame_count", "width", "height"):
                if (row.get(column) or "").strip().isdigit():
                    video[column] = int(row[column])
            if split:
                video["split"] = split
            out.append((where, video))
        options = [row[c] for c in OPTION_COLUMNS]
        try:
            answer = _answer_index(row["answer"], options)
        except ValueError as e:
            issues.append(Issue(where, "answer", str(e)))
            continue
        question: dict[str, Any] = {
            "type": "question", "qid": f"{vid}_{row['qid'].strip()}", "video_id": vid,
            "question": row["question"], "options": options, "answer": answer,
        }
        if (vid, row["qid"].strip()) in spans:
            question["evidence"] = spans[(vid, row["qid"].strip())]
        if (row.get("type") or "").strip():
            question["category"] = row["type"].strip()
        if split:
            question["split"] = split
        out.append((where, question))
    manifest = build_manifest(out)
    manifest.issues = sort_issues(issues + manifest.issues)
    return manifest


def import_nextqa(
    csv_path: str | os.PathLike[str],
    video_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> Manifest:
    """NExT-QA multiple-choice questions (every row of e.g. ``val.csv``) and their videos."""
    root = absolute(video_root) if video_root is not None else None
    return _to_manifest(Path(csv_path), root, split, {}, {})


SPAN_RESOLUTION = 0.1  # seconds: NExT-GQA spans are written with one decimal


def _clip(span: list[float], duration: float | None) -> list[float]:
    if (
        duration is not None and isinstance(span, list) and len(span) == 2
        and all(isinstance(x, (int, float)) for x in span)
        and duration < span[1] <= duration + SPAN_RESOLUTION and span[0] <= duration
    ):
        return [span[0], duration]
    return span


def import_nextgqa(
    csv_path: str | os.PathLike[str],
    gsub_path: str | os.PathLike[str],
    video_root: str | os.PathLike[str] | None = None,
    split: str | None = None,
) -> Manifest:
    """NExT-GQA questions with their evidence spans attached.

    A video's duration is ``frame_count / fps`` when the CSV and the JSON give both (the
    JSON's own ``duration`` is rounded to whole seconds), else the JSON's ``duration``.
    The spans are marked to 0.1 s, so an end up to 0.1 s past the video's last frame means
    "until the end" and is clipped to the duration; a span further out is reported as an
    issue, like any invalid span.
    """
    gsub = Path(gsub_path)
    if not gsub.is_file():
        raise UserError(f"{gsub}: evidence file not found")
    try:
        grounding = json.loads(read_text(gsub))
    except json.JSONDecodeError as e:
        raise UserError(f"{gsub}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(grounding, dict):
        raise UserError(f"{gsub}: expected an object keyed by video id")
    frame_counts: dict[str, int] = {}
    for row in _csv(Path(csv_path)):
        if (row.get("frame_count") or "").strip().isdigit():
            frame_counts[(row.get("video_id") or "").strip()] = int(row["frame_count"])
    durations: dict[str, float] = {}
    spans: dict[tuple[str, str], list[list[float]]] = {}
    for vid, entry in grounding.items():
        if not isinstance(entry, dict):
            continue
        fps, duration = entry.get("fps"), entry.get("duration")
        if isinstance(fps, (int, float)) and fps > 0 and vid in frame_counts:
            durations[vid] = round(frame_counts[vid] / fps, 6)
        elif isinstance(duration, (int, float)) and duration > 0:
            durations[vid] = float(duration)
        for qid, qspans in (entry.get("location") or {}).items():
            spans[(vid, str(qid))] = [_clip(span, durations.get(vid)) for span in qspans]
    root = absolute(video_root) if video_root is not None else None
    return _to_manifest(Path(csv_path), root, split, durations, spans)
