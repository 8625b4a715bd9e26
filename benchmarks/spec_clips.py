"""Shapes-world clips drawn by code independent of the project's own generator.

Written from the spec alone (specs/shapes-world.md), never from `stgcli/`, so that scoring the built-in model on
these clips checks that it learnt the world the spec describes, not the quirks of `stg synth`.

    python benchmarks/spec_clips.py OUT_DIR --n 200 --seed 1

writes OUT_DIR/clip_00000.mp4, ... and OUT_DIR/manifest.jsonl (the format `stg eval --format stg` reads).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("still", "left", "right", "up", "down")
BACKGROUNDS = ("uniform", "noise", "gradient")

# Interpretation choices (the spec leaves these open):
P_FORCED_DISTRACTOR = 0.65  # clips that get one object sharing the target's colour/shape on purpose
P_PLAIN_IF_UNIQUE = 0.6     # without a twin, the plain query form is chosen this often (else the motion form)
P_WHOLE_CLIP = 0.25         # an object is visible for the whole clip this often (when its motion allows it)


@dataclass
class Obj:
    """One object. Its box at time t in [t_in, t_out] is (x, y, x + side, y + side), x = x0 + vx (t - t_in)."""
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    motion: str
    side: float
    x0: float
    y0: float
    vx: float
    vy: float
    t_in: float
    t_out: float

    def box_at(self, t: float) -> tuple[float, float, float, float]:
        x = self.x0 + self.vx * (t - self.t_in)
        y = self.y0 + self.vy * (t - self.t_in)
        return (x, y, x + self.side, y + self.side)


@dataclass
class Clip:
    width: int
    height: int
    fps: int
    num_frames: int
    crf: int
    background: dict
    objects: list[Obj]  # in drawing order, first drawn first (the later ones cover the earlier ones)
    target: int         # index into `objects`
    query: str
    form: str           # "plain" | "moving" | "still"
    has_twin: bool
    forced: str = field(default="")  # which distractor was placed on purpose ("", "twin", "colour", "shape")


def clip_rng(seed: int, index: int) -> np.random.Generator:
    """The generator that draws clip `index` of the set made with `seed` (its parameters, then its noise)."""
    return np.random.default_rng([seed, index])


def frame_times(num_frames: int, fps: int) -> np.ndarray:
    return np.arange(num_frames) / fps


def visible(obj: Obj, num_frames: int, fps: int) -> np.ndarray:
    """Frames f whose timestamp f / fps lies in [t_in, t_out] (the spec's span rule, also used to draw)."""
    t = frame_times(num_frames, fps)
    return (t >= obj.t_in) & (t <= obj.t_out)


def _frame_size(rng: np.random.Generator) -> tuple[int, int]:
    while True:
        h = 2 * int(rng.integers(60, 241))              # 120..480, even
        w = 2 * round(h * rng.uniform(4 / 3, 16 / 9) / 2)
        if 160 <= w <= 640 and 4 / 3 - 1e-9 <= w / h <= 16 / 9 + 1e-9:
            return w, h


def _background(rng: np.random.Generator) -> dict:
    kind = BACKGROUNDS[int(rng.integers(3))]
    if kind == "uniform":
        return {"kind": kind, "level": int(rng.integers(30, 201))}
    if kind == "noise":
        return {"kind": kind, "level": int(rng.integers(30, 201)), "sigma": float(rng.uniform(1.0, 12.0))}
    while True:
        a, b = (int(v) for v in rng.integers(30, 201, size=2))
        if abs(a - b) >= 20:  # a gradient one can see
            return {"kind": kind, "from": a, "to": b, "angle": float(rng.uniform(0, 2 * math.pi))}


def _place(rng: np.random.Generator, colour: str, shape: str, motion: str, w: int, h: int,
           duration: float) -> Obj:
    """Size, visibility window, speed and start so the object stays wholly inside the frame while visible."""
    side = float(rng.uniform(0.10, 0.25) * h)
    jitter = rng.integers(-20, 21, size=3)
    rgb = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[colour], jitter))
    l_min = max(1.0, 0.2 * duration)
    vmin, vmax = 0.05 * w, 0.25 * w
    room = (w - side) if motion in ("left", "right") else (h - side)
    l_max = duration if motion == "still" else min(duration, room / vmin)
    assert l_min <= l_max, (l_min, l_max)  # holds for every allowed frame size (room >= 0.75 h, vmin <= 0.09 h)
    if l_max >= duration and rng.random() < P_WHOLE_CLIP:
        t_in, t_out = 0.0, duration
    else:
        length = float(rng.uniform(l_min, l_max))
        t_in = float(rng.uniform(0, duration - length))
        t_out = t_in + length
    length = t_out - t_in
    speed = 0.0 if motion == "still" else float(rng.uniform(vmin, min(vmax, room / length)))
    travel = speed * length
    x0 = float(rng.uniform(0, w - side))
    y0 = float(rng.uniform(0, h - side))
    vx = vy = 0.0
    if motion == "right":
        x0, vx = float(rng.uniform(0, w - side - travel)), speed
    elif motion == "left":
        x0, vx = float(rng.uniform(travel, w - side)), -speed
    elif motion == "down":
        y0, vy = float(rng.uniform(0, h - side - travel)), speed
    elif motion == "up":
        y0, vy = float(rng.uniform(travel, h - side)), -speed
    return Obj(colour, rgb, shape, motion, side, x0, y0, vx, vy, t_in, t_out)


