"""The decoder against independent oracles: FFmpeg's own frames and timestamps, and the
selection rule written out directly over the full list of frame times."""

import bisect
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, make_video, make_zero_length_stream
from PIL import Image

from pipelines.decode import DecodeSettings, VideoDecoder, VideoError

EVERY_FRAME = DecodeSettings(fps=None, max_frames=None, size=None)


def decode(path, **settings):
    with VideoDecoder(path, DecodeSettings(**settings)) as video:
        frames = list(video.candidates())
    return frames, video.info


def all_times(path: Path, stream: int = 0) -> list[float]:
    frames, _ = decode(path, fps=None, max_frames=None, size=16, stream=stream)
    return [f.time for f in frames]


def oracle_selection(times: list[float], step: float, cap: int | None) -> list[int]:
    """For each target t0 + i*step, the first frame at or after it; each frame once."""
    chosen: list[int] = []
    i = 0
    while True:
        target = times[0] + i * step
        j = bisect.bisect_left(times, target - 1e-7)
        if j >= len(times):
            return chosen[:cap] if cap else chosen
        if not chosen or j > chosen[-1]:
            chosen.append(j)
        i += 1


@pytest.fixture(scope="module")
def nasa_reference(shared_data):
    ref = shared_data / "reference"
    info = json.loads((ref / "nasa_13013.mp4.stream0.all_frames_info.json").read_text())
    pixels = {
        i: torch.load(ref / f"nasa_13013.mp4.stream0.frame{i:06d}.pt", weights_only=True).numpy()
        for i in (0, 15, 30)
    }
    return [float(f["pts_time"]) for f in info], pixels


def test_every_frame_matches_ffmpeg_pixels_and_timestamps(videos, nasa_reference):
    times, pixels = nasa_reference
    frames, info = decode(videos / "nasa_13013.mp4", fps=None, max_frames=None, size=None)
    assert len(frames) == len(times) == 325
    assert max(abs(f.time - t) for f, t in zip(frames, times, strict=True)) < 1e-6
    for i, expected in pixels.items():
        assert frames[i].rgb.shape == expected.shape == (180, 320, 3)
        assert np.array_equal(frames[i].rgb, expected), f"frame {i} differs from FFmpeg's"
    assert (info.width, info.height, info.codec, info.fps) == (320, 180, "h264", 25.0)


def test_fps_cap_keeps_the_first_frame_at_each_target(videos, nasa_reference):
    times, _ = nasa_reference
    frames, _ = decode(videos / "nasa_13013.mp4", fps=4, max_frames=None, size=None)
    expected = oracle_selection(times, 0.25, None)
    assert [f.time for f in frames] == [times[i] for i in expected]
    assert [f.time for f in frames] == pytest.approx([times[i] for i in expected], abs=1e-6)
    assert len(frames) == 52  # 13 s at 4 per second
    # never more than 4 frames in any one-second window starting at a kept frame
    kept = [f.time for f in frames]
    assert max(bisect.bisect_left(kept, t + 1.0 - 1e-9) - i for i, t in enumerate(kept)) <= 4


def test_frame_cap_spreads_frames_uniformly_over_the_duration(videos, nasa_reference):
    times, _ = nasa_reference
    frames, info = decode(videos / "nasa_13013.mp4", fps=4, max_frames=10, size=None)
    assert info.duration == pytest.approx(13.0)
    step = 13.0 / 10  # the cap bites: 13 s * 4 fps = 52 > 10
    assert [f.time for f in frames] == [times[i] for i in oracle_selection(times, step, 10)]
    assert len(frames) == 10
    gaps = np.diff([f.time for f in frames])
    assert gaps.min() >= step - 0.04 - 1e-6 and gaps.max() <= step + 0.04 + 1e-6


def test_frame_cap_without_container_frame_count(videos):
    """The WebM reports no frame count: the duration still spreads the budget."""
    path = videos / "big_buck_bunny_0_30.webm"
    times = all_times(path)
    frames, info = decode(path, fps=None, max_frames=16, size=64)
    assert len(times) == 720 and len(frames) == 16
    expected = oracle_selection(times, (30.003 - times[0]) / 16, 16)
    assert [f.time for f in frames] == [times[i] for i in expected]
    assert frames[-1].time > 27.0  # reaches the end of the video


def test_short_video_yields_all_of_its_frames(videos):
    frames, _ = decode(videos / "realshort.mp4", fps=None, max_frames=512, size=None)
    assert len(frames) == 36
    frames, _ = decode(videos / "realshort.mp4", fps=60, max_frames=512, size=None)
    assert len(frames) == 36  # 30 fps source under a 60 fps cap


