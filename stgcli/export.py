"""`stg export`: grounding results as MOTChallenge txt or as one flat CSV.

MOT is what tracking tools (TrackEval, py-motmetrics, CVAT import) read: one text file per
video sequence, one line per box, `frame,id,left,top,width,height,conf,-1,-1,-1` with
1-based frames. Each query grounded in a video becomes one track id of that video's file.
The CSV is one row per boxed frame, for spreadsheets and pandas.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from .errors import UserError
from .result import (ResultError, check_output_path, check_result_path, latest_per_pair, read_jsonl_lines, validate,
                     write_text_atomic)

FORMATS = ("mot", "csv")
CSV_COLUMNS = ("video", "query", "frame", "time_s", "x1", "y1", "x2", "y2", "score", "source")


def load_results(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """stg.grounding/v1 documents from a RESULT.json or a batch results.jsonl, plus warnings."""
    p = check_result_path(path, "write one with `stg ground ... --out` or `stg batch`")
    warnings = []
    if p.suffix.lower() == ".jsonl":
        numbered, torn = read_jsonl_lines(p)
        if torn:
            warnings.append(f"{p}: the last line is incomplete (a batch was interrupted); skipped it")
    else:
        try:
            numbered = [(0, json.loads(p.read_text(encoding="utf-8")))]
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: not valid JSON ({e}); pass a stg.grounding/v1 .json or a .jsonl") from None
    for lineno, doc in numbered:
        try:
            validate(doc, semantic=False)
        except ResultError as e:
            where = f"line {lineno}" if lineno else "document"
            raise UserError(f"{p}: {where} is not a stg.grounding/v1 result ({e})") from None
    # a pair retried with --retry-failed: its newest line
    return latest_per_pair(doc for _, doc in numbered), warnings


def _boxed(docs: list[dict]) -> list[dict]:
    return [d for d in docs if not d.get("error") and d.get("track")]


def _mot_rows(doc: dict, track_id: int) -> list[tuple[int, int, str]]:
    """(1-based frame, id, MOT line) for every boxed frame of one result."""
    out = []
    for t in doc["track"]:
        x1, y1, x2, y2 = t["xyxy"]
        frame = t["frame"] + 1
        out.append((frame, track_id, f"{frame},{track_id},{x1:.2f},{y1:.2f},{x2 - x1:.2f},{y2 - y1:.2f},"
                                     f"{t['score']:.4f},-1,-1,-1"))
    return out


def to_mot(docs: list[dict]) -> dict[str, tuple[str, list[tuple[int, str]]]]:
    """Per video path: (MOT text, [(track id, query)]). Ids count from 1 per video, in input order.
    A video the model saw but boxed nowhere (no span) gets an empty text: MOT scorers expect a file
    per sequence. A video that failed (an error line) has no result and no entry."""
    per_video: dict[str, list[dict]] = {}
    for d in docs:
        if not d.get("error"):
            per_video.setdefault(d["video"]["path"], []).extend([d] if d.get("track") else [])
    out = {}
    for video, items in per_video.items():
        rows = [row for k, d in enumerate(items, 1) for row in _mot_rows(d, k)]
        rows.sort()  # MOT tools expect lines ordered by frame, then id
        out[video] = ("".join(r[2] + "\n" for r in rows), [(k, d["query"]) for k, d in enumerate(items, 1)])
    return out


def to_csv(docs: list[dict]) -> str:
    """One row per boxed frame of every result; results without a track have no rows."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for d in _boxed(docs):
        for t in d["track"]:
            w.writerow([d["video"]["path"], d["query"], t["frame"], t["time_s"], *t["xyxy"], t["score"],
                        t["source"]])
    return buf.getvalue()


def _unique_names(videos: list[str]) -> dict[str, str]:
    """`<stem>.txt` per video; a stem shared by two folders gets `-2`, `-3`, ... appended."""
    names, used = {}, set()
    for v in videos:
        stem, k = Path(v).stem, 1
        name = f"{stem}.txt"
        while name in used:
            k += 1
            name = f"{stem}-{k}.txt"
        used.add(name)
        names[v] = name
    return names


def export(source: str | os.PathLike, fmt: str, out: str | os.PathLike | None = None,
           force: bool = False) -> tuple[str | None, list[Path], list[str]]:
    """Convert results; returns (text for stdout or None, files written, notes for stderr).

    A single RESULT.json exports to `out` or stdout. MOT from a results.jsonl needs `out` as a
    folder: one `<video>.txt` per video plus `tracks.csv` naming each (file, id, video, query).
    Existing outputs are never replaced unless `force`.
    """
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown; use one of {', '.join(FORMATS)}")
    src = Path(source)
    docs, notes = load_results(src)
    n_empty = len(docs) - len(_boxed(docs))
    if not docs:
        notes.append(f"{src}: holds no results; the export has no rows")
    elif n_empty:
        notes.append(f"{n_empty} of {len(docs)} results have no track (no span or an error) and export no rows")
    out_p = Path(out) if out is not None else None
    if fmt == "csv" or src.suffix.lower() != ".jsonl":
        text = to_csv(docs) if fmt == "csv" else next(iter(to_mot(docs).values()), ("", []))[0]
        if out_p is None:
            return text, [], notes
        check_output_path(out_p, force, source=src, source_kind="results file")
        return None, [write_text_atomic(out_p, text)], notes
    if out_p is None:
        raise UserError(f"{src}: MOT export of a .jsonl writes one file per video; pass --out FOLDER")
    if out_p.exists() and not out_p.is_dir():
        raise UserError(f"{out_p}: is a file; MOT export of a .jsonl needs --out FOLDER")
    if out_p.is_dir() and any(out_p.iterdir()) and not force:
        raise UserError(f"{out_p}: folder is not empty; pass --force to write into it or choose another --out")
    stale = _previous_export(out_p)
    mot = to_mot(docs)
    names = _unique_names(list(mot))
    written, index = [], io.StringIO()
    w = csv.writer(index, lineterminator="\n")
    w.writerow(("file", "id", "video", "query"))
    for video, (text, ids) in mot.items():
        written.append(write_text_atomic(out_p / names[video], text))
        for k, q in ids or [("", "")]:  # an empty sequence is listed too, without an id
            w.writerow((names[video], k, video, q))
    written.append(write_text_atomic(out_p / "tracks.csv", index.getvalue()))
    for name in stale - set(names.values()):  # --force over an earlier export: its other sequences go
        (out_p / name).unlink(missing_ok=True)
    return None, written, notes


def _previous_export(folder: Path) -> set[str]:
    """The sequence files an earlier export into `folder` listed in its tracks.csv (only plain
    `.txt` names there: never a path that leads elsewhere)."""
    try:
        with open(folder / "tracks.csv", newline="", encoding="utf-8") as f:
            names = {row.get("file") or "" for row in csv.DictReader(f)}
    except (OSError, UnicodeDecodeError, csv.Error):
        return set()
    return {n for n in names if n.endswith(".txt") and Path(n).name == n}
