"""`stg train`: train a SpaceVLLM model on shapes-world clips drawn on the fly.

Loss = LM cross-entropy on the answer text + L1 + GIoU on boxes of frames inside the true span
+ BCE on per-frame presence. Deterministic for a seed: the data of step k is drawn from
(seed, k) alone, so `--resume` continues with exactly the batches an uninterrupted run would see.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from .errors import UserError, did_you_mean


@dataclass
class TrainConfig:
    out_dir: str = "runs/tiny"
    seed: int = 0
    steps: int = 3000
    batch_size: int = 8
    lr: float = 6e-4
    min_lr_ratio: float = 0.05
    warmup_steps: int = 150
    decay_steps: int = 0            # cosine decay over the last decay_steps steps, the peak held before; 0: all
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    num_frames: int = 16
    min_frames: int = 10            # frame count varies per batch between these for robustness
    max_frames: int = 24
    decode_frames: int = 0          # in-span frames per clip with a box loss each step; 0: all
    vary_frames_prob: float = 0.3
    short_prob: float = 0.0         # share of batches of short clips: many scenes, few frames each
    short_frames: int = 4           # frames per clip in those; as many clips as keep the batch's frame count
    native_fraction: float = 0.3    # clips drawn at their own size then resized like the processor
    jpeg_prob: float = 0.5          # compression artefacts, standing in for H.264
    blur_prob: float = 0.2
    checkpoint_every: int = 250
    log_every: int = 10
    threads: int = 0                # 0: torch's default
    data_workers: int = 1           # processes drawing clips ahead of the training step
    max_minutes: float = 0.0        # stop (and save) once trained this long, resumed legs included; 0: no limit
    stop_step: int = 0              # end after this step, the schedule still planned over `steps`; 0: at `steps`
    twin_prob: float = 0.3          # share of clips with a twin of the target (synth.sample_clip)
    shared_prob: float = 0.7        # share whose first distractor has the target's colour or shape
    model: dict = field(default_factory=dict)   # overrides of tiny_config fields
    init_from: str = ""             # a model folder whose weights start the run (an earlier leg); "": random
    train_only: str | list = ""     # "box_refiner" / "temporal_presence" / "box_verifier" (or a list) / "space_decoder"
                                    # (all of it): train those parts alone, on the same batches, the rest frozen

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts `train_only` names, in TRAINABLE order; () trains the whole model."""
        return tuple(p for p in TRAINABLE if p in self._train_only_names())

    def _train_only_names(self) -> list[str]:
        """`train_only` as a list, whether written as one name or as several."""
        return [self.train_only] if isinstance(self.train_only, str) else list(self.train_only)

    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{p}: training config not found; pass a TOML file (see examples/train-tiny.toml)")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not valid TOML ({e})") from None
        if "train" in data:
            others = sorted(set(data) - {"train"})
            if others:  # a table or key beside [train] would be silently ignored
                raise UserError(f"{p}: {', '.join(others)} outside [train]; put every option in the [train] table")
            data = data["train"]
            if not isinstance(data, dict):
                raise UserError(f"{p}: train must be a table ([train]), got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            guesses = [u + did_you_mean(u, known) for u in unknown]
            raise UserError(f"{p}: unknown training option(s) {', '.join(guesses)}; known: {', '.join(sorted(known))}")
        cfg = cls(**data)
        cfg.check(p)
        return cfg

    def check(self, where: str | Path = "training config") -> None:
        """Types and ranges, so a typo is one line here rather than a crash (or a silent no-op) later."""
        defaults = {f.name: f.default for f in fields(self) if f.name != "model"}
        for name, default in defaults.items():
            v = getattr(self, name)
            ok = isinstance(v, type(default)) and not isinstance(v, bool)
            if name == "train_only":
                ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v))
            if isinstance(default, float):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not ok:
                kind = "a string or a list of strings" if name == "train_only" else type(default).__name__
                raise UserError(f"{where}: {name} = {v!r} must be {kind}")
        if not isinstance(self.model, dict):
            raise UserError(f"{where}: model must be a table of model config overrides")
        rules = [("steps", self.steps >= 1), ("batch_size", self.batch_size >= 1), ("lr", self.lr > 0),
                 ("log_every", self.log_every >= 1), ("checkpoint_every", self.checkpoint_every >= 1),
                 ("num_frames", self.num_frames >= 1), ("short_frames", self.short_frames >= 1),
                 ("warmup_steps", self.warmup_steps >= 0),
                 ("decay_steps", 0 <= self.decay_steps <= max(0, self.steps - self.warmup_steps)),
                 ("min_frames", 1 <= self.min_frames <= self.max_frames), ("decode_frames", self.decode_frames >= 0),
                 ("threads", self.threads >= 0), ("data_workers", self.data_workers >= 0),
                 ("max_minutes", self.max_minutes >= 0),
                 ("stop_step", 0 <= self.stop_step <= self.steps), ("weight_decay", self.weight_decay >= 0),
                 ("grad_clip", self.grad_clip > 0), ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1)]
        rules += [(n, 0 <= getattr(self, n) <= 1) for n in ("vary_frames_prob", "native_fraction", "jpeg_prob",
                                                             "blur_prob", "twin_prob", "shared_prob", "short_prob")]
        named = self._train_only_names()
        rules.append(("train_only", all(p in TRAIN_ONLY for p in named) and len(set(named)) == len(named)
                      and (isinstance(self.train_only, str) or all(named))
                      and ("space_decoder" not in named or len(named) == 1)))  # it holds the others
        for name, ok in rules:
            if not ok:
                extra = f" (max_frames is {self.max_frames})" if name == "min_frames" else ""
                extra = f"; known: {', '.join(map(repr, TRAIN_ONLY))}" if name == "train_only" else extra
                raise UserError(f"{where}: {name} = {getattr(self, name)!r} is out of range{extra}")
        _check_model_overrides(self.model, where)
        if self.parts and not self.init_from:
            raise UserError(f"{where}: train_only = {self.train_only!r} trains part of a trained model; set "
                            "init_from to that model's folder")
        for part in self.parts:
            if part in PARTS and self.model.get(part) is None:
                raise UserError(f"{where}: train_only = {self.train_only!r} needs the part itself: add "
                                f"model.{part} = {{}} (or its settings)")


