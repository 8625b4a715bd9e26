"""Shared video fixtures: small painted test clips, written once per session on first use.

`clip("h264.mp4")` returns the path of a clip from `CLIPS`; each frame k carries its number
(see tests/videogen.py), so any test can check which frames it got back.
"""
from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import videogen as vg  # noqa: E402

W, H = 128, 96
FAST_VP9 = {"crf": "30", "b": "0", "deadline": "realtime", "cpu-used": "8"}
# Irregular steps (in 1/10000 s) for the variable-frame-rate clip: 0.1 s, 0.3 s, 0.05 s, ...
VFR_STEPS = (1000, 1000, 3000, 500, 500, 2000, 1000, 4000)
VFR_PTS = [sum(VFR_STEPS[i % len(VFR_STEPS)] for i in range(k)) for k in range(24)]


def _frames(n: int, w: int = W, h: int = H):
    return vg.painted_frames(n, w, h)


CLIPS = {
    # name: (writer(path), frame count written)
    "h264.mp4": (lambda p: vg.write_video(p, _frames(60), 25, options={"g": "12", "bf": "3"}), 60),
    "h264_audio.mp4": (lambda p: vg.write_video(p, _frames(30), 25, audio=True), 30),
    "mpeg4.avi": (lambda p: vg.write_video(p, _frames(48), 24, codec="mpeg4",
                                           options={"g": "12", "qscale": "3"}), 48),
    "mpeg4_bframes.mp4": (lambda p: vg.write_video(p, _frames(48), 30, codec="mpeg4",
                                                   options={"g": "12", "bf": "2", "qscale": "3"}),
                          48),
    "h264_bframes.avi": (lambda p: vg.write_video(p, _frames(48), 30,
                                                  options={"g": "12", "bf": "3"}), 48),
    "vp9.webm": (lambda p: vg.write_video(p, _frames(40), 25, codec="libvpx-vp9",
                                          options={**FAST_VP9, "g": "12"}), 40),
    "mjpeg.avi": (lambda p: vg.write_video(p, _frames(30), 20, codec="mjpeg",
                                           pix_fmt="yuvj420p"), 30),
    "h264.mkv": (lambda p: vg.write_video(p, _frames(90), 30, options={"g": "15"}), 90),
    "hevc.mp4": (lambda p: vg.write_video(p, _frames(40), 25, codec="libx265",
                                          options={"x265-params": "log-level=none:keyint=20:bframes=3"}), 40),
    "h264.ts": (lambda p: vg.write_video(p, _frames(30), 30), 30),
    # MPEG-PS: after a seek the parser guesses timestamps (found shifted by 3 frames).
    "mpeg2.mpg": (lambda p: vg.write_video(p, _frames(60), 30, codec="mpeg2video",
                                           options={"g": "12", "bf": "2", "qscale": "3"}), 60),
    # MJPEG with 4:4:4 chroma is one of the few encoders PyAV ships that takes odd sizes.
    "odd.avi": (lambda p: vg.write_video(p, _frames(12, 317, 243), 25, codec="mjpeg",
                                         pix_fmt="yuvj444p"), 12),
    "vfr.mp4": (lambda p: vg.write_video(p, _frames(len(VFR_PTS)), 10, pts=VFR_PTS,
                                         time_base=Fraction(1, 10000)), len(VFR_PTS)),
    # Display-matrix angles are counter-clockwise (PyAV / FFmpeg side data).
    "rot_ccw90.mp4": (lambda p: vg.write_video(p, _frames(20), 25, rotation=90), 20),
    "rot_cw90.mp4": (lambda p: vg.write_video(p, _frames(20), 25, rotation=-90), 20),
    "rot180.mp4": (lambda p: vg.write_video(p, _frames(20), 25, rotation=180), 20),
    "one_frame.mp4": (lambda p: vg.write_video(p, _frames(1), 25), 1),
    "audio_only.mp4": (lambda p: vg.write_audio_only(p), 0),
    # A cut MP4 loses its moov atom (index at the end) and cannot be opened at all, so the
    # truncation test cuts an MKV, which still declares its full duration in the header.
    "truncated.mkv": (lambda p: vg.truncate(_clip_path(p, "h264.mkv"), p, 0.5), None),
    "truncated.mp4": (lambda p: vg.truncate(_clip_path(p, "h264.mp4"), p, 0.5), None),
    "no_frames.mkv": (lambda p: vg.cut_inside_first_packet(_clip_path(p, "h264.mkv"), p), 0),
    "text.mp4": (lambda p: p.write_text("this is not a video\n" * 50), 0),
    "empty.mp4": (lambda p: p.write_bytes(b""), 0),
}


def _clip_path(sibling: Path, name: str) -> Path:
    """Make clip `name` next to `sibling` (for clips derived from other clips)."""
    path = sibling.parent / name
    if not path.exists():
        CLIPS[name][0](path)
    return path


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("clips")


@pytest.fixture(scope="session")
def clip(clip_dir):
    """clip(name) -> Path of that test clip, written on first request."""

    def get(name: str) -> Path:
        return _clip_path(clip_dir / "_", name)

    return get
