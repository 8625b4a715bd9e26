"""The grounding pipeline's own arithmetic: answer -> span -> frames -> track, on real files."""
from __future__ import annotations

import numpy as np
import pytest

from stgcli.pipeline import finish, ground, prepare, unknown_words
from stgcli.result import validate
from stgcli.weights import load_model
from tests.conftest import VFR_PTS
from tests.test_cli import EXAMPLE


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


def _finish(model, prep, path, text, box=(0.5, 0.5, 0.2, 0.3)):
    n = len(prep["sampled"].indices)
    boxes = np.tile(np.asarray(box, np.float32), (n, 1))
    return finish(model, prep, path, text, boxes, np.full(n, 0.9, np.float32), {"decode": 0.0, "model": 0.0}, [])


def test_answer_to_span_and_track_cfr(model):
    prep = prepare(model, EXAMPLE, "the red circle", frames=16)
    times = prep["sampled"].times_s  # 150 frames at 25 fps: indices 0, 10, 20, ... 149
    i, j = 3, 10
    text = f"from {times[i]:.1f} to {times[j]:.1f} seconds"
    res = _finish(model, prep, EXAMPLE, text)
    validate(res.to_dict())
    idx = prep["sampled"].indices
    # edges halfway to the neighbouring sampled frames outside the span
    lo, hi = (times[i - 1] + times[i]) / 2, (times[j] + times[j + 1]) / 2
    assert res.span.start_frame == int(np.ceil(lo * 25 - 1e-6))
    assert res.span.end_frame == int(np.floor(hi * 25 + 1e-6))
    assert idx[i - 1] < res.span.start_frame <= idx[i] and idx[j] <= res.span.end_frame < idx[j + 1]
    model_frames = [t.frame for t in res.track if t.source == "model"]
    assert model_frames == [int(f) for f in idx if res.span.start_frame <= f <= res.span.end_frame]
    # (0.5, 0.5, 0.2, 0.3) normalised on a 480x270 frame
    np.testing.assert_allclose(res.track[0].xyxy, [192, 94.5, 288, 175.5], atol=0.01)


def test_span_reaching_the_clip_ends(model):
    prep = prepare(model, EXAMPLE, "the red circle", frames=16)
    times = prep["sampled"].times_s
    res = _finish(model, prep, EXAMPLE, f"from 0.0 to {times[-1]:.1f} seconds")
    assert (res.span.start_frame, res.span.end_frame) == (0, 149)
    assert len(res.track) == 150


@pytest.mark.parametrize("text,decoding", [("from 5.0 to 1.0 seconds", "joint"), ("from 1.0 to 60.0 seconds", "joint"),
                                           ("somewhere", "joint"), ("", "text")])
def test_malformed_answers_give_null_span(model, text, decoding):
    """(Joint decoding's empty answer is "not there", see test_nothing_there_is_span_null_without_a_warning;
    free text that is empty is malformed.)"""
    import dataclasses

    model = dataclasses.replace(model, span_decoding=decoding)
    prep = prepare(model, EXAMPLE, "the red circle", frames=8)
    res = _finish(model, prep, EXAMPLE, text)
    assert res.span is None and res.track == []
    assert any("no span" in w for w in res.warnings)
    validate(res.to_dict())


def test_vfr_times_come_from_pts(model, clip):
    path = clip("vfr.mp4")
    prep = prepare(model, path, "the red circle", frames=6)
    s = prep["sampled"]
    assert s.time_source == "pts"
    pts_s = np.asarray(VFR_PTS) / 10000
    np.testing.assert_allclose(s.times_s, pts_s[s.indices], atol=1e-6)
    res = _finish(model, prep, path, f"from {s.times_s[1]:.1f} to {s.times_s[3]:.1f} seconds")
    assert res.video.time_source == "pts"
    for t in res.track:
        assert t.time_s == pytest.approx(pts_s[t.frame], abs=1e-4)
    assert res.span.start_s == pytest.approx(pts_s[res.span.start_frame], abs=1e-4)


def test_window_bounds_sampling_and_span(model):
    prep = prepare(model, EXAMPLE, "the red circle", frames=8, start_s=2.0, end_s=4.0)
    idx = prep["sampled"].indices
    assert idx[0] == 50 and idx[-1] == 100
    times = prep["sampled"].times_s
    res = _finish(model, prep, EXAMPLE, f"from {times[0]:.1f} to {times[-1]:.1f} seconds")
    assert 50 <= res.span.start_frame and res.span.end_frame <= 100


