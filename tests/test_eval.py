"""`stg eval`: metric arithmetic by hand, the three annotation loaders, errors, and an end-to-end
check against an independent implementation of the spec's definitions on shapes-world clips."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from stgcli.annotations import load_annotations, load_hcstvg, load_stg, load_vidstg
from stgcli.errors import UserError
from stgcli.evaluate import index_predictions, metrics_of, score, score_one
from stgcli.metrics import score_sample, summarize, tubedetr_frames
from tests.test_cli import assert_user_error, run

BOX = [0.0, 0.0, 10.0, 10.0]  # area 100
HALF = [0.0, 0.0, 10.0, 5.0]  # inside BOX: IoU 50/100 = 0.5


def pred(start: int | None, end: int | None = None, box=BOX, video: str = "v.mp4", query: str = "q",
         fps: float = 25.0, error: str | None = None) -> dict:
    """A minimal stg.grounding/v1 line: one box held over the whole inclusive span."""
    doc = {"schema": "stg.grounding/v1", "video": {"path": video, "fps": fps}, "query": query,
           "span": None, "track": []}
    if error:
        doc["error"] = {"type": "VideoError", "message": error}
    elif start is not None:
        doc["span"] = {"start_frame": start, "end_frame": end, "start_s": start / fps, "end_s": end / fps}
        doc["track"] = [{"frame": f, "xyxy": list(box)} for f in range(start, end + 1)]
    return doc


def gt(a: int, b: int, box=BOX, skip=()) -> dict:
    return {f: tuple(box) for f in range(a, b + 1) if f not in skip}


# --- metric arithmetic (stg protocol: every frame, inclusive spans) ----------------------------


def test_perfect_match():
    assert score_sample(pred(10, 19), (10, 19), gt(10, 19)) == pytest.approx((1.0, 1.0))


def test_partial_overlap():
    # G = 0..9, P = 5..14: |P∩G| = 5 (5..9), |P∪G| = 15 (0..14) -> tIoU 5/15.
    # Same box on the 5 shared frames: vIoU = 5 * 1.0 / 15; half box: 5 * 0.5 / 15.
    assert score_sample(pred(5, 14), (0, 9), gt(0, 9)) == pytest.approx((1 / 3, 1 / 3))
    assert score_sample(pred(5, 14, HALF), (0, 9), gt(0, 9)) == pytest.approx((1 / 3, 1 / 6))


def test_disjoint_spans_score_zero():
    assert score_sample(pred(10, 14), (0, 4), gt(0, 4)) == (0.0, 0.0)
    # Adjacent but not touching: inclusive spans 0..4 and 5..9 share no frame.
    assert score_sample(pred(5, 9), (0, 4), gt(0, 4)) == (0.0, 0.0)


def test_empty_or_failed_prediction_scores_zero_and_counts():
    assert score_sample(pred(None), (0, 9), gt(0, 9)) == (0.0, 0.0)
    assert score_sample(pred(None, error="boom"), (0, 9), gt(0, 9)) == (0.0, 0.0)
    assert score_sample(None, (0, 9), gt(0, 9)) == (0.0, 0.0)
    # One perfect sample and one empty one: means halve, n counts both.
    m = summarize([(1.0, 1.0), (0.0, 0.0)])
    assert m == {"m_tIoU": 0.5, "m_vIoU": 0.5, "vIoU@0.3": 0.5, "vIoU@0.5": 0.5, "n": 2}


def test_one_frame_tube_and_missing_gt_box():
    # One-frame tube at frame 7, predicted 7..8: tIoU = 1/2, vIoU = 1 * 1.0 / 2.
    assert score_sample(pred(7, 8), (7, 7), gt(7, 7)) == pytest.approx((0.5, 0.5))
    # G = 0..3 with no box on frame 2: the frame stays in G and adds IoU 0 -> vIoU = 3/4.
    assert score_sample(pred(0, 3), (0, 3), gt(0, 3, skip={2})) == pytest.approx((1.0, 0.75))


def test_viou_at_r_is_strict():
    m = summarize([(1.0, 0.3), (1.0, 0.5), (1.0, 0.51)])
    assert m["vIoU@0.3"] == pytest.approx(2 / 3)  # 0.3 itself is not above 0.3
    assert m["vIoU@0.5"] == pytest.approx(1 / 3)


def test_frame_range_limits_prediction_to_used_segment():
    # VidSTG: segment 10..19, G = 10..14, P = 0..19 -> P becomes 10..19: tIoU = 5/10.
    t, v = score_sample(pred(0, 19), (10, 14), gt(10, 14), frame_range=range(10, 20))
    assert (t, v) == pytest.approx((0.5, 0.5))
    # A prediction wholly outside the segment is empty there.
    assert score_sample(pred(0, 5), (10, 14), gt(10, 14), frame_range=range(10, 20)) == (0.0, 0.0)


# --- TubeDETR protocol -------------------------------------------------------------------------


def test_tubedetr_frames_at_5_fps():
    # fps 25 -> rate 0.2: kept when int(f * 0.2) steps up: 0, 5, 10, 15, 20.
    assert tubedetr_frames(0, 25, 25.0) == [0, 5, 10, 15, 20]
    # fps 10 -> rate 0.5: 0, 2, 4, 6, 8 (end-exclusive: 10 is not in [0, 10)).
    assert tubedetr_frames(0, 10, 10.0) == [0, 2, 4, 6, 8]
    # A VidSTG segment starts where it starts: [7, 17) at 10 fps: 7, then 8 (int 4 > int 3.5), 10, 12, ...
    assert tubedetr_frames(7, 17, 10.0) == [7, 8, 10, 12, 14, 16]
    assert tubedetr_frames(0, 4, 5.0) == [0, 1, 2, 3]  # at or below 5 fps: every frame
    long = tubedetr_frames(0, 1000, 5.0)  # 1000 frames -> at most 200, evenly spread
    assert len(long) == 200 and long[:3] == [0, 5, 10] and long[-1] == 995


def test_tubedetr_protocol_counts_viou_on_sampled_frames_only():
    # 25 fps clip of 25 frames: sampled S = {0, 5, 10, 15, 20}. G = 3..12, P = 10..17, same box.
    # tIoU (all frames, end-exclusive [3, 13) vs [10, 18)): inter 3, union 10 + 8 - 3 = 15 -> 0.2,
    # the same as inclusive counting. vIoU: P∩S = {10, 15}, G∩S = {5, 10}: inter {10}, union
    # {5, 10, 15} -> 1/3 under tubedetr, but 3/15 = 0.2 over every frame.
    from stgcli.annotations import Sample

    s = Sample("v.mp4", "q", (3, 12), gt(3, 12), eval_range=(0, 24), num_frames=25, fps=25.0)
    p = pred(10, 17)
    stg = score_one(s, p, "stg")
    tdr = score_one(s, p, "tubedetr")
    assert (stg.tiou, stg.viou) == pytest.approx((0.2, 0.2))
    assert (tdr.tiou, tdr.viou) == pytest.approx((0.2, 1 / 3))


# --- loaders -----------------------------------------------------------------------------------


def write(tmp_path: Path, name: str, data) -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


HCSTVG_V1 = {
    # tube from the very first frame (1-based st_frame 1 -> 0-based 0), 3 frames, frame 2 has no box
    "a.mp4": {"img_num": 50, "width": 320, "height": 240, "st_frame": 1, "st_time": 0.0, "ed_time": 0.1,
              "bbox": [[10, 20, 30, 40], None, [12, 20, 30, 40]], "caption": "the  man in red"},
    # one-frame tube at 1-based frame 50 = the last frame (0-based 49)
    "b.mp4": {"img_num": 50, "width": 320, "height": 240, "st_frame": 50, "st_time": 1.9, "ed_time": 2.0,
              "bbox": [[0, 0, 5, 5]], "caption": "a dog"},
}


def test_hcstvg_v1(tmp_path):
    a, b = load_hcstvg(write(tmp_path, "hc.json", HCSTVG_V1))
    assert (a.video, a.query, a.gt_span, a.eval_range, a.num_frames) == ("a.mp4", "the man in red", (0, 2),
                                                                         (0, 49), 50)
    assert a.gt_boxes == {0: (10, 20, 40, 60), 2: (12, 20, 42, 60)}  # ltwh -> xyxy; frame 1 missing
    assert list(a.gt_frames) == [0, 1, 2]
    assert (b.gt_span, b.gt_boxes) == ((49, 49), {49: (0, 0, 5, 5)})


def test_hcstvg_v2_img_size_and_english(tmp_path):
    v2 = {"c.mp4": {"img_num": 10, "img_size": [240, 320], "st_frame": 4, "st_time": 0.3, "ed_time": 0.5,
                    "bbox": [[1, 2, 3, 4], [1, 2, 0, 4]], "English": "the woman"}}
    (s,) = load_annotations(write(tmp_path, "v2.json", v2), "hcstvg")
    assert (s.width, s.height, s.query, s.gt_span) == (320, 240, "the woman", (3, 4))
    assert s.gt_boxes == {3: (1, 2, 4, 6)}  # a zero-width box is a missing box


VIDSTG = [{
    "vid": "2727682922", "frame_count": 100, "fps": 10.0, "width": 640, "height": 480,
    "used_segment": {"begin_fid": 20, "end_fid": 60},  # frames 20..59
    "temporal_gt": {"begin_fid": 30, "end_fid": 33},  # frames 30..32
    "captions": [{"target_id": 1, "description": "an adult in white walks."}],
    "questions": [{"target_id": 2, "description": "who holds the ball?"}],
    "trajectories": [[] for _ in range(30)]
    + [[{"tid": 1, "bbox": {"xmin": 1, "ymin": 2, "xmax": 11, "ymax": 12}},
        {"tid": 2, "bbox": {"xmin": 5, "ymin": 5, "xmax": 9, "ymax": 9}}],
       [{"tid": 2, "bbox": {"xmin": 5, "ymin": 5, "xmax": 9, "ymax": 9}}],  # tid 1 has no box on 31
       [{"tid": 1, "bbox": {"xmin": 2, "ymin": 2, "xmax": 12, "ymax": 12}}]]
    + [[{"tid": 1, "bbox": {"xmin": 0, "ymin": 0, "xmax": 1, "ymax": 1}}] for _ in range(67)],
}]


def test_vidstg_one_sample_per_sentence_end_exclusive(tmp_path):
    cap, q = load_vidstg(write(tmp_path, "vs.json", VIDSTG))
    assert (cap.video, cap.query, cap.qtype) == ("2727682922", "an adult in white walks.", "declarative")
    assert (q.query, q.qtype) == ("who holds the ball?", "interrogative")
    assert cap.gt_span == q.gt_span == (30, 32)
    assert cap.eval_range == (20, 59) and cap.fps == 10.0 and cap.num_frames == 100
    assert cap.gt_boxes == {30: (1, 2, 11, 12), 32: (2, 2, 12, 12)}  # boxes outside temporal_gt dropped
    assert q.gt_boxes == {30: (5, 5, 9, 9), 31: (5, 5, 9, 9)}
    assert cap.window_s == (2.0, 5.9)  # the model only looks at the used segment


def test_stg_manifest(tmp_path):
    line = {"video": "clip_00000.mp4", "query": "the red circle", "fps": 10.0, "width": 64, "height": 48,
            "num_frames": 30, "span_frames": [0, 1], "boxes": {"0": [1, 2, 3, 4], "1": [2, 2, 4, 4]}}
    (s,) = load_stg(write(tmp_path, "manifest.jsonl", json.dumps(line) + "\n\n"))
    assert (s.gt_span, s.eval_range, s.fps) == ((0, 1), (0, 29), 10.0)
    assert s.gt_boxes == {0: (1, 2, 3, 4), 1: (2, 2, 4, 4)}


@pytest.mark.parametrize("fmt,data,needle", [
    ("hcstvg", {"a.mp4": {"st_frame": 1, "bbox": [[0, 0, 1, 1]], "caption": "x"}}, "'img_num'"),
    ("hcstvg", {"a.mp4": {"img_num": 5, "st_frame": 1, "bbox": [[0, 0, 1, 1]]}}, "'caption'"),
    ("hcstvg", {"a.mp4": {"img_num": 5, "st_frame": 0, "bbox": [[0, 0, 1, 1]], "caption": "x"}}, "st_frame"),
    ("hcstvg", [1, 2], "keyed by video name"),
    ("vidstg", [{"vid": "v", "fps": 10}], "'used_segment'"),
    ("vidstg", {"a.mp4": {"img_num": 5}}, "'vid'"),
    ("stg", '{"video": "a.mp4", "query": "x", "boxes": {}}\n', "'span_frames'"),
    ("stg", "not json\n", "line 1"),
    ("hcstvg", {"a.mp4": {"img_num": 5, "st_frame": 1, "bbox": [[0, 0, 1, 1]], "caption": "x", "width": "abc"}},
     "width must be a positive number"),
    ("hcstvg", {"a.mp4": {"img_num": 5, "st_frame": 1, "bbox": [[0, 0, 1, 1]], "caption": None}},
     "'caption' must be a non-empty sentence"),
    ("hcstvg", {"a.mp4": {"img_num": 10, "st_frame": 9, "bbox": [[0, 0, 1, 1]] * 5, "caption": "x"}},
     "runs past 'img_num' 10"),
    ("vidstg", [{"vid": "v", "fps": 10, "used_segment": {"begin_fid": 0, "end_fid": 5},
                 "temporal_gt": {"begin_fid": 1, "end_fid": 3}, "trajectories": [5, 5, 5, 5, 5],
                 "captions": [{"description": "x", "target_id": 0}]}], "must be a list of boxes"),
    ("vidstg", [{"vid": "v", "fps": 10, "used_segment": {"begin_fid": 0, "end_fid": 5},
                 "temporal_gt": {"begin_fid": 1, "end_fid": 3}, "trajectories": {"a": []},
                 "captions": [{"description": "x", "target_id": 0}]}], "not a frame number"),
    ("vidstg", [{"vid": "v", "fps": 10, "frame_count": 4, "used_segment": {"begin_fid": 0, "end_fid": 5},
                 "temporal_gt": {"begin_fid": 1, "end_fid": 3}, "trajectories": [],
                 "captions": [{"description": "x", "target_id": 0}]}], "do not nest"),
    ("vidstg", [{"vid": "v", "fps": 10, "used_segment": {"begin_fid": 0, "end_fid": 5},
                 "temporal_gt": {"begin_fid": 1, "end_fid": 3}, "trajectories": [],
                 "captions": [{"description": " ", "target_id": 0}]}], "'description' is empty"),
    ("stg", '{"video": "a.mp4", "query": "x", "span_frames": [2, 9], "num_frames": 5, "boxes": {}}\n',
     "runs past the video's 5 frames"),
])
def test_malformed_annotations_name_file_and_key(tmp_path, fmt, data, needle):
    p = write(tmp_path, "ann.json", data)
    with pytest.raises(UserError, match=needle) as e:
        load_annotations(p, fmt)
    assert "ann.json" in str(e.value)


def test_annotation_files_with_a_bom_load_and_binary_ones_are_refused(tmp_path):
    (tmp_path / "bom.json").write_bytes("\ufeff".encode() + json.dumps(
        {"a.mp4": {"img_num": 5, "st_frame": 1, "bbox": [[0, 0, 1, 1]], "caption": "x"}}).encode())
    assert [s.video for s in load_annotations(tmp_path / "bom.json", "hcstvg")] == ["a.mp4"]
    (tmp_path / "clip.jsonl").write_bytes(b"\x00\x00\x00\x18ftypisom\xff\xfe")
    with pytest.raises(UserError, match="not a UTF-8 text file"):
        load_annotations(tmp_path / "clip.jsonl", "stg")


# --- matching and failures ---------------------------------------------------------------------


def test_matching_by_file_name_and_failed_samples():
    from stgcli.annotations import Sample

    s1 = Sample("sub/a.mp4", "the dog", (0, 9), gt(0, 9), eval_range=(0, 49))
    s2 = Sample("b.mp4", "the cat", (0, 9), gt(0, 9), eval_range=(0, 49))
    s3 = Sample("c.mp4", "the cow", (0, 9), gt(0, 9), eval_range=(0, 49))
    s4 = Sample("d.mp4", "the pig", (0, 9), gt(0, 9), eval_range=(0, 49))
    preds = index_predictions([pred(0, 9, video="/elsewhere/a.mp4", query="the  dog"),
                               pred(None, video="b.mp4", query="the cat"),  # "not found": valid answer
                               pred(None, video="c.mp4", query="the cow", error="cannot decode")])
    out = score([s1, s2, s3, s4], preds)
    assert [o.status for o in out] == ["ok", "no span", "failed: cannot decode", "failed: no prediction"]
    assert metrics_of(out) == {"m_tIoU": 0.25, "m_vIoU": 0.25, "vIoU@0.3": 0.25, "vIoU@0.5": 0.25, "n": 4,
                               "n_failed": 2}


def test_a_retried_pair_scores_by_its_last_line():
    """`stg batch --retry-failed` appends a new line after the error line; the newer one counts."""
    from stgcli.annotations import Sample

    s = Sample("a.mp4", "the dog", (0, 9), gt(0, 9), eval_range=(0, 49))
    retried = [pred(None, video="a.mp4", query="the dog", error="cannot decode"), pred(0, 9, video="a.mp4",
                                                                                         query="the dog")]
    assert [o.status for o in score([s], index_predictions(retried))] == ["ok"]
    assert [o.status for o in score([s], index_predictions(retried[::-1]))] == ["failed: cannot decode"]


# --- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize("args,needles", [
    (["--format", "hcstvg", "--predictions", "p.jsonl"], ["--annotations"]),
    (["--annotations", "{hc}", "--format", "coco", "--videos", "."], ["--format coco", "hcstvg"]),
    (["--annotations", "{hc}", "--videos", "."], ["--format"]),
    (["--annotations", "{hc}", "--format", "hcstvg"], ["--videos"]),
    (["--annotations", "{hc}", "--format", "vidstg", "--videos", "."], ["hc.json", "'vid'"]),
    (["--annotations", "{bad}", "--format", "hcstvg", "--videos", "."], ["bad.json", "'img_num'"]),
    (["--annotations", "{hc}", "--format", "hcstvg", "--videos", "{tmp}"], ["none of the 2 annotated videos"]),
    (["--annotations", "{hc}", "--format", "hcstvg", "--predictions", "{nomatch}"], ["none of its predictions"]),
    (["--annotations", "{hc}", "--format", "hcstvg", "--predictions", "{tmp}/nope.jsonl"], ["nope.jsonl"]),
    (["--annotations", "{hc}", "--format", "hcstvg", "--predictions", "{nomatch}", "--protocol", "x"],
     ["--protocol x"]),
    (["--annotations", "{tmp}", "--format", "stg", "--videos", "."], ["is a folder", "annotation file"]),
    (["--annotations", "{tmp}", "--format", "hcstvg", "--videos", "."], ["is a folder", "annotation file"]),
    (["--annotations", "{lines}", "--format", "vidstg", "--videos", "."], ["m.jsonl", "line 2", "--format stg"]),
])
def test_user_errors_exit_2_one_line(tmp_path, capsys, args, needles):
    files = {"hc": write(tmp_path, "hc.json", HCSTVG_V1),
             "bad": write(tmp_path, "bad.json", {"a.mp4": {"st_frame": 1}}),
             "nomatch": write(tmp_path, "p.jsonl", json.dumps(pred(0, 1, video="zzz.mp4")) + "\n"),
             "lines": write(tmp_path, "m.jsonl", '{"video": "a.mp4"}\n{"video": "b.mp4"}\n'),
             "tmp": tmp_path}
    args = [a.format(**files) for a in args]
    code, out, err = run(capsys, "eval", *args)
    assert_user_error(code, err, *needles)
    assert out == ""


# --- end to end: shapes-world clips, HC-STVG format, built-in model ----------------------------


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def independent(rows: list[dict], preds: dict, tubedetr: bool = False) -> dict:
    """The spec's definitions written out plainly, from the synth manifest (not our loaders)."""
    t_all, v_all = [], []
    for r in rows:
        p = preds.get((r["video"], r["query"]))
        if p is None or p.get("error") or p["span"] is None:
            t_all.append(0.0)
            v_all.append(0.0)
            continue
        a, b = r["span_frames"]
        G = set(range(a, b + 1))
        P = set(range(p["span"]["start_frame"], p["span"]["end_frame"] + 1))
        boxes = {e["frame"]: e["xyxy"] for e in p["track"]}
        t_all.append(len(P & G) / len(P | G))
        if tubedetr:  # keep frame 0 and each frame where floor(f * 5 / fps) steps up
            fps, keep, last = r["fps"], set(), None
            for f in range(r["num_frames"]):
                if last is None or int(f * 5 / fps) > int(last * 5 / fps):
                    keep.add(f)
                    last = f
            P, G = P & keep, G & keep
        inter = P & G
        v_all.append(sum(_iou(boxes[f], r["boxes"][str(f)]) for f in inter) / len(P | G) if P | G else 0.0)
    n = len(rows)
    return {"m_tIoU": sum(t_all) / n, "m_vIoU": sum(v_all) / n, "vIoU@0.3": sum(v > 0.3 for v in v_all) / n,
            "vIoU@0.5": sum(v > 0.5 for v in v_all) / n, "n": n}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """3 short, small shapes-world clips (seed 37 draws cheap ones) + their HC-STVG annotation."""
    from stgcli.synth import synth_dataset

    d = tmp_path_factory.mktemp("shapes")
    manifest = synth_dataset(d / "clips", 3, seed=37, progress=False)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()]
    ann = {}
    for r in rows:
        a, b = r["span_frames"]
        ltwh = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in (r["boxes"][str(f)] for f in range(a, b + 1))]
        ann[r["video"]] = {"img_num": r["num_frames"], "width": r["width"], "height": r["height"],
                           "st_frame": a + 1, "st_time": a / r["fps"], "ed_time": b / r["fps"], "bbox": ltwh,
                           "caption": r["query"]}
    # An annotated video that is not in the folder: scores 0, counts in n and n_failed.
    ghost = {"video": "ghost.mp4", "query": "the red circle", "span_frames": [0, 4], "fps": 10.0,
             "num_frames": 10, "boxes": {str(f): [0, 0, 5, 5] for f in range(5)}}
    ann["ghost.mp4"] = {"img_num": 10, "width": 64, "height": 48, "st_frame": 1, "st_time": 0, "ed_time": 0.4,
                        "bbox": [[0, 0, 5, 5]] * 5, "caption": "the red circle"}
    hc = d / "hcstvg_test.json"
    hc.write_text(json.dumps(ann))
    return d, rows + [ghost], hc


