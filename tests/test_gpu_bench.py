"""benchmarks/gpu_7b.py: its pure parts and its tiny CPU mode (the GPU figures need an H100)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_7b", ROOT / "benchmarks" / "gpu_7b.py")
gpu_7b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_7b)


def test_flops_of_a_64_frame_clip_match_the_7b_shapes():
    from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config

    cfg = spacevllm_7b_config()
    proc = gpu_7b.make_processor(cfg)
    ids, mask = proc.encode_prompt("the man in red who picks up the cup", [i * 0.5 for i in range(64)])
    assert ids.count(cfg.query_token_index) == 64 and ids.count(cfg.video_token_index) == 64 * 196 + 1
    flops = gpu_7b.clip_flops(cfg, 64, len(ids))
    # ~7B params x 2 x ~13k prompt tokens dominates: 150-300 TFLOP; vision 64 frames x 729 patches adds ~50
    assert 150e12 < flops < 350e12
    assert gpu_7b.clip_flops(cfg, 32, len(ids) // 2) < flops / 1.8


def test_tiny_mode_runs_on_cpu_and_writes_no_rows(tmp_path, monkeypatch):
    results = tmp_path / "gpu_7b.json"
    monkeypatch.setattr(gpu_7b, "RESULTS", results)
    rows = gpu_7b.main(["--config", "tiny", "--frames", "4", "--batch", "2", "--batches", "1", "--device", "cpu"])
    assert len(rows) == 1 and not results.exists()
    row = rows[0]
    for k in ("device", "quant", "frames", "peak_mem_gib", "latency_s", "throughput_clips_s", "floor_s", "date"):
        assert k in row
    assert row["device"] == "cpu" and row["quant"] == "none" and row["frames"] == 4
    assert set(row["stages_s"]) == {"vision", "prefill", "generate", "space_decoder"}
    assert row["latency_s"] == pytest.approx(sum(row["stages_s"].values()), abs=1e-3)
    assert row["throughput_clips_s"] > 0 and 0 < row["floor_s"] < row["latency_s"]


def test_full_size_refuses_cpu_and_rows_append(tmp_path):
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_7b.main(["--config", "7b", "--device", "cpu"])
    path = tmp_path / "r.json"
    gpu_7b.append_rows([{"quant": "4bit"}], path)
    gpu_7b.append_rows([{"quant": "8bit"}], path)
    assert [r["quant"] for r in json.loads(path.read_text())] == ["4bit", "8bit"]
