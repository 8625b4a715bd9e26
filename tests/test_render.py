"""`stg render`: H.264/yuv420p at the source's frame count and rate, overlays only where they belong."""
from __future__ import annotations

import json

import av
import numpy as np
import pytest

from stgcli.render import render
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
    src = clip("h264_audio.mp4")
    res = truth_result(src)
    res.span = None
    res.track = []
    out = render(src, res, tmp_path / "a.mp4")
    with av.open(str(out)) as c:
        assert len(c.streams.audio) == 1 and len(c.streams.video) == 1
        n = sum(1 for _ in c.decode(video=0))
    assert n == 30


def test_cli_render_and_errors(capsys, tmp_path):
    rj = tmp_path / "r.json"
    rj.write_text(json.dumps(truth_result().to_dict()))
    out = tmp_path / "o.mp4"
    code, stdout, err = run(capsys, "render", str(EXAMPLE), str(rj), "--out", str(out), "--overlay", "box,timeline")
    assert code == 0, err and out.exists()
    code, _, err = run(capsys, "render", str(EXAMPLE), str(rj), "--out", str(out))
    assert_user_error(code, err, "exists")
    code, _, err = run(capsys, "render", str(EXAMPLE), str(rj), "--out", str(tmp_path / "x.mp4"), "--overlay", "boxes")
    assert_user_error(code, err, "--overlay")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = run(capsys, "render", str(EXAMPLE), str(bad), "--out", str(tmp_path / "y.mp4"))
    assert_user_error(code, err, "bad.json")
