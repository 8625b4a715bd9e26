"""`stg export`: MOT round trip, flat CSV, one-file and per-video outputs, refusals."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from stgcli.export import export
from stgcli.result import JsonlWriter, error_result, write_json_atomic
from test_cli import EXAMPLE, assert_user_error, run
from test_result import make_result


def _read_mot(text: str) -> np.ndarray:
    """Parse MOT lines independently of the exporter: (frame, id, l, t, w, h, conf, x, y, z)."""
    rows = [list(map(float, line.split(","))) for line in text.splitlines() if line.strip()]
    return np.asarray(rows)


def _xyxy_by_frame(doc: dict) -> dict[int, list[float]]:
    return {t["frame"]: t["xyxy"] for t in doc["track"]}


def test_mot_round_trip_single_result(tmp_path, capsys):
    res = make_result(start=50, end=60)
    src = write_json_atomic(tmp_path / "r.json", res)
    code, out, err = run(capsys, "export", str(src), "--format", "mot")
    assert code == 0, err
    mot = _read_mot(out)
    assert mot.shape == (11, 10)
    assert set(mot[:, 1]) == {1}
    assert list(mot[:, 0]) == list(range(51, 62))  # 1-based, every span frame, in order
    assert (mot[:, 7:] == -1).all()
    want = _xyxy_by_frame(res.to_dict())
    for row in mot:
        l, t, w, h = row[2:6]
        np.testing.assert_allclose([l, t, l + w, t + h], want[int(row[0]) - 1], atol=0.006)
    scores = {t["frame"]: t["score"] for t in res.to_dict()["track"]}
    np.testing.assert_allclose(mot[:, 6], [scores[int(f) - 1] for f in mot[:, 0]], atol=1e-4)


def test_mot_jsonl_one_file_per_video_ids_per_query(tmp_path, capsys):
    out = tmp_path / "res.jsonl"
    docs = [make_result("a/clip.mp4", "the red circle", 10, 20), make_result("a/clip.mp4", "the blue square", 15, 18),
            make_result("b/clip.mp4", "the red circle", 5, 9), make_result("c/other.mp4", "x", 0, 3)]
    with JsonlWriter(out) as w:
        for d in docs:
            w.append(d)
        w.append(error_result("d/bad.mp4", "q", "VideoError", "cannot open"))
    folder = tmp_path / "mot"
    code, _, err = run(capsys, "export", str(out), "--format", "mot", "--out", str(folder))
    assert code == 0, err
    assert "1 of 5 results have no track" in err
    assert sorted(p.name for p in folder.iterdir()) == ["clip-2.txt", "clip.txt", "other.txt", "tracks.csv"]
    index = list(csv.DictReader((folder / "tracks.csv").open()))
    assert [(r["file"], r["id"], r["video"], r["query"]) for r in index] == [
        ("clip.txt", "1", "a/clip.mp4", "the red circle"), ("clip.txt", "2", "a/clip.mp4", "the blue square"),
        ("clip-2.txt", "1", "b/clip.mp4", "the red circle"), ("other.txt", "1", "c/other.mp4", "x")]
    mot = _read_mot((folder / "clip.txt").read_text())
    assert len(mot) == 11 + 4
    keys = [tuple(r[:2]) for r in mot]
    assert keys == sorted(keys)  # frame-major, then id, as MOT tools expect
    by_id = {k: mot[mot[:, 1] == k] for k in (1, 2)}
    assert list(by_id[2][:, 0]) == [16, 17, 18, 19]
    want = _xyxy_by_frame(docs[1].to_dict())
    for row in by_id[2]:
        np.testing.assert_allclose([row[2], row[3], row[2] + row[4], row[3] + row[5]], want[int(row[0]) - 1],
                                   atol=0.006)
    # a second export into the same folder is refused, --force allows it
    code, _, err = run(capsys, "export", str(out), "--format", "mot", "--out", str(folder))
    assert_user_error(code, err, str(folder), "--force")
    code, _, err = run(capsys, "export", str(out), "--format", "mot", "--out", str(folder), "--force")
    assert code == 0, err


def test_csv_rows_match_tracks(tmp_path):
    out = tmp_path / "res.jsonl"
    docs = [make_result("a.mp4", "the red circle", 3, 7), make_result("b.mp4", 'the "odd", query', 0, 1)]
    with JsonlWriter(out) as w:
        for d in docs:
            w.append(d)
    text, written, notes = export(out, "csv")
    assert written == [] and notes == []
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 5 + 2
    assert list(rows[0]) == ["video", "query", "frame", "time_s", "x1", "y1", "x2", "y2", "score", "source"]
    assert rows[-1]["query"] == 'the "odd", query'
    track = docs[0].to_dict()["track"]
    for row, t in zip(rows, track):
        assert int(row["frame"]) == t["frame"] and float(row["time_s"]) == t["time_s"]
        assert [float(row[k]) for k in ("x1", "y1", "x2", "y2")] == t["xyxy"]
        assert row["source"] == t["source"]
    dest = tmp_path / "boxes.csv"
    _, written, _ = export(out, "csv", dest)
    assert written == [dest] and dest.read_text() == text


def test_export_refusals(tmp_path, capsys):
    src = write_json_atomic(tmp_path / "r.json", make_result())
    dest = tmp_path / "r.txt"
    dest.write_text("mine")
    code, _, err = run(capsys, "export", str(src), "--format", "mot", "--out", str(dest))
    assert_user_error(code, err, str(dest), "--force")
    assert dest.read_text() == "mine"  # nothing a user made is overwritten silently
    code, _, err = run(capsys, "export", str(tmp_path / "none.json"), "--format", "csv")
    assert_user_error(code, err, "none.json", "no such result file")
    for cmd in (("export", str(tmp_path), "--format", "csv"), ("render", str(EXAMPLE), str(tmp_path))):
        code, _, err = run(capsys, *cmd)
        assert_user_error(code, err, f"{tmp_path}: is a folder; pass a result file")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something/else"}))
    code, _, err = run(capsys, "export", str(bad), "--format", "csv")
    assert_user_error(code, err, "bad.json", "not a stg.grounding/v1 result")
    code, _, err = run(capsys, "export", str(src), "--format", "xml")
    assert code == 2 and "xml" in err
    jl = tmp_path / "r.jsonl"
    with JsonlWriter(jl) as w:
        w.append(make_result())
    code, _, err = run(capsys, "export", str(jl), "--format", "mot")
    assert_user_error(code, err, "--out FOLDER")


def test_mot_export_of_a_real_grounding(tmp_path, capsys):
    """End to end: stg ground --out, then export; every track entry appears once in MOT."""
    from test_cli import EXAMPLE

    res_path = tmp_path / "g.json"
    code, _, err = run(capsys, "ground", str(EXAMPLE), "the red circle moving left", "--out", str(res_path))
    assert code == 0, err
    doc = json.loads(res_path.read_text())
    if not doc["track"]:
        pytest.fail(f"the built-in model found no span on the example clip: {doc.get('extra')}")
    mot_path = tmp_path / "g.txt"
    code, _, err = run(capsys, "export", str(res_path), "--format", "mot", "--out", str(mot_path))
    assert code == 0, err
    mot = _read_mot(mot_path.read_text())
    assert [int(f) - 1 for f in mot[:, 0]] == [t["frame"] for t in doc["track"]]
    assert (mot[:, 2] >= 0).all() and (mot[:, 4] > 0).all() and (mot[:, 5] > 0).all()
    assert (mot[:, 2] + mot[:, 4] <= doc["video"]["width"] + 0.01).all()


def test_export_to_an_unusable_place_is_one_line(tmp_path, capsys):
    src = write_json_atomic(tmp_path / "r.json", make_result())
    jl = tmp_path / "r.jsonl"
    with JsonlWriter(jl) as w:
        w.append(make_result())
    (tmp_path / "f").write_text("x")
    for source, fmt, out, needle in ((src, "csv", tmp_path / "f" / "o.csv", "is a file, not a folder"),
                                     (jl, "mot", tmp_path / "f" / "mot", "cannot write there")):
        code, _, err = run(capsys, "export", str(source), "--format", fmt, "--out", str(out))
        assert_user_error(code, err, needle)


def test_export_keeps_inputs_and_leaves_no_stale_sequences(tmp_path, capsys):
    """--force never writes over the input; a MOT export over an earlier one leaves only its own
    sequences; a video with no span gets an empty sequence file; errors name their file line."""
    jl = tmp_path / "r.jsonl"
    with JsonlWriter(jl) as w:
        w.append(make_result("a.mp4", "q"))
        w.append(make_result("b.mp4", "q"))
    code, _, err = run(capsys, "export", str(jl), "--format", "csv", "--out", str(jl), "--force")
    assert_user_error(code, err, "is the input results file")
    assert len(jl.read_text().splitlines()) == 2

    mot = tmp_path / "mot"
    assert run(capsys, "export", str(jl), "--format", "mot", "--out", str(mot))[0] == 0
    assert sorted(p.name for p in mot.iterdir()) == ["a.txt", "b.txt", "tracks.csv"]
    nothing = make_result("c.mp4", "q").to_dict()
    nothing.update(span=None, track=[])
    jl2 = tmp_path / "r2.jsonl"
    with JsonlWriter(jl2) as w:
        w.append(make_result("a.mp4", "q"))
        w.append(nothing)
    code, _, err = run(capsys, "export", str(jl2), "--format", "mot", "--out", str(mot), "--force")
    assert code == 0, err
    assert sorted(p.name for p in mot.iterdir()) == ["a.txt", "c.txt", "tracks.csv"]  # b.txt was stale
    assert (mot / "c.txt").read_text() == ""
    assert "c.txt,,c.mp4," in (mot / "tracks.csv").read_text()

    (tmp_path / "empty.jsonl").write_text("")
    code, out, err = run(capsys, "export", str(tmp_path / "empty.jsonl"), "--format", "csv")
    assert code == 0 and out.startswith("video,query") and "holds no results" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jl.read_text() + "\n" + json.dumps({"schema": "stg.grounding/v1"}) + "\n")
    code, _, err = run(capsys, "export", str(bad), "--format", "csv")
    assert_user_error(code, err, "line 4")  # the file's line, blank line counted
    (tmp_path / "tail.jsonl").write_text(jl.read_text() + "hello world\n")
    code, _, err = run(capsys, "export", str(tmp_path / "tail.jsonl"), "--format", "csv")
    assert_user_error(code, err, "line 3")  # a finished foreign line is not a torn append
    pretty = tmp_path / "one.jsonl"
    pretty.write_text(make_result().to_json(indent=2))
    code, _, err = run(capsys, "export", str(pretty), "--format", "csv")
    assert_user_error(code, err, "is one JSON document")
