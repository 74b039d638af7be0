"""Hand ``refocus score``'s selected frames to lmms-eval, in place of its uniform sampling.

lmms-eval (https://github.com/EvolvingLMMs-Lab/lmms-eval) asks each task's ``doc_to_visual``
for a document's visuals. Its stock video tasks return the video's path, and the model then
samples frames uniformly. The hooks here return the frames refocus chose instead, as a list of
RGB PIL images in time order; lmms-eval passes PIL images on to every image-capable model
(the "simple" models as ``visuals``, the chat models as one ``{"type": "image"}`` item each),
so the model sees exactly the selected frames and nothing else.

Everything needed is in the ``refocus score`` output folder: ``selections.jsonl`` (or
``.parquet``) says which frames each question gets, ``selections.json`` names the ingest folder
whose shards hold them (``stores/selections.py``). Nothing here needs lmms-eval, torch or PyAV:
reading is JSON, a byte range of a tar file and a JPEG decode.

A document is matched to its selection by its question id (a configurable field:
``question_id`` for Video-MME, ``id`` for LongVideoBench), and, when that is missing or
unknown, by (video, question text): the video field's value (``videoID``, ``video_id``,
``video_name``...) becomes a refocus video id the way the importers make them, and the
question must equal the selection's question up to spacing and case, or contain it (MLVU's
lmms-eval documents carry the options inside the question). Several selections that match
are told apart by their options; a document that matches none is a one-line
:class:`UserError` naming the question and the folder, never a silent uniform fallback.

Use from an lmms-eval task's ``utils.py`` (see ``pipelines/lmms_tasks``), or let the ``refocus``
model of :mod:`pipelines.lmms_plugin` route any task's requests through :class:`RequestRouter`::

    from pipelines.lmms_eval import make_doc_to_visual
    videomme_refocus_doc_to_visual = make_doc_to_visual(id_field="question_id")

with ``REFOCUS_SELECTIONS=/path/to/score/output`` in the environment.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from stores.errors import UserError
from stores.frames import FrameTooLarge, decode_frame
from stores.ids import safe_component
from stores.importers.videomme import strip_letters
from stores.selections import FrameSelection, read_meta, read_selections
from stores.shards import Sample, SampleLocation, ShardSet

LOG = logging.getLogger(__name__)
SELECTIONS_ENV = "REFOCUS_SELECTIONS"
SHARDS_ENV = "REFOCUS_SHARDS"  # optional: where the shards are now, if they moved
DEFAULT_VIDEO_FIELDS = ("videoID", "video_id", "video_name", "video", "video_path")
DEFAULT_QUESTION_FIELDS = ("question",)
DEFAULT_OPTION_FIELDS = ("options", "candidates")
_VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg"}


@dataclass(frozen=True)
class SelectedImages:
    """One question's selected frames, decoded: RGB images and their times, in time order.

    A frame that cannot be decoded within refocus's pixel cap is left out of ``images``,
    ``timestamps`` and ``frame_indices`` alike and named in ``failed`` (and logged)."""

    qid: str
    video_id: str
    images: list[Image.Image]
    timestamps: list[float]  # seconds in the source video, ascending
    frame_indices: list[int]  # positions in the video's shard sample
    failed: list[str] = field(default_factory=list)  # one line per frame left out
    fps: float | None = None  # the source video's frame rate, when ingest recorded it
    duration: float | None = None  # the source video's length in seconds, when recorded


def _norm_text(text: Any) -> str:
    return " ".join(str(text).split()).casefold()


def _norm_options(options: Any) -> tuple[str, ...] | None:
    if not isinstance(options, (list, tuple)) or not options:
        return None
    return tuple(_norm_text(o) for o in strip_letters([str(o) for o in options]))


def linspace_indices(n: int, k: int) -> list[int]:
    """``k`` positions evenly spaced over ``n`` frames, first and last included, as lmms-eval
    samples videos (``np.linspace(0, n - 1, k, dtype=int)``); all ``n`` when ``k >= n``.

    Not :func:`refocus.selectors.uniform_indices`, which takes the middle of ``k`` equal
    parts: this is lmms-eval's own way, so that the baseline matches the stock tasks."""
    if k <= 0 or n <= 0:
        return []
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    step = (n - 1) / (k - 1)  # the same float arithmetic as numpy's linspace
    return [int(i * step) for i in range(k - 1)] + [n - 1]


