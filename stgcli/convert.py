"""Build SpaceVLLM-7B from a LLaVA-Video-7B-Qwen2 checkpoint (LLaVA-NeXT layout).

No trained SpaceVLLM checkpoint exists, so the full-size model starts from the paper's base:
vision tower, projector, image_newline and Qwen2 are copied tensor for tensor; the parts SpaceVLLM
adds are initialised here, and documented in the written MODEL_CARD.md:

* tokens `<image>`, `<video>` (placeholders, replaced by visual features) and `<stq>` (the
  spatio-temporal query) are added to the Qwen2 tokenizer. Their rows in `embed_tokens` and
  `lm_head` are set to the mean of the rows of the tokenizer's original vocabulary (the usual
  "mean resizing", so the new tokens start as an average word instead of noise). When the ids
  fall inside the checkpoint's padded rows (LLaVA-Video: 151,646 tokens, 152,064 rows) no row is
  added; otherwise the matrices grow to the next multiple of 64.
* the space decoder is initialised with the model's own `_init_weights` (normal(0, 0.02)
  linears, unit LayerNorms, torch's attention init, zero positional table) under a fixed seed,
  so two conversions of the same checkpoint give identical files.

Tensors are streamed: read one at a time with `safetensors.safe_open`, written into output shards
of bounded size (`max_shard_bytes`), so peak memory is about one shard plus one tensor, never the
whole 15 GB checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .errors import ModelError, UserError
from .weights import MANIFEST, sha256_file, write_manifest

NEW_TOKENS = ("<image>", "<video>", "<stq>")
DEFAULT_SHARD_BYTES = 2 * 1024**3
CONVERTER_VERSION = 1

# LLaVA-Video's chat format (Qwen2 im_start/im_end). The answer is SpaceVLLM's temporal answer.
PROMPT_7B = {
    "prefix": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
              "Find when and where this is seen in the video: ",
    "intro": "\nFrames, each after its timestamp in seconds:",
    # no final period: a model that copies it would write an answer the strict parser refuses
    "suffix": "\nAnswer in the form: from A to B seconds<|im_end|>\n<|im_start|>assistant\n",
    "answer_template": "from {start} to {end} seconds",
}

_VISION = "model.vision_tower.vision_tower.vision_model."
_LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.")


def map_key(key: str) -> str | None:
    """LLaVA-NeXT weight name -> this project's (transformers v5 LlavaOnevision) name; None drops it.

    Dropped: SigLIP's pooling head (LLaVA-NeXT replaces it by Identity and never uses it) and
    `position_ids` buffers, which some older checkpoints saved and the model recomputes.
    Anything unknown is an error: silently skipping a tensor would give a model that loads with
    freshly initialised weights in its place.
    """
    if key.startswith(_VISION):
        rest = key[len(_VISION):]
        return None if rest.startswith("head.") or rest.endswith("position_ids") else "model.vision_tower." + rest
    m = re.fullmatch(r"model\.mm_projector\.(0|2)\.(weight|bias)", key)
    if m:
        return f"model.multi_modal_projector.linear_{1 if m.group(1) == '0' else 2}.{m.group(2)}"
    if key == "model.image_newline":
        return key
    if key.startswith(_LLM_PREFIXES):
        return "model.language_model." + key[len("model."):]
    if key == "lm_head.weight":
        return key
    raise ModelError(f"unexpected tensor '{key}' in the checkpoint: not a LLaVA-NeXT SigLIP/Qwen2 layout "
                     "this converter knows (is it LLaVA-Video-7B-Qwen2?)")


# -- reading the source --------------------------------------------------------------------------
def _source_files(src: Path) -> list[Path]:
    """The source's safetensors shards in order; refuse anything else."""
    if not src.is_dir():
        raise UserError(f"--from {src}: no such directory (a LLaVA-Video-7B-Qwen2 checkpoint: config.json, "
                        "model-*.safetensors, tokenizer files)")
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: no config.json; not a LLaVA-NeXT checkpoint")
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            if not all(isinstance(n, str) and Path(n).name == n for n in names):
                raise ValueError("weight_map values must be shard file names")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: not a safetensors index ({e})") from None
        files = [src / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"{src}: shards listed in model.safetensors.index.json are missing: "
                             f"{', '.join(missing)}")
        return files
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    if any(p.suffix in (".bin", ".pt", ".pth") for p in src.iterdir()):
        raise ModelError(f"{src}: holds only pickle weights (.bin/.pt); the converter reads safetensors only")
    raise ModelError(f"{src}: no *.safetensors weights found")