# Parts a leg may train alone (`train_only`), by the config field that adds them, with their weights'
# prefix; "" trains the whole model.
PARTS = {"box_refiner": "space_decoder.refiner.", "temporal_presence": "space_decoder.temporal.",
         "box_verifier": "space_decoder.verifier."}
# What `train_only` may name: those, or the whole space decoder (they included) on the frozen language
# model's features, whose forward a step pays for anyway.
TRAINABLE = {"space_decoder": "space_decoder.", **PARTS}
TRAIN_ONLY = ("", *TRAINABLE)


def _part_class(field: str):
    from .models.spacevllm.modeling_spacevllm import BoxRefiner, BoxVerifier, TemporalPresence

    return {"box_refiner": BoxRefiner, "temporal_presence": TemporalPresence, "box_verifier": BoxVerifier}[field]


def _check_model_overrides(overrides: dict, where) -> None:
    """`model = {...}` keys must be config fields: a misspelt one would change nothing, silently."""
    from .models.spacevllm.configuration_spacevllm import tiny_config

    base = tiny_config(8, 1, 2, 3, 0, 4, ["a"]).to_dict()
    for key, value in overrides.items():
        if key not in base:
            raise UserError(f"{where}: model.{key} is not a SpaceVLLM config field")
        if key in PARTS:
            known = _part_class(key).SETTINGS
            unknown = sorted(set(value) - set(known)) if isinstance(value, dict) else None
            if unknown is None or unknown:
                what = f"has no setting {unknown[0]!r}" if unknown else "must be a table"
                raise UserError(f"{where}: model.{key} {what} (settings: {', '.join(known)})")
        if key in ("vision_config", "text_config"):
            if not isinstance(value, dict):
                raise UserError(f"{where}: model.{key} must be a table")
            unknown = sorted(set(value) - set(base[key]))
            if unknown:
                raise UserError(f"{where}: model.{key}.{unknown[0]} is not a {key} field")


def new_tiny_model(cfg: TrainConfig, seed: int):
    """A freshly initialised built-in-size model and its processor."""
    import torch

    from .models.spacevllm import SpaceVLLMForConditionalGeneration, SpaceVLLMProcessor
    from .models.spacevllm.configuration_spacevllm import tiny_config
    from .models.spacevllm.processing_spacevllm import ProcessorSettings, build_word_tokenizer
    from .synth import VOCABULARY

    tok = build_word_tokenizer(VOCABULARY)
    ids = tok.convert_tokens_to_ids
    config = tiny_config(len(tok), ids("<image>"), ids("<video>"), ids("<stq>"), tok.pad_token_id,
                         tok.eos_token_id, VOCABULARY, overrides={**cfg.model, "num_frames": cfg.num_frames})
    torch.manual_seed(seed)
    model = SpaceVLLMForConditionalGeneration(config)
    vc = config.vision_config
    settings = ProcessorSettings(image_size=vc.image_size, patch_size=vc.patch_size,
                                 time_decimals=config.time_decimals)
    return model, SpaceVLLMProcessor(tok, settings)