def _positive(meta: Mapping[str, Any], key: str) -> float | None:
    value = meta.get(key)
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def video_id_candidates(value: Any) -> list[str]:
    """The refocus video ids a document's video field may stand for: the value itself, as
    the importers make ids from it (``safe_component``), and without a folder or extension
    (MLVU's ``video_name`` is a file name)."""
    text = str(value).strip()
    out = [text, safe_component(text)]
    path = Path(text.replace("\\", "/"))
    if path.suffix.lower() in _VIDEO_SUFFIXES:
        out += [safe_component(path.stem), safe_component(str(path.with_suffix("")))]
    seen: list[str] = []
    for candidate in out:
        if candidate and candidate not in seen:
            seen.append(candidate)
    return seen


class SelectedFrames:
    """Read access to a ``refocus score`` output folder: selections by question, frames decoded.

    ``shards`` overrides the ingest folder that ``selections.json`` names (also settable with
    ``REFOCUS_SHARDS``). The named folder is tried as given, then relative to the selections
    folder, then as a folder of the same name inside it (a score folder moved whole).
    The shard set is opened once, and each video's sample is read once and kept in a small
    LRU (``cache_videos`` samples), so questions about the same video read its shard once.
    """

    def __init__(self, folder: str | os.PathLike[str], *, shards: str | os.PathLike[str] | None
                 = None, cache_videos: int = 16) -> None:
        self.folder = Path(folder)
        if not self.folder.exists():
            raise UserError(f"{self.folder}: no such folder (expected a refocus score output "
                            f"folder; set {SELECTIONS_ENV})")
        rows = read_selections(self.folder)
        self._shards_override = shards if shards is not None else os.environ.get(SHARDS_ENV)
        self._by_qid: dict[str, FrameSelection] = {}
        self._by_video: dict[str, list[FrameSelection]] = {}
        for row in rows:
            self._by_qid[row.qid] = row
            self._by_video.setdefault(row.video_id, []).append(row)
        self._shard_set: ShardSet | None = None
        self._locations: dict[str, SampleLocation] = {}
        self._samples: OrderedDict[str, Sample] = OrderedDict()
        self._cache_videos = max(1, cache_videos)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._by_qid)

    def __contains__(self, qid: object) -> bool:
        return qid in self._by_qid

    # -- finding a question's selection ------------------------------------------------------

    def selection(self, qid: str) -> FrameSelection:
        """The selection of ``qid``; a :class:`UserError` naming it and the folder if none."""
        row = self._by_qid.get(str(qid))
        if row is None:
            raise UserError(f"question {qid!r} has no selection in {self.folder} (score it with "
                            "refocus score, or check which document field holds the question id)")
        return row

    def find(self, video: Any, question: Any, options: Any = None) -> FrameSelection | None:
        """The selection for ``question`` about ``video`` (a document's video field), or None.

        The question matches when it equals a selection's question up to spacing and case,
        or else contains it; several matches are told apart by ``options``."""
        rows: list[FrameSelection] = []
        for vid in video_id_candidates(video):
            rows = self._by_video.get(vid, [])
            if rows:
                break
        if not rows:
            return None
        wanted = _norm_text(question)
        matches = [r for r in rows if _norm_text(r.question) == wanted]
        if not matches:
            matches = [r for r in rows if r.question.strip() and _norm_text(r.question) in wanted]
        if len(matches) > 1:
            opts = _norm_options(options)
            if opts is not None:
                by_options = [r for r in matches if _norm_options(r.options) == opts]
                matches = by_options or matches
        if len(matches) > 1 and len({tuple(r.frame_indices) for r in matches}) > 1:
            qids = ", ".join(sorted(r.qid for r in matches)[:5])
            raise UserError(f"question {str(question)[:60]!r} about video {str(video)!r} matches "
                            f"several selections in {self.folder} ({qids}); match by question id")
        return matches[0] if matches else None

    def for_doc(self, doc: Mapping[str, Any], *,
                id_field: str | Sequence[str] | None = "question_id",
                video_fields: Sequence[str] = DEFAULT_VIDEO_FIELDS,
                question_fields: Sequence[str] = DEFAULT_QUESTION_FIELDS,
                option_fields: Sequence[str] = DEFAULT_OPTION_FIELDS) -> FrameSelection:
        """The selection for an lmms-eval document: by ``doc[id_field]`` (or the first of
        several id fields that holds a scored id), else by its video and question.
        A :class:`UserError` naming the question and the folder when neither works."""
        id_fields = (id_field,) if isinstance(id_field, str) else tuple(id_field or ())
        ids = [str(doc[f]) for f in id_fields if doc.get(f) is not None]
        for qid in ids:
            if qid in self._by_qid:
                return self._by_qid[qid]
        qid = ids[0] if ids else None
        video = next((doc[f] for f in video_fields if doc.get(f) not in (None, "")), None)
        question = next((doc[f] for f in question_fields if doc.get(f) not in (None, "")), None)
        options = next((doc[f] for f in option_fields if doc.get(f) is not None), None)
        if video is not None and question is not None:
            row = self.find(video, question, options)
            if row is not None:
                return row
        if qid is not None:
            what = f"question {str(qid)!r}"
        elif video is not None:
            what = f"question {str(question)[:60]!r} about video {str(video)!r}"
        else:
            what = (f"document without {'/'.join(id_fields) or 'an id field'} or a video field "
                    f"({', '.join(video_fields)})")
        raise UserError(f"{what} has no selection in {self.folder} (score it with refocus "
                        "score, or check which document field holds the question id)")

    def has_doc(self, doc: Mapping[str, Any], **fields: Any) -> bool:
        """Whether :meth:`for_doc` finds a selection for ``doc`` (for filtering a benchmark
        down to the questions that were scored)."""
        try:
            self.for_doc(doc, **fields)
        except UserError:
            return False
        return True

    # -- reading frames ------------------------------------------------------------------------

    @property
    def shards(self) -> ShardSet:
        """The ingest folder's shard set, opened on first use."""
        with self._lock:
            if self._shard_set is None:
                self._shard_set = self._open_shards()
                self._locations = self._shard_set.lookup()
            return self._shard_set

    def _open_shards(self) -> ShardSet:
        if self._shards_override:
            named = Path(self._shards_override)
        else:
            named = Path(read_meta(self.folder).shards)
        # as named; relative to the selections; or, for a score folder that was moved or
        # copied whole, the folder of that name inside it (refocus score writes OUT/shards)
        candidates = [named] if named.is_absolute() else [named, self.folder / named]
        if not self._shards_override:
            candidates.append(self.folder / named.name)
        for candidate in candidates:
            if candidate.is_dir():
                return ShardSet(candidate)
        raise UserError(f"{self.folder}: the frame shards {str(named)!r} are not there (move "
                        f"them back, or set {SHARDS_ENV} to the ingest folder)")

    def sample(self, video_id: str) -> Sample:
        """A video's shard sample (metadata and JPEG frames), read once and kept in the LRU."""
        shard_set = self.shards
        with self._lock:
            sample = self._samples.get(video_id)
            if sample is not None:
                self._samples.move_to_end(video_id)
                return sample
        location = self._locations.get(video_id)
        if location is None:
            raise UserError(f"video {video_id!r} is not in the shards at {shard_set.directory} "
                            f"(the selections in {self.folder} were scored on other shards?)")
        sample = shard_set.read(video_id, location)
        with self._lock:
            self._samples[video_id] = sample
            self._samples.move_to_end(video_id)
            while len(self._samples) > self._cache_videos:
                self._samples.popitem(last=False)
        return sample

    def positions(self, row: FrameSelection, *, uniform: bool = False
                  ) -> tuple[list[int], list[float]]:
        """The frame positions and times a question gets: its selection's, or with
        ``uniform=True`` as many evenly spaced over its video's candidates."""
        if not uniform:
            return list(row.frame_indices), list(row.timestamps)
        times = self.sample(row.video_id).meta["timestamps"]
        indices = linspace_indices(len(times), len(row.frame_indices))
        return indices, [float(times[i]) for i in indices]

    def video_meta(self, video_id: str) -> tuple[float | None, float | None]:
        """A video's frame rate and duration as ingest recorded them (None when not)."""
        meta = self.sample(video_id).meta
        return _positive(meta, "fps"), _positive(meta, "duration")

    def images(self, row: FrameSelection, *, uniform: bool = False) -> SelectedImages:
        """Decode a selection's frames from its video's shard sample (RGB, time order).

        ``uniform=True`` gives the baseline instead: as many frames as were selected, evenly
        spaced over the same candidates (lmms-eval's ``np.linspace(0, n - 1, k, dtype=int)``),
        so that a comparison changes nothing but which frames the model sees."""
        sample = self.sample(row.video_id)
        jpegs = sample.frames
        indices, times = self.positions(row, uniform=uniform)
        out = SelectedImages(row.qid, row.video_id, [], [], [], fps=_positive(sample.meta, "fps"),
                             duration=_positive(sample.meta, "duration"))
        for index, time in zip(indices, times, strict=True):
            if not 0 <= index < len(jpegs):
                raise UserError(f"question {row.qid!r}: frame {index} is not in video "
                                f"{row.video_id!r}'s sample ({len(jpegs)} frames) in "
                                f"{self.shards.directory}")
            where = f"question {row.qid!r}: video {row.video_id!r} frame {index}"
            try:
                out.images.append(decode_frame(jpegs[index], where))
            except FrameTooLarge as e:
                out.failed.append(str(e))
                LOG.warning("left out: %s", e)
                continue
            out.timestamps.append(time)
            out.frame_indices.append(index)
        return out

    def frames(self, qid: str) -> SelectedImages:
        """The selected frames of question ``qid``."""
        return self.images(self.selection(qid))


