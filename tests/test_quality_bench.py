"""benchmarks/quality.py, spec_misses.py and tuning.py run end to end on a few clips (figures come from real runs)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quality_on_independently_drawn_clips_and_where_boxes_land(tmp_path):
    clips = tmp_path / "clips"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quality.py"), "--generator", "spec", "--n", "2",
                           "--seed", "3", "--clips", str(clips), "--no-write"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (clips / "manifest.jsonl").read_text().count("\n") == 2  # spec_clips.py drew them
    row = re.search(r"^\| all \| 2 \| ([\d.]+) \| ([\d.]+) \|", done.stdout, re.M)
    assert row and all(0 <= float(v) <= 1 for v in row.groups())
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "spec_misses.py"), str(clips), "--seed", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    cells = re.search(r"^\| all \| (\d+) \| [\d.]+ \| [\d.]+ \| (.*) \|$", done.stdout, re.M)
    assert cells and int(cells.group(1)) > 0
    shares = [int(c.strip().rstrip("%")) for c in cells.group(2).split("|")]
    assert len(shares) == 6 and 98 <= sum(shares) <= 102  # every box placed somewhere, rounding aside
    wrong = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "spec_misses.py"), str(clips), "--seed", "4"],
                           capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "not what seed 4 draws" in wrong.stderr


def test_tuning_scores_each_bias_and_breaks_spans_and_boxes_down_by_group(tmp_path):
    clips = tmp_path / "clips"
    made = subprocess.run([sys.executable, "-m", "stgcli", "synth", str(clips), "--n", "3", "--seed", "5"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tuning.py"), str(clips), "--bias", "0", "1",
                           "--link-weight", "0", "0.5"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # the built-in model's box verifier at its config's weights (choose / presence) on every line
    lines = re.findall(r"bias ([+-][\d.]+) link ([\d.]+)/1 verify 10/2 \(joint\): m_tIoU ([\d.]+) m_vIoU ([\d.]+) .*"
                       r"\| box IoU ([\d.]+)", done.stdout)
    assert [(b, w) for b, w, *_ in lines] == [("+0.0", "0"), ("+0.0", "0.5"), ("+1.0", "0"), ("+1.0", "0.5")]
    assert all(0 <= float(v) <= 1 for _, _, *vals in lines for v in vals)
    # unlinked, the boxes do not depend on the presence bias (linked, they follow the answer's span)
    assert lines[0][4] == lines[2][4]
    groups = dict(re.findall(r"^  (plain|moving|still|no twin|twin) +n +(\d+) \|", done.stdout, re.M))
    rows = [json.loads(x) for x in (clips / "manifest.jsonl").read_text().splitlines()]
    # every group with a clip is listed, and the twin / no-twin split covers every box once
    assert {r["form"] for r in rows} <= set(groups)
    assert sum(int(groups[g]) for g in ("twin", "no twin") if g in groups) == \
        sum(int(groups[f]) for f in ("plain", "moving", "still") if f in groups) > 0
    # spans per group, for the last setting: every clip counted once per split, and a group of all
    # the clips scores as the setting's own line
    spans = {g: (int(n), float(t)) for g, n, t in
             re.findall(r"^  (plain|moving|still|no twin|twin) +clips +(\d+) \| m_tIoU ([\d.]+)", done.stdout, re.M)}
    assert sum(spans[g][0] for g in ("twin", "no twin") if g in spans) == len(rows) == \
        sum(spans[f][0] for f in ("plain", "moving", "still") if f in spans)
    whole = [g for g in spans if spans[g][0] == len(rows)]
    assert all(abs(spans[g][1] - float(lines[-1][2])) < 1e-3 for g in whole)


def test_presence_errors_counts_every_sampled_frame_once_by_what_is_in_view(tmp_path):
    """benchmarks/presence_errors.py: every sampled frame of every clip falls in one group, and a
    group's wrong frames are at most its frames; `in_view` picks the first group that applies."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from presence_errors import GROUPS, in_view

    from stgcli.synth import ShapeObject

    def obj(colour, shape, t_in, t_out):
        return ShapeObject(shape, colour, (0, 0, 0), 10.0, "still", 0.0, 0.0, 0.0, t_in, t_out)

    objects = [obj("red", "circle", 2.0, 4.0), obj("red", "square", 0.0, 1.0), obj("red", "circle", 0.5, 1.5),
               obj("blue", "circle", 0.0, 6.0)]
    assert [in_view(objects, 0, t) for t in (3.0, 0.7, 0.2, 1.7)] == ["target in view", "twin", "same colour",
                                                                       "same shape"]
    assert in_view(objects[:2], 0, 5.0) == "nothing" and in_view(objects[:2] + [obj("green", "square", 4, 6)], 0,
                                                                 5.0) == "others only"
    assert set(GROUPS) == {"target in view", "twin", "same colour", "same shape", "others only", "nothing"}

    clips = tmp_path / "clips"
    made = subprocess.run([sys.executable, "-m", "stgcli", "synth", str(clips), "--n", "3", "--seed", "5"],
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "presence_errors.py"), str(clips)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^  (.+?) +frames +(\d+) \| wrong +(\d+)", done.stdout, re.M)
    assert [g for g, _, _ in rows] == list(GROUPS)
    assert sum(int(n) for _, n, _ in rows) == 3 * 16  # the built-in model's 16 frames of each clip
    assert all(int(w) <= int(n) for _, n, w in rows)


def test_prefill_benchmark_times_each_batch_size_and_query_count(tmp_path):
    """benchmarks/prefill.py on 2 clips: a row per query count, CPU seconds for 1 and 4 pairs to a prefill."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "prefill.py"), "--n", "2", "--clips",
                           str(tmp_path / "clips"), "--dtype", "float32", "--no-write"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = re.findall(r"^\| float32 \| (\d) \| ([\d.]+) \| ([\d.]+) \| [+-]\d+% \|$", done.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2"] and all(float(x) > 0 for r in rows for x in r[1:])
