"""Training: deterministic for a seed, checkpoints, and --resume equal to an uninterrupted run."""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from stgcli.errors import UserError
from stgcli.train import TrainConfig, make_batch, new_tiny_model, train
from tests.test_model import small_cfg


def test_batches_are_a_function_of_seed_and_step():
    cfg = small_cfg()
    _, proc = new_tiny_model(cfg, 0)
    a, b = make_batch(cfg, proc, 3), make_batch(cfg, proc, 3)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    c = make_batch(cfg, proc, 4)
    assert not torch.equal(a["pixel_values_videos"], c["pixel_values_videos"])
    # targets are consistent: every clip has a span, boxes are normalised
    assert bool(a["gt_in_span"].any(1).all())
    assert float(a["gt_boxes"].min()) >= 0 and float(a["gt_boxes"].max()) <= 1


def test_short_clip_batches():
    """short_prob: some batches hold many short clips (same frames per batch); each clip still has
    a sampled frame inside its span (a clip where none falls inside is drawn again); off by default
    without touching the data stream of a config that does not use it."""
    cfg = small_cfg(batch_size=3, num_frames=8, min_frames=8, max_frames=8, short_prob=1.0, short_frames=2)
    _, proc = new_tiny_model(cfg, 0)
    for step in range(6):
        b = make_batch(cfg, proc, step)
        assert b["pixel_values_videos"].shape[:2] == (12, 2)  # 3 clips x 8 frames = 12 clips x 2 frames
        assert bool(b["gt_in_span"].any(1).all())
    mixed = small_cfg(short_prob=0.5, short_frames=2)
    shapes = {make_batch(mixed, proc, k)["pixel_values_videos"].shape[:2] for k in range(12)}
    assert (6, 2) in shapes and any(f != 2 for _, f in shapes)  # both kinds of batch occur
    plain, off = make_batch(small_cfg(), proc, 2), make_batch(small_cfg(short_prob=0.0, short_frames=3), proc, 2)
    for k in plain:
        assert torch.equal(plain[k], off[k]), k


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = small_cfg(out_dir=str(tmp_path / "a"), steps=4)
    train(straight, progress=False)

    first = small_cfg(out_dir=str(tmp_path / "b"), steps=4, max_minutes=1e-9)  # stops after step 1
    train(first, progress=False)
    state_file = tmp_path / "b" / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["step"] == 1 and state["elapsed_s"] > 0
    state_file.write_text(json.dumps(dict(state, elapsed_s=100.0)))  # as if the first leg took 100 s
    # max_minutes counts the whole run: a resume whose budget the first leg already spent trains nothing
    with pytest.raises(UserError, match="trained 1.7 minutes already, max_minutes is 1e-09"):
        train(first, resume=True, progress=False)
    train(small_cfg(out_dir=str(tmp_path / "b"), steps=4), resume=True, progress=False)
    times = [json.loads(line)["elapsed_s"] for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert times[0] < 100 <= times[1]  # the first leg's own time, then the second leg's clock goes on from 100 s

    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in log)

    # stop_step ends a run early on the schedule planned for `steps` (how v3's first leg is reproduced
    # on any machine); resuming without it runs the rest and lands on the uninterrupted run's weights
    cut = small_cfg(out_dir=str(tmp_path / "c"), steps=4, stop_step=2)
    train(cut, progress=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "c" / "train_log.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((tmp_path / "c" / "checkpoint" / "trainer_state.json").read_text())["step"] == 2
    with pytest.raises(UserError, match="at step 2 already, and the config ends it at step 2"):
        train(cut, resume=True, progress=False)
    # a checkpoint saved before an option existed resumes: the option was at its default then
    state_file = tmp_path / "c" / "checkpoint" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["train_only"]
    state_file.write_text(json.dumps(state))
    train(small_cfg(out_dir=str(tmp_path / "c"), steps=4), resume=True, progress=False)
    wc = load_file(tmp_path / "c" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wc[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ctrl_c_saves_the_steps_since_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, which the CLI raises as one) between checkpoints lost every step since
    the last one. Now the steps done are saved, and a resume from there ends where an uninterrupted
    run does."""
    from stgcli import train as train_module

    train(small_cfg(out_dir=str(tmp_path / "a"), steps=5), progress=False)
    real = train_module._batches

    def interrupted(cfg, processor, start, workers):  # Ctrl-C while waiting for the 4th batch
        batches = real(cfg, processor, start, workers)
        for _ in range(3):
            yield next(batches)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_batches", interrupted)
    cfg = small_cfg(out_dir=str(tmp_path / "b"), steps=5, checkpoint_every=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, progress=False)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3  # not 2, the last periodic checkpoint
    assert "interrupted after step 3; saved a checkpoint there: continue with --resume" in capsys.readouterr().err
    monkeypatch.setattr(train_module, "_batches", real)
    train(cfg, resume=True, progress=False)
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("to", ["process", "another thread"])
def test_a_signal_is_held_until_the_block_ends(to):
    """A signal arriving inside the weight update is held until it ends, then delivered. The kernel
    may hand a process-directed signal (kill, Ctrl-C) to any thread (torch's, tqdm's): "another
    thread" sends it to one, as happens at random in a busy process."""
    import os
    import signal
    import threading

    from stgcli.train import _signals_held

    seen = []
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)
    other.start()
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("signal"))
    try:
        with _signals_held():
            if to == "process":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                signal.pthread_kill(other.ident, signal.SIGTERM)
            until = time.monotonic() + 0.2  # bytecode boundaries, where Python runs pending handlers,
            while time.monotonic() < until:  # and time for the other thread to take the signal
                pass
            seen.append("update done")
        seen.append("after")
    finally:
        signal.signal(signal.SIGTERM, previous)
        idle.set()
    assert seen == ["update done", "signal", "after"]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_ctrl_c_during_the_optimizer_step_counts_that_step(tmp_path, monkeypatch, capsys):
    """Ctrl-C inside step 3's weight update: the update finishes, step 3 is saved as done, and a
    resume ends where an uninterrupted run does (not running step 3 twice)."""
    import os
    import signal

    train(small_cfg(out_dir=str(tmp_path / "a"), steps=5), progress=False)
    real_step, calls = torch.optim.AdamW.step, []

    def step_with_ctrl_c(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_with_ctrl_c)
    cfg = small_cfg(out_dir=str(tmp_path / "b"), steps=5, checkpoint_every=5)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # CI may start with it ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
    finally:
        signal.signal(signal.SIGINT, previous)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 3 and len(calls) == 3
    assert "interrupted after step 3" in capsys.readouterr().err
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    train(cfg, resume=True, progress=False)
    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\nqwerty = 1\n")
    with pytest.raises(UserError, match=r"unknown training option\(s\) qwerty, stepz \(did you mean steps\?\);"):
        TrainConfig.from_toml(bad)
    with pytest.raises(UserError, match="not found"):
        TrainConfig.from_toml(tmp_path / "none.toml")
    with pytest.raises(UserError, match="no checkpoint"):
        train(small_cfg(out_dir=str(tmp_path / "c")), resume=True, progress=False)


