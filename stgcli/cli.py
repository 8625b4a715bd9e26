"""The `stg` command line. Thin by design: parse arguments, call the library, print.

Every user mistake is a `UserError`: exit code 2, one line on stderr, no traceback unless
`--debug`. Heavy imports happen inside commands so `stg --help` answers fast.
"""
from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import NO_SPACE, UserError, disk_full


class _State:
    debug = False


def _fail(message: str, code: int = 2) -> None:
    # one line, even when the message quotes a library's multi-line error
    click.echo(f"stg: error: {' '.join(str(message).split())}", err=True)
    sys.exit(code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="stg")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """Spatio-temporal video grounding: when and where is what the sentence describes."""
    _State.debug = debug


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, `timeout`, a job scheduler, `docker stop`) raised in the main thread, so it
    unwinds like Ctrl-C: part files removed, decoding workers stopped, the batch file whole. By
    default Python dies on SIGTERM without running any cleanup. A KeyboardInterrupt, not an
    Exception, so no `except Exception` (a clip's error line) can swallow it."""


def _terminated() -> None:
    click.echo("stg: terminated", err=True)
    sys.exit(143)  # 128 + SIGTERM, as a shell reports a process it ended


def _on_sigterm(owner: int):
    import os
    import signal

    def handler(signum, frame):
        if os.getpid() != owner:  # a forked child (a data loader's worker): die as it would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    return handler


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: maps library errors to exit codes."""
    import os
    import signal
    import threading

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm(os.getpid()))
    restore = _stdout_passes_file_names()
    try:
        _run(argv, debug)
    finally:
        restore()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stdout_passes_file_names():
    """A file name that is not UTF-8 (POSIX allows any bytes) reaches Python as lone surrogates, and a
    strict stdout raised on printing it. Now it prints as its own bytes, as `ls` prints it. Returns
    the undo."""
    out = sys.stdout
    errors = getattr(out, "errors", None)
    if errors != "strict" or not hasattr(out, "reconfigure"):
        return lambda: None
    try:
        out.reconfigure(errors="surrogateescape")
    except (ValueError, OSError):  # io.UnsupportedOperation is both
        return lambda: None
    return lambda: out.reconfigure(errors=errors)


def _run(argv: list[str] | None, debug: bool) -> None:
    try:
        cli.main(args=argv, prog_name="stg", standalone_mode=False)
    except click.exceptions.Abort as e:  # click turns KeyboardInterrupt into Abort
        if isinstance(e.__cause__, Terminated):
            _terminated()
        click.echo("stg: aborted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:  # one line, like every other mistake: what, and where help is
        command = e.ctx.command_path if e.ctx is not None else "stg"
        _fail(f"{e.format_message().rstrip('.')} (see '{command} --help')", 2)
    except click.ClickException as e:
        _fail(e.format_message(), 2)
    except UserError as e:
        if debug:
            traceback.print_exc()
        _fail(str(e), e.exit_code)
    except Terminated:
        _terminated()
    except KeyboardInterrupt:
        click.echo("stg: interrupted", err=True)
        sys.exit(130)
    except OSError as e:  # a full disk where no output path wraps it (a training checkpoint, ...)
        if e.errno not in NO_SPACE or debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{disk_full(e)}; free some space and run again", 2)




_MODEL_OPTIONS = (
    click.option("--model", "model_name", default=None, metavar="NAME|PATH",
                 help="Registered model name or model directory (default: the built-in spacevllm-tiny-shapes)."),
    click.option("--frames", type=int, default=None, help="Frames to sample per clip (default: the model's)."),
    click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    click.option("--quant", type=click.Choice(["none", "4bit", "8bit"]), default=None,
                 help="Quantize the language model with bitsandbytes: 4bit = NF4 + double quant, 8bit = "
                      "LLM.int8 (default: the model's on CUDA, 4bit for spacevllm-7b; none on CPU)."),
    click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
                 show_default=True,
                 help="What the unquantized weights compute in. auto: bfloat16 on a GPU (float16 before Ampere), "
                      "float32 on CPU. bfloat16 on a CPU with bf16 instructions (AVX512-BF16, AMX) runs the "
                      "built-in model ~20% faster with the same scores, see README."),
    click.option("--span-decoding", type=click.Choice(["joint", "text"]), default="joint", show_default=True,
                 help="joint: the answer the language model and the per-frame presence scores agree on best; "
                      "text: the language model's free text alone."),
)


def _model_options(command):
    """--model, --frames, --device, --quant, --dtype, --span-decoding: how ground, batch and eval choose and run
    a model."""
    for option in reversed(_MODEL_OPTIONS):
        command = option(command)
    return command


def _echo_warnings(warnings) -> None:
    for w in warnings:
        click.echo(f"stg: warning: {w}", err=True)


def _echo_notes(notes) -> None:
    for n in notes:
        click.echo(f"stg: note: {n}", err=True)


def _summary(res) -> str:
    v = res.video
    lines = [f"{v.path}: \"{res.query}\""]
    if res.span is None:
        lines.append("  not found (no span)")
    else:
        s = res.span
        n_model = sum(1 for t in res.track if t.source == "model")
        lines.append(f"  span   {s.start_s:.2f}s - {s.end_s:.2f}s  (frames {s.start_frame}-{s.end_frame} of "
                     f"{v.num_frames})")
        n = len(res.track)
        lines.append(f"  boxes  {n} frame{'s' * (n != 1)} ({n_model} from the model, {n - n_model} interpolated)")
        mid = res.track[len(res.track) // 2]
        x1, y1, x2, y2 = mid.xyxy
        lines.append(f"  e.g.   frame {mid.frame}: [{x1:.0f}, {y1:.0f}, {x2:.0f}, {y2:.0f}] score {mid.score:.2f}")
    t = res.timing_s
    lines.append(f"  time   decode {t['decode']:.2f}s, model {t['model']:.2f}s, total {t['total']:.2f}s "
                 f"({res.model.name} on {res.model.device})")
    return "\n".join(lines)


@cli.command()
@click.argument("video", type=click.Path(path_type=Path))
@click.argument("query")
@_model_options
@click.option("--start", "start_s", type=float, default=None, help="Only look from this second on.")
@click.option("--end", "end_s", type=float, default=None, help="Only look up to this second.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the stg.grounding/v1 JSON here (atomically).")
@click.option("--render", "render_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an annotated H.264 MP4 (all overlays).")
@click.option("--json", "as_json", is_flag=True, help="Print the JSON document on stdout, nothing else.")
@click.option("--force", is_flag=True, help="Overwrite --out / --render if they exist.")
@click.option("--allow-pickle", is_flag=True, help="Load a pickle (.bin/.pt) checkpoint; it can run code. Trusted "
              "sources only.")
def ground(video: Path, query: str, model_name, frames, device, quant, dtype, span_decoding, start_s, end_s, out_path,
           render_path,
           as_json, force, allow_pickle) -> None:
    """Find when and where QUERY is in VIDEO."""
    from .pipeline import check_frames, check_query, check_video_path, ground as run
    from .result import check_output_path, write_json_atomic
    from .weights import load_model

    check_query(query)
    check_frames(frames)
    check_video_path(video, start_s, end_s)
    for p, opt in ((out_path, "--out"), (render_path, "--render")):  # before the model runs, not after
        if p is not None:
            check_output_path(p, force, opt, source=video)
    loaded = load_model(model_name, device=device, quant=quant, allow_pickle=allow_pickle, frames=frames,
                        span_decoding=span_decoding, dtype=dtype)
    if device == "auto" and loaded.device == "cpu":  # after the load, so a model mistake stays one line
        click.echo("stg: note: no CUDA GPU found, running on CPU", err=True)
    res = run(video, query, model=loaded, frames=frames, start_s=start_s, end_s=end_s)
    _echo_warnings(res.warnings)
    if out_path is not None:
        write_json_atomic(out_path, res)
    if render_path is not None:
        from .render import render as draw

        notes: list[str] = []
        draw(video, res, render_path, notes=notes, progress=True)
        _echo_notes(notes)
    if as_json:
        click.echo(res.to_json(indent=2))
    else:
        click.echo(_summary(res))
        for p in (out_path, render_path):
            if p is not None:
                click.echo(f"  wrote  {p}")


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL output; one stg.grounding/v1 line per (video, query). Appended to, never rewritten.")
@click.option("--query", "queries", multiple=True,
              help="The query for every video of SOURCE (a folder, or one video); repeat it to ask several "
                   "(each video is decoded once).")
@_model_options
@click.option("--workers", type=int, default=None, show_default="cores - 1, at most 4; 2 on 2 cores",
              help="Processes decoding clips ahead of the one in the model.")
@click.option("--batch-size", type=int, default=None, show_default="4 on a CPU, 1 on a GPU",
              help="Clips the model reads together (one prefill): less compute per clip, the same results "
                   "up to float rounding.")
@click.option("--decode-timeout", type=click.FloatRange(min=0), default=600, show_default=True, metavar="SECONDS",
              help="A clip still decoding after this long gets an error line and the batch goes on (0: no limit).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Skip (video, query) pairs already in --out.")
@click.option("--retry-failed", is_flag=True,
              help="Ground again the pairs whose line in --out is an error; the new line supersedes it.")
@click.option("--allow-pickle", is_flag=True, help="Load a pickle (.bin/.pt) checkpoint (trusted sources only).")
def batch(source: Path, out_path: Path, queries, model_name, frames, device, quant, dtype, span_decoding, workers,
          batch_size, decode_timeout, resume, retry_failed, allow_pickle) -> None:
    """Ground many clips: SOURCE is a folder or a video (with --query) or a JSONL/CSV manifest of video,query."""
    from .batch import run_batch
    from .result import check_output_path

    check_output_path(out_path, force=True)  # appended to when it exists; a folder or unwritable place is not
    counts = run_batch(source, out_path, query=list(queries) or None, model=model_name, frames=frames, device=device,
                       quant=quant, dtype=dtype, resume=resume, workers=workers, allow_pickle=allow_pickle,
                       span_decoding=span_decoding, retry_failed=retry_failed, decode_timeout=decode_timeout,
                       batch_size=batch_size)
    earlier = (f" ({counts.failed_earlier} of them failed in an earlier run; --retry-failed grounds those "
               "again)") if counts.failed_earlier else ""
    click.echo(f"stg: {counts.grounded} grounded, {counts.failed} failed, {counts.skipped} already done{earlier} "
               f"-> {out_path}", err=True)
    if counts.failed or counts.failed_earlier:  # the output holds failures either way
        sys.exit(1)


@cli.command()
@click.argument("video", type=click.Path(path_type=Path))
@click.argument("result", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output MP4 (default: VIDEO's name + .annotated.mp4 beside RESULT).")
@click.option("--overlay", default="box,label,trace,timeline", show_default=True,
              help="Comma-separated overlays: box, label, trace, timeline.")
@click.option("--query", default=None,
              help="With a batch .jsonl: the query whose line to draw, when VIDEO has several.")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
def render(video: Path, result: Path, out_path, overlay, query, force) -> None:
    """Draw RESULT (a stg ground .json, or VIDEO's line of a stg batch .jsonl) onto VIDEO as an H.264 MP4."""
    from .render import load_result, parse_overlays, render as run
    from .result import check_output_path

    overlays = parse_overlays(overlay)
    res = load_result(result, video, query)
    out_path = out_path or result.with_name(video.stem + ".annotated.mp4")
    check_output_path(out_path, force, source=video)
    notes: list[str] = []
    run(video, res, out_path, overlays, notes=notes, progress=True)
    _echo_notes(notes)
    click.echo(f"wrote {out_path}")


@cli.command()
@click.argument("results", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["mot", "csv"]), required=True,
              help="mot: MOTChallenge txt (1-based frames, left,top,width,height); csv: one row per box.")
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None,
              help="Output file (default: stdout); for MOT from a .jsonl, a folder (one .txt per video).")
