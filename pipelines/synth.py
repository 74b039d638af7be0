"""A synthetic grounded video-QA world: real H.264 videos where *which* frames you see decides
whether a question can be answered.

Every video has a slowly drifting, striped pastel background and grey distractor blobs
moving through it all the time; a few short **events** — a coloured shape (``COLOURS`` ×
``SHAPES``) shown for about a second at a random place — happen at random times. Questions ask
about the events only:

* ``colour``  — what colour was the {shape}?              (evidence: that event)
* ``shape``   — what shape was the {colour} one?          (evidence: that event)
* ``first`` / ``last`` — which appeared first / last?     (evidence: every event in the options)
* ``count``   — how many {colour} shapes / {shape}s?      (evidence: every event of that kind)
* ``after``   — what appeared right after the {event}?    (evidence: it and the next event)

Four options, one right; wrong options come from the same video first. An event's evidence
span is ``[first frame time, last frame time]`` of the frames that show it, so a frame whose
timestamp lies in the span shows the event. Everything is drawn from one seed: per video a
seed derived from (seed, index), so a video does not change when others are added.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from pipelines.workers import die_with_parent
from stores.manifest import build_manifest, write_manifest
from stores.owned import claim

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35), "green": (30, 170, 60), "blue": (35, 75, 225),
    "yellow": (240, 215, 30), "purple": (145, 50, 200), "orange": (250, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "first", "last", "count", "after")
SPLITS: tuple[str, ...] = ("train", "val", "test")
SYNTH_KIND = "synth"  # the marker of a synthetic corpus folder (stores/owned.py)


@dataclass(frozen=True)
class SynthSettings:
    """Every knob that makes the task easier or harder."""

    videos: int = 300
    seed: int = 0
    duration: tuple[float, float] = (16.0, 32.0)  # seconds, drawn per video
    events: tuple[int, int] = (3, 5)  # events per video
    event_seconds: tuple[float, float] = (0.75, 1.25)  # how long each event is shown
    fps: int = 8
    frame_size: int = 160  # square frames, pixels
    distractors: int = 3  # grey blobs moving through every frame
    background_speed: float = 1.0  # how fast the background drifts (0: still)
    questions_per_video: int = 8
    split: tuple[float, float, float] = (0.7, 0.15, 0.15)  # train / val / test, by video
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)

    def __post_init__(self) -> None:
        checks = [
            (0 < self.duration[0] <= self.duration[1], "duration range must be 0 < A <= B"),
            (1 <= self.events[0] <= self.events[1], "events range must be 1 <= A <= B"),
            (0 < self.event_seconds[0] <= self.event_seconds[1],
             "event-seconds range must be 0 < A <= B"),
            (self.fps >= 1, "fps must be at least 1"),
            (self.frame_size >= 64 and self.frame_size % 2 == 0,
             "frame size must be even and at least 64"),
            (self.distractors >= 0, "distractors must be 0 or more"),
            (self.videos >= 1, "videos must be at least 1"),
            (abs(sum(self.split) - 1) < 1e-6 and min(self.split) >= 0,
             "split fractions must be non-negative and sum to 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # the events must fit: each with a gap of at least one second around it
        room = self.duration[0] - 1.0
        need = self.events[1] * (self.event_seconds[1] + 1.0)
        if need > room:
            raise ValueError(f"{self.events[1]} events of up to {self.event_seconds[1]} s do not "
                             f"fit in {self.duration[0]} s with 1 s gaps; lengthen the videos")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("workers")
        return out


@dataclass(frozen=True)
class Event:
    colour: str
    shape: str
    first: int  # first frame that shows it
    frames: int  # how many frames show it
    x: float  # centre, in [0, 1] of the frame
    y: float
    size: float  # radius, as a fraction of the frame

    def span(self, fps: int) -> tuple[float, float]:
        return (self.first / fps, (self.first + self.frames - 1) / fps)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Blob:
    """A grey distractor moving on a Lissajous path."""

    grey: int
    cx: float
    cy: float
    ax: float
    ay: float
    wx: float
    wy: float
    phase: float
    size: float


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw any frame of one video."""

    frames: int
    fps: int
    size: int
    base: tuple[float, float, float]  # background colour (pastel)
    stripe: tuple[float, float, float]  # stripe tint
    stripe_angle: float
    stripe_freq: float
    drift: float  # background speed, radians per second
    blobs: tuple[Blob, ...]
    events: tuple[Event, ...]

    @property
    def duration(self) -> float:
        return self.frames / self.fps


# ----------------------------------------------------------------------------- drawing

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(axis, axis)  # x, y in [0, 1]


