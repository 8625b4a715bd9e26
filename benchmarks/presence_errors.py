"""Where a model's per-frame presence goes wrong, by what is in view on the frame.

    stg synth /tmp/tune6161 --n 200 --seed 6161
    python benchmarks/presence_errors.py /tmp/tune6161 [--model DIR]

Grounds every clip of a `stg synth` folder as `stg ground` does (the model's own calibration and
box verifier) and, per sampled frame, compares the presence score (> 0.5: present) with the truth.
Frames are grouped by what is in view: the target; else, of the other objects, its twin (same colour
and shape), one of its colour only, one of its shape only, only others, or nothing. A model that
tells colours apart but not shapes says "present" on the same-colour frames: that is how the box
verifier of the built-in model v6 was found to be needed (model card, "v6 against v5"). Nothing is
written.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from stgcli.pipeline import prepare, run_model
from stgcli.synth import ShapeObject
from stgcli.weights import load_model

GROUPS = ("target in view", "twin", "same colour", "same shape", "others only", "nothing")


def in_view(objects: list[ShapeObject], target: int, t: float) -> str:
    """What is in view at time t, as one of GROUPS (the first that applies)."""
    tg = objects[target]
    if tg.visible(t):
        return GROUPS[0]
    others = [o for i, o in enumerate(objects) if i != target and o.visible(t)]
    for group, same in ((GROUPS[1], lambda o: o.colour == tg.colour and o.shape == tg.shape),
                        (GROUPS[2], lambda o: o.colour == tg.colour),
                        (GROUPS[3], lambda o: o.shape == tg.shape)):
        if any(same(o) for o in others):
            return group
    return GROUPS[4] if others else GROUPS[5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", type=Path, help="a folder written by `stg synth`")
    ap.add_argument("--model", default=None, help="model name or directory (default: the built-in model)")
    args = ap.parse_args()
    rows = [json.loads(x) for x in (args.clips / "manifest.jsonl").read_text().splitlines()]
    m = load_model(args.model, device="cpu")
    counts = {g: [0, 0] for g in GROUPS}  # frames, wrong
    for r in rows:
        prep = prepare(m, args.clips / r["video"], r["query"])
        _, _, presence, _ = run_model(m, prep)
        spec = r["spec"]
        objects = [ShapeObject(**o) for o in spec["objects"]]
        for f, p in zip(prep["sampled"].indices, presence):
            group = in_view(objects, spec["target"], int(f) / spec["fps"])
            counts[group][0] += 1
            counts[group][1] += int((p > 0.5) != (group == GROUPS[0]))
    print(f"{m.name}, {len(rows)} clips: per sampled frame, presence wrong (> 0.5 where the target is not "
          "in view, or <= 0.5 where it is)")
    for g in GROUPS:
        n, wrong = counts[g]
        share = f"{wrong / n:.3f}" if n else "-"
        print(f"  {g:15s} frames {n:5d} | wrong {wrong:5d} ({share})")


if __name__ == "__main__":
    main()
