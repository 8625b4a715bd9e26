"""Regenerate examples/shapes.mp4 and its ground truth (a shapes-world clip, 480x270, 25 fps, 6 s).

    python examples/make_examples.py
"""
from __future__ import annotations

import json
from pathlib import Path

from stgcli.synth import Background, ClipSpec, ShapeObject, write_clip

HERE = Path(__file__).resolve().parent


def example_spec() -> ClipSpec:
    objs = [
        ShapeObject("square", "blue", (45, 85, 215), 50.0, "still", 0.0, 60.0, 150.0, 0.0, 6.0),
        ShapeObject("circle", "red", (225, 45, 35), 48.0, "left", 60.0, 400.0, 40.0, 1.0, 5.0),
        ShapeObject("triangle", "red", (215, 35, 45), 44.0, "up", 30.0, 250.0, 210.0, 0.5, 4.5),
        ShapeObject("circle", "yellow", (230, 205, 45), 40.0, "still", 0.0, 330.0, 170.0, 2.0, 6.0),
    ]
    return ClipSpec(width=480, height=270, fps=25.0, num_frames=150,
                    background=Background("gradient", level=70.0, level2=150.0, angle=0.6),
                    objects=objs, target=1, query="the red circle moving left", form="moving",
                    has_twin=False, crf=20, seed=7)


def main() -> None:
    spec = example_spec()
    write_clip(spec, HERE / "shapes.mp4")
    truth = {}
    for i, q in [(1, "the red circle moving left"), (0, "the blue square that stays still"),
                 (2, "the red triangle moving up"), (3, "the yellow circle")]:
        spec.target, spec.query = i, q
        gt = spec.gt()
        truth[q] = {"span_s": gt["span_s"], "span_frames": gt["span_frames"],
                    "boxes": {str(k): [round(x, 2) for x in v] for k, v in gt["boxes"].items()}}
    (HERE / "shapes.truth.json").write_text(json.dumps(truth, indent=1) + "\n")


if __name__ == "__main__":
    main()
