"""`stg eval`: run a model over annotated videos (or read its predictions) and score them.

    >>> from stgcli import evaluate
    >>> report = evaluate.evaluate("test.json", "hcstvg", videos="clips/", out="preds.jsonl")
    >>> report.metrics        # {"m_tIoU": ..., "m_vIoU": ..., "vIoU@0.3": ..., "vIoU@0.5": ..., "n", "n_failed"}
    >>> evaluate.write_per_sample_csv("per_sample.csv", report.scores)

Running reuses `stg batch`'s resumable JSONL machinery, so an interrupted evaluation continues
where it stopped. Predictions are matched back to annotations by (video file name, query).

Every annotated sample counts in n. A sample whose video is not in the videos folder, whose
prediction is missing, is an error line or cannot be read scores 0 and counts in n_failed
(with one warning saying how many and which); a `span: null` answer is a valid "not found",
scores 0 and is not a failure. If no annotated video is found at all, nothing is run: that is
a wrong folder, not a result (UserError, exit 2).
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .annotations import FORMATS, Sample, load_annotations
from .batch import VIDEO_EXTENSIONS, check_out_matches
from .errors import UserError
from .pipeline import normalize_query
from .metrics import pred_span, score_sample, summarize, tubedetr_frames

__all__ = ["PROTOCOLS", "EvalReport", "SampleScore", "evaluate", "find_videos", "index_predictions",
           "plot", "score", "write_per_sample_csv"]

PROTOCOLS = ("stg", "tubedetr")
METRIC_KEYS = ("m_tIoU", "m_vIoU", "vIoU@0.3", "vIoU@0.5", "n", "n_failed")


@dataclass
class SampleScore:
    """One sample's outcome: its scores, the spans compared, and why it failed if it did."""

    sample: Sample
    tiou: float
    viou: float
    pred_span: tuple[int, int] | None
    status: str  # "ok", "no span" (model found nothing) or "failed: <reason>"

    @property
    def failed(self) -> bool:
        return self.status.startswith("failed")


@dataclass
class EvalReport:
    """What `evaluate` found: dataset metrics, per-sample scores, warnings for the user."""

    metrics: dict[str, float | int]
    scores: list[SampleScore]
    protocol: str
    predictions: Path | None
    warnings: list[str] = field(default_factory=list)

    @property
    def by_qtype(self) -> dict[str, dict[str, float | int]]:
        """Metrics per VidSTG sentence type (declarative / interrogative), as its tables report them."""
        groups: dict[str, list[SampleScore]] = {}
        for sc in self.scores:
            if sc.sample.qtype:
                groups.setdefault(sc.sample.qtype, []).append(sc)
        return {k: metrics_of(v) for k, v in sorted(groups.items())}


# ------------------------------------------------------------------------------------ matching


def _key_names(video: str) -> tuple[str, str]:
    p = Path(str(video).replace("\\", "/"))
    return p.name, p.stem if p.suffix.lower() in VIDEO_EXTENSIONS else p.name