def test_eval_matches_independent_implementation(shapes, capsys):
    d, rows, hc = shapes
    out, per_sample, png = d / "preds.jsonl", d / "per_sample.csv", d / "eval.png"
    code, stdout, err = run(capsys, "eval", "--annotations", str(hc), "--format", "hcstvg", "--videos",
                            str(d / "clips"), "--out", str(out), "--device", "cpu", "--json",
                            "--per-sample", str(per_sample), "--plot", str(png))
    assert code == 0, err
    got = json.loads(stdout)  # stdout is exactly one JSON object
    assert set(got) == {"m_tIoU", "m_vIoU", "vIoU@0.3", "vIoU@0.5", "n", "n_failed"}
    assert "ghost.mp4" in err and "not found" in err
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(docs) == 3  # the missing video is not run
    preds = {(Path(p["video"]["path"]).name, p["query"]): p for p in docs}
    want = independent(rows, preds)
    assert got["n"] == 4 and got["n_failed"] == 1
    assert got["m_tIoU"] > 0  # the model found something, so the comparison is not 0 == 0
    for k in ("m_tIoU", "m_vIoU", "vIoU@0.3", "vIoU@0.5"):
        assert got[k] == pytest.approx(want[k], abs=0.005), k
        assert 0.0 <= got[k] <= 1.0

    # per-sample CSV: one row per sample, spans as the predictions and annotations say
    with open(per_sample, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["video"] for r in table] == [r["video"] for r in rows]
    for r, row in zip(table[:3], rows):
        p = preds[(row["video"], row["query"])]
        assert (int(r["gt_start_frame"]), int(r["gt_end_frame"])) == tuple(row["span_frames"])
        if p["span"] is not None:
            assert int(r["pred_start_frame"]) == p["span"]["start_frame"]
    assert table[3]["status"] == "failed: video not found" and float(table[3]["vIoU"]) == 0.0
    # the plot rendered: a real PNG, not an empty file
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    # TubeDETR protocol on the same predictions, without a model
    code, stdout, err = run(capsys, "eval", "--annotations", str(hc), "--format", "hcstvg", "--predictions",
                            str(out), "--protocol", "tubedetr", "--json")
    assert code == 0, err
    tdr = json.loads(stdout)
    want = independent(rows, preds, tubedetr=True)
    for k in ("m_tIoU", "m_vIoU", "vIoU@0.3", "vIoU@0.5"):
        assert tdr[k] == pytest.approx(want[k], abs=0.005), k
    assert tdr["m_tIoU"] == pytest.approx(got["m_tIoU"])  # tIoU is the same under both protocols

    # rerun: resumes (nothing left to ground), same numbers, human-readable summary
    code, stdout, err = run(capsys, "eval", "--annotations", str(hc), "--format", "hcstvg", "--videos",
                            str(d / "clips"), "--out", str(out), "--device", "cpu")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 3
    assert f"m_tIoU        {got['m_tIoU']:.4f}" in stdout and "4  (1 failed)" in stdout


