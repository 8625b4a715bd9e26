"""The `stg.grounding/v1` result: typed model, track building, validation, safe writers.

Other tools read these files, so this module is the one place that knows the contract
(shared/specs/result-schema.md): key order, units, rounding, and how batch output survives
a crash. Everything else builds a `GroundingResult` and hands it here.

    >>> track = build_track((50, 160), sampled, fps=25.0, width=640, height=360)
    >>> result = GroundingResult(video, query, model, sampling, span, track, timing)
    >>> write_json_atomic("out.json", result)
    >>> with JsonlWriter("batch.jsonl") as out:
    ...     if (path, query) not in out.keys():
    ...         out.append(result)
"""
from __future__ import annotations

import errno
import functools
import json
import math
import os
import re
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Mapping, NamedTuple, Sequence

import numpy as np

from .errors import NO_SPACE, UserError, disk_full

SCHEMA_ID = "stg.grounding/v1"
SCHEMA_RESOURCE = "schemas/grounding-v1.schema.json"

SOURCE_MODEL = "model"
SOURCE_INTERPOLATED = "interpolated"
TIME_SOURCES = ("index/fps", "pts")

# Rounding: enough precision for any consumer, few enough digits to keep files small and diffs
# stable. fps keeps more digits because NTSC rates (30000/1001) feed time arithmetic.
_ND_SECONDS = 4
_ND_PIXELS = 2
_ND_SCORE = 4
_ND_FPS = 6

__all__ = [
    "SCHEMA_ID",
    "ErrorInfo",
    "GroundingResult",
    "JsonlRead",
    "JsonlWriter",
    "ModelMeta",
    "ResultError",
    "Sampling",
    "Span",
    "TrackEntry",
    "VideoMeta",
    "build_track",
    "error_result",
    "file_key",
    "latest_per_pair",
    "load_schema",
    "match_recorded",
    "read_jsonl",
    "read_jsonl_lines",
    "sanitize_xyxy",
    "validate",
    "write_json_atomic",
    "write_text_atomic",
]


class ResultError(UserError, ValueError):
    """A result document or file that does not follow `stg.grounding/v1` (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# helpers


def _round(x: Any, nd: int) -> Any:
    """Round numbers, pass None through: unknown stays null rather than becoming 0."""
    if x is None or isinstance(x, bool):
        return x
    return round(float(x), nd)


def _int(x: Any) -> Any:
    return None if x is None else int(x)


def _split(d: Mapping[str, Any], known: Iterable[str]) -> dict[str, Any]:
    """Fields we do not model: kept so a read-modify-write never drops a newer writer's data."""
    known = set(known)
    return {k: v for k, v in d.items() if k not in known}


def _with_extra(out: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        out.setdefault(k, v)
    return out


# ---------------------------------------------------------------------------------------------
# model of the contract


@dataclass(slots=True)
class VideoMeta:
    """The decoded video. All but `path` may be None only on a batch error line."""

    path: str
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    duration_s: float | None = None
    rotation: int | None = None
    time_source: str | None = None  # "index/fps" (constant rate) or "pts" (variable rate)
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = (
        "path", "fps", "width", "height", "num_frames", "duration_s", "rotation", "time_source",
    )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "path": str(self.path),
            "fps": _round(self.fps, _ND_FPS),
            "width": _int(self.width),
            "height": _int(self.height),
            "num_frames": _int(self.num_frames),
            "duration_s": _round(self.duration_s, _ND_SECONDS),
        }
        # Optional extras appear only when known, so v1 readers see the documented shape.
        if self.rotation is not None:
            out["rotation"] = int(self.rotation)
        if self.time_source is not None:
            out["time_source"] = str(self.time_source)
        return _with_extra(out, self.extra)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VideoMeta:
        return cls(
            path=d["path"],
            fps=d.get("fps"),
            width=d.get("width"),
            height=d.get("height"),
            num_frames=d.get("num_frames"),
            duration_s=d.get("duration_s"),
            rotation=d.get("rotation"),
            time_source=d.get("time_source"),
            extra=_split(d, VideoMeta._KEYS),
        )


@dataclass(slots=True)
class ModelMeta:
    """Which weights produced the result, so a number can be traced back to a checkpoint."""

    name: str
    sha256: str | None = None
    quantization: str | None = None
    device: str | None = None
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("name", "sha256", "quantization", "device", "dtype")

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ModelMeta._KEYS}
        return _with_extra(out, self.extra)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelMeta:
        return cls(
            name=d["name"],
            sha256=d.get("sha256"),
            quantization=d.get("quantization"),
            device=d.get("device"),
            dtype=d.get("dtype"),
            extra=_split(d, ModelMeta._KEYS),
        )