def shape_mask(shape: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float,
               r: float) -> np.ndarray:
    """Pixels inside ``shape`` centred at (cx, cy) with radius r (all in frame units)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if shape == "triangle":  # pointing up, base at cy + 0.8 r
        top, bottom = cy - r, cy + 0.8 * r
        half = (y - top) / (bottom - top) * r
        return (y >= top) & (y <= bottom) & (np.abs(dx) <= half)
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape!r}")


def background(scene: Scene, t: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    angle = scene.stripe_angle + 0.15 * math.sin(0.3 * scene.drift * t)
    phase = scene.drift * t
    wave = 0.5 + 0.5 * np.sin(2 * math.pi * scene.stripe_freq
                              * (x * math.cos(angle) + y * math.sin(angle)) + phase)
    shade = 0.85 + 0.15 * math.sin(0.2 * scene.drift * t)
    base = np.asarray(scene.base, np.float32) * shade
    stripe = np.asarray(scene.stripe, np.float32)
    return base[None, None] * (1 - 0.35 * wave[..., None]) + stripe[None, None] * 0.35 * wave[
        ..., None]


def render(scene: Scene, index: int, grid: tuple[np.ndarray, np.ndarray] | None = None,
           ) -> np.ndarray:
    """Frame ``index`` of the scene, as uint8 RGB [size, size, 3]."""
    x, y = grid if grid is not None else _grid(scene.size)
    t = index / scene.fps
    image = background(scene, t, x, y)
    for b in scene.blobs:
        cx = b.cx + b.ax * math.sin(b.wx * t + b.phase)
        cy = b.cy + b.ay * math.sin(b.wy * t + 1.7 * b.phase)
        r = b.size * (1 + 0.25 * math.sin(1.3 * b.wx * t))
        image[((x - cx) ** 2 / 1.6 + (y - cy) ** 2) <= r * r] = b.grey
    for e in scene.events:
        if e.first <= index < e.first + e.frames:
            image[shape_mask(e.shape, x, y, e.x, e.y, e.size)] = COLOURS[e.colour]
    return np.clip(image, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- scenes

def _pastel(rng: np.random.Generator) -> tuple[float, float, float]:
    grey = rng.uniform(110, 190)
    tint = rng.normal(0, 18, 3)
    return tuple(float(v) for v in np.clip(grey + tint, 60, 230))


def random_blobs(rng: np.random.Generator, n: int) -> tuple[Blob, ...]:
    return tuple(
        Blob(grey=int(rng.choice([25, 60, 200, 240])), cx=float(rng.uniform(0.25, 0.75)),
             cy=float(rng.uniform(0.25, 0.75)), ax=float(rng.uniform(0.1, 0.3)),
             ay=float(rng.uniform(0.1, 0.3)), wx=float(rng.uniform(0.4, 1.5)),
             wy=float(rng.uniform(0.4, 1.5)), phase=float(rng.uniform(0, 2 * math.pi)),
             size=float(rng.uniform(0.05, 0.11)))
        for _ in range(n)
    )


def random_background(rng: np.random.Generator, speed: float) -> dict[str, Any]:
    return {"base": _pastel(rng), "stripe": _pastel(rng),
            "stripe_angle": float(rng.uniform(0, math.pi)),
            "stripe_freq": float(rng.uniform(1.5, 4.0)),
            "drift": float(speed * rng.uniform(0.6, 1.4))}


def random_event(rng: np.random.Generator, first: int, frames: int) -> Event:
    size = float(rng.uniform(0.14, 0.2))
    return Event(colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)),
                 first=first, frames=frames, x=float(rng.uniform(size + 0.02, 0.98 - size)),
                 y=float(rng.uniform(size + 0.02, 0.98 - size)), size=size)


def make_scene(rng: np.random.Generator, s: SynthSettings) -> Scene:
    """A random video: background, distractors and events placed in time order with at least
    one second of background before, between and after them."""
    fps = s.fps
    frames = int(round(rng.uniform(*s.duration) * fps))
    n_events = int(rng.integers(s.events[0], s.events[1] + 1))
    lengths = [max(1, int(round(rng.uniform(*s.event_seconds) * fps))) for _ in range(n_events)]
    gap = fps
    while lengths and frames - sum(lengths) - gap * (len(lengths) + 1) < 0:
        lengths.pop()  # only when rounding leaves no room at all
    slack = frames - sum(lengths) - gap * (len(lengths) + 1)
    cuts = np.sort(rng.integers(0, slack + 1, len(lengths)))
    events = []
    for i, length in enumerate(lengths):
        first = (i + 1) * gap + sum(lengths[:i]) + int(cuts[i])
        events.append(random_event(rng, first, length))
    return Scene(frames=frames, fps=fps, size=s.frame_size, blobs=random_blobs(rng, s.distractors),
                 events=tuple(events), **random_background(rng, s.background_speed))


# ----------------------------------------------------------------------------- questions

@dataclass(frozen=True)
class SynthQuestion:
    kind: str
    question: str
    options: tuple[str, ...]
    answer: int
    evidence: tuple[Event, ...]


def _options(rng: np.random.Generator, right: str, same_video: list[str], pool: list[str],
             n: int = 4) -> tuple[tuple[str, ...], int]:
    """``right`` plus wrong options, those seen in the same video first, shuffled."""
    wrong = list(dict.fromkeys(o for o in same_video if o != right))
    rng.shuffle(wrong)
    rest = [o for o in pool if o != right and o not in wrong]
    rng.shuffle(rest)
    options = [right, *(wrong + rest)[: n - 1]]
    order = rng.permutation(len(options))
    shuffled = tuple(options[i] for i in order)
    return shuffled, shuffled.index(right)


def _count_word(n: int) -> str:
    return ["zero", "one", "two", "three", "four", "five", "six"][n] if n < 7 else str(n)


def candidate_questions(rng: np.random.Generator, events: tuple[Event, ...]) -> list[SynthQuestion]:
    """Every question the video supports (at most one per kind and target)."""
    names = [e.name for e in events]
    all_names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    out: list[SynthQuestion] = []
    for shape in SHAPES:
        having = [e for e in events if e.shape == shape]
        if len(having) == 1:
            e = having[0]
            options, answer = _options(rng, e.colour, [x.colour for x in events], list(COLOURS))
            out.append(SynthQuestion("colour", f"What colour was the {shape}?", options, answer,
                                     (e,)))
    for colour in COLOURS:
        having = [e for e in events if e.colour == colour]
        if len(having) == 1:
            e = having[0]
            options, answer = _options(rng, e.shape, [x.shape for x in events], list(SHAPES))
            out.append(SynthQuestion("shape", f"What shape was the {colour} one?", options,
                                     answer, (e,)))
    if len(set(names)) >= 2:
        for kind, chosen in (("first", events[0]), ("last", events[-1])):
            if names.count(chosen.name) == 1:
                options, answer = _options(rng, chosen.name, names, all_names)
                shown = tuple(e for e in events if e.name in options)
                word = "first" if kind == "first" else "last"
                out.append(SynthQuestion(kind, f"Which shape appeared {word}?", options, answer,
                                         shown))
    kinds = [("colour", c) for c in {e.colour for e in events}] + [
        ("shape", s) for s in {e.shape for e in events}]
    kinds.sort()
    rng.shuffle(kinds)
    for attribute, value in kinds[:2]:
        having = tuple(e for e in events if getattr(e, attribute) == value)
        right = _count_word(len(having))
        counts = [_count_word(n) for n in range(1, 6)]
        options, answer = _options(rng, right, [], counts)
        text = (f"How many {value} shapes appeared?" if attribute == "colour"
                else f"How many {value}s appeared?")
        out.append(SynthQuestion("count", text, options, answer, having))
    for i, e in enumerate(events[:-1]):
        if names.count(e.name) == 1:
            nxt = events[i + 1]
            options, answer = _options(rng, nxt.name, [n for n in names if n != e.name],
                                       [n for n in all_names if n != e.name])
            out.append(SynthQuestion("after", f"What appeared right after the {e.name}?",
                                     options, answer, (e, nxt)))
    return out


def pick_questions(rng: np.random.Generator, events: tuple[Event, ...], n: int,
                   ) -> list[SynthQuestion]:
    """Up to ``n`` questions of as many different kinds as the video allows."""
    candidates = candidate_questions(rng, events)
    by_kind: dict[str, list[SynthQuestion]] = {}
    for q in candidates:
        by_kind.setdefault(q.kind, []).append(q)
    kinds = list(by_kind)
    rng.shuffle(kinds)
    chosen: list[SynthQuestion] = []
    while len(chosen) < n and any(by_kind.values()):
        for kind in kinds:
            if by_kind[kind] and len(chosen) < n:
                chosen.append(by_kind[kind].pop(int(rng.integers(len(by_kind[kind])))))
    return chosen


# ----------------------------------------------------------------------------- videos

def write_video(path: Path, scene: Scene, crf: int = 18) -> None:
    """Encode the scene as H.264 (yuv420p) MP4, one frame per 1/fps."""
    grid = _grid(scene.size)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(scene.fps))
        stream.width = stream.height = scene.size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast", "threads": "1"}
        for index in range(scene.frames):
            frame = av.VideoFrame.from_ndarray(render(scene, index, grid), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def video_seed(seed: int, index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, index])


def plan_video(index: int, settings: SynthSettings) -> tuple[Scene, dict[str, Any]]:
    """The scene and manifest rows of video ``index``, without rendering anything."""
    rng = np.random.default_rng(video_seed(settings.seed, index))
    scene = make_scene(rng, settings)
    questions = pick_questions(rng, scene.events, settings.questions_per_video)
    draw = float(rng.uniform())  # per video, so adding videos changes no earlier split
    split = SPLITS[min(int(np.searchsorted(np.cumsum(settings.split), draw, side="right")), 2)]
    video_id = f"synth_{settings.seed:04d}_{index:05d}"
    fps = scene.fps
    row = {
        "video": {"type": "video", "id": video_id, "path": f"videos/{video_id}.mp4",
                  "duration": scene.duration, "split": split, "fps": fps,
                  "events": [{**asdict(e), "span": list(e.span(fps))} for e in scene.events]},
        "questions": [
            {"type": "question", "qid": f"{video_id}_q{i}", "video_id": video_id,
             "question": q.question, "options": list(q.options), "answer": q.answer,
             "evidence": [list(e.span(fps)) for e in q.evidence], "split": split,
             "category": q.kind}
            for i, q in enumerate(questions)
        ],
    }
    return scene, row


def _make_video(job: tuple[int, SynthSettings, str]) -> dict[str, Any]:
    index, settings, out = job
    scene, row = plan_video(index, settings)
    path = Path(out) / row["video"]["path"]
    partial = path.with_suffix(".partial.mp4")
    write_video(partial, scene)
    os.replace(partial, path)  # a killed run never leaves a half-written video
    return row


def uniform_hit_chance(frames: int, spans: list[tuple[int, int]], k: int,
                       phases: int = 64) -> float:
    """Chance that k evenly spaced frames (random phase) hit every span [first, last] of
    frame indices."""
    if k >= frames:
        return 1.0
    stride = frames / k
    hits = 0
    for p in range(phases):
        picks = np.floor((p + 0.5) / phases * stride + stride * np.arange(k)).astype(int)
        hits += all(((picks >= a) & (picks <= b)).any() for a, b in spans)
    return hits / phases


def hit_report(rows: list[dict[str, Any]], ks: tuple[int, ...] = (4, 8, 16)) -> dict[str, Any]:
    """Per question kind: how many, and the mean chance that k uniform frames see all the
    evidence."""
    videos = {r["video"]["id"]: r["video"] for r in rows}
    table: dict[str, dict[str, Any]] = {}
    for row in rows:
        for q in row["questions"]:
            video = videos[q["video_id"]]
            fps = video["fps"]
            frames = int(round(video["duration"] * fps))
            spans = [(round(a * fps), round(b * fps)) for a, b in q["evidence"]]
            entry = table.setdefault(q["category"], {"questions": 0, **{f"k{k}": 0.0 for k in ks}})
            entry["questions"] += 1
            for k in ks:
                entry[f"k{k}"] += uniform_hit_chance(frames, spans, k)
    for entry in table.values():
        for k in ks:
            entry[f"k{k}"] = round(entry[f"k{k}"] / entry["questions"], 4)
    return {kind: table[kind] for kind in QUESTION_TYPES if kind in table}


@dataclass
class SynthSummary:
    out: str
    videos: int
    questions: int
    splits: dict[str, int]
    seconds: float
    report: dict[str, Any]


def generate(out: str | os.PathLike[str], settings: SynthSettings,
             report: Callable[[int], None] | None = None) -> SynthSummary:
    """Write ``settings.videos`` videos under ``out/videos`` and ``out/manifest.jsonl``
    (and ``out/synth_report.json``). The same settings always give the same corpus."""
    owned = claim(out, SYNTH_KIND)  # refocus's own folder or a new one, never a user's
    with owned.lock():
        return _generate(owned.path, settings, report)


def _generate(folder: Path, settings: SynthSettings,
              report: Callable[[int], None] | None) -> SynthSummary:
    import time

    started = time.perf_counter()
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(i, settings, str(folder)) for i in range(settings.videos)]
    rows: list[dict[str, Any]] = []
    if settings.workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(min(settings.workers, len(jobs)), initializer=die_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            for row in pool.map(_make_video, jobs, chunksize=2):
                rows.append(row)
                if report:
                    report(1)
    else:
        for job in jobs:
            rows.append(_make_video(job))
            if report:
                report(1)
    manifest = build_manifest(
        [(f"video {r['video']['id']}", r["video"]) for r in rows]
        + [(q["qid"], q) for r in rows for q in r["questions"]], base=folder.resolve())
    assert not manifest.issues, manifest.issues  # the generator's own output must validate
    write_manifest(folder / "manifest.jsonl", manifest)
    table = hit_report(rows)
    splits = {s: sum(r["video"]["split"] == s for r in rows) for s in SPLITS}
    result = {"settings": settings.as_dict(), "videos": len(rows),
              "questions": len(manifest.questions), "splits": splits,
              "uniform_hit_chance": table}
    (folder / "synth_report.json").write_text(json.dumps(result, indent=1))
    return SynthSummary(str(folder), len(rows), len(manifest.questions), splits,
                        round(time.perf_counter() - started, 2), table)