@click.option("--force", is_flag=True, help="Overwrite existing outputs.")
def export(results: Path, fmt: str, out_path, force: bool) -> None:
    """Convert RESULTS (a stg ground .json or a stg batch .jsonl) to MOT or CSV."""
    from .export import export as run

    text, written, notes = run(results, fmt, out_path, force)
    _echo_notes(notes)
    if text is not None:
        click.echo(text, nl=False)
    for p in written:
        click.echo(f"wrote {p}", err=True)


@cli.command()
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n", type=int, default=100, show_default=True, help="Number of clips.")
@click.option("--seed", type=int, default=0, show_default=True)
def synth(out_dir: Path, n: int, seed: int) -> None:
    """Write shapes-world clips (H.264 MP4), their ground truth and manifest.jsonl to OUT_DIR."""
    from .synth import synth_dataset

    if n < 1:
        raise UserError(f"--n {n}: must be at least 1")
    manifest = synth_dataset(out_dir, n, seed=seed)
    click.echo(f"wrote {n} clips and {manifest}")


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Training config (TOML); see examples/train-tiny.toml.")
@click.option("--resume", is_flag=True, help="Continue from OUT_DIR/checkpoint.")
@click.option("--force", is_flag=True, help="Start over in an out_dir that holds an earlier run (replacing it).")
def train(config_path: Path, resume: bool, force: bool) -> None:
    """Train a SpaceVLLM model on shapes-world clips drawn on the fly."""
    from .train import TrainConfig, train as run

    if resume and force:
        raise UserError("--resume continues the run in out_dir and --force replaces it; pass one of them")
    final = run(TrainConfig.from_toml(config_path), resume=resume, force=force)
    click.echo(f"model written to {final}")