@pytest.mark.parametrize("text,needle", [
    ("[train]\nsteps = \"five\"\n", "steps = 'five' must be int"),
    ("[train]\nbatch_size = 0\n", "batch_size = 0 is out of range"),
    ("[train]\nlog_every = 0\n", "log_every = 0 is out of range"),
    ("[train]\nsteps = -5\n", "steps = -5 is out of range"),
    ("[train]\nmin_frames = 8\nmax_frames = 4\n", "min_frames = 8 is out of range (max_frames is 4)"),
    ("[train]\njpeg_prob = 2.0\n", "jpeg_prob = 2.0 is out of range"),
    ("[train]\nshort_prob = 1.5\n", "short_prob = 1.5 is out of range"),
    ("[train]\nshort_frames = 0\n", "short_frames = 0 is out of range"),
    ("[train]\nsteps = 100\nstop_step = 101\n", "stop_step = 101 is out of range"),
    ("[train]\nsteps = 100\nwarmup_steps = 10\ndecay_steps = 91\n", "decay_steps = 91 is out of range"),
    ("[train]\ndecay_steps = -1\n", "decay_steps = -1 is out of range"),
    ("train = 5\n", "train must be a table"),
    ("steps = 5\n[train]\nseed = 1\n", "steps outside [train]"),
    ("[train]\nseed = 1\n[model]\nfoo = 1\n", "model outside [train]"),
    ("[train]\nmodel = {decoder_layer = 3}\n", "model.decoder_layer is not a SpaceVLLM config field"),
    ("[train]\nmodel = {text_config = {hiden_size = 8}}\n", "model.text_config.hiden_size"),
    ("[train]\ntrain_only = \"decoder\"\n",
     "train_only = 'decoder' is out of range; known: '', 'space_decoder', 'box_refiner', 'temporal_presence'"),
    ("[train]\ntrain_only = \"box_refiner\"\nmodel = {box_refiner = {}}\n", "set init_from to that model's folder"),
    ("[train]\ntrain_only = \"box_refiner\"\ninit_from = \"m\"\n", "needs the part itself: add model.box_refiner"),
    ("[train]\ntrain_only = [\"box_refiner\", \"box_refiner\"]\n",
     "train_only = ['box_refiner', 'box_refiner'] is out of range"),
    ("[train]\ntrain_only = [\"box_refiner\", \"\"]\n", "train_only = ['box_refiner', ''] is out of range"),
    ("[train]\ntrain_only = 3\n", "train_only = 3 must be a string or a list of strings"),
    ("[train]\ntrain_only = [\"space_decoder\", \"box_refiner\"]\n",
     "train_only = ['space_decoder', 'box_refiner'] is out of range"),
    ("[train]\ntrain_only = \"space_decoder\"\n", "set init_from to that model's folder"),
    ("[train]\ntrain_only = [\"box_refiner\", \"temporal_presence\"]\ninit_from = \"m\"\nmodel = {box_refiner = {}}\n",
     "needs the part itself: add model.temporal_presence"),
    ("[train]\nmodel = {box_refiner = {crops = 3}}\n", "model.box_refiner has no setting 'crops'"),
    ("[train]\nmodel = {box_refiner = 3}\n", "model.box_refiner must be a table"),
])
def test_config_values_are_checked(tmp_path, text, needle):
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(UserError, match=re.escape(needle)):
        TrainConfig.from_toml(p)