# One row per patch of the input grid: these change shape with the input size, nothing else does.
GRID_TENSORS = ("model.vision_tower.embeddings.position_embedding.weight", "space_decoder.pos_embed")


# Optional space-decoder parts a later leg may switch on (`motion_features`, `attr_classes`, PARTS): the
# earlier model lacks them, so they start fresh, and the motion path's and the temporal presence head's
# last layers start at zero so the new model computes exactly what the earlier one did until training
# moves it.
ADDABLE = ("space_decoder.motion_in.", "space_decoder.motion_conv.", "space_decoder.attr_head.", *PARTS.values())
ZERO_START = ("space_decoder.motion_conv.", "space_decoder.temporal.out.")


def init_weights(model, src: str | Path) -> None:
    """Load an earlier model's weights into `model` (a later training leg). When the input size
    changed, the per-patch position embeddings are resized bicubically over the patch grid, as
    transformers' SigLIP does for `interpolate_pos_encoding`, so a model trained fast at a small
    size goes on at a larger one. Optional decoder parts the earlier model lacks (ADDABLE) start
    fresh. Any other difference is refused: it is another model."""
    import torch
    import torch.nn.functional as F

    from .models.spacevllm import SpaceVLLMForConditionalGeneration

    if not (Path(src) / "model.safetensors").is_file():
        raise UserError(f"{src}: init_from needs a model folder with model.safetensors (a run's model/ folder)")
    try:
        weights = SpaceVLLMForConditionalGeneration.from_pretrained(src).state_dict()
    except Exception as e:  # noqa: BLE001 - safetensors, json and transformers each raise their own
        raise UserError(f"{src}: cannot load init_from model ({type(e).__name__}: {e})") from None
    own = model.state_dict()
    for name in GRID_TENSORS:
        w, want = weights[name], own[name]
        if w.shape != want.shape and w.shape[1:] == want.shape[1:]:
            g0, g1 = math.isqrt(w.shape[0]), math.isqrt(want.shape[0])
            grid = w.T.reshape(1, -1, g0, g0).float()
            w = F.interpolate(grid, size=(g1, g1), mode="bicubic", align_corners=False)
            weights[name] = w.reshape(-1, g1 * g1).T.to(want.dtype).contiguous()
    for name, w in weights.items():
        if name not in own or own[name].shape != w.shape:
            have = tuple(own[name].shape) if name in own else "no such tensor"
            raise UserError(f"{src}: init_from weight {name} is {tuple(w.shape)}, this config's model has {have}; "
                            "init_from needs the same model apart from its input size")
    for name, w in own.items():
        if name in weights:
            continue
        if not name.startswith(ADDABLE):
            raise UserError(f"{src}: init_from model has no weight {name}; init_from needs the same model apart "
                            "from its input size and the optional motion_features / attr_classes / box_refiner / "
                            "temporal_presence / box_verifier parts")
        weights[name] = torch.zeros_like(w) if name.startswith(ZERO_START) else w.clone()
    with torch.no_grad():
        model.load_state_dict(weights, strict=True)


def _augment(frames: np.ndarray, rng: np.random.Generator, cfg: TrainConfig) -> np.ndarray:
    import cv2

    if rng.random() < cfg.blur_prob:
        s = float(rng.uniform(0.3, 0.9))
        frames = np.stack([cv2.GaussianBlur(f, (0, 0), s) for f in frames])
    if rng.random() < cfg.jpeg_prob:
        q = int(rng.integers(35, 95))
        out = []
        for f in frames:
            ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, q])
            out.append(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED))
        frames = np.stack(out)
    return frames


def _attr_classes(o) -> tuple[int, int, int]:
    """A shapes-world object's colour, shape and motion classes, 1-based (0 is "none")."""
    from .synth import COLOURS, MOTIONS, SHAPES

    return list(COLOURS).index(o.colour) + 1, SHAPES.index(o.shape) + 1, MOTIONS.index(o.motion) + 1