# -- lmms-eval hooks ---------------------------------------------------------------------------

_READERS: dict[tuple[str, str | None], SelectedFrames] = {}
_READERS_LOCK = threading.Lock()


def reader_for(folder: str | os.PathLike[str] | None = None) -> SelectedFrames:
    """The process-wide :class:`SelectedFrames` of ``folder`` (default: ``$REFOCUS_SELECTIONS``).

    lmms-eval executes a task's ``utils.py`` afresh for every ``!function`` it resolves, so
    readers live here, in an ordinary module, and are shared by all of them."""
    if folder is None:
        folder = os.environ.get(SELECTIONS_ENV)
        if not folder:
            raise UserError(f"{SELECTIONS_ENV} is not set: point it at a refocus score output "
                            "folder (the one holding selections.jsonl)")
    key = (str(Path(folder).resolve()), os.environ.get(SHARDS_ENV))
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            reader = _READERS[key] = SelectedFrames(folder)
        return reader


def make_doc_to_visual(
    folder: str | os.PathLike[str] | None = None, *, id_field: str | None = "question_id",
    video_fields: Sequence[str] = DEFAULT_VIDEO_FIELDS,
    question_fields: Sequence[str] = DEFAULT_QUESTION_FIELDS,
    option_fields: Sequence[str] = DEFAULT_OPTION_FIELDS, frames: str = "selected",
) -> Callable[[Mapping[str, Any]], list[Image.Image]]:
    """An lmms-eval ``doc_to_visual``: document → its selected frames as RGB PIL images.

    The selections folder is ``folder`` or, when None, ``$REFOCUS_SELECTIONS`` read at the
    first call (so a task file can be loaded before the variable is set); ``id_field`` names
    the document's question id field, the other fields the fallback by video and question.
    ``frames="uniform"`` makes the baseline hook: as many frames, evenly spaced over the same
    candidates, through the same path to the model.
    """
    if frames not in ("selected", "uniform"):
        raise ValueError(f"frames must be 'selected' or 'uniform', got {frames!r}")
    fields = {"id_field": id_field, "video_fields": tuple(video_fields),
              "question_fields": tuple(question_fields), "option_fields": tuple(option_fields)}
    uniform = frames == "uniform"

    def doc_to_visual(doc: Mapping[str, Any]) -> list[Image.Image]:
        reader = reader_for(folder)
        return reader.images(reader.for_doc(doc, **fields), uniform=uniform).images

    doc_to_visual.__doc__ = (f"refocus's {frames} frames for a document (question id field "
                             f"{id_field!r}; selections from {folder or '$' + SELECTIONS_ENV}).")
    return doc_to_visual