def test_learning_rate_schedule_with_and_without_a_decay_phase():
    """decay_steps = 0 is the cosine over the whole run after warm-up; decay_steps = D holds the peak
    and runs the same cosine over the last D steps only."""
    import math

    from stgcli.train import _lr_at

    whole = TrainConfig(steps=1000, warmup_steps=100, lr=4e-4, min_lr_ratio=0.05)
    assert _lr_at(whole, 0) == pytest.approx(4e-6) and _lr_at(whole, 99) == pytest.approx(4e-4)
    for step in (100, 325, 550, 999):
        p = (step - 100) / 900
        assert _lr_at(whole, step) == pytest.approx(4e-4 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p))))
    held = TrainConfig(steps=1000, warmup_steps=100, lr=4e-4, min_lr_ratio=0.05, decay_steps=300)
    assert [_lr_at(held, s) for s in (0, 99)] == [_lr_at(whole, s) for s in (0, 99)]
    assert all(_lr_at(held, s) == pytest.approx(4e-4) for s in range(100, 701, 50))
    half = 4e-4 * (0.05 + 0.95 * 0.5)
    assert _lr_at(held, 850) == pytest.approx(half) and _lr_at(whole, 550) == pytest.approx(half)
    assert _lr_at(held, 1000) == pytest.approx(4e-4 * 0.05)
    lrs = [_lr_at(held, s) for s in range(700, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert TrainConfig(steps=1000, warmup_steps=100, decay_steps=900).check() is None  # the whole run: allowed


def test_binary_config_is_a_user_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_bytes(b"\x00\xff\xfe binary")
    with pytest.raises(UserError, match="not valid TOML"):
        TrainConfig.from_toml(p)


def test_out_dir_of_an_earlier_run_is_kept_and_broken_checkpoints_are_one_line(tmp_path, monkeypatch):
    from stgcli import train as train_module

    out = tmp_path / "run"
    train(small_cfg(out_dir=str(out), steps=1), progress=False)
    model = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="holds an earlier run"):
        train(small_cfg(out_dir=str(out), steps=1, seed=7), progress=False)
    assert (out / "model" / "model.safetensors").read_bytes() == model  # the earlier model is untouched
    ckpt = out / "checkpoint"
    # a crash between the two renames of a checkpoint swap leaves only checkpoint.old: resume uses it
    ckpt.rename(out / "checkpoint.old")
    train(small_cfg(out_dir=str(out), steps=2), resume=True, progress=False)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "checkpoint.old").exists()
    # a stale checkpoint.old beside a good checkpoint does not break the next save
    shutil.copytree(ckpt, out / "checkpoint.old")
    train(small_cfg(out_dir=str(out), steps=3), resume=True, progress=False)
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    with pytest.raises(UserError, match="was trained with lr = 0.0006, this config says 0.002"):
        train(small_cfg(out_dir=str(out), steps=4, lr=2e-3), resume=True, progress=False)
    (ckpt / "optimizer.pt").write_bytes(b"junk")
    with pytest.raises(UserError, match="corrupt checkpoint"):
        train(small_cfg(out_dir=str(out), steps=4), resume=True, progress=False)
    (ckpt / "trainer_state.json").unlink()
    with pytest.raises(UserError, match="trainer_state.json missing"):
        train(small_cfg(out_dir=str(out), steps=4), resume=True, progress=False)
    train(small_cfg(out_dir=str(out), steps=1, seed=7), progress=False, force=True)  # --force starts over
    assert (out / "model" / "model.safetensors").read_bytes() != model
    # ... and the earlier run's model goes with it: one stopped before it wrote its own leaves none
    # (a later leg's init_from would have taken the earlier run's, silently)
    def stopped(*_args):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(train_module, "_batches", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(small_cfg(out_dir=str(out), steps=1, seed=8), progress=False, force=True)
    assert not (out / "model").exists() and not (out / "train_log.jsonl").exists()
    monkeypatch.undo()
    train(small_cfg(out_dir=str(out), steps=1), progress=False, force=True)
    kept = (out / "model" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="init_from lies in .*, the earlier run that --force replaces"):
        train(small_cfg(out_dir=str(out), steps=1, init_from=str(out / "model")), progress=False, force=True)
    assert (out / "model" / "model.safetensors").read_bytes() == kept  # a leg never deletes what it starts from
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="out_dir is a file"):
        train(small_cfg(out_dir=str(tmp_path / "file"), steps=1), progress=False)