def patch_labels(spec, times: np.ndarray, grid: int) -> np.ndarray:
    """(F, grid*grid, 3) int64: per sampled frame and patch, the colour, shape and motion class
    (1-based; 0 = background) of the topmost visible object there. A patch belongs to an object
    when its centre lies in the object's box, and the patch holding the box centre always does
    (objects can be smaller than a patch). Targets of the dense attribute loss."""
    centres = (np.arange(grid) + 0.5) / grid
    out = np.zeros((len(times), grid, grid, 3), np.int64)
    for o in spec.objects:  # drawing order: later objects cover earlier ones
        cls = _attr_classes(o)
        for i, t in enumerate(times):
            if not o.visible(t):
                continue
            x1, y1, x2, y2 = np.array(o.box(t)) / [spec.width, spec.height, spec.width, spec.height]
            cols = (centres >= x1) & (centres <= x2)
            rows = (centres >= y1) & (centres <= y2)
            cols[min(max(int((x1 + x2) / 2 * grid), 0), grid - 1)] |= not cols.any()
            rows[min(max(int((y1 + y2) / 2 * grid), 0), grid - 1)] |= not rows.any()
            out[i][np.ix_(rows, cols)] = cls
    return out.reshape(len(times), grid * grid, 3)


def draw_sample(rng: np.random.Generator, processor, n_frames: int, cfg: TrainConfig) -> dict:
    """One training sample: a fresh clip, its sampled frames at model size, and the targets."""
    import cv2

    from .synth import render_frame, sample_clip

    while True:  # with few frames, none may fall inside the target's span: draw another clip
        spec = sample_clip(rng, twin_prob=cfg.twin_prob, shared_prob=cfg.shared_prob)
        idx = np.unique(np.linspace(0, spec.num_frames - 1, n_frames).round().astype(int))
        times = idx / spec.fps
        if any(spec.objects[spec.target].visible(t) for t in times):
            break
    s = processor.settings.image_size
    if rng.random() < cfg.native_fraction:
        interp = [cv2.INTER_AREA, cv2.INTER_LINEAR, cv2.INTER_CUBIC][int(rng.integers(3))]
        frames = np.stack([cv2.resize(render_frame(spec, t, rng), (s, s), interpolation=interp) for t in times])
    else:
        frames = np.stack([render_frame(spec, t, rng, (s, s), noise_scale=None) for t in times])
    frames = _augment(frames, rng, cfg)
    objects = object_boxes(spec, times)
    in_span = objects["obj_visible"][:, spec.target]
    first, last = np.flatnonzero(in_span)[[0, -1]]
    prompt, text_mask = processor.encode_prompt(spec.query, times)
    answer = processor.encode_answer(times[first], times[last])
    grid = processor.settings.image_size // processor.settings.patch_size
    return {"pixels": processor.preprocess_frames(frames), "prompt": prompt, "text_mask": text_mask,
            "answer": answer, "in_span": in_span, "boxes": objects["obj_boxes"][:, spec.target], "spec": spec,
            "times": times, "patch_labels": patch_labels(spec, times, grid), **objects}


MAX_OBJECTS = 4  # the shapes world's most objects per clip


def object_boxes(spec, times: np.ndarray) -> dict:
    """Every object's normalised xyxy box (F, M, 4) and visibility (F, M) on the sampled frames, which
    is the target (M,), and its colour, shape and motion classes (M, 3; 1-based, as patch_labels'),
    padded to MAX_OBJECTS: the box verifier's positives and negatives."""
    n = MAX_OBJECTS
    boxes = np.zeros((len(times), n, 4), np.float32)
    visible = np.zeros((len(times), n), bool)
    target = np.zeros(n, bool)
    target[spec.target] = True
    attrs = np.zeros((n, 3), np.int64)
    scale = np.array([spec.width, spec.height, spec.width, spec.height], np.float32)
    for m, o in enumerate(spec.objects):
        attrs[m] = _attr_classes(o)
        for i, t in enumerate(times):
            boxes[i, m] = np.clip(np.asarray(o.box(t), np.float32) / scale, 0, 1)
            visible[i, m] = o.visible(t)
    return {"obj_boxes": boxes, "obj_visible": visible, "obj_target": target, "obj_attrs": attrs}