def _pick(rng: np.random.Generator, items: Sequence[str], exclude: Sequence[str] = ()) -> str:
    pool = [v for v in items if v not in exclude]
    return pool[int(rng.integers(len(pool)))]


def sample_clip(rng: np.random.Generator) -> Clip:
    """Every parameter of one clip (nothing drawn yet)."""
    w, h = _frame_size(rng)
    fps = int(rng.integers(10, 31))
    num_frames = int(np.clip(round(rng.uniform(3.0, 12.0) * fps), math.ceil(3 * fps), math.floor(12 * fps)))
    duration = num_frames / fps
    crf = int(rng.integers(18, 29))
    background = _background(rng)
    n = int(rng.integers(2, 5))

    colours, shapes = list(COLOURS), list(SHAPES)
    attrs = [(_pick(rng, colours), _pick(rng, shapes))]  # attrs[0] is the target's
    tc, ts = attrs[0]
    forced = ""
    if rng.random() < P_FORCED_DISTRACTOR:
        forced = ("twin", "colour", "shape")[int(rng.integers(3))]
        attrs.append({"twin": (tc, ts), "colour": (tc, _pick(rng, shapes, [ts])),
                      "shape": (_pick(rng, colours, [tc]), ts)}[forced])
    while len(attrs) < n:
        attrs.append((_pick(rng, colours), _pick(rng, shapes)))

    twins = [i for i in range(1, n) if attrs[i] == (tc, ts)]
    target_motion = _pick(rng, MOTIONS)
    motions = [target_motion] + [_pick(rng, MOTIONS, [target_motion] if i in twins else [])
                                 for i in range(1, n)]
    objs = [_place(rng, c, s, m, w, h, duration) for (c, s), m in zip(attrs, motions)]

    if not twins and rng.random() < P_PLAIN_IF_UNIQUE:
        form, query = "plain", f"the {tc} {ts}"
    elif target_motion == "still":
        form, query = "still", f"the {tc} {ts} that stays still"
    else:
        form, query = "moving", f"the {tc} {ts} moving {target_motion}"

    order = [int(i) for i in rng.permutation(n)]  # random drawing order, fixed for the clip
    return Clip(w, h, fps, num_frames, crf, background, [objs[i] for i in order], order.index(0), query, form,
                bool(twins), forced)


def _coverage(obj: Obj, box: tuple[float, float, float, float], w: int, h: int):
    """Anti-aliased coverage (0..1) of the object over the pixels of its box, and the slice it lives in.

    Pixel (i, j) spans [j, j+1] x [i, i+1]. Squares get the exact area overlap; circles and triangles a one-pixel
    ramp across their edge from the signed distance of the pixel centre (a cheap analytic anti-aliasing).
    """
    x1, y1, x2, y2 = box
    j0, j1 = max(0, math.floor(x1)), min(w, math.ceil(x2))
    i0, i1 = max(0, math.floor(y1)), min(h, math.ceil(y2))
    if j0 >= j1 or i0 >= i1:
        return None
    js = np.arange(j0, j1, dtype=np.float32)
    is_ = np.arange(i0, i1, dtype=np.float32)
    if obj.shape == "square":
        cx = np.clip(np.minimum(js + 1, x2) - np.maximum(js, x1), 0, 1)
        cy = np.clip(np.minimum(is_ + 1, y2) - np.maximum(is_, y1), 0, 1)
        a = cy[:, None] * cx[None, :]
    else:
        px = (js + 0.5)[None, :]
        py = (is_ + 0.5)[:, None]
        s = obj.side
        if obj.shape == "circle":
            r = s / 2
            sd = r - np.sqrt((px - (x1 + r)) ** 2 + (py - (y1 + r)) ** 2)
        else:  # isosceles triangle, apex (x1 + s/2, y1) up, base from (x1, y2) to (x2, y2)
            k = 1 / math.sqrt(1.25)
            d_left = ((px - x1) + (py - y2) / 2) * k
            d_right = ((x2 - px) + (py - y2) / 2) * k
            sd = np.minimum(np.minimum(d_left, d_right), y2 - py)
        a = np.clip(sd + 0.5, 0, 1)
    return (slice(i0, i1), slice(j0, j1)), a.astype(np.float32)