def _spec_with(objects, w=160, h=160):
    from stgcli import synth

    return synth.ClipSpec(w, h, 10.0, 30, synth.Background("uniform"), objects, 0, "the red circle", "plain", False)


def _obj(shape, colour, x, y, side, motion="still", t_in=0.0, t_out=3.0):
    from stgcli import synth

    return synth.ShapeObject(shape, colour, synth.COLOURS[colour], side, motion, 0.0, x, y, t_in, t_out)


def test_patch_labels_mark_the_object_under_each_patch():
    from stgcli.synth import COLOURS, MOTIONS, SHAPES
    from stgcli.train import patch_labels

    # 4x4 grid of 40 px patches on a 160 px frame; patch centres at 20, 60, 100, 140 px.
    big = _obj("square", "blue", 10, 10, 100, motion="left")        # covers centres 20, 60, 100
    small = _obj("circle", "red", 125, 125, 10)                      # no patch centre inside: its centre patch
    top = _obj("triangle", "green", 50, 50, 20, t_in=1.0)            # drawn last, over `big`, from t = 1
    lab = patch_labels(_spec_with([big, small, top]), np.array([0.0, 2.0]), 4).reshape(2, 4, 4, 3)
    blue = (list(COLOURS).index("blue") + 1, SHAPES.index("square") + 1, MOTIONS.index("left") + 1)
    red = (list(COLOURS).index("red") + 1, SHAPES.index("circle") + 1, MOTIONS.index("still") + 1)
    green = (list(COLOURS).index("green") + 1, SHAPES.index("triangle") + 1, MOTIONS.index("still") + 1)
    t0 = {(r, c): tuple(lab[0, r, c]) for r in range(4) for c in range(4)}
    assert {k for k, v in t0.items() if v == blue} == {(r, c) for r in range(3) for c in range(3)}
    assert t0[(3, 3)] == red
    assert sum(v == (0, 0, 0) for v in t0.values()) == 16 - 9 - 1
    assert tuple(lab[1, 1, 1]) == green       # visible now and drawn on top of the blue square
    assert tuple(lab[1, 0, 0]) == blue


