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

from .errors import UserError, did_you_mean
from .result import part_file

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
    choices = ",".join(OVERLAYS)
    if not names:
        raise UserError(f"--overlay {spec!r}: names no overlay; choose from {choices}")
    if bad:
        raise UserError(f"--overlay {spec!r}: unknown overlay {bad[0]!r}{did_you_mean(bad[0], OVERLAYS)}; "
                        f"choose from {choices}")
    return names


def load_result(path: str | os.PathLike, video: str | os.PathLike, query: str | None = None):
    """The result to draw on `video`: a `stg ground` .json, or the line of a `stg batch` .jsonl that
    is `video`'s (and `query`'s, when the video was asked several queries). The latest line of a
    pair counts (a --retry-failed line supersedes the error before it); a path matches however it
    is spelled, as on resume."""
    import json

    from .result import GroundingResult, ResultError, check_result_path, latest_per_pair, read_jsonl

    p = check_result_path(path, f"write one with `stg ground VIDEO QUERY --out {path}`")
    try:
        docs = [json.loads(p.read_text(encoding="utf-8"))]
    except OSError as e:
        raise UserError(f"{p}: cannot read it ({e.strerror or e})") from None
    except ValueError as e:  # several documents: a batch output (a torn last line is skipped)
        docs = latest_per_pair(read_jsonl(p).records)
        if not docs:  # not even one line: a broken or empty file
            raise ResultError(f"{p}: not a stg.grounding/v1 document ({e})") from None
    if len(docs) > 1:
        docs = _lines_for(p, docs, video, query)
    elif query is not None and isinstance(docs[0], dict) and docs[0].get("query") != query:
        raise UserError(f"{p}: its result is for {docs[0].get('query')!r}, not --query {query!r}")
    try:
        res = GroundingResult.from_dict(docs[0])
    except (ValueError, KeyError, TypeError) as e:
        raise ResultError(f"{p}: not a stg.grounding/v1 document ({e})") from None
    if res.error is not None:
        raise UserError(f"{p}: the result for {video} is an error ({res.error.message}); nothing to draw")
    return res


def _lines_for(path: Path, docs: list, video, query: str | None) -> list:
    """The one record of `docs` for `video` (and `query`), or a UserError that says what is there."""
    from .result import file_key, match_recorded

    keys = {}
    for d in docs:
        try:
            keys[id(d)] = (str(d["video"]["path"]), str(d["query"]))
        except (KeyError, TypeError):
            raise UserError(f"{path}: not a stg.grounding/v1 document (no video.path/query)") from None
    me = file_key(os.fspath(video))
    where = match_recorded(set(keys.values()), {(me, q) for _, q in keys.values()})
    mine = [d for d in docs if where[keys[id(d)]][0] == me]
    hits = [d for d in mine if query is None or keys[id(d)][1] == query]
    if len(hits) == 1:
        return hits
    if not mine:
        raise UserError(f"{path}: none of its {len(docs)} results is for {video}; pass the video it was made on")
    queries = ", ".join(repr(keys[id(d)][1]) for d in mine)
    if not hits:
        raise UserError(f"{path}: no result for {video} with --query {query!r}; its queries there: {queries}")
    raise UserError(f"{path}: {len(hits)} results for {video}; choose one with --query (its queries: {queries})")


def check_result_fits(video, info, result) -> None:
    """A result drawn onto another video puts boxes in the wrong place: refuse it. Same display
    size, and no track frame beyond the video's last (a re-encoded copy of the same video passes)."""
    rv = result.video
    last = max((t.frame for t in result.track), default=-1)
    if (rv.width, rv.height) != (info.width, info.height) or last >= info.num_frames:
        raise UserError(
            f"{video}: {info.width}x{info.height}, {info.num_frames} frames, but the result was made on "
            f"{rv.path} ({rv.width}x{rv.height}, {rv.num_frames} frames); render the video the result belongs to")


