"""Quality of a model on held-out shapes-world clips, through the path users take.

Clips are freshly generated (a seed the training never draws), written as H.264 MP4, then read
back and grounded through the same pipeline calls as `stgcli.ground` (decode, resize, model).
Prints m_tIoU, m_vIoU, vIoU@0.3, vIoU@0.5 overall, per query form and with/without a twin,
and writes benchmarks/results/quality.json plus a section of benchmarks/RESULTS.md.

    python benchmarks/quality.py [--model NAME|DIR] [--n 200] [--seed 777] [--frames N] [--generator synth|spec]

`--generator spec` draws the clips with benchmarks/spec_clips.py, written from the shapes-world spec
alone and not from `stg synth`: the same table on clips the model's own generator never made
(results/quality-spec.json and its own RESULTS.md section).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from _common import machine, today, true_span_box_ious, write_section  # noqa: E402
import numpy as np  # noqa: E402

from stgcli import load_model  # noqa: E402
from stgcli.metrics import score_sample, span_frames, summarize, tiou  # noqa: E402
from stgcli.pipeline import finish, prepare, run_model  # noqa: E402
from stgcli.synth import synth_dataset  # noqa: E402

TARGETS = {"m_tIoU": 0.80, "m_vIoU": 0.60, "vIoU@0.5": 0.60}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--frames", type=int, default=None)
    ap.add_argument("--clips", default=None, help="folder for the clips (default: a temp folder)")
    ap.add_argument("--dtype", default="auto", help="as stg ground --dtype; a run with another than auto writes "
                    "results/quality-DTYPE.json and leaves RESULTS.md (the default's) as it is")
    ap.add_argument("--generator", choices=("synth", "spec"), default="synth",
                    help="synth: stg synth's clips; spec: benchmarks/spec_clips.py's, written from the spec alone")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md / results/quality.json")
    args = ap.parse_args()

    import tempfile

    spec = args.generator == "spec"
    clip_dir = Path(args.clips or tempfile.mkdtemp(prefix="stg-quality-"))
    manifest = clip_dir / "manifest.jsonl"
    if not manifest.exists() and spec:
        import spec_clips

        spec_clips.generate(clip_dir, args.n, args.seed)
    elif not manifest.exists():
        synth_dataset(clip_dir, args.n, seed=args.seed)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()][: args.n]
    model = load_model(args.model, device="cpu", dtype=args.dtype)
    text_model = dataclasses.replace(model, span_decoding="text")  # the LM's free answer, for comparison
    groups: dict[str, list] = {}
    text_scores: list = []
    diag: list[tuple[float, float]] = []
    t0 = time.time()
    elapsed = 0.0  # the default path only, not the comparison pass
    for i, row in enumerate(rows):
        path = clip_dir / row["video"]
        t_clip = time.perf_counter()
        prep = prepare(model, path, row["query"], args.frames)  # = ground(), kept apart to see boxes
        text, boxes, presence, _ = run_model(model, prep, all_boxes=True)  # every box: the diagnostics below score them all
        res = finish(model, prep, path, text, boxes, presence, {}, [])
        elapsed += time.perf_counter() - t_clip
        gt_boxes = {int(k): v for k, v in row["boxes"].items()}
        s = score_sample(res, tuple(row["span_frames"]), gt_boxes)
        diag.append(_attribution(model, prep, boxes, presence, row))
        free = run_model(text_model, prep)
        text_scores.append(score_sample(finish(text_model, prep, path, *free[:3], {}, []),
                                        tuple(row["span_frames"]), gt_boxes))
        for g in ("all", f"form={row['form']}", "twin" if row["has_twin"] else "no twin"):
            groups.setdefault(g, []).append(s)
        if (i + 1) % 50 == 0:
            print(f"  {i + 1}/{len(rows)} clips, {time.time() - t0:.0f}s", file=sys.stderr)
    order = ["all", "form=plain", "form=moving", "form=still", "no twin", "twin"]
    table = {g: summarize(groups[g]) for g in order if g in groups}
    header = "| group | n | m_tIoU | m_vIoU | vIoU@0.3 | vIoU@0.5 |\n|---|---|---|---|---|---|"
    lines = [header] + [f"| {g} | {m['n']} | {m['m_tIoU']:.3f} | {m['m_vIoU']:.3f} | {m['vIoU@0.3']:.3f} | "
                        f"{m['vIoU@0.5']:.3f} |" for g, m in table.items()]
    verdict = ", ".join(f"{k} {table['all'][k]:.3f} {'>=' if table['all'][k] >= v else '<'} {v}"
                        for k, v in TARGETS.items())
    pres_t = float(np.mean([d[0] for d in diag]))
    oracle = [d[1] for d in diag if d[1] is not None]
    oracle_iou = float(np.mean(oracle)) if oracle else 0.0
    text = summarize(text_scores)
    attribution = (f"Span decoding `{model.span_decoding}` (the default) above. With `--span-decoding text` (the "
                   f"language model's free answer) the same clips score m_tIoU {text['m_tIoU']:.3f}, m_vIoU "
                   f"{text['m_vIoU']:.3f}, vIoU@0.5 {text['vIoU@0.5']:.3f}. Attribution (not what stg outputs): "
                   f"a span of the sampled frames whose presence score is > 0.5 would score m_tIoU {pres_t:.3f}; "
                   f"boxes on the sampled frames inside the true span have mean IoU {oracle_iou:.3f}.")
    print("\n".join(lines))
    print(f"targets: {verdict}")
    print(attribution)
    print(f"{len(rows)} clips grounded in {elapsed:.0f}s ({elapsed / len(rows):.2f}s per clip)")
    if args.no_write:
        return
    when, where = today(), machine()
    out = {"date": when, "machine": where, "model": model.name, "sha256": model.sha256, "dtype": model.dtype,
           "n": len(rows), "generator": args.generator, "seed": args.seed,
           "frames": args.frames or model.default_frames, "span_decoding": model.span_decoding,
           "groups": table, "text_decoding": text, "presence_span_m_tIoU": round(pres_t, 4),
           "oracle_frame_box_iou": round(oracle_iou, 4),
           "seconds_per_clip": round(elapsed / len(rows), 3)}
    (HERE / "results").mkdir(exist_ok=True)
    suffix = ("-spec" if spec else "") + ("" if args.dtype == "auto" else f"-{args.dtype}")
    (HERE / "results" / f"quality{suffix}.json").write_text(json.dumps(out, indent=2) + "\n")
    if args.dtype != "auto":
        return
    heading = "## Quality on independently drawn clips" if spec else "## Quality"
    what = (f"clips drawn by benchmarks/spec_clips.py (seed {args.seed}), code written from the shapes-world "
            "spec alone, never from `stg synth`, which made every training clip" if spec else
            f"held-out shapes-world clips (seed {args.seed})")
    section = (f"{heading} (benchmarks/quality.py{' --generator spec' if spec else ''})\n\n{when}, {where}. "
               f"Model `{model.name}`, {len(rows)} {what}, H.264 round trip, "
               f"{out['frames']} frames per clip.\n\n" + "\n".join(lines)
               + f"\n\nTargets: {verdict}.\n\n{attribution}\n")
    write_section(heading, section)


def _attribution(model, prep, boxes, presence, row) -> tuple[float, float | None]:
    """Where the errors come from: (tIoU of a presence-head span, mean box IoU on the sampled
    frames inside the true span). Neither is used for stg's output; they tell model work where
    to look (temporal answer vs boxes)."""
    idx = [int(f) for f in prep["sampled"].indices]
    gt = span_frames(*row["span_frames"])
    on = [f for f, p in zip(idx, presence) if p > 0.5]
    t = tiou(span_frames(min(on), max(on)), gt) if on else 0.0
    ious = true_span_box_ious(model, prep, boxes, row)
    return t, (float(np.mean(ious)) if ious else None)


if __name__ == "__main__":
    main()