def test_attribute_loss_and_motion_features(tmp_path):
    """With attr_classes / attr_weight the loss gains a patch-wise attribute cross-entropy that
    reaches the vision tower; with motion_features a frame's boxes depend on its neighbours."""
    from tests.test_model import SMALL

    cfg = small_cfg(model=dict(SMALL, attr_classes=[5, 4, 6], attr_weight=0.5, motion_features=True))
    model, proc = new_tiny_model(cfg, seed=0)
    model.train()
    batch = make_batch(cfg, proc, step=0)
    assert batch["patch_labels"].shape[:3] == batch["pixel_values_videos"].shape[:2] + (16,)
    out, _, _ = model.ground_forward(**batch)
    assert 0 < out.attr_loss.item() < 3 * np.log(6)
    torch.testing.assert_close(out.loss, out.lm_loss + out.box_loss + out.presence_loss + 0.5 * out.attr_loss)
    out.loss.backward()
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert model.space_decoder.attr_head.weight.grad.abs().sum() > 0

    model.eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.space_decoder.motion_conv.weight, std=0.5)
        boxes = model.ground_forward(**batch)[0].boxes
        later = batch["pixel_values_videos"].clone()
        later[:, 2] = later[:, 2].flip(-1)  # change frame 2 only
        moved = model.ground_forward(**{**batch, "pixel_values_videos": later})[0].boxes
        model.config.motion_features = False
        plain = [model.ground_forward(**{**batch, "pixel_values_videos": p})[0].boxes for p in (
            batch["pixel_values_videos"], later)]
    # The language model is causal, so frames 0 and 1 (their query tokens come before frame 2's
    # tokens) can only learn of frame 2 through the motion features; frame 1 is its neighbour.
    assert not torch.allclose(boxes[:, 1], moved[:, 1])
    torch.testing.assert_close(boxes[:, 0], moved[:, 0])
    torch.testing.assert_close(plain[0][:, :2], plain[1][:, :2])


def test_init_from_an_earlier_leg_at_a_larger_input_size(tmp_path):
    """init_from starts a run from an earlier model: every weight carries over, and the per-patch
    position embeddings are resized over the grid when the input size grew (4x4 -> 6x6 patches);
    a model of another shape is one clear error."""
    from tests.test_model import SMALL

    train(small_cfg(out_dir=str(tmp_path / "leg1"), steps=2), progress=False)
    src = tmp_path / "leg1" / "model"
    from stgcli.models.spacevllm import SpaceVLLMForConditionalGeneration
    from stgcli.train import GRID_TENSORS, init_weights
    old = SpaceVLLMForConditionalGeneration.from_pretrained(src).state_dict()

    big = dict(SMALL, vision_config={**SMALL["vision_config"], "image_size": 96})
    model, proc = new_tiny_model(small_cfg(model=big), 0)
    init_weights(model, src)
    new = model.state_dict()
    for name, w in old.items():
        if name in GRID_TENSORS:
            assert w.shape[0] == 16 and new[name].shape == (36,) + w.shape[1:]
            # a bicubic resize keeps the grid's mean and its spatial order: top-left stays top-left
            torch.testing.assert_close(new[name].mean(0), w.mean(0), atol=0.05 * float(w.abs().max()), rtol=0)
            assert torch.corrcoef(torch.stack([new[name][0], w[0]]))[0, 1] > 0.9
        else:
            torch.testing.assert_close(new[name], w, rtol=0, atol=0, msg=name)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()

    # and a whole run from it: trains at the new size, its processor at the new size too
    out = train(small_cfg(out_dir=str(tmp_path / "leg2"), steps=1, model=big, init_from=str(src)), progress=False)
    assert json.loads((out / "processor_config.json").read_text())["image_size"] == 96

    wider = dict(SMALL, decoder_hidden_size=48)
    with pytest.raises(UserError, match="space_decoder.*init_from needs the same model"):
        init_weights(new_tiny_model(small_cfg(model=wider), 0)[0], src)
    with pytest.raises(UserError, match="init_from needs a model folder"):
        init_weights(model, tmp_path)


