"""A tiny random checkpoint in the LLaVA-NeXT layout of LLaVA-Video-7B-Qwen2, written without network.

Same tensor names, dtype (bf16), sharding (index + shards), config.json fields and tokenizer kind
(a byte-level BPE Qwen2 tokenizer with <|endoftext|>, <|im_start|>, <|im_end|>) as the real one,
at toy sizes. The SigLIP and Qwen2 tensors come from transformers' own modules, so their names
and shapes are exactly what LLaVA-NeXT saves.
"""
from __future__ import annotations

import json
from pathlib import Path

VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
              image_size=64, patch_size=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
# what the converter cannot read off the tensors at toy sizes (the 7B's head width is 72)
OVERRIDES = {"vision_config": {"num_attention_heads": 2}, "decoder_hidden_size": 32, "decoder_heads": 2,
             "decoder_layers": 1}
CORPUS = ["find when and where the red circle moves left", "the man in red picks up the cup",
          "from 1.5 to 3.25 seconds", "frames each after its timestamp in seconds answer as",
          "system you are a helpful assistant user video"] * 4


def build_tokenizer(directory: Path) -> int:
    """A byte-level BPE tokenizer saved as Qwen2's files are (tokenizer.json + vocab/merges +
    tokenizer_config.json naming Qwen2Tokenizer). Returns its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.add_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], special_tokens=True)
    fast.pad_token, fast.eos_token = "<|endoftext|>", "<|im_end|>"
    fast.save_pretrained(directory)
    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "Qwen2Tokenizer"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return len(fast)


def write_checkpoint(directory: Path, pad_rows: int = 16, seed: int = 0, extra_tensors: dict | None = None) -> dict:
    """Write the checkpoint; return {name: tensor} of every tensor written (bf16)."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    directory.mkdir(parents=True, exist_ok=True)
    n_tok = build_tokenizer(directory)
    rows = n_tok + pad_rows  # like 151,646 tokens in 152,064 rows
    torch.manual_seed(seed)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, tie_word_embeddings=False, **TEXT))
    siglip = SiglipVisionModel(SiglipVisionConfig(vision_use_head=False, **VISION))
    tensors = {k: v for k, v in qwen.state_dict().items()}
    # LLaVA-NeXT saves SigLIP as transformers v4 named it (`vision_model.` prefix; v5 drops it)
    tensors.update({"model.vision_tower.vision_tower.vision_model." + k: v for k, v in siglip.state_dict().items()})
    h, vh = TEXT["hidden_size"], VISION["hidden_size"]
    tensors["model.mm_projector.0.weight"] = torch.randn(h, vh)
    tensors["model.mm_projector.0.bias"] = torch.randn(h)
    tensors["model.mm_projector.2.weight"] = torch.randn(h, h)
    tensors["model.mm_projector.2.bias"] = torch.randn(h)
    tensors["model.image_newline"] = torch.randn(h)
    for k in list(tensors):  # non-trivial values everywhere (norms default to ones)
        tensors[k] = (tensors[k] + 0.01 * torch.randn_like(tensors[k])).to(torch.bfloat16).contiguous()
    tensors.update(extra_tensors or {})
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(directory / fname), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * 2 for t in tensors.values())},
             "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    eos = n_tok - 1  # <|im_end|>
    config = {
        "architectures": ["LlavaQwenForCausalLM"], "model_type": "llava_qwen", "vocab_size": rows,
        "tie_word_embeddings": False, "eos_token_id": eos, "bos_token_id": n_tok - 3,
        "max_position_embeddings": 4096, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": vh, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "bilinear", "mm_newline_position": "grid",
        "image_aspect_ratio": "anyres_max_9", "image_grid_pinpoints": [[64, 64], [64, 128]],
        "torch_dtype": "bfloat16", **TEXT,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "do_sample": False}))
    return tensors
