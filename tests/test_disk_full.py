"""A full disk (or quota) while writing: one line and exit 2, no traceback, nothing half-written left
under an output's name, and a batch that resumes once there is space again.

The disk fills on cue: the low-level write (or the fsync that puts an encoder's file in place)
raises ENOSPC, as the kernel does on a full filesystem.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from stgcli import result as R
from test_cli import EXAMPLE, assert_user_error, run

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _no_part_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".part" in p.name or p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def result_json(tmp_path_factory) -> Path:
    from stgcli import ground

    path = tmp_path_factory.mktemp("res") / "r.json"
    R.write_json_atomic(path, ground(EXAMPLE, "the red circle moving left", device="cpu"))
    return path


def test_atomic_json_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch, capsys, result_json):
    target = tmp_path / "out.csv"
    target.write_text("the user's earlier export\n")

    def half_then_full(fd, data):
        os.write(fd, data[: len(data) // 2])
        raise ENOSPC

    monkeypatch.setattr(R, "_write_all", half_then_full)
    code, _, err = run(capsys, "export", str(result_json), "--format", "csv", "--out", str(target), "--force")
    assert_user_error(code, err, str(target), "no space left", "free some space")
    assert target.read_text() == "the user's earlier export\n" and _no_part_files(tmp_path)


def test_batch_on_a_full_disk_stops_with_one_line_then_resumes(tmp_path, monkeypatch, capsys):
    src = tmp_path / "clips"
    src.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        shutil.copy(EXAMPLE, src / name)
    out = tmp_path / "results.jsonl"
    real, calls = R._write_all, []

    def full_after_one_line(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real(fd, data)
        real(fd, data[:100])  # the disk fills mid-line
        raise ENOSPC

    monkeypatch.setattr(R, "_write_all", full_after_one_line)
    code, _, err = run(capsys, "batch", str(src), "--query", "the red circle", "--out", str(out), "--device", "cpu",
                       "--workers", "1")
    last = err.rstrip("\n").split("\n")[-1]  # the progress bar's line, then the error on its own line
    assert err.count("stg: error:") == 1 and last.startswith("stg: error:"), err
    assert_user_error(code, last, str(out), "b.mp4", "no space left", "resumes")
    lines = out.read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["video"]["path"].endswith("a.mp4")  # no torn line kept
    monkeypatch.setattr(R, "_write_all", real)  # space again
    code, _, err = run(capsys, "batch", str(src), "--query", "the red circle", "--out", str(out), "--device", "cpu",
                       "--workers", "1")
    assert code == 0, err
    videos = [Path(json.loads(x)["video"]["path"]).name for x in out.read_text().splitlines()]
    assert sorted(videos) == ["a.mp4", "b.mp4", "c.mp4"]  # each once: nothing lost, nothing twice


def test_render_on_a_full_disk_leaves_no_part_file(tmp_path, monkeypatch, capsys, result_json):
    def full(tmp, target):
        raise ENOSPC  # fsync reports the blocks the encoder could not get

    monkeypatch.setattr(R, "commit_file", full)
    out = tmp_path / "annotated.mp4"
    code, _, err = run(capsys, "render", str(EXAMPLE), str(result_json), "--out", str(out))
    assert_user_error(code, err, str(out), "no space left")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_synth_on_a_full_disk_names_the_clip_and_cleans_up(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(R, "commit_file", lambda tmp, target: (_ for _ in ()).throw(ENOSPC))
    code, _, err = run(capsys, "synth", str(tmp_path / "syn"), "--n", "2")
    assert_user_error(code, err, "clip_00000.mp4", "no space left")
    assert list((tmp_path / "syn").iterdir()) == []


def test_synth_never_overwrites_files_already_there(tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "clip_00001.mp4").write_bytes(b"the user's own video")
    code, _, err = run(capsys, "synth", str(folder), "--n", "3")
    assert_user_error(code, err, str(folder), "clip_00001.mp4", "interrupted stg synth?", "empty folder")
    assert [p.name for p in folder.iterdir()] == ["clip_00001.mp4"]
    assert (folder / "clip_00001.mp4").read_bytes() == b"the user's own video"
    code, _, err = run(capsys, "synth", str(tmp_path / "done"), "--n", "1")
    assert code == 0, err
    code, _, err = run(capsys, "synth", str(tmp_path / "done"), "--n", "2")  # a finished synth's folder
    assert_user_error(code, err, "already holds manifest.jsonl and 1 more; choose an empty folder")


def test_any_command_on_a_full_disk_gets_one_line(monkeypatch, capsys, tmp_path):
    """Where no output path wraps the error (say a training checkpoint), the CLI still gives one
    line, naming the file when the error does; other OS errors keep their traceback (a bug)."""
    from stgcli import synth

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/run/checkpoint/model.safetensors")

    monkeypatch.setattr(synth, "synth_dataset", full)
    code, _, err = run(capsys, "synth", str(tmp_path / "s"), "--n", "1")
    assert_user_error(code, err, "/data/run/checkpoint/model.safetensors: no space left on its disk (No space left "
                      "on device); free some space")

    def other(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(synth, "synth_dataset", other)
    with pytest.raises(OSError, match="Input/output"):
        run(capsys, "synth", str(tmp_path / "s"), "--n", "1")
