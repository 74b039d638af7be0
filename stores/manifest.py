"""The corpus manifest: one JSONL file listing videos and the questions asked about them.

A row is a JSON object. Video rows::

    {"type": "video", "id": "v001", "path": "videos/v001.mp4", "duration": 31.2, "split": "train"}

Question rows::

    {"type": "question", "qid": "v001_q0", "video_id": "v001", "question": "What colour ...?",
     "options": ["red", "green", "blue", "yellow"], "answer": 2,
     "evidence": [[4.0, 5.5]], "split": "train", "category": "colour"}

``type`` may be left out: a row with ``qid`` is a question, one with ``id`` a video.
``duration``, ``split``, ``evidence`` and ``category`` are optional; any other field is kept
in ``meta``. Relative paths are relative to the manifest's folder. Rows are validated one by
one: a bad row becomes an :class:`Issue` (``file:line: field: what is wrong``) and is left
out, and every good row still loads.

Sizes are capped (:data:`MAX_LINE_CHARS`, :data:`MAX_QUESTION_CHARS`,
:data:`MAX_OPTION_CHARS`, :data:`MAX_OPTIONS`): a row over a cap is an issue like any other,
and an over-long line is skipped without being held in memory whole.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from stores.errors import UserError
from stores.ids import id_problem
from stores.urls import NetworkSettings, is_url, url_problem

# Caps on what one row may hold. A question becomes one text embedding per option, and the
# reference LMM names options by letter (A–J), so a row past these is refused, not truncated.
MAX_LINE_CHARS = 1 << 20  # characters in one JSONL line (1 Mi)
MAX_QUESTION_CHARS = 4096  # characters in a question
MAX_OPTION_CHARS = 1024  # characters in one option
MAX_OPTIONS = 10  # options per question (letters A–J)

VIDEO_FIELDS = {"type", "id", "path", "duration", "split"}
QUESTION_FIELDS = {
    "type", "qid", "video_id", "question", "options", "answer", "evidence", "split", "category",
}


def _row(**fields: Any) -> dict[str, Any]:
    """A manifest row: the fields that are set, in the order given."""
    return {k: v for k, v in fields.items() if v is not None}


@dataclass(frozen=True)
class Video:
    """One video of a corpus. ``path`` is absolute, or a URL PyAV can open."""

    id: str
    path: str
    duration: float | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_row(self) -> dict[str, Any]:
        return _row(type="video", id=self.id, path=self.path, duration=self.duration,
                    split=self.split, **self.meta)


@dataclass(frozen=True)
class Question:
    """A multiple-choice question about one video; ``answer`` indexes ``options``.

    ``evidence`` holds the spans (start, end) in seconds where the answer can be seen.
    """

    qid: str
    video_id: str
    question: str
    options: tuple[str, ...]
    answer: int
    evidence: tuple[tuple[float, float], ...] = ()
    split: str | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_row(self) -> dict[str, Any]:
        return _row(
            type="question", qid=self.qid, video_id=self.video_id, question=self.question,
            options=list(self.options), answer=self.answer,
            evidence=[list(span) for span in self.evidence] or None, split=self.split,
            category=self.category, **self.meta,
        )


@dataclass(frozen=True)
class Issue:
    """A row that could not be used: where it is, which field, and what is wrong."""

    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}"


@dataclass
class Manifest:
    """Validated videos and questions, plus the issues of the rows that were left out."""

    videos: list[Video] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    def video(self, video_id: str) -> Video:
        for v in self.videos:
            if v.id == video_id:
                return v
        raise KeyError(video_id)


class _RowError(Exception):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


def _require(row: dict[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise _RowError(name, "missing")
    return row[name]


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _RowError(name, f"must be a finite number, got {value!r}")
    return float(value)


def _optional_str(row: dict[str, Any], name: str) -> str | None:
    value = row.get(name)
    if value is not None and not isinstance(value, str):
        raise _RowError(name, f"must be a string, got {type(value).__name__}")
    return value


def _check_id(value: Any, name: str, *, allow_dot: bool = True) -> str:
    problem = id_problem(value, allow_dot=allow_dot)
    if problem is not None:
        raise _RowError(name, f"{value!r} {problem}")
    return value


def _resolve_path(path: str, base: Path | None) -> str:
    if is_url(path) or base is None:
        return path
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p).resolve())


def _parse_video(row: dict[str, Any], base: Path | None,
                 network: NetworkSettings | None) -> Video:
    vid = _check_id(_require(row, "id"), "id", allow_dot=False)
    path = _require(row, "path")
    if not isinstance(path, str) or not path:
        raise _RowError("path", f"must be a non-empty string, got {path!r}")
    problem = url_problem(path, network) if network is not None else None
    if problem is not None:
        raise _RowError("path", problem)
    duration = row.get("duration")
    if duration is not None:
        duration = _number(duration, "duration")
        if duration <= 0:
            raise _RowError("duration", f"must be positive, got {duration}")
    meta = {k: v for k, v in row.items() if k not in VIDEO_FIELDS}
    return Video(vid, _resolve_path(path, base), duration, _optional_str(row, "split"), meta)


def _parse_question(row: dict[str, Any], videos: dict[str, Video]) -> Question:
    qid = _check_id(_require(row, "qid"), "qid")
    video_id = _require(row, "video_id")
    if not isinstance(video_id, str):
        raise _RowError("video_id", f"must be a string, got {type(video_id).__name__}")
    if video_id not in videos:
        raise _RowError("video_id", f"unknown video {video_id!r} (no video row with this id)")
    text = _require(row, "question")
    if not isinstance(text, str) or not text.strip():
        raise _RowError("question", "must be a non-empty string")
    if len(text) > MAX_QUESTION_CHARS:
        raise _RowError("question", f"{len(text)} characters, over the cap of "
                                    f"{MAX_QUESTION_CHARS}")
    options = _require(row, "options")
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise _RowError("options", "must be a list of strings")
    if len(options) < 2:
        raise _RowError("options", f"needs at least 2 options, got {len(options)}")
    if len(options) > MAX_OPTIONS:
        raise _RowError("options", f"at most {MAX_OPTIONS} options, got {len(options)}")
    for i, option in enumerate(options):
        if len(option) > MAX_OPTION_CHARS:
            raise _RowError("options", f"option {i} has {len(option)} characters, over the "
                                       f"cap of {MAX_OPTION_CHARS}")
    answer = _require(row, "answer")
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise _RowError("answer", f"must be an integer index into options, got {answer!r}")
    if not 0 <= answer < len(options):
        raise _RowError("answer", f"index {answer} out of range for {len(options)} options")
    duration = videos[video_id].duration
    spans: list[tuple[float, float]] = []
    for span in row.get("evidence") or []:
        if not isinstance(span, (list, tuple)) or len(span) != 2:
            raise _RowError("evidence", f"each span must be [start, end], got {span!r}")
        start, end = _number(span[0], "evidence"), _number(span[1], "evidence")
        if start < 0 or end < start or (duration is not None and end > duration):
            limit = f"{duration:g}" if duration is not None else "duration"
            raise _RowError(
                "evidence",
                f"span [{start:g}, {end:g}] outside [0, {limit}] s of video {video_id!r}",
            )
        spans.append((start, end))
    meta = {k: v for k, v in row.items() if k not in QUESTION_FIELDS}
    return Question(
        qid, video_id, text, tuple(options), answer, tuple(spans),
        _optional_str(row, "split"), _optional_str(row, "category"), meta,
    )


def _kind(row: dict[str, Any]) -> str:
    kind = row.get("type")
    if kind is None:
        if "qid" in row:
            return "question"
        if "id" in row:
            return "video"
        raise _RowError("type", "cannot tell a video row (needs 'id') from a question row ('qid')")
    if kind not in ("video", "question"):
        raise _RowError("type", f"must be 'video' or 'question', got {kind!r}")
    return kind


def build_manifest(
    rows: Iterable[tuple[str, dict[str, Any]]], base: Path | None = None,
    network: NetworkSettings | None = None,
) -> Manifest:
    """Validate ``(where, row)`` pairs into a :class:`Manifest`.

    ``where`` names the row's origin (``file:line``) for issues. Videos are read first, so
    a question may come before its video. Relative paths resolve against ``base``. With
    ``network``, a video path that is a URL it does not allow (``stores.urls``) is an issue;
    readers that never open the videos leave it out.
    Importers of other formats build their rows and call this, so every source gets the
    same checks.
    """
    manifest = Manifest()
    videos: dict[str, Video] = {}
    qids: set[str] = set()
    typed: list[tuple[str, str, dict[str, Any]]] = []
    for where, row in rows:
        try:
            if not isinstance(row, dict):
                raise _RowError("row", f"must be a JSON object, got {type(row).__name__}")
            typed.append((_kind(row), where, row))
        except _RowError as e:
            manifest.issues.append(Issue(where, e.field, e.message))
    for kind, where, row in typed:
        try:
            if kind == "video":
                video = _parse_video(row, base, network)
                if video.id in videos:
                    raise _RowError("id", f"duplicate video id {video.id!r}")
                videos[video.id] = video
                manifest.videos.append(video)
        except _RowError as e:
            manifest.issues.append(Issue(where, e.field, e.message))
    for kind, where, row in typed:
        try:
            if kind == "question":
                question = _parse_question(row, videos)
                if question.qid in qids:
                    raise _RowError("qid", f"duplicate question id {question.qid!r}")
                qids.add(question.qid)
                manifest.questions.append(question)
        except _RowError as e:
            manifest.issues.append(Issue(where, e.field, e.message))
    manifest.issues = sort_issues(manifest.issues)
    return manifest


def sort_issues(issues: Iterable[Issue]) -> list[Issue]:
    """Issues in file order (by source, then line number)."""

    def order(issue: Issue) -> tuple[str, int]:
        source, _, line = issue.where.rpartition(":")
        return (source, int(line)) if line.isdigit() else (issue.where, 0)

    return sorted(issues, key=order)


def _capped_lines(f: TextIO) -> Iterator[str | None]:
    """The lines of ``f``; None for one over :data:`MAX_LINE_CHARS`, whose rest is read
    through in pieces and dropped."""
    while line := f.readline(MAX_LINE_CHARS + 1):
        if len(line) <= MAX_LINE_CHARS or line.endswith("\n"):
            yield line
            continue
        while (rest := f.readline(MAX_LINE_CHARS)) and not rest.endswith("\n"):
            pass
        yield None


def read_manifest(path: str | os.PathLike[str],
                  network: NetworkSettings | None = None) -> Manifest:
    """Read and validate a JSONL manifest; bad rows become issues, good rows load. With
    ``network``, video URLs are checked against it (see ``build_manifest``)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: manifest not found")
    rows: list[tuple[str, dict[str, Any]]] = []
    unreadable: list[Issue] = []
    try:
        with open(p, encoding="utf-8") as f:
            for number, line in enumerate(_capped_lines(f), start=1):
                if line is None:
                    reason = f"line longer than the cap of {MAX_LINE_CHARS} characters"
                    unreadable.append(Issue(f"{p}:{number}", "row", reason))
                    continue
                if not line.strip():
                    continue
                try:
                    rows.append((f"{p}:{number}", json.loads(line)))
                except json.JSONDecodeError as e:
                    reason = f"not valid JSON ({e.msg} at column {e.colno})"
                    unreadable.append(Issue(f"{p}:{number}", "row", reason))
    except UnicodeDecodeError as e:
        raise UserError(f"{p}: not a UTF-8 text file ({e.reason})") from None
    manifest = build_manifest(rows, base=p.resolve().parent, network=network)
    manifest.issues = sort_issues(unreadable + manifest.issues)
    return manifest