def find_videos(samples: Sequence[Sample], videos_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Map each sample's `video` to a file under `videos_dir` (relative path, file name, or stem).

    Stems matter because VidSTG names videos by id ("2727682922") and HC-STVG keys may carry
    another extension than the file on disk. Samples with no file are left out of the result.
    """
    root = Path(videos_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder; --videos must be the folder holding the annotated videos")
    by_name: dict[str, Path] = {}
    by_stem: dict[str, Path] = {}
    for f in sorted(root.rglob("*")):
        if f.suffix.lower() in VIDEO_EXTENSIONS and f.is_file():
            by_name.setdefault(f.name, f)
            by_stem.setdefault(f.stem, f)
    found: dict[str, Path] = {}
    for s in samples:
        if s.video in found:
            continue
        direct = root / s.video
        name, stem = _key_names(s.video)
        hit = direct if direct.is_file() else by_name.get(name) or by_stem.get(stem)
        if hit is not None:
            found[s.video] = hit
    return found


def index_predictions(records: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], Mapping[str, Any]]:
    """(file name, query) and (stem, query) -> prediction record. A pair written twice (retried after
    an error) counts by its last record; of two videos sharing a name, the first listed wins."""
    from .result import latest_per_pair

    index: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in latest_per_pair(records):
        try:
            video, query = str(r["video"]["path"]), normalize_query(r["query"])
        except (KeyError, TypeError):
            continue
        for k in _key_names(video):
            index.setdefault((k, query), r)
    return index


def _lookup(index: Mapping[tuple[str, str], Mapping[str, Any]], s: Sample) -> Mapping[str, Any] | None:
    name, stem = _key_names(s.video)
    return index.get((name, s.query)) or index.get((stem, s.query))


# ------------------------------------------------------------------------------------- scoring


def _fps(s: Sample, pred: Mapping[str, Any] | None) -> float | None:
    """The frame rate for TubeDETR's 5 fps sampling: the annotation's, else the decoded video's."""
    if s.fps:
        return s.fps
    try:
        fps = float(pred["video"]["fps"])  # type: ignore[index]
        return fps if fps > 0 else None
    except (KeyError, TypeError, ValueError):
        pass
    if s.num_frames:  # HC-STVG clips are 20 s long: TubeDETR's own assumption
        return s.num_frames / 20.0
    return None


def score_one(s: Sample, pred: Mapping[str, Any] | None, protocol: str = "stg",
              missing: str | None = None) -> SampleScore:
    """Score one sample under `protocol`; `missing` names why there is no prediction."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol}: unknown; use one of {', '.join(PROTOCOLS)}")
    if pred is None:
        return SampleScore(s, 0.0, 0.0, None, f"failed: {missing or 'no prediction'}")
    if not isinstance(pred, Mapping) or not isinstance(pred.get("video"), Mapping):
        return SampleScore(s, 0.0, 0.0, None, "failed: unreadable prediction")
    if pred.get("error"):
        err = pred["error"]
        msg = err.get("message") if isinstance(err, Mapping) else str(err)
        return SampleScore(s, 0.0, 0.0, None, f"failed: {msg}")
    span = pred_span(pred)
    if span is None:
        if pred.get("span") is not None:
            return SampleScore(s, 0.0, 0.0, None, "failed: unreadable span")
        return SampleScore(s, 0.0, 0.0, None, "no span")
    frame_range = None if s.eval_range is None else range(s.eval_range[0], s.eval_range[1] + 1)
    viou_frames = None
    if protocol == "tubedetr":
        lo, hi = s.eval_range if s.eval_range is not None else (0, max(span[1], *(s.gt_span or (0, 0))))
        viou_frames = set(tubedetr_frames(lo, hi + 1, _fps(s, pred)))
    t, v = score_sample(pred, s.gt_frames, s.gt_boxes, frame_range=frame_range, viou_frames=viou_frames)
    return SampleScore(s, t, v, span, "ok")


def score(samples: Sequence[Sample], predictions: Mapping[tuple[str, str], Mapping[str, Any]],
          protocol: str = "stg", missing_videos: Iterable[str] = ()) -> list[SampleScore]:
    """Per-sample scores of indexed predictions (see `index_predictions`) against `samples`."""
    missing = set(missing_videos)
    out = []
    for s in samples:
        if s.video in missing:
            out.append(score_one(s, None, protocol, missing="video not found"))
        else:
            out.append(score_one(s, _lookup(predictions, s), protocol))
    return out


def metrics_of(scores: Sequence[SampleScore]) -> dict[str, float | int]:
    """The dataset numbers `stg eval` prints: means, vIoU@R (strict), n and n_failed."""
    m = summarize((s.tiou, s.viou) for s in scores)
    m["n_failed"] = sum(1 for s in scores if s.failed)
    return {k: m[k] for k in METRIC_KEYS}


# ---------------------------------------------------------------------------------- running


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def evaluate(annotations: str | os.PathLike[str], fmt: str, videos: str | os.PathLike[str] | None = None,
             predictions: str | os.PathLike[str] | None = None, model: Any = None,
             out: str | os.PathLike[str] | None = None, protocol: str = "stg", frames: int | None = None,
             device: str = "auto", quant: str | None = None, dtype: str = "auto", progress: bool = True,
             span_decoding: str = "joint", retry_failed: bool = False, allow_pickle: bool = False) -> EvalReport:
    """Score a model on an annotation file: run it over `videos`, or read `predictions`.

    With `predictions` (a `stg batch`/`stg eval` JSONL) nothing runs and `videos` is not needed.
    Otherwise `videos` is required, the model runs on every annotated (video, query) not yet in
    `out` (default: `<annotations stem>.preds.jsonl` in the current folder), within VidSTG's
    used segment where there is one (with `retry_failed`, also on those whose line there is an
    error), and `out` is then scored.
    """
    from .result import read_jsonl

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown annotation format; use one of {', '.join(FORMATS)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol}: unknown; use one of {', '.join(PROTOCOLS)}")
    if predictions is not None and out is not None:
        raise UserError("--out is where a model run writes its predictions; with --predictions nothing runs, "
                        "so drop --out")
    if predictions is not None and retry_failed:
        raise UserError("--retry-failed runs the model again; with --predictions nothing runs, so drop it")
    if predictions is not None and model is not None:
        raise UserError("--model runs a model; with --predictions nothing runs, so drop --model")
    samples = load_annotations(annotations, fmt)
    warnings: list[str] = []
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for s in samples:
        key = (_key_names(s.video)[0], s.query)
        repeats += key in seen
        seen.add(key)
    if repeats:
        warnings.append(f"{_plural(repeats, 'sample')} repeat the (video, query) of an earlier one and share "
                        "its prediction")
    missing: set[str] = set()
    if predictions is not None:
        pred_path = Path(predictions)
        if not pred_path.is_file():
            raise UserError(f"{pred_path}: no such predictions file; write one with `stg eval ... --out` "
                            "or `stg batch`")
        read = read_jsonl(pred_path)
        if read.torn:
            warnings.append(f"{pred_path}: skipped a torn last line (an interrupted run)")
        index = index_predictions(read.records)
        if not any(_lookup(index, s) is not None for s in samples):
            raise UserError(f"{pred_path}: none of its predictions match a (video, query) of {annotations}; "
                            "are they for this annotation file?")
    else:
        if videos is None:
            raise UserError("--videos DIR is needed to run the model (or pass --predictions FILE to score "
                            "existing predictions)")
        found = find_videos(samples, videos)
        if not found:
            example = samples[0].video
            raise UserError(f"{videos}: none of the {_plural(len(samples), 'annotated video')} is there "
                            f"(looked for e.g. {example!r} by name and stem); check --videos")
        missing = {s.video for s in samples if s.video not in found}
        from .weights import LoadedModel, load_model

        loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, quant=quant,
                                                                         span_decoding=span_decoding, dtype=dtype,
                                                                         allow_pickle=allow_pickle)
        pred_path = Path(out) if out is not None else Path(f"{Path(annotations).stem}.preds.jsonl")
        check_out_matches(pred_path, loaded, frames, " (or --predictions to score that file)")
        items = []
        for s in samples:
            if s.video in found:
                win = s.window_s
                items.append((str(found[s.video]), s.query) + (win if win is not None else ()))
        from .batch import run_batch

        counts = run_batch(None, pred_path, model=loaded, frames=frames, progress=progress, items=items,
                           retry_failed=retry_failed, desc="eval")
        if counts.failed_earlier:
            warnings.append(f"{_plural(counts.failed_earlier, 'sample')} failed in an earlier run into {pred_path} "
                            "and were not run again (pass --retry-failed)")
        index = index_predictions(read_jsonl(pred_path).records)
    scores = score(samples, index, protocol, missing)
    if missing:
        eg = ", ".join(sorted(missing)[:3])
        warnings.append(f"{_plural(len(missing), 'annotated video')} not found in {videos} ({eg}"
                        f"{', ...' if len(missing) > 3 else ''}); {'it scores' if len(missing) == 1 else 'they score'}"
                        " 0 and count as failed")
    n_nopred = sum(1 for sc in scores if sc.status == "failed: no prediction")
    if n_nopred:
        warnings.append(f"{_plural(n_nopred, 'sample')} had no prediction in {pred_path}; scored 0 as failed")
    n_err = sum(1 for sc in scores
                if sc.failed and sc.status not in ("failed: no prediction", "failed: video not found"))
    if n_err:
        warnings.append(f"{_plural(n_err, 'prediction')} failed or could not be read (see --per-sample); "
                        "scored 0")
    return EvalReport(metrics_of(scores), scores, protocol, pred_path, warnings)


# ----------------------------------------------------------------------------------- outputs


def write_per_sample_csv(path: str | os.PathLike[str], scores: Sequence[SampleScore]) -> Path:
    """One row per sample: video, query, tIoU, vIoU, predicted and true spans (inclusive frames),
    written atomically."""
    from .result import write_text_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["video", "query", "tIoU", "vIoU", "pred_start_frame", "pred_end_frame", "gt_start_frame",
                "gt_end_frame", "status", "qtype"])
    for sc in scores:
        ps, gs = sc.pred_span, sc.sample.gt_span
        w.writerow([sc.sample.video, sc.sample.query, f"{sc.tiou:.4f}", f"{sc.viou:.4f}",
                    "" if ps is None else ps[0], "" if ps is None else ps[1],
                    "" if gs is None else gs[0], "" if gs is None else gs[1], sc.status, sc.sample.qtype or ""])
    return write_text_atomic(path, buf.getvalue())


def check_plot_available() -> None:
    """Fail early (before an hour of inference) when --plot cannot work."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib: pip install 'stg[plot]' (or pip install matplotlib)")