def _metrics_text(m: dict, protocol: str, groups: dict | None = None) -> str:
    rows = [(k, f"{m[k]:.4f}  ({100 * m[k]:.1f})") for k in ("m_tIoU", "m_vIoU", "vIoU@0.3", "vIoU@0.5")]
    rows.append(("n", f"{m['n']}  ({m['n_failed']} failed)"))
    rows.append(("protocol", protocol))
    for name, g in (groups or {}).items():  # VidSTG: declarative / interrogative, as its tables split them
        rows.append((name, "  ".join(f"{k} {g[k]:.4f}" for k in ("m_tIoU", "m_vIoU", "vIoU@0.3", "vIoU@0.5"))
                     + f"  n {g['n']}"))
    return "\n".join(f"{k:<13} {v}" for k, v in rows)


@cli.command(name="eval")
@click.option("--annotations", "annotations", type=click.Path(path_type=Path), default=None,
              help="Ground-truth file (HC-STVG/VidSTG JSON, or a `stg synth` manifest.jsonl).")
@click.option("--format", "fmt", default=None, metavar="hcstvg|vidstg|stg", help="Format of --annotations.")
@click.option("--videos", type=click.Path(path_type=Path), default=None,
              help="Folder with the annotated videos (searched recursively, matched by file name).")
