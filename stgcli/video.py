"""Probe videos and sample frames from them, deterministically, with decord or PyAV.

Why this module is careful:

- Frame counts come from demuxing the stream with PyAV (cheap: no decoding) and then
  decoding the last GOP, so `num_frames` counts frames that really decode. Container headers
  and decord's `len()` over-report on truncated files (an MKV cut in half still declares
  its full duration).
- Every frame is identified by its presentation timestamp, never by "how many frames came
  out since the seek", so an inaccurate seek cannot shift indices by one.
- decord is fast at random access but returns wrong frames on some streams (MPEG-4 part 2
  with B-frames, H.264 in AVI with B-frames: found by the painted-frame tests) and cannot
  open MPEG-TS; `auto` only uses it where its random access is known to be exact and falls
  back to PyAV otherwise.
- Rotation (phone videos) is applied so frames are upright; `rotation` is reported in the
  `rotate`-tag convention: degrees clockwise the stored picture must turn to display.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import VideoError

BACKENDS = ("auto", "decord", "pyav")
# Where decord's random access returned exactly the right frames in the painted-frame
# tests: these containers and codecs without B-frames, and only H.264 with B-frames (MPEG-4
# part 2 / MPEG-2 with B-frames, and H.264 in AVI, came back shifted). Anything else
# (HEVC included: no encoder here to test it) goes to PyAV in "auto".
_DECORD_CONTAINERS = {"mov", "matroska", "avi"}
_DECORD_CODECS = {"h264", "vp8", "vp9", "mjpeg", "mpeg4", "mpeg2video"}
_DECORD_REORDER_OK = {("h264", "mov"), ("h264", "matroska")}
_TAIL_GOPS = 3  # how many trailing GOPs to try before decoding the whole file
# Containers with a sample index, where a seek lands on a keyframe whose frames carry their
# true pts. Elsewhere (MPEG-PS/TS, ...) timestamps after a seek are parser guesses: MPEG-PS
# came back 3 frames off with plausible pts, so those files are only decoded sequentially.
_SEEKABLE = {"mov", "matroska", "avi"}
# Decoders whose skip_frame=NONREF drops exactly the pictures no other picture references
# (H.264/HEVC: nal_ref_idc / NAL type; MPEG-1/2/4 part 2: B-frames). Tested bit-exact.
_NONREF_SKIP = {"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4"}


@dataclass(frozen=True)
class VideoInfo:
    """What the rest of stg needs to know about a video, as it displays and decodes."""

    path: str
    fps: float
    width: int  # as displayed, after rotation
    height: int
    num_frames: int  # frames that decode
    duration_s: float
    rotation: int  # 0/90/180/270, clockwise, like the `rotate` tag
    vfr: bool
    has_audio: bool
    backend: str  # "decord" or "pyav"
    start_s: float = 0.0  # the first frame's time on the container's clock (other streams align to it)


@dataclass
class SampledFrames:
    """Frames sampled for the model, with where in the video they came from."""

    frames: np.ndarray  # (N, h, w, 3) uint8 RGB, upright
    indices: np.ndarray  # int64, 0-based indices into the decoded video
    times_s: np.ndarray  # float64 seconds from the first frame
    info: VideoInfo
    time_source: str  # "index/fps" or "pts"
    warnings: list[str] = field(default_factory=list)
    frame_times: np.ndarray | None = None  # every frame's time, on the clock of times_s (maps a span to frames)
    window: tuple[int, int] | None = None  # first and last frame of the window sampled from (inclusive)


@dataclass(frozen=True)
class _Scan:
    """Everything learned from one demux pass, shared by probe, sampling and iteration."""

    info: VideoInfo
    stream_index: int
    pts: np.ndarray  # int64 sorted pts of decodable frames (stream time base); index = position
    keyframes: np.ndarray  # sorted frame indices of keyframes
    time_base: Fraction
    codec: str
    container: str  # "mov", "matroska", "avi", "mpegts", ...
    reordered: bool  # B-frames: decode order differs from presentation order
    counted: bool  # no usable timestamps: frames are identified by counting from the start
    warnings: tuple[str, ...]
    provisional: bool = False  # frame count from packets, tail not yet seen to decode

    @property
    def times_s(self) -> np.ndarray:
        """Frame times: pts (relative to the first frame) for VFR, index / fps otherwise."""
        if self.info.vfr:
            return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)
        return np.arange(self.info.num_frames, dtype=np.float64) / self.info.fps

    @cached_property
    def index_of_pts(self) -> dict[int, int]:
        """pts -> frame index, built once per scan (a seeking read looks it up after every seek)."""
        return {int(p): i for i, p in enumerate(self.pts)}

    def key_before(self, index: int) -> int:
        """Index of the last keyframe at or before `index` (decoding must start there)."""
        pos = int(np.searchsorted(self.keyframes, index, side="right")) - 1
        return int(self.keyframes[max(pos, 0)]) if len(self.keyframes) else 0


# --------------------------------------------------------------------------- opening


# "https://host/v.mp4" as a path (Path() folds the "//" into "/"): a scheme of two letters or more
# (not a Windows drive), a colon, a slash
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")


def not_a_url(path: str | os.PathLike) -> None:
    """A missing path that is a URL: stg reads local files only; say so rather than "no such file"."""
    if _URL.match(str(path)) and not os.path.exists(path):
        raise VideoError(f"{path}: stg reads local files, not URLs; download the video first (curl, yt-dlp)")


def check_path(path: str | os.PathLike) -> Path:
    """Turn the common path mistakes into one-line errors before any decoder sees them."""
    p = Path(path)
    if not p.exists():
        not_a_url(path)
        raise VideoError(f"{path}: no such file; check the path")
    if p.is_dir():
        raise VideoError(f"{path}: is a directory, not a video file; pass a video file "
                         "(or use `stg batch` for folders)")
    if p.stat().st_size == 0:
        raise VideoError(f"{path}: file is empty; pass a non-empty MP4/WebM/AVI/MKV file")
    return p


def _open(path: str | os.PathLike, threads: int = 0):
    """Open a container with PyAV, mapping its errors to VideoError. `threads` > 0 caps the
    video decoder's threads (0: FFmpeg's choice, one per core)."""
    import av

    p = check_path(path)
    # FFmpeg's own log lines ("partial file", "co located POCs unavailable") would reach stderr
    # beside stg's; what they mean for the user, stg says itself (truncation, dropped frames).
    # libav's own level, not av.logging.set_level: a Python log callback can deadlock FFmpeg's
    # decoder threads (they wait for the GIL).
    av.logging.set_libav_level(av.logging.FATAL)
    try:
        container = av.open(str(p), metadata_errors="ignore")
        for stream in container.streams.video if threads > 0 else ():
            stream.codec_context.thread_count = threads
        return container
    except PermissionError:  # FFmpeg's too (it is both): not a broken file, so no hint about truncation
        raise VideoError(f"{path}: cannot read it (permission denied); check the file's permissions") from None
    except av.FFmpegError as exc:
        raise VideoError(
            f"{path}: not a readable video file ({_reason(exc)}; a truncated MP4 loses its "
            "index); pass an MP4/WebM/AVI/MKV file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise VideoError(f"{path}: cannot open ({exc}); check the file") from None


def _reason(exc: Exception) -> str:
    """Short human reason from an FFmpeg error, without the repeated file name."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[0].strip() or type(exc).__name__


