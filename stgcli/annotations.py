"""Ground-truth loaders for `stg eval`: HC-STVG v1/v2, VidSTG and `stg synth` manifests.

Every format becomes the same list of `Sample`s, in one convention, so scoring never needs to
know where a sample came from: frames are 0-based indices into the decoded video, spans are
inclusive, boxes are xyxy pixels of the original frame.

Conversions (the public formats disagree with each other and with us):
- HC-STVG: `st_frame` is 1-based and `bbox[i]` ([left, top, width, height]) belongs to 1-based
  frame `st_frame + i`, so 0-based frame `st_frame - 1 + i`. v1 has `width`/`height` and
  `caption`; v2 has `img_size` = [height, width] and `English`.
- VidSTG: `temporal_gt` and `used_segment` are [begin_fid, end_fid) with end_fid excluded (the
  VidOR convention TubeDETR also reads), so the inclusive end is `end_fid - 1`;
  `trajectories[f]` lists the boxes on frame f of the whole video. One sample per caption and
  per question; the evaluated frames are the used segment only.
- stg: `span_frames` is already inclusive and 0-based, `boxes` maps frame -> xyxy.

A box that is missing, null or has no area leaves its frame in the ground-truth span without a
box: that frame counts in |P ∪ G| and adds IoU 0, whatever is predicted there.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from .errors import UserError
from .pipeline import normalize_query

__all__ = ["FORMATS", "Sample", "load_annotations", "load_hcstvg", "load_stg", "load_vidstg"]

FORMATS = ("hcstvg", "vidstg", "stg")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Sample:
    """One (video, sentence) pair with its ground-truth tube, in stg's frame convention."""

    video: str  # file name (or path relative to the videos folder) as the annotations give it
    query: str
    gt_span: tuple[int, int] | None  # inclusive, 0-based; None: the object never appears
    gt_boxes: dict[int, Box] = field(default_factory=dict)  # frame -> xyxy; frames may be missing
    eval_range: tuple[int, int] | None = None  # inclusive frames scored (None: whole video)
    num_frames: int | None = None
    fps: float | None = None
    width: int | None = None
    height: int | None = None
    id: str = ""  # where in the annotation file it came from, for messages
    qtype: str | None = None  # VidSTG: "declarative" or "interrogative"

    @property
    def gt_frames(self) -> range:
        """The ground-truth frame set G (empty when the object never appears)."""
        if self.gt_span is None:
            return range(0)
        return range(self.gt_span[0], self.gt_span[1] + 1)

    @property
    def window_s(self) -> tuple[float, float] | None:
        """The evaluated frames as a (start_s, end_s) window for the model, or None for all."""
        if self.eval_range is None or self.fps is None or self.num_frames is None:
            return None
        lo, hi = self.eval_range
        if lo <= 0 and hi >= self.num_frames - 1:
            return None
        return lo / self.fps, hi / self.fps


class _Where:
    """Builds "FILE: ENTRY: problem" messages that say what to fix."""

    def __init__(self, path: Path, fmt: str) -> None:
        self.path, self.fmt = path, fmt

    def fail(self, where: str, problem: str) -> UserError:
        return UserError(f"{self.path}: {where}: {problem} (is this really --format {self.fmt}?)")

    def get(self, d: Any, key: str, where: str, kinds: tuple[type, ...] | None = None) -> Any:
        if not isinstance(d, Mapping):
            raise self.fail(where, f"expected an object, got {type(d).__name__}")
        if key not in d:
            raise self.fail(where, f"missing key {key!r}")
        v = d[key]
        if kinds is not None and (not isinstance(v, kinds) or isinstance(v, bool)):
            names = "/".join(k.__name__ for k in kinds)
            raise self.fail(where, f"{key!r} must be {names}, got {json.dumps(v)[:40]}")
        return v

    def int_(self, d: Any, key: str, where: str, minimum: int = 0) -> int:
        v = self.get(d, key, where, (int, float))
        if not float(v).is_integer() or v < minimum:
            raise self.fail(where, f"{key!r} must be a whole number >= {minimum}, got {v}")
        return int(v)


def _check_file(path: Path) -> None:
    if path.is_dir():
        raise UserError(f"{path}: is a folder; --annotations takes the annotation file")
    if not path.is_file():
        raise UserError(f"{path}: no such annotation file")


def _read_json(path: Path) -> Any:
    _check_file(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is fine
    except json.JSONDecodeError as e:
        # JSON Lines (stg synth's manifest) stops at line 2 with "Extra data"
        hint = "; a JSON Lines file (one object per line) is --format stg" if e.msg == "Extra data" else ""
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}){hint}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; pass the JSON annotation file") from None


def _four_floats(b: Any) -> tuple[float, float, float, float] | None:
    """Four finite numbers from a list/tuple, or None for anything else."""
    if not isinstance(b, (list, tuple)) or len(b) != 4:
        return None
    try:
        v = tuple(float(x) for x in b)
    except (TypeError, ValueError):
        return None
    return v if all(math.isfinite(x) for x in v) else None  # type: ignore[return-value]


