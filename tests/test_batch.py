"""`stg batch`: inputs, error lines, exit codes, resume without loss or duplicates (also after kill -9)."""
from __future__ import annotations

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stgcli import batch as batch_module
from stgcli.batch import collect_items, run_batch
from stgcli.errors import UserError
from stgcli.result import read_jsonl, validate
from stgcli.weights import load_model
from tests.test_cli import EXAMPLE, assert_user_error, run


@pytest.fixture(scope="module")
def model():
    return load_model(device="cpu")


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "clips"
    (d / "sub").mkdir(parents=True)
    for name in ("a.mp4", "b.mp4", "sub/c.mp4"):
        shutil.copy(EXAMPLE, d / name)
    (d / "notes.txt").write_text("not a video")
    return d


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_folder_with_query_and_resume(folder, tmp_path, model):
    out = tmp_path / "r.jsonl"
    ok, failed, skipped, _ = run_batch(folder, out, query="the red circle", model=model, progress=False)
    assert (ok, failed, skipped) == (3, 0, 0)
    docs = lines(out)
    assert sorted(Path(d["video"]["path"]).name for d in docs) == ["a.mp4", "b.mp4", "c.mp4"]
    for d in docs:
        validate(d)
    ok, failed, skipped, _ = run_batch(str(folder), str(out), query="the red circle", model=model, progress=False)
    assert (ok, failed, skipped) == (0, 0, 3)  # paths as str, as a notebook passes them
    assert len(lines(out)) == 3  # nothing duplicated
    # a new query on the same videos is new work
    ok, _, skipped, _ = run_batch(folder, out, query="the blue square", model=model, progress=False)
    assert (ok, skipped) == (3, 0)
    assert len(lines(out)) == 6


def test_folder_scan_takes_camcorder_and_phone_files_and_skips_hidden_ones(tmp_path):
    d = tmp_path / "card"
    (d / "PRIVATE" / "AVCHD").mkdir(parents=True)
    (d / ".Trashes").mkdir()
    shutil.copy(EXAMPLE, d / "PRIVATE" / "AVCHD" / "00001.MTS")
    shutil.copy(EXAMPLE, d / "phone.3gp")
    shutil.copy(EXAMPLE, d / ".Trashes" / "old.mp4")
    (d / "._phone.3gp").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not a video
    items = collect_items(d, "the red circle")
    assert sorted(Path(v).relative_to(d).as_posix() for v, _ in items) == ["PRIVATE/AVCHD/00001.MTS", "phone.3gp"]


def test_manifest_jsonl_and_csv_relative_paths(folder, tmp_path, model):
    (folder / "m.jsonl").write_text(json.dumps({"video": "a.mp4", "query": "the red circle"}) + "\n\n"
                                    + json.dumps({"video": "sub/c.mp4", "query": "the blue square"}) + "\n")
    out = tmp_path / "m.jsonl"
    assert run_batch(folder / "m.jsonl", out, model=model, progress=False) == (2, 0, 0, 0)
    assert [d["query"] for d in lines(out)] == ["the red circle", "the blue square"]
    (folder / "m.csv").write_text("video,query\nb.mp4,the yellow circle\n")
    out2 = tmp_path / "c.jsonl"
    assert run_batch(folder / "m.csv", out2, model=model, progress=False) == (1, 0, 0, 0)
    assert lines(out2)[0]["video"]["path"].endswith("b.mp4")
    # a spreadsheet in a comma-decimal locale saves ";" (a query may hold a comma), or tabs
    (folder / "semi.csv").write_text('video;query\r\na.mp4;"the red circle, moving left"\r\n')
    (folder / "tabs.tsv").write_text("query\tvideo\nthe blue square\tsub/c.mp4\n")
    out3 = tmp_path / "s.jsonl"
    for manifest in ("semi.csv", "tabs.tsv"):
        assert run_batch(folder / manifest, out3, model=model, progress=False).grounded == 1
    assert [(Path(d["video"]["path"]).name, d["query"]) for d in lines(out3)] == [
        ("a.mp4", "the red circle, moving left"), ("c.mp4", "the blue square")]


