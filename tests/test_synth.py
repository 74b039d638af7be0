"""The synthetic world: deterministic, its evidence where the events are drawn, its answers
right by construction, its videos real enough for the ingest stage."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from flows.cli import EXIT_OK, EXIT_USAGE, main
from pipelines.decode import DecodeSettings, VideoDecoder
from pipelines.synth import (
    COLOURS,
    SynthSettings,
    generate,
    hit_report,
    plan_video,
    uniform_hit_chance,
)
from stores.manifest import read_manifest
from stores.shards import ShardSet

SMALL = dict(videos=6, duration=(12.0, 16.0), events=(2, 4), workers=2)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    generate(out, SynthSettings(**SMALL, seed=3))
    return out


def decode_all(path: Path) -> list:
    with VideoDecoder(path, DecodeSettings(fps=None, max_frames=None, size=None)) as video:
        return list(video.candidates())


def videos_of(corpus: Path) -> list[dict]:
    return [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines()
            if json.loads(line)["type"] == "video"]


def test_same_seed_gives_the_same_manifest_bytes_and_frames(corpus, tmp_path):
    again = tmp_path / "b"
    generate(again, SynthSettings(**SMALL, seed=3))
    assert (again / "manifest.jsonl").read_bytes() == (corpus / "manifest.jsonl").read_bytes()
    for video in videos_of(corpus)[:3]:
        a, b = decode_all(corpus / video["path"]), decode_all(again / video["path"])
        assert len(a) == len(b) == round(video["duration"] * video["fps"])
        assert all(np.array_equal(x.rgb, y.rgb) and x.time == y.time
                   for x, y in zip(a, b, strict=True))
    other = tmp_path / "c"
    generate(other, SynthSettings(**SMALL, seed=4))
    assert (other / "manifest.jsonl").read_bytes() != (corpus / "manifest.jsonl").read_bytes()


def test_adding_videos_changes_none_of_the_earlier_ones(corpus, tmp_path):
    more = tmp_path / "more"
    generate(more, SynthSettings(**{**SMALL, "videos": 8}, seed=3))
    first = {v["id"]: v for v in videos_of(corpus)}
    for video in videos_of(more)[:6]:
        assert video == first[video["id"]]


def test_evidence_spans_hold_the_event_pixels(corpus):
    checked = gone = 0
    for video in videos_of(corpus):
        frames = decode_all(corpus / video["path"])
        size = frames[0].rgb.shape[0]
        fps = video["fps"]
        for event in video["events"]:
            x, y = int(event["x"] * size), int(event["y"] * size)
            colour = np.array(COLOURS[event["colour"]])
            start, end = event["span"]
            for frame in frames:
                distance = np.abs(frame.rgb[y, x].astype(int) - colour).max()
                if start <= frame.time <= end:
                    assert distance < 40, (video["id"], event, frame.time)
                    checked += 1
                elif np.isclose(frame.time, [start - 1 / fps, end + 1 / fps]).any():
                    assert distance > 60, (video["id"], event, frame.time)  # gone
                    gone += 1
    assert checked > 20 and gone > 10


def solve(question: str, options: list[str], events: list[dict]) -> str:
    """An independent reading of each question kind, straight from the event list."""
    names = [f"{e['colour']} {e['shape']}" for e in events]
    if m := re.fullmatch(r"What colour was the (\w+)\?", question):
        (event,) = [e for e in events if e["shape"] == m[1]]
        return event["colour"]
    if m := re.fullmatch(r"What shape was the (\w+) one\?", question):
        (event,) = [e for e in events if e["colour"] == m[1]]
        return event["shape"]
    if question == "Which shape appeared first?":
        return names[0]
    if question == "Which shape appeared last?":
        return names[-1]
    if m := re.fullmatch(r"How many (\w+) shapes appeared\?", question):
        n = sum(e["colour"] == m[1] for e in events)
        return ["zero", "one", "two", "three", "four", "five"][n]
    if m := re.fullmatch(r"How many (\w+)s appeared\?", question):
        n = sum(e["shape"] == m[1] for e in events)
        return ["zero", "one", "two", "three", "four", "five"][n]
    if m := re.fullmatch(r"What appeared right after the (\w+ \w+)\?", question):
        return names[names.index(m[1]) + 1]
    raise AssertionError(f"unknown question {question!r}")


def test_every_answer_follows_from_the_events_and_the_evidence_covers_them(corpus):
    manifest = read_manifest(corpus / "manifest.jsonl")
    assert manifest.issues == []
    events = {v.id: v.meta["events"] for v in manifest.videos}
    kinds = set()
    for q in manifest.questions:
        assert len(q.options) == 4 == len(set(q.options))
        assert q.options[q.answer] == solve(q.question, list(q.options), events[q.video_id])
        spans = [tuple(e["span"]) for e in events[q.video_id]]
        assert q.evidence and all(tuple(s) in spans for s in q.evidence)
        kinds.add(q.category)
    assert kinds == {"colour", "shape", "first", "last", "count", "after"}
    splits = {v.split for v in manifest.videos}
    assert splits <= {"train", "val", "test"}


def test_wrong_options_come_from_the_same_video_first(corpus):
    manifest = read_manifest(corpus / "manifest.jsonl")
    events = {v.id: v.meta["events"] for v in manifest.videos}
    for q in manifest.questions:
        if q.category == "colour":
            seen = {e["colour"] for e in events[q.video_id]} - {q.options[q.answer]}
            assert seen <= set(q.options) or len(seen) > 3


def test_the_videos_go_through_the_ingest_stage(corpus, tmp_path):
    out = tmp_path / "shards"
    assert main(["ingest", str(corpus / "manifest.jsonl"), "--out", str(out),
                 "--workers", "1"]) == EXIT_OK
    lookup = ShardSet(out).lookup()
    for video in videos_of(corpus):
        assert lookup[video["id"]].frames == int(np.ceil(video["duration"] * 4))


def test_the_report_says_uniform_frames_rarely_see_the_evidence(corpus):
    report = json.loads((corpus / "synth_report.json").read_text())
    rows = [plan_video(i, SynthSettings(**SMALL, seed=3))[1] for i in range(SMALL["videos"])]
    assert report["uniform_hit_chance"] == hit_report(rows)  # the report is the plan's
    for row in report["uniform_hit_chance"].values():
        assert row["k4"] <= row["k8"] <= row["k16"] <= 1.0


def test_at_default_settings_four_uniform_frames_rarely_see_the_evidence():
    """The claim holds for the default world (planned, not rendered: 300 videos)."""
    settings = SynthSettings(videos=300)
    table = hit_report([plan_video(i, settings)[1] for i in range(settings.videos)])
    for kind in ("first", "last", "after"):
        assert table[kind]["k4"] < 0.05
    assert all(row["k4"] < 0.25 for row in table.values())
    for row in table.values():
        assert row["k4"] <= row["k8"] <= row["k16"] <= 1.0


def test_uniform_hit_chance_against_brute_force():
    frames, spans, k = 100, [(10, 12), (60, 61)], 4
    hits = 0
    for phase in range(64):
        picks = np.floor((phase + 0.5) / 64 * 25 + 25 * np.arange(4)).astype(int)
        hits += all(any(a <= p <= b for p in picks) for a, b in spans)
    assert uniform_hit_chance(frames, spans, k) == hits / 64
    assert uniform_hit_chance(frames, [(0, 99)], 4) == 1.0


def test_impossible_settings_are_refused(tmp_path, capsys):
    code = main(["synth", "--out", str(tmp_path / "x"), "--duration-range", "5", "6",
                 "--events", "4", "6"])
    assert code == EXIT_USAGE
    assert "do not fit" in capsys.readouterr().err
    with pytest.raises(ValueError, match="frame size"):
        SynthSettings(frame_size=63)