def _video_stream(container, path) -> object:
    """The first video stream that is not a cover picture (an MP4's attached_pic, as yt-dlp
    --embed-thumbnail writes), or a VideoError that says what the file holds instead."""
    import av

    fmt = _format_name(container)
    # FFmpeg's single-image readers: png_pipe, jpeg_pipe, ... (not gif_pipe: a GIF may be animated)
    if fmt == "image2" or (fmt.endswith("_pipe") and fmt != "gif_pipe"):
        # It would pass as a 1-frame "video" at an invented 25 fps; grounding asks when, which
        # a still picture cannot answer.
        kind = fmt.removesuffix("_pipe").upper() if fmt != "image2" else "image"
        raise VideoError(f"{path}: a still {kind} picture, not a video; stg grounds objects over time: "
                         "pass a video file (MP4/WebM/AVI/MKV, or an animated GIF)")
    cover = int(av.stream.Disposition.attached_pic)
    moving = [s for s in container.streams.video if not int(s.disposition) & cover]
    if moving:
        return moving[0]
    if container.streams.video:
        raise VideoError(f"{path}: holds only a cover picture, no video; pass a video file")
    if container.streams.audio:
        raise VideoError(f"{path}: audio-only file (no video stream); pass a video file")
    raise VideoError(
        f"{path}: not a video file (no decodable video stream); pass an MP4/WebM/AVI/MKV file")


def _format_name(container) -> str:
    """Short container family name: 'mov', 'matroska', 'avi', 'mpegts', ..."""
    name = container.format.name.split(",")[0]
    return {"webm": "matroska"}.get(name, name)


# --------------------------------------------------------------------------- decoding


def _decode(container, stream, seek_pts: int | None = None, keep: set | None = None) -> Iterator:
    """Decode frames of `stream`, optionally after seeking; stop quietly at a broken tail.

    Corrupt packets are skipped and a demux error ends the iteration, so a truncated file
    yields exactly the frames that decode. With `keep` (a set of pts) and a codec in
    _NONREF_SKIP, packets of other pts that no frame references are not decoded at all: their
    pictures are never output, and no other picture is computed from them, so every frame
    that is output is bit-identical to a full decode (x264's defaults make ~40% of frames
    such B-frames; sampling 16 of them is then ~25% cheaper).
    """
    import av

    if seek_pts is not None:
        container.seek(int(seek_pts), stream=stream, backward=True, any_frame=False)
    ctx = stream.codec_context
    skip = keep is not None and ctx.name in _NONREF_SKIP
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:  # as _demux_packets does when counting: the same frames, however many threads
                continue
            if skip:  # read by the decoder per packet (and handed to its frame threads)
                ctx.skip_frame = "NONREF" if packet.pts is not None and packet.pts not in keep else "DEFAULT"
            try:
                yield from packet.decode()
            except av.FFmpegError:
                continue
    except av.FFmpegError:
        return
    finally:
        if skip:
            ctx.skip_frame = "DEFAULT"