@pytest.mark.parametrize("content,needle", [
    ('{"video": "a.mp4", "query": "x"}\n{"video": "a.mp4"}\n', "line 2"),
    ('{"video": "a.mp4", "query": "  "}\n', "line 1"),
    ('{"video": "a.mp4", "query": "x"}\nnot json\n', "line 2"),
])
def test_bad_manifest_lines_name_the_line(folder, tmp_path, content, needle, capsys):
    m = folder / "bad.jsonl"
    m.write_text(content)
    code, _, err = run(capsys, "batch", str(m), "--out", str(tmp_path / "o.jsonl"))
    assert_user_error(code, err, needle, "bad.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_csv_missing_column(folder, tmp_path):
    (folder / "bad.csv").write_text("path,query\na.mp4,x\n")
    with pytest.raises(UserError, match="missing column"):
        run_batch(folder / "bad.csv", tmp_path / "o.jsonl", progress=False)


def test_bad_video_is_an_error_line_and_exit_1(folder, tmp_path, capsys, clip):
    shutil.copy(clip("text.mp4"), folder / "broken.mp4")
    (folder / "m.jsonl").write_text("".join(json.dumps({"video": v, "query": "the red circle"}) + "\n"
                                            for v in ("a.mp4", "broken.mp4", "missing.mp4", "b.mp4")))
    out = tmp_path / "o.jsonl"
    code, _, err = run(capsys, "batch", str(folder / "m.jsonl"), "--out", str(out))
    assert code == 1
    assert "2 grounded, 2 failed" in err
    docs = lines(out)
    assert len(docs) == 4
    bad = [d for d in docs if d.get("error")]
    assert sorted(Path(d["video"]["path"]).name for d in bad) == ["broken.mp4", "missing.mp4"]
    for d in bad:
        assert d["span"] is None and d["track"] == [] and d["error"]["message"]
        validate(d)
    # each failure names its manifest line, in its error line and on stderr
    missing = next(d for d in bad if d["video"]["path"].endswith("missing.mp4"))
    assert "m.jsonl: line 3" in missing["error"]["message"] and "m.jsonl: line 3" in err


def test_resume_matches_a_video_however_its_path_is_spelled(folder, tmp_path, model, monkeypatch):
    (folder / "m.jsonl").write_text(json.dumps({"video": "a.mp4", "query": "the red circle"}) + "\n")
    out = tmp_path / "o.jsonl"
    monkeypatch.chdir(tmp_path)
    assert run_batch(Path("clips/m.jsonl"), out, model=model, progress=False) == (1, 0, 0, 0)
    assert run_batch(folder / "m.jsonl", out, model=model, progress=False) == (0, 0, 1, 0)
    assert run_batch(Path("clips/sub/../m.jsonl"), out, model=model, progress=False) == (0, 0, 1, 0)
    assert len(lines(out)) == 1


def test_resume_from_another_folder_finds_the_pairs_written_with_relative_paths(folder, tmp_path, model,
                                                                                monkeypatch):
    """Lines record a video's path as given ("clips/a.mp4"); a rerun started from another folder still
    knows them, unless two wanted files end with that path (then they run again, nothing is lost)."""
    out = tmp_path / "o.jsonl"
    monkeypatch.chdir(tmp_path)
    assert run_batch(Path("clips"), out, query="the red circle", model=model, progress=False) == (3, 0, 0, 0)
    assert lines(out)[0]["video"]["path"] == "clips/a.mp4"
    monkeypatch.chdir(folder / "sub")
    assert run_batch(Path(".."), out, query="the red circle", model=model, progress=False) == (0, 0, 3, 0)
    monkeypatch.chdir("/")
    assert run_batch(folder, out, query="the red circle", model=model, progress=False) == (0, 0, 3, 0)
    assert len(lines(out)) == 3
    twin = tmp_path / "elsewhere" / "clips"
    twin.mkdir(parents=True)
    shutil.copy(EXAMPLE, twin / "a.mp4")  # "clips/a.mp4" now ends two wanted paths
    items = [(str(folder / "a.mp4"), "the red circle"), (str(twin / "a.mp4"), "the red circle")]
    assert run_batch(None, out, model=model, progress=False, items=items) == (2, 0, 0, 0)


def test_manifest_encodings_and_line_numbers(folder, tmp_path, model, capsys):
    out = tmp_path / "o.jsonl"
    (folder / "bom.csv").write_bytes("\ufeffvideo,query\na.mp4,the red circle\n".encode())
    assert run_batch(folder / "bom.csv", out, model=model, progress=False) == (1, 0, 0, 0)
    # a query holding U+2028 is one JSONL line
    (folder / "sep.jsonl").write_text(json.dumps({"video": "b.mp4", "query": "the red\u2028circle"},
                                                 ensure_ascii=False) + "\n", encoding="utf-8")
    assert run_batch(folder / "sep.jsonl", out, model=model, progress=False) == (1, 0, 0, 0)
    (folder / "latin1.csv").write_bytes("video,query\na.mp4,the caf\xe9 circle\n".encode("latin-1"))
    code, _, err = run(capsys, "batch", str(folder / "latin1.csv"), "--out", str(out))
    assert_user_error(code, err, "latin1.csv: line 2", "UTF-8")
    # CSV errors name the file's line, blank lines included
    (folder / "blank.csv").write_text("video,query\n\n\na.mp4,x\nb.mp4,\n")
    code, _, err = run(capsys, "batch", str(folder / "blank.csv"), "--out", str(out))
    assert_user_error(code, err, "blank.csv: line 5", "query")


def test_output_that_is_not_batch_output_is_refused(folder, tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes, one finished line\n")
    code, _, err = run(capsys, "batch", str(folder), "--query", "x", "--out", str(notes))
    assert_user_error(code, err, "notes.txt", "not a stg.grounding/v1 record")
    assert notes.read_text() == "my notes, one finished line\n"


@pytest.mark.parametrize("where", ["folder", "under_a_file", "unwritable"])
def test_unusable_out_is_one_line_before_any_work(folder, tmp_path, capsys, where):
    if where == "folder":
        out = tmp_path
    elif where == "under_a_file":
        (tmp_path / "f").write_text("x")
        out = tmp_path / "f" / "o.jsonl"
    else:
        if os.geteuid() == 0:
            out = Path("/proc/stg-test/o.jsonl")  # refused even to root
        else:
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o500)
            out = ro / "o.jsonl"
    code, _, err = run(capsys, "batch", str(folder), "--query", "x", "--out", str(out))
    assert_user_error(code, err, str(out))


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie has exited; reaping it is its new parent's business


def test_kill_9_mid_batch_then_resume(folder, tmp_path):
    for i in range(6):
        shutil.copy(EXAMPLE, folder / f"k{i}.mp4")
    out = tmp_path / "k.jsonl"
    cmd = [sys.executable, "-m", "stgcli", "batch", str(folder), "--query", "the red circle", "--out", str(out),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.05)
    workers = _children(proc.pid)
    assert workers  # the decoding processes
    os.kill(proc.pid, signal.SIGKILL)  # the batch process alone, as the OOM killer does
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(p) for p in workers):
        time.sleep(0.1)
    left = [p for p in workers if _alive(p)]
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert not left, "decoding processes outlived the batch"
    n_before = len(read_jsonl(out).records)
    assert 2 <= n_before < 9
    with open(out, "a") as f:  # what a kill in the middle of a write leaves
        f.write('{"schema": "stg.grounding/v1", "video": {"pa')
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    docs = lines(out)
    keys = [(d["video"]["path"], d["query"]) for d in docs]
    assert len(keys) == len(set(keys)) == 9  # every clip once: no loss, no duplicate


