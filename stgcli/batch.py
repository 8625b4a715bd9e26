"""`stg batch`: many (video, query) pairs, one model load, append-only resumable JSONL.

Clips run side by side in worker threads through a bounded window of futures, decoding ahead
of the model, so the model rarely waits and memory stays flat however many videos there are.
Each result line is written whole, flushed and fsynced before the next starts; a rerun skips
pairs already in the output.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import threading
from collections import deque
from contextlib import contextmanager, nullcontext
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from .errors import UserError
from .pipeline import normalize_query

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg"}


def _manifest_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is not part of the header
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text; save the manifest as UTF-8") from None


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    text = _manifest_text(path)
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = {"video", "query"} - set(reader.fieldnames or [])
        if missing:
            raise UserError(f"{path}: line 1: missing column(s) {', '.join(sorted(missing))}; "
                            "the header must name video,query")
        return [(reader.line_num, row) for row in reader]  # the file's line, blank lines counted
    rows = []
    # "\n" only: str.splitlines() would also split inside a query holding U+2028 and the like
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}: line {i}: expected an object with \"video\" and \"query\"")
        rows.append((i, row))
    return rows


def collect_items(source: Path, query: str | None) -> list[tuple]:
    """(video path, query) pairs from a folder + --query, or from a JSONL/CSV manifest; a manifest's
    pairs carry where they came from ("manifest.jsonl: line 7") for their error messages."""
    if not source.exists():
        raise UserError(f"{source}: no such file or folder")
    if source.is_dir():
        if not query or not query.strip():
            raise UserError(f"{source}: a folder needs --query \"...\" (or pass a manifest with a query per video)")
        videos = sorted(p for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file())
        if not videos:
            raise UserError(f"{source}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
        return [(str(p), normalize_query(query)) for p in videos]
    items = []
    for line_no, row in _manifest_rows(source):
        for col in ("video", "query"):
            if not str(row.get(col) or "").strip():
                raise UserError(f"{source}: line {line_no}: missing or empty \"{col}\"")
        video = Path(str(row["video"]))
        if not video.is_absolute():
            video = source.parent / video
        items.append((str(video), normalize_query(row["query"]), None, None, f"{source}: line {line_no}"))
    if not items:
        raise UserError(f"{source}: manifest has no entries")
    return items


def _normalize_items(items) -> list[tuple[str, str, float | None, float | None, str | None]]:
    """(video, query[, start_s, end_s[, origin]]) -> 5-tuples with a whitespace-normalized query."""
    out = []
    for it in items:
        video, query = str(it[0]), normalize_query(it[1])
        start_s = it[2] if len(it) > 2 else None
        end_s = it[3] if len(it) > 3 else None
        out.append((video, query, start_s, end_s, it[4] if len(it) > 4 else None))
    return out


def _file_key(path: str) -> str:
    return os.path.realpath(path)


def _recorded_keys(recorded: set[tuple[str, str]], wanted: set[tuple[str, str]]) -> dict:
    """Map each (video.path, query) in the output to the key of the pair it was written for.

    A path resolves from the current folder, however it is spelled. A relative one that does not
    exist from here was most likely written by a run started in another folder: it stands for the
    wanted file whose real path ends with it, if exactly one does (if none or several do, the pair
    runs again; a second line beats a lost result).
    """
    by_name: dict[tuple[str, str], list[str]] = {}
    for path, query in wanted:
        by_name.setdefault((os.path.basename(path), query), []).append(path)
    out = {}
    for video, query in recorded:
        key = (_file_key(video), query)
        if key not in wanted and not os.path.isabs(video) and not os.path.lexists(video):
            tail = os.sep + os.path.normpath(video)
            hits = [p for p in by_name.get((os.path.basename(tail), query), ()) if p.endswith(tail)]
            if len(hits) == 1:
                key = (hits[0], query)
        out[(video, query)] = key
    return out


def default_workers() -> int:
    """One clip decoding ahead per core beyond the first, at most 4 (a window of a few clips is
    enough to keep the model fed). On 2 cores, 1 and 2 were within this VM's noise of each
    other in paired runs (benchmarks/RESULTS.md)."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