def collate(samples: list[dict], pad_id: int) -> dict:
    import torch

    n = max(len(s["prompt"]) + len(s["answer"]) for s in samples)
    f = max(len(s["times"]) for s in samples)
    b = len(samples)
    ids = torch.full((b, n), pad_id, dtype=torch.long)
    att = torch.zeros((b, n), dtype=torch.long)
    labels = torch.full((b, n), -100, dtype=torch.long)
    tmask = torch.zeros((b, n), dtype=torch.bool)
    for i, s in enumerate(samples):
        seq = s["prompt"] + s["answer"]
        ids[i, :len(seq)] = torch.tensor(seq)
        att[i, :len(seq)] = 1
        labels[i, len(s["prompt"]):len(seq)] = torch.tensor(s["answer"])
        tmask[i, :len(s["text_mask"])] = torch.tensor(s["text_mask"])
    assert all(len(s["times"]) == f for s in samples), "a batch shares one frame count"
    return {"input_ids": ids, "attention_mask": att, "labels": labels, "text_mask": tmask,
            "pixel_values_videos": torch.from_numpy(np.stack([s["pixels"] for s in samples])),
            "gt_boxes": torch.from_numpy(np.stack([s["boxes"] for s in samples])),
            "gt_in_span": torch.from_numpy(np.stack([s["in_span"] for s in samples])),
            "patch_labels": torch.from_numpy(np.stack([s["patch_labels"] for s in samples])),
            **{k: torch.from_numpy(np.stack([s[k] for s in samples]))
               for k in ("obj_boxes", "obj_visible", "obj_target", "obj_attrs")}}