def render(clip: Clip, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """The clip's frames as H x W x 3 uint8 RGB arrays; `rng` draws the per-frame background noise."""
    w, h, bg = clip.width, clip.height, clip.background
    if bg["kind"] == "gradient":
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
        u = xs * math.cos(bg["angle"]) + ys * math.sin(bg["angle"])
        u = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
        base = bg["from"] + (bg["to"] - bg["from"]) * u
    else:
        base = np.full((h, w), bg["level"], np.float32)
    base3 = np.repeat(base[:, :, None], 3, axis=2).astype(np.float32)
    vis = [visible(o, clip.num_frames, clip.fps) for o in clip.objects]
    rgbs = [np.array(o.rgb, np.float32) for o in clip.objects]
    for f in range(clip.num_frames):
        if bg["kind"] == "noise":  # grey noise, redrawn every frame, on the background only
            noise = rng.standard_normal((h, w), dtype=np.float32) * bg["sigma"]
            frame = base3 + noise[:, :, None]
        else:
            frame = base3.copy()
        t = f / clip.fps
        for o, v, rgb in zip(clip.objects, vis, rgbs):
            if not v[f]:
                continue
            cov = _coverage(o, o.box_at(t), w, h)
            if cov is None:
                continue
            sl, a = cov
            region = frame[sl]
            region += a[:, :, None] * (rgb - region)
        yield np.rint(np.clip(frame, 0, 255)).astype(np.uint8)


def record(clip: Clip, video: str) -> dict:
    """The manifest line of a clip.

    Box: the target's bounding square (x1, y1, x2, y2) in continuous pixel coordinates, which is also the extent of
    what is drawn, since the anti-aliased edge reaches exactly to it. When later-drawn objects cover part of the
    target, the box is still its own bounding square (not the box of its uncovered pixels); objects never leave the
    frame while visible, so no clipping is needed (it is applied anyway against rounding).
    """
    tgt = clip.objects[clip.target]
    frames = np.flatnonzero(visible(tgt, clip.num_frames, clip.fps))
    boxes = {}
    for f in frames:
        x1, y1, x2, y2 = tgt.box_at(f / clip.fps)
        boxes[str(int(f))] = [round(min(max(x1, 0.0), clip.width), 2), round(min(max(y1, 0.0), clip.height), 2),
                              round(min(max(x2, 0.0), clip.width), 2), round(min(max(y2, 0.0), clip.height), 2)]
    return {"video": video, "query": clip.query, "span_frames": [int(frames[0]), int(frames[-1])], "boxes": boxes,
            "num_frames": clip.num_frames, "fps": clip.fps, "width": clip.width, "height": clip.height,
            "form": clip.form, "has_twin": clip.has_twin}


def write_clip(clip: Clip, path: str | os.PathLike[str], rng: np.random.Generator) -> None:
    """Encode the clip as MP4, H.264 yuv420p, constant quality (crf)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(clip.fps), options={"crf": str(clip.crf)})
        stream.width, stream.height, stream.pix_fmt = clip.width, clip.height, "yuv420p"
        for i, arr in enumerate(render(clip, rng)):
            frame = av.VideoFrame.from_ndarray(arr, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def generate(out_dir: str | os.PathLike[str], n: int, seed: int) -> list[dict]:
    """Write n clips and manifest.jsonl (last, atomically) into out_dir; return the manifest lines."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = clip_rng(seed, i)
        clip = sample_clip(rng)
        name = f"clip_{i:05d}.mp4"
        write_clip(clip, out / name, rng)
        rows.append(record(clip, name))
    tmp = out / "manifest.jsonl.part"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(out / "manifest.jsonl")
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=200, help="number of clips (default 200)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.n < 1:
        print(f"spec_clips: --n must be at least 1, got {args.n}", file=sys.stderr)
        return 2
    if (Path(args.out_dir) / "manifest.jsonl").exists():
        print(f"spec_clips: {args.out_dir} already holds a manifest.jsonl; refusing to overwrite it", file=sys.stderr)
        return 2
    generate(args.out_dir, args.n, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