def test_frames_below_one_is_a_user_error_before_any_work(folder, tmp_path, capsys):
    code, _, err = run(capsys, "batch", str(folder), "--query", "the red circle", "--frames", "0",
                       "--out", str(tmp_path / "o.jsonl"))
    assert_user_error(code, err, "--frames")
    assert not (tmp_path / "o.jsonl").exists()


def test_workers_give_the_same_lines_in_input_order(folder, tmp_path, model, capsys, clip, monkeypatch):
    from stgcli import batch

    shutil.copy(clip("text.mp4"), folder / "broken.mp4")
    one, three = tmp_path / "one.jsonl", tmp_path / "three.jsonl"
    monkeypatch.setattr(batch.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)  # 2 cores
    assert run_batch(folder, one, query="the red circle", model=model, progress=False) == (3, 1, 0, 0)
    assert "--workers" not in capsys.readouterr().err
    assert run_batch(folder, three, query="the red circle", model=model, progress=False, workers=3) == (3, 1, 0, 0)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "--workers" in ln]
    assert notes == ["stg: note: --workers 3 is more than the 2 CPU cores this process may use: the decoders take "
                     "turns with each other and the model (the default here is 2)"]

    def comparable(d):
        d = dict(d)
        d.pop("timing_s", None)
        return d

    assert [comparable(d) for d in lines(three)] == [comparable(d) for d in lines(one)]
    code, _, err = run(capsys, "batch", str(folder), "--query", "x", "--out", str(tmp_path / "w.jsonl"),
                       "--workers", "0")
    assert_user_error(code, err, "--workers 0")
    assert not (tmp_path / "w.jsonl").exists()


_REAL_DECODE = batch_module.decode_clip  # the tests below patch it; workers (forked) see the patch


def _decode_noting_pid(video, *args):
    """Runs in a worker: notes which process decoded."""
    with open(os.environ["STG_TEST_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\n")
    return _REAL_DECODE(video, *args)


def _decode_or_die(video, *args):
    """A decoder that crashes on one file, as FFmpeg can on a hostile one (no Python exception)."""
    if "poison" in os.path.basename(video):
        os._exit(11)
    return _REAL_DECODE(video, *args)


@pytest.mark.parametrize("device, sizes", [("cpu", [4, 3]), ("cuda:0", [1] * 7)])
def test_clips_decode_in_worker_processes_and_the_model_takes_one_batch_at_a_time(folder, tmp_path, model,
                                                                                  monkeypatch, device, sizes):
    """Decoding runs in other processes (it never holds the model's GIL), and one batch of clips at a
    time is in the model (4 on a CPU, 1 on a GPU by default), on CPU and GPU alike."""
    import dataclasses
    import threading

    from stgcli import batch, pipeline

    active, peak, seen_sizes, lock = [0], [0], [], threading.Lock()
    real = pipeline.ground_prepared_many

    def ground_prepared_many(loaded, preps, videos):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
            seen_sizes.append(len(preps))
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return real(model, preps, videos)  # the real (CPU) model does the work

    for i in range(4):
        shutil.copy(EXAMPLE, folder / f"more{i}.mp4")
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("STG_TEST_PIDS", str(pids))
    monkeypatch.setattr(pipeline, "ground_prepared_many", ground_prepared_many)
    monkeypatch.setattr(batch, "decode_clip", _decode_noting_pid)
    out = tmp_path / "r.jsonl"
    loaded = dataclasses.replace(model, device=device)
    assert run_batch(folder, out, query="the red circle", model=loaded, progress=False, workers=2) == (7, 0, 0, 0)
    assert peak[0] == 1 and seen_sizes == sizes
    seen = set(pids.read_text().split())
    assert len(pids.read_text().split()) == 7 and str(os.getpid()) not in seen and 1 <= len(seen) <= 2
    assert len(lines(out)) == 7


def test_a_batch_of_clips_gives_the_lines_clip_by_clip_grounding_gives(folder, tmp_path, model):
    """--batch-size changes how many clips share a prefill, not what is written: the same lines (timings
    aside) in the same order, errors in their place, with 1, 3 and 4 clips to a batch; a video's queries
    in one batch read its frames through the vision tower once."""
    for i in range(4):
        shutil.copy(EXAMPLE, folder / f"more{i}.mp4")
    (folder / "broken.mp4").write_bytes(b"not a video")
    outs, frames_seen = {}, {}
    for size in (1, 3, 4):
        out = tmp_path / f"r{size}.jsonl"
        seen = []
        hook = model.model.model.vision_tower.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
        try:
            counts = run_batch(folder, out, query=["the red circle", "the blue square moving left"], model=model,
                               progress=False, workers=1, batch_size=size)
        finally:
            hook.remove()
        assert counts == (14, 2, 0, 0)
        outs[size], frames_seen[size] = [{k: v for k, v in r.items() if k != "timing_s"} for r in lines(out)], sum(seen)
    assert len(outs[1]) == 16 and sum("error" in r for r in outs[1]) == 2
    assert outs[3] == outs[1] and outs[4] == outs[1]
    # a video's two queries in one batch share the vision tower's pass over its frames
    assert frames_seen[1] == 14 * 16 and frames_seen[4] == 7 * 16, frames_seen


def test_batch_size_below_one_is_a_user_error(folder, tmp_path, model, capsys):
    with pytest.raises(UserError, match="--batch-size 0: must be at least 1"):
        run_batch(folder, tmp_path / "r.jsonl", query="the red circle", model=model, progress=False, batch_size=0)
    code, _, err = run(capsys, "batch", str(folder), "--query", "x", "--out", str(tmp_path / "w.jsonl"),
                       "--batch-size", "0")
    assert_user_error(code, err, "--batch-size 0: must be at least 1")
    assert not (tmp_path / "w.jsonl").exists()


@pytest.mark.skipif(not hasattr(os, "nice"), reason="no process priorities to compare (Windows)")
def test_decoders_run_at_a_lower_priority_than_the_model():
    """The model is the batch's one serial step: the decoders, working ahead, yield the CPU to it."""
    from stgcli import batch

    decoders = batch._Decoders(1, 4, (32, 32))
    try:
        assert decoders.pool.submit(os.nice, 0).result() == min(19, os.nice(0) + batch.DECODER_NICE)
    finally:
        decoders.close()


def test_clips_ahead_is_bounded_in_bytes():
    from stgcli.batch import clips_ahead

    assert clips_ahead(16, (128, 128)) == 16  # the built-in model: 0.8 MB a clip, the count caps it
    assert clips_ahead(64, (384, 384)) == 9  # the 7B: 28 MB a clip, 256 MB in all
    assert clips_ahead(256, (1024, 1024)) == 2  # never fewer than 2


def test_the_window_of_decoded_clips_holds_its_bound(folder, tmp_path, model, monkeypatch):
    """However long the batch, at most `workers + max(clips_ahead, batch_size)` clips are submitted and
    not yet grounded: memory stays flat."""
    from stgcli import batch

    for i in range(6):
        shutil.copy(EXAMPLE, folder / f"more{i}.mp4")
    most, real_next = [0], batch._Decoders.next

    def next_noting_depth(self):
        most[0] = max(most[0], len(self))
        return real_next(self)

    monkeypatch.setattr(batch, "clips_ahead", lambda frames, size: 3)
    monkeypatch.setattr(batch._Decoders, "next", next_noting_depth)
    assert run_batch(folder, tmp_path / "w.jsonl", query="the red circle", model=model, progress=False,
                     workers=1, batch_size=2) == (9, 0, 0, 0)
    assert most[0] == 1 + 3
    most[0] = 0  # a batch larger than the window widens it: the model's next batch must fit in it
    assert run_batch(folder, tmp_path / "w5.jsonl", query="the red circle", model=model, progress=False,
                     workers=1, batch_size=5) == (9, 0, 0, 0)
    assert most[0] == 1 + 5


@pytest.mark.parametrize("workers", [1, 3])
def test_a_file_that_kills_the_decoder_fails_alone(folder, tmp_path, model, monkeypatch, capsys, workers):
    """A segfault in the decoder took the whole batch down, and a resume died again at the same
    file. Now only that clip fails (an error line naming it); the clips in flight with it, and
    after it, are grounded."""
    from stgcli import batch

    shutil.copy(EXAMPLE, folder / "b_poison.mp4")
    for i in range(3):
        shutil.copy(EXAMPLE, folder / f"c{i}.mp4")
    monkeypatch.setattr(batch, "decode_clip", _decode_or_die)
    out = tmp_path / "p.jsonl"
    assert run_batch(folder, out, query="the red circle", model=model, progress=False, workers=workers) == (6, 1, 0, 0)
    docs = lines(out)
    assert [Path(d["video"]["path"]).name for d in docs] == ["a.mp4", "b.mp4", "b_poison.mp4", "c0.mp4", "c1.mp4",
                                                             "c2.mp4", "c.mp4"]
    bad = [d for d in docs if d.get("error")]
    assert len(bad) == 1 and bad[0]["video"]["path"].endswith("b_poison.mp4")
    assert "decoder process died" in bad[0]["error"]["message"]
    assert all(d["span"] is not None for d in docs if not d.get("error"))


@pytest.mark.parametrize("cores,want", [(1, 1), (2, 2), (3, 2), (4, 3), (16, 4)])
def test_default_workers_follow_the_cores(monkeypatch, cores, want):
    from stgcli import batch

    monkeypatch.setattr(batch.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert batch.default_workers() == want
    monkeypatch.delattr(batch.os, "sched_getaffinity")  # macOS and Windows have none: the CPU count
    monkeypatch.setattr(batch.os, "cpu_count", lambda: None)
    assert batch.default_workers() == 1


def test_failed_pairs_are_retried_only_when_asked(folder, tmp_path, capsys, clip):
    """A rerun leaves earlier failures alone but says so and exits 1; --retry-failed grounds them
    again, appending a line that readers take over the error line (which stays)."""
    shutil.copy(clip("text.mp4"), folder / "broken.mp4")
    out = tmp_path / "r.jsonl"
    args = ("batch", str(folder), "--query", "the red circle", "--out", str(out))
    code, _, err = run(capsys, *args)
    assert code == 1 and "3 grounded, 1 failed" in err
    code, _, err = run(capsys, *args)
    assert code == 1, err
    assert "0 grounded, 0 failed, 4 already done (1 of them failed in an earlier run; --retry-failed" in err
    assert len(lines(out)) == 4

    shutil.copy(EXAMPLE, folder / "broken.mp4")  # the user fixes the file
    code, _, err = run(capsys, *args, "--retry-failed")
    assert code == 0 and "1 grounded, 0 failed, 3 already done ->" in err, err
    docs = lines(out)
    broken = [d for d in docs if d["video"]["path"].endswith("broken.mp4")]
    assert len(docs) == 5 and len(broken) == 2
    assert "error" in broken[0] and "error" not in broken[1] and docs[-1] is broken[1]
    code, _, err = run(capsys, *args, "--retry-failed")  # nothing failed is left: nothing runs
    assert code == 0 and "0 grounded, 0 failed, 4 already done ->" in err, err
    assert len(lines(out)) == 5

    csv_path = tmp_path / "r.csv"
    code, _, err = run(capsys, "export", str(out), "--format", "csv", "--out", str(csv_path))
    assert code == 0, err
    rows = csv_path.read_text().splitlines()[1:]
    assert len({r.split(",")[0] for r in rows}) == 4  # broken.mp4 exports its new track
    assert "no track" not in err  # the superseded error line is not counted as a result


def test_a_script_without_a_main_guard_runs_its_batch_once(folder, tmp_path):
    """Library use from a plain script (no `if __name__ == "__main__":`): worker processes that
    imported the script again (spawn) would start its batch again in every worker."""
    script = tmp_path / "script.py"
    out = tmp_path / "s.jsonl"
    script.write_text("from pathlib import Path\nfrom stgcli.batch import run_batch\n"
                      f"print(tuple(run_batch(Path({str(folder)!r}), Path({str(out)!r}), query='the red circle', "
                      "device='cpu', progress=False, workers=2)))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=str(Path(__file__).resolve().parents[1]))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(3, 0, 0, 0)"
    assert len(lines(out)) == 3


def _die_on_start(parent):
    os._exit(12)


def test_workers_that_cannot_start_stop_the_batch_without_blaming_the_clips(folder, tmp_path, model, monkeypatch):
    """When no worker process can run at all, the clips are not at fault: no error line is
    written for them (a resume would skip them), the batch stops with an error instead."""
    from stgcli import batch

    monkeypatch.setattr(batch, "_worker_init", _die_on_start)
    out = tmp_path / "w.jsonl"
    with pytest.raises(RuntimeError, match="die on start"):
        run_batch(folder, out, query="the red circle", model=model, progress=False, workers=1)
    assert not out.exists() or not out.read_text().strip()


def test_a_clip_that_fails_after_decoding_is_an_error_line(folder, tmp_path, model, monkeypatch):
    """Anything failing between decode and model (preprocessing, the prompt) fails that clip
    only, as a decoding error does."""
    from stgcli import pipeline

    real = pipeline.prepare_sampled

    def prepare_sampled(loaded, query, sampled, t0, decode_s=0.0, pixels=None):
        if sampled.info.path.endswith("b.mp4"):
            raise ValueError("cannot preprocess this one")
        return real(loaded, query, sampled, t0, decode_s, pixels)

    monkeypatch.setattr(pipeline, "prepare_sampled", prepare_sampled)
    out = tmp_path / "e.jsonl"
    assert run_batch(folder, out, query="the red circle", model=model, progress=False) == (2, 1, 0, 0)
    bad = [d for d in lines(out) if d.get("error")]
    assert [Path(d["video"]["path"]).name for d in bad] == ["b.mp4"]
    assert "cannot preprocess this one" in bad[0]["error"]["message"]


@pytest.mark.parametrize("sig,code,said", [(signal.SIGINT, 130, ("stg: aborted", "stg: interrupted")),
                                           (signal.SIGTERM, 143, ("stg: terminated",))])
def test_ctrl_c_stops_the_batch_with_one_line(folder, tmp_path, sig, code, said):
    """A terminal's Ctrl-C reaches the whole process group: the decoding workers leave it to the
    batch process, which says so once (no traceback from each worker). So does a job scheduler's
    SIGTERM (Python's default would end the process without any cleanup): the lines written are
    whole, and a rerun grounds the rest."""
    for i in range(6):
        shutil.copy(EXAMPLE, folder / f"i{i}.mp4")
    out = tmp_path / "c.jsonl"
    # Python keeps SIGINT ignored when it starts with it ignored (a background job of a
    # non-interactive shell, as CI may be): give it the handler an interactive terminal gives.
    start = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from stgcli.cli import main; main(sys.argv[1:])")
    cmd = [sys.executable, "-c", start, "batch", str(folder), "--query", "the red circle", "--out", str(out),
           "--device", "cpu", "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or not out.read_text().count("\n")):
        time.sleep(0.05)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    assert sum(err.count(s) for s in said) == 1 and "error" not in err, err[-2000:]
    assert proc.returncode == code
    docs = lines(out)  # every line whole (json.loads would fail on a torn one), no error blamed on a clip
    assert docs and not any(d.get("error") for d in docs)
    rerun = subprocess.run(cmd[:1] + ["-m", "stgcli"] + cmd[3:], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sorted(Path(d["video"]["path"]).name for d in lines(out)) == sorted(p.name for p in folder.rglob("*.mp4"))


def _decode_or_hang(video, *args):
    """A decoder stuck on one file, as FFmpeg can loop on a damaged one; notes its pid first."""
    if "hang" in os.path.basename(video):
        with open(os.environ["STG_TEST_PIDS"], "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(3600)
    return _REAL_DECODE(video, *args)


def _gone(pid: int) -> bool:
    """The process has exited (gone, or a zombie left for its parent to reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to see the hung worker killed")
@pytest.mark.parametrize("workers", [1, 2])
def test_a_file_that_hangs_the_decoder_times_out_alone(folder, tmp_path, model, monkeypatch, workers):
    """A decode that never ends hung the whole batch, silently. Now, past --decode-timeout, that
    clip gets an error line, its stuck worker is killed, and the clips around it are grounded."""
    from stgcli import batch
    from stgcli.cli import batch as batch_command

    assert {p.name: p.default for p in batch_command.params}["decode_timeout"] == batch.DECODE_TIMEOUT_S
    shutil.copy(EXAMPLE, folder / "b_hang.mp4")
    shutil.copy(EXAMPLE, folder / "c0.mp4")
    pids = tmp_path / "pids.txt"
    monkeypatch.setenv("STG_TEST_PIDS", str(pids))
    monkeypatch.setattr(batch, "decode_clip", _decode_or_hang)
    out = tmp_path / "h.jsonl"
    counts = run_batch(folder, out, query="the red circle", model=model, progress=False, workers=workers,
                       decode_timeout=2)
    assert counts == (4, 1, 0, 0)
    docs = lines(out)
    assert [Path(d["video"]["path"]).name for d in docs] == ["a.mp4", "b.mp4", "b_hang.mp4", "c0.mp4", "c.mp4"]
    bad = [d for d in docs if d.get("error")]
    assert len(bad) == 1 and bad[0]["error"]["type"] == "DecodeTimeout"
    assert "b_hang.mp4: decoding took over 2 s" in bad[0]["error"]["message"]
    stuck = [int(p) for p in pids.read_text().split()]
    assert len(stuck) == 1  # timed out once, not decoded again alone for another 2 s
    deadline = time.time() + 10
    while not _gone(stuck[0]) and time.time() < deadline:
        time.sleep(0.1)
    assert _gone(stuck[0])
    with pytest.raises(UserError, match="--decode-timeout -1"):
        run_batch(folder, tmp_path / "x.jsonl", query="the red circle", model=model, progress=False,
                  decode_timeout=-1)


def _decode_noting_video(video, *args):
    """Runs in a worker: notes which file it decoded."""
    with open(os.environ["STG_TEST_DECODED"], "a") as f:
        f.write(f"{os.path.basename(video)}\n")
    return _REAL_DECODE(video, *args)


def test_several_queries_decode_each_video_once(folder, tmp_path, model, monkeypatch, capsys):
    """`--query A --query B` asks every video both; a video asked twice (there, or in a manifest) is
    decoded once, and each pair's line is what grounding it alone gives."""
    import torch

    from stgcli import batch, ground

    decoded = tmp_path / "decoded.txt"
    monkeypatch.setenv("STG_TEST_DECODED", str(decoded))
    monkeypatch.setattr(batch, "decode_clip", _decode_noting_video)
    out = tmp_path / "r.jsonl"
    code, _, err = run(capsys, "batch", str(folder), "--query", "the red circle", "--query", "the blue  square",
                       "--query", "the red circle", "--out", str(out), "--device", "cpu", "--workers", "2")
    assert code == 0, err
    docs = lines(out)
    pairs = [(Path(d["video"]["path"]).name, d["query"]) for d in docs]
    assert pairs == [(v, q) for v in ("a.mp4", "b.mp4", "c.mp4") for q in ("the red circle", "the blue square")]
    assert sorted(decoded.read_text().split()) == ["a.mp4", "b.mp4", "c.mp4"]
    # stg batch runs the model on the cores its decoders leave (one here); on as many threads, grounding
    # alone is the same computation to the last bit (other thread counts sum in another order)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = ground(folder / "b.mp4", "the blue square", model=model)
    finally:
        torch.set_num_threads(threads)
    mine = next(d for d in docs if d["video"]["path"].endswith("b.mp4") and d["query"] == "the blue square")
    assert mine["span"] == alone.to_dict()["span"] and mine["track"] == alone.to_dict()["track"]
    decode_s = [d["timing_s"]["decode"] for d in docs]
    # the decode is counted once, on the clip's first pair; the second's is its own preprocessing only
    assert all(second < first / 3 for first, second in zip(decode_s[::2], decode_s[1::2])), decode_s

    # a manifest that names a video again further down: decoded once, its lines together
    decoded.unlink()
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        {"video": "a.mp4", "query": "the red circle"}, {"video": "b.mp4", "query": "the red circle"},
        {"video": "./a.mp4", "query": "the green triangle"}, {"video": "missing.mp4", "query": "the red circle"},
        {"video": "missing.mp4", "query": "the blue square"})))
    out2 = tmp_path / "m.jsonl"
    counts = run_batch(folder / "m.jsonl", out2, model=model, progress=False, workers=1)
    assert counts == (3, 2, 0, 0)
    docs = lines(out2)
    assert [(Path(d["video"]["path"]).name, d["query"]) for d in docs] == [
        ("a.mp4", "the red circle"), ("a.mp4", "the green triangle"), ("b.mp4", "the red circle"),
        ("missing.mp4", "the red circle"), ("missing.mp4", "the blue square")]
    assert sorted(decoded.read_text().split()) == ["a.mp4", "b.mp4", "missing.mp4"]
    errors = [d["error"]["message"] for d in docs if d.get("error")]
    assert [e.split(": ")[1] for e in errors] == ["line 4", "line 5"]  # each pair names its own line
    code, _, err = run(capsys, "batch", str(folder / "m.jsonl"), "--query", "the red circle", "--out",
                       str(tmp_path / "x.jsonl"), "--device", "cpu")
    assert_user_error(code, err, "m.jsonl", "--query is for a folder")

    # one video, several queries: SOURCE may be the video itself
    decoded.unlink()
    out3 = tmp_path / "one.jsonl"
    code, _, err = run(capsys, "batch", str(folder / "b.mp4"), "--query", "the red circle", "--query",
                       "the blue square", "--out", str(out3), "--device", "cpu")
    assert code == 0, err
    assert [d["query"] for d in lines(out3)] == ["the red circle", "the blue square"]
    assert decoded.read_text().split() == ["b.mp4"]
    code, _, err = run(capsys, "batch", str(folder / "b.mp4"), "--out", str(out3), "--device", "cpu")
    assert_user_error(code, err, "b.mp4: a video needs --query")


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="macOS and Windows file systems refuse a file name that is not UTF-8")
def test_a_file_name_that_is_not_utf8(tmp_path, capsys):
    """Linux allows any bytes in a file name (old archives carry Latin-1 ones); Python hands them over
    as lone surrogates, which UTF-8 cannot encode: every JSON output crashed. Now JSON writes the
    \\u escape (valid UTF-8, and json.loads gives the name back), resume recognises the file, and
    CSV keeps the name's own bytes."""
    folder = tmp_path / "clips"
    folder.mkdir()
    shutil.copy(EXAMPLE, folder / os.fsdecode(b"clip\xff.mp4"))
    out = tmp_path / "r.jsonl"
    for done in (0, 1):
        code, _, err = run(capsys, "batch", str(folder), "--query", "the red circle", "--out", str(out),
                           "--device", "cpu")
        assert code == 0 and f"{1 - done} grounded, 0 failed, {done} already done" in err, err
    raw = out.read_bytes()
    raw.decode("utf-8")  # the file is valid UTF-8
    assert b"clip\\udcff.mp4" in raw
    [doc] = lines(out)
    assert os.fsencode(doc["video"]["path"]).endswith(b"/clip\xff.mp4") and not doc.get("error")
    csv_out = tmp_path / "r.csv"
    code, _, err = run(capsys, "export", str(out), "--format", "csv", "--out", str(csv_out))
    assert code == 0, err
    assert b"/clip\xff.mp4,the red circle," in csv_out.read_bytes()
    single = tmp_path / "one.json"  # a real process: its stdout, not pytest's capture, prints the name
    proc = subprocess.run([sys.executable, "-m", "stgcli", "ground", os.fsencode(folder) + b"/clip\xff.mp4",
                           "the red circle", "--device", "cpu", "--out", str(single)], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    assert proc.stdout.startswith(os.fsencode(folder) + b"/clip\xff.mp4: ")  # its own bytes, as ls prints it
    assert json.loads(single.read_text(encoding="utf-8"))["video"]["path"] == doc["video"]["path"]


def test_resume_into_another_models_output_is_refused(folder, tmp_path, model):
    """Resume skips the pairs already in --out: a batch with another model (or --frames, or span
    decoding) into the same file would never run that model on them, and their lines would pass for
    its own. So it is refused, before any work; the same settings resume as before."""
    import dataclasses

    out = tmp_path / "r.jsonl"
    assert run_batch(folder, out, query="the red circle", model=model, progress=False).grounded == 3
    other = dataclasses.replace(model, name="someone-elses-model", sha256="0" * 64)
    before = out.read_bytes()
    for kwargs, needle in (({"model": other}, "holds predictions of model 'spacevllm-tiny-shapes', not "
                                              "'someone-elses-model'; choose another --out"),
                           ({"model": dataclasses.replace(model, sha256="ab" * 32)},
                            "holds predictions of other weights of model 'spacevllm-tiny-shapes' (sha256 "),
                           ({"model": model, "frames": 8}, "made with --frames 16, not 8"),
                           ({"model": dataclasses.replace(model, span_decoding="text")}, "--span-decoding joint")):
        with pytest.raises(UserError, match=re.escape(needle)):
            run_batch(folder, out, query="the blue square", progress=False, **kwargs)
    assert out.read_bytes() == before
    assert run_batch(folder, out, query="the blue square", model=model, progress=False).grounded == 3


@pytest.mark.parametrize("has_bf16, dtype, noted", [(True, "auto", True), (True, "float32", False),
                                                     (False, "auto", False)])
def test_a_float32_batch_on_a_bf16_cpu_notes_the_faster_dtype(folder, tmp_path, monkeypatch, capsys, has_bf16, dtype,
                                                               noted):
    """float32 stays the CPU default, but on a CPU with bfloat16 instructions a batch left at --dtype auto
    says once that --dtype bfloat16 is faster there; an explicit --dtype, or a CPU without them, gets no note."""
    from stgcli import weights

    monkeypatch.setattr(weights, "cpu_computes_bf16", lambda: has_bf16)
    out = tmp_path / "r.jsonl"
    assert run_batch(folder / "a.mp4", out, query="the red circle", device="cpu", dtype=dtype, progress=False,
                     workers=1) == (1, 0, 0, 0)
    err = capsys.readouterr().err
    assert ("--dtype bfloat16 takes about 20% less time per clip here" in err) == noted
    assert err.count("stg: note:") == int(noted)
    # a rerun with nothing left to ground says nothing about speed
    assert run_batch(folder / "a.mp4", out, query="the red circle", device="cpu", dtype=dtype, progress=False,
                     workers=1) == (0, 0, 1, 0)
    assert "stg: note:" not in capsys.readouterr().err


def test_a_video_with_more_queries_than_a_batch_is_split_across_prefills(tmp_path, model, monkeypatch):
    """--batch-size bounds the pairs in one prefill even when one video's queries come ready together
    (VidSTG asks about ten per video): on a GPU a prefill of them all could exceed its memory."""
    from stgcli import pipeline

    sizes, real = [], pipeline.ground_prepared_many

    def noting(loaded, preps, videos):
        sizes.append(len(preps))
        return real(loaded, preps, videos)

    monkeypatch.setattr(pipeline, "ground_prepared_many", noting)
    queries = ["the red circle", "the blue square", "the green triangle", "the yellow circle", "the red square"]
    out = tmp_path / "q.jsonl"
    assert run_batch(EXAMPLE, out, query=queries, model=model, progress=False, workers=1, batch_size=2) == (5, 0, 0, 0)
    assert sizes == [2, 2, 1]
    assert [d["query"] for d in lines(out)] == queries
