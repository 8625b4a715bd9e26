"""Full-size SpaceVLLM-7B on one GPU: memory, per-stage latency, throughput and the FLOP floor.

Builds the architecture with random weights from config alone (no download; the shapes of
LLaVA-Video-7B-Qwen2 via `spacevllm_7b_config`), quantizes the language model like `load_model`
does (NF4 + double quant / LLM.int8 / bf16; vision tower, projector, space decoder, embeddings
and lm_head stay bf16) and grounds synthetic 64-frame clips with the answer fixed at 16 generated
tokens. Reports

* peak GPU memory (weights + everything one clip needs),
* per-stage latency of one clip: vision tower + projector, LLM prefill, 16-token generation,
  space decoder; `latency_s` is their sum (video decoding excluded: pixels are made in memory),
* batched throughput: `--batch` clips per forward while a CPU thread prepares the next batch's
  frames (resize + normalise from 640x360, standing in for video decoding), overlapped,
* the floor: the clip's FLOPs divided by the measured bf16 matmul rate of this GPU.

    python benchmarks/gpu_7b.py                       # 4bit, 8bit, bf16 at 64 frames; appends rows
    python benchmarks/gpu_7b.py --quant 4bit --frames 32 --batch 8
    python benchmarks/gpu_7b.py --config tiny         # same code on a CPU with a small config (no rows written)

Rows are appended to benchmarks/results/gpu_7b.json only for the full-size config on CUDA:
{"device", "quant", "frames", "peak_mem_gib", "latency_s", "throughput_clips_s", "floor_s", "date"}
plus "stages_s", "batch", "tokens", "matmul_tflops" for context. Targets on one H100 at 4-bit:
peak <= 8 GiB, <= 1.0 s per 64-frame clip, >= 2 clips/s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import threading
import time
from pathlib import Path
from queue import Queue

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

RESULTS = HERE / "results" / "gpu_7b.json"
ANSWER_TOKENS = 16
TARGETS = {"peak_mem_gib": 8.0, "latency_s": 1.0, "throughput_clips_s": 2.0}  # H100, 4-bit, 64 frames


def tiny_bench_config():
    """A small config with the 7B's structure (SigLIP + 2x2 pooling + Qwen2 + decoder), for CPU runs."""
    from stgcli.models.spacevllm import SpaceVLLMConfig

    return SpaceVLLMConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14,
                           vision_use_head=False),
        text_config=dict(model_type="qwen2", vocab_size=1024, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0),
        image_token_index=1000, video_token_index=1001, query_token_index=1002, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=False, decoder_hidden_size=32,
        decoder_layers=1, decoder_heads=2, num_frames=8, time_decimals=2)


class _WordTokenizer:
    """Just enough tokenizer for SpaceVLLMProcessor.encode_prompt: one id per word (a real Qwen2
    tokenizer gives a similar count for English), ids kept clear of the special tokens."""

    def __init__(self, config):
        self.special = {"<video>": config.video_token_index, "<stq>": config.query_token_index,
                        "<image>": config.image_token_index}
        self.top = min(self.special.values())
        self.eos_token_id = config.text_config.eos_token_id

    def convert_tokens_to_ids(self, tok: str) -> int:
        return self.special[tok]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + sum(map(ord, w)) * 7919 % (self.top - 3) for w in text.split()]


def make_processor(config):
    from stgcli.convert import PROMPT_7B
    from stgcli.models.spacevllm import SpaceVLLMProcessor
    from stgcli.models.spacevllm.processing_spacevllm import ProcessorSettings

    vc = config.vision_config
    settings = ProcessorSettings(image_size=vc.image_size, patch_size=vc.patch_size,
                                 time_decimals=config.time_decimals, **PROMPT_7B)
    return SpaceVLLMProcessor(_WordTokenizer(config), settings)