def _box_ltwh(b: Any) -> Box | None:
    """[left, top, width, height] -> xyxy; None for a missing or empty box."""
    v = _four_floats(b)
    if v is None or v[2] <= 0 or v[3] <= 0:
        return None
    x, y, w, h = v
    return (x, y, x + w, y + h)


def _box_xyxy(b: Any) -> Box | None:
    if isinstance(b, Mapping):
        b = [b.get("xmin"), b.get("ymin"), b.get("xmax"), b.get("ymax")]
    v = _four_floats(b)
    if v is None or v[2] <= v[0] or v[3] <= v[1]:
        return None
    return v


def load_hcstvg(path: str | os.PathLike[str]) -> list[Sample]:
    """HC-STVG v1 or v2: {"video.mp4": {img_num, st_frame, bbox, caption|English, ...}, ...}."""
    p = Path(path)
    w = _Where(p, "hcstvg")
    data = _read_json(p)
    if not isinstance(data, Mapping):
        raise UserError(f"{p}: HC-STVG annotations are an object keyed by video name, got a "
                        f"{type(data).__name__} (is this really --format hcstvg?)")
    samples = []
    for name, a in data.items():
        where = f"entry {name!r}"
        num = w.int_(a, "img_num", where, minimum=1)
        st = w.int_(a, "st_frame", where, minimum=1)
        bbox = w.get(a, "bbox", where, (list,))
        if not bbox:
            raise w.fail(where, "'bbox' is empty; the tube needs at least one frame")
        key = "caption" if "caption" in a else "English" if "English" in a else None
        if key is None:
            raise w.fail(where, "missing key 'caption' (v1) or 'English' (v2)")
        if not isinstance(a[key], str) or not normalize_query(a[key]):
            raise w.fail(where, f"{key!r} must be a non-empty sentence, got {a[key]!r}")
        query = normalize_query(a[key])
        width, height = a.get("width"), a.get("height")
        if "img_size" in a and isinstance(a["img_size"], (list, tuple)) and len(a["img_size"]) == 2:
            height, width = a["img_size"]  # v2: [height, width]
        for dim, v in (("width", width), ("height", height)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                raise w.fail(where, f"{dim} must be a positive number of pixels, got {v!r}")
        first = st - 1
        if first + len(bbox) > num:
            raise w.fail(where, f"the tube (frames {st} to {st + len(bbox) - 1}, 1-based) runs past 'img_num' {num}")
        boxes = {first + i: b for i, b in enumerate(_box_ltwh(x) for x in bbox) if b is not None}
        samples.append(Sample(
            video=str(name), query=query, gt_span=(first, first + len(bbox) - 1), gt_boxes=boxes,
            eval_range=(0, num - 1), num_frames=num, fps=None,
            width=None if width is None else int(width), height=None if height is None else int(height),
            id=f"{p.name}:{name}"))
    if not samples:
        raise UserError(f"{p}: no annotated videos in the file")
    return samples


def _vidstg_entries(data: Any, p: Path) -> list[Mapping[str, Any]]:
    if isinstance(data, Mapping) and "vid" in data:
        return [data]
    if isinstance(data, Mapping):
        data = list(data.values())
    if not isinstance(data, list):
        raise UserError(f"{p}: VidSTG annotations are a list of video entries, got a "
                        f"{type(data).__name__} (is this really --format vidstg?)")
    return data


def _trajectory_boxes(traj: Any, tid: Any, w: _Where, where: str) -> dict[int, Box]:
    """Boxes of one target id from VidOR-style per-frame trajectories (list or {frame: [...]})."""
    items: Sequence[tuple[Any, Any]]
    if isinstance(traj, Mapping):
        items = list(traj.items())
    elif isinstance(traj, list):
        items = list(enumerate(traj))
    else:
        raise w.fail(where, "'trajectories' must be a list with one list of boxes per frame")
    out: dict[int, Box] = {}
    for f, objs in items:
        if not isinstance(objs, (list, type(None))):
            raise w.fail(where, f"'trajectories' frame {f!r} must be a list of boxes, got {type(objs).__name__}")
        try:
            frame = int(f)
        except (TypeError, ValueError):
            raise w.fail(where, f"'trajectories' has a frame key {f!r} that is not a frame number") from None
        for o in objs or []:
            if isinstance(o, Mapping) and str(o.get("tid")) == str(tid):
                b = _box_xyxy(o.get("bbox"))
                if b is not None:
                    out[frame] = b
    return out


def load_vidstg(path: str | os.PathLike[str]) -> list[Sample]:
    """VidSTG: a list of {vid, fps, used_segment, temporal_gt, captions, questions, trajectories}."""
    p = Path(path)
    w = _Where(p, "vidstg")
    samples = []
    for i, a in enumerate(_vidstg_entries(_read_json(p), p)):
        where = f"entry {i}"
        vid = w.get(a, "vid", where, (str, int))
        where = f"entry {i} (vid {vid})"
        fps = float(w.get(a, "fps", where, (int, float)))
        if not fps > 0:
            raise w.fail(where, f"'fps' must be positive, got {fps}")
        seg = w.get(a, "used_segment", where, (dict,))
        gt = w.get(a, "temporal_gt", where, (dict,))
        s0, s1 = w.int_(seg, "begin_fid", where + " used_segment"), w.int_(seg, "end_fid", where + " used_segment")
        g0, g1 = w.int_(gt, "begin_fid", where + " temporal_gt"), w.int_(gt, "end_fid", where + " temporal_gt")
        if s1 <= s0:
            raise w.fail(where, f"used_segment [{s0}, {s1}) holds no frame")
        if g1 <= g0:
            raise w.fail(where, f"temporal_gt [{g0}, {g1}) holds no frame")
        traj = w.get(a, "trajectories", where)
        num = a.get("frame_count")
        num = int(num) if isinstance(num, (int, float)) and num > 0 else (
            len(traj) if isinstance(traj, list) and len(traj) >= s1 else s1)
        if not (0 <= s0 and s1 <= num and s0 <= g0 and g1 <= s1):
            raise w.fail(where, f"frames do not nest: temporal_gt [{g0}, {g1}) must lie in used_segment [{s0}, {s1}), "
                                f"and that in the video's {num} frames")
        queries = []
        for key, qtype in (("captions", "declarative"), ("questions", "interrogative")):
            for j, q in enumerate(a.get(key) or []):
                qwhere = f"{where} {key}[{j}]"
                text = w.get(q, "description", qwhere, (str,))
                tid = w.get(q, "target_id", qwhere, (int, str))
                if not normalize_query(text):
                    raise w.fail(qwhere, "'description' is empty")
                queries.append((qwhere, normalize_query(text), tid, qtype))
        if not queries:
            raise w.fail(where, "no 'captions' or 'questions' to ground")
        for qwhere, text, tid, qtype in queries:
            boxes = _trajectory_boxes(traj, tid, w, where)
            boxes = {f: b for f, b in boxes.items() if g0 <= f < g1}
            samples.append(Sample(
                video=str(vid), query=text, gt_span=(g0, g1 - 1), gt_boxes=boxes, eval_range=(s0, s1 - 1),
                num_frames=num, fps=fps, width=a.get("width"), height=a.get("height"),
                id=f"{p.name}:{qwhere}", qtype=qtype))
    if not samples:
        raise UserError(f"{p}: no annotated videos in the file")
    return samples


def load_stg(path: str | os.PathLike[str]) -> list[Sample]:
    """What `stg synth` writes: manifest.jsonl, one {video, query, span_frames, boxes, ...} per line."""
    p = Path(path)
    w = _Where(p, "stg")
    _check_file(p)
    samples = []
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{p}: not a UTF-8 text file; pass the manifest.jsonl that stg synth writes") from None
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"line {n}"
        try:
            a = json.loads(line)
        except json.JSONDecodeError as e:
            raise w.fail(where, f"not valid JSON ({e.msg})") from None
        video = w.get(a, "video", where, (str,))
        query = normalize_query(w.get(a, "query", where, (str,)))
        if not query:
            raise w.fail(where, "'query' is empty")
        span = w.get(a, "span_frames", where)
        if span is not None:
            if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                    and 0 <= span[0] <= span[1]):
                raise w.fail(where, f"'span_frames' must be [start, end] (inclusive, 0-based), got {span}")
            span = (span[0], span[1])
        raw = w.get(a, "boxes", where, (dict,))
        boxes = {}
        for k, b in raw.items():
            xyxy = _box_xyxy(b)
            if xyxy is not None and str(k).lstrip("-").isdigit():
                boxes[int(k)] = xyxy
        num = a.get("num_frames")
        num = int(num) if isinstance(num, int) and num > 0 else None
        if num is not None and span is not None and span[1] >= num:
            raise w.fail(where, f"'span_frames' {list(span)} runs past the video's {num} frames")
        fps = a.get("fps")
        samples.append(Sample(
            video=video, query=query, gt_span=span, gt_boxes=boxes,
            eval_range=None if num is None else (0, num - 1), num_frames=num,
            fps=float(fps) if isinstance(fps, (int, float)) and fps > 0 else None,
            width=a.get("width"), height=a.get("height"), id=f"{p.name}:{where}"))
    if not samples:
        raise UserError(f"{p}: no annotated videos in the file")
    return samples


_LOADERS = {"hcstvg": load_hcstvg, "vidstg": load_vidstg, "stg": load_stg}


def load_annotations(path: str | os.PathLike[str], fmt: str) -> list[Sample]:
    """Load an annotation file of format `fmt` (hcstvg, vidstg or stg) as `Sample`s."""
    if fmt not in _LOADERS:
        raise UserError(f"--format {fmt}: unknown annotation format; use one of {', '.join(FORMATS)}")
    return _LOADERS[fmt](path)