def test_vidstg_segment_limits_the_model(shapes, capsys):
    """The model only sees VidSTG's used segment, and predictions outside it do not count."""
    d, rows, _ = shapes
    r = rows[0]
    a, b = r["span_frames"]
    s0, s1 = max(0, a - 5), min(r["num_frames"], b + 6)  # used segment [s0, s1)
    traj = [[] for _ in range(r["num_frames"])]
    for f in range(a, b + 1):
        x1, y1, x2, y2 = r["boxes"][str(f)]
        traj[f] = [{"tid": 0, "bbox": {"xmin": x1, "ymin": y1, "xmax": x2, "ymax": y2}}]
    ann = [{"vid": Path(r["video"]).stem, "fps": r["fps"], "width": r["width"], "height": r["height"],
            "frame_count": r["num_frames"], "used_segment": {"begin_fid": s0, "end_fid": s1},
            "temporal_gt": {"begin_fid": a, "end_fid": b + 1}, "trajectories": traj,
            "captions": [{"target_id": 0, "description": r["query"]}], "questions": []}]
    vs = d / "vidstg.json"
    vs.write_text(json.dumps(ann))
    out = d / "vidstg_preds.jsonl"
    code, stdout, err = run(capsys, "eval", "--annotations", str(vs), "--format", "vidstg", "--videos",
                            str(d / "clips"), "--out", str(out), "--device", "cpu", "--json")
    assert code == 0, err
    (doc,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(s0 <= i < s1 for i in doc["sampling"]["frame_indices"])
    got = json.loads(stdout)
    assert got["n"] == 1 and got["n_failed"] == 0
    if doc["span"] is not None:
        P = set(range(doc["span"]["start_frame"], doc["span"]["end_frame"] + 1)) & set(range(s0, s1))
        G = set(range(a, b + 1))
        assert got["m_tIoU"] == pytest.approx(len(P & G) / len(P | G), abs=1e-9)


def test_out_written_by_another_model_is_refused(shapes, capsys, tmp_path):
    d, rows, hc = shapes
    other = pred(0, 1, video=str(d / "clips" / rows[0]["video"]), query=rows[0]["query"])
    other["model"] = {"name": "someone-elses-model", "sha256": "0" * 64}
    out = write(tmp_path, "preds.jsonl", json.dumps(other) + "\n")
    code, _, err = run(capsys, "eval", "--annotations", str(hc), "--format", "hcstvg", "--videos",
                       str(d / "clips"), "--out", str(out), "--device", "cpu")
    assert_user_error(code, err, "someone-elses-model", "preds.jsonl")


def test_out_decoded_another_way_is_refused(shapes, capsys, tmp_path):
    from stgcli.weights import load_model

    d, rows, hc = shapes
    m = load_model(device="cpu")
    line = pred(0, 1, video=str(d / "clips" / rows[0]["video"]), query=rows[0]["query"])
    line["model"] = {"name": m.name, "sha256": m.sha256}
    line["span_decoding"] = "text"
    out = write(tmp_path, "preds.jsonl", json.dumps(line) + "\n")
    code, _, err = run(capsys, "eval", "--annotations", str(hc), "--format", "hcstvg", "--videos",
                       str(d / "clips"), "--out", str(out), "--device", "cpu")
    assert_user_error(code, err, "--span-decoding text", "preds.jsonl")


def test_readme_worked_example():
    """The numbers README's `stg eval` section computes by hand."""
    from stgcli.annotations import Sample

    s = Sample("clip.mp4", "the red circle", (4, 10), gt(4, 10), eval_range=(0, 19), num_frames=20, fps=10.0)
    p = pred(8, 15, HALF, fps=10.0)
    stg, tdr = score_one(s, p, "stg"), score_one(s, p, "tubedetr")
    assert (stg.tiou, stg.viou) == pytest.approx((0.25, 0.125))
    assert (tdr.tiou, tdr.viou) == pytest.approx((0.25, 1 / 6))
    assert tubedetr_frames(0, 20, 10.0) == list(range(0, 20, 2))


def test_plot_without_matplotlib_is_a_user_error_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    hc = write(tmp_path, "hc.json", HCSTVG_V1)
    code, out, err = run(capsys, "eval", "--annotations", str(hc), "--format", "hcstvg", "--videos", str(tmp_path),
                         "--plot", str(tmp_path / "p.png"))
    assert_user_error(code, err, "matplotlib", "stg[plot]")
    assert not (tmp_path / "p.png").exists()


def test_scoring_predictions_file_without_a_model(tmp_path):
    from stgcli.evaluate import evaluate

    ann = json.loads(json.dumps(VIDSTG))
    ann[0]["questions"] = [dict(ann[0]["captions"][0])]  # the same sentence twice: one shared prediction
    vs = write(tmp_path, "vs.json", ann)
    # predicted 28..40 inside segment 20..59; G = 30..32 with boxes on 30 and 32 (31 missing)
    p = pred(28, 40, [1, 2, 11, 12], video="/data/vidstg/2727682922.mp4", query="an adult in white walks.")
    preds = write(tmp_path, "p.jsonl", json.dumps(p) + "\n")
    report = evaluate(vs, "vidstg", predictions=preds)
    # P = 28..40 (13 frames) holds G = 30..32: tIoU = 3 / 13; vIoU = (IoU 1 on 30, 0 on 31 (no GT box),
    # 90 / 110 on 32: overlap 9 x 10, union 100 + 100 - 90) / 13
    iou32 = (9 * 10) / (100 + 100 - 90)
    assert report.metrics["n"] == 2 and report.metrics["n_failed"] == 0
    assert report.metrics["m_tIoU"] == pytest.approx(3 / 13)
    assert report.metrics["m_vIoU"] == pytest.approx((1 + iou32) / 13)
    assert any("share its prediction" in w for w in report.warnings)


def test_vidstg_summary_splits_sentence_types(tmp_path, capsys):
    vs = write(tmp_path, "vs.json", VIDSTG)
    # the declarative sentence is answered perfectly on its GT boxes (30, 32; 31 has none), the question not at all
    p = pred(30, 32, [1, 2, 11, 12], video="2727682922.mp4", query="an adult in white walks.")
    preds = write(tmp_path, "p.jsonl", json.dumps(p) + "\n")
    code, out, err = run(capsys, "eval", "--annotations", str(vs), "--format", "vidstg", "--predictions", str(preds),
                         "--per-sample", str(tmp_path / "s.csv"))
    assert code == 0, err
    # declarative: tIoU 1; vIoU = (IoU 1 on 30, 0 on 31 (no GT box), 90 / 110 on 32) / 3
    v = (1 + 90 / 110) / 3
    assert f"declarative   m_tIoU 1.0000  m_vIoU {v:.4f}" in out
    assert "interrogative m_tIoU 0.0000  m_vIoU 0.0000" in out
    assert "1 sample had no prediction" in err
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["qtype"] for r in rows] == ["declarative", "interrogative"]