@click.option("--predictions", type=click.Path(path_type=Path), default=None,
              help="Score this stg.grounding/v1 JSONL instead of running a model.")
@_model_options
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Predictions JSONL (resumable; default: ANNOTATIONS-stem.preds.jsonl here).")
@click.option("--retry-failed", is_flag=True,
              help="Run the model again on samples whose line in --out is an error.")
@click.option("--protocol", default="stg", show_default=True, metavar="stg|tubedetr",
              help="stg: every frame, inclusive spans. tubedetr: frames sampled at 5 fps, as published tables.")
@click.option("--per-sample", "per_sample", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write one CSV row per sample (video, query, tIoU, vIoU, spans).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG: vIoU histogram and tIoU-vs-vIoU scatter (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print only the metrics as one JSON object.")
@click.option("--force", is_flag=True, help="Overwrite --per-sample / --plot if they exist.")
@click.option("--allow-pickle", is_flag=True, help="Load a pickle (.bin/.pt) checkpoint (trusted sources only).")
def eval_(annotations, fmt, videos, predictions, model_name, out_path, retry_failed, protocol, per_sample, plot_path,
          frames, device, quant, dtype, span_decoding, as_json, force, allow_pickle) -> None:
    """Score a model on annotated videos: m_tIoU, m_vIoU, vIoU@0.3, vIoU@0.5."""
    import json

    from .annotations import FORMATS
    from .evaluate import PROTOCOLS, check_plot_available, evaluate, plot, write_per_sample_csv
    from .pipeline import check_frames

    if annotations is None:
        raise UserError("--annotations FILE is required (the ground truth to score against)")
    if fmt is None:
        raise UserError(f"--format is required: one of {', '.join(FORMATS)}")
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: unknown annotation format; use one of {', '.join(FORMATS)}")
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol}: unknown; use one of {', '.join(PROTOCOLS)}")
    check_frames(frames)
    if plot_path is not None:
        check_plot_available()
    from .result import check_output_path

    default_out = Path(f"{Path(annotations).stem}.preds.jsonl") if predictions is None else None
    inputs = (annotations, predictions, out_path or default_out)
    for p, opt in ((per_sample, "--per-sample"), (plot_path, "--plot")):  # before the model runs, not after
        if p is not None:
            check_output_path(p, force, opt, source=inputs, source_kind="file of this evaluation")
    if per_sample is not None and plot_path is not None and Path(per_sample).resolve() == Path(plot_path).resolve():
        raise UserError(f"{per_sample}: given to both --per-sample and --plot; give them different files")
    report = evaluate(annotations, fmt, videos=videos, predictions=predictions, model=model_name, out=out_path,
                      protocol=protocol, frames=frames, device=device, quant=quant, dtype=dtype,
                      span_decoding=span_decoding, retry_failed=retry_failed, allow_pickle=allow_pickle)
    _echo_warnings(report.warnings)
    if per_sample is not None:
        write_per_sample_csv(per_sample, report.scores)
    if plot_path is not None:
        plot(plot_path, report.scores)
    if as_json:
        click.echo(json.dumps(report.metrics))
    else:
        click.echo(_metrics_text(report.metrics, protocol, report.by_qtype))
        for label, p in (("predictions", report.predictions), ("per-sample", per_sample), ("plot", plot_path)):
            if p is not None:
                click.echo(f"{label:<13} {p}")


# -- stg weights -------------------------------------------------------------------------------------
@cli.group()
@click.option("--registry", "registry_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A weights.toml that extends the packaged registry (also: STG_WEIGHTS).")
@click.pass_context
def weights(ctx: click.Context, registry_file: Path | None) -> None:
    """The model registry: list, verify, locate, download and build models."""
    ctx.obj = {"registry": registry_file}


@weights.command("list")
@click.option("--verify", "check", is_flag=True, help="Hash every file (slow for large models).")
@click.pass_context
def weights_list(ctx: click.Context, check: bool) -> None:
    """Every registered model: name, size, where it lives, present / verified."""
    from .weights import list_models

    rows = [("NAME", "SIZE", "STATUS", "WHERE")]
    notes = []
    for st in list_models(ctx.obj["registry"], check=check):
        size = st.disk_size if st.state in ("present", "verified", "mismatch") else (st.entry.size or "?")
        rows.append((st.entry.name, size, st.state, st.entry.where()))
        notes.append(f"  {st.entry.name}: {st.entry.description}" + (f" [{st.detail}]" if st.detail else ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    click.echo("")
    for n in notes:
        click.echo(n)


@weights.command("verify")
@click.argument("name")
@click.pass_context
def weights_verify(ctx: click.Context, name: str) -> None:
    """Check every file of NAME against its sha256 (exit 2 on a mismatch, both digests printed)."""
    from .weights import verify_model

    directory, origin, n = verify_model(name, ctx.obj["registry"])
    click.echo(f"{name}: {n} files verified against {origin} ({directory})")


@weights.command("path")
@click.argument("name")
@click.pass_context
def weights_path(ctx: click.Context, name: str) -> None:
    """Print the directory holding NAME's files."""
    from .weights import model_path

    click.echo(str(model_path(name, ctx.obj["registry"])))


@weights.command("fetch")
@click.argument("name")
@click.pass_context
def weights_fetch(ctx: click.Context, name: str) -> None:
    """Download NAME from the Hugging Face Hub at its pinned revision (into the HF cache)."""
    from .weights import fetch

    path = fetch(name, ctx.obj["registry"])
    click.echo(f"{name}: downloaded and verified -> {path}")


@weights.command("init")
@click.argument("name")
@click.option("--from", "src", type=click.Path(path_type=Path), default=None,
              help="A LLaVA-Video-7B-Qwen2 checkpoint directory (default: the fetched base model).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to write the model (default: its registry location, under STG_HOME).")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest output shard, e.g. 2GB, 500MB.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new space decoder.")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.pass_context
def weights_init(ctx: click.Context, name: str, src, out_dir, shard_size: str, seed: int, force: bool) -> None:
    """Build NAME (spacevllm-7b) from its base checkpoint: copy, add query tokens, new space decoder."""
    from .weights import init_model

    out = init_model(name, src=src, out=out_dir, registry_file=ctx.obj["registry"],
                     max_shard_bytes=_parse_size(shard_size), seed=seed, force=force,
                     progress=lambda shard: click.echo(f"stg: converted {shard}", err=True))
    click.echo(f"{name}: written to {out} (queries and space decoder untrained: fine-tune before use)")


def _parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"--shard-size {text}: expected a size like 2GB or 500MB")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    n = int(float(m.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit])
    if n < 1:
        raise UserError(f"--shard-size {text}: must be positive")
    return n