def test_unknown_words():
    vocab = {"the", "red", "circle", "up"}
    assert unknown_words("The man in RED who picks up the cup!", vocab) == ["man", "in", "who", "picks", "cup!"]
    # what the tokenizer turns into <unk> is named: other scripts, accents, full-width letters, marks
    assert unknown_words("the red 圆 rëd ｒｅｄ red-circle circle_up circle", vocab) == [
        "圆", "rëd", "ｒｅｄ", "red-circle", "circle_up"]
    assert unknown_words("the circle 2", vocab) == ["2"]
    assert unknown_words("anything at all", None) == []


def test_span_decoding_joint_and_text(model, monkeypatch):
    """joint: the answer is one of the presence head's likeliest spans, re-scored by the LM, so it
    always parses; text: the LM's free greedy answer, unchanged from model.ground()."""
    import dataclasses

    import torch

    from stgcli.pipeline import run_model

    prep = prepare(model, EXAMPLE, "the red circle moving left", frames=16)
    times = prep["sampled"].times_s
    joint = dataclasses.replace(model, span_decoding="joint")
    text_model = dataclasses.replace(model, span_decoding="text")
    answer, boxes, presence, _ = run_model(joint, prep)
    ids, _ = model.processor.span_candidates(times, presence)
    assert answer in [model.processor.decode(c) for c in ids]
    res = finish(joint, prep, EXAMPLE, answer, boxes, presence, {}, [])
    assert res.span is not None and res.to_dict()["span_decoding"] == "joint"
    validate(res.to_dict())

    free, boxes2, presence2, _ = run_model(text_model, prep)
    ids_t = torch.tensor([prep["ids"]])
    with torch.inference_mode():
        tokens, _, _ = model.model.ground(ids_t, torch.ones_like(ids_t), torch.from_numpy(prep["pixels"])[None],
                                          torch.tensor([prep["text_mask"]]), max_new_tokens=24)
    assert free == model.processor.decode(tokens)
    # the decoding changes the answer only (and so which boxes the refiner refines, and, with tube
    # linking, which frames' boxes it follows as one object: off here, to compare the rest)
    monkeypatch.setattr(model.model.config, "link_weight", 0.0)
    every_text, every_joint = (run_model(m, prep, all_boxes=True)[1] for m in (text_model, joint))
    np.testing.assert_array_equal(every_text, every_joint)
    assert finish(text_model, prep, EXAMPLE, free, boxes2, presence2, {}, []).to_dict()["span_decoding"] == "text"


def test_the_box_refiner_refines_the_boxes_inside_the_answers_span(model):
    """The built-in model has a box refiner. By default it refines the boxes of the sampled frames
    inside the answer's span only (the rest are never shown), as `all_boxes` would refine them; the
    rest stay the space decoder's (as its box verifier placed them)."""
    from stgcli.pipeline import answer_frames, run_model

    assert model.model.config.box_refiner is not None
    prep = prepare(model, EXAMPLE, "the red circle moving left", frames=16)
    text, boxes, _, _ = run_model(model, prep)
    _, every, _, _ = run_model(model, prep, all_boxes=True)
    refiner = model.model.space_decoder.refiner
    steps, refiner.steps = refiner.steps, 0
    try:
        _, rough, _, _ = run_model(model, prep, all_boxes=True)
    finally:
        refiner.steps = steps
    a, b = answer_frames(model, prep, text)
    inside = np.array([a <= f <= b for f in prep["sampled"].indices])
    assert 0 < inside.sum() < len(inside)
    np.testing.assert_allclose(boxes[inside], every[inside], atol=1e-6)
    np.testing.assert_array_equal(boxes[~inside], rough[~inside])
    assert np.abs(every[~inside] - rough[~inside]).max() > 1e-3  # refined, those would differ


def test_unknown_span_decoding_is_a_user_error():
    from stgcli.errors import UserError

    with pytest.raises(UserError, match="span decoding 'beam'"):
        load_model(device="cpu", span_decoding="beam")


