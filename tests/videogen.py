"""Helpers that write small test videos whose frames carry a readable frame number.

Every frame k is painted with `paint_code(frame, k)`: a 2x4 grid of big grey blocks whose
levels encode k in base 4 (8 digits, k < 65536) plus a row of pure red/green/blue/black
blocks. Big flat blocks with levels 85 apart survive lossy codecs, chroma subsampling and
resizing, so `read_code` on a decoded frame tells exactly which source frame it is: an
off-by-one in sampling or seeking shows up as a wrong number, and swapped channels show up
in `check_rgb`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

LEVELS = (0, 85, 170, 255)
ROWS, COLS = 3, 4  # rows 0-1: base-4 digits, row 2: colour reference
COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0))


def _cells(height: int, width: int):
    """Yield (row, col, y0, y1, x0, x1) for each grid cell of a height x width frame."""
    for r in range(ROWS):
        for c in range(COLS):
            yield (r, c, r * height // ROWS, (r + 1) * height // ROWS,
                   c * width // COLS, (c + 1) * width // COLS)


def paint_code(frame: np.ndarray, k: int) -> np.ndarray:
    """Paint frame number `k` into `frame` (H, W, 3 uint8 RGB) in place and return it."""
    if not 0 <= k < 4 ** (2 * COLS):
        raise ValueError(f"code {k} out of range")
    h, w = frame.shape[:2]
    for r, c, y0, y1, x0, x1 in _cells(h, w):
        if r < 2:
            digit = (k // 4 ** (r * COLS + c)) % 4
            frame[y0:y1, x0:x1] = LEVELS[digit]
        else:
            frame[y0:y1, x0:x1] = COLOURS[c]
    return frame


def _cell_mean(frame: np.ndarray, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """Mean colour of the central half of a cell: edges blur under compression and resize."""
    dy, dx = max((y1 - y0) // 4, 0), max((x1 - x0) // 4, 0)
    return frame[y0 + dy:y1 - dy, x0 + dx:x1 - dx].reshape(-1, 3).mean(axis=0)


def read_code(frame: np.ndarray) -> int:
    """Read back the frame number painted by `paint_code` from a decoded (maybe resized) frame."""
    h, w = frame.shape[:2]
    k = 0
    for r, c, y0, y1, x0, x1 in _cells(h, w):
        if r < 2:
            grey = float(_cell_mean(frame, y0, y1, x0, x1).mean())
            digit = int(np.argmin([abs(grey - v) for v in LEVELS]))
            k += digit * 4 ** (r * COLS + c)
    return k


def check_rgb(frame: np.ndarray, tol: float = 60.0) -> bool:
    """True when the colour row reads red, green, blue, black: channel order is RGB."""
    h, w = frame.shape[:2]
    for r, c, y0, y1, x0, x1 in _cells(h, w):
        if r == 2 and np.abs(_cell_mean(frame, y0, y1, x0, x1) - COLOURS[c]).max() > tol:
            return False
    return True


def painted_frames(n: int, width: int, height: int) -> Iterable[np.ndarray]:
    """Generate `n` coded RGB frames 0..n-1 of the given size."""
    for k in range(n):
        yield paint_code(np.zeros((height, width, 3), np.uint8), k)


def write_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    fps: float,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int | None = None,
    audio: bool = False,
    container_format: str | None = None,
) -> Path:
    """Encode RGB frames to `path` with PyAV.

    `pts` (in `time_base` units) gives irregular timestamps for a variable-frame-rate file;
    `rotation` is a display-matrix angle, counter-clockwise (PyAV's convention), so the
    player / decoder must turn the stored frames to show them upright; `audio` adds a short
    silent AAC track.
    """
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream(codec, rate=rate, options=options or {})
        stream.pix_fmt = pix_fmt
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if rotation:
            stream.set_display_rotation(rotation)
        astream = out.add_stream("aac", rate=16000) if audio else None
        count = 0
        for i, img in enumerate(frames):
            if i == 0:
                stream.height, stream.width = img.shape[:2]
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[i], time_base
            out.mux(stream.encode(frame))
            count += 1
        out.mux(stream.encode())
        if astream is not None:
            _write_silence(out, astream, count / fps)
    return path


def _write_silence(out: av.container.OutputContainer, stream, seconds: float) -> None:
    """Mux `seconds` of silent mono audio into an open output container."""
    samples = max(int(seconds * stream.rate), 1024)
    for start in range(0, samples, 1024):
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                           layout="mono")
        frame.sample_rate, frame.pts = stream.rate, start
        out.mux(stream.encode(frame))
    out.mux(stream.encode())


def write_audio_only(path: str | Path, seconds: float = 1.0, format: str | None = None) -> Path:
    """Write an AAC-only file (no video stream), e.g. a .mp4 or .m4a."""
    path = Path(path)
    with av.open(str(path), "w", format=format) as out:
        _write_silence(out, out.add_stream("aac", rate=16000), seconds)
    return path


def truncate(src: str | Path, dst: str | Path, fraction: float) -> Path:
    """Copy the first `fraction` of `src`'s bytes to `dst`, like an interrupted download."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def cut_inside_first_packet(src: str | Path, dst: str | Path) -> Path:
    """Copy `src` up to the middle of its first video packet: a header with no whole frame."""
    with av.open(str(src)) as container:
        pkt = next(p for p in container.demux(video=0) if p.size)
        end = pkt.pos + pkt.size // 2
    Path(dst).write_bytes(Path(src).read_bytes()[:end])
    return Path(dst)


def remux(src: str | Path, dst: str | Path, edit) -> Path:
    """Stream-copy `src`'s video packets (those with a dts, in decode order, numbered from 0) to
    `dst` without re-encoding: `edit(k, packet)` returns False to drop a packet, and may shift
    its timestamps. How cut or trimmed files are made."""
    with av.open(str(src)) as c, av.open(str(dst), "w") as out:
        s = c.streams.video[0]
        o = out.add_stream_from_template(s)
        for k, p in enumerate(p for p in c.demux(s) if p.dts is not None):
            if edit(k, p) is not False:
                p.stream = o
                out.mux(p)
    return Path(dst)