def test_init_from_may_switch_on_motion_features_and_starts_where_the_earlier_model_was(tmp_path):
    """A later leg may add the optional decoder parts (motion_features here): they start fresh, the
    motion path at zero, so the new model's outputs are the earlier model's until training moves
    it; a missing tensor of any other part is refused."""
    from stgcli.models.spacevllm import SpaceVLLMForConditionalGeneration
    from stgcli.train import init_weights
    from tests.test_model import SMALL

    train(small_cfg(out_dir=str(tmp_path / "leg1"), steps=2), progress=False)
    src = tmp_path / "leg1" / "model"
    old = SpaceVLLMForConditionalGeneration.from_pretrained(src).eval()
    cfg = small_cfg(model=dict(SMALL, motion_features=True))
    model, proc = new_tiny_model(cfg, 0)
    init_weights(model, src)
    model.eval()
    batch = make_batch(cfg, proc, step=3)
    with torch.no_grad():
        a, b = old.ground_forward(**batch)[0], model.ground_forward(**batch)[0]
    torch.testing.assert_close(b.boxes, a.boxes)
    torch.testing.assert_close(b.presence_logits, a.presence_logits)
    assert model.space_decoder.motion_in.weight.abs().sum() > 0  # fresh, not zero: the conv learns from it

    out = train(small_cfg(out_dir=str(tmp_path / "leg2"), steps=2, model=dict(SMALL, motion_features=True),
                          init_from=str(src)), progress=False)
    leg2 = SpaceVLLMForConditionalGeneration.from_pretrained(out)
    assert leg2.config.motion_features and leg2.space_decoder.motion_conv.weight.abs().sum() > 0  # it trained

    deeper = dict(SMALL, decoder_layers=2)
    with pytest.raises(UserError, match="has no weight space_decoder.query_layers.1"):
        init_weights(new_tiny_model(small_cfg(model=deeper), 0)[0], src)


