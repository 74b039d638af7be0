"""Candidate-frame extraction: ``refocus ingest`` versus the ``ffmpeg`` command line.

Both tools get the same videos and the same settings, in the same run:

* at most ``--fps`` frames per second (default 4),
* resized so the short side is ``--size`` pixels (default 384), aspect kept, never upscaled,
* JPEG out: refocus ``--jpeg-quality`` (default 90) against ffmpeg ``-q:v`` (default 2),
  which are roughly comparable; the average JPEG size per frame is reported as a check.

refocus runs as one ``refocus ingest`` process with ``--workers W`` and a shard size that
keeps every worker busy (``ceil(videos / (2 W))``), and ``--max-frames 0`` since ffmpeg has
no such cap. ffmpeg runs once per video, ``W`` at a time (a thread pool of subprocesses)::

    ffmpeg -nostdin -loglevel error -threads T -i VIDEO -map 0:v:0 \\
        -vf "fps=F,scale='if(lt(iw,ih),min(S,iw),-1)':'if(lt(iw,ih),-1,min(S,ih))':flags=area" \\
        -q:v 2 OUT/%06d.jpg

``-map 0:v:0`` makes ffmpeg decode the first video stream, as refocus does (ffmpeg would
otherwise pick the largest one), ``-1`` rounds the long side as refocus does, and ffmpeg
turns rotated videos upright before scaling, as refocus does. The two tools may keep
slightly different frame counts (ffmpeg's fps filter picks frames by rounding, refocus keeps
the first frame at or after each target time), so both counts are reported and the tools are
compared on frames out per second of wall time, best of ``--repeats`` runs each (alternating
which tool goes first). refocus's count comes from its ``summary.json`` and is checked
against the JPEG members of its tar shards; ffmpeg's is the number of files it wrote.

A warm-up runs ffmpeg once over every input (with ``-xerror``) and drops the videos it fails
on (a corrupted file, say), so the corpus holds only good videos and refocus must exit 0.
``--copies N`` symlinks each video N times into a temporary folder to make the corpus bigger.

Run it from the repository root, in the virtualenv that has the ``refocus`` command::

    python benchmarks/ingest_vs_ffmpeg.py                        # samples/videos, 4 copies
    python benchmarks/ingest_vs_ffmpeg.py --videos ~/clips --copies 1 --workers 8 \\
        --repeats 5 --out results.json

It prints a Markdown table (for the README) and writes the numbers to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# The file types refocus's folder importer picks up (stores/importers/folder.py).
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mkv", ".webm", ".mov", ".avi", ".mpg", ".mpeg", ".flv", ".wmv", ".ts",
    ".3gp", ".ogv",
})


@dataclass(frozen=True)
class Config:
    """The benchmark's settings, from the command line."""

    videos: list[Path]
    copies: int
    fps: float
    size: int
    workers: int
    repeats: int
    jpeg_quality: int
    ffmpeg_qscale: int
    ffmpeg_threads: int
    out: Path | None

    @property
    def common(self) -> dict[str, Any]:
        return {"fps": self.fps, "size": self.size, "workers": self.workers,
                "copies": self.copies, "repeats": self.repeats,
                "refocus_jpeg_quality": self.jpeg_quality, "ffmpeg_qscale": self.ffmpeg_qscale,
                "ffmpeg_threads": self.ffmpeg_threads}


@dataclass
class Run:
    """One timed pass of one tool over the whole corpus."""

    frames: int
    seconds: float
    jpeg_bytes: int
    per_source: dict[str, int] = field(default_factory=dict)  # frames per source video


@dataclass
class Side:
    """All runs of one tool; the best (shortest) run is the one reported."""

    name: str
    runs: list[Run] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    def as_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "frames": best.frames, "seconds": round(best.seconds, 3),
            "frames_per_second": round(best.frames / best.seconds, 2),
            "kib_per_frame": round(best.jpeg_bytes / max(best.frames, 1) / 1024, 2),
            "all_seconds": [round(r.seconds, 3) for r in self.runs],
        }


