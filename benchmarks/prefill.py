"""Model CPU time per (video, query) pair by clips to a prefill (`stg batch --batch-size`) and queries per video.

    python benchmarks/prefill.py [--n 24] [--seed 4242] [--clips DIR] [--dtype float32 bfloat16] [--no-write]

The model half of `stg batch` alone (`pipeline.ground_prepared_many` on clips decoded beforehand, torch on
1 thread, as in a batch on 2 cores): `--n` clips, each asked 1 or 2 queries (its own, then "the blue square
moving left"), grounded 1 or 4 pairs to a prefill. A video's queries in one batch share one vision-tower
pass. This VM's speed drifts, so every setting runs twice, interleaved, and the lower time is kept.
Writes the "## Batch prefill" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, machine, today, write_section

ROOT = HERE.parent
SECOND_QUERY = "the blue square moving left"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--clips", default=None, help="a `stg synth` folder (default: generate one in a temp folder)")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from batch import make_clips
    from stgcli.batch import decode_clip
    from stgcli.pipeline import ground_prepared_many, model_input_size, prepare_sampled
    from stgcli.weights import load_model

    clips = Path(args.clips) if args.clips else Path(tempfile.mkdtemp(prefix="stg-bench-prefill-")) / "clips"
    rows = make_clips(clips, args.n, args.seed)
    torch.set_num_threads(1)
    settings = [(batch, queries) for queries in (1, 2) for batch in (1, 4)]
    results: dict[tuple, float] = {}
    for dtype in args.dtype:
        m = load_model(device="cpu", dtype=dtype)
        size = model_input_size(m)
        decoded = [decode_clip(str(clips / r["video"]), m.default_frames, None, None, size)[0] for r in rows]

        def pairs_of(queries: int) -> list[tuple[dict, str]]:
            out = []
            for r, sampled in zip(rows, decoded):
                first = prepare_sampled(m, r["query"], sampled, time.perf_counter())
                out.append((first, r["video"]))
                if queries == 2:  # as stg batch does: the second query reuses the clip's preprocessed frames
                    out.append((prepare_sampled(m, SECOND_QUERY, sampled, time.perf_counter(),
                                                pixels=first["pixels"]), r["video"]))
            return out

        def cpu_per_pair(batch: int, pairs: list) -> float:
            t0 = time.process_time()
            for i in range(0, len(pairs), batch):
                chunk = pairs[i:i + batch]
                ground_prepared_many(m, [p for p, _ in chunk], [v for _, v in chunk])
            return (time.process_time() - t0) / len(pairs)

        prepared = {q: pairs_of(q) for q in (1, 2)}
        cpu_per_pair(4, prepared[1][:8])  # warm-up: the compute library's kernels for these shapes
        for _ in range(2):
            for batch, queries in settings:
                t = cpu_per_pair(batch, prepared[queries])
                key = (dtype, batch, queries)
                results[key] = min(results.get(key, t), t)
        del m

    lines = ["| dtype | queries per video | model CPU s per pair, 1 to a prefill | 4 to a prefill | change |",
             "|---|---|---|---|---|"]
    for dtype in args.dtype:
        for queries in (1, 2):
            one, four = results[(dtype, 1, queries)], results[(dtype, 4, queries)]
            lines.append(f"| {dtype} | {queries} | {one:.4f} | {four:.4f} | {100 * (four / one - 1):+.0f}% |")
    text = "\n".join(lines)
    print(text)
    if args.no_write:
        return
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "prefill.json").write_text(json.dumps(
        {"date": today(), "machine": machine(), "n": args.n, "seed": args.seed,
         "cpu_s_per_pair": {f"{d} batch {b} queries {q}": v for (d, b, q), v in results.items()}}, indent=2) + "\n")
    write_section("## Batch prefill", (
        f"## Batch prefill (benchmarks/prefill.py)\n\n{today()}, {machine()}. Built-in model, the model half of "
        f"`stg batch` alone on 1 thread: {args.n} shapes-world clips (seed {args.seed}), each asked its own query "
        f"or that and \"{SECOND_QUERY}\"; the lower of two interleaved runs; `python benchmarks/prefill.py "
        f"--n {args.n}`.\n\n{text}\n"))


if __name__ == "__main__":
    main()