def test_a_box_refiner_leg_trains_the_refiner_alone(tmp_path):
    """train_only = "box_refiner": a leg on top of a trained model adds the refiner and trains it
    alone on rough boxes drawn around the true ones; the rest of the model stays exactly as it was,
    the refiner's loss falls, and a stopped and resumed leg ends on the uninterrupted one's weights
    (the rough boxes are a function of (seed, step), as the batches are)."""
    from tests.test_model import REFINER, SMALL

    train(small_cfg(out_dir=str(tmp_path / "leg1"), steps=2), progress=False)
    src = tmp_path / "leg1" / "model"
    leg = dict(init_from=str(src), train_only="box_refiner", model=dict(SMALL, box_refiner=REFINER), steps=40,
               lr=3e-3, warmup_steps=2, batch_size=4, checkpoint_every=100)
    out = train(small_cfg(out_dir=str(tmp_path / "a"), **leg), progress=False)
    before, after = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    new = sorted(set(after) - set(before))
    assert new and all(k.startswith("space_decoder.refiner.") for k in new)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41)) and "lm" not in log[0]
    first, last = (np.mean([r["refine"] for r in log[a:b]]) for a, b in ((0, 5), (-5, None)))
    assert last < 0.8 * first

    train(small_cfg(out_dir=str(tmp_path / "b"), stop_step=20, **leg), progress=False)
    out_b = train(small_cfg(out_dir=str(tmp_path / "b"), **leg), resume=True, progress=False)
    resumed = load_file(out_b / "model.safetensors")
    for k in after:
        torch.testing.assert_close(resumed[k], after[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.fixture(scope="module")
def leg1(tmp_path_factory):
    """A small trained model for the legs that train part of one."""
    out = tmp_path_factory.mktemp("leg1")
    return train(small_cfg(out_dir=str(out), steps=2), progress=False)


def _part_leg(src, out_dir, **kw):
    """Train a leg on `src`: (weights before, weights after, the leg's log records)."""
    out = train(small_cfg(out_dir=str(out_dir), init_from=str(src), **kw), progress=False)
    log = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return load_file(src / "model.safetensors"), load_file(out / "model.safetensors"), log


def test_a_temporal_presence_leg_trains_that_part_alone(tmp_path, leg1):
    """train_only = "temporal_presence": the frozen model runs forward, the part learns from the
    presence loss alone; every other weight stays as it was, and the log holds that loss only."""
    from tests.test_model import SMALL

    before, after, log = _part_leg(leg1, tmp_path / "a", train_only="temporal_presence",
                                   model=dict(SMALL, temporal_presence={"layers": 1, "heads": 2}), steps=6, lr=3e-3)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert after["space_decoder.temporal.out.weight"].abs().sum() > 0  # started at zero, trained
    assert set(log[0]) == {"step", "loss", "presence", "elapsed_s"} and log[0]["loss"] == log[0]["presence"]


def test_a_box_verifier_leg_trains_that_part_alone(tmp_path, leg1):
    """train_only = "box_verifier": the frozen model runs forward (the verifier reads the language
    model's sentence states), the part learns from its own loss alone from every object of the
    drawn clips; every other weight stays as it was, and the log holds that loss only."""
    from tests.test_model import SMALL, VERIFIER

    before, after, log = _part_leg(leg1, tmp_path / "v", train_only="box_verifier",
                                   model=dict(SMALL, box_verifier=VERIFIER), steps=4, lr=3e-3)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    new = sorted(set(after) - set(before))
    assert new and all(k.startswith("space_decoder.verifier.") for k in new)
    assert set(log[0]) == {"step", "loss", "verify", "elapsed_s"} and log[0]["loss"] == log[0]["verify"]


def test_object_boxes_are_every_object_of_the_clip_on_the_sampled_frames():
    """The verifier's training targets: each object's box on each sampled frame (normalised, in the
    frame), visible while the spec says so, the target flagged, padded to MAX_OBJECTS."""
    from stgcli.synth import sample_clip
    from stgcli.train import MAX_OBJECTS, object_boxes

    spec = sample_clip(np.random.default_rng(5))
    times = np.linspace(0, spec.duration, 7)
    got = object_boxes(spec, times)
    assert got["obj_boxes"].shape == (7, MAX_OBJECTS, 4) and got["obj_target"].sum() == 1
    assert got["obj_target"][spec.target]
    for m, o in enumerate(spec.objects):
        for i, t in enumerate(times):
            assert got["obj_visible"][i, m] == o.visible(t)
            want = np.clip(np.array(o.box(t)) / [spec.width, spec.height, spec.width, spec.height], 0, 1)
            np.testing.assert_allclose(got["obj_boxes"][i, m], want, rtol=1e-5)
    assert not got["obj_visible"][:, len(spec.objects):].any()


def test_two_parts_train_together_on_the_same_batches(tmp_path, leg1):
    """train_only = [both parts]: each learns from its own loss on the same batches, the loss is their
    sum, every other weight stays as it was; and the refiner ends exactly where a refiner-only leg with
    the same seed ends (its gradient, its clipping and its optimizer state are its own)."""
    from tests.test_model import REFINER, SMALL

    parts = dict(box_refiner=REFINER, temporal_presence={"layers": 1, "heads": 2})
    leg = dict(model=dict(SMALL, **parts), steps=6, lr=3e-3, warmup_steps=2, batch_size=2)
    before, after, log = _part_leg(leg1, tmp_path / "both", train_only=["box_refiner", "temporal_presence"], **leg)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert after["space_decoder.temporal.out.weight"].abs().sum() > 0  # started at zero, trained
    assert set(log[0]) == {"step", "loss", "presence", "refine", "elapsed_s"}
    assert all(abs(r["loss"] - r["presence"] - r["refine"]) < 2e-4 for r in log)

    refined = _part_leg(leg1, tmp_path / "alone", train_only="box_refiner", **leg)[1]
    ref_keys = [k for k in after if k.startswith("space_decoder.refiner.")]
    assert ref_keys
    for k in ref_keys:
        torch.testing.assert_close(after[k], refined[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_space_decoder_leg_trains_the_decoder_on_the_frozen_language_model(tmp_path, leg1):
    """train_only = "space_decoder": the whole decoder (its added parts included) learns from every
    loss but the language model's, which is logged and left out of the loss; nothing outside the
    decoder moves."""
    from tests.test_model import REFINER, SMALL

    before, after, log = _part_leg(leg1, tmp_path / "a", train_only="space_decoder",
                                   model=dict(SMALL, box_refiner=REFINER), steps=4, lr=3e-3, warmup_steps=1,
                                   batch_size=2)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("space_decoder.") for k in moved)
    assert "space_decoder.query_proj.weight" in moved
    assert any(k.startswith("space_decoder.refiner.") for k in after)
    cfg = json.loads((tmp_path / "a" / "model" / "config.json").read_text())
    assert cfg["mid_presence_layer"] == 0 and cfg["attr_weight"] == 0  # (their losses are not logged)
    for r in log:
        rest = (r["box"] + cfg["presence_weight"] * r["presence"] + r["refine"]
                + cfg["point_weight"] * r.get("point", 0.0))
        assert r["lm"] > 0.1 and abs(r["loss"] - rest) < 2e-3


def _toml(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value)


def _train_toml(fields: dict) -> str:
    """A training config file's text: a [train] table of `fields`, `model` as an inline table."""
    return "[train]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in fields.items())


def test_stg_train_command_output(tmp_path, capsys):
    """`stg train`: stdout names the model folder; stderr holds the training bar and stg's own lines,
    not transformers' loading and saving bars (they broke the bar's line on every checkpoint)."""
    from stgcli.cli import main
    from tests.test_model import SMALL

    leg1 = tmp_path / "leg1.toml"
    fields = dict(out_dir=(tmp_path / "a").as_posix(), steps=2, batch_size=2, num_frames=4, min_frames=4,
                  max_frames=4, data_workers=0, checkpoint_every=1, model=SMALL)
    leg1.write_text(_train_toml(fields))
    leg2 = tmp_path / "leg2.toml"
    leg2.write_text(_train_toml(dict(fields, out_dir=(tmp_path / "b").as_posix(),
                                     init_from=(tmp_path / "a" / "model").as_posix())))
    for cfg, out in ((leg1, "a"), (leg2, "b")):
        main(["train", "--config", str(cfg)])  # returns on success (a user error exits 2)
        stdout, stderr = capsys.readouterr()
        assert stdout.strip() == f"model written to {tmp_path / out / 'model'}"
        assert "train" in stderr and "Writing model shards" not in stderr and "Loading weights" not in stderr


def test_every_committed_training_config_loads():
    """A typo in an example config (a misspelt field, a model override that no longer exists) fails
    here, not an hour into someone's run; and the config that made the built-in model builds it."""
    from pathlib import Path

    from stgcli.weights import load_model

    examples = sorted((Path(__file__).resolve().parent.parent / "examples").glob("train-*.toml"))
    assert len(examples) >= 2
    for path in examples:
        cfg = TrainConfig.from_toml(path)
        assert cfg.steps > 0 and cfg.out_dir.startswith("runs/"), path.name
        new_tiny_model(cfg, 0)  # every model override builds
    built_in = load_model(None, device="cpu").model.config
    # the built-in model is train-tiny.toml, then train-tiny-motion.toml and train-tiny-decoder.toml, each
    # on top of the one before
    legs = [TrainConfig.from_toml(examples[0].parent / f"train-tiny{n}.toml") for n in ("", "-motion", "-decoder")]
    for before, leg in zip(legs, legs[1:]):
        assert leg.init_from == before.out_dir + "/model"
    last = legs[-1]
    made = new_tiny_model(last, 0)[0].config
    for field in ("motion_features", "attr_classes", "decoder_layers", "text_condition_layers", "box_refiner",
                  "temporal_presence"):
        assert getattr(made, field) == getattr(built_in, field), field
    assert made.vision_config.image_size == built_in.vision_config.image_size
    assert made.text_config.hidden_size == built_in.text_config.hidden_size


def test_sigterm_to_the_process_group_saves_the_steps(tmp_path):
    """A job scheduler's SIGTERM (or a terminal's Ctrl-C) reaches the data worker too. A worker the
    signal killed first made torch raise in the middle of the trainer's save: a torn checkpoint.tmp,
    a traceback, and every step since the last checkpoint lost. Now the worker leaves the signal to
    the trainer, which saves where it is and says how to go on."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    cfg = small_cfg(out_dir=str(tmp_path / "run"), steps=500, data_workers=1, checkpoint_every=1000)
    (tmp_path / "cfg.toml").write_text(_train_toml(dataclasses.asdict(cfg)))
    proc = subprocess.Popen([sys.executable, "-m", "stgcli", "train", "--config", str(tmp_path / "cfg.toml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and not re.search(r"\b([3-9]|\d\d+)/500\b", "".join(err)):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
        reader.join(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = "".join(err)
    assert proc.returncode == 143, text[-2000:]
    assert "Traceback" not in text and "DataLoader worker" not in text, text[-2000:]
    said = re.search(r"interrupted after step (\d+); saved a checkpoint there", text)
    assert said, text[-2000:]
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == int(said.group(1)) >= 3
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
