"""STVG metrics in the TubeDETR convention, so our numbers compare with published tables.

Exactly shared/specs/spacevllm.md, "Metrics":

- frames are 0-based indices over all frames of the video; spans are inclusive;
- tIoU = |P ∩ G| / |P ∪ G| over frame sets (P predicted span frames, G ground-truth frames);
- vIoU = (1 / |P ∪ G|) · Σ_{t ∈ P ∩ G} IoU(box_pred_t, box_gt_t);
- m_tIoU, m_vIoU are means over samples; vIoU@R is the share of samples with vIoU > R (strict);
- a sample with no parsable prediction scores 0.

All values are fractions in [0, 1] (tables print them x100).

Published tables were computed with TubeDETR's evaluator, which only looks at frames sampled
at 5 fps and writes spans end-exclusive; `tubedetr_frames` gives those frames, and
`score_sample(..., viou_frames=...)` counts vIoU over them only (see README, `stg eval`).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["box_iou", "pred_span", "score_sample", "span_frames", "summarize", "tiou", "tubedetr_frames",
           "viou"]

TUBEDETR_FPS = 5.0
TUBEDETR_MAX_FRAMES = 200

Box = Sequence[float]


def span_frames(start_frame: int, end_frame: int) -> range:
    """Frames of an inclusive span; empty when end < start."""
    return range(int(start_frame), int(end_frame) + 1)


def _frames(x: Any) -> set[int] | range:
    """A frame set; step-1 ranges stay ranges so the common case needs no set building."""
    if x is None:
        return range(0)
    if isinstance(x, range) and x.step == 1:
        return x
    if isinstance(x, (set, frozenset)):
        return x  # type: ignore[return-value]
    return {int(f) for f in x}


def _inter_union(p: set[int] | range, g: set[int] | range) -> tuple[int, int]:
    if isinstance(p, range) and isinstance(g, range):  # both step 1: arithmetic, O(1)
        inter = max(0, min(p.stop, g.stop) - max(p.start, g.start)) if len(p) and len(g) else 0
        return inter, len(p) + len(g) - inter
    ps = p if isinstance(p, (set, frozenset)) else set(p)
    gs = g if isinstance(g, (set, frozenset)) else set(g)
    inter = len(ps & gs)
    return inter, len(ps) + len(gs) - inter


def tiou(pred_frames: Any, gt_frames: Any) -> float:
    """Temporal IoU of two frame sets (set, range or iterable of ints; None = empty).

    Pass spans through `span_frames(start, end)`: a bare (start, end) tuple here would mean the
    two frames start and end. Two empty sets score 0.
    """
    inter, union = _inter_union(_frames(pred_frames), _frames(gt_frames))
    return inter / union if union else 0.0


def box_iou(a: Any, b: Any) -> Any:
    """IoU of xyxy boxes: two boxes give a float; (N, 4) and (N, 4) give N paired IoUs.

    Inverted or empty boxes have zero area, and a zero union gives IoU 0 (never NaN).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0, None)
    inter = iw * ih
    area_a = np.clip(a[..., 2] - a[..., 0], 0.0, None) * np.clip(a[..., 3] - a[..., 1], 0.0, None)
    area_b = np.clip(b[..., 2] - b[..., 0], 0.0, None) * np.clip(b[..., 3] - b[..., 1], 0.0, None)
    union = area_a + area_b - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    iou = np.nan_to_num(iou, nan=0.0, posinf=0.0, neginf=0.0)
    return float(iou) if iou.ndim == 0 else iou


def viou(
    pred: Mapping[int, Box],
    gt: Mapping[int, Box],
    *,
    pred_frames: Any = None,
    gt_frames: Any = None,
) -> float:
    """vIoU: summed per-frame box IoU over P ∩ G, divided by |P ∪ G|.

    P defaults to the frames of `pred` (the predicted track) and G to those of `gt`; pass
    `pred_frames`/`gt_frames` (the spans) when a box may be missing on some span frame: that
    frame then still counts in |P ∪ G| and adds IoU 0.
    """
    p = _frames(pred.keys() if pred_frames is None else pred_frames)
    g = _frames(gt.keys() if gt_frames is None else gt_frames)
    _, union = _inter_union(p, g)
    if not union:
        return 0.0
    small, big = (p, g) if len(p) <= len(g) else (g, p)
    common = [t for t in small if t in big and t in pred and t in gt]
    if not common:
        return 0.0
    pa = np.asarray([pred[t] for t in common], dtype=np.float64)
    ga = np.asarray([gt[t] for t in common], dtype=np.float64)
    return float(np.sum(box_iou(pa, ga))) / union


def _gt_frames(gt_span_frames: Any, gt_boxes: Mapping[int, Box]) -> set[int] | range:
    if gt_span_frames is None:
        return _frames(gt_boxes.keys())
    if isinstance(gt_span_frames, tuple) and len(gt_span_frames) == 2:
        return span_frames(*gt_span_frames)
    return _frames(gt_span_frames)


def _is_box(b: Any) -> bool:
    try:
        return len(b) == 4 and all(np.isfinite(float(v)) for v in b)
    except (TypeError, ValueError):
        return False