@dataclass(slots=True)
class Sampling:
    """The frames the model saw; `num_frames == len(frame_indices) == len(times_s)`."""

    num_frames: int
    frame_indices: list[int]
    times_s: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("num_frames", "frame_indices", "times_s")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "num_frames": int(self.num_frames),
            "frame_indices": [int(i) for i in self.frame_indices],
            "times_s": [_round(t, _ND_SECONDS) for t in self.times_s],
        }
        return _with_extra(out, self.extra)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Sampling:
        return cls(
            num_frames=d["num_frames"],
            frame_indices=list(d["frame_indices"]),
            times_s=list(d["times_s"]),
            extra=_split(d, Sampling._KEYS),
        )


@dataclass(slots=True)
class Span:
    """Inclusive frame span; `end_s` is the time of `end_frame` (not its end), as in the spec."""

    start_s: float
    end_s: float
    start_frame: int
    end_frame: int
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("start_s", "end_s", "start_frame", "end_frame")

    @classmethod
    def from_frames(
        cls,
        start_frame: int,
        end_frame: int,
        fps: float,
        frame_times: Sequence[float] | None = None,
    ) -> Span:
        """Span whose seconds use the same clock as `build_track` (frame/fps or pts)."""
        s, e = int(start_frame), int(end_frame)
        if frame_times is not None:
            return cls(float(frame_times[s]), float(frame_times[e]), s, e)
        return cls(s / float(fps), e / float(fps), s, e)

    @property
    def frames(self) -> range:
        return range(int(self.start_frame), int(self.end_frame) + 1)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "start_s": _round(self.start_s, _ND_SECONDS),
            "end_s": _round(self.end_s, _ND_SECONDS),
            "start_frame": int(self.start_frame),
            "end_frame": int(self.end_frame),
        }
        return _with_extra(out, self.extra)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Span:
        return cls(
            start_s=d["start_s"],
            end_s=d["end_s"],
            start_frame=d["start_frame"],
            end_frame=d["end_frame"],
            extra=_split(d, Span._KEYS),
        )


@dataclass(slots=True)
class TrackEntry:
    """One frame of the tube; `source` says whether the model boxed it or we interpolated."""

    frame: int
    time_s: float
    xyxy: tuple[float, float, float, float]
    score: float
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("frame", "time_s", "xyxy", "score", "source")

    def to_dict(self) -> dict[str, Any]:
        out = {
            "frame": int(self.frame),
            "time_s": _round(self.time_s, _ND_SECONDS),
            "xyxy": [_round(v, _ND_PIXELS) for v in self.xyxy],
            "score": _round(self.score, _ND_SCORE),
            "source": str(self.source),
        }
        return _with_extra(out, self.extra)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrackEntry:
        return cls(
            frame=d["frame"],
            time_s=d["time_s"],
            xyxy=tuple(d["xyxy"]),  # type: ignore[arg-type]
            score=d["score"],
            source=d["source"],
            extra=_split(d, TrackEntry._KEYS),
        )


@dataclass(slots=True)
class ErrorInfo:
    """Why a batch item failed: exception class name and its message."""

    type: str
    message: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ErrorInfo:
        return cls(type(exc).__name__, str(exc))

    def to_dict(self) -> dict[str, Any]:
        return _with_extra({"type": str(self.type), "message": str(self.message)}, self.extra)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ErrorInfo:
        return cls(d["type"], d["message"], extra=_split(d, ("type", "message")))