def test_nothing_there_is_span_null_without_a_warning(model, tmp_path):
    """A blank clip: the default joint decoding answers "not there" (span null, empty track), which
    is an answer, not a malformed one; it could never say so before."""
    from stgcli.pipeline import ground
    from tests.videogen import write_video

    blank = write_video(tmp_path / "blank.mp4", [np.full((96, 128, 3), 120, np.uint8)] * 20, fps=10)
    res = ground(blank, "the red square", model=model)
    assert res.span is None and res.track == [] and res.warnings == []
    validate(res.to_dict())


def test_span_is_bounded_by_the_window_not_by_the_samples(model):
    """With one sample the answer covers the window (snap_span has no neighbour to stop at); the
    span must follow it, not shrink to the sampled frame."""
    prep = prepare(model, EXAMPLE, "the red circle", frames=1)
    assert len(prep["sampled"].indices) == 1 and prep["sampled"].window == (0, 149)
    t = prep["sampled"].times_s[0]
    res = _finish(model, prep, EXAMPLE, f"from {t:.1f} to {t:.1f} seconds")
    assert (res.span.start_frame, res.span.end_frame) == (0, 149) and len(res.track) == 150
    prep = prepare(model, EXAMPLE, "the red circle", frames=1, start_s=2.0, end_s=4.0)
    assert prep["sampled"].window == (50, 100)
    t = prep["sampled"].times_s[0]
    res = _finish(model, prep, EXAMPLE, f"from {t:.1f} to {t:.1f} seconds")
    assert (res.span.start_frame, res.span.end_frame) == (50, 100)


def test_a_prompt_longer_than_the_model_positions_warns(model, monkeypatch):
    from stgcli.pipeline import ground

    monkeypatch.setattr(model.model.config.text_config, "max_position_embeddings", 100)
    res = ground(EXAMPLE, "the red circle", model=model)
    assert any("more than the 100 positions" in w and "fewer --frames" in w for w in res.warnings)


def test_grounding_raises_no_library_warnings(model):
    """A user sees stg's own lines on stderr only. transformers 5.24 renamed the KV-cache argument
    (`past_key_values` -> `cache`) and warned on every call made with the old name."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ground(EXAMPLE, "the red circle moving left", model=model)
    assert res.span is not None
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []


def test_too_many_frames_warns_with_a_number_that_fits(model, monkeypatch):
    """More frames than the language model has positions for: a warning naming how many would fit,
    and that many do fit."""
    import re

    monkeypatch.setattr(model.model.config.text_config, "max_position_embeddings", 200)
    res = ground(EXAMPLE, "the red circle", model=model, frames=16)
    [warning] = [w for w in res.warnings if "positions" in w]
    assert "more than the 200 positions model 'spacevllm-tiny-shapes' was built for" in warning
    fits = int(re.search(r"at most about (\d+) here", warning).group(1))
    assert 1 <= fits < 16
    assert len(prepare(model, EXAMPLE, "the red circle", frames=fits)["ids"]) <= 200
    assert not [w for w in ground(EXAMPLE, "the red circle", model=model, frames=fits).warnings if "positions" in w]


def test_the_file_is_looked_at_before_a_load_and_not_again_after(model, tmp_path, monkeypatch):
    """ground() with a model name opens the file before loading anything, so a still picture is refused
    at once; with a loaded model that extra open is skipped (the decode says the same)."""
    import cv2

    from stgcli import video as video_module
    from stgcli import weights
    from stgcli.errors import VideoError

    pic = tmp_path / "photo.png"
    cv2.imwrite(str(pic), np.zeros((32, 32, 3), np.uint8))

    def no_load(*a, **k):
        raise AssertionError("the model loaded before the file was looked at")

    monkeypatch.setattr(weights, "load_model", no_load)
    with pytest.raises(VideoError, match="photo.png: a still PNG picture"):
        ground(pic, "the red circle", model="spacevllm-tiny-shapes")
    with pytest.raises(VideoError, match="photo.png: a still PNG picture"):
        ground(pic, "the red circle", model=model)
    looked, real = [], video_module.check_openable
    monkeypatch.setattr(video_module, "check_openable", lambda p: (looked.append(p), real(p))[1])
    monkeypatch.setattr(weights, "load_model", lambda *a, **k: model)
    assert ground(EXAMPLE, "the red circle", model="spacevllm-tiny-shapes").span is not None
    assert looked == [EXAMPLE]
    ground(EXAMPLE, "the red circle", model=model)
    assert looked == [EXAMPLE]  # not opened a second time for the check