def _read_llava_config(src: Path) -> dict:
    try:
        cfg = json.loads((src / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ModelError(f"{src / 'config.json'}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{src / 'config.json'}: must be a JSON object; not a LLaVA-NeXT checkpoint")
    tower = str(cfg.get("mm_vision_tower", ""))
    if not tower:
        raise ModelError(f"{src}: config.json has no mm_vision_tower; not a LLaVA-NeXT checkpoint")
    if "siglip" not in tower.lower():
        raise ModelError(f"{src}: vision tower '{tower}' is not SigLIP; only SigLIP/Qwen2 LLaVA-NeXT checkpoints "
                         "(LLaVA-Video-7B-Qwen2, LLaVA-OneVision-Qwen2) can be converted")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ModelError(f"{src}: projector '{cfg.get('mm_projector_type')}' is not mlp2x_gelu")
    if cfg.get("mm_spatial_pool_stride", 2) not in (None, 2):
        raise ModelError(f"{src}: mm_spatial_pool_stride {cfg['mm_spatial_pool_stride']} (LlavaOnevision pools 2x2)")
    if cfg.get("model_type") not in ("llava_qwen", "qwen2", "llava"):
        raise ModelError(f"{src}: model_type '{cfg.get('model_type')}' is not a LLaVA-NeXT Qwen2 model")
    return cfg


def _shapes(files: list[Path]) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype) of every tensor, from the shard headers only (no tensor is read)."""
    from safetensors import safe_open

    from safetensors import SafetensorError

    out = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    sl = st.get_slice(k)
                    out[k] = (list(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{f}: not a readable safetensors file ({e}); re-download it") from None
    return out


def build_config(llava: dict, shapes: dict, tokens: dict[str, int], vocab_rows: int, overrides: dict | None = None):
    """SpaceVLLMConfig from LLaVA-NeXT's config.json (language model) and the tensor shapes (vision).

    Starts from `spacevllm_7b_config` so the grounding fields keep their 7B values. The SigLIP
    sizes are not in LLaVA-NeXT's config.json; they are read off the tensors (layer count, width,
    MLP width, patch and image size). `overrides` replaces any field (tests use tiny decoders).
    """
    from .models.spacevllm.configuration_spacevllm import SpaceVLLMConfig, spacevllm_7b_config

    overrides = dict(overrides or {})
    base = spacevllm_7b_config()
    v = _VISION
    patch_w = shapes[v + "embeddings.patch_embedding.weight"][0]
    n_pos = shapes[v + "embeddings.position_embedding.weight"][0][0]
    grid = math.isqrt(n_pos)
    layers = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(v) + r"encoder\.layers\.(\d+)\.", k))}
    hidden = patch_w[0]
    vision = dict(model_type="siglip_vision_model", hidden_size=hidden, patch_size=patch_w[2],
                  image_size=grid * patch_w[2], num_hidden_layers=len(layers), vision_use_head=False,
                  intermediate_size=shapes[v + "encoder.layers.0.mlp.fc1.weight"][0][0],
                  num_attention_heads=16 if hidden == 1152 else max(1, hidden // 72))
    vision.update(overrides.pop("vision_config", {}))
    bt = base.text_config
    text = dict(model_type="qwen2", max_position_embeddings=bt.max_position_embeddings, rope_theta=1000000.0,
                rms_norm_eps=bt.rms_norm_eps, tie_word_embeddings=False, eos_token_id=bt.eos_token_id)
    for f in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        if llava.get(f) is not None:
            text[f] = llava[f]
    text["vocab_size"] = vocab_rows
    text["pad_token_id"] = tokens.get("pad") if tokens.get("pad") is not None else bt.pad_token_id
    if llava.get("eos_token_id") is None and tokens.get("eos") is not None:
        text["eos_token_id"] = tokens["eos"]
    text.update(overrides.pop("text_config", {}))
    keep = ("decoder_hidden_size", "decoder_layers", "decoder_heads", "text_condition_layers", "num_frames",
            "time_decimals", "vision_feature_select_strategy")
    fields = {k: getattr(base, k) for k in keep}
    fields.update(
        vision_config=vision, text_config=text,
        image_token_index=tokens["<image>"], video_token_index=tokens["<video>"], query_token_index=tokens["<stq>"],
        # LLaVA-NeXT drops SigLIP's last (27th) layer and takes the output of the one before it,
        # which is the *last* hidden state of the 26-layer tower that is saved.
        vision_feature_layer=-1,
        tie_word_embeddings=bool(text.get("tie_word_embeddings", False)),
        pad_token_id=text["pad_token_id"], eos_token_id=text.get("eos_token_id"),
        training_vocabulary=None, dtype="bfloat16",
    )
    if llava.get("image_grid_pinpoints"):
        fields["image_grid_pinpoints"] = llava["image_grid_pinpoints"]
    fields.update(overrides)
    return SpaceVLLMConfig(**fields)


# -- writing -----------------------------------------------------------------------------------------
class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `max_bytes` would be exceeded.
    Shards get their final `model-0000i-of-0000N` names once N is known, plus the index."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.buf: dict = {}
        self.buf_bytes = 0
        self.parts: list[tuple[Path, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buf and self.buf_bytes + nbytes > self.max_bytes:
            self.flush()
        self.buf[name] = tensor.contiguous()
        self.buf_bytes += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.buf:
            return
        part = self.out / f".part-{len(self.parts):05d}.safetensors"
        save_file(self.buf, str(part), metadata={"format": "pt"})
        self.parts.append((part, list(self.buf)))
        self.buf, self.buf_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        n = len(self.parts)
        weight_map, names = {}, []
        for i, (part, keys) in enumerate(self.parts, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            part.rename(self.out / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return names


def _mean_rows(t, n: int, chunk: int = 8192):
    """Mean of the first n rows in float32, a chunk at a time (the 7B's embedding is 1 GB in bf16)."""
    import torch

    acc = torch.zeros(t.shape[1], dtype=torch.float64)
    for i in range(0, n, chunk):
        acc += t[i:min(n, i + chunk)].to(torch.float64).sum(0)
    return (acc / n).to(t.dtype)


def _with_token_rows(t, rows: int, new_ids: list[int], n_vocab: int):
    """Embedding / lm_head with `rows` rows, the new tokens' rows set to the vocabulary's mean row."""
    import torch

    mean = _mean_rows(t, n_vocab)
    if rows > t.shape[0]:
        t = torch.cat([t, mean.expand(rows - t.shape[0], -1)], 0)
    else:
        t = t.clone()
    for i in new_ids:
        t[i] = mean
    return t


def init_space_decoder(config, seed: int) -> tuple[dict, dict]:
    """The space decoder's tensors, initialised by the model's own `_init_weights` under `seed`,
    and the shape of every tensor the full model expects (to check the conversion against).

    The full model is built on the meta device (no memory), then only the decoder is materialised."""
    import torch

    from .models.spacevllm import SpaceVLLMForConditionalGeneration

    with torch.device("meta"):
        model = SpaceVLLMForConditionalGeneration(config)
    dec = model.space_decoder.to_empty(device="cpu")
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        dec.apply(model._init_weights)
        with torch.no_grad():
            dec.pos_embed.zero_()
    finally:
        torch.random.set_rng_state(gen_state)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return {f"space_decoder.{k}": v.detach() for k, v in dec.state_dict().items()}, expected


def convert_llava_next(src: str | os.PathLike, out: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                       seed: int = 0, overrides: dict | None = None, force: bool = False,
                       progress=None) -> Path:
    """Convert a LLaVA-NeXT (LLaVA-Video-7B-Qwen2) checkpoint at `src` into a SpaceVLLM model at `out`.

    Writes into `out`.partial and renames at the end, so an interrupted run never leaves a
    directory that looks complete. Returns `out`.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from .models.spacevllm import SpaceVLLMProcessor
    from .models.spacevllm.processing_spacevllm import ProcessorSettings

    src, out = Path(src).expanduser(), Path(out).expanduser()
    if not src.is_dir():
        raise UserError(f"--from {src}: no such directory (a LLaVA-Video-7B-Qwen2 checkpoint: config.json, "
                        "model-*.safetensors, tokenizer files)")
    if not (src / "config.json").is_file():
        raise ModelError(f"{src}: no config.json; not a LLaVA-NeXT checkpoint")
    llava = _read_llava_config(src)
    files = _source_files(src)
    _check_out(src, out, force)
    out = out.resolve()  # `.` or `a/..` has no name to put a temporary folder beside
    shapes = _shapes(files)
    for need in (_VISION + "embeddings.patch_embedding.weight", _VISION + "embeddings.position_embedding.weight",
                 "model.embed_tokens.weight", "model.mm_projector.0.weight"):
        if need not in shapes:
            raise ModelError(f"{src}: tensor '{need}' missing; not a LLaVA-NeXT SigLIP/Qwen2 checkpoint")
    for k in shapes:
        map_key(k)  # fail on an unknown tensor before writing anything

    # Tokenizer: the checkpoint's own Qwen2 tokenizer plus SpaceVLLM's three tokens.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # its "llava_qwen is not a known model type" is expected here
    try:
        tok = AutoTokenizer.from_pretrained(str(src), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"{src}: cannot read its tokenizer ({e})") from None
    n_vocab = len(tok)
    tok.add_tokens(list(NEW_TOKENS), special_tokens=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in NEW_TOKENS}
    new_ids = sorted(i for i in ids.values() if i >= n_vocab)
    rows0 = shapes["model.embed_tokens.weight"][0][0]
    rows = rows0 if max(ids.values()) < rows0 else 64 * math.ceil((max(ids.values()) + 1) / 64)
    tokens = {**ids, "pad": tok.pad_token_id, "eos": tok.eos_token_id}
    config = build_config(llava, shapes, tokens, rows, overrides)
    if "lm_head.weight" not in shapes and not config.tie_word_embeddings:
        raise ModelError(f"{src}: no lm_head.weight and tie_word_embeddings is false")
    decoder, expected = init_space_decoder(config, seed)

    try:  # a fresh name beside `out`: never a folder of the user's that happens to be called OUT.partial
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose another folder") from None
    try:
        writer = ShardWriter(tmp, max_shard_bytes)
        written: dict[str, tuple] = {}
        dtype = None
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    dst = map_key(k)
                    if dst is None:
                        continue
                    t = st.get_tensor(k)
                    dtype = dtype or t.dtype
                    if k in ("model.embed_tokens.weight", "lm_head.weight"):
                        t = _with_token_rows(t, rows, new_ids if rows > rows0 else sorted(ids.values()), n_vocab)
                    writer.add(dst, t)
                    written[dst] = tuple(t.shape)
                    del t
            if progress:
                progress(f.name)
        for k, t in decoder.items():
            t = t.to(dtype or torch.bfloat16)
            writer.add(k, t)
            written[k] = tuple(t.shape)
        shard_names = writer.close()

        # Every parameter the model expects, with its shape; nothing more (tied lm_head may be absent).
        optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
        missing = sorted(set(expected) - set(written) - optional)
        extra = sorted(set(written) - set(expected))
        wrong = sorted(k for k in set(written) & set(expected) if tuple(expected[k]) != written[k])
        if missing or extra or wrong:
            raise ModelError(f"{src}: conversion does not fit the SpaceVLLM layout (missing {missing[:5]}, "
                             f"unexpected {extra[:5]}, wrong shape {wrong[:5]})")

        config.save_pretrained(tmp)
        if (src / "generation_config.json").is_file():
            shutil.copy2(src / "generation_config.json", tmp / "generation_config.json")
        vc = config.vision_config
        settings = ProcessorSettings(image_size=vc.image_size, patch_size=vc.patch_size,
                                     time_decimals=config.time_decimals,
                                     video_token="<video>", query_token="<stq>", **PROMPT_7B)
        SpaceVLLMProcessor(tok, settings).save_pretrained(tmp)
        (tmp / "MODEL_CARD.md").write_text(_model_card(src, config, seed, ids, new_ids, rows0, rows))
        write_manifest(tmp, {"source": str(src), "source_config_sha256": sha256_file(src / "config.json"),
                             "converter": f"stgcli.convert v{CONVERTER_VERSION}", "seed": seed,
                             "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "shards": shard_names})
    except BaseException:  # nothing half-written stays behind (a kill -9 aside)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():  # an earlier build (checked by _check_out): aside first, so a crash leaves one model
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
        out.rename(old / "model")
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
    return out


def _check_out(src: Path, out: Path, force: bool) -> None:
    """--out must not hold or contain the source, and --force replaces only an earlier build (a folder
    with stg's manifest), never a folder of other files or a link."""
    s, o = src.resolve(), out.resolve()
    if s == o or s.is_relative_to(o) or o.is_relative_to(s):
        raise UserError(f"--out {out}: is, holds or lies inside --from {src}; choose a folder apart from it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"--out {out}: is a {'link' if out.is_symlink() else 'file'}; give --out a folder name")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UserError(f"{out}: already exists and is not empty; pass --force to replace it")
        if not (out / MANIFEST).is_file():
            raise UserError(f"{out}: holds files that are not a stg build (no {MANIFEST}); --force replaces only "
                            "an earlier build, so choose another --out")


def _model_card(src: Path, config, seed: int, ids: dict, new_ids: list[int], rows0: int, rows: int) -> str:
    grown = f"rows grown from {rows0} to {rows}" if rows > rows0 else "inside the checkpoint's padded rows"
    return f"""# spacevllm-7b (converted, NOT fine-tuned)

Built by `stg weights init` from the LLaVA-Video-7B-Qwen2 checkpoint at `{src}`.

- Copied unchanged: SigLIP vision tower ({config.vision_config.num_hidden_layers} layers), 2-layer projector,
  image_newline, Qwen2 language model ({config.text_config.num_hidden_layers} layers), lm_head.
- Added tokens: {", ".join(f"{t} = {i}" for t, i in ids.items())}. Their embedding and lm_head rows are the mean
  of the original vocabulary's rows ({grown}).
- Space decoder: freshly initialised (model's own init, seed {seed}). **Untrained.**

What it can do now: nothing useful for grounding. The query tokens and the space decoder have
never been trained, so boxes are meaningless and the time span the language model writes is at
best a guess from a video chat model that was never taught this answer format. It is a starting
point for fine-tuning (`stg train` with a 7B config on a GPU), not a grounding model.

Architecture notes: frames reach the language model through transformers' LlavaOnevision
(2x2 bilinear pooling, one image_newline after the last frame), not LLaVA-Video's per-row
newlines; with the per-frame query tokens, this is a new input layout the base model never saw,
which fine-tuning has to teach.
"""
