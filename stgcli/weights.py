"""Model registry (weights.toml), `stg weights` logic and `load_model`.

Like openai-whisper's `_MODELS` + `load_model`: a name resolves to a directory whose files are
checked against sha256 digests before anything is loaded. Weights load from safetensors only and
never with `trust_remote_code`; a pickle checkpoint is refused unless the caller passes
`allow_pickle=True`.

Where the digests come from, by source kind:

* `package:<dir>` and local paths: `files` in weights.toml (file name -> sha256).
* `hf:<repo>@<commit>`: `files` in weights.toml when given; otherwise the Hub's own digests,
  which huggingface_hub keeps as the blob names of its cache (sha256 for LFS files, the git
  blob sha1 for small files). A Hugging Face source must name a 40-hex commit, never a branch.
* `cache:<name>` (a model `stg weights init` builds, under `stg_home()`): its sha256s cannot be
  known in advance, so init writes them to `stg-manifest.json` beside the weights and verify
  checks against that. This catches corruption and accidental edits, not tampering by someone
  who can also rewrite the manifest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelError, UserError

DEFAULT_MODEL = "spacevllm-tiny-shapes"
MANIFEST = "stg-manifest.json"
_PACKAGE = Path(__file__).resolve().parent
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_COMMIT = re.compile(r"[0-9a-f]{40}")
# What `stg weights fetch` downloads: weights as safetensors, configs, tokenizer. Never pickles.
FETCH_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.md"]


def stg_home() -> Path:
    """Where stg keeps models it builds: $STG_HOME, else $XDG_CACHE_HOME/stg, else ~/.cache/stg."""
    if os.environ.get("STG_HOME"):
        return Path(os.environ["STG_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "stg"


@dataclass
class ModelEntry:
    name: str
    description: str = ""
    source: str = ""                 # "package:<dir>", "cache:<dir>", a local path, or "hf:<repo>@<commit>"
    files: dict = field(default_factory=dict)  # file name -> sha256
    default_frames: int = 16
    default_quant: str = "none"
    license: str = ""
    architecture: dict = field(default_factory=dict)
    size: str = ""                   # human-readable download / disk size, for `stg weights list`
    build: dict = field(default_factory=dict)  # {from = NAME, converter = "llava-next"}: made by `stg weights init`

    @property
    def kind(self) -> str:
        for k in ("package", "cache", "hf"):
            if self.source.startswith(k + ":"):
                return k
        return "path"

    def hf_repo(self) -> tuple[str, str | None]:
        """(repo id, revision or None) of an hf: source."""
        spec = self.source.split(":", 1)[1]
        repo, _, rev = spec.partition("@")
        return repo, (rev or None)

    def pinned_revision(self) -> str:
        """The commit an hf: source is pinned to; refuse a branch name or none at all."""
        repo, rev = self.hf_repo()
        if not rev or not _COMMIT.fullmatch(rev):
            raise ModelError(f"model '{self.name}': source {self.source} is not pinned to a commit; write "
                             f"hf:{repo}@<40-hex commit> in weights.toml (a branch like 'main' can change under you)")
        return rev

    def local_dir(self) -> Path | None:
        """Where the files are (or would be) on this machine; None for an unpinned hf: source."""
        kind = self.kind
        if kind == "package":
            return _PACKAGE / self.source.split(":", 1)[1]
        if kind == "cache":
            return stg_home() / self.source.split(":", 1)[1]
        if kind == "hf":
            repo, rev = self.hf_repo()
            if not rev or not _COMMIT.fullmatch(rev):
                return None
            return _hf_cache() / ("models--" + repo.replace("/", "--")) / "snapshots" / rev
        return Path(self.source).expanduser()

    def where(self) -> str:
        if self.kind == "hf":
            repo, rev = self.hf_repo()
            return f"hf:{repo}@{rev[:12] if rev else '(unpinned)'}"
        d = self.local_dir()
        return str(d) if d is not None else self.source


def _hf_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


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
    known = set(ModelEntry.__dataclass_fields__) - {"name"}
    for path in _registry_files(extra):
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid TOML ({e})") from None
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise UserError(f"{path}: 'models' must be a table of [models.NAME] entries")
        for name, d in models.items():
            if not isinstance(d, dict):
                raise UserError(f"{path}: model '{name}' must be a table ([models.{name}])")
            d = dict(d)
            unknown = set(d) - known
            if unknown:
                raise UserError(f"{path}: model '{name}' has unknown keys {sorted(unknown)} "
                                f"(known: {', '.join(sorted(known))})")
            _check_entry(path, name, d)
            src = d.get("source", "")
            if src and not src.startswith(("package:", "hf:", "cache:")):
                p = Path(src).expanduser()
                d["source"] = str(p if p.is_absolute() else (path.parent / p))
            entries[name] = ModelEntry(name=name, **d)
    return entries


_HEX = re.compile(r"[0-9a-f]{64}|[0-9a-f]{40}")


def _check_entry(path: Path, name: str, d: dict) -> None:
    """Types and values of one registry entry, so a typo is one line naming it (digests lowercased)."""
    where = f"{path}: model '{name}'"
    if not isinstance(d.get("source"), str) or not d["source"].strip():
        raise UserError(f"{where}: needs source = \"package:DIR\", \"cache:DIR\", \"hf:REPO@COMMIT\" or a path")
    for key, kind in (("description", str), ("license", str), ("size", str), ("files", dict),
                      ("architecture", dict), ("build", dict), ("default_frames", int), ("default_quant", str)):
        if key in d and (not isinstance(d[key], kind) or isinstance(d[key], bool)):
            raise UserError(f"{where}: {key} must be a {'table' if kind is dict else kind.__name__}")
    if "default_frames" in d and d["default_frames"] < 1:
        raise UserError(f"{where}: default_frames must be at least 1")
    if d.get("default_quant", "none") not in ("none", "4bit", "8bit"):
        raise UserError(f"{where}: default_quant must be none, 4bit or 8bit, got {d['default_quant']!r}")
    files = {}
    for fname, digest in (d.get("files") or {}).items():
        digest = str(digest).lower()
        if not _HEX.fullmatch(digest):
            raise UserError(f"{where}: files.{fname} must be a sha256 (64 hex digits), got {d['files'][fname]!r}")
        if Path(fname).is_absolute() or ".." in Path(fname).parts:
            raise UserError(f"{where}: files.{fname} must name a file inside the model's directory")
        files[fname] = digest
    if "files" in d:
        d["files"] = files


def get_entry(name: str, registry_file: str | os.PathLike | None = None) -> ModelEntry:
    """The registry entry for `name`, or a one-line error listing the known names."""
    entries = registry(registry_file)
    if name not in entries:
        raise ModelError(f"unknown model '{name}' (registered models: {', '.join(sorted(entries)) or 'none'})")
    return entries[name]


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def git_blob_sha1(path: Path, chunk: int = 1 << 20) -> str:
    """Git's object id of a file (how the Hub names non-LFS blobs in its cache)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict | None = None) -> dict:
    """sha256 of every file in `directory` into stg-manifest.json (what verify checks for built models)."""
    files = {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    doc = {"format": "stg-manifest/v1", "files": files, **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def expected_digests(entry: ModelEntry, directory: Path) -> tuple[dict[str, str], str]:
    """(file -> expected digest, where those digests come from). Empty when nothing pins them."""
    if entry.files:
        return dict(entry.files), "weights.toml"
    if (directory / MANIFEST).is_file():
        try:
            return dict(json.loads((directory / MANIFEST).read_text())["files"]), MANIFEST
        except (ValueError, KeyError) as e:
            raise ModelError(f"{directory / MANIFEST}: unreadable manifest ({e})") from None
    if entry.kind == "hf" and directory.is_dir():
        out = {}
        for p in sorted(directory.iterdir()):
            if p.is_symlink():
                out[p.name] = Path(os.readlink(p)).name  # blobs/<sha256 or git sha1>
        if out:
            return out, "the Hugging Face Hub (cache blob names)"
    return {}, ""


# The files transformers reads from a model directory (weights, configs, tokenizer, processor).
_LOADED = re.compile(r".*\.safetensors|.*\.index\.json|config\.json|generation_config\.json|processor_config\.json"
                     r"|tokenizer.*|special_tokens_map\.json|added_tokens\.json|chat_template.*|vocab\.json"
                     r"|merges\.txt|preprocessor_config\.json")


def verify(entry: ModelEntry, directory: Path) -> str:
    """Every pinned file exists and has its digest; otherwise stop the load. Returns the digests' origin."""
    digests, origin = expected_digests(entry, directory)
    if not digests:
        raise ModelError(f"model '{entry.name}': no sha256 digests to check {directory} against "
                         f"(none in weights.toml and no {MANIFEST}); refusing to load unverified weights")
    for index in directory.glob("*.index.json"):  # every shard the index names must be there
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(f"{index}: not a readable weights index; re-fetch or rebuild model "
                             f"'{entry.name}'") from None
        absent = sorted(str(n) for n in shards if not (directory / str(n)).is_file())
        if absent:
            raise ModelError(f"{directory / absent[0]}: named by {index.name} but missing ({len(absent)} shard(s)); "
                             f"{_get_hint(entry)}")
    loadable = sorted(f.name for f in directory.iterdir() if f.is_file() and _LOADED.fullmatch(f.name))
    unpinned = [f for f in loadable if f not in digests]
    if unpinned:  # a file stg would read without checking it could change the model's answers
        raise ModelError(f"{directory / unpinned[0]}: read when model '{entry.name}' loads but not pinned by a "
                         "digest; remove it, or pin it in the registry")
    for fname, digest in digests.items():
        p = directory / fname
        if not p.is_file():
            hint = (f"run `stg weights init {entry.name}`" if entry.build else f"run `stg weights fetch {entry.name}`")
            raise ModelError(f"{p}: missing file of model '{entry.name}'; {hint}")
        got = git_blob_sha1(p) if len(digest) == 40 else sha256_file(p)
        if got != digest:
            algo = "git sha1" if len(digest) == 40 else "sha256"
            raise ModelError(f"{p}: checksum mismatch for model '{entry.name}': expected {algo} {digest}, "
                             f"got {got}; the file is corrupt or was replaced")
    return origin


# -- stg weights: list / verify / path / fetch / init --------------------------------------------------
@dataclass
class EntryStatus:
    entry: ModelEntry
    directory: Path | None
    state: str          # missing | present | verified | unpinned | mismatch
    detail: str = ""

    @property
    def disk_size(self) -> str:
        if self.directory is None or not self.directory.is_dir():
            return ""
        n = sum(p.stat().st_size for p in self.directory.iterdir() if p.is_file())
        return _human(n)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def entry_status(entry: ModelEntry, check: bool = False) -> EntryStatus:
    """Is the model on this machine, and (with `check`) do its files match their digests?"""
    d = entry.local_dir()
    if d is None:
        return EntryStatus(entry, None, "unpinned", "revision not pinned in weights.toml")
    if not d.is_dir() or not any(d.iterdir()):
        return EntryStatus(entry, d, "missing")
    digests, origin = expected_digests(entry, d)
    if any(not (d / f).is_file() for f in digests):
        return EntryStatus(entry, d, "missing", "incomplete")
    if not check:
        return EntryStatus(entry, d, "present", f"digests from {origin}" if origin else "no digests")
    if not digests:
        return EntryStatus(entry, d, "present", "no digests to verify against")
    try:
        verify(entry, d)
    except ModelError as e:
        return EntryStatus(entry, d, "mismatch", str(e))
    return EntryStatus(entry, d, "verified", f"against {origin}")


def list_models(registry_file: str | os.PathLike | None = None, check: bool = False) -> list[EntryStatus]:
    return [entry_status(e, check) for e in registry(registry_file).values()]


def _present_dir(name: str, registry_file: str | os.PathLike | None) -> tuple[ModelEntry, Path]:
    """A registered model's entry and directory, or a ModelError saying how to get it."""
    entry = get_entry(name, registry_file)
    if entry.kind == "hf":
        entry.pinned_revision()
    d = entry.local_dir()
    if d is None or not d.is_dir():
        raise ModelError(f"model '{name}' is not on this machine ({entry.where()}); {_get_hint(entry)}")
    return entry, d


def verify_model(name: str, registry_file: str | os.PathLike | None = None) -> tuple[Path, str, int]:
    """Hash every file of a registered model. Returns (directory, digests' origin, file count)."""
    entry, d = _present_dir(name, registry_file)
    origin = verify(entry, d)
    return d, origin, len(expected_digests(entry, d)[0])


def model_path(name: str, registry_file: str | os.PathLike | None = None) -> Path:
    return _present_dir(name, registry_file)[1]


def _get_hint(entry: ModelEntry) -> str:
    if entry.build:
        return f"build it with `stg weights init {entry.name} --from DIR`"
    if entry.kind == "hf":
        return f"run `stg weights fetch {entry.name}`"
    return "reinstall stg or fix its source in weights.toml"


def manual_copy_recipe(repo: str, rev: str) -> str:
    return (f"on a machine with network run `hf download {repo} --revision {rev} --local-dir DIR` "
            f"(or `huggingface-cli download ...`), copy DIR here, then pass it as "
            f"`stg weights init spacevllm-7b --from DIR`")


def fetch(name: str, registry_file: str | os.PathLike | None = None, etag_timeout: float = 10.0) -> Path:
    """Download an hf: model at its pinned commit into the Hugging Face cache (safetensors only)."""
    entry = get_entry(name, registry_file)
    if entry.kind != "hf":
        d = entry.local_dir()
        if entry.build:
            raise ModelError(f"model '{name}' is not downloaded but built: "
                             f"`stg weights init {name} --from DIR` (its base: {entry.build.get('from', '?')})")
        raise ModelError(f"model '{name}' is not fetched from the Hub; it lives at {d}")
    repo, _ = entry.hf_repo()
    rev = entry.pinned_revision()
    from huggingface_hub import constants, model_info, snapshot_download
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()  # its retry chatter would bury the one line that matters
    try:
        if constants.HF_HUB_OFFLINE:
            path = snapshot_download(repo_id=repo, revision=rev, allow_patterns=FETCH_PATTERNS, local_files_only=True)
        else:
            # One quick request first: without network, snapshot_download retries for ~30 s.
            model_info(repo, revision=rev, timeout=etag_timeout)
            path = snapshot_download(repo_id=repo, revision=rev, allow_patterns=FETCH_PATTERNS,
                                     etag_timeout=etag_timeout)
    except Exception as e:  # noqa: BLE001 - any hub/network failure becomes the same actionable line
        raise ModelError(f"cannot download {repo} at revision {rev} ({_why(e, constants)}); "
                         + manual_copy_recipe(repo, rev)) from None
    path = Path(path)
    verify(entry, path)
    return path


def _why(e: BaseException, constants) -> str:
    """A short reason for a failed download."""
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and the files are not in the Hugging Face cache"
    chain, x = [], e
    while x is not None and len(chain) < 8:
        chain.append(x)
        x = x.__cause__ or x.__context__
    names = " ".join(type(c).__name__ for c in chain)
    if any(k in names for k in ("Connect", "Timeout", "NameResolution")) or any(
            isinstance(c, (ConnectionError, TimeoutError)) for c in chain):
        return f"no connection to {constants.ENDPOINT}"
    if "NotFound" in names:
        return "repository or revision not found on the Hub"
    return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"


def init_model(name: str, src: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
               registry_file: str | os.PathLike | None = None, max_shard_bytes: int | None = None,
               seed: int = 0, force: bool = False, progress=None, overrides: dict | None = None) -> Path:
    """Build a registered model that has a `build` recipe (spacevllm-7b from LLaVA-Video-7B-Qwen2)."""
    from . import convert

    entries = registry(registry_file)
    entry = entries.get(name)
    if entry is None:
        raise ModelError(f"unknown model '{name}' (registered models: {', '.join(sorted(entries)) or 'none'})")
    if not entry.build:
        buildable = [n for n, e in entries.items() if e.build]
        raise ModelError(f"model '{name}' is not built by `stg weights init` "
                         f"(buildable: {', '.join(buildable) or 'none'})")
    if entry.build.get("converter", "llava-next") != "llava-next":
        raise ModelError(f"model '{name}': unknown converter '{entry.build.get('converter')}'")
    if src is None:
        base = entries.get(entry.build.get("from", ""))
        d = base.local_dir() if base else None
        if d is None or not d.is_dir():
            where = f"`stg weights fetch {base.name}`" if base else "a download"
            raise UserError(f"stg weights init {name}: pass --from DIR (a LLaVA-Video-7B-Qwen2 checkpoint), "
                            f"or get it first with {where}")
        verify(base, d)  # the fetched base against the Hub's digests before building on it
        src = d
    out_dir = Path(out).expanduser() if out else entry.local_dir()
    if out_dir is None:
        raise ModelError(f"model '{name}': its source {entry.source} is not a local directory; pass --out")
    return convert.convert_llava_next(src, out_dir, max_shard_bytes=max_shard_bytes or convert.DEFAULT_SHARD_BYTES,
                                      seed=seed, overrides=overrides, force=force, progress=progress)


def _check_safetensors(directory: Path, allow_pickle: bool) -> bool:
    """True if the directory holds safetensors weights; refuse pickle-only checkpoints by default."""
    if any(directory.glob("*.safetensors")):
        return True
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        if not allow_pickle:
            raise ModelError(f"{directory}: holds only pickle weights ({pickles[0]}), which can run code when loaded; "
                             "convert them to safetensors, or pass --allow-pickle if you trust the source")
        if not any((directory / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
            raise ModelError(f"{directory}: a pickle checkpoint loads from pytorch_model.bin (transformers' name); "
                             f"found {', '.join(pickles)}")
        return False
    raise ModelError(f"{directory}: no model weights (*.safetensors) found")


# -- GPU memory -------------------------------------------------------------------------------------
_BYTES_PER_PARAM = {"8bit": 1.0, "4bit": 0.5 + 0.07}  # NF4 + double-quant scales, roughly


def available_ram_gib() -> float | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024**2
    except (OSError, ValueError):
        pass
    return None


def _check_cpu_memory(config, quant: str, frames: int, itemsize: int = 4) -> None:
    """On CPU the unquantized weights are fp32 by default, twice bf16's size: a 7B needs ~30 GiB. Say so
    before loading, instead of the kernel killing the process without a word."""
    need = estimate_memory_gib(config, quant, frames, itemsize)
    avail = available_ram_gib()
    if avail is not None and need > avail:
        advice = ("try --dtype bfloat16 (half the memory), --quant 4bit, or" if quant == "none" and itemsize > 2
                  else "try --quant 4bit, or" if quant == "none" else "use")
        raise ModelError(f"not enough memory: this model with --quant {quant} needs about {need:.1f} GiB of RAM on "
                         f"CPU, {avail:.1f} GiB is available; {advice} a GPU (--device cuda)")


def estimate_memory_gib(config, quant: str, frames: int, itemsize: int = 2) -> float:
    """Rough memory for grounding one clip: the language model's linear layers at `quant`, everything
    else (vision, projector, decoder, embeddings, lm_head, KV cache, the largest transient activations)
    at `itemsize` bytes (2: bf16/fp16, 4: fp32). An estimate for advice in error messages, not a
    guarantee."""
    t, v = config.text_config, config.vision_config
    h, inter, n_l = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    kv = t.num_key_value_heads * (h // t.num_attention_heads)
    llm_layer = h * (h + 2 * kv) + h * h + 3 * h * inter
    emb = 2 * t.vocab_size * h
    vh, vi, vl = v.hidden_size, v.intermediate_size, v.num_hidden_layers
    vision = vl * (4 * vh * vh + 2 * vh * vi) + config.text_config.hidden_size * (vh + h)
    d = config.decoder_hidden_size
    decoder = 3 * h * d + (config.decoder_layers + config.text_condition_layers) * 12 * d * d
    per_param = itemsize if quant == "none" else _BYTES_PER_PARAM[quant]
    weights = n_l * llm_layer * per_param + (emb + vision + decoder) * itemsize
    grid = v.image_size // v.patch_size
    tokens = frames * ((grid + 1) // 2) ** 2 + frames * 8 + 128
    kv_cache = 2 * n_l * kv * tokens * itemsize
    act = (tokens * (4 * h + 2 * inter) + frames * grid * grid * (vi + 3 * vh + h)) * itemsize
    return (weights + kv_cache + act) / 1024**3 * 1.1 + 0.5  # + CUDA context and allocator slack


def oom_message(config, quant: str, frames: int, free_gib: float, total_gib: float, itemsize: int = 2,
                half: str = "bfloat16") -> str:
    """The one-line OOM error: estimated need, what is free, and the mildest change that should fit
    (float32 to `half`, the 2-byte dtype this GPU computes in, first; then the same quantization with
    fewer frames, then a lower precision; never the setting that failed)."""
    need = estimate_memory_gib(config, quant, frames, itemsize)
    rank = {"none": 0, "8bit": 1, "4bit": 2}
    fits = []
    for size in sorted({itemsize, 2}, reverse=True):
        for q in ("none", "8bit", "4bit"):
            for f in sorted({frames, 64, 48, 32, 16, 8}, reverse=True):
                if (f <= frames and (q, f, size) != (quant, frames, itemsize)
                        and estimate_memory_gib(config, q, f, size) <= free_gib * 0.9):
                    fits.append((q != quant, frames - f, rank[q], size != itemsize, q, f, size))
                    break
    if fits:
        *_, q, f, size = min(fits)
        opts = " ".join(o for o in (f"--dtype {half}" if size != itemsize else "",
                                    f"--quant {q}" if q != quant else "",
                                    f"--frames {f}" if f != frames else "") if o)
        advice = f"; try {opts}"
    else:
        advice = "; even --quant 4bit --frames 8 does not fit: free the GPU or use a larger one"
    return (f"out of GPU memory: --quant {quant} with {frames} frames needs about {need:.1f} GiB, "
            f"{free_gib:.1f} GiB of {total_gib:.1f} GiB is free{advice}")


@contextmanager
def cuda_oom_guard(config, quant: str, frames: int, device: str, itemsize: int = 2):
    """Turn torch.cuda.OutOfMemoryError into a UserError that says what was needed, what is free
    and which --quant / --frames would fit, instead of a CUDA traceback."""
    import torch

    try:
        yield
    except torch.cuda.OutOfMemoryError:
        try:
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(torch.device(device))
        except Exception:  # noqa: BLE001 - the advice must not mask the real error
            free, total = 0, 0
        raise ModelError(oom_message(config, quant, frames, free / 1024**3, total / 1024**3, itemsize,
                                     str(gpu_half_dtype(device)).removeprefix("torch."))) from None


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
    span_decoding: str = "joint"  # how the answer is decoded, see pipeline.run_model

    @property
    def training_vocabulary(self) -> set[str] | None:
        vocab = getattr(self.model.config, "training_vocabulary", None)
        return set(vocab) if vocab else None


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device != "cpu" and m is None:
        raise UserError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    if m is not None and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible to torch; use --device cpu "
                        "(or install a CUDA build of torch, see README)")
    if m is not None and m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise UserError(f"--device {device}: this machine has {n} CUDA GPU{'s' if n != 1 else ''} "
                        f"(cuda:0{f' to cuda:{n - 1}' if n > 1 else ''})")
    return device


DTYPES = ("auto", "float32", "bfloat16", "float16")


def gpu_half_dtype(device: str):
    """The 2-byte dtype a GPU computes in: bfloat16 on Ampere and later (and ROCm), float16 on older
    ones (T4, V100), where bfloat16 is emulated. Asks `device` itself, not the current device."""
    import torch

    if torch.version.hip:
        return torch.bfloat16
    try:
        major = torch.cuda.get_device_properties(torch.device(device)).major
    except Exception:  # noqa: BLE001 - no such GPU: loading says so; this only picks a dtype
        return torch.float16
    return torch.bfloat16 if major >= 8 else torch.float16


def cpu_computes_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX512-BF16 or AMX), where --dtype bfloat16 is faster than
    float32; elsewhere it is emulated. Asks torch's CPU feature checks (private, hence guarded)."""
    import torch

    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except Exception:  # noqa: BLE001 - an older or newer torch without them: no hint, nothing else changes
        return False


def resolve_dtype(dtype: str, device: str):
    """The torch dtype the unquantized weights run in. auto: bfloat16 on a GPU that computes in it
    (Ampere and later), else float16; float32 on a CPU. bfloat16 on a CPU is opt-in: it is faster
    only on CPUs with bf16 instructions (AVX512-BF16, AMX), and it changes boxes a little (README),
    so as a default the same clip would give other numbers on another machine."""
    import torch

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return gpu_half_dtype(device) if device.startswith("cuda") else torch.float32
    if dtype == "float16" and not device.startswith("cuda"):
        raise UserError("--dtype float16 on a CPU runs several times slower than float32 (few CPUs compute "
                        "in it); use --dtype bfloat16 or float32")
    return getattr(torch, dtype)


def _attn_implementation(device: str) -> str:
    """flash-attention 2 when installed and on CUDA, else PyTorch's sdpa."""
    if device.startswith("cuda"):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return "sdpa"


def quantization_config(quant: str, device: str = "cuda", compute=None):
    """bitsandbytes settings: NF4 + double quant (4bit) or LLM.int8 (8bit), NF4 computing in
    `compute` (default: the dtype --dtype auto picks for `device`). The vision tower, projector,
    space decoder and lm_head stay unquantized: they are small, and the decoder's boxes are
    sensitive to quantization noise."""
    from transformers import BitsAndBytesConfig

    skip = ["model.vision_tower", "model.multi_modal_projector", "space_decoder", "lm_head"]
    if quant == "4bit":
        compute = compute or resolve_dtype("auto", device)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def check_quantization_available(quant: str) -> None:
    """--quant 4bit/8bit loads through bitsandbytes, which transformers drives with accelerate."""
    import importlib.util

    missing = [m for m in ("bitsandbytes", "accelerate") if importlib.util.find_spec(m) is None]
    if quant != "none" and missing:
        raise UserError(f"--quant {quant} needs {' and '.join(missing)}: pip install "
                        f"{' '.join(missing)} (or use --quant none)")


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "auto", quant: str | None = None,
               registry_file: str | os.PathLike | None = None, allow_pickle: bool = False,
               frames: int | None = None, span_decoding: str = "joint", dtype: str = "auto") -> LoadedModel:
    """Load a registered model by name, or a model directory by path. Default: the built-in model.

    `frames` only sharpens the advice of an out-of-memory error (default: the model's).
    `span_decoding`: "joint" (default) or "text", see `pipeline.run_model`.
    `dtype`: auto, float32, bfloat16 or float16, see `resolve_dtype`."""
    import pickle

    import torch
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    from .models.spacevllm import SpaceVLLMConfig, SpaceVLLMForConditionalGeneration, SpaceVLLMProcessor
    from .pipeline import check_span_decoding

    check_span_decoding(span_decoding)
    hf_logging.disable_progress_bar()  # stg's own bars and stderr lines only
    hf_logging.set_verbosity_error()
    name = str(name_or_path or DEFAULT_MODEL)
    entries = registry(registry_file)
    if name_or_path is not None and not str(name_or_path).strip():
        raise UserError("--model is empty; pass a registered model name or a model directory")
    entry = entries.get(name)
    if entry is not None and entry.architecture.get("type") == "llava-next":
        raise ModelError(f"model '{name}' is a base checkpoint, not a grounding model; build one from it with "
                         f"`stg weights init spacevllm-7b --from DIR` and use --model spacevllm-7b")
    # the flags first: a mistake there must not wait for 16 GB of weights to be hashed
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if quant is not None and quant not in ("none", "4bit", "8bit"):
        raise UserError(f"--quant {quant}: expected none, 4bit or 8bit")
    # A model whose default is 4-bit (the 7B) loads unquantized on a CPU unless --quant says otherwise:
    # bitsandbytes on CPU saves memory, not time.
    quant = quant or (entry.default_quant if entry and device.startswith("cuda") else "none")
    check_quantization_available(quant)
    if entry is not None:
        if entry.kind == "hf":
            entry.pinned_revision()
        directory = entry.local_dir()
        if directory is None or not directory.is_dir():
            raise ModelError(f"model '{name}' is not on this machine; {_get_hint(entry)}")
        verify(entry, directory)
        digest = _model_digest(directory, entry.files)
    else:
        directory = Path(name).expanduser()
        if not directory.exists():
            known = ", ".join(sorted(entries)) or "none"
            raise ModelError(f"{name}: no such model name or directory (registered models: {known})")
        if not directory.is_dir() or not (directory / "config.json").is_file():
            raise ModelError(f"{directory}: not a model directory (needs config.json, safetensors weights, "
                             "tokenizer and processor_config.json)")
        # A registered model's own folder, or a build with its manifest, is checked even by path.
        same = [e for e in entries.values() if (d := e.local_dir()) is not None and d.is_dir()
                and d.resolve() == directory.resolve()]
        pinned = same[0] if same else ModelEntry(name=str(directory), source=str(directory))
        if same or (directory / MANIFEST).is_file():
            verify(pinned, directory)
        digest = _model_digest(directory, pinned.files)
    use_st = _check_safetensors(directory, allow_pickle)
    kwargs: dict = {"use_safetensors": use_st, "attn_implementation": _attn_implementation(device)}
    if quant != "none":
        kwargs["quantization_config"] = quantization_config(quant, device, torch_dtype)
        kwargs["device_map"] = {"": device}  # one device, everything on it
        # stderr is for stg's own lines: LLM.int8 logs a warning on every call whose input is not fp16
        # (fp32 on CPU), and on a CPU with AVX512-BF16 bitsandbytes' import says to `pip install kernels`
        # (an optional kernel it would fetch from the Hub at run time, which stg does not do)
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    _check_model_type(directory)
    missing = [f for f in ("processor_config.json", "tokenizer.json") if not (directory / f).is_file()]
    if missing:
        raise ModelError(f"{directory}: {' and '.join(missing)} missing; a model directory holds config.json, the "
                         "weights, tokenizer.json and processor_config.json (save_pretrained writes them all)")
    try:
        config = SpaceVLLMConfig.from_pretrained(str(directory))
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:
        raise ModelError(f"{directory}: cannot read config.json ({e})") from e
    n_frames = frames or (entry.default_frames if entry else int(getattr(config, "num_frames", 16)))
    if device == "cpu":  # the weights only: --frames is what was asked, a short clip samples fewer
        _check_cpu_memory(config, quant, 1, torch_dtype.itemsize)
    try:
        with cuda_oom_guard(config, quant, n_frames, device, torch_dtype.itemsize):
            model, info = SpaceVLLMForConditionalGeneration.from_pretrained(
                str(directory), dtype=torch_dtype, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
            if quant == "none":
                model.to(device)
        processor = SpaceVLLMProcessor.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError, StrictDataclassError,
            pickle.UnpicklingError) as e:
        if isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        if isinstance(e, pickle.UnpicklingError):
            raise ModelError(f"{directory}: the pickle checkpoint holds more than tensors (code or other objects); "
                             "stg will not run it: ask its source for safetensors") from e
        raise ModelError(f"{directory}: cannot load model ({type(e).__name__}: {e})") from e
    _check_loading_info(directory, info)
    _check_processor_fits(directory, processor, model.config)
    model.eval()
    return LoadedModel(model=model, processor=processor, name=entry.name if entry else str(directory),
                       sha256=digest, device=device, dtype=str(torch_dtype).replace("torch.", ""),
                       quantization=quant, default_frames=entry.default_frames if entry else
                       int(getattr(model.config, "num_frames", 16)), span_decoding=span_decoding)


def _check_model_type(directory: Path) -> None:
    """Refuse, before anything is built, a config.json that is not a SpaceVLLM model's: transformers
    would fill the gaps with defaults (an empty config builds a 7B language model in fp32)."""
    try:
        raw = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{directory}/config.json: cannot read it ({e})") from None
    kind = raw.get("model_type") if isinstance(raw, dict) else None
    if kind != "spacevllm" or not all(isinstance(raw.get(k), dict) for k in ("text_config", "vision_config")):
        what = f"model_type {kind!r}" if kind else "no model_type"
        raise ModelError(f"{directory}/config.json: {what}, not a complete SpaceVLLM config (needs model_type "
                         "\"spacevllm\", text_config and vision_config); for LLaVA-Video weights run "
                         "`stg weights init spacevllm-7b --from DIR`")


def _check_processor_fits(directory: Path, processor, config) -> None:
    """processor_config.json and tokenizer must make the inputs config.json's model expects."""
    st, vc = processor.settings, config.vision_config
    if (st.image_size, st.patch_size) != (vc.image_size, vc.patch_size):
        raise ModelError(f"{directory}/processor_config.json: image_size {st.image_size} / patch_size {st.patch_size} "
                         f"do not match the vision tower's {vc.image_size} / {vc.patch_size} in config.json")
    tok = processor.tokenizer
    for token, want in ((st.video_token, config.video_token_index), (st.query_token, config.query_token_index)):
        got = tok.convert_tokens_to_ids(token)
        if got != want:
            raise ModelError(f"{directory}: token {token!r} is id {got} in the tokenizer but {want} in config.json; "
                             "the tokenizer belongs to another model")


def _check_loading_info(directory: Path, info: dict) -> None:
    """Weights that do not fill the model exactly would run with random tensors: refuse them."""
    problems = []
    for key, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"),
                      ("mismatched_keys", "of the wrong shape")):
        keys = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or ())
        if keys:
            problems.append(f"{len(keys)} tensor(s) {what} (e.g. {keys[0]})")
    if problems:
        raise ModelError(f"{directory}: the weights do not match config.json: {'; '.join(problems)}; the file is "
                         "incomplete or belongs to another model")


def _model_digest(directory: Path, files: dict) -> str | None:
    """What the result records as the model's sha256: the single weights file's digest, or for a
    sharded model the digest of its stg-manifest.json's file map (which pins every shard; the
    manifest's build time is left out, so two identical builds record the same digest)."""
    if "model.safetensors" in files:
        return files["model.safetensors"]
    if (directory / "model.safetensors").is_file():
        return sha256_file(directory / "model.safetensors")
    if (directory / MANIFEST).is_file():
        pinned = expected_digests(ModelEntry(name=str(directory)), directory)[0]
        return hashlib.sha256(json.dumps(pinned, sort_keys=True).encode()).hexdigest()
    if (directory / "pytorch_model.bin").is_file():  # an --allow-pickle load is recorded too
        return sha256_file(directory / "pytorch_model.bin")
    return None