def make_doc_to_timestamps(
    folder: str | os.PathLike[str] | None = None, *, id_field: str | None = "question_id",
    video_fields: Sequence[str] = DEFAULT_VIDEO_FIELDS,
    question_fields: Sequence[str] = DEFAULT_QUESTION_FIELDS,
    option_fields: Sequence[str] = DEFAULT_OPTION_FIELDS,
) -> Callable[[Mapping[str, Any]], list[float]]:
    """Like :func:`make_doc_to_visual`, for the frames' times in seconds (for prompts that
    tell the model when each frame was taken)."""
    fields = {"id_field": id_field, "video_fields": tuple(video_fields),
              "question_fields": tuple(question_fields), "option_fields": tuple(option_fields)}

    def doc_to_timestamps(doc: Mapping[str, Any]) -> list[float]:
        return list(reader_for(folder).for_doc(doc, **fields).timestamps)

    return doc_to_timestamps


def timestamps_line(timestamps: Sequence[float]) -> str:
    """``"The 3 frames were taken at 1.0s, 4.5s, 9.0s of the video."``"""
    times = ", ".join(f"{t:.1f}s" for t in timestamps)
    n = len(timestamps)
    return f"The {n} frame{'s' if n != 1 else ''} {'were' if n != 1 else 'was'} taken at " \
           f"{times} of the video."