def tubedetr_frames(start: int, stop: int, fps: float | None, rate_fps: float = TUBEDETR_FPS,
                    max_frames: int = TUBEDETR_MAX_FRAMES) -> list[int]:
    """Frames TubeDETR's evaluator looks at in the end-exclusive range [start, stop).

    Its rule: keep `start`, then each frame f whose int(f * rate_fps / fps) exceeds that of
    the last kept frame (about `rate_fps` frames per second of video); when more than
    `max_frames` remain, keep `max_frames` of them evenly spread. A video at or below
    `rate_fps` keeps every frame. Why: published m_vIoU numbers count only these frames.
    """
    start, stop = int(start), int(stop)
    if stop <= start:
        return []
    if fps is None or not np.isfinite(float(fps)) or float(fps) <= rate_fps:
        kept = list(range(start, stop))
    else:
        rate = rate_fps / float(fps)
        kept = [start]
        for f in range(start + 1, stop):
            if int(kept[-1] * rate) < int(f * rate):
                kept.append(f)
    if len(kept) > max_frames:
        kept = [kept[(j * len(kept)) // max_frames] for j in range(max_frames)]
    return kept


def pred_span(pred: Mapping[str, Any] | Any | None) -> tuple[int, int] | None:
    """The inclusive (start_frame, end_frame) of a prediction, or None when it has none.

    None for a missing prediction, an error line, `span: null` or a span too broken to read.
    """
    if pred is not None and hasattr(pred, "to_dict"):
        pred = pred.to_dict()
    if not isinstance(pred, Mapping) or pred.get("error") or pred.get("span") is None:
        return None
    try:
        s, e = int(pred["span"]["start_frame"]), int(pred["span"]["end_frame"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    return (s, e) if e >= s else None


def _restrict(frames: set[int] | range, keep: Any) -> set[int] | range:
    if keep is None:
        return frames
    if isinstance(frames, range) and isinstance(keep, range) and keep.step == 1:
        return range(max(frames.start, keep.start), max(min(frames.stop, keep.stop), max(frames.start, keep.start)))
    k = keep if isinstance(keep, (set, frozenset, range)) else set(int(f) for f in keep)
    return {f for f in frames if f in k}


def score_sample(
    pred: Mapping[str, Any] | Any | None,
    gt_span_frames: Any,
    gt_boxes: Mapping[int, Box],
    *,
    frame_range: Any = None,
    viou_frames: Any = None,
) -> tuple[float, float]:
    """(tIoU, vIoU) of one `stg.grounding/v1` prediction against ground truth.

    `pred` is a result dict (or `GroundingResult`); None, an error line, `span: null` or a
    document too broken to read all score (0, 0), as the convention demands. P is the predicted
    span's frames and the boxes come from `track` (frames outside the span are ignored; a
    malformed box counts as IoU 0). `gt_span_frames` is an inclusive (start, end) tuple or a
    frame set/range (None: the frames of `gt_boxes`); `gt_boxes` maps frame -> xyxy in the same
    pixel space as the prediction (original video frame).

    `frame_range` (a range or frame set) limits P and G to the frames being evaluated, e.g.
    VidSTG's used segment. `viou_frames` counts vIoU only over those frames (TubeDETR's 5 fps
    frames, see `tubedetr_frames`) while tIoU stays over all frames, as TubeDETR does.
    """
    span = pred_span(pred)
    if span is None:
        return 0.0, 0.0
    if hasattr(pred, "to_dict"):
        pred = pred.to_dict()
    try:
        p = span_frames(*span)
        boxes: dict[int, Box] = {}
        for entry in pred.get("track") or []:
            f = int(entry["frame"])
            if f in p and _is_box(entry["xyxy"]):
                boxes[f] = entry["xyxy"]
    except (KeyError, TypeError, ValueError, AttributeError):
        return 0.0, 0.0
    g = _gt_frames(gt_span_frames, gt_boxes)
    p = _restrict(p, frame_range)
    g = _restrict(g, frame_range)
    if not len(p):
        return 0.0, 0.0
    t = tiou(p, g)
    if viou_frames is not None:
        p, g = _restrict(p, viou_frames), _restrict(g, viou_frames)
    return t, viou(boxes, gt_boxes, pred_frames=p, gt_frames=g)


def summarize(samples: Iterable[tuple[float, float]]) -> dict[str, float | int]:
    """Dataset means from per-sample (tIoU, vIoU); vIoU@R counts vIoU strictly above R.

    An empty list gives zeros with n = 0 (JSON has no NaN).
    """
    arr = np.asarray(list(samples), dtype=np.float64).reshape(-1, 2)
    n = int(arr.shape[0])
    if n == 0:
        return {"m_tIoU": 0.0, "m_vIoU": 0.0, "vIoU@0.3": 0.0, "vIoU@0.5": 0.0, "n": 0}
    t, v = arr[:, 0], arr[:, 1]
    return {
        "m_tIoU": float(t.mean()),
        "m_vIoU": float(v.mean()),
        "vIoU@0.3": float(np.mean(v > 0.3)),
        "vIoU@0.5": float(np.mean(v > 0.5)),
        "n": n,
    }