def plot(path: str | os.PathLike[str], scores: Sequence[SampleScore], title: str | None = None) -> Path:
    """vIoU histogram (with the 0.3 / 0.5 thresholds) and tIoU-vs-vIoU scatter, as a PNG."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    t = [s.tiou for s in scores]
    v = [s.viou for s in scores]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
    a.hist(v, bins=20, range=(0.0, 1.0), color="#4c72b0", edgecolor="white")
    for r in (0.3, 0.5):
        a.axvline(r, color="#c44e52", linestyle="--", linewidth=1)
        a.text(r, a.get_ylim()[1] * 0.95, f" {r}", color="#c44e52", va="top")
    a.set_xlabel("vIoU")
    a.set_ylabel("samples")
    a.yaxis.get_major_locator().set_params(integer=True)
    a.set_title("vIoU per sample")
    a.set_xlim(0, 1)
    b.scatter(t, v, s=14, alpha=0.7, color="#55a868")
    b.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle=":")  # vIoU <= tIoU always
    b.set_xlim(0, 1)
    b.set_ylim(0, 1)
    b.set_xlabel("tIoU")
    b.set_ylabel("vIoU")
    b.set_title("tIoU vs vIoU")
    m = metrics_of(scores)
    fig.suptitle(title or (f"n={m['n']}  m_tIoU={m['m_tIoU']:.3f}  m_vIoU={m['m_vIoU']:.3f}  "
                           f"vIoU@0.3={m['vIoU@0.3']:.3f}  vIoU@0.5={m['vIoU@0.5']:.3f}"))
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    from .result import write_bytes_atomic

    return write_bytes_atomic(path, png.getvalue())  # an interrupted run leaves the old plot whole