def _frame_key(frame) -> int | None:
    """The timestamp that identifies a decoded frame."""
    return frame.pts if frame.pts is not None else getattr(frame, "dts", None)


def _indexed(container, stream, scan: _Scan, seek_index: int | None = None,
             wanted: set | None = None) -> Iterator:
    """Yield (index, frame) for decoded frames, indices looked up by pts (or counted).

    The index is None for a frame whose pts the scan never saw: after a seek in a container
    without an index (MPEG-PS) the parser guesses timestamps, and they cannot be trusted.
    With `wanted` (frame indices) unreferenced frames outside it may be skipped (see
    _decode); never when frames are counted, since a skipped frame would shift the count.
    """
    if scan.counted:
        for i, frame in enumerate(_decode(container, stream)):
            if i >= scan.info.num_frames:
                return
            yield i, frame
        return
    lookup = scan.index_of_pts
    seek = scan.pts[seek_index] if seek_index else None  # frame 0: decode from the start
    # Only where packet pts are the pictures' own (an index-carrying container): elsewhere a
    # wanted picture could sit in a packet whose parser-guessed pts is not the frame's.
    keep = None if wanted is None or scan.container not in _SEEKABLE else {int(scan.pts[i]) for i in wanted}
    for frame in _decode(container, stream, seek, keep):
        yield lookup.get(_frame_key(frame)), frame


class _ToRGB:
    """Frames -> upright RGB arrays, resized on conversion (no full-size copy).

    One per reading pass, because it holds one swscale context for all its frames:
    `frame.to_ndarray(width=..)` builds a new context (and its AREA filter) for every frame,
    5x the cost of the conversion itself. Not shared between threads (swscale contexts are
    not thread-safe)."""

    def __init__(self, size: tuple[int, int] | None, rotation: int):
        from av.video.reformatter import VideoReformatter

        self.rotation = rotation
        self.size = size if size is None or rotation in (0, 180) else (size[1], size[0])
        self._reformatter = VideoReformatter()

    def __call__(self, frame) -> np.ndarray:
        if self.size is None:
            arr = frame.to_ndarray(format="rgb24")
        else:
            w, h = self.size
            arr = self._reformatter.reformat(frame, width=w, height=h, format="rgb24",
                                             interpolation="AREA").to_ndarray()
        return _upright(arr, self.rotation)


