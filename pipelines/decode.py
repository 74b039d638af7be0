"""Decode one video into its candidate frames (PyAV).

Candidates are chosen by presentation timestamp while decoding sequentially:

* ``step = max(1 / fps, duration / max_frames)`` seconds (either term dropped when its cap
  is off); target times are ``t0 + i * step`` from the first frame's time ``t0``;
* a decoded frame is kept when its time reaches the next target, so at most one frame is
  kept per target — at most ``fps`` per second, and ``max_frames`` spread uniformly over the
  duration when that cap bites; a video with fewer frames than its budget yields all;
* only kept frames are converted (resized in their own pixel format, then to RGB, then
  turned upright); the others are dropped as decoded pictures, never touched;
* packets whose timestamp lies before the next target are sent with ``skip_frame=NONREF``:
  the codec may skip them when no other frame refers to them (H.264/HEVC/MPEG B-frames, say),
  so frames that cannot be kept are often not even decoded. Kept frames are unaffected: a
  non-reference frame changes no other picture, and targets only move forward.

Timestamps are the frames' exact ``pts * time_base`` in seconds, as ffprobe's ``pts_time``.
Rotation metadata (the display matrix) is honoured by turning the picture upright.

Network inputs (``stores.urls``): the decoder checks the URL again (scheme, and the
addresses its host resolves to) before FFmpeg sees it, and opens it with connect/read
timeouts (FFmpeg's ``rw_timeout`` and http ``timeout``, and PyAV's ``timeout``, per read), no
reconnects, no redirects while internal hosts are refused (a redirect could lead to one), and a
byte cap (the declared size, then the bytes read so far). Ctrl-C stops a
blocked read within about 0.1 s: PyAV's FFmpeg interrupt callback, consulted while a read
waits, compares ``time.monotonic()`` of its module with the read timeout; the decoder gives
that module a clock that says "timed out" once an interrupt is pending (its SIGINT handler,
installed while a network input is open in the main thread, records the interrupt), and
raises ``KeyboardInterrupt`` when the read returns.
"""

from __future__ import annotations

import errno
import math
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import av
import av.container.core
import numpy as np

from stores.urls import (
    NetworkSettings,
    internal_address,
    literal_address,
    scheme_of,
    url_problem,
)

# Frames whose times are this close count as reaching a target (float rounding of pts*tb).
_EPS = 1e-7


class VideoError(Exception):
    """A video that cannot be decoded. The message is one line: what went wrong."""