class BenchmarkError(Exception):
    """Something that stops the benchmark; the message is one line."""


# ----------------------------------------------------------------------------- inputs

def parse_args(argv: Sequence[str] | None = None) -> Config:
    p = argparse.ArgumentParser(description="refocus ingest versus the ffmpeg command line",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--videos", nargs="+", type=Path, default=None, metavar="DIR_OR_FILE",
                   help="videos or folders of videos (default: samples/videos, else "
                        "../shared/data/videos)")
    p.add_argument("--copies", type=int, default=4, help="symlinks per video in the corpus")
    p.add_argument("--fps", type=float, default=4.0, help="at most this many frames per second")
    p.add_argument("--size", type=int, default=384, help="short side after resizing (0: keep)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="refocus workers, and ffmpeg processes at a time")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per tool; best is used")
    p.add_argument("--jpeg-quality", type=int, default=90, help="refocus --jpeg-quality")
    p.add_argument("--ffmpeg-qscale", type=int, default=2, help="ffmpeg -q:v (2-31, 2 best)")
    p.add_argument("--ffmpeg-threads", type=int, default=0,
                   help="ffmpeg -threads per process (0: ffmpeg's automatic choice)")
    p.add_argument("--out", type=Path, default=None, help="write the results here (JSON)")
    a = p.parse_args(argv)
    for name in ("copies", "workers", "repeats"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.fps < 0 or a.size < 0:
        p.error("--fps and --size must not be negative")
    repo_root = Path(__file__).resolve().parent.parent
    videos = collect_videos(a.videos) if a.videos else default_videos(repo_root)
    if not videos:
        p.error("no videos found")
    return Config(videos, a.copies, a.fps, a.size, a.workers, a.repeats, a.jpeg_quality,
                  a.ffmpeg_qscale, a.ffmpeg_threads, a.out)


def collect_videos(items: Iterable[Path]) -> list[Path]:
    """Video files named or found (recursively) under the folders named, in sorted order."""
    found: list[Path] = []
    for item in items:
        if item.is_dir():
            found.extend(sorted(p for p in item.rglob("*")
                                if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS))
        elif item.is_file():
            found.append(item)
        else:
            raise BenchmarkError(f"{item}: no such file or folder")
    return [p.resolve() for p in found]


def default_videos(repo_root: Path) -> list[Path]:
    for folder in (repo_root / "samples" / "videos", repo_root.parent / "shared/data/videos"):
        if folder.is_dir() and (videos := collect_videos([folder])):
            return videos
    return []


# ----------------------------------------------------------------------------- tools

def ensure_ffmpeg() -> str:
    """The ffmpeg executable, installed with apt-get when it is missing."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    print("ffmpeg not found; installing it with apt-get", file=sys.stderr)
    install = ["apt-get", "install", "-y", "ffmpeg"]
    for steps in ([install], [["apt-get", "update"], install]):
        try:
            for step in steps:
                subprocess.run(step, capture_output=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            continue
        if found := shutil.which("ffmpeg"):
            return found
    raise BenchmarkError("ffmpeg is not on PATH and `apt-get install -y ffmpeg` failed")


def refocus_executable() -> Path:
    exe = Path(sys.executable).parent / "refocus"
    if not exe.is_file():
        raise BenchmarkError(f"{exe}: no refocus command next to this Python; "
                             "run the benchmark with the virtualenv's python")
    return exe


def ffmpeg_filter(fps: float, size: int) -> str | None:
    """fps cap, then the short side to ``size`` (never upscaled, aspect kept, area filter)."""
    parts = []
    if fps > 0:
        parts.append(f"fps={fps:g}")
    if size > 0:
        parts.append(f"scale='if(lt(iw,ih),min({size},iw),-1)'"
                     f":'if(lt(iw,ih),-1,min({size},ih))':flags=area")
    return ",".join(parts) or None


def ffmpeg_command(ffmpeg: str, video: Path, out_dir: Path, cfg: Config,
                   strict: bool = False) -> list[str]:
    cmd = [ffmpeg, "-nostdin", "-loglevel", "error", *(["-xerror"] if strict else []),
           "-threads", str(cfg.ffmpeg_threads), "-i", str(video), "-map", "0:v:0"]
    vf = ffmpeg_filter(cfg.fps, cfg.size)
    if vf:
        cmd += ["-vf", vf]
    return cmd + ["-q:v", str(cfg.ffmpeg_qscale), str(out_dir / "%06d.jpg")]


def refocus_command(corpus: Path, out_dir: Path, videos: int, cfg: Config) -> list[str]:
    shard_size = max(1, math.ceil(videos / (2 * cfg.workers)))
    return [str(refocus_executable()), "ingest", str(corpus), "--out", str(out_dir),
            "--fps", f"{cfg.fps:g}", "--size", str(cfg.size), "--max-frames", "0",
            "--jpeg-quality", str(cfg.jpeg_quality), "--workers", str(cfg.workers),
            "--shard-size", str(shard_size)]


def first_line(text: bytes | str) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


# ----------------------------------------------------------------------------- corpus

def warm_up(ffmpeg: str, videos: list[Path], scratch: Path,
            cfg: Config) -> tuple[list[Path], dict[str, str]]:
    """Run ffmpeg (strict) once over every video; returns the good ones and why others failed.

    This also brings the files into the page cache before anything is timed.
    """
    def attempt(item: tuple[int, Path]) -> str | None:
        i, video = item
        out = scratch / f"warm-{i:04d}"
        out.mkdir()
        try:
            done = subprocess.run(ffmpeg_command(ffmpeg, video, out, cfg, strict=True),
                                  capture_output=True, check=False)
        finally:
            shutil.rmtree(out, ignore_errors=True)
        if done.returncode != 0 or done.stderr.strip():
            return f"ffmpeg exit {done.returncode}: {first_line(done.stderr)}"
        return None

    with ThreadPoolExecutor(cfg.workers) as pool:
        errors = list(pool.map(attempt, enumerate(videos)))
    good = [v for v, e in zip(videos, errors, strict=True) if e is None]
    skipped = {str(v): e for v, e in zip(videos, errors, strict=True) if e is not None}
    return good, skipped


def build_corpus(videos: list[Path], copies: int, folder: Path) -> dict[Path, Path]:
    """Symlink every video ``copies`` times into ``folder``; returns link → source.

    Names start with the copy number, so the copies of one video land in different shards.
    """
    folder.mkdir()
    links: dict[Path, Path] = {}
    for copy in range(copies):
        for i, video in enumerate(videos):
            link = folder / f"c{copy:02d}_{i:04d}_{video.name}"
            link.symlink_to(video)
            links[link] = video
    return links


# ----------------------------------------------------------------------------- timed runs

def run_ffmpeg(ffmpeg: str, links: dict[Path, Path], out: Path, cfg: Config) -> Run:
    out.mkdir()
    jobs = []
    for n, link in enumerate(links):
        target = out / f"{n:05d}"
        target.mkdir()
        jobs.append((link, target))

    def one(job: tuple[Path, Path]) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(ffmpeg_command(ffmpeg, job[0], job[1], cfg),
                              capture_output=True, check=False)

    started = time.perf_counter()
    with ThreadPoolExecutor(cfg.workers) as pool:
        results = list(pool.map(one, jobs))
    seconds = time.perf_counter() - started
    for (link, _), done in zip(jobs, results, strict=True):
        if done.returncode != 0:
            raise BenchmarkError(f"ffmpeg failed on {link.name}: {first_line(done.stderr)}")
    run = Run(frames=0, seconds=seconds, jpeg_bytes=0)
    for link, target in jobs:
        files = list(target.glob("*.jpg"))
        run.frames += len(files)
        run.jpeg_bytes += sum(f.stat().st_size for f in files)
        source = str(links[link])
        run.per_source[source] = run.per_source.get(source, 0) + len(files)
    return run


def run_refocus(corpus: Path, links: dict[Path, Path], out: Path, cfg: Config) -> Run:
    cmd = refocus_command(corpus, out, len(links), cfg)
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        why = first_line(done.stderr or done.stdout)
        summary = out / "summary.json"
        if summary.is_file():
            failures = json.loads(summary.read_text()).get("failures", [])
            if failures:
                why = f"{len(failures)} failure(s), first: {failures[0]}"
        raise BenchmarkError(f"refocus ingest exited {done.returncode}: {why}")
    frames = int(json.loads((out / "summary.json").read_text())["frames"])
    members, jpeg_bytes = count_tar_jpegs(out)
    if members != frames:
        raise BenchmarkError(f"refocus summary says {frames} frames, its shards hold {members}")
    return Run(frames=frames, seconds=seconds, jpeg_bytes=jpeg_bytes,
               per_source=refocus_per_source(out))


def count_tar_jpegs(out: Path) -> tuple[int, int]:
    """Number and total size of the .jpg members in the ingest folder's tar shards."""
    count = size = 0
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    count += 1
                    size += member.size
    return count, size


def refocus_per_source(out: Path) -> dict[str, int]:
    """Frames per source video, from the ingest's manifest (id → resolved path) and videos."""
    paths = {}
    for line in (out / "manifest.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("type") == "video":
            paths[row["id"]] = row["path"]
    counts: dict[str, int] = {}
    for line in (out / "videos.jsonl").read_text().splitlines():
        row = json.loads(line)
        source = paths[row["video_id"]]
        counts[source] = counts.get(source, 0) + int(row["frames"])
    return counts


def benchmark(ffmpeg: str, links: dict[Path, Path], corpus: Path, scratch: Path,
              cfg: Config) -> tuple[Side, Side]:
    refocus, ffm = Side("refocus ingest"), Side("ffmpeg CLI")
    for r in range(cfg.repeats):
        order = ("refocus", "ffmpeg") if r % 2 == 0 else ("ffmpeg", "refocus")
        for tool in order:
            out = scratch / f"{tool}-{r}"
            if tool == "refocus":
                refocus.runs.append(run_refocus(corpus, links, out, cfg))
                run = refocus.runs[-1]
            else:
                ffm.runs.append(run_ffmpeg(ffmpeg, links, out, cfg))
                run = ffm.runs[-1]
            shutil.rmtree(out, ignore_errors=True)
            print(f"  run {r + 1}/{cfg.repeats} {tool:8s} {run.frames:6d} frames "
                  f"{run.seconds:7.2f} s  {run.frames / run.seconds:8.1f} frames/s",
                  file=sys.stderr)
    return refocus, ffm


# ----------------------------------------------------------------------------- report

def machine_info(ffmpeg: str) -> dict[str, Any]:
    model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    version = subprocess.run([ffmpeg, "-version"], capture_output=True, check=False)
    try:
        pyav = metadata.version("av")
    except metadata.PackageNotFoundError:
        pyav = "not installed"
    return {"nproc": os.cpu_count(), "cpu": model, "platform": platform.platform(),
            "python": platform.python_version(),
            "ffmpeg": first_line(version.stdout).split(" Copyright")[0],
            "pyav": pyav, "pyav_ffmpeg": pyav_ffmpeg_version()}


def pyav_ffmpeg_version() -> str:
    """The FFmpeg that PyAV bundles (it decodes for refocus), as the refocus env sees it."""
    code = "import av; print(getattr(av, 'ffmpeg_version_info', 'unknown'))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def frame_differences(refocus: Side, ffm: Side, copies: int) -> dict[str, dict[str, int]]:
    """Per source video (one copy), the frame counts where the two tools differ."""
    a, b = refocus.runs[0].per_source, ffm.runs[0].per_source
    return {Path(s).name: {"refocus": a.get(s, 0) // copies, "ffmpeg": b.get(s, 0) // copies}
            for s in sorted(set(a) | set(b)) if a.get(s, 0) != b.get(s, 0)}


def markdown(report: dict[str, Any]) -> str:
    m, s, c = report["machine"], report["settings"], report["corpus"]
    rows = [("refocus ingest", report["refocus"]), ("ffmpeg CLI", report["ffmpeg"])]
    lines = [
        f"Machine: {m['nproc']} CPUs ({m['cpu']}); {m['ffmpeg']}; PyAV {m['pyav']} "
        f"(FFmpeg {m['pyav_ffmpeg']}).",
        f"Corpus: {c['videos']} videos ({c['sources']} sources x {s['copies']} copies); "
        f"fps {s['fps']:g}, short side {s['size']}, {s['workers']} workers, "
        f"best of {s['repeats']}; JPEG: refocus quality {s['refocus_jpeg_quality']}, "
        f"ffmpeg -q:v {s['ffmpeg_qscale']}, -threads {s['ffmpeg_threads']}.",
    ]
    if c["skipped"]:
        names = ", ".join(Path(v).name for v in c["skipped"])
        lines.append(f"Skipped (ffmpeg failed on them in the warm-up): {names}.")
    lines += [
        "",
        "| tool | frames | wall s (best) | frames/s | KiB/frame |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['frames']} | {r['seconds']:.2f} | "
                     f"{r['frames_per_second']:.1f} | {r['kib_per_frame']:.1f} |")
    lines.append(f"| **ratio refocus / ffmpeg** | | | **{report['ratio']:.2f}** | |")
    return "\n".join(lines)


def build_report(cfg: Config, ffmpeg: str, sources: list[Path], skipped: dict[str, str],
                 refocus: Side, ffm: Side) -> dict[str, Any]:
    r, f = refocus.as_dict(), ffm.as_dict()
    return {
        "machine": machine_info(ffmpeg),
        "settings": cfg.common,
        "corpus": {"sources": len(sources), "videos": len(sources) * cfg.copies,
                   "files": [str(p) for p in sources], "skipped": skipped},
        "refocus": r, "ffmpeg": f,
        "ratio": round(r["frames_per_second"] / f["frames_per_second"], 3),
        "frame_count_differences": frame_differences(refocus, ffm, cfg.copies),
    }


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        ffmpeg = ensure_ffmpeg()
        refocus_executable()
        with tempfile.TemporaryDirectory(prefix="refocus-bench-") as tmp:
            scratch = Path(tmp)
            sources, skipped = warm_up(ffmpeg, cfg.videos, scratch, cfg)
            for video, why in skipped.items():
                print(f"skipped {video}: {why}", file=sys.stderr)
            if not sources:
                raise BenchmarkError("no video survived the ffmpeg warm-up")
            links = build_corpus(sources, cfg.copies, scratch / "corpus")
            print(f"corpus: {len(links)} videos ({len(sources)} x {cfg.copies}), "
                  f"{cfg.repeats} run(s) per tool", file=sys.stderr)
            refocus, ffm = benchmark(ffmpeg, links, scratch / "corpus", scratch, cfg)
        report = build_report(cfg, ffmpeg, sources, skipped, refocus, ffm)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(report))
    differences = report["frame_count_differences"]
    if differences:
        print("\nFrame counts that differ (per copy): " + "; ".join(
            f"{name}: refocus {c['refocus']}, ffmpeg {c['ffmpeg']}"
            for name, c in differences.items()))
    if cfg.out is not None:
        cfg.out.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
