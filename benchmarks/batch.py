"""`stg batch` throughput and memory, `stg ground` cold start, `stg --help` latency (CPU).

    python benchmarks/batch.py [--n 100] [--seed 4242] [--workers 1] [--repeat 1] [--clips DIR] [--no-write]

1. Baseline: a plain sequential decord loop that only decodes the frames the model would get
   (same indices, same size): per-clip seconds, measured right before each stg run it is
   compared with (a noisy machine then moves both alike).
2. `stg batch` as a user runs it (a subprocess on the clips' manifest): the output file is
   polled so each result line gets a timestamp; steady state = (last line - first line) /
   (n - 1), start-up and model load reported apart. Peak RSS (VmHWM) at clip 10 and clip n.
3. `stg ground --json --out` cold start, wall time, with its breakdown measured in a fresh
   process: imports, model load, decode, model, write.
4. `stg --help` wall time (median of 5).
Writes benchmarks/results/batch.json and the "## Batch" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, machine, today, write_section

ROOT = HERE.parent
PY = sys.executable
TARGET_RATIO = 1.1
TARGET_RSS_GROWTH = 0.10
EXAMPLE = ROOT / "examples" / "shapes.mp4"


def make_clips(folder: Path, n: int, seed: int) -> list[dict]:
    manifest = folder / "manifest.jsonl"
    if not manifest.exists():
        subprocess.run([PY, "-m", "stgcli", "synth", str(folder), "--n", str(n), "--seed", str(seed)], check=True,
                       stderr=subprocess.DEVNULL)
    rows = [json.loads(x) for x in manifest.read_text().splitlines()][:n]
    if len(rows) < n:
        sys.exit(f"{manifest} has {len(rows)} clips, fewer than --n {n}; use another --clips folder")
    return rows


def decord_baseline(paths: list[Path], frames: int, size: int) -> tuple[float, float]:
    """Wall and CPU seconds per clip for decord alone: open, the model's sample indices, resized
    decode (decord's default threads, so its CPU time can exceed its wall time)."""
    import decord

    from stgcli.video import sample_indices

    def one(p: Path) -> None:
        vr = decord.VideoReader(str(p), ctx=decord.cpu(0), width=size, height=size)
        vr.get_batch(sample_indices(len(vr), frames).tolist()).asnumpy()

    for p in paths[:3]:  # warm the page cache and decord's libraries
        one(p)
    t0, c0 = time.perf_counter(), time.process_time()
    for p in paths:
        one(p)
    return (time.perf_counter() - t0) / len(paths), (time.process_time() - c0) / len(paths)


_DECODE_LOOP = r"""
import sys
from stgcli.video import sample_frames
frames, size = int(sys.argv[1]), int(sys.argv[2])
while True:
    for p in sys.argv[3:]:
        sample_frames(p, frames, size=(size, size), threads=1)
"""


def standalone_costs(paths: list[Path], queries: list[str], dtype: str = "auto",
                     batch_size: int | None = None) -> tuple[float, float, float]:
    """CPU seconds per clip of the batch's two halves, each measured alone: a decoding worker's
    (stg.batch.decode_clip, one decoder thread) and the main process's (preprocessing, prompt,
    model and result, torch on 1 thread): what the batch has to fit onto the machine's cores.
    Each clip is asked its own query, as in the batch: a query whose object is absent skips the
    answer's scoring, tube linking and the refiner, and costs 15-25% less (a fixed query
    understated the model). Third: the main half's CPU seconds per clip again while another
    process decodes on the other core(s), to show what two busy cores cost each other here."""
    import torch

    from stgcli.batch import decode_clip, default_batch_size
    from stgcli.pipeline import ground_prepared_many, model_input_size, prepare_sampled
    from stgcli.weights import load_model

    m = load_model(device="cpu", dtype=dtype)
    size = model_input_size(m)
    before = torch.get_num_threads()
    torch.set_num_threads(1)

    bs = batch_size or default_batch_size("cpu")

    def main_half() -> float:  # as stg batch runs them: `bs` clips to a prefill
        t0 = time.process_time()
        for i in range(0, len(paths), bs):
            ground_prepared_many(m, [prepare_sampled(m, q, sampled, time.perf_counter())
                                     for q, sampled in zip(queries[i:i + bs], decoded[i:i + bs])],
                                 [str(p) for p in paths[i:i + bs]])
        return (time.process_time() - t0) / len(paths)

    try:
        for p in paths[:3]:  # warm-up
            decode_clip(str(p), m.default_frames, None, None, size)
        t0 = time.process_time()
        decoded = [decode_clip(str(p), m.default_frames, None, None, size)[0] for p in paths]
        decode = (time.process_time() - t0) / len(paths)
        main_half()  # warm-up: oneDNN's kernels for the new shapes
        model = main_half()
        loop = subprocess.Popen([PY, "-c", _DECODE_LOOP, str(m.default_frames), str(size[0]), *map(str, paths)],
                                stderr=subprocess.DEVNULL)
        try:
            time.sleep(2.0)  # its imports done, decoding
            model_busy = main_half()
        finally:
            loop.kill()
            loop.wait()
    finally:
        torch.set_num_threads(before)
    return decode, model, model_busy


def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a live process in KiB."""
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, v = line.split(":")
                vals[key] = int(v.split()[0])
    return vals.get("VmRSS", 0), vals.get("VmHWM", 0)


# `stg batch` with the model's forward replaced by an empty answer: what the batch costs when the
# model is free (as with a GPU doing it), i.e. decode, preprocess, result building and writing.
_NO_MODEL = r"""
import sys
import numpy as np
from stgcli import pipeline
from stgcli.cli import cli

def no_model(loaded, preps, all_boxes=False):
    return [("", np.zeros((len(p["sampled"].indices), 4), np.float32), np.zeros(len(p["sampled"].indices), np.float32),
             0.0) for p in preps]

pipeline.run_models = no_model
cli(sys.argv[1:])
"""


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) used so far by a live process and by its live children (the
    batch's decoding workers)."""
    tick = os.sysconf("SC_CLK_TCK")

    def used(p: str) -> float:
        with open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = f.read().split()
    return used(str(pid)), sum(used(k) for k in kids)


def run_batch(manifest: Path, n: int, workers: int, tmp: Path, model: bool = True, dtype: str = "auto",
              ahead: int = 0, batch_size: int | None = None) -> dict:
    """Run `stg batch` in a subprocess and timestamp every result line as it lands. `ahead`: how many
    clips its decoders run ahead of the model; the CPU split is taken from line 10 to line n - ahead,
    while the decoders are still at work (they finish `ahead` clips before the last line)."""
    out = tmp / "results.jsonl"
    if out.exists():
        out.unlink()
    args = ["batch", str(manifest), "--out", str(out), "--device", "cpu", "--workers", str(workers), "--dtype", dtype]
    args += ["--batch-size", str(batch_size)] if batch_size else []
    cmd = [PY, "-m", "stgcli", *args] if model else [PY, "-c", _NO_MODEL, *args]
    t_start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stamps: list[float] = []
    rss: dict[int, tuple[int, int]] = {}
    cpu: dict[int, tuple[float, float]] = {}
    cpu_to = n - ahead if n - ahead >= 30 else None
    seen, count = 0, 0  # bytes read so far, lines in them: each poll reads only what was appended (rereading
    # the whole file every 5 ms took up to ~6% of a core from the 2 the measured batch runs on)
    while True:
        done = proc.poll() is not None
        if out.exists():
            with open(out, "rb") as f:
                f.seek(seen)
                new = f.read()
            seen += len(new)
            count += new.count(b"\n")
        now = time.perf_counter()
        stamps.extend([now] * (count - len(stamps)))
        if not done:
            for mark in (10, n):
                if count >= mark and mark not in rss:
                    rss[mark] = _rss_kib(proc.pid)
            for mark in (10, cpu_to):
                if mark is not None and count >= mark and mark not in cpu:
                    cpu[mark] = _cpu_s(proc.pid)
        if done:
            break
        time.sleep(0.005)
    err = proc.stderr.read()
    if proc.returncode not in (0, 1) or len(stamps) != n:
        sys.exit(f"stg batch failed (exit {proc.returncode}, {len(stamps)} of {n} lines):\n{err[-2000:]}")
    docs = [json.loads(x) for x in out.read_text().splitlines()]
    failed = sum(1 for d in docs if d.get("error"))
    if n not in rss:  # the process ended between polls at the last line: VmHWM only grows
        rss[n] = rss.get(10, (0, 0))
    # Lines land a batch (--batch-size) at a time: the clips done after the first line are those whose
    # lines came later (n - 1 for one at a time), not n - 1 of them when the first line came with three others.
    steady = (stamps[-1] - stamps[0]) / sum(1 for t in stamps if t > stamps[0])
    decode = statistics.mean(d["timing_s"]["decode"] for d in docs if not d.get("error"))
    model = statistics.mean(d["timing_s"]["model"] for d in docs if not d.get("error"))
    # CPU seconds per clip from line 10 to line n - ahead, of the main process (the model) and of the decoders
    split = ({"main_cpu_s_per_clip": (cpu[cpu_to][0] - cpu[10][0]) / (cpu_to - 10),
              "workers_cpu_s_per_clip": (cpu[cpu_to][1] - cpu[10][1]) / (cpu_to - 10),
              "cpu_lines": [10, cpu_to]} if cpu_to in cpu and 10 in cpu else {})
    return {"workers": workers, "dtype": dtype, "batch_size": batch_size, "startup_s": stamps[0] - t_start,
            "steady_s_per_clip": steady,
            **split,
            "total_s": time.perf_counter() - t_start, "failed": failed,
            "in_worker_decode_s": decode, "model_s": model,
            "peak_rss_mib_at_10": rss[10][1] / 1024, "peak_rss_mib_at_n": rss[n][1] / 1024}


_COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, transformers  # noqa: F401  the heavy imports a ground call pays for
from stgcli import load_model
from stgcli.pipeline import ground_prepared, prepare
from stgcli.result import write_json_atomic
t1 = time.perf_counter()
m = load_model(device="cpu")
t2 = time.perf_counter()
prep = prepare(m, sys.argv[1], sys.argv[2])
t3 = time.perf_counter()
res = ground_prepared(m, prep, sys.argv[1])
t4 = time.perf_counter()
write_json_atomic(sys.argv[3], res)
t5 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "model_load": t2 - t1, "decode": t3 - t2, "model": t4 - t3,
                  "write": t5 - t4}))
