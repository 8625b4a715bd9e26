"""The `stg` command line: exit codes, one-line errors, JSON on stdout, the built-in model end to end."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stgcli.cli import main
from stgcli.result import validate

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "shapes.mp4"
TRUTH = json.loads((ROOT / "examples" / "shapes.truth.json").read_text())


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run the console entry point in-process; return (exit code, stdout, stderr)."""
    code = 0
    try:
        main(list(args))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    # what a terminal shows: a progress bar redraws its line after "\r" and clears it when done
    lines = [line.split("\r")[-1] for line in err.split("\n")]
    lines = [line for line in lines if line.strip()]
    assert 1 <= len(lines) <= 3, err
    assert "Traceback" not in err
    for n in needles:
        assert n in err, (n, err)


def agreement(ref, other, clips) -> tuple[list[float], list[float]]:
    """Ground each (video, query) with both models: tIoU of their spans (where ref finds one) and IoU
    of their boxes on the frames both box. Either finding a span the other does not fails."""
    from stgcli.metrics import box_iou, span_frames, tiou
    from stgcli.pipeline import ground

    tious, ious = [], []
    for video, query in clips:
        a, b = ground(video, query, model=ref), ground(video, query, model=other)
        assert (a.span is None) == (b.span is None), (video, query)
        if a.span is None:
            continue
        tious.append(tiou(span_frames(a.span.start_frame, a.span.end_frame),
                          span_frames(b.span.start_frame, b.span.end_frame)))
        boxes = {t.frame: t.xyxy for t in b.track}
        ious += [float(box_iou(t.xyxy, boxes[t.frame])) for t in a.track if t.frame in boxes]
    return tious, ious


def test_help_and_version(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for cmd in ("ground", "batch", "eval", "render", "synth", "train"):
        assert cmd in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and "stg" in out


@pytest.mark.parametrize("args,needles", [
    (("ground", "clip.mp4"), ("Missing argument 'QUERY'", "'stg ground --help'")),
    (("ground", "--frames", "abc", "clip.mp4", "q"), ("'--frames'", "'abc'", "'stg ground --help'")),
    (("batch", "--nope"), ("No such option '--nope'", "'stg batch --help'")),
    (("bogus",), ("No such command 'bogus'", "'stg --help'")),
])
def test_usage_mistakes_are_one_line_naming_the_help(capsys, args, needles):
    """Click's own usage errors follow the same rule as ours: exit 2, one line, where help is."""
    code, out, err = run(capsys, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("stg: error: "), err
    for n in needles:
        assert n in err, (n, err)


@pytest.mark.parametrize("name,needle", [
    ("missing.mp4", "no such file"),
    ("text.mp4", "text.mp4"),
    ("empty.mp4", "empty.mp4"),
    ("audio_only.mp4", "audio_only.mp4"),
    ("no_frames.mkv", "no_frames.mkv"),
    ("truncated.mp4", "truncated.mp4"),
])
def test_bad_videos_exit_2_with_one_line(capsys, clip, tmp_path, name, needle):
    path = tmp_path / name if name == "missing.mp4" else clip(name)
    code, out, err = run(capsys, "ground", str(path), "the red circle")
    assert_user_error(code, err, needle)
    assert out == ""


def test_directory_empty_query_and_frames(capsys, tmp_path):
    code, _, err = run(capsys, "ground", str(tmp_path), "the red circle")
    assert_user_error(code, err, "is a directory")
    code, _, err = run(capsys, "ground", str(EXAMPLE), "   ")
    assert_user_error(code, err, "empty query")
    code, _, err = run(capsys, "ground", str(EXAMPLE), "the red circle", "--frames", "0")
    assert_user_error(code, err, "--frames")


def test_debug_shows_traceback(capsys, tmp_path):
    code, _, err = run(capsys, "--debug", "ground", str(tmp_path / "nope.mp4"), "the red circle")
    assert code == 2 and "Traceback" in err


def test_ground_json_on_builtin_model(capsys, tmp_path):
    out_file = tmp_path / "sub" / "r.json"
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the red circle moving left", "--json",
                         "--out", str(out_file), "--device", "cpu")
    assert code == 0, err
    doc = json.loads(out)  # stdout is the document and nothing else
    validate(doc)
    assert json.loads(out_file.read_text()) == doc
    assert doc["schema"] == "stg.grounding/v1"
    assert doc["model"]["name"] == "spacevllm-tiny-shapes" and len(doc["model"]["sha256"]) == 64
    assert doc["video"]["num_frames"] == 150 and doc["video"]["width"] == 480
    assert doc["sampling"]["num_frames"] == 16
    if doc["span"] is not None:
        s = doc["span"]
        assert [t["frame"] for t in doc["track"]] == list(range(s["start_frame"], s["end_frame"] + 1))
        assert {t["source"] for t in doc["track"]} <= {"model", "interpolated"}
    assert doc["span_decoding"] == "joint"  # the default
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the red circle moving left", "--json",
                         "--span-decoding", "text", "--device", "cpu")
    assert code == 0, err
    assert json.loads(out)["span_decoding"] == "text"
    code, _, err = run(capsys, "ground", str(EXAMPLE), "the red circle", "--span-decoding", "beam")
    assert code == 2 and "beam" in err