@dataclass(slots=True)
class GroundingResult:
    """One grounding answer (or one failed batch item when `error` is set)."""

    video: VideoMeta
    query: str
    model: ModelMeta | None
    sampling: Sampling | None
    span: Span | None
    track: list[TrackEntry]
    timing_s: dict[str, float]
    error: ErrorInfo | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = (
        "schema", "video", "query", "model", "sampling", "span", "track", "timing_s", "error",
        "warnings",
    )

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def key(self) -> tuple[str, str]:
        """Identity of a batch item: what resume and de-duplication compare."""
        return (str(self.video.path), str(self.query))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in the spec's key order, numbers rounded (seconds 4, pixels 2, scores 4)."""
        out: dict[str, Any] = {
            "schema": SCHEMA_ID,
            "video": self.video.to_dict(),
            "query": str(self.query),
            "model": None if self.model is None else self.model.to_dict(),
            "sampling": None if self.sampling is None else self.sampling.to_dict(),
            "span": None if self.span is None else self.span.to_dict(),
            "track": [t.to_dict() for t in self.track],
            "timing_s": {
                k: (_round(v, _ND_SECONDS) if isinstance(v, (int, float)) else v)
                for k, v in self.timing_s.items()
            },
        }
        if self.error is not None:
            out["error"] = self.error.to_dict()
        out["warnings"] = [str(w) for w in self.warnings]
        return _with_extra(out, self.extra)

    def to_json(self, indent: int | None = None) -> str:
        """Strict JSON (NaN/inf refused: other readers would choke), UTF-8 text kept as is."""
        return _dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, check: bool = False) -> GroundingResult:
        """Parse a v1 document; `check=True` validates it against the schema first."""
        if check:
            validate(d)
        if not isinstance(d, Mapping):
            raise ResultError(
                f"a {SCHEMA_ID} document must be a JSON object, got {type(d).__name__}"
            )
        if d.get("schema") != SCHEMA_ID:
            raise ResultError(
                f"unsupported result schema {d.get('schema')!r}; expected {SCHEMA_ID!r}"
            )
        try:
            return cls(
                video=VideoMeta.from_dict(d["video"]),
                query=d["query"],
                model=None if d.get("model") is None else ModelMeta.from_dict(d["model"]),
                sampling=None if d.get("sampling") is None else Sampling.from_dict(d["sampling"]),
                span=None if d.get("span") is None else Span.from_dict(d["span"]),
                track=[TrackEntry.from_dict(t) for t in d.get("track") or []],
                timing_s=dict(d.get("timing_s") or {}),
                error=None if d.get("error") is None else ErrorInfo.from_dict(d["error"]),
                warnings=list(d.get("warnings") or []),
                extra=_split(d, GroundingResult._KEYS),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ResultError(f"not a valid {SCHEMA_ID} document: {type(e).__name__}: {e}") from e

    @classmethod
    def from_json(cls, text: str | bytes, *, check: bool = False) -> GroundingResult:
        return cls.from_dict(json.loads(text), check=check)


def error_result(
    video_path: str | os.PathLike[str],
    query: str,
    exc_type: str | type[BaseException] | BaseException,
    message: str,
    model: ModelMeta | None = None,
    *,
    video: VideoMeta | None = None,
    timing_s: Mapping[str, float] | None = None,
) -> GroundingResult:
    """The batch line for a failed item: same `video.path`/`query`, `span: null`, `track: []`.

    `exc_type` may be a name, an exception class or instance. Pass `video` when the video was
    probed before the failure, so its metadata is not lost.
    """
    if isinstance(exc_type, BaseException):
        type_name = type(exc_type).__name__
    elif isinstance(exc_type, type):
        type_name = exc_type.__name__
    else:
        type_name = str(exc_type)
    if video is None:
        vmeta = VideoMeta(path=os.fspath(video_path))
    else:
        vmeta = VideoMeta.from_dict(video.to_dict())  # a copy; the path below wins
        vmeta.path = os.fspath(video_path)
    return GroundingResult(
        video=vmeta,
        query=query,
        model=model,
        sampling=None,
        span=None,
        track=[],
        timing_s=dict(timing_s or {}),
        error=ErrorInfo(type_name, str(message)),
    )


# ---------------------------------------------------------------------------------------------
# track building


def sanitize_xyxy(boxes: Any, width: float, height: float) -> np.ndarray:
    """Make boxes satisfy the contract: inside [0,W]x[0,H] and x1 < x2, y1 < y2.

    Swapped corners are reordered; a box narrower than 1 px (degenerate, or squeezed by the
    clip) becomes a 1-px extent around its centre, shifted to stay inside the frame, so that
    rounding to 2 decimals can never collapse it. Works on shape (4,) or (N, 4).
    """
    b = np.array(boxes, dtype=np.float64, copy=True)
    if b.shape[-1:] != (4,):
        raise ValueError(f"boxes must have 4 coordinates (x1, y1, x2, y2), got shape {b.shape}")
    if not (width >= 1 and height >= 1):
        raise ValueError(f"frame size must be at least 1x1 px, got {width}x{height}")
    for lo_i, hi_i, limit in ((0, 2, float(width)), (1, 3, float(height))):
        lo = np.clip(np.minimum(b[..., lo_i], b[..., hi_i]), 0.0, limit)
        hi = np.clip(np.maximum(b[..., lo_i], b[..., hi_i]), 0.0, limit)
        thin = (hi - lo) < 1.0
        if np.any(thin):
            lo1 = np.clip((lo + hi) / 2.0 - 0.5, 0.0, limit - 1.0)
            lo = np.where(thin, lo1, lo)
            hi = np.where(thin, lo1 + 1.0, hi)
        b[..., lo_i], b[..., hi_i] = lo, hi
    return b


def build_track(
    span_frames: tuple[int, int],
    sampled: Iterable[tuple[int, float, Sequence[float], float]],
    fps: float,
    width: int,
    height: int,
    frame_times: Sequence[float] | None = None,
) -> list[TrackEntry]:
    """One `TrackEntry` per video frame of the inclusive span, from boxes on sampled frames.

    The model only boxes the sampled frames, but the contract wants every frame: coordinates
    and score are linearly interpolated between sampled frames, and the first/last sampled box
    is held out to the span's ends. `sampled` holds (frame, time_s, xyxy, score) in original
    video pixels; entries outside the span, or with non-finite numbers, are ignored, and of two
    boxes on one frame the higher score wins. Boxes are sanitized (see `sanitize_xyxy`) before
    and after interpolation. `time_s` is frame/fps, or `frame_times[frame]` for VFR video; the
    sampled tuple's own time is not used, so the whole track runs on one clock.

    Returns [] when no usable sampled box lies inside the span: whether that means "span with
    no track" is not allowed by the contract, so the caller decides (drop the span, or widen it).
    """
    s, e = int(span_frames[0]), int(span_frames[1])
    if s < 0 or e < s:
        raise ValueError(f"span must satisfy 0 <= start_frame <= end_frame, got ({s}, {e})")
    if frame_times is None:
        try:
            fps_ok = math.isfinite(float(fps)) and float(fps) > 0
        except (TypeError, ValueError):
            fps_ok = False
        if not fps_ok:
            raise ValueError(
                f"fps must be a positive number when frame_times is not given, got {fps!r}"
            )
    elif e >= len(frame_times):
        raise ValueError(f"frame_times has {len(frame_times)} entries; span ends at frame {e}")

    best: dict[int, tuple[np.ndarray, float]] = {}
    for item in sampled:
        frame, _time, box, score = item
        f = int(frame)
        if f < s or f > e:
            continue
        arr = np.asarray(box, dtype=np.float64)
        sc = float(score)
        if arr.shape != (4,) or not np.all(np.isfinite(arr)) or not math.isfinite(sc):
            continue
        if f in best and best[f][1] >= sc:
            continue
        best[f] = (arr, sc)
    if not best:
        return []

    key_frames = np.array(sorted(best), dtype=np.int64)
    key_boxes = sanitize_xyxy(np.stack([best[f][0] for f in key_frames]), width, height)
    key_scores = np.array([best[f][1] for f in key_frames], dtype=np.float64)

    frames = np.arange(s, e + 1, dtype=np.int64)
    # np.interp holds the edge value outside [first, last] key frame: exactly "edges held".
    boxes = np.stack([np.interp(frames, key_frames, key_boxes[:, i]) for i in range(4)], axis=1)
    boxes = sanitize_xyxy(boxes, width, height)
    scores = np.interp(frames, key_frames, key_scores)
    if frame_times is None:
        times = frames / float(fps)
    else:
        times = np.asarray(frame_times, dtype=np.float64)[frames]
    is_model = np.isin(frames, key_frames)

    return [
        TrackEntry(
            frame=int(f),
            time_s=float(t),
            xyxy=(float(b[0]), float(b[1]), float(b[2]), float(b[3])),
            score=float(sc),
            source=SOURCE_MODEL if m else SOURCE_INTERPOLATED,
        )
        for f, t, b, sc, m in zip(
            frames.tolist(), times.tolist(), boxes.tolist(), scores.tolist(), is_model.tolist()
        )
    ]


# ---------------------------------------------------------------------------------------------
# validation


@functools.lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    """The packaged JSON Schema (draft 2020-12), read once via importlib.resources."""
    text = resources.files("stgcli").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator  # deferred: only validation needs it

    schema = load_schema()
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _semantic_problems(doc: Mapping[str, Any]) -> list[str]:
    """What JSON Schema cannot say: track continuity, box order, boxes inside the frame."""
    problems: list[str] = []
    video = doc.get("video") or {}
    span, track = doc.get("span"), doc.get("track") or []
    if span is None:
        if track:
            problems.append("$.track: must be empty when span is null")
    else:
        sf, ef = span["start_frame"], span["end_frame"]
        if ef < sf:
            problems.append(f"$.span: end_frame {ef} is before start_frame {sf}")
        if span["end_s"] < span["start_s"]:
            problems.append(f"$.span: end_s {span['end_s']} is before start_s {span['start_s']}")
        nf = video.get("num_frames")
        if isinstance(nf, int) and ef >= nf:
            problems.append(f"$.span.end_frame: {ef} is past the video's last frame {nf - 1}")
        frames = [t["frame"] for t in track]
        if ef >= sf and frames != list(range(sf, ef + 1)):
            problems.append(
                f"$.track: must hold one entry per frame {sf}..{ef} in order "
                f"({ef - sf + 1} entries), got {len(frames)} entries"
                + (f" starting at frame {frames[0]}" if frames else "")
            )
    if track:
        boxes = np.asarray([t["xyxy"] for t in track], dtype=np.float64)
        bad = np.flatnonzero((boxes[:, 0] >= boxes[:, 2]) | (boxes[:, 1] >= boxes[:, 3]))
        for i in bad[:3]:
            problems.append(f"$.track[{i}].xyxy: needs x1 < x2 and y1 < y2, got {track[i]['xyxy']}")
        w, h = video.get("width"), video.get("height")
        if isinstance(w, int) and isinstance(h, int):
            eps = 1e-6
            out = np.flatnonzero((boxes[:, 2] > w + eps) | (boxes[:, 3] > h + eps))
            for i in out[:3]:
                problems.append(f"$.track[{i}].xyxy: {track[i]['xyxy']} leaves the {w}x{h} frame")
    sampling = doc.get("sampling")
    if isinstance(sampling, Mapping):
        n, idx, ts = sampling["num_frames"], sampling["frame_indices"], sampling["times_s"]
        if not (n == len(idx) == len(ts)):
            problems.append(
                f"$.sampling: num_frames ({n}), frame_indices ({len(idx)}) and times_s ({len(ts)}) "
                "must agree"
            )
    return problems


def validate(doc: Mapping[str, Any] | GroundingResult, *, semantic: bool = True) -> None:
    """Raise `ResultError` naming the first problem (JSON path + reason) if `doc` breaks v1.

    Runs the packaged JSON Schema, then (with `semantic`) the rules the schema cannot express:
    one track entry per span frame in order, x1 < x2 and y1 < y2, boxes inside the frame,
    span end not before start, sampling lengths consistent.
    """
    from jsonschema.exceptions import best_match

    if isinstance(doc, GroundingResult):
        doc = doc.to_dict()
    errors = list(_validator().iter_errors(doc))
    if errors:
        first = best_match(errors)
        message = first.message if len(first.message) <= 160 else first.message[:157] + "..."
        others = sorted({e.json_path for e in errors} - {first.json_path})
        more = ""
        if others:
            more = f" (also at {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
        raise ResultError(f"not a valid {SCHEMA_ID} result: {first.json_path}: {message}{more}")
    if semantic:
        problems = _semantic_problems(doc)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ResultError(f"not a valid {SCHEMA_ID} result: {problems[0]}{more}")


# ---------------------------------------------------------------------------------------------
# writers


# A file name that is not valid UTF-8 (legal on POSIX) reaches Python as lone surrogates
# (surrogateescape), which UTF-8 cannot encode.
_SURROGATE = re.compile("[\ud800-\udfff]")


def _dumps(obj: Any, indent: int | None = None) -> str:
    """JSON text, UTF-8 kept as is; a lone surrogate is written as its \\u escape, so such a file
    name survives the round trip (json.loads gives it back, and os.fsencode the file's bytes)."""
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False, indent=indent)
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _as_dict(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def _write_all(fd: int, data: bytes) -> None:
    """os.write until done: a single write may be short (signals, pipes, full disks)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _size_or_none(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_size
    except OSError:
        return None


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: without this a power loss can forget the new directory entry."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: directories cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put a finished temp file (same folder) in place of `target`: its data fsynced, then an
    atomic rename, then the folder fsynced, so neither a crash nor a power loss leaves a part file
    under the target's name."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    _fsync_dir(Path(target).parent)


@contextmanager
def part_file(target: str | os.PathLike[str], tmp: str | os.PathLike[str]) -> Iterator[None]:
    """For an output another library writes (an encoder's MP4): the body writes `tmp` (same
    folder, created if missing), which then takes `target`'s place (commit_file). An OS error on the
    way (a full disk) is one line naming `target`, unless it names another file (an input's); `tmp`
    never stays."""
    try:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(target, e) from None
    try:
        yield
        commit_file(tmp, target)
    except OSError as e:
        if getattr(e, "filename", None) not in (None, str(tmp)):
            raise
        raise cannot_write(target, e) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def _new_file_mode(path: Path) -> int:
    """Keep an existing file's mode; else what open() would give (0666 minus umask)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        pass
    umask = None
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    umask = int(line.split()[1], 8)
                    break
    except (OSError, ValueError):
        pass
    if umask is None:
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write JSON so readers see the old file or the whole new one, never a partial file.

    Serializes first (so a bad object touches nothing), then `write_text_atomic`.
    """
    return write_text_atomic(path, _dumps(_as_dict(obj), indent=indent) + "\n")


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """`write_bytes_atomic` of the UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8", "surrogateescape"))  # a non-UTF-8 file name: its bytes


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Readers see the old file or the whole new one: a temp file in the target's directory
    (same filesystem, so the rename is atomic) is fsynced and `os.replace`d over the target,
    then the directory is fsynced. On failure the temp file goes and the old target stays; an OS
    error (a full disk) comes as a ResultError naming the target. Parent directories are created.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = _new_file_mode(target)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as e:
        raise cannot_write(target, e) from None
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):  # a full disk, a quota, an I/O error: the old file is still there
            raise cannot_write(target, e) from None
        raise
    _fsync_dir(target.parent)
    return target


def check_result_path(path: str | os.PathLike[str], hint: str) -> Path:
    """A result file to read: a missing path and a folder are the user's to fix (`hint`: how to
    make one)."""
    p = Path(path)
    if p.is_dir():
        raise ResultError(f"{p}: is a folder; pass a result file (stg ground's .json or stg batch's .jsonl)")
    if not p.is_file():
        raise ResultError(f"{p}: no such result file; {hint}")
    return p


def cannot_write(path: str | os.PathLike[str], e: OSError) -> ResultError:
    """An output the system refuses (permissions, a file where a folder should be, a full disk):
    the user's to fix, so one line and exit 2, not a traceback."""
    if e.errno in NO_SPACE:
        return ResultError(f"{path}: cannot write there: {disk_full(e)}; free some space or choose another "
                           "output path")
    return ResultError(f"{path}: cannot write there ({e.strerror or e}); choose another output path")


def check_output_path(path: str | os.PathLike[str], force: bool = False, option: str = "--out",
                      source: str | os.PathLike[str] | Sequence[str | os.PathLike[str] | None] | None = None,
                      source_kind: str = "video") -> None:
    """Before any work is done: refuse the `source` file itself (even with `force`), a folder, an
    existing file unless `force`, and a location whose nearest existing parent is a file or not
    writable."""
    p = Path(path)
    sources = [source] if isinstance(source, (str, os.PathLike)) else [s for s in source or () if s is not None]
    for src in sources:
        if p.exists() and os.path.exists(src) and os.path.samefile(src, p):
            raise ResultError(f"{p}: is the input {source_kind}; choose another {option}")
    if p.is_dir():
        raise ResultError(f"{p}: is a folder; give {option} a file name")
    if p.exists() and not force:
        raise ResultError(f"{p}: exists; pass --force to overwrite it or choose another {option}")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ResultError(f"{p}: {parent} is a file, not a folder; choose another {option}")
    if not os.access(parent, os.W_OK):
        raise ResultError(f"{p}: {parent} is not writable; choose another {option}")


def _record_key(doc: Any) -> tuple[str, str]:
    return (str(doc["video"]["path"]), str(doc["query"]))


def file_key(path: str) -> str:
    """What identifies a video file however its path is spelled (relative, absolute, via a symlink)."""
    return os.path.realpath(path)


def match_recorded(recorded: set[tuple[str, str]], wanted: set[tuple[str, str]]) -> dict:
    """Map each (video.path, query) in the output to the key of the pair it was written for.

    A path resolves from the current folder, however it is spelled. A relative one that does not
    exist from here was most likely written by a run started in another folder: it stands for the
    wanted file whose real path ends with it, if exactly one does (if none or several do, the pair
    runs again; a second line beats a lost result).
    """
    by_name: dict[tuple[str, str], list[str]] = {}
    for path, query in wanted:
        by_name.setdefault((os.path.basename(path), query), []).append(path)
    out = {}
    for video, query in recorded:
        key = (file_key(video), query)
        if key not in wanted and not os.path.isabs(video) and not os.path.lexists(video):
            tail = os.sep + os.path.normpath(video)
            hits = [p for p in by_name.get((os.path.basename(tail), query), ()) if p.endswith(tail)]
            if len(hits) == 1:
                key = (hits[0], query)
        out[(video, query)] = key
    return out


def latest_per_pair(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """One record per (video.path, query): the last one written, in the order pairs first appear.

    A batch output is append-only, so a pair retried with `stg batch --retry-failed` keeps its
    old error line and gains a newer one; readers take the newest. Records without a key pass
    through unchanged.
    """
    latest: dict[Any, Mapping[str, Any]] = {}
    for i, r in enumerate(records):
        try:
            key: Any = _record_key(r)
        except (KeyError, TypeError):
            key = ("", i)
        latest[key] = r  # a dict keeps the first insertion's position when a value is replaced
    return list(latest.values())


class _Line(NamedTuple):
    lineno: int
    start: int  # byte offset of the line
    doc: Any  # parsed JSON, or None when the line is not valid JSON
    newline: bool  # ended with "\n"
    torn: bool = False  # not JSON, and what an interrupted append leaves: no newline, NULs, a cut record


def _scan_lines(f: BinaryIO) -> Iterator[_Line]:
    """Yield every non-blank line; stream so large batch files are not read whole."""
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        start, offset = offset, offset + len(raw)
        body = raw.strip()
        if not body:
            continue
        try:
            doc = json.loads(body)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            doc = None
        newline = raw.endswith(b"\n")
        torn = doc is None and (not newline or b"\x00" in body or body.startswith(b'{"schema"'))
        yield _Line(lineno, start, doc, newline, torn)


def _corrupt(path: Path, lineno: int) -> ResultError:
    return ResultError(
        f"{path}: line {lineno} is not valid JSON and is not the last line, so it is not a "
        "crash leftover; fix or remove that line"
    )


class JsonlRead(NamedTuple):
    """What `read_jsonl` found: the records, and whether a torn last line was skipped."""

    records: list[dict[str, Any]]
    torn: bool


def read_jsonl(path: str | os.PathLike[str]) -> JsonlRead:
    """Read batch output; a torn last line (a crash mid-append) is skipped and reported.

    Invalid JSON anywhere else is real corruption and raises `ResultError` with the line number.
    """
    numbered, torn = read_jsonl_lines(path)
    return JsonlRead([doc for _, doc in numbered], torn)


def read_jsonl_lines(path: str | os.PathLike[str]) -> tuple[list[tuple[int, Any]], bool]:
    """`read_jsonl` with each record's line number: ([(line, record)], whether a torn last line
    was skipped). Only what an interrupted append leaves counts as torn; a finished line of other
    text, last or not, raises `ResultError` naming it (as `JsonlWriter` refuses such a file)."""
    p = Path(path)
    with open(p, "rb") as f:
        lines, bad = _record_lines(f, p, _not_jsonl)
    if bad is not None and not bad.torn:
        raise _not_jsonl(p, bad.lineno)
    return [(line.lineno, line.doc) for line in lines], bad is not None


def _record_lines(f: BinaryIO, path: Path, not_a_record) -> tuple[list[_Line], _Line | None]:
    """(lines that parse, the last line when it does not parse). A line that does not parse before
    the last raises `not_a_record(path, lineno)`; the last one is the caller's to judge (torn by an
    interrupted append, or a finished line of other text)."""
    lines: list[_Line] = []
    pending: _Line | None = None
    for line in _scan_lines(f):
        if pending is not None:
            raise not_a_record(path, pending.lineno)
        if line.doc is None:
            pending = line
        else:
            lines.append(line)
    return lines, pending


def _not_jsonl(path: Path, lineno: int) -> ResultError:
    """The error for a line that is not a record: a whole JSON document (`stg ground --out`) gets
    its own advice, anything else the line's number."""
    if lineno == 1:
        try:
            whole = json.loads(path.read_bytes()) if path.stat().st_size < 256 * 2**20 else None
        except ValueError:
            whole = None
        if isinstance(whole, dict):
            return ResultError(f"{path}: is one JSON document (what stg ground --out writes), not JSON Lines; "
                               "pass a .jsonl written by stg batch or stg eval --out")
    return _corrupt(path, lineno)


try:  # advisory lock: two batch runs appending to one file would interleave and duplicate
    import fcntl as _fcntl
except ImportError:  # pragma: no cover - Windows
    _fcntl = None  # type: ignore[assignment]


class JsonlWriter:
    """Crash-safe, resumable JSONL output for `stg batch`: one whole, fsynced line per result.

    On open, a torn last line (what kill -9 or a power loss leaves mid-append: no newline, NULs,
    a cut record) is truncated away (`repaired`); any other line that is not a record makes it
    refuse the file. The (video.path, query) keys already present are loaded so a rerun can skip
    finished items. `append` refuses a key already there, unless `retry` and that key's last
    record is an error; a failed write is rolled back so the file never keeps a half line. An
    exclusive advisory lock (POSIX) stops a second writer on the same file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.repaired = False  # True when a torn last line was truncated on open
        self.unlocked = False  # True on a file system that cannot lock files (some network mounts)
        self._keys: dict[tuple[str, str], bool] = {}  # key -> its last record is an error
        self._lock = threading.Lock()
        flags = os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd: int | None = os.open(self.path, flags, 0o666)
        except OSError as e:
            raise cannot_write(self.path, e) from None
        try:
            if _fcntl is not None:
                try:
                    _fcntl.flock(self._fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
                except OSError as e:
                    if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                        raise ResultError(f"{self.path} is being written by another process") from e
                    if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                        raise
                    self.unlocked = True  # an NFS mount without its lock daemon: write on, unguarded
            self._recover()
        except BaseException:
            os.close(self._fd)
            self._fd = None
            raise

    def _recover(self) -> None:
        assert self._fd is not None
        keys: dict[tuple[str, str], bool] = {}
        with open(self.path, "rb") as f:
            lines, pending_bad = _record_lines(f, self.path, _corrupt)
        for line in lines:
            try:
                keys[_record_key(line.doc)] = bool(line.doc.get("error"))
            except (KeyError, TypeError, AttributeError) as e:
                raise ResultError(
                    f"{self.path}: line {line.lineno} is not a {SCHEMA_ID} record "
                    "(no video.path/query)"
                ) from e
        last = lines[-1] if lines else None
        if pending_bad is not None and not pending_bad.torn:
            # Each record is written whole, newline last: a crash leaves a cut line (or, after a power
            # loss, NULs). A finished line of other text was never ours; cutting it would lose data.
            raise ResultError(f"{self.path}: line {pending_bad.lineno} is not a {SCHEMA_ID} record, so this "
                              "is not stg batch output; choose another --out")
        if pending_bad is not None:
            os.ftruncate(self._fd, pending_bad.start)
            os.fsync(self._fd)
            self.repaired = True
        elif last is not None and not last.newline:
            # A whole record that lost only its newline: keep it, finish the line.
            _write_all(self._fd, b"\n")
            os.fsync(self._fd)
        self._keys = keys

    def keys(self) -> set[tuple[str, str]]:
        """(video.path, query) of every record in the file, failures included (for resume)."""
        with self._lock:
            return set(self._keys)

    def failed(self) -> set[tuple[str, str]]:
        """The keys whose last record is an error (what `stg batch --retry-failed` grounds again)."""
        with self._lock:
            return {k for k, err in self._keys.items() if err}

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def append(self, result: GroundingResult | Mapping[str, Any], retry: bool = False) -> bool:
        """Write one record as one line, flushed and fsynced. False if its key is already there,
        unless `retry` and the key's last record there is an error (the new line supersedes it)."""
        doc = _as_dict(result)
        key = _record_key(doc)
        data = (_dumps(doc) + "\n").encode("utf-8")  # json escapes newlines: one physical line
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: writer is closed")
            if key in self._keys and not (retry and self._keys[key]):
                return False
            size, before = os.fstat(self._fd).st_size, self._keys.get(key)
            try:
                _write_all(self._fd, data)
            except BaseException:
                # A Ctrl-C or SIGTERM can land after the last byte went out: a whole line is kept
                # (rolling it back lost a finished result); a cut one is rolled back so later
                # appends stay parseable.
                if _size_or_none(self._fd) == size + len(data):
                    self._keys[key] = bool(doc.get("error"))
                else:
                    try:
                        os.ftruncate(self._fd, size)
                    except OSError:
                        pass
                raise
            self._keys[key] = bool(doc.get("error"))  # before fsync, which an interrupt can also end
            try:
                os.fsync(self._fd)
            except OSError:
                try:  # the disk refused it: the line may not survive, so take it out and report
                    os.ftruncate(self._fd, size)
                except OSError:
                    pass
                if before is None:
                    del self._keys[key]
                else:
                    self._keys[key] = before
                raise
            return True

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)  # also drops the flock
                self._fd = None

    @property
    def closed(self) -> bool:
        return self._fd is None

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass
