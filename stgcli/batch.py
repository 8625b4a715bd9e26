"""`stg batch`: many (video, query) pairs, one model load, append-only resumable JSONL.

Clips are decoded ahead in worker processes through a bounded window, while the main thread
runs the model on the oldest one, so the model rarely waits and memory stays flat however many
videos there are.
Each result line is written whole, flushed and fsynced before the next starts; a rerun skips
pairs already in the output.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

from .errors import NO_SPACE, UserError, disk_full
from .pipeline import normalize_query

VIDEO_EXTENSIONS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg", ".m2ts", ".mts",
                    ".3gp", ".flv", ".wmv", ".ogv"}


def _manifest_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark (spreadsheet exports) is not part of the header
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line}: not UTF-8 text; save the manifest as UTF-8") from None


def _csv_delimiter(text: str) -> str:
    """"," unless the header names video and query with ";" (a spreadsheet in a locale whose decimal
    mark is the comma saves CSV that way) or a tab between them."""
    head = text.split("\n", 1)[0]
    for sep in (",", ";", "\t"):
        if {"video", "query"} <= {c.strip() for c in next(csv.reader([head], delimiter=sep), [])}:
            return sep
    return ","


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    text = _manifest_text(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=_csv_delimiter(text))
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


def collect_items(source: Path, query: str | Sequence[str] | None) -> list[tuple]:
    """(video path, query) pairs from a folder + one or more queries (every video with every query),
    or from a JSONL/CSV manifest; a manifest's pairs carry where they came from ("manifest.jsonl:
    line 7") for their error messages."""
    if not source.exists():
        from .video import not_a_url

        not_a_url(source)
        raise UserError(f"{source}: no such file or folder")
    queries = [query] if isinstance(query, str) else list(query or [])
    one_video = source.is_file() and source.suffix.lower() in VIDEO_EXTENSIONS
    if source.is_dir() or one_video:
        queries = list(dict.fromkeys(normalize_query(q) for q in queries))
        if not queries or not all(queries):
            what = "a video" if one_video else "a folder"
            raise UserError(f"{source}: {what} needs --query \"...\" (or pass a manifest with a query per video)")
        # Hidden files and folders are not searched: macOS leaves a "._clip.mp4" (metadata, not a video) beside
        # every file it copies to a USB disk or a network share, and each would be an error line.
        videos = [source] if one_video else sorted(
            p for p in source.rglob("*") if p.suffix.lower() in VIDEO_EXTENSIONS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(source).parts))
        if not videos:
            raise UserError(f"{source}: no video files found (looked for {', '.join(sorted(VIDEO_EXTENSIONS))})")
        return [(str(p), q) for p in videos for q in queries]
    if queries:
        raise UserError(f"{source}: a manifest gives each video its own query; --query is for a folder of videos "
                        "or one video")
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


# Far beyond any healthy clip (a long file without an index is read whole to find its frames: minutes
# at worst), and short enough that a batch left overnight does not sit on one file.
DECODE_TIMEOUT_S = 600.0


def _cores() -> int:
    """The cores this process may run on (a container's or `taskset`'s share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers() -> int:
    """One decoding process per core beyond the first (which runs the model), at most 4 (the window
    of decoded clips, not more decoders, keeps the model fed); on 2 cores, 2: the model and one decoder
    each take about a core per clip, and a second decoder fills the gaps either leaves
    (benchmarks/RESULTS.md: 0.074-0.078 s per clip against 0.077-0.079 with one, and with --dtype
    bfloat16 0.066-0.068 against 0.076-0.078)."""
    cores = _cores()
    return 2 if cores == 2 else max(1, min(4, cores - 1))


def default_batch_size(device: str) -> int:
    """Pairs grounded with one prefill: 4 on a CPU, where the model then spends 8-10% less per pair in
    float32 and 21-24% less in bfloat16 (benchmarks/prefill.py; 8 and 16 measured 0.050-0.055 CPU s per
    clip in bfloat16 against 4's 0.053-0.056, within this machine's noise, for 2-4 times the activations);
    1 on a GPU, where the memory several clips of a large model take is not known in advance
    (--batch-size raises it)."""
    return 1 if device.startswith("cuda") else 4


# Decoded clips waiting for the model: enough to ride out a run of long clips (decode time varies
# 10x with clip length while the model's is fixed), bounded in bytes so that large inputs (the
# 7B's 64 frames of 384 px, 28 MB a clip) keep fewer. Measured on 2 cores (benchmarks/RESULTS.md):
# 16 ahead instead of 2 took the model's waits from ~13 ms to ~1-2 ms per clip.
AHEAD_BYTES = 256 * 2**20
MAX_AHEAD = 16
# Decoders run at a lower CPU priority than the model. The model is the one serial step: a clip
# it waits for, or shares its core for, is time lost for the whole batch; the decoders are ahead
# and only need the CPU time the model leaves. With fair sharing, 3 busy processes on 2 cores
# (the model, two decoders) gave the model 2/3 of a core whenever both decoders ran. The window
# and the priority together: 0.094 -> 0.076 s per clip in float32 on 2 cores (RESULTS.md).
DECODER_NICE = 10


def clips_ahead(frames: int, size: tuple[int, int]) -> int:
    """How many decoded clips may wait beyond those being decoded (at least 2)."""
    clip_bytes = max(1, frames) * size[0] * size[1] * 3
    return max(2, min(MAX_AHEAD, AHEAD_BYTES // clip_bytes))


def decode_clip(video: str, frames: int, start_s: float | None, end_s: float | None, size: tuple[int, int]):
    """Worker process: one clip's sampled frames and the seconds it took, or (None, (error type,
    message)). Errors come back as text: an exception that does not pickle (some of FFmpeg's)
    would break the whole pool."""
    from .video import sample_frames

    t0 = time.perf_counter()
    try:
        sampled = sample_frames(video, frames, start_s=start_s, end_s=end_s, size=size, threads=1)
    except Exception as e:  # noqa: BLE001 - one bad file must not stop ten thousand others
        return None, (type(e).__name__, str(e))
    return sampled, time.perf_counter() - t0


def _worker_init(parent: int) -> None:
    """Worker process: a lower CPU priority than the model (DECODER_NICE); leave Ctrl-C and SIGTERM
    to the batch process (which stops the pool; otherwise every idle worker prints a
    KeyboardInterrupt traceback), and exit when the batch process is gone (a kill -9 leaves no one
    to shut the pool down, and a worker waiting for work would wait forever). POSIX hands an orphan
    to a new parent; Windows does not, but the parent's sentinel closes with it."""
    import multiprocessing
    import signal
    import threading
    from multiprocessing.connection import wait

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):  # POSIX; raising one's own niceness is always allowed
        os.nice(DECODER_NICE)
    # SIGTERM to the whole group (a job scheduler's) too: a worker dead first would look like a
    # decoder crash and blame its clip; the batch process stops the pool, or the watch below ends it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    me = multiprocessing.parent_process()

    def watch():
        while os.getppid() == parent:
            if me is None:
                time.sleep(0.5)
            elif wait([me.sentinel], timeout=0.5):
                break
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


class _Decoders:
    """Clips decoded ahead in worker processes, results taken in submission order.

    Processes, not threads: a decoder crash (FFmpeg segfaulting on a hostile file) in a thread
    ends the whole batch, and a resume ends again at the same file. Here a dead worker fails only
    its clip: when the pool breaks, the clips in flight are decoded again, the oldest alone in a
    fresh pool, so the one that kills it is found and the others go on. On 2 cores the throughput
    is that of the threads it replaced (benchmarks/RESULTS.md), with one model copy fewer in use
    at a time, and no decoding holding the model's GIL.
    """

    def __init__(self, workers: int, frames: int, size: tuple[int, int], timeout: float | None = None):
        import multiprocessing

        # fork on Linux: spawn would import the caller's main module again in every worker, and a
        # script without an `if __name__ == "__main__"` guard would then run its batch there too.
        # The workers only decode (PyAV, numpy), never torch, so the thread pools torch holds at
        # fork time are never used in them (as with torch's DataLoader). Elsewhere spawn: macOS
        # offers fork too, but its system frameworks are not safe to use after one.
        self.ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.workers, self.frames, self.size, self.timeout = workers, frames, size, timeout
        self.pool = self._new_pool(workers)
        self.window: deque = deque()

    def _new_pool(self, workers: int):
        from concurrent.futures import ProcessPoolExecutor

        return ProcessPoolExecutor(max_workers=workers, mp_context=self.ctx, initializer=_worker_init,
                                   initargs=(os.getpid(),))

    def submit(self, item) -> None:
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        try:
            fut = self.pool.submit(decode_clip, *self._args(item))
        except BrokenProcessPool as e:  # broken by a clip ahead of this one: next() sorts it out
            fut = Future()
            fut.set_exception(e)
        self.window.append((item, fut))

    def _args(self, item) -> tuple:
        """decode_clip's arguments for a (video, query, start_s, end_s, origin) item."""
        return item[0], self.frames, item[2], item[3], self.size

    def __len__(self) -> int:
        return len(self.window)

    def next(self):
        """(item, (sampled, decode seconds) or (None, (error type, message))) of the oldest clip."""
        from concurrent.futures.process import BrokenProcessPool

        from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin before 3.11

        item, fut = self.window.popleft()
        try:
            return item, fut.result(timeout=self.timeout)
        except BrokenProcessPool:
            outcome = None
        except FutureTimeout:  # FIFO: the oldest clip has been decoding at least this long
            outcome = self._timed_out(item)
        _stop(self.pool)
        pending = [item] + [it for it, _ in self.window]
        self.window.clear()
        outcome = outcome or self._alone(item)
        self.pool = self._new_pool(self.workers)
        for it in pending[1:]:
            self.submit(it)
        return item, outcome

    def _timed_out(self, item) -> tuple:
        return None, ("DecodeTimeout", f"{item[0]}: decoding took over {self.timeout:g} s and was stopped (a damaged "
                                       "file can make FFmpeg loop); check the file, or raise --decode-timeout")

    def _alone(self, item):
        """Decode `item` in a pool of its own: a second death names it as the killer."""
        from concurrent.futures import TimeoutError as FutureTimeout
        from concurrent.futures.process import BrokenProcessPool

        pool = self._new_pool(1)
        try:
            return pool.submit(decode_clip, *self._args(item)).result(timeout=self.timeout)
        except BrokenProcessPool:
            pass
        except FutureTimeout:
            return self._timed_out(item)
        finally:
            _stop(pool)
        # The file, or worker processes that cannot run at all? Blaming every clip for the latter
        # would fill the output with error lines that resume then skips.
        pool = self._new_pool(1)
        try:
            pool.submit(os.getpid).result()
        except BrokenProcessPool:
            raise RuntimeError("stg batch: its decoding worker processes die on start; nothing was "
                               "blamed on the clips (see the errors above)") from None
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return None, ("DecoderCrash", f"{item[0]}: the decoder process died on this file (a crash in FFmpeg); "
                                      "re-encode it, or check that it is a video")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def check_out_matches(out: Path, loaded, frames: int | None = None, hint: str = "") -> None:
    """Refuse to resume into a file another model (or setting) wrote: its pairs would count as done,
    so the model asked for would never run on them, and its lines would pass for this model's.
    `hint`: what else the caller offers, after "choose another --out"."""
    from .result import read_jsonl

    if not out.exists():
        return
    n_frames = frames or loaded.default_frames
    for r in read_jsonl(out).records:
        m = r.get("model") if isinstance(r, Mapping) else None
        if isinstance(m, Mapping) and (m.get("name"), m.get("sha256")) != (loaded.name, loaded.sha256):
            which = (f"model {m.get('name')!r}, not {loaded.name!r}" if m.get("name") != loaded.name else
                     f"other weights of model {loaded.name!r} (sha256 {str(m.get('sha256'))[:12]}, not "
                     f"{str(loaded.sha256)[:12]})")
            raise UserError(f"{out}: holds predictions of {which}; choose another --out{hint}")
        if isinstance(m, Mapping) and m.get("quantization", loaded.quantization) != loaded.quantization:
            raise UserError(f"{out}: holds predictions made with --quant {m.get('quantization')}, not "
                            f"{loaded.quantization}; choose another --out{hint}")
        sampling = r.get("sampling") if isinstance(r, Mapping) else None
        idx = sampling.get("frame_indices") if isinstance(sampling, Mapping) else None
        if isinstance(idx, list) and idx and all(isinstance(i, int) for i in idx):
            # A window shorter than --frames yields fewer samples; more samples, or fewer from a window
            # that held enough frames, mean another --frames made this line.
            if len(idx) > n_frames or (len(idx) < n_frames and max(idx) - min(idx) + 1 >= n_frames):
                raise UserError(f"{out}: holds predictions made with --frames {len(idx)}, not {n_frames}; choose "
                                f"another --out{hint}")
        # Lines written before span decoding was selectable were free text.
        mode = r.get("span_decoding", "text") if isinstance(r, Mapping) and isinstance(m, Mapping) else None
        if mode is not None and mode != loaded.span_decoding:
            raise UserError(f"{out}: holds predictions decoded with --span-decoding {mode}, not "
                            f"{loaded.span_decoding}; choose another --out{hint}")


def _cannot_append(out_path: Path, video: str, e: OSError) -> UserError:
    """One line for a result that could not be written (a full disk): the lines already in the file
    stay whole (append rolls a failed one back), and a rerun resumes after them."""
    why = disk_full(e) if e.errno in NO_SPACE else (e.strerror or str(e))
    return UserError(f"{out_path}: cannot write the result of {video}: {why}; the lines already in it are "
                     "whole: free some space and run the same command again, it resumes after them")


def _stop(pool) -> None:
    """Shut a pool down without waiting, killing its workers: one may be stuck in FFmpeg (a hung
    decode), and a broken pool's survivors have nothing left to do."""
    kill = getattr(pool, "kill_workers", None)  # Python 3.14+
    if kill is not None:
        kill()
    else:  # before 3.14 the executor offers no way to stop a busy worker but its process table
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def _model_threads(device: str, workers: int):
    """On CPU the model gets the cores the decoding processes leave (at least one). Restored
    afterwards, so a library caller's setting survives."""
    import torch

    before = torch.get_num_threads()
    if device == "cpu":
        torch.set_num_threads(max(1, min(before, _cores() - workers)))
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


def run_batch(source: str | os.PathLike[str] | None, out_path: str | os.PathLike[str],
              query: str | Sequence[str] | None = None, model=None,
              frames: int | None = None, device: str = "auto", quant: str | None = None, dtype: str = "auto",
              resume: bool = True,
              progress: bool = True, workers: int | None = None, allow_pickle: bool = False,
              span_decoding: str = "joint", *,
              items=None, retry_failed: bool = False, decode_timeout: float | None = DECODE_TIMEOUT_S,
              desc: str = "batch", batch_size: int | None = None) -> BatchCounts:
    """Ground every pair not yet in `out_path`; returns what it did (BatchCounts).

    Pairs come from `source` (a folder + `query`, one or several, or a manifest), or, for library
    callers such as `stg eval`, from `items`: (video, query) or (video, query, start_s, end_s)
    tuples, the window limiting where the model looks. Either way a pair is identified by (video, query):
    that is what resume skips, and the first window given for a pair is the one used. A pair whose
    last line in the output is an error is skipped too, unless `retry_failed`: then it runs again
    and its new line supersedes the error line, which stays (the file is append-only).
    `workers` processes decode ahead (see _Decoders) while this thread runs the model on
    `batch_size` pairs at a time (one prefill for all, a video's queries sharing one vision pass:
    `default_batch_size()`). At most
    `workers + max(clips_ahead(frames, size), batch_size) + 1` clips are in flight (a few hundred MB at
    most), so memory does not grow with the batch. A clip with several queries (the same file
    and window) is decoded once and its lines are written together, where its first pair stands in
    the input.
    Default: `default_workers()`. A clip whose decoding takes over `decode_timeout` seconds (None
    or 0: no limit) gets an error line and its worker is killed: one damaged file must not hang
    a batch of thousands.
    """
    from tqdm import tqdm

    from .pipeline import check_frames, check_query, ground_prepared_many, model_input_size, prepare_sampled
    from .result import JsonlWriter, error_result, file_key, match_recorded
    from .weights import LoadedModel, cpu_computes_bf16, load_model

    check_frames(frames)
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    cores = _cores()
    if workers > cores:  # allowed (a slow network disk may want it), but rarely what helps
        print(f"stg: note: --workers {workers} is more than the {cores} CPU cores this process may use: the "
              f"decoders take turns with each other and the model (the default here is {default_workers()})",
              file=sys.stderr)
    if decode_timeout is not None and not decode_timeout >= 0:
        raise UserError(f"--decode-timeout {decode_timeout}: must be a number of seconds (0: no limit)")
    out_path = Path(out_path)
    if items is None:
        items = collect_items(Path(source), query)
    items = _normalize_items(items)
    if out_path.exists() and not resume:
        raise UserError(f"{out_path}: exists; with --no-resume choose a new --out (stg never overwrites results)")
    writer = JsonlWriter(out_path)
    if writer.unlocked:
        print(f"stg: note: {out_path}: its file system cannot lock files, so nothing stops a second batch from "
              "writing to it at the same time: run one at a time", file=sys.stderr)
    if writer.repaired:
        print(f"stg: note: {out_path}: removed an unfinished last line (an interrupted run); its clip is "
              "grounded again", file=sys.stderr)
    # One file however it is spelled (relative or absolute, "a/../b", a symlink): a rerun that names
    # the manifest another way must not ground every pair a second time.
    unique = {}
    for it in items:
        unique.setdefault((file_key(it[0]), it[1]), it)
    recorded = match_recorded(writer.keys(), set(unique))
    failed = {recorded[k] for k in writer.failed()}
    done = set(recorded.values()) - (failed if retry_failed else set())
    todo = [it for key, it in unique.items() if key not in done]
    skipped = len(items) - len(todo)  # duplicates of a pair count as already done
    failed_earlier = sum(1 for key in unique if key in failed and key in done)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, quant=quant,
                                                                     allow_pickle=allow_pickle, frames=frames,
                                                                     span_decoding=span_decoding, dtype=dtype)
    if writer.keys():
        check_out_matches(out_path, loaded, frames)
    if todo and not isinstance(model, LoadedModel) and dtype == "auto" and loaded.device == "cpu" \
            and loaded.dtype == "float32" and loaded.quantization == "none" and cpu_computes_bf16():
        # float32 stays the CPU default (the same clip gives the same numbers on every CPU), but a long batch
        # on a CPU built for bfloat16 is worth telling (README, "Quantized, bfloat16 and GPU loading").
        print("stg: note: this CPU computes in bfloat16: --dtype bfloat16 takes about 20% less time per clip here (the "
              "built-in model's scores within noise of float32's; README, \"Quantized, bfloat16 and GPU loading\")",
              file=sys.stderr)
    n_ok = n_failed = 0
    n = frames if frames is not None else loaded.default_frames
    bar = tqdm(total=len(todo), desc=desc, unit="clip", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    # `workers` processes decode ahead while this thread runs the model and writes. A clip asked about
    # several times (one video, several queries: VidSTG has about ten sentences per video) is
    # decoded once, and its pairs are grounded one after the other.
    clips: dict[tuple, list] = {}
    for item in todo:
        clips.setdefault((file_key(item[0]), item[2], item[3]), []).append(item)
    size = model_input_size(loaded)
    decoders = _Decoders(workers, n, size, decode_timeout or None)
    batch_size = batch_size or default_batch_size(loaded.device)
    ahead = max(clips_ahead(n, size), batch_size)
    in_flight: deque = deque()  # the pairs of each clip in the decoders' window, in the same order

    def submit(pairs: list) -> None:
        decoders.submit(pairs[0])
        in_flight.append(pairs)

    try:
        with writer, _model_threads(loaded.device, workers):
            it = iter(clips.values())
            for pairs in it:  # keep a few clips in flight, never more
                submit(pairs)
                if len(decoders) >= workers + ahead:
                    break
            while len(decoders):
                # Up to `batch_size` pairs, from clips in input order, grounded with one prefill; their
                # lines are then written in that order (errors in their place). It waits for a full batch
                # rather than run the clips already decoded: on a CPU the cores it would use decode meanwhile,
                # and a part batch costs more per clip (a GPU's default batch is 1, which never waits).
                todo_now: list[tuple] = []  # (item, prep or None, error kind, message)
                while len(decoders) and sum(p is not None for _, p, _, _ in todo_now) < batch_size:
                    _, (sampled, got) = decoders.next()
                    pairs = in_flight.popleft()
                    nxt = next(it, None)
                    if nxt is not None:
                        submit(nxt)
                    pixels = None  # the clip's frames preprocessed once, for all its queries
                    for k, item in enumerate(pairs):
                        t0 = time.perf_counter()
                        if sampled is None:
                            todo_now.append((item, None, *got))
                            continue
                        try:  # the decode's time goes to the clip's first pair: summed, the lines add up
                            prep = prepare_sampled(loaded, check_query(item[1]), sampled, t0, got if k == 0 else 0.0,
                                                   pixels=pixels)
                            pixels = prep["pixels"]
                        except Exception as e:  # noqa: BLE001 - as a decoding error: this pair's line, not the end
                            todo_now.append((item, None, type(e).__name__, str(e)))
                        else:
                            todo_now.append((item, prep, None, None))
                ready = [(item, p) for item, p, _, _ in todo_now if p is not None]
                # at most batch_size to a prefill, though a clip's queries may have made more ready
                grounded = iter([res for j in range(0, len(ready), batch_size) for res in ground_prepared_many(
                    loaded, [p for _, p in ready[j:j + batch_size]], [item[0] for item, _ in ready[j:j + batch_size]])])
                for item, prep, kind, message in todo_now:
                    if prep is None:
                        text = f"{item[4]}: {message}" if item[4] else message
                        res, ok = error_result(item[0], item[1], kind, text), False
                    else:
                        res, ok = next(grounded), True
                    n_ok += ok
                    n_failed += not ok
                    if not ok and progress:
                        bar.write(f"stg: error: {res.error.message}", file=sys.stderr)
                    try:
                        writer.append(res, retry=retry_failed)
                    except OSError as e:  # a full disk mid-batch: what is written stays whole (append rolls back)
                        raise _cannot_append(out_path, item[0], e) from None
                    bar.update(1)
    finally:
        decoders.close()
        bar.close()  # before any error line, which would otherwise land on the bar's line
    return BatchCounts(n_ok, n_failed, skipped, failed_earlier)
