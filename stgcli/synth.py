"""The shapes world (shared/specs/shapes-world.md): synthetic clips with a described object.

One sampler (`sample_clip`) draws every parameter the spec allows; one renderer draws a frame
at any output size, so training can draw straight at the model's input size (cheap) or at the
clip's own size and resize like the processor does (faithful); `write_clip` encodes H.264 for
users and benchmarks. Ground truth follows the spec: frame f is inside when f / fps lies in
[t_in, t_out]; the box is the object's bounding square in the frame's own pixels.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = ("still",) + DIRECTIONS
_DIR_VEC = {"still": (0, 0), "left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VOCABULARY = sorted({"the", "moving", "that", "stays", "still", *COLOURS, *SHAPES, *DIRECTIONS})


@dataclass
class ShapeObject:
    shape: str
    colour: str
    rgb: tuple[int, int, int]
    side: float          # bounding-square side, pixels
    motion: str
    speed: float         # pixels per second along the motion direction
    x0: float            # top-left corner at t_in, pixels
    y0: float
    t_in: float
    t_out: float

    def visible(self, t: float) -> bool:
        return self.t_in <= t <= self.t_out

    def box(self, t: float) -> tuple[float, float, float, float]:
        dx, dy = _DIR_VEC[self.motion]
        x = self.x0 + dx * self.speed * (t - self.t_in)
        y = self.y0 + dy * self.speed * (t - self.t_in)
        return (x, y, x + self.side, y + self.side)


@dataclass
class Background:
    kind: str            # "uniform" | "noise" | "gradient"
    level: float = 128.0
    sigma: float = 0.0
    level2: float = 128.0
    angle: float = 0.0   # gradient direction, radians


@dataclass
class ClipSpec:
    width: int
    height: int
    fps: float
    num_frames: int
    background: Background
    objects: list[ShapeObject]     # in drawing order
    target: int
    query: str
    form: str                      # "plain" | "moving" | "still"
    has_twin: bool
    crf: int = 23
    seed: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps

    def frame_time(self, f: int) -> float:
        return f / self.fps

    def gt(self) -> dict:
        """Ground truth per the spec: span in seconds and frames, box per frame inside it."""
        o = self.objects[self.target]
        frames = [f for f in range(self.num_frames) if o.visible(self.frame_time(f))]
        return {"span_s": [o.t_in, o.t_out],
                "span_frames": [frames[0], frames[-1]] if frames else None,
                "boxes": {f: list(o.box(self.frame_time(f))) for f in frames}}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["duration_s"] = self.duration
        return d


def _query_for(objs: list[ShapeObject], t: int, form: str) -> str:
    o = objs[t]
    base = f"the {o.colour} {o.shape}"
    if form == "plain":
        return base
    if form == "still":
        return f"{base} that stays still"
    return f"{base} moving {o.motion}"


def _sample_size(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        aspect = rng.uniform(4 / 3, 16 / 9)
        h = int(rng.integers(60, 241)) * 2
        w = int(round(h * aspect / 2)) * 2
        if 160 <= w <= 640 and 4 / 3 - 1e-6 <= w / h <= 16 / 9 + 1e-6:
            return w, h


def _place(rng, o: ShapeObject, w: int, h: int) -> bool:
    """Pick the start corner so the object stays wholly inside the frame while visible."""
    dx, dy = _DIR_VEC[o.motion]
    travel = o.speed * (o.t_out - o.t_in)
    span_x = w - o.side - abs(dx) * travel
    span_y = h - o.side - abs(dy) * travel
    if span_x < 0 or span_y < 0:
        return False
    x = rng.uniform(0, span_x) + (travel if dx < 0 else 0)
    y = rng.uniform(0, span_y) + (travel if dy < 0 else 0)
    o.x0, o.y0 = float(x), float(y)
    return True


def _sample_object(rng, w: int, h: int, duration: float, shape: str, colour: str, motion: str) -> ShapeObject:
    base = np.array(COLOURS[colour])
    rgb = tuple(int(v) for v in np.clip(base + rng.integers(-20, 21, 3), 0, 255))
    side = float(rng.uniform(0.10, 0.25) * h)
    min_len = max(1.0, 0.2 * duration)
    for _ in range(100):
        speed = 0.0 if motion == "still" else float(rng.uniform(0.05, 0.25) * w)
        length = float(rng.uniform(min_len, duration)) if rng.random() < 0.7 else duration
        if motion != "still":
            # Keep the travel inside the frame: shorten the visible time or slow down if needed.
            room = (w if motion in ("left", "right") else h) - side
            if speed * length > room:
                length = max(min_len, room / speed * rng.uniform(0.6, 1.0))
                if speed * length > room:
                    speed = room / length * rng.uniform(0.6, 1.0)
                    if speed < 0.05 * w:
                        continue
        t_in = float(rng.uniform(0, duration - length))
        o = ShapeObject(shape, colour, rgb, side, motion, speed, 0.0, 0.0, t_in, t_in + length)
        if _place(rng, o, w, h):
            return o
    raise RuntimeError("could not place object")  # pragma: no cover - the loop always finds one


def sample_clip(rng: np.random.Generator, seed: int = 0, twin_prob: float = 0.3,
                shared_prob: float = 0.7) -> ClipSpec:
    """Draw one clip spec: sizes, timing, background, objects, target and query, per the spec.

    twin_prob: chance of a twin (same colour and shape, other motion); shared_prob: chance that
    the first distractor shares the target's colour or shape (the spec asks for at least half).
    Training may raise both to see more of the hard cases; `stg synth` keeps the defaults."""
    w, h = _sample_size(rng)
    fps = float(rng.integers(10, 31)) if rng.random() < 0.85 else float(rng.choice([23.976, 29.97, 12.5, 15.0]))
    duration = float(rng.uniform(3.0, 12.0))
    # whole frames, kept inside the spec's 3 to 12 s (rounding alone could pass 12 s at 23.976 fps)
    n_frames = int(np.clip(round(duration * fps), math.ceil(3.0 * fps - 1e-9), math.floor(12.0 * fps + 1e-9)))
    duration = n_frames / fps
    kind = rng.choice(["uniform", "noise", "gradient"])
    bg = Background(kind=str(kind), level=float(rng.uniform(30, 200)))
    if kind == "noise":
        bg.sigma = float(rng.uniform(1, 12))
    elif kind == "gradient":
        bg.level2 = float(rng.uniform(30, 200))
        bg.angle = float(rng.uniform(0, 2 * math.pi))

    n_obj = int(rng.integers(2, 5))
    t_shape, t_colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
    t_motion = str(rng.choice(MOTIONS))
    specs = [(t_shape, t_colour, t_motion)]
    twin = n_obj >= 2 and rng.random() < twin_prob
    if twin:
        specs.append((t_shape, t_colour, str(rng.choice([m for m in MOTIONS if m != t_motion]))))
    want_shared = rng.random() < shared_prob  # spec: at least half of clips share colour or shape with the target
    while len(specs) < n_obj:
        s, c = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        if want_shared and len(specs) == 1:
            if rng.random() < 0.5:
                s = t_shape
            else:
                c = t_colour
        if (s, c) == (t_shape, t_colour):
            if rng.random() < 0.5:
                s = str(rng.choice([x for x in SHAPES if x != t_shape]))
            else:
                c = str(rng.choice([x for x in COLOURS if x != t_colour]))
        specs.append((s, c, str(rng.choice(MOTIONS))))
    objs = [_sample_object(rng, w, h, duration, *sp) for sp in specs]
    has_twin = twin
    if has_twin:
        form = "still" if t_motion == "still" else "moving"
    else:
        r = rng.random()
        form = "plain" if r < 0.4 else ("still" if t_motion == "still" else "moving")
    query = _query_for(objs, 0, form)
    order = rng.permutation(len(objs))
    objs = [objs[i] for i in order]
    target = int(np.where(order == 0)[0][0])
    return ClipSpec(w, h, fps, n_frames, bg, objs, target, query, form, has_twin,
                    crf=int(rng.integers(18, 29)), seed=seed)


# -- rendering -------------------------------------------------------------------------------------
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel geometry keeps small, slow objects moving smoothly
_ONE = 1 << _SHIFT


def _background(bg: Background, w: int, h: int, rng: np.random.Generator, noise_scale: float) -> np.ndarray:
    if bg.kind == "gradient":
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        d = (xs / max(w - 1, 1) - 0.5) * math.cos(bg.angle) + (ys / max(h - 1, 1) - 0.5) * math.sin(bg.angle)
        d = (d - d.min()) / max(float(d.max() - d.min()), 1e-6)
        img = bg.level + (bg.level2 - bg.level) * d
    else:
        img = np.full((h, w), bg.level, np.float32)
    if bg.kind == "noise" and bg.sigma > 0:
        img = img + rng.standard_normal((h, w), dtype=np.float32) * (bg.sigma * noise_scale)
    g = np.clip(img, 0, 255).astype(np.uint8)
    return np.repeat(g[:, :, None], 3, axis=2)


def render_frame(spec: ClipSpec, t: float, rng: np.random.Generator, out_size: tuple[int, int] | None = None,
                 noise_scale: float | None = None) -> np.ndarray:
    """RGB uint8 frame at time t. With out_size=(W, H) the scene is drawn directly at that size
    (geometry scaled per axis, as the processor's resize would), noise scaled like an area resize."""
    import cv2

    w, h = out_size or (spec.width, spec.height)
    sx, sy = w / spec.width, h / spec.height
    if noise_scale is None:
        noise_scale = min(1.0, math.sqrt(sx * sy)) if out_size else 1.0
    img = _background(spec.background, w, h, rng, noise_scale)
    for o in spec.objects:
        if not o.visible(t):
            continue
        x1, y1, x2, y2 = o.box(t)
        x1, x2, y1, y2 = x1 * sx, x2 * sx, y1 * sy, y2 * sy
        col = tuple(int(c) for c in o.rgb)
        if o.shape == "square":
            pts = np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]])
        elif o.shape == "triangle":
            pts = np.array([[(x1 + x2) / 2, y1], [x2, y2], [x1, y2]])
        else:
            # centre shifted by half a pixel like the polygons below, so the disc fills its box
            c = (int(round(((x1 + x2) / 2 - 0.5) * _ONE)), int(round(((y1 + y2) / 2 - 0.5) * _ONE)))
            ax = (int(round((x2 - x1) / 2 * _ONE)), int(round((y2 - y1) / 2 * _ONE)))
            cv2.ellipse(img, c, ax, 0, 0, 360, col, -1, cv2.LINE_AA, _SHIFT)
            continue
        # Pixel centres sit at integer + 0.5 in box coordinates: shift by half a pixel.
        p = np.round((pts - 0.5) * _ONE).astype(np.int32)
        cv2.fillPoly(img, [p], col, cv2.LINE_AA, _SHIFT)
    return img