def write_manifest(path: str | os.PathLike[str], manifest: Manifest) -> None:
    """Write videos then questions as JSONL, atomically (temporary file, then rename).

    Video paths inside the manifest's folder are written relative to it, so a corpus folder
    can be moved or copied whole; others stay absolute."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    base = p.parent.resolve()
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for item in [*manifest.videos, *manifest.questions]:
            row = item.to_row()
            if isinstance(item, Video) and "://" not in item.path:
                video_path = Path(item.path)
                if video_path.is_absolute() and video_path.is_relative_to(base):
                    row["path"] = video_path.relative_to(base).as_posix()
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, p)


def merge(manifests: Iterable[Manifest]) -> Manifest:
    """Combine manifests from several inputs; a repeated video or question id is an issue."""
    out = Manifest()
    seen_videos: set[str] = set()
    seen_qids: set[str] = set()
    for m in manifests:
        out.issues.extend(m.issues)
        for v in m.videos:
            if v.id in seen_videos:
                out.issues.append(Issue(v.path, "id", f"duplicate video id {v.id!r} across inputs"))
                continue
            seen_videos.add(v.id)
            out.videos.append(v)
        for q in m.questions:
            if q.qid in seen_qids:
                reason = f"duplicate question id {q.qid!r} across inputs"
                out.issues.append(Issue(q.qid, "qid", reason))
                continue
            seen_qids.add(q.qid)
            out.questions.append(q)
    return out