def test_resize_sets_the_short_side_and_keeps_the_picture(videos):
    path = videos / "big_buck_bunny_0_30.webm"
    full, _ = decode(path, fps=1, max_frames=None, size=None)
    small, info = decode(path, fps=1, max_frames=None, size=384)
    assert [f.time for f in full] == [f.time for f in small]
    assert small[0].rgb.shape == (384, 683, 3) and (info.width, info.height) == (683, 384)
    # the same picture as an independent resize of the full frame (PIL, box filter)
    for a, b in zip(full[::10], small[::10], strict=True):
        expected = np.asarray(Image.fromarray(a.rgb).resize((683, 384), Image.Resampling.BOX))
        assert np.abs(expected.astype(int) - b.rgb.astype(int)).mean() < 2.0


def test_resize_never_upscales(videos):
    frames, info = decode(videos / "nasa_13013.mp4", fps=1, max_frames=None, size=1000)
    assert frames[0].rgb.shape == (180, 320, 3) and (info.width, info.height) == (320, 180)
    frames, _ = decode(videos / "nasa_13013.mp4", fps=1, max_frames=None, size=90)
    assert frames[0].rgb.shape == (90, 160, 3)


def test_rotation_matches_ffmpeg_autorotate(videos):
    frames, info = decode(videos / "rotated_90.mov", fps=None, max_frames=None, size=None)
    expected = np.asarray(Image.open(FIXTURES / "rotated_90.frame0.ffmpeg.png").convert("RGB"))
    assert frames[0].rgb.shape == expected.shape == (568, 320, 3)
    assert np.array_equal(frames[0].rgb, expected)
    assert (info.width, info.height, info.source_width, info.rotation) == (320, 568, 568, -90)


def test_rotation_and_resize_together(tmp_path):
    path = make_video(tmp_path / "r.mp4", frames=5, size=(128, 96), rotation=90)
    frames, info = decode(path, fps=None, max_frames=None, size=48)
    rgb = frames[0].rgb
    assert rgb.shape == (64, 48, 3)  # upright 96x128, short side 48
    # the red marker drawn top-left lands bottom-left after a 90° counter-clockwise turn
    assert rgb[-2, 1, 0] > 200 and rgb[-2, 1, 1] < 60 and rgb[1, 1, 0] < 60


def test_second_video_stream_can_be_chosen(videos):
    frames, info = decode(videos / "nasa_13013.mp4", fps=None, max_frames=None, size=None,
                          stream=1)
    assert frames[0].rgb.shape == (270, 480, 3)
    assert info.fps == pytest.approx(29.97, abs=0.01)
    assert len(frames) > 325  # more frames than stream 0 over the same 13 s
    with pytest.raises(VideoError, match=r"has 2 video stream\(s\); stream 2 was asked for"):
        decode(videos / "nasa_13013.mp4", stream=2)


def test_corrupted_video_fails_with_a_one_line_reason(videos):
    with pytest.raises(VideoError) as caught:
        decode(videos / "corrupted.mp4")
    message = str(caught.value)
    assert "Invalid data found when processing input" in message and "\n" not in message


def test_decode_errors_can_be_tolerated_and_are_recorded(videos):
    frames, info = decode(videos / "corrupted.mp4", fps=None, max_frames=None, size=64,
                          max_decode_errors=1)
    assert len(info.decode_errors) == 1 and "Invalid data" in info.decode_errors[0]
    assert len(frames) > 0


@pytest.mark.parametrize(
    "name, reason",
    [
        ("missing", "file not found"),
        ("empty", "empty file (0 bytes)"),
        ("text", "cannot open as a video"),
        ("zero_stream", "no frames: the video stream is empty"),
    ],
)
def test_bad_inputs_fail_with_clear_reasons(bad_inputs, name, reason):
    with pytest.raises(VideoError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        decode(bad_inputs[name])


def test_zero_length_stream_fixture_really_has_a_video_stream(tmp_path):
    import av

    path = make_zero_length_stream(tmp_path / "z.mp4")
    with av.open(str(path)) as container:
        assert len(container.streams.video) == 1


def test_settings_are_checked():
    with pytest.raises(ValueError, match="fps"):
        DecodeSettings(fps=-1)
    with pytest.raises(ValueError, match="max_frames"):
        DecodeSettings(max_frames=-5)


@pytest.mark.parametrize("name", ["nasa_13013.mp4", "asl_book.mkv", "big_buck_bunny_0_30.webm"])
def test_skipping_frames_before_the_next_target_changes_no_kept_pixel(videos, name):
    """With a cap, non-reference frames before the next target are not decoded; the kept
    frames must equal the same frames taken from a decode of every frame."""
    everything, _ = decode(videos / name, fps=None, max_frames=None, size=96)
    by_time = {f.time: f.rgb for f in everything}
    capped, _ = decode(videos / name, fps=3, max_frames=None, size=96)
    assert 0 < len(capped) < len(everything)
    for frame in capped:
        assert np.array_equal(frame.rgb, by_time[frame.time]), frame.time