def render(video: str | os.PathLike, result, out: str | os.PathLike,
           overlays: tuple[str, ...] = OVERLAYS, notes: list[str] | None = None, progress: bool = False) -> Path:
    """Write `out` (H.264/yuv420p MP4): `video` with `result`'s track drawn on it. Atomic.
    What the user should know but is no error (audio left out) is appended to `notes`. `progress`:
    a frame bar on stderr (every frame is decoded and encoded again: minutes for a long video)."""
    import sys

    import av
    import cv2
    import supervision as sv
    from tqdm import tqdm

    from .video import iter_frames, probe

    info = probe(video)
    check_result_fits(video, info, result)
    track = {t.frame: t for t in result.track}
    span = result.span
    colour = sv.Color(r=64, g=222, b=138)
    box_ann = sv.BoxAnnotator(color=colour, thickness=max(2, info.height // 180))
    label_ann = sv.LabelAnnotator(color=colour, text_color=sv.Color.BLACK, text_scale=max(0.4, info.height / 900),
                                  text_padding=4)
    trace_ann = sv.TraceAnnotator(color=colour, trace_length=max(2, len(track)), thickness=2)
    timeline = TimelineAnnotator(info.duration_s, (span.start_s, span.end_s) if span else None)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.part.mp4")
    # yuv420p needs even sizes: odd ones are padded by one pixel (right/bottom) rather than cropped.
    w2, h2 = info.width + info.width % 2, info.height + info.height % 2
    with part_file(out, tmp):  # a full disk mid-encode: one line, and the part file goes
        # +faststart: the index goes before the pictures, so a browser plays while it downloads
        with av.open(str(tmp), "w", format="mp4", container_options={"movflags": "+faststart"}) as dst:
            vs = dst.add_stream("libx264", rate=Fraction(info.fps).limit_denominator(1001))
            vs.width, vs.height, vs.pix_fmt = w2, h2, "yuv420p"
            # The encoder's clock too, not only the stream's: on 1/fps ticks a variable-rate video's
            # frames would round onto each other's timestamps.
            vs.time_base = vs.codec_context.time_base = _TB
            vs.options = {"crf": "20", "preset": "veryfast"}
            audio = _Audio(video, dst, info.start_s)  # every stream must exist before the first packet is written
            last_pts = -1
            frames = tqdm(iter_frames(video), total=info.num_frames, desc="render", unit="frame", file=sys.stderr,
                          disable=not progress, dynamic_ncols=True, leave=False)  # closed when the loop ends
            for idx, t, rgb in frames:
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
                last_pts = frame.pts = max(int(round(t / _TB)), last_pts + 1)
                frame.time_base = _TB
                for pkt in vs.encode(frame):
                    dst.mux(pkt)
            for pkt in vs.encode():
                dst.mux(pkt)
            audio.write()
            if audio.note and notes is not None:
                notes.append(audio.note)
    return out


# Audio codecs an MP4 holds as they are; any other is re-encoded to AAC.
_MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "opus", "flac", "alac"}
_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


class _Audio:
    """The source's first audio stream, on the rendered video's clock (its first frame is 0 s):
    copied when MP4 holds the codec, else re-encoded to AAC (PCM from cameras, Vorbis, ...)."""

    def __init__(self, video, dst, video_start_s: float):
        import av

        self.src = av.open(str(video))
        self.dst = dst
        self.start = video_start_s
        self.a_in = self.src.streams.audio[0] if self.src.streams.audio else None
        self.a_out, self.copy, self.note = None, False, ""
        if self.a_in is None:
            return
        name = self.a_in.codec_context.name
        try:
            if name in _MP4_AUDIO:
                self.a_out, self.copy = dst.add_stream_from_template(self.a_in), True
            else:
                ctx = self.a_in.codec_context
                # the standard layout for the channel count: PCM often carries none ("2 channels")
                layout = _LAYOUTS.get(len(ctx.layout.channels), "")
                rate = ctx.sample_rate or 48000
                probe = av.CodecContext.create("aac", "w")  # fails here, not halfway through the video
                probe.sample_rate, probe.layout, probe.format = rate, layout, "fltp"
                probe.open()
                self.a_out = dst.add_stream("aac", rate=rate, layout=layout)
        except (ValueError, TypeError, av.error.FFmpegError) as e:
            self.a_out, self.note = None, f"audio ({name}) left out: it cannot go into an MP4 ({e})"

    def write(self) -> None:
        try:
            if self.a_out is not None:
                (self._copy if self.copy else self._encode)()
        finally:
            self.src.close()

    def _copy(self) -> None:
        tb = self.a_in.time_base
        shift = int(round(self.start / tb))
        for pkt in self.src.demux(self.a_in):
            if pkt.dts is None:
                continue
            if shift:
                if pkt.pts is not None and pkt.pts + (pkt.duration or 0) - shift < 0:
                    continue  # sound from before the first frame: not part of the rendered clip
                pkt.dts -= shift
                if pkt.pts is not None:
                    pkt.pts -= shift
            pkt.stream = self.a_out
            self.dst.mux(pkt)

    def _encode(self) -> None:
        import av

        rate = self.a_out.codec_context.sample_rate
        tb = Fraction(1, rate)
        try:
            for frame in self.src.decode(self.a_in):
                if frame.pts is None or frame.time is None:
                    continue
                pts = int(round((frame.time - self.start) * rate))
                if pts + frame.samples <= 0:
                    continue
                frame.pts, frame.time_base = pts, tb
                for pkt in self.a_out.encode(frame):
                    self.dst.mux(pkt)
            for pkt in self.a_out.encode():
                self.dst.mux(pkt)
        except av.error.FFmpegError:
            pass  # a damaged audio tail: keep what was written, as video decoding does
