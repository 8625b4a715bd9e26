"""Metrics on cases small enough to check by hand (the arithmetic is in the comments)."""
from __future__ import annotations

import numpy as np
import pytest

from stgcli.metrics import box_iou, score_sample, span_frames, summarize, tiou, viou
from stgcli.result import (
    GroundingResult,
    ModelMeta,
    Sampling,
    Span,
    VideoMeta,
    build_track,
    error_result,
)

BOX = [0.0, 0.0, 10.0, 10.0]  # area 100
HALF = [0.0, 0.0, 10.0, 5.0]  # inside BOX, area 50 -> IoU with BOX = 50/100 = 0.5
SHIFT = [5.0, 0.0, 15.0, 10.0]  # overlaps BOX in 5x10 = 50; union 150 -> IoU 1/3


def pred_doc(start: int, end: int, box=BOX, fps: float = 10.0) -> dict:
    track = build_track((start, end), [(start, start / fps, box, 0.9)], fps, 100, 100)
    return GroundingResult(
        video=VideoMeta("v.mp4", fps, 100, 100, 100, 10.0),
        query="q",
        model=ModelMeta("m", "0" * 64, "none", "cpu", "float32"),
        sampling=Sampling(1, [start], [start / fps]),
        span=Span.from_frames(start, end, fps),
        track=track,
        timing_s={"total": 0.1},
    ).to_dict()


# --- tIoU ------------------------------------------------------------------------------------


def test_tiou_partial_overlap():
    # P = 0..9 (10 frames), G = 5..14 (10): P∩G = 5..9 = 5, P∪G = 0..14 = 15 -> 5/15
    assert tiou(span_frames(0, 9), span_frames(5, 14)) == pytest.approx(1 / 3)
    # same with sets (general path) and mixed types
    assert tiou(set(range(10)), set(range(5, 15))) == pytest.approx(1 / 3)
    assert tiou(set(range(10)), range(5, 15)) == pytest.approx(1 / 3)


def test_tiou_disjoint_and_perfect_and_empty():
    # P = 0..4, G = 10..19: no common frame -> 0
    assert tiou(span_frames(0, 4), span_frames(10, 19)) == 0.0
    # touching spans share no frame: 0..4 and 5..9 -> 0
    assert tiou(span_frames(0, 4), span_frames(5, 9)) == 0.0
    # inclusive spans: 3..3 vs 3..3 is one common frame -> 1
    assert tiou(span_frames(3, 3), span_frames(3, 3)) == 1.0
    assert tiou(span_frames(2, 8), {2, 3, 4, 5, 6, 7, 8}) == 1.0
    assert tiou(None, span_frames(0, 9)) == 0.0
    assert tiou(set(), set()) == 0.0  # nothing anywhere: 0, not a division by zero


def test_tiou_inclusive_end():
    # P = 0..9 (10 frames) inside G = 0..19 (20 frames): 10/20, not 9/19 nor 10/19
    assert tiou(span_frames(0, 9), span_frames(0, 19)) == pytest.approx(0.5)


# --- box IoU ---------------------------------------------------------------------------------


def test_box_iou_by_hand():
    assert box_iou(BOX, BOX) == 1.0
    assert box_iou(BOX, HALF) == pytest.approx(0.5)
    assert box_iou(BOX, SHIFT) == pytest.approx(50 / 150)
    assert box_iou(BOX, [20, 20, 30, 30]) == 0.0
    assert box_iou(BOX, [10, 0, 20, 10]) == 0.0  # touching edge: zero-area intersection
    assert box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # empty union: 0, not NaN
    assert isinstance(box_iou(BOX, HALF), float)


def test_box_iou_vectorized_matches_pairs():
    a = np.array([BOX, BOX, BOX])
    b = np.array([BOX, HALF, SHIFT])
    np.testing.assert_allclose(box_iou(a, b), [1.0, 0.5, 1 / 3])


# --- vIoU ------------------------------------------------------------------------------------


def test_viou_partial_overlap_by_hand():
    # P = frames 0..3, G = frames 2..5: P∩G = {2, 3}, |P∪G| = 6.
    # IoU at 2 = 1 (same box), at 3 = 0.5 (HALF vs BOX) -> vIoU = (1 + 0.5) / 6 = 0.25
    pred = {0: BOX, 1: BOX, 2: BOX, 3: HALF}
    gt = {2: BOX, 3: BOX, 4: BOX, 5: BOX}
    assert viou(pred, gt) == pytest.approx(0.25)


def test_viou_perfect_and_disjoint():
    boxes = {t: BOX for t in range(5)}
    assert viou(boxes, dict(boxes)) == 1.0
    assert viou({0: BOX}, {1: BOX}) == 0.0  # P∩G empty
    assert viou({}, {}) == 0.0


