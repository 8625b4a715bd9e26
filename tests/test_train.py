"""Training: deterministic for a seed, checkpoints, and --resume equal to an uninterrupted run."""
from __future__ import annotations

import json

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


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = small_cfg(out_dir=str(tmp_path / "a"), steps=4)
    train(straight, progress=False)

    first = small_cfg(out_dir=str(tmp_path / "b"), steps=4, max_minutes=1e-9)  # stops after step 1
    train(first, progress=False)
    state = json.loads((tmp_path / "b" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 1
    train(small_cfg(out_dir=str(tmp_path / "b"), steps=4), resume=True, progress=False)

    wa = load_file(tmp_path / "a" / "model" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in log)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nstepz = 3\n")
    with pytest.raises(UserError, match="unknown training option"):
        TrainConfig.from_toml(bad)
    with pytest.raises(UserError, match="not found"):
        TrainConfig.from_toml(tmp_path / "none.toml")
    with pytest.raises(UserError, match="no checkpoint"):
        train(small_cfg(out_dir=str(tmp_path / "c")), resume=True, progress=False)