def render_clip(spec: ClipSpec, frame_indices=None, out_size=None, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = range(spec.num_frames) if frame_indices is None else frame_indices
    return np.stack([render_frame(spec, spec.frame_time(int(f)), rng, out_size) for f in idx])


def write_clip(spec: ClipSpec, path: str | Path, crf: int | None = None) -> None:
    """Encode the clip as H.264 yuv420p MP4 at constant quality (the spec's container)."""
    from fractions import Fraction

    import av

    from .result import part_file

    rng = np.random.default_rng(spec.seed + 1)
    path = Path(path)
    tmp = path.with_name(path.name + ".part.mp4")
    with part_file(path, tmp):  # a full disk: one line naming the clip, and no part file left behind
        with av.open(str(tmp), "w") as out:
            stream = out.add_stream("libx264", rate=Fraction(spec.fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
            stream.options = {"crf": str(crf if crf is not None else spec.crf), "preset": "veryfast"}
            for f in range(spec.num_frames):
                frame = av.VideoFrame.from_ndarray(render_frame(spec, spec.frame_time(f), rng), format="rgb24")
                for pkt in stream.encode(frame):
                    out.mux(pkt)
            for pkt in stream.encode():
                out.mux(pkt)


def _clip_name(i: int) -> str:
    return f"clip_{i:05d}.mp4"


def synth_dataset(out_dir: str | Path, n: int, seed: int = 0, progress: bool = True) -> Path:
    """Write n clips (MP4) + per-clip ground truth + manifest.jsonl; returns the manifest path.

    Each manifest line: {"video", "query", "span_s", "span_frames", "boxes" {frame: xyxy}, ...}
    with paths relative to out_dir, so `stg batch manifest.jsonl` and `stg eval --format stg` read it.
    """
    from tqdm import tqdm

    from .errors import UserError
    from .result import cannot_write, write_text_atomic

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise cannot_write(out, e) from None
    manifest = out / "manifest.jsonl"
    taken = [p.name for p in [manifest, *(out / _clip_name(i) for i in range(n))] if p.exists()]
    if taken:  # never overwrite: an earlier synth's clips, or files of the user's own
        more = f" and {len(taken) - 1} more" if len(taken) > 1 else ""
        cut = "" if manifest.exists() else " (clips without a manifest: an interrupted stg synth? delete them)"
        raise UserError(f"{out}: already holds {taken[0]}{more}{cut}; choose an empty folder")
    lines = []
    for i in tqdm(range(n), desc="synth", unit="clip", disable=not progress):
        clip_seed = seed * 1_000_003 + i
        spec = sample_clip(np.random.default_rng(clip_seed), seed=clip_seed)
        name = _clip_name(i)
        write_clip(spec, out / name)
        gt = spec.gt()
        lines.append({"video": name, "query": spec.query, "form": spec.form, "has_twin": spec.has_twin,
                      "fps": spec.fps, "width": spec.width, "height": spec.height,
                      "num_frames": spec.num_frames, "span_s": gt["span_s"], "span_frames": gt["span_frames"],
                      "boxes": {str(k): [round(v, 2) for v in b] for k, b in gt["boxes"].items()},
                      "spec": spec.to_dict()})
    write_text_atomic(manifest, "".join(json.dumps(line) + "\n" for line in lines))
    return manifest