def test_viou_missing_box_on_span_frame_counts_zero():
    # Span P = 0..3 but only frames 0, 1 boxed; G = 0..3 boxed with BOX.
    # Σ IoU over P∩G = 1 + 1 + 0 + 0 = 2, |P∪G| = 4 -> 0.5
    pred = {0: BOX, 1: BOX}
    gt = {t: BOX for t in range(4)}
    assert viou(pred, gt, pred_frames=range(0, 4)) == pytest.approx(0.5)
    # Without the span, P is the boxed frames {0, 1}: 2 / 4 as well (G = 0..3 is the union)
    assert viou(pred, gt) == pytest.approx(0.5)


# --- score_sample ----------------------------------------------------------------------------


def test_score_sample_perfect_match():
    gt = {t: BOX for t in range(10, 20)}
    assert score_sample(pred_doc(10, 19), (10, 19), gt) == (1.0, 1.0)


def test_score_sample_partial_overlap():
    # Pred span 0..9 with BOX on every frame (one sampled box held over the span);
    # GT 5..14 with HALF: tIoU = 5/15; vIoU = 5 frames x IoU 0.5 / 15 = 2.5/15 = 1/6
    gt = {t: HALF for t in range(5, 15)}
    t, v = score_sample(pred_doc(0, 9), (5, 14), gt)
    assert t == pytest.approx(1 / 3)
    assert v == pytest.approx(1 / 6)


def test_score_sample_disjoint():
    gt = {t: BOX for t in range(50, 60)}
    assert score_sample(pred_doc(0, 9), (50, 59), gt) == (0.0, 0.0)


def test_score_sample_gt_as_frame_set_or_from_boxes():
    gt = {t: BOX for t in range(5, 15)}
    expected = score_sample(pred_doc(0, 9), (5, 14), gt)
    assert score_sample(pred_doc(0, 9), range(5, 15), gt) == expected
    assert score_sample(pred_doc(0, 9), None, gt) == expected


def test_score_sample_no_prediction_scores_zero():
    gt = {t: BOX for t in range(10)}
    assert score_sample(None, (0, 9), gt) == (0.0, 0.0)
    nothing = pred_doc(0, 9)
    nothing["span"], nothing["track"] = None, []
    assert score_sample(nothing, (0, 9), gt) == (0.0, 0.0)
    failed = error_result("v.mp4", "q", "VideoError", "cannot decode")
    assert score_sample(failed, (0, 9), gt) == (0.0, 0.0)  # GroundingResult accepted too
    assert score_sample(failed.to_dict(), (0, 9), gt) == (0.0, 0.0)
    assert score_sample({"span": {"start_frame": "x"}}, (0, 9), gt) == (0.0, 0.0)  # unparsable
    assert score_sample("garbage", (0, 9), gt) == (0.0, 0.0)


def test_score_sample_ignores_malformed_box():
    # Frame 1's box is broken -> IoU 0 there; frames 0, 2 perfect: Σ = 2, |P∪G| = 3
    doc = pred_doc(0, 2)
    doc["track"][1]["xyxy"] = [1, 2, 3]
    gt = {t: BOX for t in range(3)}
    t, v = score_sample(doc, (0, 2), gt)
    assert t == 1.0
    assert v == pytest.approx(2 / 3)


# --- summarize -------------------------------------------------------------------------------


def test_summarize_means_and_strict_thresholds():
    # vIoU exactly 0.5 is NOT > 0.5; exactly 0.3 is NOT > 0.3.
    samples = [(1.0, 0.5), (0.5, 0.3), (0.0, 0.0), (0.5, 0.7)]
    s = summarize(samples)
    assert s["n"] == 4
    assert s["m_tIoU"] == pytest.approx((1.0 + 0.5 + 0.0 + 0.5) / 4)  # 0.5
    assert s["m_vIoU"] == pytest.approx((0.5 + 0.3 + 0.0 + 0.7) / 4)  # 0.375
    assert s["vIoU@0.3"] == pytest.approx(2 / 4)  # 0.5 and 0.7 are > 0.3; 0.3 is not
    assert s["vIoU@0.5"] == pytest.approx(1 / 4)  # only 0.7


def test_summarize_exact_half_from_real_iou():
    # A sample whose vIoU is exactly 0.5 by computation (HALF vs BOX on a matched span)
    gt = {t: BOX for t in range(4)}
    sample = score_sample(pred_doc(0, 3, box=HALF), (0, 3), gt)
    assert sample == (1.0, 0.5)
    assert summarize([sample])["vIoU@0.5"] == 0.0
    assert summarize([sample])["vIoU@0.3"] == 1.0


def test_summarize_empty():
    assert summarize([]) == {"m_tIoU": 0.0, "m_vIoU": 0.0, "vIoU@0.3": 0.0, "vIoU@0.5": 0.0, "n": 0}


def test_viou_is_fast_on_long_videos():
    import time

    n = 20000
    pred = {t: [0.0, 0.0, 10.0, 10.0] for t in range(n)}
    gt = {t: [0.0, 0.0, 10.0, 5.0] for t in range(n // 2, n + n // 2)}
    t0 = time.perf_counter()
    v = viou(pred, gt)
    assert time.perf_counter() - t0 < 1.0
    # |P∩G| = 10000 frames x 0.5, |P∪G| = 30000
    assert v == pytest.approx(5000 / 30000)
