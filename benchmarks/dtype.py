"""`--dtype` on CPU: model time per clip and resident memory over many prompt shapes.

    python benchmarks/dtype.py [--clips DIR] [--n 600] [--dtype float32 bfloat16]

Each dtype runs in its own process (resident memory is per process), on 1 thread, over `--n`
forwards: 50 decoded `stg synth` clips, asked queries of 1 to 12 words after the first 50, so the
prompt length (an input shape) changes from clip to clip as it does in a real batch. bfloat16's
compute library (oneDNN) caches kernels per input shape; this shows whether that memory stops
growing. Writes the "## dtype" section of RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, today, write_section

_ONE = r"""
import json, random, sys, time
from pathlib import Path
import torch
from stgcli import load_model
from stgcli.pipeline import prepare, run_model

clips, n, dtype = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(1)
rows = [json.loads(x) for x in (clips / "manifest.jsonl").read_text().splitlines()][:50]
m = load_model(device="cpu", dtype=dtype)
preps = [prepare(m, clips / r["video"], r["query"]) for r in rows]
words = "red blue green yellow circle square triangle moving left right up down that stays still".split()
rnd = random.Random(0)

def rss_mib():
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024

marks, times = {}, []
for i in range(n):
    p = preps[i % len(preps)]
    if i >= len(preps):
        q = "the " + " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 12)))
        ids, tmask = m.processor.encode_prompt(q, p["sampled"].times_s)
        p = dict(p, ids=ids, text_mask=tmask)
    t0 = time.perf_counter()
    run_model(m, p)
    times.append(time.perf_counter() - t0)
    if i + 1 in (10, 100, 200, n // 2, n):
        marks[i + 1] = rss_mib()
print(json.dumps({"times": times, "rss": marks}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", default=None, help="a `stg synth` folder (default: 50 new clips, seed 4242)")
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.n < 200:
        sys.exit("--n must be at least 200")
    clips = Path(args.clips) if args.clips else Path(tempfile.mkdtemp(prefix="stg-bench-dtype-"))
    if not (clips / "manifest.jsonl").exists():
        subprocess.run([sys.executable, "-m", "stgcli", "synth", str(clips), "--n", "50", "--seed", "4242"],
                       check=True, stderr=subprocess.DEVNULL)
    rows = []
    for dtype in args.dtype:
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", _ONE, str(clips), str(args.n), dtype], check=True,
                           capture_output=True, text=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        rss = {int(k): v for k, v in d["rss"].items()}
        rows.append((dtype, statistics.median(d["times"][10:]), rss, time.perf_counter() - t0))
    marks = sorted(rows[0][2])
    lines = ["| dtype | model s/clip (median, 1 thread) | " + " | ".join(f"RSS MiB after {k}" for k in marks)
             + f" | growth {marks[2]} -> {marks[-1]} |",
             "|---|---|" + "---|" * len(marks) + "---|"]
    for dtype, t, rss, _ in rows:
        lines.append(f"| {dtype} | {t:.4f} | " + " | ".join(f"{rss[k]:.0f}" for k in marks)
                     + f" | {100 * (rss[marks[-1]] / rss[marks[2]] - 1):+.1f}% |")
    text = "\n".join(lines)
    print(text)
    if args.no_write:
        return
    write_section("## dtype", (
        f"## dtype (benchmarks/dtype.py)\n\n{today()}, {machine()}. Built-in model, one forward per clip on 1 "
        f"thread, {args.n} forwards over 50 clips with prompts of 1 to 12 words (a new input shape most "
        f"clips); `python benchmarks/dtype.py --n {args.n} --dtype {' '.join(args.dtype)}`.\n\n{text}\n"))


if __name__ == "__main__":
    main()