def _upright(arr: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored picture `rotation` degrees clockwise (np.rot90 turns counter-clockwise)."""
    if rotation == 0:
        return arr
    return np.ascontiguousarray(np.rot90(arr, k=-(rotation // 90), axes=(0, 1)))


def _rotation_of(frame, stream) -> int:
    """Clockwise display rotation from the frame's display matrix, else the `rotate` tag."""
    ccw = getattr(frame, "rotation", None) if frame is not None else None
    if ccw is not None:
        return int(round(-float(ccw) / 90.0)) % 4 * 90
    try:
        return int(round(float(stream.metadata.get("rotate", 0)) / 90.0)) % 4 * 90
    except ValueError:
        return 0


# --------------------------------------------------------------------------- scanning


@dataclass
class _Packets:
    """Video packets seen by one demux pass (decode order)."""

    pts: list[int] = field(default_factory=list)
    keys: list[bool] = field(default_factory=list)
    demux_error: bool = False
    missing_ts: bool = False
    discarded: int = 0  # packets the container marks as not shown (an edit list): its frame count is off


def _demux_packets(container, stream) -> _Packets:
    """Collect timestamps of every video packet without decoding (fast even for long files)."""
    import av

    out = _Packets()
    try:
        for pkt in container.demux(stream):
            if pkt.is_discard and pkt.size:
                out.discarded += 1
            if not pkt.size or pkt.is_discard or pkt.is_corrupt:
                continue
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            if ts is None:
                out.missing_ts = True
                continue
            out.pts.append(int(ts))
            out.keys.append(bool(pkt.is_keyframe))
    except av.FFmpegError:
        out.demux_error = True
    return out


def _verify_tail(container, stream, pts: np.ndarray, keys: np.ndarray):
    """Decode the last GOP(s) and return (decodable pts, rotation sample frame).

    Frames before the last GOP that decodes are trusted; frames in it are replaced by what
    the decoder actually produced. Returns (None, None) when no tried GOP decodes or the
    file's timestamps cannot be trusted after a seek: the caller then decodes everything.
    """
    known = set(pts.tolist())
    for k in keys[::-1][:_TAIL_GOPS]:
        start, got, sample = int(pts[k]), [], None
        try:
            for frame in _decode(container, stream, start):
                key = _frame_key(frame)
                if key not in known:
                    return None, None  # timestamps after a seek are guesses (MPEG-PS)
                if key >= start:
                    got.append(key)
                    sample = frame
        except Exception:  # noqa: BLE001 - an unseekable file: count the slow way
            return None, None
        if got and not _monotonic(got):
            return None, None  # e.g. H.264 in AVI: packet "pts" are decode-order counters
        if got:
            return np.concatenate([pts[:k], np.asarray(got, np.int64)]), sample
    return None, None


def _dead_head(container, stream, pts: np.ndarray, keys: np.ndarray) -> int:
    """How many of the first frames (in presentation order) never decode.

    A file cut between keyframes (a stream copy of a recording that started mid-GOP) begins with
    packets whose reference pictures are not in it: no decoder outputs them, so they are not
    frames of the decoded video. Decoding from the head shows the first frame that is.
    """
    import av

    for start in (int(pts[0]), int(pts[keys[0]]) if len(keys) else None):
        if start is None:
            break
        try:  # MP4 cannot seek to a pts with no keyframe at or before it: then from the first keyframe
            frame = next(iter(_decode(container, stream, start)), None)
        except av.FFmpegError:
            continue
        key = _frame_key(frame) if frame is not None else None
        i = int(np.searchsorted(pts, key)) if key is not None else 0
        return i if i < len(pts) and pts[i] == key else 0  # a pts the demuxer never showed: trust nothing
    return 0


def _monotonic(keys: list) -> bool:
    """Decoded frames come out in presentation order, so real pts must strictly increase."""
    return None not in keys and bool(np.all(np.diff(np.asarray(keys, np.int64)) > 0))


def _count_all(path, stream_index: int) -> tuple[np.ndarray, bool, object]:
    """Decode everything from the start: (pts or counted indices, counted?, a frame).

    The slow path, for files whose timestamps cannot identify frames or whose tail
    check failed; a fresh container because some of those files cannot seek.
    """
    keys, sample = [], None
    with _open(path) as container:
        stream = container.streams[stream_index]
        stream.thread_type = "AUTO"
        for frame in _decode(container, stream):
            sample = sample if sample is not None else frame
            keys.append(_frame_key(frame))
    if not _monotonic(keys):
        return np.arange(len(keys), dtype=np.int64), True, sample
    return np.asarray(keys, np.int64), False, sample


def _is_vfr(pts: np.ndarray) -> bool:
    """Variable frame rate: some pts step differs from the typical one by more than rounding."""
    if len(pts) < 3:
        return False
    d = np.diff(pts).astype(np.float64)
    med = float(np.median(d))
    # Rounding is worth up to one tick, but never half a step: with a 1/fps clock (AVI, some MP4)
    # a step of 2 ticks is a dropped frame, and every later time must come from the pts.
    return bool(np.abs(d - med).max() > min(max(1.0, 0.1 * med), 0.5 * med))


def _fps(stream, pts: np.ndarray, tb: Fraction) -> float:
    """Nominal frame rate of a constant-rate stream: the frames' own spacing, given as the
    container's exact rate when that agrees within 1%. The container's average rate alone is
    frames / track duration, which a last frame held for seconds (a slideshow) makes 3x too low."""
    rates = [float(r) for r in (stream.average_rate, stream.guessed_rate, stream.base_rate)
             if r and 0 < float(r) < 10_000]
    if len(pts) >= 2 and pts[-1] > pts[0]:
        measured = (len(pts) - 1) / (float(pts[-1] - pts[0]) * float(tb))
        return next((r for r in rates if abs(r - measured) <= 0.01 * measured), measured)
    return rates[0] if rates else 25.0  # a single frame with no rate: any value gives time 0 for frame 0


def _declared_seconds(container, stream) -> float | None:
    """Video duration the container claims (to spot truncation), or None if it doesn't say."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    # Matroska's DURATION tag and FFmpeg's container duration run from time 0, not from the first
    # frame: a file whose clock starts late (remuxed from MPEG-TS) would look truncated otherwise.
    start = float(stream.start_time * stream.time_base) if stream.start_time and stream.time_base else 0.0
    tag = stream.metadata.get("DURATION")  # Matroska: "00:00:04.000000000"
    try:
        h, m, s = tag.split(":")
        return max(0.0, int(h) * 3600 + int(m) * 60 + float(s) - start)
    except (AttributeError, ValueError):
        pass
    if container.duration and len(container.streams) == 1:
        return max(0.0, container.duration / 1_000_000 - (container.start_time or 0) / 1_000_000)
    return None


def _scan(path: str | os.PathLike, verify_tail: bool = True, threads: int = 0) -> _Scan:
    """Demux once, verify the tail decodes, and derive every fact `VideoInfo` reports.

    Fast path: packet timestamps plus a decode of the last GOP. Slow path (no usable
    timestamps, no seek index, or a tail that does not decode): decode everything once.
    With `verify_tail=False` the fast path skips the tail decode and returns a provisional
    scan (one frame per packet); `sample_frames` then checks the tail as it reads it, which
    saves decoding a short clip's single GOP twice. `threads` as for `_open`: decoding one or a few
    frames, FFmpeg's own choice (a frame thread per core) costs a batch's decoder more than the frames.
    """
    import av

    with _open(path, threads) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        pk = _demux_packets(container, stream)
        order = np.argsort(np.asarray(pk.pts, np.int64), kind="stable")
        pts = np.asarray(pk.pts, np.int64)[order]
        keys = np.flatnonzero(np.asarray(pk.keys, bool)[order]) if len(order) else order
        usable = len(pts) and not pk.missing_ts and len(np.unique(pts)) == len(pts)
        good, frame, counted = None, None, False
        # Not AVI: its packet "pts" are decode-order counters when B-frames exist, which only the
        # tail check (_verify_tail's order test) catches.
        seekable = usable and _format_name(container) in _SEEKABLE - {"avi"}
        if seekable and not pk.keys[0]:  # starts mid-GOP: the leading frames may not decode
            dead = _dead_head(container, stream, pts, keys)
            pts, keys = pts[dead:], keys[keys >= dead] - dead
        if seekable and not pk.demux_error and not verify_tail:
            try:
                frame = next(iter(_decode(container, stream, int(pts[0]))), None)  # for the rotation
            except av.FFmpegError:  # no keyframe to seek to (a file cut mid-GOP): the careful path
                frame = None
            if frame is not None:
                scan = _build_scan(path, container, stream, pk, pts, keys, False, frame)
                return replace(scan, provisional=True, info=replace(scan.info, backend="pyav"))
        if usable and _format_name(container) in _SEEKABLE:
            good, frame = _verify_tail(container, stream, pts, keys)
        if good is None:  # frames identified in one sequential pass; never seek later
            pts, counted, frame = _count_all(path, stream.index)
            keys = np.zeros(1, np.int64)
        else:
            pts = good
        if not len(pts):
            raise VideoError(f"{path}: no decodable video frames (corrupt or truncated file); "
                             "re-encode or re-download it")
        return _build_scan(path, container, stream, pk, pts, keys, counted, frame)


def _build_scan(path, container, stream, pk: _Packets, pts, keys, counted, frame) -> _Scan:
    """Assemble the scan result from the demux/verify outcome."""
    tb = stream.time_base or Fraction(1, 1)
    vfr = not counted and _is_vfr(pts)
    n = len(pts)
    fps = _fps(stream, pts, tb)
    duration = n / fps
    if vfr:  # last frame's pts plus a typical frame step; fps is then the mean rate
        duration = float((pts[-1] - pts[0] + np.median(np.diff(pts))) * tb)
        fps = n / duration
    rotation = _rotation_of(frame, stream)
    w, h = stream.codec_context.width, stream.codec_context.height
    if rotation in (90, 270):
        w, h = h, w
    codec = stream.codec_context.name
    fmt = _format_name(container)
    warnings = _truncation_warnings(path, container, stream, pk, n, duration, fps, None if counted else pts[0])
    reordered = bool(len(pk.pts) > 1 and np.any(np.diff(np.asarray(pk.pts)) < 0))
    info = VideoInfo(str(path), fps, int(w), int(h), n, float(duration), rotation, vfr,
                     bool(container.streams.audio), "pyav", 0.0 if counted else float(pts[0] * tb))
    scan = _Scan(info, stream.index, pts, np.asarray(keys, np.int64), tb, codec, fmt,
                 reordered, counted, tuple(warnings))
    return replace(scan, info=replace(info, backend=_auto_backend(scan)))


def _truncation_warnings(path, container, stream, pk: _Packets, n: int, duration: float,
                         fps: float, first_pts: int | None) -> list[str]:
    """Say so when fewer frames decode than the file declares: results cover only that part.
    Leading packets that never decode (a file cut between keyframes) get their own note."""
    warnings = []
    dead = int(np.sum(np.asarray(pk.pts, np.int64) < first_pts)) if first_pts is not None else 0
    if dead:
        warnings.append(f"{path}: the first {dead} frames do not decode (the file starts between keyframes, "
                        "as a cut stream copy does); frames are counted from the first that does")
    declared = _declared_seconds(container, stream)
    if declared is not None:
        declared -= dead / fps
    short = declared is not None and declared - duration > max(3.0 / fps, 0.02 * declared)
    # the container claims more frames; not trusted with an edit list, whose hidden samples it counts
    claims_more = (stream.frames or 0) - dead > n and not pk.discarded
    if short or pk.demux_error or n < len(pk.pts) - dead or claims_more:
        what = f"{duration:.2f}s" + (f" of the declared {declared:.2f}s" if short else "")
        warnings.append(f"{path}: video looks truncated or corrupt; only {n} frames ({what}) decode; "
                        "grounding on the part that decodes")
    return warnings


# --------------------------------------------------------------------------- public API


def probe(path: str | os.PathLike) -> VideoInfo:
    """Describe a video (size as displayed, decodable frame count, rotation, VFR, audio).

    Raises VideoError for anything that is not a decodable video.
    """
    return _scan(path).info


def sample_indices(num_frames: int, n: int, start_frame: int = 0,
                   end_frame: int | None = None) -> np.ndarray:
    """`n` frame indices spread uniformly over [start_frame, end_frame] (inclusive).

    LLaVA-Video style: rounded `np.linspace`, so the first and last frame of the window are
    always included; when `n` covers the window every frame is returned once.
    """
    if num_frames < 1:
        raise VideoError(f"video has no frames to sample (num_frames={num_frames})")
    if n < 1:
        raise VideoError(f"number of frames to sample must be at least 1, got {n}")
    end = num_frames - 1 if end_frame is None else end_frame
    if not 0 <= start_frame <= end < num_frames:
        raise VideoError(f"frame window [{start_frame}, {end}] is outside the video's "
                         f"{num_frames} frames; pick frames 0..{num_frames - 1}")
    if n >= end - start_frame + 1:
        return np.arange(start_frame, end + 1, dtype=np.int64)
    return np.unique(np.round(np.linspace(start_frame, end, n)).astype(np.int64))


def sample_frames(path: str | os.PathLike, num_frames: int, start_s: float | None = None,
                  end_s: float | None = None, size: tuple[int, int] | None = None,
                  backend: str = "auto", threads: int = 0) -> SampledFrames:
    """Decode `num_frames` uniformly sampled frames from the [start_s, end_s] window.

    `size` = (width, height) resizes on decode so large videos never cost full-size frames.
    `backend` "auto" reads with one PyAV pass when the window reaches the clip's end (the
    default), else decord where its random access is exact, else PyAV. `threads` > 0
    caps the decoder's threads: callers decoding several clips in parallel (stg batch) pass 1,
    since frame threading costs CPU that parallel clips put to better use.
    """
    _check_args(path, num_frames, size, backend)
    scan, frames = _sample_single_pass(path, num_frames, start_s, end_s, size, backend, threads)
    if frames is None:  # the careful way: tail verified first, then the chosen backend
        scan = _scan(path, threads=threads)
        lo, hi = _window(scan, start_s, end_s)
        idx = sample_indices(scan.info.num_frames, num_frames, lo, hi)
        use = scan.info.backend if backend == "auto" else backend
        frames, used, warnings = _read(path, scan, idx, size, use, backend != "auto", threads)
    else:
        used, warnings = "pyav", []
    idx = np.asarray(sorted(frames), np.int64)
    if not len(idx):
        raise VideoError(f"{path}: none of the sampled frames decode (corrupt file); "
                         "re-encode or re-download it")
    stack = np.stack([frames[i] for i in idx]).astype(np.uint8, copy=False)
    return SampledFrames(stack, idx, scan.times_s[idx], replace(scan.info, backend=used),
                         "pts" if scan.info.vfr else "index/fps",
                         list(scan.warnings) + warnings, scan.times_s, _window(scan, start_s, end_s))


def _sample_single_pass(path, num_frames: int, start_s, end_s, size, backend: str, threads: int = 0):
    """(provisional scan, frames) when one PyAV pass both reads the samples and proves the
    tail decodes; (None, None) when the careful path must run instead.

    Sampling always includes the window's last frame, so when the window reaches the end
    of the video, decoding the samples decodes the tail: if every sampled frame (the last
    packet's among them) comes back, the packet count was the decodable count and the scan
    is exact. Anything else (a window ending early, a frame that did not decode, a forced
    decord backend) falls back to the careful scan. Short clips, a single GOP, decoded once
    instead of twice.
    """
    if backend == "decord":
        return None, None
    scan = _scan(path, verify_tail=False, threads=threads)
    if not scan.provisional:
        return None, None
    lo, hi = _window(scan, start_s, end_s)
    if hi != scan.info.num_frames - 1:
        return None, None
    idx = sample_indices(scan.info.num_frames, num_frames, lo, hi)
    if idx[-1] != hi:  # one sample (the window's first frame) does not prove the tail decodes
        return None, None
    got = _read_pyav(path, scan, idx, size, threads)
    if len(got) != len(idx):
        return None, None
    return replace(scan, provisional=False), got


def iter_frames(path: str | os.PathLike, size: tuple[int, int] | None = None
                ) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield (index, time_s, RGB frame) for every decodable frame, in order, one at a time.

    For rendering: sequential PyAV decode, memory-flat whatever the video length. The file
    is checked on the call (VideoError now, not at the first `next`).
    """
    _check_args(path, 1, size, "pyav")
    return _iter_scanned(path, _scan(path), size)


def _iter_scanned(path, scan: _Scan, size) -> Iterator[tuple[int, float, np.ndarray]]:
    """The generator behind iter_frames."""
    times = scan.times_s
    rgb = _ToRGB(size, scan.info.rotation)
    with _open(path) as container:
        stream = container.streams[scan.stream_index]
        stream.thread_type = "AUTO"
        for i, frame in _indexed(container, stream, scan):
            if i is not None:
                yield i, float(times[i]), rgb(frame)


# --------------------------------------------------------------------------- helpers


def _check_args(path, num_frames: int, size, backend: str) -> None:
    """Reject bad arguments with a message that says which value to change."""
    if backend not in BACKENDS:
        raise VideoError(f"unknown video backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise VideoError(f"{path}: number of frames to sample must be at least 1, "
                         f"got {num_frames}")
    if size is not None and (len(size) != 2 or min(int(s) for s in size) < 1):
        raise VideoError(f"frame size must be (width, height) with both >= 1, got {size}")


def check_openable(path: str | os.PathLike) -> None:
    """Open the container and find its video stream, decoding nothing (milliseconds): what makes a
    file no video at all (text, audio only, a still picture, a cut header) shows here, before a
    model load that can take minutes."""
    with _open(path) as container:
        _video_stream(container, path)


def check_window(path, start_s: float | None, end_s: float | None) -> None:
    """The window mistakes that need no look at the video (checked before a model loads, too)."""
    for name, v in (("start", start_s), ("end", end_s)):
        if v is not None and (not math.isfinite(v) or v < 0):
            raise VideoError(f"{path}: window {name} {v}s must be a time >= 0 seconds")
    if start_s is not None and end_s is not None and start_s >= end_s:
        raise VideoError(f"{path}: window start {start_s}s must be before end {end_s}s")


def _window(scan: _Scan, start_s: float | None, end_s: float | None) -> tuple[int, int]:
    """First and last frame index whose time lies in [start_s, end_s]."""
    info, path = scan.info, scan.info.path
    check_window(path, start_s, end_s)
    if start_s is not None and start_s >= info.duration_s:
        raise VideoError(f"{path}: window start {start_s}s is beyond the video's "
                         f"{info.duration_s:.2f}s; pick a start before that")
    times, eps = scan.times_s, 1e-6
    lo = 0 if start_s is None else int(np.searchsorted(times, start_s - eps, side="left"))
    hi = len(times) - 1 if end_s is None else int(
        np.searchsorted(times, end_s + eps, side="right")) - 1
    if hi < lo:
        lo_s = f"{start_s}s" if start_s is not None else "the start"
        hi_s = f"{end_s}s" if end_s is not None else "the end"
        raise VideoError(f"{path}: no frame lies in the window [{lo_s}, {hi_s}]; widen the window")
    return lo, hi


def _auto_backend(scan: _Scan) -> str:
    """decord when installed and exact for this stream; PyAV for VFR, rotated and the rest.

    PyAV resizes in swscale before rotating; decord would need full-size rotated frames.
    """
    if scan.info.vfr or scan.info.rotation or not _decord_random_ok(scan):
        return "pyav"
    return "decord" if _import_decord() is not None else "pyav"


def _decord_random_ok(scan: _Scan) -> bool:
    """Whether decord's get_batch returns the right frames for this codec/container."""
    if scan.counted or scan.codec not in _DECORD_CODECS:
        return False
    if scan.container not in _DECORD_CONTAINERS:
        return False
    return not scan.reordered or (scan.codec, scan.container) in _DECORD_REORDER_OK


def _import_decord():
    """decord if importable (it has no wheels for Linux/macOS arm64), else None."""
    try:
        import decord
    except (ImportError, OSError):
        return None
    decord.logging.set_level(decord.logging.FATAL)  # its own FFmpeg's log lines, as for PyAV's (_open)
    return decord


def _read(path, scan: _Scan, idx: np.ndarray, size, backend: str, strict: bool, threads: int = 0):
    """Decode the sampled frames: (frames by index, backend used, warnings).

    With backend "auto" a decord failure falls back to PyAV; a forced backend does not.
    """
    if backend == "decord":
        try:
            return _read_decord(path, scan, idx, size, threads), "decord", []
        except VideoError:
            if strict:
                raise
    got = _read_pyav(path, scan, idx, size, threads)
    missing = len(idx) - len(got)
    warn = [f"{path}: {missing} of {len(idx)} sampled frames did not decode and were "
            "dropped"] if missing else []
    return got, "pyav", warn


# --------------------------------------------------------------------------- PyAV reading


def _read_pyav(path, scan: _Scan, idx: np.ndarray, size, threads: int = 0) -> dict[int, np.ndarray]:
    """Seeking pass where timestamps allow it, then a sequential pass for anything missed."""
    import av

    wanted, got = {int(i) for i in idx}, {}
    rgb = _ToRGB(size, scan.info.rotation)
    if not scan.counted:
        try:
            with _open(path, threads) as container:
                _read_seeking(container, scan, wanted, got, rgb)
        except av.FFmpegError:
            pass  # unseekable file: the sequential pass below gets everything
    missing = wanted - set(got)
    if missing:
        with _open(path, threads) as container:
            stream = container.streams[scan.stream_index]
            stream.thread_type = "AUTO"
            _decode_until(_indexed(container, stream, scan, wanted=missing), max(missing), missing, got, rgb)
    return got


def _read_seeking(container, scan: _Scan, wanted: set, got: dict, rgb: _ToRGB) -> None:
    """Visit targets in order; seek to a target's GOP only when that skips decoding.

    Frames are identified by pts, so a seek that lands early costs time, never correctness.
    If a seek yields a pts the scan never saw, timestamps after seeks are guesses: drop
    what that seek produced and leave the rest to the sequential pass.
    """
    stream = container.streams[scan.stream_index]
    stream.thread_type = "AUTO"
    frames, last, since_seek = None, -1, []
    for t in sorted(wanted):
        if t in got:
            continue
        key = scan.key_before(t)
        if frames is None or t <= last or key > last + 1:
            frames, since_seek = _indexed(container, stream, scan, key, wanted), []
        try:
            last = _decode_until(frames, t, wanted, got, rgb, since_seek)
        except _UnknownPts:
            for i in since_seek:
                got.pop(i, None)
            return
        if last < t:
            frames = None


class _UnknownPts(Exception):
    """A decoded frame's pts is not one the scan saw (seeking is unreliable here)."""


def _decode_until(frames, target: int, wanted: set, got: dict, rgb: _ToRGB,
                  collected: list | None = None) -> int:
    """Advance `frames` until index `target`, converting wanted frames; return last index.

    With `collected` (seeking mode) an unknown pts raises _UnknownPts; otherwise such
    frames are skipped.
    """
    last = -1
    for i, frame in frames:
        if i is None:
            if collected is not None:
                raise _UnknownPts
            continue
        last = i
        if i in wanted and i not in got:
            got[i] = rgb(frame)
            if collected is not None:
                collected.append(i)
        if i >= target:
            break
    return last


# --------------------------------------------------------------------------- decord reading


def _read_decord(path, scan: _Scan, idx: np.ndarray, size, threads: int = 0) -> dict[int, np.ndarray]:
    """decord reads where its seeks are exact, else one contiguous pass from frame 0."""
    decord = _import_decord()
    if decord is None:
        raise VideoError("backend 'decord' requested but decord is not installed; "
                         "use backend 'auto' or 'pyav'")
    # decord 0.6 rotates by itself but mis-sizes resized rotated frames (buffer size check
    # fails): decode rotated videos at full size and resize here.
    w, h = size if size is not None and scan.info.rotation == 0 else (-1, -1)
    try:
        if scan.container == "mpegts":  # it opens them, but its frames come back a GOP late
            raise VideoError(f"{path}: decord cannot read {scan.container} files exactly; use backend 'pyav'")
        vr = decord.VideoReader(str(path), ctx=decord.cpu(0), width=w, height=h, num_threads=threads)
        if len(vr) != scan.info.num_frames:
            # fewer: it cannot reach them; more (an MP4 edit list's discarded samples, a truncated
            # tail): its indices may be shifted. PyAV identifies frames by timestamp instead.
            raise VideoError(f"{path}: decord sees {len(vr)} frames where {scan.info.num_frames} decode; "
                             "use backend 'pyav'")
        read = _decord_random if _decord_random_ok(scan) else _decord_sequential
        return {i: _decord_fix(a, scan.info, size) for i, a in read(vr, idx)}
    except VideoError:
        raise
    except Exception as exc:  # noqa: BLE001 - decord raises DECORDError/RuntimeError/...
        raise VideoError(f"{path}: decord cannot read this file ({type(exc).__name__}); "
                         "use backend 'pyav'") from None


def _decord_random(vr, idx: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """One frame at a time in sorted order: decord seeks only when it must."""
    for i in sorted(int(i) for i in idx):
        yield i, _np(vr.get_batch([i]))[0]


def _decord_sequential(vr, idx: np.ndarray, chunk: int = 16) -> Iterator[tuple[int, np.ndarray]]:
    """Read frames 0..max(idx) in contiguous batches, keeping the wanted ones.

    decord only decodes these streams correctly when every read continues where the last
    stopped: its seeks and `skip_frames` land on wrong frames.
    """
    wanted, end = {int(i) for i in idx}, int(max(idx)) + 1
    for a in range(0, end, chunk):
        batch = _np(vr.get_batch(list(range(a, min(a + chunk, end)))))
        yield from ((a + j, f) for j, f in enumerate(batch) if a + j in wanted)


def _np(x) -> np.ndarray:
    """decord NDArray (or a bridged torch tensor) to numpy."""
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def _decord_fix(arr: np.ndarray, info: VideoInfo, size) -> np.ndarray:
    """Resize full-size rotated frames; rotate if a decord build left them as stored."""
    h, w = (info.height, info.width) if size is None else (size[1], size[0])
    if arr.shape[:2] == (h, w):
        return arr
    import cv2

    if arr.shape[:2] != (info.height, info.width):
        arr = _upright(arr, info.rotation)
    return cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA)