@contextmanager
def _cores_per_clip(device: str, threads: int):
    """On CPU, share the cores among the clips in flight: `threads` clips run torch at once, and
    each one's OpenMP team competing with the others for the same cores made the whole batch
    slower (2 cores: 0.237 s/clip with torch on 2 threads, 0.203 s on 1). Restored afterwards,
    so a library caller's setting survives."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) // threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class BatchCounts(NamedTuple):
    """What a batch run did: pairs grounded, failed, skipped as already in the output, and how many
    of those skipped had failed in an earlier run (still failures: `retry_failed` runs them again)."""
    grounded: int
    failed: int
    skipped: int
    failed_earlier: int = 0


def run_batch(source: Path | None, out_path: Path, query: str | None = None, model=None, frames: int | None = None,
              device: str = "auto", quant: str | None = None, resume: bool = True,
              progress: bool = True, workers: int | None = None, allow_pickle: bool = False,
              span_decoding: str = "joint", *,
              items=None, retry_failed: bool = False,
              desc: str = "batch") -> BatchCounts:
    """Ground every pair not yet in `out_path`; returns what it did (BatchCounts).

    Pairs come from `source` (folder + `query`, or a manifest), or, for library callers such
    as `stg eval`, from `items`: (video, query) or (video, query, start_s, end_s) tuples, the
    window limiting where the model looks. Either way a pair is identified by (video, query):
    that is what resume skips, and the first window given for a pair is the one used. A pair whose
    last line in the output is an error is skipped too, unless `retry_failed`: then it runs again
    and its new line supersedes the error line, which stays (the file is append-only).
    `workers + 1` threads take clips from decode to result (PyAV and torch release the GIL while
    they work): `workers` decode ahead while one is in the model. At most `workers + 3` clips are
    in flight, so memory does not grow with the batch. Default: `default_workers()`.
    """
    from tqdm import tqdm

    from .pipeline import check_frames, ground_prepared, prepare
    from .result import JsonlWriter, error_result
    from .weights import LoadedModel, load_model

    check_frames(frames)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if items is None:
        items = collect_items(Path(source), query)
    items = _normalize_items(items)
    if out_path.exists() and not resume:
        raise UserError(f"{out_path}: exists; with --no-resume choose a new --out (stg never overwrites results)")
    writer = JsonlWriter(out_path)
    if writer.repaired:
        print(f"stg: note: {out_path}: removed an unfinished last line (an interrupted run); its clip is "
              "grounded again", file=sys.stderr)
    # One file however it is spelled (relative or absolute, "a/../b", a symlink): a rerun that names
    # the manifest another way must not ground every pair a second time.
    unique = {}
    for it in items:
        unique.setdefault((_file_key(it[0]), it[1]), it)
    recorded = _recorded_keys(writer.keys(), set(unique))
    failed = {recorded[k] for k in writer.failed()}
    done = set(recorded.values()) - (failed if retry_failed else set())
    todo = [it for key, it in unique.items() if key not in done]
    skipped = len(items) - len(todo)  # duplicates of a pair count as already done
    failed_earlier = sum(1 for key in unique if key in failed and key in done)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, quant=quant,
                                                                     allow_pickle=allow_pickle, frames=frames,
                                                                     span_decoding=span_decoding)
    n_ok = n_failed = 0

    # Each clip goes from decode to result in one pool thread; the main thread only writes, in input
    # order. On CPU the model runs in several threads at once (torch on one intra-op thread each,
    # see _cores_per_clip): clips then fill both cores whatever mix of decoding and model
    # work is pending, which a model confined to the main thread could not (it left a core idle
    # while it ran). On a GPU one clip at a time holds the model; the other threads decode ahead.
    model_turn = threading.Lock() if loaded.device != "cpu" else nullcontext()

    def work(item):
        try:
            # one decoder thread per clip: the pool is the parallelism (14% less CPU per clip)
            data = prepare(loaded, item[0], item[1], frames, item[2], item[3], threads=1)
        except Exception as e:  # one bad file must not stop ten thousand others
            return error_result(item[0], item[1], e, f"{item[4]}: {e}" if item[4] else str(e)), False
        with model_turn:
            return ground_prepared(loaded, data, item[0]), True

    threads = workers + 1  # one clip in the model while `workers` others decode
    bar = tqdm(total=len(todo), desc=desc, unit="clip", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    with writer, ThreadPoolExecutor(max_workers=threads) as pool, _cores_per_clip(loaded.device, threads):
        window: deque = deque()
        it = iter(todo)
        for item in it:  # keep a few clips in flight, never more
            window.append(pool.submit(work, item))
            if len(window) >= threads + 2:
                break
        while window:
            fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append(pool.submit(work, nxt))
            res, ok = fut.result()
            n_ok += ok
            n_failed += not ok
            if not ok and progress:
                bar.write(f"stg: error: {res.error.message}", file=sys.stderr)
            writer.append(res, retry=retry_failed)
            bar.update(1)
    bar.close()
    return BatchCounts(n_ok, n_failed, skipped, failed_earlier)
