"""Video URLs: real sockets on 127.0.0.1 only. A real HTTP server (with byte ranges, as real
servers have) serves a real video; a socket that accepts and never answers stands for a hung
host; schemes other than http(s), and internal hosts, are refused with one line."""

from __future__ import annotations

import http.server
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.cli import EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_USAGE
from pipelines.decode import DecodeSettings, VideoDecoder, VideoError
from stores.manifest import read_manifest
from stores.shards import ShardSet
from stores.urls import NetworkSettings

REFOCUS = str(Path(sys.executable).parent / "refocus")
OPEN = NetworkSettings(allow_private_hosts=True)  # the servers below live on 127.0.0.1
ALL = DecodeSettings(fps=None, max_frames=None, size=None)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with ``Range: bytes=a-b`` answered by 206, as real servers answer (MP4
    demuxing seeks)."""

    def log_message(self, *args: object) -> None:
        pass

    def send_head(self):  # type: ignore[no-untyped-def]
        wanted = self.headers.get("Range", "")
        path = Path(self.translate_path(self.path))
        if not wanted.startswith("bytes=") or not path.is_file():
            return super().send_head()
        data = path.read_bytes()
        first, _, last = wanted[6:].partition("-")
        start, end = int(first or 0), int(last) if last else len(data) - 1
        if start >= len(data):
            self.send_error(416)
            return None
        end = min(end, len(data) - 1)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return io.BytesIO(data[start:end + 1])


@contextmanager
def http_server(folder: Path) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(RangeHandler, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def silent_server() -> Iterator[tuple[str, threading.Event]]:
    """A socket that accepts connections and never answers; the event is set at the first."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    stop, connected = threading.Event(), threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            held.append(conn)
            connected.set()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", connected
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def refocus(*args: object, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([REFOCUS, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def failures(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- a real server

def test_a_video_over_http_decodes_to_ffmpegs_own_frames(tmp_path, shared_data):
    """nasa_13013.mp4 served over HTTP: every timestamp, and the pixels FFmpeg itself
    decoded from the file (the shared reference), exactly."""
    shutil.copy(shared_data / "videos" / "nasa_13013.mp4", tmp_path)
    ref = shared_data / "reference"
    info = json.loads((ref / "nasa_13013.mp4.stream0.all_frames_info.json").read_text())
    with http_server(tmp_path) as base, VideoDecoder(f"{base}/nasa_13013.mp4", ALL, OPEN) as v:
        frames = list(v.candidates())
    assert [round(f.time, 6) for f in frames] == [round(float(f["pts_time"]), 6) for f in info]
    for i in (0, 15, 30):
        expected = torch.load(ref / f"nasa_13013.mp4.stream0.frame{i:06d}.pt",
                              weights_only=True).numpy()
        assert np.array_equal(frames[i].rgb, expected), f"frame {i} differs from FFmpeg's"


def test_refocus_ingest_of_a_url_stores_the_frames_of_the_local_file(tmp_path, shared_data):
    """The command with a URL (and the flag for a 127.0.0.1 host) lands the same frames and
    timestamps as the same command on the local file."""
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(shared_data / "videos" / "realshort.mp4", served)
    with http_server(served) as base:
        url = f"{base}/realshort.mp4"
        remote = refocus("ingest", url, "--out", tmp_path / "remote", "--workers", 1,
                         "--allow-private-hosts", "--network-timeout", 10)
    local = refocus("ingest", served / "realshort.mp4", "--out", tmp_path / "local",
                    "--workers", 1)
    assert remote.returncode == 0, remote.stderr
    assert local.returncode == 0, local.stderr
    got = ShardSet(tmp_path / "remote").read("realshort")
    want = ShardSet(tmp_path / "local").read("realshort")
    assert got.meta["source"] == url
    assert got.meta["timestamps"] == want.meta["timestamps"]
    assert len(got.meta["timestamps"]) == 5  # 1.2 s at 4 per second
    assert got.frames == want.frames


def test_a_url_larger_than_the_download_cap_is_refused(tmp_path, shared_data):
    shutil.copy(shared_data / "videos" / "big_buck_bunny_0_30.webm", tmp_path)  # 1.23 MB
    capped = NetworkSettings(allow_private_hosts=True, max_download_mb=0.5)
    with http_server(tmp_path) as base:
        with pytest.raises(VideoError, match=r"^is 1\.2 MB, more than --max-download-mb 0\.5$"):
            VideoDecoder(f"{base}/big_buck_bunny_0_30.webm", ALL, capped)
        with VideoDecoder(f"{base}/big_buck_bunny_0_30.webm", DecodeSettings(), OPEN) as video:
            assert len(list(video.candidates())) == 120  # under the default cap: all of it


# ----------------------------------------------------------------------------- a hung host

def test_a_hung_url_is_one_failure_and_the_rest_of_its_shard_lands(tmp_path, shared_data):
    good = shared_data / "videos" / "realshort.mp4"
    with silent_server() as (base, connected):
        manifest = write_rows(tmp_path / "m.jsonl", [
            {"id": "hung", "path": f"{base}/hung.mp4"},
            {"id": "good", "path": str(good)},
        ])
        started = time.monotonic()
        done = refocus("ingest", manifest, "--out", tmp_path / "out", "--workers", 1,
                       "--allow-private-hosts", "--network-timeout", 1, timeout=60)
        elapsed = time.monotonic() - started
        assert connected.is_set()
    assert done.returncode == EXIT_FAILURES, done.stderr
    assert elapsed < 20
    [failure] = failures(tmp_path / "out")
    assert failure["video_id"] == "hung"
    assert failure["error"] == ("cannot open as a video: no answer from the server for 1 s "
                                "(--network-timeout)")
    shards = ShardSet(tmp_path / "out")
    [marker] = shards.markers()  # one shard: the hung video and the good one
    assert [s["video_id"] for s in marker["samples"]] == ["good"]
    assert len(shards.read("good").meta["timestamps"]) == 5


def default_sigint() -> None:
    """In the child before exec: SIGINT delivered and handled by default, as a shell starts a
    command (an ignored or blocked SIGINT is inherited through exec, and a library used by an
    earlier test in this process may have left it so)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])


def test_ctrl_c_stops_a_blocked_read_in_one_process_mode(tmp_path):
    """SIGINT to a real `refocus ingest --workers 1` blocked on a host that never answers
    (read timeout 60 s): exit 130 within a few seconds."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with silent_server() as (base, connected):
        proc = subprocess.Popen(
            [REFOCUS, "ingest", f"{base}/hung.mp4", "--out", str(tmp_path / "out"),
             "--workers", "1", "--allow-private-hosts", "--network-timeout", "60"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
            preexec_fn=default_sigint)  # as from a shell, whatever earlier tests did here
        try:
            assert connected.wait(30), "refocus never connected"
            time.sleep(0.5)  # blocked in FFmpeg's read by now
            sent = time.monotonic()
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=10)
            assert time.monotonic() - sent < 3
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == EXIT_INTERRUPTED, proc.stderr.read().decode() if proc.stderr else ""


# ----------------------------------------------------------------------------- refused URLs

REFUSED = {
    "file:///etc/passwd": "scheme 'file' is not allowed (allowed: http, https; "
                          "--allow-scheme file allows it)",
    "concat:/etc/hosts|/etc/passwd": "scheme 'concat' is not allowed (allowed: http, https; "
                                     "--allow-scheme concat allows it; write a local file "
                                     "as ./NAME)",
    "subfile,,start,0,end,0,,:/etc/passwd": "scheme 'subfile' is not allowed (allowed: http, "
                                            "https; --allow-scheme subfile allows it; write a "
                                            "local file as ./NAME)",
    "tcp://127.0.0.1:9/x": "scheme 'tcp' is not allowed (allowed: http, https; "
                           "--allow-scheme tcp allows it)",
    "gopher://127.0.0.1:70/x": "scheme 'gopher' is not allowed (allowed: http, https; "
                               "--allow-scheme gopher allows it)",
    "http://127.0.0.1:9/v.mp4": "host '127.0.0.1' is a loopback, private or link-local "
                                "address (internal hosts are refused; --allow-private-hosts "
                                "allows them)",
    "http://[::ffff:127.0.0.1]:9/v.mp4": "host '::ffff:127.0.0.1' is a loopback, private or "
                                         "link-local address (internal hosts are refused; "
                                         "--allow-private-hosts allows them)",
    "http://localhost:9/v.mp4": "host 'localhost' is a loopback, private or link-local "
                                "address (internal hosts are refused; --allow-private-hosts "
                                "allows them)",
    "http://2130706433/v.mp4": "host '2130706433' is a loopback, private or link-local "
                               "address (internal hosts are refused; --allow-private-hosts "
                               "allows them)",
}


def test_disallowed_urls_in_a_manifest_are_one_issue_each_and_the_rest_lands(
        tmp_path, shared_data):
    rows = [{"id": f"v{i}", "path": path} for i, path in enumerate(REFUSED)]
    rows.append({"id": "good", "path": str(shared_data / "videos" / "realshort.mp4")})
    manifest = write_rows(tmp_path / "m.jsonl", rows)
    issues = read_manifest(manifest, NetworkSettings()).issues
    assert [str(i) for i in issues] == [
        f"{manifest}:{n}: path: {message}" for n, message in enumerate(REFUSED.values(), 1)]

    done = refocus("ingest", manifest, "--out", tmp_path / "out", "--workers", 1)
    assert done.returncode == EXIT_FAILURES, done.stderr
    assert [(f["where"], f["error"]) for f in failures(tmp_path / "out")] == [
        (f"{manifest}:{n}", f"path: {message}") for n, message in enumerate(REFUSED.values(), 1)]
    assert [s["video_id"] for m in ShardSet(tmp_path / "out").markers()
            for s in m["samples"]] == ["good"]


@pytest.mark.parametrize("url", list(REFUSED))
def test_a_disallowed_url_on_the_command_line_is_one_line(tmp_path, url):
    done = refocus("ingest", url, "--out", tmp_path / "out", "--workers", 1)
    assert done.returncode == EXIT_USAGE
    assert done.stderr.strip() == f"error: {url}: {REFUSED[url]}"
    assert not (tmp_path / "out").exists()


def test_allowed_schemes_and_hosts_are_the_users_choice(tmp_path):
    rows = [{"id": "a", "path": "rtmp://media.example.org/live/a"},
            {"id": "b", "path": "http://10.0.0.7/b.mp4"}]
    manifest = write_rows(tmp_path / "m.jsonl", rows)
    assert [i.field for i in read_manifest(manifest, NetworkSettings()).issues] == [
        "path", "path"]
    both = NetworkSettings(schemes=("http", "https", "rtmp"), allow_private_hosts=True)
    assert [v.path for v in read_manifest(manifest, both).videos] == [r["path"] for r in rows]
    # readers that never open the videos (embed, train) do not judge the URLs
    assert len(read_manifest(manifest).videos) == 2


@pytest.mark.parametrize("url", ["concat:/etc/hosts|/etc/passwd", "file:///etc/passwd",
                                 "http://127.0.0.1:9/v.mp4"])
def test_the_decoder_checks_the_url_again(url):
    with pytest.raises(VideoError, match=r"^(scheme|host) "):
        VideoDecoder(url, ALL)
