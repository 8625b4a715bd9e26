"""stgcli.video on real files written by the tests (see conftest.CLIPS).

Every frame carries its own number (videogen.paint_code), so each test checks that the
pixels returned are the frames the indices claim: an off-by-one or a bad seek fails loudly.
"""
from __future__ import annotations

import numpy as np
import pytest
from conftest import CLIPS, VFR_PTS, H, W
from videogen import check_rgb, read_code

from stgcli import video
from stgcli.errors import UserError, VideoError

HAS_DECORD = video._import_decord() is not None
needs_decord = pytest.mark.skipif(not HAS_DECORD, reason="decord not installed")

# clip -> (fps, width, height)
PLAIN = {
    "h264.mp4": (25, W, H),
    "mpeg4.avi": (24, W, H),
    "mpeg4_bframes.mp4": (30, W, H),
    "h264_bframes.avi": (30, W, H),
    "vp9.webm": (25, W, H),
    "mjpeg.avi": (20, W, H),
    "h264.mkv": (30, W, H),
    "h264.ts": (30, W, H),
    "mpeg2.mpg": (30, W, H),
    "odd.avi": (25, 317, 243),
}
DECORD_CANNOT_OPEN = {"h264.ts"}  # decord 0.6: "Unable to handle EOF ... corrupted frames"
BACKENDS = ["pyav", pytest.param("decord", marks=needs_decord)]


