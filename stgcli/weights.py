"""Model registry (weights.toml) and `load_model`.

Like openai-whisper's `_MODELS` + `load_model`: a name resolves to a directory whose files are
checked against the sha256 digests in the registry before anything is loaded. Weights load from
safetensors only and never with `trust_remote_code`; a pickle checkpoint is refused unless the
caller passes `allow_pickle=True`.
"""
from __future__ import annotations

import hashlib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError, UserError

DEFAULT_MODEL = "spacevllm-tiny-shapes"
_PACKAGE = Path(__file__).resolve().parent
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class ModelEntry:
    name: str
    description: str = ""
    source: str = ""                 # "package:<dir>", a local path, or "hf:<repo>@<revision>"
    files: dict = field(default_factory=dict)  # file name -> sha256
    default_frames: int = 16
    default_quant: str = "none"
    license: str = ""
    architecture: dict = field(default_factory=dict)

    def local_dir(self) -> Path | None:
        if self.source.startswith("package:"):
            return _PACKAGE / self.source.split(":", 1)[1]
        if self.source.startswith("hf:"):
            return None
        return Path(self.source).expanduser()


def _registry_files(extra: str | os.PathLike | None = None) -> list[Path]:
    """The packaged registry (in a wheel: stgcli/weights.toml; in a checkout: ../weights.toml),
    then $STG_WEIGHTS, then an explicit file; later files add or override entries."""
    files = [p for p in (_PACKAGE / "weights.toml", _PACKAGE.parent / "weights.toml") if p.is_file()][:1]
    for p in (os.environ.get("STG_WEIGHTS"), extra):
        if p:
            if not Path(p).is_file():
                raise UserError(f"{p}: model registry not found (from --registry or STG_WEIGHTS)")
            files.append(Path(p))
    return files


def registry(extra: str | os.PathLike | None = None) -> dict[str, ModelEntry]:
    entries: dict[str, ModelEntry] = {}
    for path in _registry_files(extra):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
        for name, d in data.get("models", {}).items():
            d = dict(d)
            if not d.get("source", "").startswith(("package:", "hf:")) and d.get("source"):
                src = Path(d["source"]).expanduser()
                d["source"] = str(src if src.is_absolute() else (path.parent / src))
            entries[name] = ModelEntry(name=name, **d)
    return entries


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(entry: ModelEntry, directory: Path) -> None:
    """Every file listed in the registry exists and has its digest; otherwise stop the load."""
    for fname, digest in entry.files.items():
        p = directory / fname
        if not p.is_file():
            raise ModelError(f"{p}: missing file of model '{entry.name}'; run `stg weights fetch {entry.name}`")
        got = sha256_file(p)
        if got != digest:
            raise ModelError(f"{p}: checksum mismatch for model '{entry.name}': expected sha256 {digest}, "
                             f"got {got}; the file is corrupt or was replaced")


def _check_safetensors(directory: Path, allow_pickle: bool) -> bool:
    """True if the directory holds safetensors weights; refuse pickle-only checkpoints by default."""
    if any(directory.glob("*.safetensors")):
        return True
    if any(p.suffix in _PICKLE_SUFFIXES for p in directory.iterdir()):
        if not allow_pickle:
            raise ModelError(f"{directory}: holds only pickle weights (.bin/.pt), which can run code when loaded; "
                             "convert them to safetensors, or pass --allow-pickle if you trust the source")
        return False
    raise ModelError(f"{directory}: no model weights (*.safetensors) found")


@dataclass
class LoadedModel:
    """A model ready to ground: the network, its processor and what the result records about it."""

    model: object
    processor: object
    name: str
    sha256: str | None
    device: str
    dtype: str
    quantization: str
    default_frames: int

    @property
    def training_vocabulary(self) -> set[str] | None:
        vocab = getattr(self.model.config, "training_vocabulary", None)
        return set(vocab) if vocab else None


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu "
                        "(or install a CUDA build of torch, see README)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    return device


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "auto", quant: str | None = None,
               registry_file: str | os.PathLike | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load a registered model by name, or a model directory by path. Default: the built-in model."""
    import torch
    from transformers.utils import logging as hf_logging

    from .models.spacevllm import SpaceVLLMForConditionalGeneration, SpaceVLLMProcessor

    hf_logging.disable_progress_bar()  # stg's own bars and stderr lines only
    hf_logging.set_verbosity_error()
    name = str(name_or_path or DEFAULT_MODEL)
    entries = registry(registry_file)
    entry = entries.get(name)
    if entry is not None:
        directory = entry.local_dir()
        if directory is None or not directory.is_dir():
            raise ModelError(f"model '{name}' is not on this machine; run `stg weights fetch {name}`")
        verify(entry, directory)
        digest = entry.files.get("model.safetensors")
    else:
        directory = Path(name).expanduser()
        if not directory.exists():
            known = ", ".join(sorted(entries)) or "none"
            raise ModelError(f"{name}: no such model name or directory (registered models: {known})")
        if not directory.is_dir() or not (directory / "config.json").is_file():
            raise ModelError(f"{directory}: not a model directory (needs config.json, safetensors weights, "
                             "tokenizer and processor_config.json)")
        st = directory / "model.safetensors"
        digest = sha256_file(st) if st.is_file() else None
    use_st = _check_safetensors(directory, allow_pickle)
    device = resolve_device(device)
    quant = quant or (entry.default_quant if entry else "none")
    kwargs: dict = {"use_safetensors": use_st}
    dtype = torch.float32
    if quant not in ("none", "4bit", "8bit"):
        raise UserError(f"--quant {quant}: expected none, 4bit or 8bit")
    if quant != "none":
        if not device.startswith("cuda"):
            raise UserError(f"--quant {quant} needs a CUDA GPU (bitsandbytes); on CPU use --quant none")
        from transformers import BitsAndBytesConfig

        dtype = torch.bfloat16
        skip = ["model.vision_tower", "model.multi_modal_projector", "space_decoder", "lm_head"]
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip)
            if quant == "4bit" else BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip))
        kwargs["device_map"] = {"": device}
    elif device.startswith("cuda"):
        dtype = torch.bfloat16
    try:
        model = SpaceVLLMForConditionalGeneration.from_pretrained(str(directory), dtype=dtype, **kwargs)
        processor = SpaceVLLMProcessor.from_pretrained(directory)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"{directory}: cannot load model ({e})") from e
    if quant == "none":
        model.to(device)
    model.eval()
    return LoadedModel(model=model, processor=processor, name=entry.name if entry else str(directory),
                       sha256=digest, device=device, dtype=str(dtype).replace("torch.", ""),
                       quantization=quant, default_frames=entry.default_frames if entry else
                       int(getattr(model.config, "num_frames", 16)))