def clip_flops(config, frames: int, prompt_tokens: int, answer_tokens: int = ANSWER_TOKENS) -> float:
    """Multiply-adds x 2 of one clip: vision tower + projector on every frame, LLM prefill over the
    prompt (linear layers + causal attention), answer generation, space decoder."""
    v, t = config.vision_config, config.text_config
    p = (v.image_size // v.patch_size) ** 2
    vh, vi = v.hidden_size, v.intermediate_size
    vision = frames * v.num_hidden_layers * (2 * p * (4 * vh * vh + 2 * vh * vi) + 4 * p * p * vh)
    h, inter = t.hidden_size, t.intermediate_size
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    proj = frames * 2 * p * (vh * h + h * h)
    per_tok = 2 * (h * (h + 2 * kv) + h * h + 3 * h * inter)  # one layer's linears
    n = prompt_tokens
    prefill = t.num_hidden_layers * (n * per_tok + 2 * n * n * h)  # causal: half of 4 n^2 h
    gen = answer_tokens * (t.num_hidden_layers * (per_tok + 4 * (n + answer_tokens) * h) + 2 * h * t.vocab_size)
    d = config.decoder_hidden_size
    decoder = frames * 2 * (p * h * d + p * d * d * 12 * (config.decoder_layers + config.text_condition_layers))
    return float(vision + proj + prefill + gen + decoder)


def matmul_tflops(device: str, dtype, n: int = 8192, iters: int = 20) -> float:
    """Measured dense matmul rate (TFLOP/s) at `dtype` on `device`: the denominator of the floor."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_random_model(config, quant: str, device: str, dtype):
    """The model with random weights (the model's own init), built straight on `device` at `dtype`
    (no checkpoint, no fp32 copy: 15 GiB of bf16 for the 7B); then the language model's linear
    layers are swapped for bitsandbytes ones (4bit / 8bit), one at a time."""
    import torch

    from stgcli.models.spacevllm import SpaceVLLMForConditionalGeneration

    prev = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = SpaceVLLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(prev)
    if quant != "none":
        _quantize_llm(model.model.language_model, quant, device)
    model.eval()
    return model


def _quantize_llm(language_model, quant: str, device: str) -> None:
    """Swap every nn.Linear of the language model for bitsandbytes' NF4 (double quant, bf16 compute)
    or LLM.int8 layer, quantizing from the random bf16 weight (the same kernels load_model uses)."""
    import bitsandbytes as bnb
    import torch
    from torch import nn

    for parent in list(language_model.modules()):
        for cname, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            w = child.weight.data
            if quant == "4bit":
                new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                        compute_dtype=torch.bfloat16, quant_type="nf4", compress_statistics=True,
                                        device="meta")
                new.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4",
                                               compress_statistics=True, module=new).to(device)
            else:
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=6.0, device="meta")
                new.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False).to(device)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, cname, new)
            del child, w
    torch.cuda.empty_cache()


def make_batch(processor, config, frames: int, batch: int, device: str, dtype, pixels=None):
    """Inputs for `batch` identical-length clips: prompt ids, sentence mask, pixels."""
    import numpy as np
    import torch

    times = [round(i * 0.5, 2) for i in range(frames)]
    ids, text_mask = processor.encode_prompt("the man in the red shirt who picks up the blue cup", times)
    s = processor.settings.image_size
    if pixels is None:
        rng = np.random.default_rng(0)
        pixels = np.stack([processor.preprocess_frames(rng.integers(0, 255, (frames, s, s, 3), dtype=np.uint8))
                           for _ in range(batch)])
    ids_t = torch.tensor([ids] * batch, device=device)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t),
            "text_mask": torch.tensor([text_mask] * batch, device=device),
            "pixel_values_videos": torch.from_numpy(pixels).to(device, dtype)}


def run_stages(model, inputs: dict, answer_tokens: int = ANSWER_TOKENS) -> dict[str, float]:
    """One grounding pass split into timed stages (same computation as ground_forward + ground)."""
    from stgcli.models.spacevllm.modeling_spacevllm import _CACHE, _cache_of

    import torch

    device = str(inputs["input_ids"].device)
    cfg = model.config
    out: dict[str, float] = {}

    def tick(name, t0):
        _sync(device)
        out[name] = time.perf_counter() - t0
        return time.perf_counter()

    with torch.inference_mode():
        _sync(device)
        t = time.perf_counter()
        video_out, patches = model.encode_video(inputs["pixel_values_videos"])
        t = tick("vision", t)
        lm = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         mm_encoder_outputs={"video": video_out}, use_cache=True)
        hidden = lm.last_hidden_state
        next_tok = model.lm_head(hidden[:, -1]).argmax(-1)
        t = tick("prefill", t)
        past, mask = _cache_of(lm), inputs["attention_mask"]
        for _ in range(answer_tokens):  # fixed length: no early stop at EOS
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            step = model.model.language_model(input_ids=next_tok[:, None], attention_mask=mask,
                                              use_cache=True, **{_CACHE: past})
            past = _cache_of(step)
            next_tok = model.lm_head(step.last_hidden_state[:, -1]).argmax(-1)
        t = tick("generate", t)
        b, f = patches.shape[:2]
        qmask = inputs["input_ids"] == cfg.query_token_index
        query_h = hidden[qmask].view(b, f, -1)
        text_h, text_pad = model._sentence_states(hidden, inputs["text_mask"])
        model.space_decoder(query_h.reshape(b * f, -1), patches.flatten(0, 1).to(hidden.dtype),
                            text_h.repeat_interleave(f, 0), text_pad.repeat_interleave(f, 0))
        tick("space_decoder", t)
    return out


def throughput(model, processor, config, frames: int, batch: int, n_batches: int, device: str, dtype) -> float:
    """Clips per second with frame preparation (resize + normalise from 640x360) for the next batch
    running in a CPU thread while the GPU works on the current one."""
    import numpy as np

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 255, (frames, 360, 640, 3), dtype=np.uint8)
    q: Queue = Queue(maxsize=2)

    def producer():
        for _ in range(n_batches):
            q.put(np.stack([processor.preprocess_frames(raw) for _ in range(batch)]))

    th = threading.Thread(target=producer, daemon=True)
    t0 = time.perf_counter()
    th.start()
    for _ in range(n_batches):
        pixels = q.get()
        run_stages(model, make_batch(processor, config, frames, batch, device, dtype, pixels=pixels))
    th.join()
    return batch * n_batches / (time.perf_counter() - t0)


def bench(config, quant: str, frames: int, device: str, batch: int = 4, n_batches: int = 3, repeats: int = 3,
          tflops: float | None = None) -> dict:
    """One row: build, warm up, time `repeats` single clips (median per stage), then throughput."""
    import statistics

    import torch

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model = build_random_model(config, quant, device, dtype)
    processor = make_processor(config)
    one = make_batch(processor, config, frames, 1, device, dtype)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    run_stages(model, one)  # warm-up (kernels, cuBLAS handles)
    runs = [run_stages(model, one) for _ in range(repeats)]
    stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    peak = torch.cuda.max_memory_allocated() / 1024**3 if cuda else None
    clips_s = throughput(model, processor, config, frames, batch, n_batches, device, dtype)
    tflops = tflops or matmul_tflops(device, dtype, n=8192 if cuda else 512, iters=20 if cuda else 5)
    n_tokens = one["input_ids"].shape[1]
    flops = clip_flops(config, frames, n_tokens)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return {
        "device": torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu",
        "quant": quant, "frames": frames,
        "peak_mem_gib": round(peak, 3) if peak is not None else None,
        "latency_s": round(sum(stages.values()), 4),
        "throughput_clips_s": round(clips_s, 3),
        "floor_s": float(f"{flops / (tflops * 1e12):.4g}"),
        "date": datetime.date.today().isoformat(),
        "stages_s": {k: round(v, 4) for k, v in stages.items()},
        "batch": batch, "tokens": int(n_tokens), "tflop_per_clip": float(f"{flops / 1e12:.4g}"),
        "matmul_tflops": float(f"{tflops:.4g}"),
    }


def append_rows(rows: list[dict], path: Path = RESULTS) -> None:
    """Append rows to the results list (the file is a JSON list; earlier runs are kept)."""
    old = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old + rows, indent=2) + "\n")


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["7b", "tiny"], default="7b")
    ap.add_argument("--quant", default="4bit,8bit,none", help="comma-separated: 4bit, 8bit, none (bf16)")
    ap.add_argument("--frames", type=int, default=None, help="frames per clip (default: 64; tiny: 8)")
    ap.add_argument("--batch", type=int, default=4, help="clips per forward in the throughput run")
    ap.add_argument("--batches", type=int, default=3, help="batches in the throughput run")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--no-write", action="store_true", help="print rows only")
    args = ap.parse_args(argv)

    import torch

    from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = spacevllm_7b_config() if args.config == "7b" else tiny_bench_config()
    frames = args.frames or (64 if args.config == "7b" else 8)
    quants = [q.strip() for q in args.quant.split(",") if q.strip()]
    if not device.startswith("cuda"):
        if args.config == "7b":
            sys.exit("gpu_7b.py: the full-size config needs a CUDA GPU; use --config tiny to check the code on a CPU")
        quants = ["none"]  # bitsandbytes kernels need CUDA
    tflops = None
    rows = []
    for q in quants:
        row = bench(config, q, frames, device, batch=args.batch, n_batches=args.batches, tflops=tflops)
        tflops = row["matmul_tflops"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    # Only real full-size GPU measurements go into the results file.
    if not args.no_write and args.config == "7b" and device.startswith("cuda"):
        append_rows(rows)
        print(f"appended {len(rows)} rows to {RESULTS}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
