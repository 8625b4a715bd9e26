"""--dtype: what the unquantized weights compute in. float32 stays the CPU default; bfloat16 is the
opt-in that makes the built-in model faster on CPUs with bf16 instructions, with the same answers."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stgcli.pipeline import ground
from stgcli.weights import load_model, quantization_config, resolve_dtype
from tests.test_cli import EXAMPLE, agreement, assert_user_error, run


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from stgcli.synth import synth_dataset

    d = tmp_path_factory.mktemp("dtype")
    manifest = synth_dataset(d / "clips", 4, seed=38, progress=False)
    return [(str(d / "clips" / r["video"]), r["query"]) for r in map(json.loads, manifest.read_text().splitlines())]


def test_bfloat16_on_cpu_agrees_with_float32(clips):
    fp32, bf16 = load_model(device="cpu"), load_model(device="cpu", dtype="bfloat16")
    assert fp32.dtype == "float32" and bf16.dtype == "bfloat16"
    assert {p.dtype for p in fp32.model.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    video, query = clips[0]
    assert ground(video, query, model=bf16).model.dtype == "bfloat16"
    tious, ious = agreement(fp32, bf16, clips)
    assert len(tious) >= 3  # the comparison is not vacuous
    assert min(tious) >= 0.9, tious
    assert sum(ious) / len(ious) >= 0.9, ious


def test_the_library_and_cli_pass_dtype_on(capsys, tmp_path):
    res = ground(EXAMPLE, "the red circle", device="cpu", dtype="bfloat16")
    assert res.model.dtype == "bfloat16"
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the red circle", "--device", "cpu", "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["dtype"] == "float32"  # the CPU default is unchanged
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.mp4").symlink_to(EXAMPLE)
    out_path = tmp_path / "r.jsonl"
    code, _, err = run(capsys, "batch", str(tmp_path / "v"), "--query", "the red circle", "--out", str(out_path),
                       "--device", "cpu", "--dtype", "bfloat16", "--workers", "1")
    assert code == 0, err
    assert [json.loads(x)["model"]["dtype"] for x in out_path.read_text().splitlines()] == ["bfloat16"]


def test_eval_passes_dtype_on(capsys, tmp_path, clips):
    folder = Path(clips[0][0]).parent
    preds = tmp_path / "preds.jsonl"
    code, out, err = run(capsys, "eval", "--annotations", str(folder / "manifest.jsonl"), "--format", "stg",
                         "--videos", str(folder), "--out", str(preds), "--device", "cpu", "--dtype", "bfloat16",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == len(clips)
    assert {json.loads(x)["model"]["dtype"] for x in preds.read_text().splitlines()} == {"bfloat16"}


def test_float16_on_a_cpu_is_refused_in_one_line(capsys):
    code, _, err = run(capsys, "ground", str(EXAMPLE), "the red circle", "--device", "cpu", "--dtype", "float16")
    assert_user_error(code, err, "--dtype float16 on a CPU", "bfloat16 or float32")


def test_auto_picks_by_device(monkeypatch):
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    majors = {0: 8, 1: 7}  # an A100 beside a V100: each GPU is asked about itself
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: SimpleNamespace(major=majors[torch.device(d).index or 0]))
    assert resolve_dtype("auto", "cuda:0") is torch.bfloat16
    assert resolve_dtype("auto", "cuda:1") is torch.float16  # a T4 or V100: no bf16 units
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=7))
    assert resolve_dtype("auto", "cuda") is torch.float16
    assert resolve_dtype("float32", "cuda") is torch.float32
    with pytest.raises(Exception, match="expected one of auto, float32, bfloat16, float16"):
        resolve_dtype("fp8", "cpu")


def test_nf4_computes_in_the_chosen_dtype():
    pytest.importorskip("bitsandbytes")
    assert quantization_config("4bit", "cpu").bnb_4bit_compute_dtype is torch.float32
    assert quantization_config("4bit", "cpu", torch.bfloat16).bnb_4bit_compute_dtype is torch.bfloat16


def test_the_cli_offers_what_load_model_takes():
    """The CLI lists the choices itself (importing stgcli.weights would slow `stg --help`); they must agree."""
    from stgcli.cli import ground
    from stgcli.weights import DTYPES

    option = next(p for p in ground.params if p.name == "dtype")
    assert tuple(option.type.choices) == DTYPES
