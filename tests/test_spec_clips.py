"""benchmarks/spec_clips.py: the independent shapes-world generator follows the spec and writes what it claims."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "spec_clips.py"
SEED = 5
N_CLIPS = 3

_spec = importlib.util.spec_from_file_location("spec_clips", SCRIPT)
sc = importlib.util.module_from_spec(_spec)
sys.modules["spec_clips"] = sc  # dataclasses look their module up by name
_spec.loader.exec_module(sc)

QUERY = re.compile(r"^the (red|green|blue|yellow) (circle|square|triangle)"
                   r"( moving (left|right|up|down)| that stays still)?$")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    out = tmp_path_factory.mktemp("specclips")
    sc.generate(out, N_CLIPS, SEED)
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return out, rows


def _decode(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _overlaps(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_manifest_keys_and_decoding(made):
    out, rows = made
    assert len(rows) == N_CLIPS
    for i, r in enumerate(rows):
        assert set(r) == {"video", "query", "span_frames", "boxes", "num_frames", "fps", "width", "height", "form",
                          "has_twin"}
        assert r["video"] == f"clip_{i:05d}.mp4"
        with av.open(str(out / r["video"])) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264"
            assert s.codec_context.pix_fmt == "yuv420p"
            n = sum(1 for _ in c.decode(video=0))
        assert (n, s.width, s.height) == (r["num_frames"], r["width"], r["height"])
        assert 3.0 <= r["num_frames"] / r["fps"] <= 12.0 and 10 <= r["fps"] <= 30


def test_span_and_boxes_in_manifest(made):
    _, rows = made
    for r in rows:
        a, b = r["span_frames"]
        assert 0 <= a <= b < r["num_frames"]
        assert (b - a + 1) / r["fps"] >= 1.0 - 1.0 / r["fps"]  # visible for at least 1 s (to a frame)
        assert sorted(int(k) for k in r["boxes"]) == list(range(a, b + 1))
        for box in r["boxes"].values():
            x1, y1, x2, y2 = box
            assert 0 <= x1 < x2 <= r["width"] and 0 <= y1 < y2 <= r["height"]
            assert abs((x2 - x1) - (y2 - y1)) <= 0.02
            assert 0.10 * r["height"] - 1 <= x2 - x1 <= 0.25 * r["height"] + 1
        assert QUERY.match(r["query"])
        assert not (r["has_twin"] and r["form"] == "plain")


def test_target_colour_at_box_centre(made):
    """On a frame where nothing drawn later covers the target, its box centre shows the target's colour."""
    out, rows = made
    checked = 0
    for i, r in enumerate(rows):
        clip = sc.sample_clip(sc.clip_rng(SEED, i))
        assert clip.query == r["query"]
        tgt = clip.objects[clip.target]
        later = clip.objects[clip.target + 1:]
        vis = [sc.visible(o, clip.num_frames, clip.fps) for o in later]
        frames = _decode(out / r["video"])
        for f in range(r["span_frames"][0], r["span_frames"][1] + 1):
            box = r["boxes"][str(f)]
            t = f / clip.fps
            if any(v[f] and _overlaps(o.box_at(t), box) for o, v in zip(later, vis)):
                continue
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            px = frames[f][cy, cx].astype(int)
            assert np.all(np.abs(px - np.array(tgt.rgb)) <= 40), (r["video"], f, px, tgt.rgb)
            checked += 1
            break
    assert checked >= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_clips_follow_spec(seed):
    """Parameters only (nothing drawn), many clips: the spec's rules on sizes, motion, visibility and queries."""
    with_distractor = 0
    n = 150
    for i in range(n):
        c = sc.sample_clip(sc.clip_rng(seed, i))
        w, h, d = c.width, c.height, c.num_frames / c.fps
        assert 160 <= w <= 640 and 120 <= h <= 480 and w % 2 == 0 and h % 2 == 0
        assert 4 / 3 - 1e-9 <= w / h <= 16 / 9 + 1e-9
        assert 18 <= c.crf <= 28 and 3.0 <= d <= 12.0 and 2 <= len(c.objects) <= 4
        tgt = c.objects[c.target]
        others = [o for k, o in enumerate(c.objects) if k != c.target]
        twins = [o for o in others if (o.colour, o.shape) == (tgt.colour, tgt.shape)]
        assert c.has_twin == bool(twins)
        if twins:
            assert c.form != "plain" and all(o.motion != tgt.motion for o in twins)
        m = QUERY.match(c.query)
        assert m and (m.group(1), m.group(2)) == (tgt.colour, tgt.shape)
        if c.form == "moving":
            assert m.group(4) == tgt.motion
        elif c.form == "still":
            assert tgt.motion == "still" and c.query.endswith("that stays still")
        else:
            assert m.group(3) is None
        with_distractor += any(o.colour == tgt.colour or o.shape == tgt.shape for o in others)
        for o in c.objects:
            base = sc.COLOURS[o.colour]
            assert all(abs(a - b) <= 20 for a, b in zip(o.rgb, base))
            assert 0.10 * h <= o.side <= 0.25 * h
            assert o.t_out - o.t_in >= max(1.0, 0.2 * d) - 1e-9 and 0 <= o.t_in and o.t_out <= d + 1e-9
            speed = math.hypot(o.vx, o.vy)
            if o.motion == "still":
                assert speed == 0
            else:
                assert 0.05 * w - 1e-6 <= speed <= 0.25 * w + 1e-6
            for t in (o.t_in, o.t_out):
                x1, y1, x2, y2 = o.box_at(t)
                assert -1e-6 <= x1 and x2 <= w + 1e-6 and -1e-6 <= y1 and y2 <= h + 1e-6
    assert with_distractor >= n / 2


def test_refuses_existing_manifest(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("keep me\n")
    p = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--n", "1"], capture_output=True, text=True)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "manifest.jsonl" in p.stderr
    assert (tmp_path / "manifest.jsonl").read_text() == "keep me\n"
    assert not list(tmp_path.glob("*.mp4"))