def codes(frames: np.ndarray, rotation: int = 0) -> list[int]:
    """Frame numbers painted in upright frames (undoing `rotation`, clockwise degrees)."""
    return [read_code(np.rot90(f, k=rotation // 90)) for f in frames]


# --------------------------------------------------------------------------- sample_indices


def test_sample_indices_uniform_and_inclusive():
    assert video.sample_indices(100, 5).tolist() == [0, 25, 50, 74, 99]
    assert video.sample_indices(100, 1).tolist() == [0]
    assert video.sample_indices(10, 4, 2, 8).tolist() == [2, 4, 6, 8]


def test_sample_indices_every_frame_once_when_n_covers_window():
    assert video.sample_indices(5, 32).tolist() == [0, 1, 2, 3, 4]
    assert video.sample_indices(10, 3, 4, 6).tolist() == [4, 5, 6]
    out = video.sample_indices(1000, 999)
    assert out.dtype == np.int64 and len(np.unique(out)) == 999 and np.all(np.diff(out) > 0)


@pytest.mark.parametrize("args", [(0, 4), (10, 0), (10, 2, 5, 3), (10, 2, 0, 10), (10, 2, -1)])
def test_sample_indices_rejects_bad_arguments(args):
    with pytest.raises(UserError):
        video.sample_indices(*args)


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", PLAIN)
def test_probe_metadata(clip, name):
    fps, w, h = PLAIN[name]
    info = video.probe(clip(name))
    n = CLIPS[name][1]
    assert (info.fps, info.width, info.height, info.num_frames) == (fps, w, h, n)
    assert info.duration_s == pytest.approx(n / fps)
    assert (info.rotation, info.vfr, info.has_audio) == (0, False, False)
    assert info.backend in ("decord", "pyav") and info.path == str(clip(name))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", PLAIN)
def test_sampled_pixels_are_the_indexed_frames(clip, name, backend):
    fps, w, h = PLAIN[name]
    if backend == "decord" and name in DECORD_CANNOT_OPEN:
        with pytest.raises(VideoError, match="decord cannot read .* use backend 'pyav'"):
            video.sample_frames(clip(name), 7, backend=backend)
        return
    s = video.sample_frames(clip(name), 7, backend=backend)
    assert s.frames.shape == (len(s.indices), h, w, 3) and s.frames.dtype == np.uint8
    assert s.indices.dtype == np.int64 and s.indices[0] == 0
    assert s.indices[-1] == CLIPS[name][1] - 1
    assert codes(s.frames) == s.indices.tolist()
    assert all(check_rgb(f) for f in s.frames)
    assert s.time_source == "index/fps" and s.times_s == pytest.approx(s.indices / fps)
    assert s.info.backend == backend and s.warnings == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["h264.mp4", "h264_bframes.avi", "vp9.webm"])
def test_one_decoder_thread_gives_the_same_frames(clip, name, backend):
    """stg batch decodes with threads=1 per worker; that must change speed, never pixels."""
    if backend == "decord" and name in DECORD_CANNOT_OPEN:
        return
    a = video.sample_frames(clip(name), 7, size=(64, 48), backend=backend)
    b = video.sample_frames(clip(name), 7, size=(64, 48), backend=backend, threads=1)
    assert b.indices.tolist() == a.indices.tolist()
    assert np.array_equal(a.frames, b.frames)
    assert codes(b.frames) == b.indices.tolist()


@pytest.mark.parametrize("window", [(None, None), (0.0, 0.5)])  # the one-pass read, and the careful scan + read
def test_one_decoder_thread_holds_for_every_open_of_the_file(clip, monkeypatch, window):
    """threads=1 reaches the scan's opens too: FFmpeg's own choice there (a frame thread per core) cost a
    batch's decoder more than the one or few frames the scan decodes."""
    seen, real = [], video._open

    def noting(path, threads=0):
        seen.append(threads)
        return real(path, threads)

    monkeypatch.setattr(video, "_open", noting)
    video.sample_frames(clip("h264.mp4"), 5, window[0], window[1], size=(64, 48), backend="pyav", threads=1)
    assert seen and set(seen) == {1}


@needs_decord
@pytest.mark.parametrize("name", ["h264.mp4", "vp9.webm", "mjpeg.avi", "odd.avi"])
def test_backends_agree(clip, name):
    a = video.sample_frames(clip(name), 9, backend="pyav")
    b = video.sample_frames(clip(name), 9, backend="decord")
    assert a.indices.tolist() == b.indices.tolist()
    assert np.abs(a.frames.astype(int) - b.frames).mean() < 3.0


def test_auto_uses_decord_only_where_its_seeking_is_exact(clip):
    if not HAS_DECORD:
        pytest.skip("decord not installed")
    assert video.probe(clip("h264.mp4")).backend == "decord"
    # Found by the painted-frame tests: decord's get_batch returns wrong frames for MPEG-4
    # part 2 with B-frames and H.264-in-AVI with B-frames, and it cannot open MPEG-TS.
    for name in ("mpeg4_bframes.mp4", "h264_bframes.avi", "h264.ts", "mpeg2.mpg", "vfr.mp4",
                 "rot_cw90.mp4"):
        assert video.probe(clip(name)).backend == "pyav", name


def test_auto_falls_back_to_pyav_when_decord_missing(clip, monkeypatch):
    monkeypatch.setattr(video, "_import_decord", lambda: None)
    s = video.sample_frames(clip("h264.mp4"), 4)
    assert s.info.backend == "pyav" and codes(s.frames) == s.indices.tolist()
    with pytest.raises(VideoError, match="decord is not installed"):
        video.sample_frames(clip("h264.mp4"), 4, backend="decord")


@needs_decord
def test_auto_falls_back_to_pyav_when_decord_fails(clip, monkeypatch):
    import decord

    def broken(*args, **kwargs):
        raise decord.DECORDError("simulated decoder crash")

    monkeypatch.setattr(decord, "VideoReader", broken)
    s = video.sample_frames(clip("h264.mp4"), 4)
    assert s.info.backend == "pyav" and codes(s.frames) == s.indices.tolist()
    with pytest.raises(VideoError, match="backend 'pyav'"):
        video.sample_frames(clip("h264.mp4"), 4, backend="decord")


# --------------------------------------------------------------------------- windows, resize


@pytest.mark.parametrize("backend", BACKENDS)
def test_window_selects_frames_inside_it(clip, backend):
    s = video.sample_frames(clip("h264.mp4"), 5, start_s=0.8, end_s=1.6, backend=backend)
    assert s.indices.tolist() == [20, 25, 30, 35, 40]  # 25 fps: 0.8 s = frame 20, 1.6 s = 40
    assert codes(s.frames) == s.indices.tolist()
    assert np.all((s.times_s >= 0.8) & (s.times_s <= 1.6))
    tail = video.sample_frames(clip("h264.mp4"), 100, start_s=2.3, backend=backend)
    assert tail.indices.tolist() == [58, 59]  # open end: up to the last frame, each once


@pytest.mark.parametrize("backend", BACKENDS)
def test_resize_on_decode_keeps_original_info(clip, backend):
    s = video.sample_frames(clip("odd.avi"), 3, size=(64, 48), backend=backend)
    assert s.frames.shape == (3, 48, 64, 3)
    assert (s.info.width, s.info.height) == (317, 243)
    assert codes(s.frames) == s.indices.tolist() and all(check_rgb(f) for f in s.frames)


@pytest.mark.parametrize("kwargs, match", [
    ({"start_s": 1.0, "end_s": 1.0}, "before end"),
    ({"start_s": 2.0, "end_s": 1.0}, "before end"),
    ({"start_s": -0.5}, ">= 0"),
    ({"end_s": -1.0}, ">= 0"),
    ({"start_s": 2.4}, "beyond"),
    ({"start_s": 99.0}, "beyond"),
    ({"start_s": 0.01, "end_s": 0.02}, "no frame"),
    ({"start_s": 2.39}, r"no frame lies in the window \[2.39s, the end\]"),  # past the last frame's time
])
def test_bad_windows_are_user_errors(clip, kwargs, match):
    with pytest.raises(UserError, match=match):
        video.sample_frames(clip("h264.mp4"), 4, **kwargs)


@pytest.mark.parametrize("kwargs", [{"num_frames": 0}, {"num_frames": -3},
                                    {"num_frames": 4, "backend": "opencv"},
                                    {"num_frames": 4, "size": (0, 10)}])
def test_bad_arguments_are_video_errors(clip, kwargs):
    with pytest.raises(VideoError):
        video.sample_frames(clip("h264.mp4"), **kwargs)


# --------------------------------------------------------------------------- VFR, rotation


@pytest.mark.parametrize("backend", BACKENDS)
def test_variable_frame_rate_uses_pts(clip, backend):
    info = video.probe(clip("vfr.mp4"))
    assert info.vfr and info.num_frames == len(VFR_PTS)
    assert info.duration_s == pytest.approx(VFR_PTS[-1] / 10000 + 0.1)  # + median step
    s = video.sample_frames(clip("vfr.mp4"), 6, backend=backend)
    assert s.time_source == "pts"
    assert s.times_s == pytest.approx([VFR_PTS[i] / 10000 for i in s.indices])
    assert codes(s.frames) == s.indices.tolist()
    w = video.sample_frames(clip("vfr.mp4"), 50, start_s=0.5, end_s=1.0, backend=backend)
    expected = [i for i, p in enumerate(VFR_PTS) if 0.5 <= p / 10000 <= 1.0]
    assert w.indices.tolist() == expected


ROTATED = {"rot_ccw90.mp4": 270, "rot_cw90.mp4": 90, "rot180.mp4": 180}


@pytest.mark.parametrize("name", ROTATED)
def test_probe_reports_rotation_and_displayed_size(clip, name):
    info = video.probe(clip(name))
    assert info.rotation == ROTATED[name]
    assert (info.width, info.height) == ((W, H) if info.rotation == 180 else (H, W))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ROTATED)
def test_rotated_frames_come_back_upright(clip, name, backend):
    import cv2

    info = video.probe(clip(name))
    s = video.sample_frames(clip(name), 4, backend=backend)
    assert s.frames.shape[1:3] == (info.height, info.width)
    assert codes(s.frames, info.rotation) == s.indices.tolist()
    # OpenCV auto-rotates too: an independent check that the direction is right.
    ok, ref = cv2.VideoCapture(str(clip(name))).read()
    assert ok and np.abs(ref[..., ::-1].astype(int) - s.frames[0]).mean() < 3.0
    small = video.sample_frames(clip(name), 2, size=(info.width // 2, info.height // 2),
                                backend=backend)
    assert small.frames.shape[1:3] == (info.height // 2, info.width // 2)
    assert codes(small.frames, info.rotation) == small.indices.tolist()


# --------------------------------------------------------------------------- edge files


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_frame_clip(clip, backend):
    info = video.probe(clip("one_frame.mp4"))
    assert info.num_frames == 1 and info.duration_s == pytest.approx(0.04)
    s = video.sample_frames(clip("one_frame.mp4"), 8, backend=backend)
    assert s.indices.tolist() == [0] and codes(s.frames) == [0] and s.times_s.tolist() == [0.0]


def test_audio_track_is_reported(clip):
    info = video.probe(clip("h264_audio.mp4"))
    assert info.has_audio and info.num_frames == 30 and info.duration_s == pytest.approx(1.2)
    assert video.sample_frames(clip("h264_audio.mp4"), 3).warnings == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncated_file_grounds_on_what_decodes(clip, backend):
    info = video.probe(clip("truncated.mkv"))
    assert 0 < info.num_frames < 90
    s = video.sample_frames(clip("truncated.mkv"), 5, backend=backend)
    assert s.indices[-1] == info.num_frames - 1 and codes(s.frames) == s.indices.tolist()
    assert len(s.warnings) == 1 and "truncated" in s.warnings[0]
    assert "truncated.mkv" in s.warnings[0]
    last = list(video.iter_frames(clip("truncated.mkv")))
    assert [i for i, _, _ in last] == list(range(info.num_frames))


@pytest.mark.parametrize("name, match", [
    ("audio_only.mp4", "audio-only"),
    ("text.mp4", "not a readable video"),
    ("empty.mp4", "empty"),
    ("truncated.mp4", "not a readable video"),
    ("no_frames.mkv", "no decodable video frames"),
])
def test_unusable_files_raise_one_line_video_errors(clip, name, match):
    for call in (video.probe, lambda p: video.sample_frames(p, 4),
                 lambda p: next(video.iter_frames(p))):
        with pytest.raises(VideoError, match=match) as err:
            call(clip(name))
        assert name in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(VideoError):
        video.iter_frames(clip(name))  # checked on the call, before the first frame


@pytest.mark.parametrize("ext, kind", [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP")])
def test_a_still_picture_is_refused_not_grounded_as_a_video(tmp_path, ext, kind):
    """FFmpeg reads a PNG as a 1-frame stream at an invented 25 fps: stg grounded it ('not found') and
    reported fps 25 and 0.04 s. It is refused with one line instead. An animated GIF is a video."""
    import cv2

    pic = tmp_path / f"photo.{ext}"
    assert cv2.imwrite(str(pic), np.full((48, 64, 3), 200, np.uint8))
    for call in (video.probe, lambda p: video.sample_frames(p, 4), video.iter_frames):
        with pytest.raises(VideoError, match=rf"photo\.{ext}: a still {kind} picture, not a video") as err:
            call(pic)
        assert "\n" not in str(err.value)
    from PIL import Image

    gif = tmp_path / "anim.gif"
    frames = [Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)) for i in range(5)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert video.probe(gif).num_frames == 5 and video.sample_frames(gif, 3).frames.shape[0] == 3


def test_directory_and_missing_path(clip_dir):
    with pytest.raises(VideoError, match="is a directory"):
        video.probe(clip_dir)
    with pytest.raises(VideoError, match="no such file"):
        video.sample_frames(clip_dir / "missing.mp4", 4)


def test_a_file_it_may_not_read_says_permissions_not_corruption(clip, monkeypatch):
    """FFmpeg's EACCES is an FFmpegError too; its message must not suggest a broken file. (Faked:
    as root, the suite would be allowed to read a chmod 000 file.)"""
    import errno

    import av

    def denied(path, *a, **k):
        raise av.error.PermissionError(errno.EACCES, "Permission denied", path)

    path = clip("h264.mp4")  # written before av.open is taken away
    monkeypatch.setattr(av, "open", denied)
    with pytest.raises(VideoError, match=r"h264.mp4: cannot read it \(permission denied\); check the file's") as e:
        video.probe(path)
    assert "truncated" not in str(e.value)


# --------------------------------------------------------------------------- skipping frames

# Seekable containers with B-frames (unreferenced pictures) in codecs of video._NONREF_SKIP.
SKIPPABLE = ["h264.mp4", "h264.mkv", "mpeg4_bframes.mp4", "hevc.mp4"]


@pytest.mark.parametrize("name", SKIPPABLE)
def test_decode_skips_unreferenced_frames_but_never_kept_ones(clip, name):
    import av

    scan = video._scan(clip(name))
    keep = {int(scan.pts[i]) for i in (0, len(scan.pts) // 3, len(scan.pts) - 1)}
    with av.open(str(clip(name))) as c:
        got = [f.pts for f in video._decode(c, c.streams.video[0], keep=keep)]
    assert keep <= set(got)
    assert len(got) < len(scan.pts)  # something was skipped, or this clip tests nothing
    with av.open(str(clip(name))) as c:  # and the codec context is left decoding everything
        stream = c.streams.video[0]
        list(video._decode(c, stream, keep=keep))
        assert stream.codec_context.skip_frame == "DEFAULT"


@pytest.mark.parametrize("threads", [0, 1])
@pytest.mark.parametrize("name", SKIPPABLE)
def test_sampling_with_skipped_frames_is_bit_exact(clip, name, threads):
    """Every sampled frame (referenced or not) equals the same frame from a full decode."""
    full = {i: f for i, _, f in video.iter_frames(clip(name), size=(64, 48))}
    for n in (3, 5, 13):  # 3 of 40-90 frames: the reader seeks past whole GOPs
        s = video.sample_frames(clip(name), n, size=(64, 48), backend="pyav", threads=threads)
        assert s.indices.tolist() == video.sample_indices(len(full), n).tolist() and s.warnings == []
        assert codes(s.frames) == s.indices.tolist()
        for i, f in zip(s.indices.tolist(), s.frames):
            assert np.array_equal(f, full[i]), (name, n, i)


def test_counted_frames_are_never_skipped(clip):
    """H.264 in AVI: packet pts are decode-order counters, so frames are counted, and a
    skipped frame would shift every later index."""
    assert video._scan(clip("h264_bframes.avi")).counted
    s = video.sample_frames(clip("h264_bframes.avi"), 13, backend="pyav")
    assert codes(s.frames) == s.indices.tolist() and len(s.indices) == 13


@pytest.mark.parametrize("name,rotation", [("h264.mp4", 0), ("odd.avi", 0), ("rot_cw90.mp4", 90)])
def test_one_converter_per_pass_gives_each_frames_own_conversion(clip, name, rotation):
    """_ToRGB keeps one swscale context for a whole pass; every frame must still come out
    exactly as its own fresh conversion would."""
    import av

    rgb = video._ToRGB((40, 30), rotation)
    with av.open(str(clip(name))) as c:
        for frame in c.decode(video=0):
            w, h = (40, 30) if rotation in (0, 180) else (30, 40)
            fresh = video._upright(frame.to_ndarray(format="rgb24", width=w, height=h,
                                                    interpolation="AREA"), rotation)
            assert np.array_equal(rgb(frame), fresh)


# --------------------------------------------------------------------------- iter_frames


def test_iter_frames_every_frame_in_order(clip):
    seen = list(video.iter_frames(clip("h264.mp4"), size=(64, 48)))
    assert [i for i, _, _ in seen] == list(range(60))
    assert [t for _, t, _ in seen] == pytest.approx([i / 25 for i in range(60)])
    assert all(f.shape == (48, 64, 3) and read_code(f) == i for i, _, f in seen)


def test_iter_frames_vfr_and_rotation(clip):
    times = [t for _, t, _ in video.iter_frames(clip("vfr.mp4"))]
    assert times == pytest.approx([p / 10000 for p in VFR_PTS])
    for i, _, f in video.iter_frames(clip("rot_cw90.mp4")):
        assert f.shape == (W, H, 3) and read_code(np.rot90(f, k=1)) == i


@pytest.mark.parametrize("n", [16, 20, 36])
def test_b_frames_in_avi_come_back_in_order_from_the_default_path(tmp_path, n):
    """AVI packet "pts" are decode-order counters with B-frames; the one-pass read trusted them
    and fed the model frames out of order (0, 2, 1, 3, 7, 5, ...) for some clip lengths."""
    from tests import videogen as vg

    path = vg.write_video(tmp_path / f"bf{n}.avi", vg.painted_frames(n, 160, 120), 25, options={"g": "12", "bf": "3"})
    for k in (n, 1000):
        s = video.sample_frames(path, k, size=(128, 128))
        assert codes(s.frames) == s.indices.tolist()


def test_one_sample_still_checks_the_tail_and_ffmpeg_stays_quiet(clip, capfd):
    """--frames 1 samples only the window's first frame, which proves nothing about the tail: the
    truncation must still be found. FFmpeg's own log lines never reach stderr."""
    s = video.sample_frames(clip("truncated.mkv"), 1)
    assert any("truncated" in w for w in s.warnings)
    assert s.info.num_frames == video.probe(clip("truncated.mkv")).num_frames < 90
    video.sample_frames(clip("truncated.mkv"), 16)
    assert "@ 0x" not in capfd.readouterr().err


def test_one_sample_finds_a_tail_that_does_not_decode(tmp_path):
    """An intact container whose last GOP's pictures are zeroed: one sample (the first frame) must
    not take the one-pass read, which only proves the tail when it samples the last frame."""
    import av

    from tests import videogen as vg

    path = vg.write_video(tmp_path / "a.mp4", vg.painted_frames(60, 160, 120), 25, options={"g": "12", "bf": "0"})
    data = bytearray(path.read_bytes())
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size, p.is_keyframe) for p in c.demux(video=0) if p.size]
    last_key = max(i for i, (_, _, key) in enumerate(packets) if key)
    for pos, size, _ in packets[last_key:]:
        data[pos + 4:pos + size] = bytes(size - 4)  # keep each NAL's length field, zero its payload
    bad = tmp_path / "badtail.mp4"
    bad.write_bytes(bytes(data))
    one, many = video.sample_frames(bad, 1), video.sample_frames(bad, 16)
    assert one.info.num_frames == many.info.num_frames < 60
    assert any("truncated" in w for w in one.warnings)


def test_a_clock_that_starts_late_is_not_called_truncated(tmp_path):
    """MKV remuxed from MPEG-TS keeps a clock starting at ~10 s; its DURATION tag counts from 0."""
    from fractions import Fraction

    from tests import videogen as vg

    path = vg.write_video(tmp_path / "late.mkv", vg.painted_frames(40, 128, 96), 25,
                          pts=[10000 + 40 * k for k in range(40)], time_base=Fraction(1, 1000))
    s = video.sample_frames(path, 8)
    assert s.info.num_frames == 40 and s.warnings == []
    assert codes(s.frames) == s.indices.tolist()


def test_a_dropped_frame_under_a_one_tick_per_frame_clock_is_seen(tmp_path):
    """AVI's clock is 1/fps: a drop is a 2-tick step, which the rounding tolerance (1 tick) hid, so
    every later frame was timed one frame early."""
    from fractions import Fraction

    from tests import videogen as vg

    pts = list(range(10)) + list(range(11, 21))
    path = vg.write_video(tmp_path / "drop.avi", vg.painted_frames(20, 128, 96), 25, codec="mjpeg",
                          pix_fmt="yuvj420p", pts=pts, time_base=Fraction(1, 25))
    s = video.sample_frames(path, 20)
    assert s.info.vfr and s.times_s[10:] == pytest.approx([(p) / 25 for p in pts[10:]])


def test_a_last_frame_held_for_seconds_keeps_the_frame_rate(tmp_path):
    """Slideshows and screen recordings hold the last frame: the container's average rate (frames /
    track duration) then reads 10 fps for a 30 fps clip, and every time came out 3x too large."""
    import av

    from tests import videogen as vg

    path = tmp_path / "held.mp4"
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=30, options={"g": "12", "bf": "0"})
        st.width, st.height, st.pix_fmt = 128, 96, "yuv420p"
        packets = []
        for img in vg.painted_frames(30, 128, 96):
            packets += st.encode(av.VideoFrame.from_ndarray(img, format="rgb24"))
        packets += st.encode()
        last = max(packets, key=lambda p: p.pts)
        last.duration = int(2 / float(last.time_base))  # the last frame shows for 2 s
        for p in packets:
            out.mux(p)
    with av.open(str(path)) as c:
        assert float(c.streams.video[0].average_rate) < 15  # what the container says
    s = video.sample_frames(path, 30)
    assert s.info.fps == pytest.approx(30.0) and s.times_s[-1] == pytest.approx(29 / 30)


@pytest.mark.parametrize("ext", ["mkv", "mp4"])
def test_a_file_cut_between_keyframes_counts_from_its_first_decodable_frame(tmp_path, ext):
    """The leading packets of a file cut mid-GOP never decode: they are not frames of the decoded
    video. They were counted as frames 0..k-1, so every index was k too high, one sample per run
    "did not decode", and the pts gap they left made the clip look VFR. Now: indices count from the
    first frame that decodes, the rate is the true one, and a warning says what happened."""
    from tests import videogen as vg
    src = vg.write_video(tmp_path / "src.mkv", vg.painted_frames(72, 160, 120), 25,
                         options={"g": "12", "bf": "2"})
    cut = vg.remux(src, tmp_path / f"cut.{ext}", lambda k, p: k >= 5)  # without its first 5 packets
    full = [read_code(f) for _, _, f in video.iter_frames(src)]
    first = full.index(12)  # the second keyframe: nothing before it in the cut file decodes
    for kw in ({}, {"end_s": 1.2}, {"backend": "pyav"}):
        s = video.sample_frames(cut, 8, **kw)
        assert s.info.num_frames == 72 - first and not s.info.vfr and s.info.fps == pytest.approx(25)
        assert [c - first for c in codes(s.frames)] == s.indices.tolist(), kw
        assert s.indices[0] == 0
        assert s.warnings == [f"{cut}: the first 5 frames do not decode (the file starts between keyframes, "
                              "as a cut stream copy does); frames are counted from the first that does"]
    assert video.probe(cut).num_frames == 72 - first
    assert [read_code(f) - first for _, _, f in video.iter_frames(cut)] == list(range(72 - first))


def test_an_edit_list_is_not_called_truncated(tmp_path):
    """An MP4 whose edit list hides its first samples (a stream-copy trim): the frames it shows
    decode, and the container's sample count (which includes the hidden ones) is no truncation."""
    import av
    from tests import videogen as vg
    src = vg.write_video(tmp_path / "src.mp4", vg.painted_frames(60, 160, 120), 25, options={"g": "12", "bf": "2"})
    with av.open(str(src)) as c:
        tick = int(round(1 / (25 * c.streams.video[0].time_base)))

    def trim(_, p):  # from keyframe 12 on, with frame 16 at time 0: the mov muxer writes an edit list
        if p.pts < 12 * tick and p.dts < 8 * tick:
            return False
        p.pts -= 16 * tick
        p.dts -= 16 * tick

    dst = vg.remux(src, tmp_path / "edit.mp4", trim)
    with av.open(str(dst)) as c:
        assert any(p.is_discard for p in c.demux(video=0) if p.size)  # the file has hidden samples
    s = video.sample_frames(dst, 8)
    assert codes(s.frames) == [i + 16 for i in s.indices.tolist()]
    assert s.warnings == []


def test_a_cover_picture_is_not_taken_for_the_video():
    """An MP4 may carry its thumbnail as a video stream marked attached_pic (yt-dlp
    --embed-thumbnail); where it comes first, stg grounded the still picture. The muxers at hand
    put it last, so the choice is checked on the streams a file would list."""
    from types import SimpleNamespace

    import av

    pic = int(av.stream.Disposition.attached_pic)

    def holding(*dispositions, audio=(), fmt="mov,mp4,m4a,3gp,3g2,mj2"):
        video = [SimpleNamespace(index=i, disposition=d) for i, d in enumerate(dispositions)]
        return SimpleNamespace(streams=SimpleNamespace(video=video, audio=list(audio)),
                               format=SimpleNamespace(name=fmt))

    assert video._video_stream(holding(0, fmt="gif_pipe"), "a.gif").index == 0  # a GIF may be animated
    with pytest.raises(VideoError, match="a.png: a still PNG picture"):
        video._video_stream(holding(0, fmt="png_pipe"), "a.png")

    assert video._video_stream(holding(pic, 0), "a.mp4").index == 1
    assert video._video_stream(holding(0, pic), "a.mp4").index == 0
    assert video._video_stream(holding(int(av.stream.Disposition.default), 0), "a.mp4").index == 0
    with pytest.raises(VideoError, match="a.mp4: holds only a cover picture"):
        video._video_stream(holding(pic), "a.mp4")
    with pytest.raises(VideoError, match="audio-only"):
        video._video_stream(holding(audio=[object()]), "a.mp4")
