"""`stg render`: draw a grounding result onto its video, as a browser-playable H.264 MP4.

Overlays are supervision's annotators (BoxAnnotator, LabelAnnotator, TraceAnnotator), one per
concern as supervision lays them out, plus `TimelineAnnotator`, written here because supervision
has no timeline. The writer is PyAV with libx264/yuv420p: supervision's VideoSink writes mp4v,
which browsers do not play. Every source frame is written once, at its own timestamp, so the
output has the source's frame count and rate; audio is copied when the container allows it.
"""
from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from .errors import UserError

OVERLAYS = ("box", "label", "trace", "timeline")
_TB = Fraction(1, 90000)  # the MPEG clock: exact for 24, 25, 30 and the NTSC rates


class TimelineAnnotator:
    """A bar along the bottom: the whole clip in grey, the span in colour, a marker at `t`."""

    def __init__(self, duration_s: float, span: tuple[float, float] | None, height: int | None = None,
                 color=(64, 222, 138)):
        self.duration = max(duration_s, 1e-6)
        self.span = span
        self.height = height
        self.color = color  # BGR, like the frames supervision draws on

    def annotate(self, scene: np.ndarray, t: float) -> np.ndarray:
        import cv2

        h, w = scene.shape[:2]
        bar = self.height or max(4, h // 40)
        y0 = h - bar
        cv2.rectangle(scene, (0, y0), (w - 1, h - 1), (60, 60, 60), -1)
        if self.span is not None:
            x0 = int(round(self.span[0] / self.duration * (w - 1)))
            x1 = int(round(self.span[1] / self.duration * (w - 1)))
            cv2.rectangle(scene, (x0, y0), (max(x0, x1), h - 1), self.color, -1)
        xm = int(round(min(max(t / self.duration, 0), 1) * (w - 1)))
        cv2.rectangle(scene, (max(0, xm - 1), y0), (min(w - 1, xm + 1), h - 1), (255, 255, 255), -1)
        return scene


def parse_overlays(spec: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in spec.split(",") if x.strip())
    bad = [n for n in names if n not in OVERLAYS]
    if bad or not names:
        raise UserError(f"--overlay {spec!r}: choose from {','.join(OVERLAYS)}")
    return names


def render(video: str | os.PathLike, result, out: str | os.PathLike,
           overlays: tuple[str, ...] = OVERLAYS) -> Path:
    """Write `out` (H.264/yuv420p MP4): `video` with `result`'s track drawn on it. Atomic."""
    import av
    import cv2
    import supervision as sv

    from .video import iter_frames, probe

    info = probe(video)
    track = {t.frame: t for t in result.track}
    span = result.span
    colour = sv.Color(r=64, g=222, b=138)
    box_ann = sv.BoxAnnotator(color=colour, thickness=max(2, info.height // 180))
    label_ann = sv.LabelAnnotator(color=colour, text_color=sv.Color.BLACK, text_scale=max(0.4, info.height / 900),
                                  text_padding=4)
    trace_ann = sv.TraceAnnotator(color=colour, trace_length=max(2, len(track)), thickness=2)
    timeline = TimelineAnnotator(info.duration_s, (span.start_s, span.end_s) if span else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.part.mp4")
    # yuv420p needs even sizes: odd ones are padded by one pixel (right/bottom) rather than cropped.
    w2, h2 = info.width + info.width % 2, info.height + info.height % 2
    try:
        with av.open(str(tmp), "w") as dst:
            vs = dst.add_stream("libx264", rate=Fraction(info.fps).limit_denominator(1001))
            vs.width, vs.height, vs.pix_fmt = w2, h2, "yuv420p"
            vs.time_base = _TB
            vs.options = {"crf": "20", "preset": "veryfast", "movflags": "+faststart"}
            audio = _AudioCopy(video, dst)  # every stream must exist before the first packet is written
            for idx, t, rgb in iter_frames(video):
                scene = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
                entry = track.get(idx)
                if entry is not None:
                    det = sv.Detections(xyxy=np.asarray([entry.xyxy], dtype=np.float32),
                                        confidence=np.asarray([entry.score], dtype=np.float32),
                                        class_id=np.asarray([0]), tracker_id=np.asarray([1]))
                    if "trace" in overlays:
                        scene = trace_ann.annotate(scene, det)
                    if "box" in overlays:
                        scene = box_ann.annotate(scene, det)
                    if "label" in overlays:
                        scene = label_ann.annotate(scene, det, labels=[f"{result.query} {entry.score:.2f}"])
                if "timeline" in overlays:
                    scene = timeline.annotate(scene, t)
                if (w2, h2) != (scene.shape[1], scene.shape[0]):
                    scene = cv2.copyMakeBorder(scene, 0, h2 - scene.shape[0], 0, w2 - scene.shape[1],
                                               cv2.BORDER_REPLICATE)
                frame = av.VideoFrame.from_ndarray(scene, format="bgr24")
                frame.pts = int(round(t / _TB))
                frame.time_base = _TB
                for pkt in vs.encode(frame):
                    dst.mux(pkt)
            for pkt in vs.encode():
                dst.mux(pkt)
            audio.copy()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


class _AudioCopy:
    """Remux the source's first audio stream unchanged; skipped when MP4 cannot hold that codec."""

    def __init__(self, video, dst):
        import av

        self.src = av.open(str(video))
        self.a_in = self.src.streams.audio[0] if self.src.streams.audio else None
        self.a_out = None
        if self.a_in is not None:
            try:
                self.a_out = dst.add_stream_from_template(self.a_in)
            except (ValueError, av.error.FFmpegError):
                self.a_out = None
        self.dst = dst

    def copy(self) -> None:
        try:
            if self.a_out is not None:
                for pkt in self.src.demux(self.a_in):
                    if pkt.dts is None:
                        continue
                    pkt.stream = self.a_out
                    self.dst.mux(pkt)
        finally:
            self.src.close()