# -- the lmms-eval model wrapper's logic (pipelines/lmms_plugin.py is the lmms subclass) ----------

FRAMES_AS = ("video", "images")  # how frames reach the wrapped model
FRAME_SOURCES = ("selected", "uniform")  # the policy's frames, or the baseline's
DEFAULT_ID_FIELDS = ("question_id", "id")  # Video-MME, LongVideoBench; MLVU has none


@dataclass(frozen=True)
class DocPlan:
    """What one lmms-eval document gets: its selection, the frame positions and times, and
    the request metadata that says how the frames are to be taken."""

    row: FrameSelection
    frame_indices: list[int]
    timestamps: list[float]
    metadata: dict[str, Any]


def video_metadata(timestamps: Sequence[float], fps: float | None,
                   duration: float | None) -> dict[str, Any]:
    """lmms-eval's "frames as video" request metadata for frames taken at ``timestamps``.

    ``task_type: video`` with ``sample_frames`` makes a model that reads it (LLaVA-OneVision)
    encode the list of images as one video (pooled tokens per frame) instead of as many
    separate images; ``fps``, ``timestamps``, ``frames_indices`` (positions in the source
    video at its frame rate), ``total_num_frames`` and ``duration`` are the fields of a
    video's metadata that time-aware models (Qwen-VL) take their time positions from."""
    meta: dict[str, Any] = {"task_type": "video", "sample_frames": len(timestamps),
                            "timestamps": [float(t) for t in timestamps]}
    if fps is not None:
        meta["fps"] = fps
        meta["frames_indices"] = [int(round(t * fps)) for t in timestamps]
    if duration is not None:
        meta["duration"] = duration
        if fps is not None:
            meta["total_num_frames"] = max(1, int(round(duration * fps)))
    return meta