def test_unknown_words_warn_on_stderr(capsys):
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the man in red who picks up the cup", "--json",
                         "--device", "cpu")
    assert code == 0
    json.loads(out)
    warn = [line for line in err.splitlines() if "warning" in line]
    assert warn and "knows only its training world" in warn[0]
    for w in ("man", "who", "picks", "cup"):
        assert w in warn[0]
    assert "red" not in warn[0].split("never saw:")[1]


def test_human_summary_and_render(capsys, tmp_path):
    mp4 = tmp_path / "a.mp4"
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the blue square that stays still", "--device", "cpu",
                         "--render", str(mp4))
    assert code == 0, err
    assert "shapes.mp4" in out and "time" in out and str(mp4) in out
    import av

    with av.open(str(mp4)) as c:
        assert c.streams.video[0].codec_context.name == "h264"
        assert sum(1 for _ in c.decode(video=0)) == 150


def test_summary_counts_frames_in_words(capsys, clip):
    """A one-frame video (or a still image) gets "1 frame", not "1 frames"; more get the plural."""
    code, out, err = run(capsys, "ground", str(clip("one_frame.mp4")), "the red circle", "--device", "cpu")
    assert code == 0, err
    assert "  boxes  1 frame (1 from the model, 0 interpolated)" in out.splitlines()
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the blue square that stays still", "--device", "cpu")
    assert code == 0, err
    assert re.search(r"^  boxes  \d+ frames \(\d+ from the model, \d+ interpolated\)$", out, re.M)


def test_ground_never_overwrites_without_force(capsys, tmp_path, monkeypatch):
    import shutil

    from stgcli import pipeline

    def no_model(*a, **k):
        raise AssertionError("the model ran before the output path was checked")

    kept = tmp_path / "kept.json"
    kept.write_text('{"precious": true}')
    video = tmp_path / "v.mp4"
    shutil.copy(EXAMPLE, video)
    with monkeypatch.context() as m:
        m.setattr(pipeline, "ground", no_model)
        for args, needle in (((("--out", str(kept)),), "exists"), ((("--render", str(kept)),), "exists"),
                             ((("--out", str(video)),), "input video"),
                             ((("--out", str(kept / "x.json")),), "is a file")):
            code, _, err = run(capsys, "ground", str(video), "the red circle", "--device", "cpu", *args[0])
            assert_user_error(code, err, needle)
    assert kept.read_text() == '{"precious": true}' and video.read_bytes() == EXAMPLE.read_bytes()
    code, _, err = run(capsys, "ground", str(video), "the red circle", "--device", "cpu", "--out", str(kept),
                       "--force")
    assert code == 0, err
    assert json.loads(kept.read_text())["schema"] == "stg.grounding/v1"


def test_real_subprocess_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "stgcli", "--version"], capture_output=True, text=True)
    assert ok.returncode == 0
    bad = subprocess.run([sys.executable, "-m", "stgcli", "ground", str(tmp_path / "x.mp4"), "q"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "x.mp4" in bad.stderr


def test_a_url_is_not_a_missing_file(capsys, tmp_path):
    """stg reads local files; a URL says so instead of 'no such file' (a Windows drive is a path)."""
    code, _, err = run(capsys, "ground", "https://example.com/clip.mp4", "the red circle")
    assert_user_error(code, err, "example.com/clip.mp4: stg reads local files, not URLs; download")
    code, _, err = run(capsys, "batch", "s3://bucket/clips", "--query", "q", "--out", str(tmp_path / "o.jsonl"))
    assert_user_error(code, err, "bucket/clips: stg reads local files, not URLs")
    code, _, err = run(capsys, "ground", "C:/clips/a.mp4", "the red circle")
    assert_user_error(code, err, "C:/clips/a.mp4: no such file")


def test_a_reversed_window_is_refused_before_the_model_loads(capsys, monkeypatch):
    from stgcli import weights

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the window was checked")

    monkeypatch.setattr(weights, "load_model", no_load)
    for args, needle in ((("--start", "3", "--end", "2"), "window start 3.0s must be before end 2.0s"),
                         (("--start", "2", "--end", "2"), "must be before end 2.0s"),
                         (("--end", "-1"), "window end -1.0s must be a time >= 0")):
        code, _, err = run(capsys, "ground", str(EXAMPLE), "the red circle", *args)
        assert_user_error(code, err, needle)


def test_a_file_that_is_no_video_is_refused_before_the_model_loads(capsys, monkeypatch, tmp_path):
    """A 7B model takes minutes to load: a text file, an audio file or a photo is told at once."""
    import cv2

    from stgcli import weights

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the file was looked at")

    monkeypatch.setattr(weights, "load_model", no_load)
    (tmp_path / "notes.mp4").write_text("not a video\n")
    cv2.imwrite(str(tmp_path / "photo.jpg"), np.zeros((32, 32, 3), np.uint8))
    for name, needle in (("notes.mp4", "notes.mp4: not a readable video file"),
                         ("photo.jpg", "photo.jpg: a still JPEG picture, not a video")):
        code, _, err = run(capsys, "ground", str(tmp_path / name), "the red circle")
        assert_user_error(code, err, needle)