@dataclass(frozen=True)
class DecodeSettings:
    """How candidates are taken from a video.

    ``fps`` and ``max_frames`` cap the number of candidates (``None`` or 0 turns a cap off);
    ``size`` is the short side after resizing (``None`` or 0 keeps the decoded size; never
    upscales). ``stream`` indexes the file's video streams. ``threads`` is PyAV's decoder
    thread count (0: as many as the codec likes). A video fails when more than
    ``max_decode_errors`` packets cannot be decoded.
    """

    fps: float | None = 4.0
    max_frames: int | None = 512
    size: int | None = 384
    stream: int = 0
    threads: int = 0
    max_decode_errors: int = 0

    def __post_init__(self) -> None:
        if self.fps is not None and (not math.isfinite(self.fps) or self.fps < 0):
            raise ValueError(f"fps must be a non-negative number, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 0:
            raise ValueError(f"max_frames must be non-negative, got {self.max_frames}")
        if self.size is not None and self.size < 0:
            raise ValueError(f"size must be non-negative, got {self.size}")
        if self.stream < 0:
            raise ValueError(f"stream must be non-negative, got {self.stream}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class VideoInfo:
    """What the container says about the chosen stream, plus what decoding found."""

    source: str
    stream: int
    codec: str
    width: int  # of the candidate frames as stored (after rotation and resizing)
    height: int
    source_width: int  # of the coded pictures
    source_height: int
    rotation: int  # degrees the picture was turned (counter-clockwise) to stand upright
    fps: float | None  # the stream's average frame rate
    duration: float | None  # seconds, from the stream, the container, or a packet scan
    start_time: float  # time of the first decoded frame
    decode_errors: list[str] = field(default_factory=list)


@dataclass
class Candidate:
    """One kept frame: its presentation time in seconds and its RGB pixels."""

    time: float
    rgb: np.ndarray  # [H, W, 3] uint8, upright


def _seconds(value: int | None, time_base: Fraction | None) -> float | None:
    if value is None or time_base is None:
        return None
    return float(value * time_base)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    message = text[0] if text else type(error).__name__
    return message.replace("[Errno ", "[").strip()


# ----------------------------------------------------------------------------- network inputs

_interrupted = threading.Event()  # Ctrl-C arrived while a network input was open


class _InterruptingClock:
    """Stands in for the ``time`` module inside ``av.container.core`` (see the module notes):
    once an interrupt is pending, every timeout has passed."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def monotonic() -> float:
        return math.inf if _interrupted.is_set() else time.monotonic()


def _check_interrupt() -> None:
    if _interrupted.is_set():
        _interrupted.clear()
        raise KeyboardInterrupt


@contextmanager
def _ctrl_c_stops_reads() -> Iterator[None]:
    """While open, Ctrl-C is recorded, breaks FFmpeg's blocked read, and is raised after.
    Only in the main thread with Python's own handler: a pool worker ignores SIGINT (its
    parent decides) and a caller with its own handler keeps it."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    if getattr(av.container.core, "time", None) is time:
        setattr(av.container.core, "time", _InterruptingClock())  # noqa: B010
    _interrupted.clear()
    previous = signal.signal(signal.SIGINT, lambda signum, frame: _interrupted.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _check_interrupt()


def _host_problem(url: str, network: NetworkSettings) -> str | None:
    """Why the URL's host may not be reached once its name is resolved, or None."""
    host = urlsplit(url).hostname
    if network.allow_private_hosts or not host or literal_address(host):
        return None  # literal addresses were checked with the URL
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as e:
        return f"cannot resolve host {host!r} ({_one_line(e)})"
    internal = sorted({str(info[4][0]) for info in infos if internal_address(str(info[4][0]))})
    if internal:
        return (f"host {host!r} resolves to the internal address {internal[0]} "
                "(internal hosts are refused; --allow-private-hosts allows them)")
    return None


def _open_arguments(path: str, network: NetworkSettings) -> dict[str, Any]:
    """``av.open`` keywords: local files may use the file protocol only; a URL its allowed
    schemes (and the transports under them), with timeouts and no reconnects."""
    scheme = scheme_of(path)
    if scheme is None:
        return {"options": {"protocol_whitelist": "file"}}
    micro = str(round(network.timeout * 1_000_000))
    options = {"protocol_whitelist": ",".join([*network.schemes, "tcp", "tls"]),
               "rw_timeout": micro}
    if scheme in ("http", "https"):
        options |= {"timeout": micro, "reconnect": "0", "reconnect_streamed": "0",
                    "reconnect_on_network_error": "0"}
        if not network.allow_private_hosts:  # a redirect could lead to an internal host
            options["max_redirects"] = "0"
    return {"options": options, "timeout": (network.timeout, network.timeout)}


class _ByteCap:
    """Bytes read from a network input so far (by the packets' positions), refused past
    the cap."""

    def __init__(self, network: NetworkSettings | None) -> None:
        self.limit = network.max_bytes if network is not None else None
        self.mb = network.max_download_mb if network is not None else 0.0
        self.read = 0

    def check_size(self, size: int) -> None:
        if self.limit is not None and size > self.limit:
            raise VideoError(f"is {size / 2**20:.1f} MB, more than --max-download-mb "
                             f"{self.mb:g}")

    def count(self, packet: av.Packet) -> None:
        if self.limit is None:
            return
        pos = packet.pos
        end = pos + packet.size if pos is not None and pos >= 0 else self.read + packet.size
        self.read = max(self.read, end)
        if self.read > self.limit:
            raise VideoError(f"stopped after {self.read / 2**20:.1f} MB: more than "
                             f"--max-download-mb {self.mb:g}")


def _scan_end(path: str, stream_index: int, network: NetworkSettings) -> float | None:
    """The stream's end time from its packets (demuxing only, no decoding)."""
    end = None
    cap = _ByteCap(network if scheme_of(path) else None)
    with av.open(path, **_open_arguments(path, network)) as container:
        stream = container.streams.video[stream_index]
        for packet in container.demux(stream):
            cap.count(packet)
            if packet.pts is None:
                continue
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
    return end


def _target_size(width: int, height: int, size: int | None) -> tuple[int, int]:
    """(width, height) with the short side at most ``size``, aspect kept, never upscaled."""
    if not size or min(width, height) <= size:
        return width, height
    scale = size / min(width, height)
    # The short side lands exactly on ``size``; the long side keeps the aspect ratio.
    if width <= height:
        return size, max(1, round(height * scale))
    return max(1, round(width * scale)), size


class VideoDecoder:
    """Open a video and iterate its candidate frames::

        with VideoDecoder(path, settings) as video:
            for frame in video.candidates():
                ...
            video.info  # complete after iteration: decode errors, start time
    """

    def __init__(self, path: str | os.PathLike[str], settings: DecodeSettings,
                 network: NetworkSettings | None = None) -> None:
        self.path = str(path)
        self.settings = settings
        self.network = network or NetworkSettings()
        self.url = scheme_of(self.path) is not None
        self._cap = _ByteCap(self.network if self.url else None)
        self._stack = ExitStack()
        try:
            self.container = self._open()
            self.stream = self._choose_stream()
            self._cap.check_size(self.container.size)
            self.info = self._probe()
        except BaseException:
            self.close()
            raise
        self._next_target = math.inf  # frames before it cannot be kept; inf: not known yet

    def _open(self) -> av.container.InputContainer:
        if self.url:
            problem = url_problem(self.path, self.network) or _host_problem(
                self.path, self.network)
            if problem is not None:
                raise VideoError(problem)
            self._stack.enter_context(_ctrl_c_stops_reads())
        else:
            p = Path(self.path)
            if not p.exists():
                raise VideoError("file not found")
            if p.is_dir():
                raise VideoError("is a folder, not a video file")
            if p.stat().st_size == 0:
                raise VideoError("empty file (0 bytes)")
        try:
            return av.open(self.path, metadata_errors="ignore",
                           **_open_arguments(self.path, self.network))
        except av.error.FFmpegError as e:
            raise VideoError(self._failure("cannot open as a video", e)) from None

    def _failure(self, what: str, error: av.error.FFmpegError) -> str:
        """One line for an FFmpeg error; a pending Ctrl-C is raised instead."""
        _check_interrupt()
        if self.url and isinstance(error, (av.error.ExitError, av.error.TimeoutError)):
            return (f"{what}: no answer from the server for {self.network.timeout:g} s "
                    "(--network-timeout)")
        redirects = "max_redirects" in _open_arguments(self.path, self.network)["options"]
        if redirects and getattr(error, "errno", None) == errno.EIO:
            return (f"{what}: {_one_line(error)} (redirects are not followed while internal "
                    "hosts are refused; --allow-private-hosts follows them)")
        return f"{what}: {_one_line(error)}"

    def __enter__(self) -> VideoDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            container = getattr(self, "container", None)
            if container is not None:
                container.close()
        finally:
            self._stack.close()

    def _choose_stream(self) -> av.VideoStream:
        streams = self.container.streams.video
        if not streams:
            raise VideoError("no video stream")
        if self.settings.stream >= len(streams):
            raise VideoError(
                f"has {len(streams)} video stream(s); stream {self.settings.stream} was asked for"
            )
        stream = streams[self.settings.stream]
        if stream.codec_context is None:
            raise VideoError(f"video stream {self.settings.stream} has no decoder available")
        stream.thread_type = "AUTO"
        stream.thread_count = self.settings.threads
        return stream

    def _probe(self) -> VideoInfo:
        s = self.stream
        tb = s.time_base
        duration = _seconds(s.duration, tb)
        if duration is None and self.container.duration:
            duration = self.container.duration / av.time_base
        rate = s.average_rate or s.guessed_rate
        w, h = s.codec_context.width, s.codec_context.height
        return VideoInfo(
            source=self.path, stream=self.settings.stream, codec=s.codec_context.name,
            width=w, height=h, source_width=w, source_height=h, rotation=0,
            fps=float(rate) if rate else None, duration=duration, start_time=0.0,
        )

    def _end_time(self) -> float | None:
        """Absolute end time of the stream in seconds, for spreading a capped budget."""
        s = self.stream
        start = _seconds(s.start_time, s.time_base)
        length = _seconds(s.duration, s.time_base)
        if start is not None and length:
            return start + length
        if self.container.duration:
            c_start = (self.container.start_time or 0) / av.time_base
            return c_start + self.container.duration / av.time_base
        try:
            return _scan_end(self.path, self.settings.stream, self.network)
        except av.error.FFmpegError:
            _check_interrupt()
            return None

    def _step(self, first_time: float) -> float:
        fps, cap = self.settings.fps, self.settings.max_frames
        step = 1.0 / fps if fps else 0.0
        if cap:
            end = self._end_time()
            if end is not None and end > first_time:
                step = max(step, (end - first_time) / cap)
        return step

    def _frames(self) -> Iterator[av.VideoFrame]:
        """Decoded frames; packets that fail to decode are recorded as decode errors.

        A packet whose time lies before the next target may be skipped by the codec when it
        holds a non-reference frame (see the module notes)."""
        errors = self.info.decode_errors
        context = self.stream.codec_context
        skipping = False
        for packet in self.container.demux(self.stream):
            _check_interrupt()
            self._cap.count(packet)
            before_target = (
                packet.pts is not None and math.isfinite(self._next_target)
                and float(packet.pts * packet.time_base) + _EPS < self._next_target
            )
            if before_target != skipping:
                context.skip_frame = "NONREF" if before_target else "DEFAULT"
                skipping = before_target
            try:
                frames = packet.decode()
            except av.error.FFmpegError as e:
                _check_interrupt()
                where = _seconds(packet.pts, packet.time_base)
                at = f" at {where:.3f}s" if where is not None else ""
                errors.append(f"packet{at}: {_one_line(e)}")
                if len(errors) > self.settings.max_decode_errors:
                    raise VideoError(f"decoding failed{at}: {_one_line(e)}") from None
                continue
            yield from frames  # type: ignore[misc]

    def _convert(self, frame: av.VideoFrame) -> np.ndarray:
        turns = round(frame.rotation / 90) % 4 if frame.rotation else 0
        width, height = _target_size(frame.width, frame.height, self.settings.size)
        if (width, height) != (frame.width, frame.height):
            # Scale in the decoder's own pixel format, then convert the smaller picture:
            # twice as fast as scaling straight into RGB, and closer to a box filter.
            frame = frame.reformat(width=width, height=height, interpolation="AREA")
        rgb = frame.to_ndarray(format="rgb24")
        if turns:
            rgb = np.ascontiguousarray(np.rot90(rgb, turns))
        return rgb

    def candidates(self) -> Iterator[Candidate]:
        """Decode sequentially and yield the kept frames in time order."""
        cap = self.settings.max_frames or None
        step: float | None = None
        first_time = next_target = 0.0
        last_time = -math.inf
        kept = 0
        fallback_rate = 1.0 / self.info.fps if self.info.fps else 0.0
        try:
            for frame in self._frames():
                if frame.pts is not None:
                    t = float(frame.pts * frame.time_base)
                else:  # no timestamp: continue from the previous frame at the nominal rate
                    t = (last_time if math.isfinite(last_time) else 0.0) + fallback_rate
                if t <= last_time:  # broken timing: times must increase
                    continue
                if step is None:
                    step = self._step(t)
                    self.info.start_time = first_time = next_target = t
                    if step == 0:
                        self._next_target = -math.inf  # every frame is kept: skip nothing
                if t + _EPS < next_target:
                    last_time = t
                    continue
                rgb = self._convert(frame)
                if kept == 0:
                    self.info.height, self.info.width = rgb.shape[:2]
                    self.info.rotation = round(frame.rotation) if frame.rotation else 0
                yield Candidate(t, rgb)
                kept += 1
                last_time = t
                if cap is not None and kept >= cap:
                    break
                if step > 0:
                    passed = math.floor((t - first_time) / step + _EPS)
                    next_target = first_time + (passed + 1) * step
                    self._next_target = next_target
        except av.error.FFmpegError as e:
            raise VideoError(self._failure("decoding failed", e)) from None
        if self.info.duration is None and math.isfinite(last_time):
            self.info.duration = last_time + fallback_rate - self.info.start_time
        if kept == 0:
            if self.info.decode_errors:
                raise VideoError(f"no frame could be decoded ({self.info.decode_errors[0]})")
            raise VideoError("no frames: the video stream is empty")
