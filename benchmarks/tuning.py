"""Score a model on a tuning set of `stg synth` clips at several presence calibrations.

    stg synth /tmp/tune4242 --n 80 --seed 4242
    python benchmarks/tuning.py /tmp/tune4242 [--model DIR] [--bias 0 0.5 1.0] [--span-decoding joint|text]
                                              [--refine-steps N] [--link-weight 0 0.5] [--link-free 1]
                                              [--verify-choose 0 1] [--verify-presence 0 1] [--verify-candidates 3]

How `presence_bias` (the model config's inference-time shift of the presence logits) is chosen
for a model before it ships: on clips other than the quality benchmark's. Each clip is decoded
once; per bias it prints m_tIoU, m_vIoU, vIoU@0.3/0.5 and the mean box IoU on the sampled frames
inside the true span (the boxes alone, whatever span was chosen), with the share of boxes that
miss (IoU < 0.1) and that hit well (IoU > 0.5). Then, for the last setting (the boxes depend on the
bias only through the span tube linking follows), the same box figures per query form and with /
without a twin, with the mean IoU of the boxes that do not miss (a model can point more precisely
yet at the wrong object more often), after that setting's m_tIoU / m_vIoU per group.
`--refine-steps` sets how many passes a model's box refiner makes (its config's `box_refiner.steps`;
0: the space decoder's boxes as they are). `--link-weight` / `--link-free` set tube linking (config
`link_weight` / `link_free`; weight 0: off), `--verify-choose` / `--verify-presence` how much a box
verifier's verdicts move the boxes and the presence (its config's `box_verifier.choose` / `presence`;
0: not at all) and `--verify-candidates` how many places per frame it is asked about, every
combination with every bias. Nothing is written.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import MISS_IOU, true_span_box_ious
from stgcli.metrics import score_sample, summarize
from stgcli.pipeline import finish, prepare, run_model
from stgcli.weights import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("clips", type=Path, help="a folder written by `stg synth`")
    ap.add_argument("--model", default=None, help="model name or directory (default: the built-in model)")
    ap.add_argument("--bias", type=float, nargs="+", default=None, help="presence biases (default: the model's)")
    ap.add_argument("--span-decoding", default="joint", choices=["joint", "text"])
    ap.add_argument("--refine-steps", type=int, default=None, help="box refiner passes (default: the model's)")
    ap.add_argument("--frames", type=int, default=None, help="frames sampled per clip (default: the model's)")
    ap.add_argument("--link-weight", type=float, nargs="+", default=None,
                    help="tube linking weights, 0: off (default: the model's config)")
    ap.add_argument("--link-free", type=float, nargs="+", default=None,
                    help="tube linking's free move in patches (default: the model's config)")
    ap.add_argument("--verify-choose", type=float, nargs="+", default=None,
                    help="weight of the box verifier's verdicts on where the box goes (default: the model's)")
    ap.add_argument("--verify-presence", type=float, nargs="+", default=None,
                    help="weight of the box verifier's verdict on each frame's presence (default: the model's)")
    ap.add_argument("--verify-candidates", type=int, default=None,
                    help="places per frame the box verifier is asked about (default: the model's)")
    args = ap.parse_args()
    rows = [json.loads(x) for x in (args.clips / "manifest.jsonl").read_text().splitlines()]
    m = load_model(args.model, device="cpu", span_decoding=args.span_decoding)
    if args.refine_steps is not None:
        if m.model.config.box_refiner is None:
            ap.error(f"{m.name} has no box refiner")
        m.model.space_decoder.refiner.steps = args.refine_steps
    preps = [prepare(m, args.clips / r["video"], r["query"], frames=args.frames) for r in rows]
    cfg = m.model.config
    verifier = getattr(m.model.space_decoder, "verifier", None)
    if verifier is None and (args.verify_choose or args.verify_presence or args.verify_candidates):
        ap.error(f"{m.name} has no box verifier")
    if args.verify_candidates:
        verifier.candidates = args.verify_candidates
    choose = args.verify_choose or [verifier.choose if verifier else 0.0]
    vpres = args.verify_presence or [verifier.presence if verifier else 0.0]
    settings = [(b, w, f, c, p) for b in args.bias or [cfg.presence_bias] for w in args.link_weight or [cfg.link_weight]
                for f in args.link_free or [cfg.link_free] for c in choose for p in vpres]
    for bias, weight, free, choose_w, presence_w in settings:
        cfg.presence_bias, cfg.link_weight, cfg.link_free = bias, weight, free
        if verifier is not None:
            verifier.choose, verifier.presence = choose_w, presence_w
        scores, clip_ious = [], []
        for r, prep in zip(rows, preps):
            text, boxes, presence, _ = run_model(m, prep, all_boxes=True)
            res = finish(m, prep, args.clips / r["video"], text, boxes, presence, {}, [])
            scores.append(score_sample(res, tuple(r["span_frames"]), {int(k): v for k, v in r["boxes"].items()}))
            clip_ious.append(true_span_box_ious(m, prep, boxes, r))
        s, iou = summarize(scores), np.concatenate([np.asarray(x, float) for x in clip_ious])
        verify = f" verify {choose_w:g}/{presence_w:g}" if verifier is not None else ""
        print(f"{m.name} bias {bias:+.1f} link {weight:g}/{free:g}{verify} ({args.span_decoding}): "
              f"m_tIoU {s['m_tIoU']:.3f} m_vIoU {s['m_vIoU']:.3f} "
              f"vIoU@0.3 {s['vIoU@0.3']:.3f} vIoU@0.5 {s['vIoU@0.5']:.3f} | box IoU {iou.mean():.3f} "
              f"miss {np.mean(iou < MISS_IOU):.2f} hit {np.mean(iou > 0.5):.2f}", flush=True)

    def group_of(r: dict, g: str) -> bool:
        return g in (r["form"], "twin" if r["has_twin"] else "no twin")

    print("spans and tubes of the last setting by group:")
    for g in ("plain", "moving", "still", "no twin", "twin"):
        picked = [sc for r, sc in zip(rows, scores) if group_of(r, g)]
        if picked:
            t = summarize(picked)
            print(f"  {g:8s} clips {len(picked):4d} | m_tIoU {t['m_tIoU']:.3f} m_vIoU {t['m_vIoU']:.3f} "
                  f"vIoU@0.5 {t['vIoU@0.5']:.3f}")
    print("boxes on true-span frames by group:")
    for g in ("plain", "moving", "still", "no twin", "twin"):
        x = np.asarray([v for r, vs in zip(rows, clip_ious) if group_of(r, g) for v in vs])
        if len(x):
            kept = x[x >= MISS_IOU]
            print(f"  {g:8s} n {len(x):4d} | box IoU {x.mean():.3f} miss {np.mean(x < MISS_IOU):.2f} "
                  f"IoU of the rest {kept.mean() if len(kept) else float('nan'):.3f}")


if __name__ == "__main__":
    main()
