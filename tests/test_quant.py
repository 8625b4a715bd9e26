"""4-bit NF4 and 8-bit LLM.int8 loading of the built-in model through BitsAndBytesConfig, on CPU:
the language model's linear layers are quantized, the rest is not, and the answers agree with fp32."""
from __future__ import annotations

import json

import pytest

from stgcli.pipeline import ground
from stgcli.weights import load_model
from tests.test_cli import EXAMPLE, agreement, assert_user_error, run

pytest.importorskip("bitsandbytes")  # a declared dependency; absent only on a broken install


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from stgcli.synth import synth_dataset

    d = tmp_path_factory.mktemp("quant")
    manifest = synth_dataset(d / "clips", 4, seed=37, progress=False)
    return [(str(d / "clips" / r["video"]), r["query"]) for r in map(json.loads, manifest.read_text().splitlines())]


@pytest.fixture(scope="module")
def fp32():
    return load_model(device="cpu")


@pytest.mark.parametrize("quant,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_model_agrees_with_fp32(clips, fp32, quant, layer):
    q = load_model(device="cpu", quant=quant)
    assert q.quantization == quant and q.sha256 == fp32.sha256
    lm = q.model.model.language_model
    assert type(lm.layers[0].mlp.gate_proj).__name__ == layer
    assert type(lm.layers[0].self_attn.q_proj).__name__ == layer
    for kept in (q.model.model.vision_tower, q.model.model.multi_modal_projector, q.model.space_decoder):
        assert not any(type(m).__name__ == layer for m in kept.modules())  # left unquantized
    assert type(q.model.lm_head).__name__ == "Linear"

    tious, ious = agreement(fp32, q, clips)
    assert all(ground(v, t, model=q).model.quantization == quant for v, t in clips[:1])
    print(f"{quant}: tIoU {[round(x, 3) for x in tious]}, "
          f"mean box IoU {sum(ious) / len(ious):.4f} over {len(ious)} frames")
    assert len(tious) >= 3  # the comparison is not vacuous
    assert min(tious) >= 0.9, tious
    assert sum(ious) / len(ious) >= 0.8, ious


def test_ground_quant_on_cpu_is_recorded(capsys):
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the red circle", "--quant", "4bit", "--device", "cpu",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["model"]["quantization"] == "4bit"
    assert "MatMul" not in err and "Traceback" not in err


def test_bitsandbytes_logs_nothing_on_stderr(tmp_path):
    """On a CPU with AVX512-BF16, importing bitsandbytes logs a suggestion to `pip install kernels` (a kernel
    fetched from the Hub at run time); a user's stderr holds stg's own lines only."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "stgcli", "ground", str(EXAMPLE), "the red circle", "--quant", "4bit",
                        "--device", "cpu", "--out", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""


def test_quant_without_accelerate_is_one_line(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    code, out, err = run(capsys, "ground", str(EXAMPLE), "the red circle", "--quant", "8bit", "--device", "cpu")
    assert_user_error(code, err, "--quant 8bit needs accelerate", "pip install accelerate")
