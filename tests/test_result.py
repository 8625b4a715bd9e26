"""The stg.grounding/v1 contract: model, schema, track building and crash-safe writers."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from stgcli import result as R
from stgcli.result import (
    SCHEMA_ID,
    ErrorInfo,
    GroundingResult,
    JsonlWriter,
    ModelMeta,
    ResultError,
    Sampling,
    Span,
    TrackEntry,
    VideoMeta,
    build_track,
    error_result,
    latest_per_pair,
    read_jsonl,
    sanitize_xyxy,
    validate,
    write_json_atomic,
)

W, H, FPS = 640, 360, 25.0


def make_result(path: str = "clips/a.mp4", query: str = "the red circle", start: int = 50,
                end: int = 60) -> GroundingResult:
    sampled = [
        (start, start / FPS, [101.5, 80.0, 160.2, 139.0], 0.91),
        (end, end / FPS, [90.0, 80.0, 150.0, 139.0], 0.81),
    ]
    return GroundingResult(
        video=VideoMeta(path, FPS, W, H, 250, 10.0),
        query=query,
        model=ModelMeta("spacevllm-tiny-shapes", "ab" * 32, "none", "cpu", "float32"),
        sampling=Sampling(4, [0, 80, 160, 240], [0.0, 3.2, 6.4, 9.6]),
        span=Span.from_frames(start, end, FPS),
        track=build_track((start, end), sampled, FPS, W, H),
        timing_s={"decode": 0.04, "model": 0.11, "total": 0.16},
    )


# --- model -----------------------------------------------------------------------------------


def test_to_dict_key_order_matches_spec():
    d = make_result().to_dict()
    assert list(d) == ["schema", "video", "query", "model", "sampling", "span", "track",
                       "timing_s", "warnings"]
    assert d["schema"] == SCHEMA_ID == "stg.grounding/v1"
    assert list(d["video"]) == ["path", "fps", "width", "height", "num_frames", "duration_s"]
    assert list(d["model"]) == ["name", "sha256", "quantization", "device", "dtype"]
    assert list(d["sampling"]) == ["num_frames", "frame_indices", "times_s"]
    assert list(d["span"]) == ["start_s", "end_s", "start_frame", "end_frame"]
    assert list(d["track"][0]) == ["frame", "time_s", "xyxy", "score", "source"]
    assert d["span"] == {"start_s": 2.0, "end_s": 2.4, "start_frame": 50, "end_frame": 60}


def test_round_trip_dict_and_json():
    r = make_result()
    d = r.to_dict()
    r2 = GroundingResult.from_dict(d)
    assert r2.to_dict() == d
    assert GroundingResult.from_dict(r2.to_dict()) == r2  # idempotent once rounded
    assert GroundingResult.from_json(r.to_json()).to_dict() == d
    assert json.loads(r.to_json(indent=2)) == d
    err = error_result("b.mp4", "q", "VideoError", "cannot open")
    assert GroundingResult.from_dict(err.to_dict()).to_dict() == err.to_dict()


def test_rounding():
    r = make_result()
    r.span = Span(1.23456789, 2.00004999, 30, 30)
    r.track = [TrackEntry(30, 1.23456789, (1.23456, 2.345678, 10.0049, 20.999), 0.912345, "model")]
    r.timing_s = {"total": 0.123456}
    d = r.to_dict()
    assert d["span"]["start_s"] == 1.2346 and d["span"]["end_s"] == 2.0
    assert d["track"][0] == {"frame": 30, "time_s": 1.2346, "xyxy": [1.23, 2.35, 10.0, 21.0],
                             "score": 0.9123, "source": "model"}
    assert d["timing_s"] == {"total": 0.1235}


def test_extra_fields_survive_round_trip():
    d = make_result().to_dict()
    d["video"]["rotation"] = 90
    d["video"]["time_source"] = "pts"
    d["video"]["codec"] = "h264"  # a field some newer writer added
    d["tube_score"] = 0.7
    r = GroundingResult.from_dict(d)
    assert r.video.rotation == 90 and r.video.time_source == "pts"
    assert r.video.extra == {"codec": "h264"} and r.extra == {"tube_score": 0.7}
    assert r.to_dict() == d
    validate(d)


def test_from_dict_rejects_other_schema_and_broken_docs():
    d = make_result().to_dict()
    d["schema"] = "stg.grounding/v2"
    with pytest.raises(ResultError, match="unsupported result schema"):
        GroundingResult.from_dict(d)
    with pytest.raises(ResultError, match="not a valid"):
        GroundingResult.from_dict({"schema": SCHEMA_ID, "query": "q"})
    bad = make_result().to_dict()
    bad["track"][0]["source"] = "guess"
    GroundingResult.from_dict(bad)  # parsing is lenient ...
    with pytest.raises(ResultError):
        GroundingResult.from_dict(bad, check=True)  # ... validation is not


def test_to_json_refuses_nan():
    r = make_result()
    r.timing_s["total"] = float("nan")
    with pytest.raises(ValueError):
        r.to_json()


def test_error_result():
    e = error_result("clips/b.mp4", "a dog", FileNotFoundError, "no such file")
    d = e.to_dict()
    assert d["video"]["path"] == "clips/b.mp4" and d["query"] == "a dog"
    assert d["span"] is None and d["track"] == []
    assert d["error"] == {"type": "FileNotFoundError", "message": "no such file"}
    assert not e.ok and e.key == ("clips/b.mp4", "a dog")
    validate(d)
    from_instance = error_result("x.mp4", "q", ValueError("boom"), "boom")
    assert from_instance.error == ErrorInfo("ValueError", "boom")
    model = ModelMeta("m", None, "none", "cpu", "float32")
    probed = VideoMeta("ignored.mp4", FPS, W, H, 250, 10.0)
    e2 = error_result("x.mp4", "q", "RuntimeError", "OOM", model=model, video=probed)
    assert e2.video.path == "x.mp4" and e2.video.fps == FPS and probed.path == "ignored.mp4"
    validate(e2)


# --- schema ----------------------------------------------------------------------------------


def test_packaged_schema_is_valid_draft_2020_12():
    from jsonschema import Draft202012Validator

    schema = R.load_schema()
    assert schema["$schema"].endswith("2020-12/schema")
    Draft202012Validator.check_schema(schema)


def test_real_results_validate():
    validate(make_result())
    validate(make_result().to_dict())
    nothing = make_result()
    nothing.span, nothing.track = None, []
    validate(nothing)
    one = make_result(start=7, end=7)
    assert len(one.track) == 1
    validate(one)


def _broken(mutate):
    d = make_result().to_dict()
    mutate(d)
    return d


@pytest.mark.parametrize(
    "mutate, where",
    [
        (lambda d: d.pop("query"), "query"),
        (lambda d: d.update(schema="stg.grounding/v0"), "schema"),
        (lambda d: d.update(span="2.0-6.4"), "span"),
        (lambda d: d["track"][0].update(source="guess"), "source"),
        (lambda d: d["track"][0].update(xyxy=[1, 2, 3]), "xyxy"),
        (lambda d: d["track"][0].update(xyxy=[1, 2, 3, "4"]), "xyxy"),
        (lambda d: d["video"].update(fps=None), "fps"),
        (lambda d: d.pop("model"), "model"),
        (lambda d: d.update(error={"type": "X"}), "error"),
        (lambda d: d.update(error={"type": "X", "message": "m"}), "span"),  # error line with a span
    ],
)
def test_schema_rejects(mutate, where):
    with pytest.raises(ResultError) as ei:
        validate(_broken(mutate))
    assert where in str(ei.value) or "required" in str(ei.value)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["track"].pop(3), "one entry per frame"),
        (lambda d: d["track"].reverse(), "one entry per frame"),
        (lambda d: d.update(span=None), "must be empty when span is null"),
        (lambda d: d["track"][0].update(xyxy=[50, 10, 40, 20]), "x1 < x2"),
        (lambda d: d["track"][0].update(xyxy=[50, 10, 700, 20]), "leaves the 640x360 frame"),
        (lambda d: d["span"].update(end_frame=300), "past the video's last frame"),
        (lambda d: d["sampling"].update(num_frames=5), "must agree"),
    ],
)
def test_semantic_rules_rejected(mutate, message):
    d = _broken(mutate)
    with pytest.raises(ResultError, match=message):
        validate(d)


# --- build_track -----------------------------------------------------------------------------


def test_build_track_interpolates_and_holds_edges():
    # span 0..10 at 10 fps; model boxes on frames 2 and 6
    a, b = [10.0, 10.0, 20.0, 20.0], [30.0, 10.0, 40.0, 30.0]
    track = build_track((0, 10), [(2, 0.2, a, 0.8), (6, 0.6, b, 0.4)], 10.0, 100, 100)
    assert [t.frame for t in track] == list(range(11))
    assert [t.source for t in track] == ["interpolated"] * 2 + ["model"] + ["interpolated"] * 3 \
        + ["model"] + ["interpolated"] * 4
    for f in (0, 1, 2):  # held before the first sampled frame
        assert track[f].xyxy == pytest.approx(a) and track[f].score == pytest.approx(0.8)
    for f in (6, 7, 8, 9, 10):  # held after the last
        assert track[f].xyxy == pytest.approx(b) and track[f].score == pytest.approx(0.4)
    # frame 4 is halfway: (a + b) / 2, score (0.8 + 0.4) / 2
    assert track[4].xyxy == pytest.approx([20.0, 10.0, 30.0, 25.0])
    assert track[4].score == pytest.approx(0.6)
    # frame 3 is a quarter of the way: a + (b - a) / 4
    assert track[3].xyxy == pytest.approx([15.0, 10.0, 25.0, 22.5])
    assert track[3].score == pytest.approx(0.7)
    assert [t.time_s for t in track] == pytest.approx([f / 10 for f in range(11)])


def test_build_track_ignores_frames_outside_span_and_bad_boxes():
    a = [10.0, 10.0, 20.0, 20.0]
    sampled = [
        (0, 0.0, [0, 0, 99, 99], 0.99),  # before the span
        (5, 0.5, a, 0.5),
        (5, 0.5, [1, 1, 2, 2], 0.1),  # same frame, lower score: loses
        (7, 0.7, [float("nan"), 0, 5, 5], 0.9),  # not finite: dropped
        (20, 2.0, [0, 0, 99, 99], 0.99),  # after
    ]
    track = build_track((4, 8), sampled, 10.0, 100, 100)
    assert [t.frame for t in track] == [4, 5, 6, 7, 8]
    assert all(t.xyxy == pytest.approx(a) for t in track)
    assert [t.source for t in track] == ["interpolated", "model", "interpolated", "interpolated",
                                         "interpolated"]


def test_build_track_clips_and_fixes_degenerate_boxes():
    sampled = [
        (0, 0.0, [-5.0, -5.0, 50.0, 700.0], 0.9),  # leaves the frame: clipped
        (1, 0.04, [100.0, 100.0, 100.0, 100.0], 0.9),  # a point: 1 px around it
        (2, 0.08, [650.0, 10.0, 700.0, 20.0], 0.9),  # right of the frame: 1 px at the edge
        (3, 0.12, [60.0, 80.0, 20.0, 40.0], 0.9),  # corners swapped
    ]
    track = build_track((0, 3), sampled, FPS, W, H)
    assert track[0].xyxy == pytest.approx([0.0, 0.0, 50.0, 360.0])
    assert track[1].xyxy == pytest.approx([99.5, 99.5, 100.5, 100.5])
    assert track[2].xyxy == pytest.approx([639.0, 10.0, 640.0, 20.0])
    assert track[3].xyxy == pytest.approx([20.0, 40.0, 60.0, 80.0])


def test_sanitize_random_boxes_always_valid():
    rng = np.random.default_rng(0)
    boxes = rng.uniform(-100, 800, size=(5000, 4))
    boxes[:100, 2] = boxes[:100, 0]  # zero width
    out = sanitize_xyxy(boxes, W, H)
    rounded = np.round(out, 2)  # what to_dict writes
    assert np.all(rounded[:, 0] < rounded[:, 2]) and np.all(rounded[:, 1] < rounded[:, 3])
    assert np.all(rounded >= 0)
    assert np.all(rounded[:, [0, 2]] <= W) and np.all(rounded[:, [1, 3]] <= H)


def test_built_track_from_random_model_output_validates():
    rng = np.random.default_rng(1)
    frames = sorted(rng.choice(np.arange(20, 120), size=12, replace=False).tolist())
    sampled = [(f, f / FPS, rng.uniform(-50, 700, 4).tolist(), float(rng.uniform()))
               for f in frames]
    r = make_result()
    r.span = Span.from_frames(20, 119, FPS)
    r.track = build_track((20, 119), sampled, FPS, W, H)
    assert len(r.track) == 100
    validate(r)


def test_build_track_one_sampled_frame():
    a = [10.0, 20.0, 30.0, 40.0]
    track = build_track((3, 9), [(6, 0.24, a, 0.5)], FPS, W, H)
    assert len(track) == 7
    assert all(t.xyxy == pytest.approx(a) and t.score == pytest.approx(0.5) for t in track)
    assert [t.source for t in track].count("model") == 1 and track[3].source == "model"


def test_build_track_single_frame_span():
    track = build_track((5, 5), [(5, 0.2, [1, 2, 3, 4], 0.7)], FPS, W, H)
    assert len(track) == 1
    assert track[0].frame == 5 and track[0].source == "model"
    assert track[0].time_s == pytest.approx(0.2)


def test_build_track_vfr_frame_times():
    times = [0.0, 0.03, 0.1, 0.11, 0.3, 0.31]  # irregular pts
    track = build_track((1, 4), [(1, 0.03, [0, 0, 5, 5], 1.0), (4, 0.3, [3, 0, 8, 5], 1.0)],
                        0.0, W, H, frame_times=times)
    assert [t.time_s for t in track] == [0.03, 0.1, 0.11, 0.3]
    # interpolation is by frame index (the model's frame grid), not by time
    assert track[1].xyxy == pytest.approx([1.0, 0.0, 6.0, 5.0])
    span = Span.from_frames(1, 4, 0.0, frame_times=times)
    assert (span.start_s, span.end_s) == (0.03, 0.3)
    with pytest.raises(ValueError, match="frame_times"):
        build_track((1, 9), [(1, 0.03, [0, 0, 5, 5], 1.0)], 0.0, W, H, frame_times=times)


def test_build_track_nothing_inside_span_returns_empty():
    assert build_track((10, 20), [(5, 0.2, [1, 2, 3, 4], 0.7)], FPS, W, H) == []
    assert build_track((10, 20), [], FPS, W, H) == []


def test_build_track_rejects_bad_input():
    with pytest.raises(ValueError):
        build_track((9, 3), [], FPS, W, H)
    with pytest.raises(ValueError):
        build_track((0, 3), [(0, 0.0, [0, 0, 1, 1], 1.0)], 0.0, W, H)  # no fps, no frame_times


# --- write_json_atomic -----------------------------------------------------------------------


def _no_temp_files(directory):
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")] == []


def test_write_json_atomic_writes_and_creates_dirs(tmp_path):
    target = tmp_path / "deep" / "er" / "out.json"
    r = make_result()
    assert write_json_atomic(target, r) == target
    assert json.loads(target.read_text(encoding="utf-8")) == r.to_dict()
    assert target.read_text(encoding="utf-8").endswith("\n")
    write_json_atomic(target, {"plain": "dict"})
    assert json.loads(target.read_text()) == {"plain": "dict"}
    assert _no_temp_files(target.parent)
    mode = stat.S_IMODE(target.stat().st_mode)
    assert mode & 0o600 == 0o600 and not mode & 0o111  # a normal file, not mkstemp's 0600-only


def test_write_json_atomic_failure_mid_write_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    write_json_atomic(target, make_result())
    before = target.read_bytes()

    def half_then_enospc(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R, "_write_all", half_then_enospc)
    with pytest.raises(R.ResultError, match="out.json: cannot write there: no space left"):
        write_json_atomic(target, make_result(query="another query"))
    assert target.read_bytes() == before
    assert _no_temp_files(tmp_path)


def test_write_json_atomic_failure_at_rename_or_serialize(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}

    def boom(*a, **k):
        raise OSError("rename failed")

    monkeypatch.setattr(R.os, "replace", boom)
    with pytest.raises(R.ResultError, match=r"out.json: cannot write there \(rename failed\)"):
        write_json_atomic(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _no_temp_files(tmp_path)


# --- JSONL -----------------------------------------------------------------------------------


def _lines(path):
    return path.read_bytes().splitlines()


def test_jsonl_append_keys_and_no_duplicates(tmp_path):
    path = tmp_path / "runs" / "batch.jsonl"
    with JsonlWriter(path) as out:
        assert out.keys() == set()
        assert out.append(make_result("a.mp4", "q1"))
        assert out.append(error_result("b.mp4", "q1", "VideoError", "bad file"))
        assert not out.append(make_result("a.mp4", "q1"))  # duplicate key: refused
        assert ("a.mp4", "q1") in out and len(out) == 2
    assert len(_lines(path)) == 2
    with JsonlWriter(path) as out:  # resume
        assert out.keys() == {("a.mp4", "q1"), ("b.mp4", "q1")}
        assert not out.append(make_result("a.mp4", "q1"))
        assert out.append(make_result("a.mp4", "q2"))
    records, torn = read_jsonl(path)
    assert not torn and [(r["video"]["path"], r["query"]) for r in records] == [
        ("a.mp4", "q1"), ("b.mp4", "q1"), ("a.mp4", "q2")]
    for rec in records:
        validate(rec)


def test_jsonl_query_with_newline_stays_one_line(tmp_path):
    path = tmp_path / "b.jsonl"
    with JsonlWriter(path) as out:
        out.append(make_result("a.mp4", "two\nlines ünïcode"))
    assert len(_lines(path)) == 1
    assert read_jsonl(path).records[0]["query"] == "two\nlines ünïcode"


@pytest.mark.parametrize("tail", [b'{"schema": "stg.grounding/v1", "vid', b"\x00" * 300,
                                  b'{"schema": "stg.grou\n'])
def test_jsonl_torn_last_line_is_repaired(tmp_path, tail):
    path = tmp_path / "b.jsonl"
    with JsonlWriter(path) as out:
        out.append(make_result("a.mp4", "q"))
        out.append(make_result("b.mp4", "q"))
    good = path.read_bytes()
    with open(path, "ab") as f:  # what kill -9 / power loss mid-append leaves behind
        f.write(tail)
    records, torn = read_jsonl(path)
    assert torn and len(records) == 2
    with JsonlWriter(path) as out:
        assert out.repaired
        assert path.read_bytes() == good
        assert out.keys() == {("a.mp4", "q"), ("b.mp4", "q")}
        assert out.append(make_result("c.mp4", "q"))
    records, torn = read_jsonl(path)
    assert not torn and [r["video"]["path"] for r in records] == ["a.mp4", "b.mp4", "c.mp4"]


def test_jsonl_finished_foreign_last_line_is_refused_not_cut(tmp_path):
    path = tmp_path / "b.jsonl"
    with JsonlWriter(path) as out:
        out.append(make_result("a.mp4", "q"))
    with open(path, "ab") as f:
        f.write(b"# second run: different model\n")  # someone's note, not a crash leftover
    before = path.read_bytes()
    with pytest.raises(ResultError, match="line 2 is not a stg.grounding/v1 record"):
        JsonlWriter(path)
    assert path.read_bytes() == before


def test_jsonl_complete_last_record_without_newline_is_kept(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(make_result("a.mp4", "q").to_json(), encoding="utf-8")  # no final "\n"
    with JsonlWriter(path) as out:
        assert not out.repaired and out.keys() == {("a.mp4", "q")}
        out.append(make_result("b.mp4", "q"))
    assert len(_lines(path)) == 2 and not read_jsonl(path).torn


def test_jsonl_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text(make_result("a.mp4", "q").to_json() + "\nnot json\n"
                    + make_result("b.mp4", "q").to_json() + "\n", encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(ResultError, match="line 2"):
        JsonlWriter(path)
    with pytest.raises(ResultError, match="line 2"):
        read_jsonl(path)
    assert path.read_bytes() == before  # nothing truncated


def test_jsonl_failed_append_is_rolled_back(tmp_path, monkeypatch):
    path = tmp_path / "b.jsonl"
    out = JsonlWriter(path)
    out.append(make_result("a.mp4", "q"))
    good = path.read_bytes()
    real = R._write_all

    def half_then_fail(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(R, "_write_all", half_then_fail)
    with pytest.raises(OSError):
        out.append(make_result("b.mp4", "q"))
    assert path.read_bytes() == good and ("b.mp4", "q") not in out
    monkeypatch.setattr(R, "_write_all", real)
    assert out.append(make_result("b.mp4", "q"))  # retry works, file stays clean
    out.close()
    assert out.closed
    with pytest.raises(ValueError, match="closed"):
        out.append(make_result("c.mp4", "q"))
    assert len(read_jsonl(path).records) == 2


@pytest.mark.parametrize("where", ["fsync", "write"])
def test_jsonl_interrupt_after_a_whole_line_keeps_it(tmp_path, monkeypatch, where):
    """Ctrl-C can land once the line's last byte is out (during fsync, or between the write and
    its return): the finished result stays, recorded, and the file stays readable. A cut line is
    still rolled back (test above)."""
    path = tmp_path / "b.jsonl"
    out = JsonlWriter(path)
    out.append(make_result("a.mp4", "q"))
    real_write, real_fsync = R._write_all, os.fsync

    def write_then_interrupt(fd, data):
        real_write(fd, data)
        raise KeyboardInterrupt

    def interrupted_fsync(fd):
        raise KeyboardInterrupt

    if where == "write":
        monkeypatch.setattr(R, "_write_all", write_then_interrupt)
    else:
        monkeypatch.setattr(R.os, "fsync", interrupted_fsync)
    with pytest.raises(KeyboardInterrupt):
        out.append(make_result("b.mp4", "q"))
    monkeypatch.setattr(R, "_write_all", real_write)
    monkeypatch.setattr(R.os, "fsync", real_fsync)
    assert ("b.mp4", "q") in out and not out.append(make_result("b.mp4", "q"))  # no duplicate
    out.close()
    records, torn = read_jsonl(path)
    assert not torn and [r["video"]["path"] for r in records] == ["a.mp4", "b.mp4"]


def test_jsonl_failed_fsync_takes_the_line_out(tmp_path, monkeypatch):
    """A disk that refuses fsync (EIO) may lose the line: it is taken out and the error raised, so a
    rerun grounds it again rather than trusting it."""
    path = tmp_path / "b.jsonl"
    out = JsonlWriter(path)
    out.append(make_result("a.mp4", "q"))
    out.append(error_result("c.mp4", "q", "VideoError", "cannot open"))
    good = path.read_bytes()

    def eio(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(R.os, "fsync", eio)
    with pytest.raises(OSError):
        out.append(make_result("b.mp4", "q"))
    with pytest.raises(OSError):
        out.append(make_result("c.mp4", "q"), retry=True)
    assert path.read_bytes() == good and ("b.mp4", "q") not in out
    assert out.failed() == {("c.mp4", "q")}  # still an error: --retry-failed grounds it again


def test_jsonl_second_writer_is_refused(tmp_path):
    path = tmp_path / "b.jsonl"
    with JsonlWriter(path):
        with pytest.raises(ResultError, match="another process"):
            JsonlWriter(path)
    with JsonlWriter(path):  # lock released on close
        pass


@pytest.mark.skipif(R._fcntl is None, reason="no POSIX file locks on this platform")
def test_jsonl_on_a_file_system_without_locks(tmp_path, monkeypatch, capsys):
    """Some network mounts refuse flock (ENOLCK): that was a traceback; now the writer works and
    stg batch says nothing guards the file. Any other flock error still stops it."""
    import errno

    from stgcli.cli import main

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(R._fcntl, "flock", no_locks)
    path = tmp_path / "b.jsonl"
    with JsonlWriter(path) as w:
        assert w.unlocked and w.append(make_result("a.mp4", "q"))
    assert len(read_jsonl(path).records) == 1
    video = tmp_path / "v.mp4"
    video.write_bytes(b"not a video")  # an error line is enough to see the batch run
    batch_out = tmp_path / "batch.jsonl"
    with pytest.raises(SystemExit) as e:
        main(["batch", str(video), "--query", "q", "--out", str(batch_out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "cannot lock files" in err and "run one at a time" in err, err
    assert len(read_jsonl(batch_out).records) == 1

    def broken(fd, op):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(R._fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output"):
        JsonlWriter(path)


def test_jsonl_survives_kill_9_of_a_writer(tmp_path):
    """A real process killed while appending leaves at most one torn line, which is repaired."""
    import signal
    import subprocess
    import sys
    import time

    path = tmp_path / "b.jsonl"
    code = (
        "import sys, os\n"
        "from stgcli.result import JsonlWriter, error_result\n"
        "out = JsonlWriter(sys.argv[1])\n"
        "i = 0\n"
        "while True:\n"
        "    out.append(error_result(f'v{i}.mp4', 'q', 'E', 'x' * 5000)); i += 1\n"
    )
    root = str(Path(R.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env)
    try:
        deadline = time.time() + 10
        while time.time() < deadline and (not path.exists() or path.stat().st_size < 50_000):
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    records, _ = read_jsonl(path)
    assert len(records) >= 5
    with JsonlWriter(path) as out:
        n = len(out)
        assert n == len(records)
        assert out.append(error_result("new.mp4", "q", "E", "x"))
    assert len(read_jsonl(path).records) == n + 1 and not read_jsonl(path).torn



def test_writer_retry_supersedes_only_an_error(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlWriter(path) as out:
        out.append(error_result("a.mp4", "q", "VideoError", "broken"))
        out.append(make_result("b.mp4", "q"))
    with JsonlWriter(path) as out:
        assert out.failed() == {("a.mp4", "q")}
        assert not out.append(make_result("a.mp4", "q"))  # without retry a key is never written twice
        assert not out.append(make_result("b.mp4", "q"), retry=True)  # a success is never superseded
        assert out.append(make_result("a.mp4", "q"), retry=True)
        assert out.failed() == set()
        assert not out.append(make_result("a.mp4", "q"), retry=True)
    docs = read_jsonl(path).records
    assert [d["video"]["path"] for d in docs] == ["a.mp4", "b.mp4", "a.mp4"]
    latest = latest_per_pair(docs)
    assert [d["video"]["path"] for d in latest] == ["a.mp4", "b.mp4"]
    assert "error" not in latest[0] and latest[0] is docs[2]