def test_plot_failing_midway_leaves_the_old_png_whole(tmp_path, monkeypatch):
    """--plot writes atomically: a render that fails keeps the previous file and leaves no temp."""
    import matplotlib.figure

    from stgcli.annotations import Sample
    from stgcli.evaluate import SampleScore, plot

    scores = [SampleScore(Sample("a.mp4", "the red circle", (0, 4)), 0.8, 0.5, (0, 4), "ok"),
              SampleScore(Sample("b.mp4", "the blue square", (2, 6)), 0.4, 0.1, (3, 9), "ok")]
    png = plot(tmp_path / "p.png", scores)
    before = png.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def broken(self, fname, **kw):
        fname.write(b"\x89PNG half a picture")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plot(tmp_path / "p.png", scores[:1])
    assert png.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png"]


def test_eval_retries_a_failed_sample_only_when_asked(shapes, tmp_path, capsys):
    from stgcli.result import error_result

    d, rows, hc = shapes
    out = tmp_path / "preds.jsonl"
    failed = error_result(str(d / "clips" / rows[0]["video"]), rows[0]["query"], "VideoError", "was unreadable")
    out.write_text(failed.to_json() + "\n")
    args = ("eval", "--annotations", str(hc), "--format", "hcstvg", "--videos", str(d / "clips"),
            "--out", str(out), "--device", "cpu", "--json")
    code, stdout, err = run(capsys, *args)
    assert code == 0 and "1 sample failed in an earlier run" in err and "--retry-failed" in err, err
    assert json.loads(stdout)["n_failed"] == 2  # that sample and the missing ghost.mp4
    code, stdout, err = run(capsys, *args, "--retry-failed")
    assert code == 0 and "earlier run" not in err, err
    assert json.loads(stdout)["n_failed"] == 1
    assert len(out.read_text().splitlines()) == 4  # 1 error line + 3 grounded, the error kept
    code, _, err = run(capsys, "eval", "--annotations", str(hc), "--format", "hcstvg", "--predictions",
                       str(out), "--retry-failed")
    assert_user_error(code, err, "--retry-failed")


