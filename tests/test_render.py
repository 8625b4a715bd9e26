"""`stg render`: H.264/yuv420p at the source's frame count and rate, overlays only where they belong."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest

from stgcli.render import render
from stgcli.errors import UserError
from stgcli.result import GroundingResult
from tests.test_cli import EXAMPLE, TRUTH, assert_user_error, run

QUERY = "the red circle moving left"


def truth_result(video=EXAMPLE, query=QUERY) -> GroundingResult:
    t = TRUTH[query]
    a, b = t["span_frames"]
    track = [{"frame": f, "time_s": f / 25, "xyxy": t["boxes"][str(f)], "score": 0.9,
              "source": "model" if f % 10 == 0 else "interpolated"} for f in range(a, b + 1)]
    return GroundingResult.from_dict({
        "schema": "stg.grounding/v1",
        "video": {"path": str(video), "fps": 25.0, "width": 480, "height": 270, "num_frames": 150, "duration_s": 6.0},
        "query": query, "model": {"name": "truth", "sha256": None, "quantization": "none", "device": "cpu",
                                  "dtype": "float32"},
        "sampling": {"num_frames": 1, "frame_indices": [a], "times_s": [a / 25]},
        "span": {"start_s": a / 25, "end_s": b / 25, "start_frame": a, "end_frame": b},
        "track": track, "timing_s": {"decode": 0, "model": 0, "total": 0}})


def decode(path) -> tuple[list[np.ndarray], av.video.stream.VideoStream]:
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(st)]
        return frames, (st.codec_context.name, st.codec_context.pix_fmt, float(st.average_rate))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("render") / "a.mp4"
    render(EXAMPLE, truth_result(), out)
    return out


def test_h264_same_frames_and_rate(rendered):
    frames, (codec, pix_fmt, rate) = decode(rendered)
    src, (_, _, src_rate) = decode(EXAMPLE)
    assert (codec, pix_fmt) == ("h264", "yuv420p")
    assert len(frames) == len(src) == 150 and rate == src_rate == 25.0
    assert frames[0].shape == src[0].shape


def test_overlays_inside_span_only(rendered):
    frames, _ = decode(rendered)
    src, _ = decode(EXAMPLE)
    t = TRUTH[QUERY]
    a, b = t["span_frames"]
    bar = 270 // 40
    for f in (a, (a + b) // 2, b):
        x1, y1, x2, y2 = (int(round(v)) for v in t["boxes"][str(f)])
        # the box outline: the rendered top edge differs strongly from the source
        edge = np.abs(frames[f][y1, x1:x2].astype(int) - src[f][y1, x1:x2].astype(int)).sum(-1)
        assert np.median(edge) > 60, f
    for f in (0, 10, b + 5, 149):  # outside the span: untouched except the timeline bar
        diff = np.abs(frames[f][:-bar - 2].astype(int) - src[f][:-bar - 2].astype(int))
        # re-encoding moves levels by a few units; a drawn box or label would move >1000 values by >40
        assert diff.mean() < 6.0 and (diff > 40).sum() < 100, f
    # the timeline is on every frame; its span part is coloured, the rest grey
    mid = frames[0][-2]
    xs = int(round(a / 150 * 479)) + 3, int(round(b / 150 * 479)) - 3
    assert mid[xs[0]:xs[1], 1].mean() > 150          # green span segment
    assert np.abs(mid[:max(1, xs[0] - 6), :].astype(int) - 60).mean() < 25  # grey before it


def test_audio_is_copied(clip, tmp_path):
    from stgcli.video import probe

    src = clip("h264_audio.mp4")
    info = probe(src)
    out = render(src, empty_result(src, info.width, info.height, info.num_frames, info.fps), tmp_path / "a.mp4")
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
        n = sum(1 for _ in c.decode(video=0))
    assert n == 30


def test_cli_render_and_errors(capsys, tmp_path):
    rj = tmp_path / "r.json"
    rj.write_text(json.dumps(truth_result().to_dict()))
    out = tmp_path / "o.mp4"
    code, stdout, err = run(capsys, "render", str(EXAMPLE), str(rj), "--out", str(out), "--overlay", "box,timeline")
    assert code == 0 and out.exists(), err
    assert "render:" in err and "/150 [" in err  # a frame bar (every frame is decoded and encoded again)
    assert err.rstrip("\n").split("\n")[-1].split("\r")[-1].strip() == ""  # and it clears its line when done
    code, _, err = run(capsys, "render", str(EXAMPLE), str(rj), "--out", str(out))
    assert_user_error(code, err, "exists")
    code, _, err = run(capsys, "render", str(EXAMPLE), str(rj), "--out", str(tmp_path / "x.mp4"), "--overlay", "boxes")
    assert_user_error(code, err, "--overlay", "unknown overlay 'boxes' (did you mean box?)", "box,label,trace")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = run(capsys, "render", str(EXAMPLE), str(bad), "--out", str(tmp_path / "y.mp4"))
    assert_user_error(code, err, "bad.json")


def top_level_boxes(path) -> list[str]:
    data, i, names = open(path, "rb").read(), 0, []
    while i + 8 <= len(data):
        size, kind = int.from_bytes(data[i:i + 4], "big"), data[i + 4:i + 8].decode("latin-1")
        names.append(kind)
        i += size if size else len(data)
    return names


def test_index_before_pictures_for_streaming(rendered):
    boxes = top_level_boxes(rendered)
    assert boxes.index("moov") < boxes.index("mdat")


def empty_result(video, width, height, num_frames, fps) -> GroundingResult:
    res = truth_result(video)
    res.video.width, res.video.height, res.video.num_frames, res.video.fps = width, height, num_frames, fps
    res.span, res.track = None, []
    return res


def test_variable_frame_rate_keeps_every_frame_time(tmp_path):
    from fractions import Fraction

    from tests.videogen import painted_frames, write_video

    steps = [40, 40, 120, 40, 160, 33, 47, 40, 200, 40]  # ms between frames
    pts = [0]
    for s in steps:
        pts.append(pts[-1] + s)
    src = write_video(tmp_path / "vfr.mp4", painted_frames(len(pts), 160, 96), 25, pts=pts,
                      time_base=Fraction(1, 1000))
    out = render(src, empty_result(src, 160, 96, len(pts), 25.0), tmp_path / "o.mp4")
    with av.open(str(out)) as c:
        times = [round(float(f.time), 3) for f in c.decode(video=0)]
    assert times == [p / 1000 for p in pts]


def write_av(path, audio_codec: str, start_s: float = 0.0, click_s: float = 0.4, n: int = 25, fps: int = 25,
             rate: int = 16000):
    """A clip whose video and audio both start at `start_s` (a cut from a longer recording), with a
    click in the audio `click_s` after that."""
    from fractions import Fraction

    from tests.videogen import painted_frames

    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=fps)
        vs.pix_fmt, vs.width, vs.height = "yuv420p", 160, 96
        vs.time_base = vs.codec_context.time_base = Fraction(1, 1000)
        a = out.add_stream(audio_codec, rate=rate, layout="mono")
        for k, img in enumerate(painted_frames(n, 160, 96)):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = round((start_s + k / fps) * 1000), Fraction(1, 1000)
            out.mux(vs.encode(f))
        out.mux(vs.encode())
        sig = np.zeros(int(n / fps * rate) // 1024 * 1024 + 1024, np.float32)
        sig[int(click_s * rate):int(click_s * rate) + 400] = 0.8
        fmt = a.codec_context.format.name
        for s in range(0, len(sig), 1024):
            chunk = sig[None, s:s + 1024]
            arr = (chunk * 32767).astype(np.int16) if fmt == "s16" else chunk
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(arr), format=fmt, layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = rate, round(start_s * rate) + s, Fraction(1, rate)
            out.mux(a.encode(frame))
        out.mux(a.encode())
    return path


def click_after_first_frame(path) -> tuple[float, str]:
    with av.open(str(path)) as c:
        first = next(c.decode(video=0)).time
    with av.open(str(path)) as c:
        st = c.streams.audio[0]
        for f in c.decode(st):
            loud = np.abs(f.to_ndarray().astype(np.float32)).max(0)
            loud = loud / 32767 if f.format.name.startswith("s16") else loud
            if loud.max() > 0.3:
                return f.time + int(np.argmax(loud > 0.3)) / f.sample_rate - first, st.codec_context.name
    raise AssertionError("no click")


def test_audio_stays_in_sync_when_the_source_starts_late(tmp_path):
    src = write_av(tmp_path / "late.mp4", "aac", start_s=1.0)
    assert click_after_first_frame(src)[0] == pytest.approx(0.4, abs=0.01)
    out = render(src, empty_result(src, 160, 96, 25, 25.0), tmp_path / "o.mp4")
    click, codec = click_after_first_frame(out)
    assert codec == "aac" and click == pytest.approx(0.4, abs=0.01)


def test_audio_mp4_cannot_hold_is_reencoded(tmp_path):
    src = write_av(tmp_path / "pcm.mkv", "pcm_s16le")
    notes: list[str] = []
    out = render(src, empty_result(src, 160, 96, 25, 25.0), tmp_path / "o.mp4", notes=notes)
    click, codec = click_after_first_frame(out)
    assert codec == "aac" and click == pytest.approx(0.4, abs=0.03) and notes == []


def test_render_takes_its_line_from_a_batch_jsonl(capsys, tmp_path, monkeypatch):
    """After `stg batch` a user renders one clip straight from results.jsonl: the line for VIDEO
    (however its path is spelled), --query when it was asked several, the newest line of a pair."""
    import shutil

    from stgcli.render import load_result
    from stgcli.result import error_result

    other = tmp_path / "clips" / "other.mp4"
    other.parent.mkdir()
    shutil.copy(EXAMPLE, other)
    still = "the blue square that stays still"
    mine, second = truth_result(), truth_result(query=still)
    lines = [error_result(str(EXAMPLE), QUERY, "VideoError", "cannot open").to_dict(),  # superseded below
             truth_result(video=other).to_dict(), mine.to_dict(), second.to_dict()]
    jl = tmp_path / "results.jsonl"
    jl.write_text("".join(json.dumps(d) + "\n" for d in lines))
    with pytest.raises(UserError, match="2 results for .*shapes.mp4; choose one with --query \\(its queries: "
                                        f"'the red circle moving left', '{still}'\\)"):
        load_result(jl, EXAMPLE)
    assert load_result(jl, EXAMPLE, QUERY).to_dict() == mine.to_dict()
    monkeypatch.chdir(EXAMPLE.parent)  # spelled relative to the current folder
    assert load_result(jl, EXAMPLE.name, still).query == still
    assert load_result(jl, other).video.path == str(other)
    with pytest.raises(UserError, match="no result for .* with --query 'a dog'; its queries there"):
        load_result(jl, EXAMPLE, "a dog")
    with pytest.raises(UserError, match="none of its 3 results is for .*elsewhere.mp4"):
        load_result(jl, tmp_path / "elsewhere.mp4")
    jl.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[1]) + "\n")
    with pytest.raises(UserError, match="the result for .*shapes.mp4 is an error \\(cannot open\\)"):
        load_result(jl, EXAMPLE)
    one = tmp_path / "one.json"
    one.write_text(json.dumps(mine.to_dict()))
    with pytest.raises(UserError, match="its result is for 'the red circle moving left', not --query 'a dog'"):
        load_result(one, EXAMPLE, "a dog")
    one.write_text('{"schema": "stg.grounding/v1", "vid')
    with pytest.raises(UserError, match="one.json: not a stg.grounding/v1 document"):
        load_result(one, EXAMPLE)
    # and through the command line
    jl.write_text("".join(json.dumps(d) + "\n" for d in (mine.to_dict(), second.to_dict())))
    out = tmp_path / "o.mp4"
    code, _, err = run(capsys, "render", str(EXAMPLE), str(jl), "--out", str(out))
    assert_user_error(code, err, "choose one with --query")
    code, _, err = run(capsys, "render", str(EXAMPLE), str(jl), "--query", QUERY, "--out", str(out), "--overlay", "box")
    assert code == 0 and out.exists(), err


def test_result_of_another_video_is_refused(capsys, tmp_path):
    from tests.videogen import painted_frames, write_video

    small = write_video(tmp_path / "small.mp4", painted_frames(5, 160, 96), 25)
    rj = tmp_path / "r.json"
    rj.write_text(json.dumps(truth_result().to_dict()))  # made on the 480x270 example
    code, _, err = run(capsys, "render", str(small), str(rj), "--out", str(tmp_path / "o.mp4"))
    assert_user_error(code, err, "small.mp4")
    assert "480x270" in err and not (tmp_path / "o.mp4").exists()
    short = write_video(tmp_path / "short.mp4", painted_frames(5, 480, 270), 25)  # same size, track beyond it
    code, _, err = run(capsys, "render", str(short), str(rj), "--out", str(tmp_path / "o.mp4"))
    assert_user_error(code, err, "short.mp4")


def test_sigterm_mid_render_leaves_no_part_file(tmp_path):
    """`kill`, `timeout` or a scheduler's SIGTERM used to end stg with no cleanup, leaving the hidden
    part file of a render behind; now it unwinds like Ctrl-C: one line, exit 143, nothing left."""
    import signal
    import subprocess
    import sys
    import time

    import videogen as vg

    video = tmp_path / "long.mp4"
    vg.write_video(video, vg.painted_frames(600, 320, 240), 25)
    out, part = tmp_path / "a.mp4", tmp_path / ".a.mp4.part.mp4"
    proc = subprocess.Popen([sys.executable, "-m", "stgcli", "ground", str(video), "the red circle", "--device", "cpu",
                             "--render", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not part.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert part.exists(), "the render was not seen running"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143 and "Traceback" not in err, err[-2000:]
    assert err.rstrip("\n").split("\n")[-1].split("\r")[-1] == "stg: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]


def test_render_makes_its_folder_and_names_an_impossible_one(tmp_path):
    from stgcli.result import ResultError

    out = render(EXAMPLE, truth_result(), tmp_path / "new" / "sub" / "a.mp4")  # a library caller: folders made
    assert out.is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ResultError, match="cannot write there"):
        render(EXAMPLE, truth_result(), tmp_path / "afile" / "a.mp4")
    assert not list((tmp_path).glob("**/*.part.mp4"))