class RequestRouter:
    """Put refocus's frames in front of a wrapped lmms-eval model, for any video task.

    lmms-eval hands a model ``Instance`` requests whose ``arguments`` end with
    ``(doc_id, task, split)`` and carry the task's visual hook: ``doc_to_visual`` third for
    the "simple" models, ``doc_to_messages`` second for the chat models. :meth:`route`
    looks every request's document up (``task_dict[task][split][doc_id]``), finds its
    selection, and returns copies whose hook gives the selected frames instead (decoded when
    the model asks), with :func:`video_metadata` added to the request metadata when
    ``frames_as="video"``. A document without a selection stops the run before the model
    sees anything (:class:`UserError` naming it). Requests are grouped by frame count, so a
    model that reads the first request's metadata for a whole call reads the right count.
    """

    def __init__(self, reader: SelectedFrames, *, frames_as: str = "video",
                 frames: str = "selected",
                 id_fields: Sequence[str] = DEFAULT_ID_FIELDS) -> None:
        if frames_as not in FRAMES_AS:
            raise UserError(f"frames_as={frames_as!r}: use one of {', '.join(FRAMES_AS)}")
        if frames not in FRAME_SOURCES:
            raise UserError(f"frames={frames!r}: use one of {', '.join(FRAME_SOURCES)}")
        self.reader = reader
        self.as_video = frames_as == "video"
        self.uniform = frames == "uniform"
        self.id_fields = tuple(id_fields)

    def plan(self, doc: Mapping[str, Any]) -> DocPlan:
        """The frames and request metadata of one document (no decoding)."""
        row = self.reader.for_doc(doc, id_field=self.id_fields)
        indices, times = self.reader.positions(row, uniform=self.uniform)
        metadata = video_metadata(times, *self.reader.video_meta(row.video_id)) \
            if self.as_video else {}
        return DocPlan(row, indices, times, metadata)

    def images(self, plan: DocPlan) -> list[Image.Image]:
        """The plan's frames, decoded (RGB, time order)."""
        return self.reader.images(plan.row, uniform=self.uniform).images

    def plans(self, requests: Sequence[Any], task_dict: Mapping[str, Any]) -> list[DocPlan]:
        """Every request's plan, or one :class:`UserError` naming the first document without
        a selection and how many there are (nothing is decoded, no model call is made)."""
        plans: list[DocPlan | None] = []
        missing: list[str] = []
        for request in requests:
            doc_id, task, split = request.arguments[-3:]
            try:
                plans.append(self.plan(task_dict[task][split][doc_id]))
            except UserError as e:
                plans.append(None)
                if not missing:
                    missing.append(f"task {task!r} doc {doc_id}: {e}")
                else:
                    missing.append("")
        if missing:
            raise UserError(f"{len(missing)} of {len(requests)} requests have no selection "
                            f"(refocus does not fall back to other frames); first: {missing[0]}")
        return [p for p in plans if p is not None]

    def route(self, requests: Sequence[Any], task_dict: Mapping[str, Any], *, simple: bool
              ) -> list[list[tuple[int, Any]]]:
        """The requests rewritten to carry refocus's frames, grouped by frame count:
        ``[[(position in requests, new request), ...], ...]``."""
        groups: dict[int, list[tuple[int, Any]]] = {}
        for position, (request, plan) in enumerate(
                zip(requests, self.plans(requests, task_dict), strict=True)):
            args = list(request.arguments)
            if simple:
                args[2] = self._doc_to_visual(plan)
            else:
                args[1] = self._doc_to_messages(plan, args[1])
            rewritten = replace(request, arguments=tuple(args),
                                metadata={**request.metadata, **plan.metadata})
            groups.setdefault(len(plan.frame_indices), []).append((position, rewritten))
        return [groups[n] for n in sorted(groups)]

    def _doc_to_visual(self, plan: DocPlan) -> Callable[[Any], list[Image.Image]]:
        def doc_to_visual(doc: Any) -> list[Image.Image]:
            return self.images(plan)
        return doc_to_visual

    def _doc_to_messages(self, plan: DocPlan, original: Callable[..., list[dict[str, Any]]]
                         ) -> Callable[..., list[dict[str, Any]]]:
        def doc_to_messages(doc: Any, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
            return self.replace_visuals(original(doc, *args, **kwargs), self.images(plan))
        return doc_to_messages

    def replace_visuals(self, messages: list[dict[str, Any]], images: list[Image.Image]
                        ) -> list[dict[str, Any]]:
        """Chat messages with every image and video part taken out and the frames put where
        the first one was (else at the start of the first user turn): one ``video`` part
        holding the list of frames, or one ``image`` part per frame."""
        frames = [{"type": "video", "url": images}] if self.as_video \
            else [{"type": "image", "url": image} for image in images]
        out: list[dict[str, Any]] = []
        placed = False
        for message in messages:
            content = message.get("content")
            if not isinstance(content, list):
                out.append(message)
                continue
            parts: list[Any] = []
            for part in content:
                if isinstance(part, Mapping) and part.get("type") in ("image", "video"):
                    if not placed:
                        parts.extend(frames)
                        placed = True
                    continue
                parts.append(part)
            out.append({**message, "content": parts})
        if not placed:
            first_user = next((m for m in out if m.get("role") == "user"), None)
            if first_user is None:
                raise UserError("the task's messages have no user turn to put the frames in")
            content = first_user.get("content")
            text = [{"type": "text", "text": content}] if isinstance(content, str) else content
            first_user["content"] = [*frames, *text]
        return out


def in_request_order(groups: Sequence[Sequence[tuple[int, Any]]],
                     results: Sequence[Sequence[Any]]) -> list[Any]:
    """The results of :meth:`RequestRouter.route`'s groups, back in the requests' order."""
    total = sum(len(group) for group in groups)
    out: list[Any] = [None] * total
    for group, answers in zip(groups, results, strict=True):
        if len(answers) != len(group):
            raise RuntimeError(f"the wrapped model answered {len(answers)} of {len(group)} "
                               "requests")
        for (position, _), answer in zip(group, answers, strict=True):
            out[position] = answer
    return out