"""


def cold_start(tmp: Path, reps: int = 3) -> dict:
    """Wall time of the real command, and a breakdown from an instrumented fresh process."""
    query = "the red circle moving left"
    walls, parts = [], []
    for rep in range(reps):
        out = tmp / f"cold{rep}.json"  # stg never overwrites an --out
        t0 = time.perf_counter()
        subprocess.run([PY, "-m", "stgcli", "ground", str(EXAMPLE), query, "--device", "cpu", "--json",
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r = subprocess.run([PY, "-c", _COLD, str(EXAMPLE), query, str(tmp / f"cold_parts{rep}.json")], check=True,
                           capture_output=True, text=True)
        d = json.loads(r.stdout.strip().splitlines()[-1])
        d["interpreter"] = (time.perf_counter() - t0) - sum(d.values())
        parts.append(d)
    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    return {"wall_s": statistics.median(walls), "breakdown_s": med}


def help_latency(reps: int = 5) -> float:
    walls = []
    for _ in range(reps):
        t0 = time.perf_counter()
        subprocess.run([PY, "-m", "stgcli", "--help"], check=True, stdout=subprocess.DEVNULL)
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--workers", type=int, nargs="+", default=[1])
    ap.add_argument("--repeat", type=int, default=1, help="paired (decord loop, stg batch) runs per --workers")
    ap.add_argument("--dtype", nargs="+", default=["auto"], help="stg batch --dtype values to run (float32 on CPU "
                    "is auto's choice; bfloat16 is the opt-in)")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[0], help="stg batch --batch-size values to run "
                    "(0: its default, 4 on a CPU)")
    ap.add_argument("--clips", default=None, help="folder for the clips (default: a temp folder)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.n < 11:
        sys.exit("--n must be at least 11 (RSS is compared between clip 10 and clip n)")

    sys.path.insert(0, str(ROOT))
    from stgcli.weights import load_model

    tmp = Path(tempfile.mkdtemp(prefix="stg-bench-batch-"))
    clips = Path(args.clips) if args.clips else tmp / "clips"
    rows = make_clips(clips, args.n, args.seed)
    paths = [clips / r["video"] for r in rows]
    m = load_model(device="cpu")
    frames, size = m.default_frames, m.processor.settings.image_size
    del m
    manifest = tmp / "manifest.jsonl"  # the clips with their own queries, paths absolute
    manifest.write_text("".join(json.dumps({"video": str(p), "query": r["query"]}) + "\n"
                                for p, r in zip(paths, rows)))

    # all the clips: a few of them (long, noisy backgrounds at a low crf) cost several times the
    # median to decode, so a subset misstates the mean the batch has to sustain
    sizes = [b or None for b in args.batch_size]
    costs_of = {(d, b): standalone_costs(paths, [r["query"] for r in rows], d, b) for d in args.dtype for b in sizes}
    from stgcli.batch import _cores, clips_ahead, default_batch_size

    cores = _cores()  # what stg batch itself counts (CPU affinity: a container's or taskset's share)
    # This VM's speed drifts by up to 40% between minutes (the same decord loop measured 0.092 and
    # 0.128 s/clip in two runs an hour apart), so each stg run is paired with a decord loop measured
    # right before it, and every pairing is repeated: the ratio of a pair is what is compared.
    def paired(rep: int, workers: int, model: bool = True, dtype: str = "auto", batch_size: int | None = None) -> dict:
        base, base_cpu = decord_baseline(paths, frames, size)
        r = run_batch(manifest, args.n, workers, tmp, model=model, dtype=dtype, batch_size=batch_size,
                      ahead=workers + clips_ahead(frames, (size, size)) + 1)
        r.update(repeat=rep, decord_s_per_clip=base, decord_cpu_s_per_clip=base_cpu,
                 ratio=r["steady_s_per_clip"] / base)
        return r

    combos = [(d, w, b) for d in args.dtype for w in args.workers for b in sizes]
    runs = [paired(rep, w, dtype=d, batch_size=b) for rep in range(args.repeat) for d, w, b in combos]
    # the same pairing, with the model's forward taken out
    free = [paired(rep, args.workers[-1], model=False) for rep in range(args.repeat)]
    cold = cold_start(tmp)
    helps = help_latency()

    def flags(d: str, w: int, b: int | None) -> str:
        return (f"--workers {w}" + (f" --dtype {d}" if d != "auto" else "")
                + (f" --batch-size {b}" if b else ""))

    def label(r: dict) -> str:
        return "stg batch " + flags(r["dtype"], r["workers"], r["batch_size"])

    def key(r: dict) -> tuple:
        return r["dtype"], r["workers"], r["batch_size"]

    lines = ["| run | decord loop s/clip (right before) | stg steady s/clip | ratio | start-up s | "
             f"peak RSS clip 10 MiB | peak RSS clip {args.n} MiB | RSS growth |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        r["rss_growth"] = r["peak_rss_mib_at_n"] / r["peak_rss_mib_at_10"] - 1
        lines.append(f"| {label(r)} (run {r['repeat'] + 1}) | {r['decord_s_per_clip']:.3f} | "
                     f"{r['steady_s_per_clip']:.3f} | {r['ratio']:.2f} | "
                     f"{r['startup_s']:.2f} | {r['peak_rss_mib_at_10']:.0f} | {r['peak_rss_mib_at_n']:.0f} | "
                     f"{100 * r['rss_growth']:+.1f}% |")
    for r in free:
        lines.append(f"| stg batch --workers {r['workers']}, model forward taken out (run {r['repeat'] + 1}) | "
                     f"{r['decord_s_per_clip']:.3f} | {r['steady_s_per_clip']:.3f} | {r['ratio']:.2f} | "
                     f"{r['startup_s']:.2f} | | | |")
    free_ratio = statistics.median(r["ratio"] for r in free)
    medians = {c: statistics.median(r["ratio"] for r in runs if key(r) == c) for c in combos}
    base = statistics.median(r["decord_s_per_clip"] for r in runs)
    base_cpu = statistics.median(r["decord_cpu_s_per_clip"] for r in runs)
    b = cold["breakdown_s"]
    cold_line = (f"`stg ground` cold start (process start to JSON written, median of 3): {cold['wall_s']:.2f} s; "
                 "breakdown in a fresh process: " + ", ".join(f"{k} {v:.2f} s" for k, v in b.items()))
    verdicts, costs, best_of = [], [], {}
    for d, b in costs_of:
        best_c = min((c for c in combos if (c[0], c[2]) == (d, b)), key=lambda c: medians[c])
        best_w = best_c[1]
        best = best_of[(d, b)] = dict(min((r for r in runs if key(r) == best_c),
                                          key=lambda r: abs(r["ratio"] - medians[best_c])), ratio=medians[best_c])
        flag = flags(*best_c).removeprefix(f"--workers {best_w}")
        verdicts.append(f"steady-state ratio {best['ratio']:.3f}, median over {args.repeat} paired run(s) of "
                        f"--workers {best_w}{flag} ({'meets' if best['ratio'] <= TARGET_RATIO else 'misses'} "
                        f"<= {TARGET_RATIO}); RSS growth {100 * best['rss_growth']:+.1f}% "
                        f"({'meets' if best['rss_growth'] < TARGET_RSS_GROWTH else 'misses'} < 10%)")
        own_decode, own_model, model_busy = costs_of[(d, b)]
        floor = max(own_model, own_decode / min(best_w, cores), (own_decode + own_model) / cores)
        costs.append(f"CPU per clip, measured alone ({'float32' if d == 'auto' else d}, "
                     f"{b or default_batch_size('cpu')} clips to a prefill): a decoding worker {own_decode:.3f} s, the "
                     f"main process (preprocessing, prompt, model, result; torch on 1 thread) {own_model:.3f} s; with "
                     f"--workers {best_w} on {cores} cores no schedule beats max(main, decode / workers, (decode + "
                     f"main) / cores) = {floor:.3f} s, a ratio of {floor / base:.2f} to the median decord "
                     f"loop ({base:.3f} s). While another process decodes, the main half takes {model_busy:.3f} CPU s "
                     f"per clip ({model_busy / own_model - 1:+.0%})"
                     + (": two busy cores slow each other here, so that floor is not reachable on this machine."
                        if model_busy > 1.1 * own_model else "."))
    verdict = "; ".join(verdicts) + f"; `stg --help` {helps:.2f} s ({'meets' if helps < 1 else 'misses'} < 1 s)"
    costs = " ".join(costs)
    costs += (f" The decord loop itself takes {base_cpu:.3f} CPU s per clip ({base_cpu / base:.1f} cores busy): "
              f"stg has to fit decode and model into the {cores} cores that decord's decoding alone spreads over.")
    costs += (f" With the model's forward taken out (an empty answer instead), the same pipeline (decode, "
              f"preprocess, results, fsynced lines) runs at a median ratio of {free_ratio:.2f}: what is left "
              "above that is the model's CPU time.")

    def busy(r: dict) -> str:
        if "main_cpu_s_per_clip" not in r:
            return ""
        main, dec = r["main_cpu_s_per_clip"], r["workers_cpu_s_per_clip"]
        a, b = r["cpu_lines"]
        return (f"; CPU per clip from line {a} to {b}: main process (model) {main:.3f} s, decoders {dec:.3f} s, "
                f"{(main + dec) / r['steady_s_per_clip']:.2f} of {cores} cores busy")

    inside = "; ".join(f"{label(best)}: decode in a worker process {best['in_worker_decode_s']:.3f} s, model "
                       f"{best['model_s']:.3f} s{busy(best)}" for best in best_of.values())
    text = "\n".join(lines)
    print(text)
    print(costs)
    print(f"per clip inside stg batch (wall): {inside}")
    print(cold_line)
    print(verdict)
    if args.no_write:
        return
    when, where = today(), machine()
    out = {"date": when, "machine": where, "n": args.n, "seed": args.seed, "frames": frames, "size": size,
           "repeat": args.repeat, "dtypes": args.dtype,
           "median_ratio": {flags(*c): v for c, v in medians.items()},
           "decord_s_per_clip_median": base, "decord_cpu_s_per_clip_median": base_cpu,
           "standalone_cpu_s": {flags(d, 1, b).removeprefix("--workers 1").strip() or "default":
                                dict(zip(("decode_worker", "main", "main_while_decoding"), c))
                                for (d, b), c in costs_of.items()},
           "runs": runs, "runs_model_forward_taken_out": free, "cold_start": cold, "help_s": helps}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "batch.json").write_text(json.dumps(out, indent=2) + "\n")
    write_section("## Batch", (
        f"## Batch (benchmarks/batch.py)\n\n{when}, {where}. Built-in model on CPU, {args.n} shapes-world "
        f"clips (seed {args.seed}), each with its own query; `python benchmarks/batch.py "
        f"--n {args.n} --workers {' '.join(map(str, args.workers))} --repeat {args.repeat}"
        f"{' --dtype ' + ' '.join(args.dtype) if args.dtype != ['auto'] else ''}"
        f"{' --batch-size ' + ' '.join(map(str, args.batch_size)) if args.batch_size != [0] else ''}`.\n\n{text}\n\n"
        f"Inside stg batch per clip (wall): {inside}. {costs}\n\n{cold_line}.\n\n"
        f"Verdict: {verdict}.\n"))


if __name__ == "__main__":
    main()