def make_batch(cfg: TrainConfig, processor, step: int) -> dict:
    """The batch of `step`, a pure function of (seed, step)."""
    import torch

    rng = np.random.default_rng([cfg.seed, step])
    n_frames, batch_size = cfg.num_frames, cfg.batch_size
    # Short clips teach what is in a frame (colour, shape, where) from many more scenes for the same
    # compute; neighbouring frames of one clip teach nearly the same thing. No draw when off, so a
    # config without them keeps its data stream.
    if cfg.short_prob and rng.random() < cfg.short_prob:
        n_frames = cfg.short_frames
        batch_size = max(1, cfg.batch_size * cfg.num_frames // cfg.short_frames)
    elif rng.random() < cfg.vary_frames_prob:
        n_frames = int(rng.integers(cfg.min_frames, cfg.max_frames + 1))
    samples = [draw_sample(rng, processor, n_frames, cfg) for _ in range(batch_size)]
    # Clips shorter than n_frames frames sample fewer; keep the batch rectangular.
    f = min(len(s["times"]) for s in samples)
    if any(len(s["times"]) != f for s in samples):
        samples = [s for s in samples if len(s["times"]) == f] or samples[:1]
    batch = collate(samples, processor.tokenizer.pad_token_id)
    # Box loss on a few in-span frames per clip: the decoder is the costly part of a step, and
    # neighbouring frames teach it nearly the same thing.
    scores = torch.from_numpy(rng.random(batch["gt_in_span"].shape)) * batch["gt_in_span"]
    k = min(cfg.decode_frames or scores.shape[1], scores.shape[1])
    top = scores.topk(k, dim=1).indices
    batch["decode_mask"] = torch.zeros_like(batch["gt_in_span"]).scatter_(1, top, True) & batch["gt_in_span"]
    return batch


def _batches(cfg: TrainConfig, processor, start: int, workers: int):
    """Batches start..(stop_step or steps)-1, drawn in a background process so rendering overlaps the step."""
    import torch

    class Steps(torch.utils.data.IterableDataset):
        def __iter__(self):
            return (make_batch(cfg, processor, k) for k in range(start, _last_step(cfg)))

    def init(_):
        import signal

        import cv2

        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        # A terminal's Ctrl-C and a job scheduler's SIGTERM reach the whole process group. The trainer
        # saves its steps and then stops this worker; a worker the signal killed first made torch's
        # SIGCHLD handler raise in the middle of that save (a torn checkpoint.tmp, the steps lost).
        # torch ends the worker when the trainer is gone, however it went.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

    if workers == 0:
        return iter(Steps())
    return iter(torch.utils.data.DataLoader(Steps(), batch_size=None, num_workers=workers, prefetch_factor=4,
                                            worker_init_fn=init, persistent_workers=False))


def _lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine down to min_lr_ratio: over the whole rest of the run, or, with
    decay_steps, over its last decay_steps steps only (the peak held until then: a fixed budget's
    run then spends most of its steps at a rate high enough to learn, and anneals at the end)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay = cfg.decay_steps or cfg.steps - cfg.warmup_steps
    p = min(1.0, max(0.0, (step - (cfg.steps - decay)) / max(1, decay)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# What a resumed run may change: how long it runs and how it reports, never what it learns from.
RESUMABLE = ("out_dir", "steps", "stop_step", "max_minutes", "checkpoint_every", "log_every", "data_workers", "threads")


def _fixed_settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE}


def save_checkpoint(model, processor, optimizer, step: int, out_dir: Path, log: list[dict],
                    config: dict | None = None, elapsed_s: float | None = None) -> Path:
    """Write model + processor (a complete model directory) and the optimizer state; swap atomically.
    `elapsed_s` (training time so far) lets a resumed run count max_minutes over all its legs."""
    import shutil

    import torch

    ckpt = out_dir / "checkpoint"
    tmp = out_dir / "checkpoint.tmp"
    old = out_dir / "checkpoint.old"
    if tmp.exists():  # a crash while writing left it
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    processor.save_pretrained(tmp)
    # The optimizer state is ours (not a user's download), written and read by this code only.
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    state = {"step": step, "log": log, **({"config": config} if config is not None else {}),
             **({"elapsed_s": round(elapsed_s, 3)} if elapsed_s is not None else {})}
    (tmp / "trainer_state.json").write_text(json.dumps(state) + "\n")
    if ckpt.exists():
        if old.exists():  # stale beside a good checkpoint (a crash after the swap, before its cleanup)
            shutil.rmtree(old)
        ckpt.rename(old)
    tmp.rename(ckpt)
    if old.exists():  # without a checkpoint, .old was the valid one (a crash mid-swap) until now
        shutil.rmtree(old)
    return ckpt


def _load_checkpoint(out_dir: Path, cfg: TrainConfig | None = None):
    """(model, processor, step, log, optimizer state, seconds trained) from OUT_DIR/checkpoint, or from
    checkpoint.old when
    a crash came between the two renames of a checkpoint swap; a broken one is one line, exit 2. With
    `cfg`, a config that changes what the run learns from (anything but RESUMABLE) is refused."""
    import torch

    from .models.spacevllm import SpaceVLLMForConditionalGeneration, SpaceVLLMProcessor

    ckpt = out_dir / "checkpoint"
    if not ckpt.is_dir() and (out_dir / "checkpoint.old").is_dir():
        ckpt = out_dir / "checkpoint.old"
    if not ckpt.is_dir():
        raise UserError(f"{out_dir / 'checkpoint'}: no checkpoint to resume from; run without --resume to start "
                        "fresh")
    missing = [f for f in ("model.safetensors", "config.json", "trainer_state.json", "optimizer.pt")
               if not (ckpt / f).is_file()]
    if missing:
        raise UserError(f"{ckpt}: incomplete checkpoint ({', '.join(missing)} missing); resume from a copy or start "
                        "fresh in another out_dir")
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        step, log = int(state["step"]), list(state["log"])
        # checkpoints from before elapsed_s was saved: the last log record's time is close (at most log_every early)
        elapsed = float(state.get("elapsed_s", log[-1].get("elapsed_s", 0.0) if log else 0.0))
        saved = state.get("config")
        model = SpaceVLLMForConditionalGeneration.from_pretrained(ckpt)
        processor = SpaceVLLMProcessor.from_pretrained(ckpt)
        # The optimizer state is ours (not a user's download), written and read by this code only.
        opt_state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    except Exception as e:  # noqa: BLE001 - json, safetensors, transformers and torch each raise their own
        raise UserError(f"{ckpt}: corrupt checkpoint ({type(e).__name__}: {e}); resume from a copy or start fresh "
                        "in another out_dir") from None
    if cfg is not None and isinstance(saved, dict):  # checkpoints from before this check carry no config
        now = json.loads(json.dumps(_fixed_settings(cfg)))  # as JSON has it (tuples -> lists)
        # an option added since that checkpoint was saved is at its default there
        saved = {**json.loads(json.dumps(_fixed_settings(TrainConfig()))), **saved}
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            k = changed[0]
            raise UserError(f"{ckpt}: was trained with {k} = {saved.get(k)!r}, this config says {now.get(k)!r}; a "
                            f"resumed run may change only {', '.join(RESUMABLE[1:])} (or start fresh elsewhere)")
    return model, processor, step, log, opt_state, elapsed


# What a run leaves in its out_dir (checkpoint.tmp aside: only a save cut short leaves it).
RUN_PARTS = ("checkpoint", "checkpoint.old", "model", "train_log.jsonl")


def _check_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    """A fresh run never writes over an earlier one's model or checkpoint without --force."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: out_dir is a file; choose a folder")
    earlier = [n for n in RUN_PARTS if (out_dir / n).exists()]
    if earlier and not resume and not force:
        raise UserError(f"{out_dir}: holds an earlier run ({', '.join(earlier)}); pass --resume to continue it, "
                        "--force to start over there, or choose another out_dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out_dir}: cannot create out_dir ({e.strerror or e}); choose another folder") from None


def _remove_earlier_run(out_dir: Path, init_from: str) -> None:
    """A fresh run (--force) removes the earlier run whole, its model too: a model left from it beside
    the new run's checkpoint, until the new run wrote its own, was the earlier run's, and a later leg's
    init_from took it silently when the new run had been stopped. Refused when init_from lies in it."""
    import shutil

    parts = [out_dir / n for n in RUN_PARTS + ("checkpoint.tmp",)]
    if init_from and any(Path(init_from).resolve().is_relative_to(p.resolve()) for p in parts):
        raise UserError(f"{init_from}: init_from lies in {out_dir}, the earlier run that --force replaces; "
                        "copy that model elsewhere or choose another out_dir")
    for p in parts:
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False) -> Path:
    """Run training; returns the directory of the final model. A fresh run refuses an out_dir that
    holds an earlier run unless `force`."""
    import torch
    from tqdm import tqdm
    from transformers.utils import logging as hf_logging

    cfg.check()
    hf_logging.disable_progress_bar()  # transformers' loading and saving bars between the training bar's lines
    out_dir = Path(cfg.out_dir)
    _check_out_dir(out_dir, resume, force)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start, log, opt_state, spent = 0, [], None, 0.0
    if resume:
        model, processor, start, log, opt_state, spent = _load_checkpoint(out_dir, cfg)
        if cfg.max_minutes and spent >= cfg.max_minutes * 60:
            raise UserError(f"{out_dir / 'checkpoint'}: this run has trained {spent / 60:.1f} minutes already, "
                            f"max_minutes is {cfg.max_minutes:g}; raise max_minutes to train on")
        if start >= _last_step(cfg):
            raise UserError(f"{out_dir / 'checkpoint'}: this run is at step {start} already, and the config ends it "
                            f"at step {_last_step(cfg)}; raise steps (or stop_step) to train on")
    else:
        _remove_earlier_run(out_dir, cfg.init_from)
        model, processor = new_tiny_model(cfg, cfg.seed)
        if cfg.init_from:
            init_weights(model, cfg.init_from)
    model.train()
    named = list(model.named_parameters())
    if cfg.parts:  # the rest of the model stays as init_from made it
        prefixes = tuple(TRAINABLE[part] for part in cfg.parts)
        for n, p in named:
            p.requires_grad_(n.startswith(prefixes))
        named = [(n, p) for n, p in named if n.startswith(prefixes)]
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    # The norm is summed in this order, and its last bits decide a clipped step's: each kind of run keeps
    # the order its shipped model was trained with, so the committed configs remake it bit for bit.
    # Parts trained together are clipped each on its own: one's large gradient does not shrink the other's step.
    if cfg.parts:
        ids = {id(p): n for n, p in named}
        clipped = [[p for p in decay + no_decay if ids[id(p)].startswith(TRAINABLE[part])] for part in cfg.parts]
    else:
        clipped = [list(model.parameters())]
    if opt_state is not None:
        try:
            opt.load_state_dict(opt_state)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{out_dir / 'checkpoint'}: its optimizer state does not fit this model ({e}); was "
                            "the config changed? Resume with the config that made it") from None
    torch.manual_seed(cfg.seed + start)
    t0 = time.time() - spent  # times (log, max_minutes) count the whole run, earlier legs included
    bar = tqdm(range(start, _last_step(cfg)), initial=start, total=_last_step(cfg), desc="train", disable=not progress,
               dynamic_ncols=True)
    batches = _batches(cfg, processor, start, cfg.data_workers)
    saved = completed = start
    try:
        for step in bar:
            batch = next(batches)
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            out = _forward(model, cfg, batch, step)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            for group in clipped:
                torch.nn.utils.clip_grad_norm_(group, cfg.grad_clip)
            # A Ctrl-C inside would leave some weights updated and others not, or a step done but not
            # counted (its checkpoint would then run it twice on resume): it takes effect after.
            with _signals_held():
                opt.step()
                completed = step + 1
                checkpointed, stop = _after_step(cfg, model, processor, opt, step, out, t0, log, bar, out_dir)
                saved = completed if checkpointed else saved
            if stop:
                break
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI raises it as one): keep the steps since the last save
        if completed > saved:
            save_checkpoint(model, processor, opt, completed, out_dir, log, _fixed_settings(cfg), time.time() - t0)
            print(f"\nstg: note: interrupted after step {completed}; saved a checkpoint there: continue with --resume",
                  file=sys.stderr)
        raise
    final = out_dir / "model"
    model.save_pretrained(final, safe_serialization=True)
    processor.save_pretrained(final)
    (out_dir / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return final


def _forward(model, cfg: TrainConfig, batch: dict, step: int):
    """One step's forward and losses. A box_refiner leg needs only the frames and their true boxes
    (no language model); its rough boxes are drawn from (seed, step), as the batch is, so a resumed
    run sees exactly what an uninterrupted one would. Parts trained together learn from the same
    batch, the loss their losses' sum (their weights are disjoint, so each gets its own gradient)."""
    import torch

    from .models.spacevllm.modeling_spacevllm import SpaceVLLMOutput

    if not cfg.parts:
        return model.ground_forward(**batch)[0]
    if cfg.parts == ("space_decoder",):  # every loss but the language model's
        out = model.ground_forward(**batch)[0]
        out.loss = out.loss - model.config.lm_weight * out.lm_loss
        return out
    losses = {}
    if "box_verifier" in cfg.parts:
        losses["verify_loss"] = model.verifier_loss_alone(**batch)
    if "temporal_presence" in cfg.parts:
        losses["presence_loss"] = model.ground_forward(**batch, box_losses=False)[0].presence_loss
    if "box_refiner" in cfg.parts:
        gen = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, step, 1]).integers(2 ** 62)))
        losses["refine_loss"] = model.refiner_loss(batch["pixel_values_videos"], batch["gt_boxes"],
                                                   batch["gt_in_span"], gen)
    return SpaceVLLMOutput(loss=sum(losses.values()), **losses)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back inside the block, then deliver them (main thread; in another
    thread the block just runs).

    Held by swapping the Python handlers, not by a signal mask: a mask covers only the calling
    thread, and the kernel hands a process-directed signal to any thread that does not block it
    (torch's OpenMP workers, tqdm's monitor), after which Python runs the handler in the main
    thread at once, mid-block.
    """
    import signal
    import threading

    sigs = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or any(signal.getsignal(s) is None for s in sigs):
        yield  # a handler installed outside Python could not be put back
        return
    pending: list[int] = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in sigs}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)  # its own handler runs now: KeyboardInterrupt, Terminated, exit


def _last_step(cfg: TrainConfig) -> int:
    """Where the run ends. `stop_step` ends it before `steps`, the schedule unchanged: a run a time
    limit once cut short is then reproduced on any machine, whatever its speed."""
    return cfg.stop_step or cfg.steps


def _after_step(cfg: TrainConfig, model, processor, opt, step: int, out, t0: float, log: list, bar,
                out_dir: Path) -> tuple[bool, bool]:
    """Log step `step` and checkpoint when due: (a checkpoint was saved, the run stops here)."""
    elapsed = time.time() - t0
    rec = {"step": step + 1, "loss": round(out.loss.item(), 4)}
    for key, value in (("lm", out.lm_loss), ("box", out.box_loss), ("presence", out.presence_loss),
                       ("point", out.point_loss), ("attr", out.attr_loss), ("refine", out.refine_loss),
                       ("verify", out.verify_loss)):
        if value is not None:
            rec[key] = round(value.item(), 4)
    rec["elapsed_s"] = round(elapsed, 1)
    shown = {("pres" if k == "presence" else k): v for k, v in rec.items()
             if k not in ("step", "point", "attr", "elapsed_s")}
    if len(shown) == 2:  # a part trained alone: its loss is the loss
        shown.pop("loss")
    bar.set_postfix(shown)
    if (step + 1) % cfg.log_every == 0:
        log.append(rec)
    done = step + 1 == _last_step(cfg)
    out_of_time = cfg.max_minutes and elapsed > cfg.max_minutes * 60
    if not ((step + 1) % cfg.checkpoint_every == 0 or done or out_of_time):
        return False, False
    save_checkpoint(model, processor, opt, step + 1, out_dir, log, _fixed_settings(cfg), elapsed)
    if out_of_time:
        print(f"stg: note: stopped at step {step + 1} of {cfg.steps} (max_minutes = {cfg.max_minutes}); "
              "continue with --resume and a larger max_minutes (it counts every leg)", file=sys.stderr)
    return True, bool(out_of_time)


MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
               "tokenizer.json", "tokenizer_config.json")


def export_model(src: str | Path, dst: str | Path) -> dict[str, str]:
    """Copy a trained model's files (no optimizer state) into `dst`; return {file: sha256} for
    the registry entry in weights.toml."""
    import shutil

    from .weights import sha256_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in MODEL_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            out[name] = sha256_file(dst / name)
    return out