def test_eval_outputs_are_checked_before_the_model_runs(shapes, tmp_path, capsys):
    """--per-sample / --plot never replace an input or an existing file without --force, and are
    refused before any inference; --out made with other --frames is refused, not scored as this run."""
    d, rows, hc = shapes
    out = tmp_path / "preds.jsonl"
    base = ("eval", "--annotations", str(hc), "--format", "hcstvg", "--videos", str(d / "clips"), "--device", "cpu")
    ann_before = hc.read_bytes()
    code, _, err = run(capsys, *base, "--out", str(out), "--per-sample", str(hc), "--force")
    assert_user_error(code, err, "is the input file of this evaluation")
    assert hc.read_bytes() == ann_before and not out.exists()  # refused before anything ran
    taken = tmp_path / "taken.csv"
    taken.write_text("mine")
    code, _, err = run(capsys, *base, "--out", str(out), "--per-sample", str(taken))
    assert_user_error(code, err, "exists", "--force")
    assert taken.read_text() == "mine" and not out.exists()
    code, _, err = run(capsys, *base, "--out", str(out), "--per-sample", str(taken), "--force", "--json")
    assert code == 0, err
    assert taken.read_text().startswith("video,query,tIoU")
    code, _, err = run(capsys, *base, "--out", str(out), "--frames", "8")
    assert_user_error(code, err, "--frames 16, not 8")
