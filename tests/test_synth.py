"""The shapes world follows shared/specs/shapes-world.md."""
from __future__ import annotations

import numpy as np
import pytest

from stgcli import synth

N = 400


@pytest.fixture(scope="module")
def specs():
    return [synth.sample_clip(np.random.default_rng(i), seed=i) for i in range(N)]


def test_clip_parameters_within_spec(specs):
    for s in specs:
        assert 160 <= s.width <= 640 and 120 <= s.height <= 480
        assert s.width % 2 == 0 and s.height % 2 == 0
        assert 4 / 3 - 0.02 <= s.width / s.height <= 16 / 9 + 0.02
        assert 10 <= s.fps <= 30
        assert 3.0 - 1 / s.fps <= s.duration <= 12.0 + 1 / s.fps
        assert 18 <= s.crf <= 28
        assert 2 <= len(s.objects) <= 4
        bg = s.background
        assert 30 <= bg.level <= 200 and bg.sigma <= 12
        if bg.kind == "gradient":
            assert 30 <= bg.level2 <= 200


def test_objects_within_spec(specs):
    for s in specs:
        for o in s.objects:
            assert 0.10 * s.height - 1e-6 <= o.side <= 0.25 * s.height + 1e-6
            assert tuple(np.abs(np.array(o.rgb) - synth.COLOURS[o.colour])) <= (20, 20, 20)
            assert all(abs(a - b) <= 20 for a, b in zip(o.rgb, synth.COLOURS[o.colour]))
            length = o.t_out - o.t_in
            assert length >= 1.0 - 1e-9 and length >= 0.2 * s.duration - 1e-9
            assert 0 <= o.t_in and o.t_out <= s.duration + 1e-9
            if o.motion != "still":
                assert 0.05 * s.width - 1e-6 <= o.speed <= 0.25 * s.width + 1e-6
            for t in np.linspace(o.t_in, o.t_out, 7):  # wholly inside the frame while visible
                x1, y1, x2, y2 = o.box(t)
                assert x1 >= -1e-6 and y1 >= -1e-6 and x2 <= s.width + 1e-6 and y2 <= s.height + 1e-6


def test_query_rules(specs):
    forms, shared = set(), 0
    for s in specs:
        t = s.objects[s.target]
        twins = [o for i, o in enumerate(s.objects) if i != s.target and (o.colour, o.shape) == (t.colour, t.shape)]
        if s.form == "plain":
            assert s.query == f"the {t.colour} {t.shape}" and not twins
        elif s.form == "still":
            assert t.motion == "still" and s.query == f"the {t.colour} {t.shape} that stays still"
        else:
            assert s.query == f"the {t.colour} {t.shape} moving {t.motion}"
        assert all(o.motion != t.motion for o in twins)  # the description picks exactly one object
        assert s.has_twin == bool(twins)
        forms.add(s.form)
        shared += any(o.colour == t.colour or o.shape == t.shape
                      for i, o in enumerate(s.objects) if i != s.target)
    assert forms == {"plain", "moving", "still"}
    assert shared >= N / 2


def test_ground_truth_matches_drawn_pixels():
    s = synth.sample_clip(np.random.default_rng(5))
    s.background = synth.Background("uniform", level=128)
    gt = s.gt()
    o = s.objects[s.target]
    a, b = gt["span_frames"]
    assert a / s.fps >= o.t_in - 1e-9 and (a == 0 or (a - 1) / s.fps < o.t_in)
    assert b / s.fps <= o.t_out + 1e-9 and (b == s.num_frames - 1 or (b + 1) / s.fps > o.t_out)
    s.objects = [o]  # draw the target alone: its pixels must fill its box
    s.target = 0
    f = (a + b) // 2
    img = synth.render_frame(s, f / s.fps, np.random.default_rng(0))
    ys, xs = np.nonzero(np.abs(img.astype(int) - 128).sum(-1) > 60)
    x1, y1, x2, y2 = gt["boxes"][f]
    assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5
    assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5


def test_synth_dataset_writes_h264_and_manifest(tmp_path):
    import json

    import av

    manifest = synth.synth_dataset(tmp_path, 2, seed=3, progress=False)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        with av.open(str(tmp_path / row["video"])) as c:
            st = c.streams.video[0]
            assert st.codec_context.name == "h264" and st.codec_context.pix_fmt == "yuv420p"
            n = sum(1 for _ in c.decode(st))
        assert n == row["num_frames"]
        assert len(row["boxes"]) == row["span_frames"][1] - row["span_frames"][0] + 1


def test_hard_case_rates_are_adjustable_and_default_unchanged():
    """Training may ask for more twins / shared-attribute distractors; the defaults (what `stg
    synth` writes) draw exactly the clips they drew before the knobs existed."""
    def twin_rate(**kw):
        return np.mean([synth.sample_clip(np.random.default_rng(i), **kw).has_twin for i in range(300)])

    for i in range(20):
        a = synth.sample_clip(np.random.default_rng(i), seed=i)
        b = synth.sample_clip(np.random.default_rng(i), seed=i, twin_prob=0.3, shared_prob=0.7)
        assert a == b
    assert twin_rate(twin_prob=0.0) == 0
    assert twin_rate(twin_prob=1.0) == 1
    assert 0.2 < twin_rate() < 0.4


def test_duration_stays_within_spec_after_rounding_to_whole_frames():
    # seed 23363 draws 12.0 s at 23.976 fps: 287.7 frames, which rounded up to 288 made 12.012 s
    s = synth.sample_clip(np.random.default_rng(23363))
    assert 3.0 <= s.num_frames / s.fps <= 12.0


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_shape_is_centred_in_its_box(shape):
    """The coverage-weighted centre of a lone drawn object is its box's centre (to a tenth of a pixel)."""
    s = synth.sample_clip(np.random.default_rng(5))
    s.background = synth.Background("uniform", level=128)
    o = s.objects[s.target]
    o.shape = shape
    s.objects, s.target = [o], 0
    a, b = s.gt()["span_frames"]
    f = (a + b) // 2
    img = synth.render_frame(s, f / s.fps, np.random.default_rng(0)).astype(float)
    cover = np.abs(img - 128).sum(-1)
    ys, xs = np.mgrid[:cover.shape[0], :cover.shape[1]]
    x1, y1, x2, y2 = s.gt()["boxes"][f]
    # pixel i covers [i, i + 1): its centre is at box coordinate i + 0.5
    assert (cover * xs).sum() / cover.sum() + 0.5 == pytest.approx((x1 + x2) / 2, abs=0.1)
    assert (cover * ys).sum() / cover.sum() + 0.5 == pytest.approx((y1 + y2) / 2, abs=0.1)
