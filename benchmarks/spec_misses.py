"""Where the built-in model's boxes land on benchmarks/spec_clips.py's clips (a diagnostic).

For every sampled frame inside the true span: the box's IoU with the truth, and, when it misses
(IoU < 0.1), which object its centre sits on (the twin, another of the target's colour or shape,
another object, or background). The objects come from regenerating each clip's spec from its seed.

    python benchmarks/spec_misses.py CLIPS_DIR [--seed 1]   (the folder spec_clips.py wrote)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import spec_clips as sc  # noqa: E402
from _common import MISS_IOU, true_span_boxes  # noqa: E402

from stgcli import load_model  # noqa: E402
from stgcli.pipeline import prepare, run_model  # noqa: E402


def landed_on(clip, t: float, centre: tuple[float, float]) -> str:
    tgt = clip.objects[clip.target]
    for j, o in enumerate(clip.objects):
        if j == clip.target or not (o.t_in <= t <= o.t_out):
            continue
        x1, y1, x2, y2 = o.box_at(t)
        if x1 <= centre[0] <= x2 and y1 <= centre[1] <= y2:
            if (o.colour, o.shape) == (tgt.colour, tgt.shape):
                return "twin"
            return "same colour" if o.colour == tgt.colour else "same shape" if o.shape == tgt.shape else "other"
    return "background"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips")
    ap.add_argument("--seed", type=int, default=1, help="the seed spec_clips.py was given")
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    folder = Path(args.clips)
    rows = [json.loads(x) for x in (folder / "manifest.jsonl").read_text().splitlines()]
    model = load_model(args.model, device="cpu")
    groups: dict[str, dict] = {}
    for i, row in enumerate(rows):
        clip = sc.sample_clip(sc.clip_rng(args.seed, i))
        if clip.query != row["query"]:
            sys.exit(f"{folder}: clip {i} is not what seed {args.seed} draws; pass the seed spec_clips.py was given")
        prep = prepare(model, folder / row["video"], row["query"], None)
        _, boxes, _, _ = run_model(model, prep, all_boxes=True)
        for f, box, iou in true_span_boxes(model, prep, boxes, row):
            where = "target" if iou >= MISS_IOU else landed_on(clip, f / clip.fps,
                                                           ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2))
            for g in ("all", f"form={row['form']}", "twin" if row["has_twin"] else "no twin"):
                s = groups.setdefault(g, {"iou": [], "on": {}})
                s["iou"].append(iou)
                s["on"][where] = s["on"].get(where, 0) + 1
    kinds = ["target", "twin", "same colour", "same shape", "other", "background"]
    print("| group | boxes | mean IoU | IoU of hits | " + " | ".join(kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for g in ("all", "form=plain", "form=moving", "form=still", "no twin", "twin"):
        if g not in groups:
            continue
        s, n = groups[g], len(groups[g]["iou"])
        hits = [x for x in s["iou"] if x >= MISS_IOU]
        print(f"| {g} | {n} | {np.mean(s['iou']):.3f} | {np.mean(hits) if hits else 0:.3f} | "
              + " | ".join(f"{s['on'].get(k, 0) / n:.0%}" for k in kinds) + " |")


if __name__ == "__main__":
    main()
