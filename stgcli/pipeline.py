"""The grounding pipeline: video -> frames -> model inputs -> model -> span + boxes -> track.

`ground()` is the library call behind `stg ground`; `stg batch` grounds several clips per prefill
(`ground_prepared_many`).
"""
from __future__ import annotations

import os
import re
import sys
import time

import numpy as np

from .errors import UserError
from .result import GroundingResult, ModelMeta, Sampling, Span, VideoMeta, build_track

# How the built-in model's tokenizer cuts a word (after lowercasing): letter runs in any script, each
# digit, each punctuation mark.
_PIECE = re.compile(r"\d|[^\W\d_]+|[^\w\s]|_")


def normalize_query(text) -> str:
    """One spelling per query (whitespace collapsed): what results record and resume matches on."""
    return " ".join(str(text).split())


def check_query(query: str) -> str:
    q = normalize_query(query)
    if not q:
        raise UserError("empty query: describe the object to find, e.g. \"the red circle moving left\"")
    return q


def check_frames(frames: int | None) -> None:
    if frames is not None and frames < 1:
        raise UserError(f"--frames {frames}: must be at least 1")


def check_video_path(video: str | os.PathLike, start_s: float | None = None,
                     end_s: float | None = None, open_it: bool = True) -> None:
    """The mistakes worth catching before a model load (missing, a folder, empty, a reversed window,
    and with `open_it`, not a video: an extra open of the file, worth it only when a load follows)."""
    from .video import check_openable, check_path, check_window

    check_path(video)
    check_window(video, start_s, end_s)
    if open_it:
        check_openable(video)


def unknown_words(query: str, vocabulary: set[str] | None) -> list[str]:
    """Words of the query (as typed) holding a piece the model never saw in training: a word, or a
    digit or punctuation mark the tokenizer splits off ("cup!", "rëd", "圆"). Empty for
    open-vocabulary models."""
    if not vocabulary:
        return []
    seen, out = set(), []
    for word in query.split():
        if any(p not in vocabulary for p in _PIECE.findall(word.lower())) and word not in seen:
            seen.add(word)
            out.append(word)
    return out


def vocabulary_warning(model_name: str, words: list[str]) -> str:
    return (f"model '{model_name}' knows only its training world (coloured shapes); "
            f"it never saw: {', '.join(words)}. The answer below is a guess.")


def prepare(loaded, video: str | os.PathLike, query: str, frames: int | None = None,
            start_s: float | None = None, end_s: float | None = None, threads: int = 0):
    """Decode and tokenise one clip (the CPU-side half of grounding; `stg batch` decodes in
    worker processes instead, then calls `prepare_sampled`). `threads` caps the decoder's threads."""
    from .video import sample_frames

    query = check_query(query)
    check_frames(frames)
    t0 = time.perf_counter()
    sampled = sample_frames(video, frames if frames is not None else loaded.default_frames, start_s=start_s,
                            end_s=end_s, size=model_input_size(loaded), threads=threads)
    return prepare_sampled(loaded, query, sampled, t0)


def model_input_size(loaded) -> tuple[int, int]:
    """(width, height) frames are decoded at: the model's square input."""
    s = loaded.processor.settings.image_size
    return s, s


def prepare_sampled(loaded, query: str, sampled, t0: float, decode_s: float = 0.0, pixels=None) -> dict:
    """The model inputs of frames already sampled (batch decodes them in worker processes);
    `decode_s` is time spent before `t0` decoding them; `pixels`: the frames already preprocessed (another
    query about the same clip)."""
    pixels = loaded.processor.preprocess_frames(sampled.frames) if pixels is None else pixels
    ids, text_mask = loaded.processor.encode_prompt(query, sampled.times_s)
    return {"query": query, "sampled": sampled, "pixels": pixels, "ids": ids, "text_mask": text_mask,
            "decode_s": decode_s + time.perf_counter() - t0}


def _span_frames(lo: float, hi: float, sampled) -> tuple[int, int]:
    """Video frames whose timestamp lies in [lo, hi], kept inside the sampled window."""
    # The sampled window (the whole clip by default) bounds the span, not the first and last sample
    # (one sample, or a last one that did not decode, would cut it). Frame times are index/fps for
    # constant-rate files and the stream's pts for VFR: one clock for both.
    w_lo, w_hi = sampled.window or (int(sampled.indices[0]), int(sampled.indices[-1]))
    t = sampled.frame_times
    eps = 1e-6
    a = max(w_lo, int(np.searchsorted(t, lo - eps, side="left")))
    b = min(w_hi, int(np.searchsorted(t, hi + eps, side="right")) - 1)
    if a > b:  # a span narrower than one frame: take the nearest frame
        a = b = int(np.clip(np.abs(t - (lo + hi) / 2).argmin(), w_lo, w_hi))
    return a, b


SPAN_DECODINGS = ("joint", "text")


def check_span_decoding(span_decoding: str) -> str:
    if span_decoding not in SPAN_DECODINGS:
        raise UserError(f"span decoding {span_decoding!r}: expected one of {', '.join(SPAN_DECODINGS)}")
    return span_decoding


def run_model(loaded, prep: dict, all_boxes: bool = False):
    """Model half: one forward + the answer. Returns answer text, boxes, scores, seconds.

    A model with a box refiner refines the boxes of the sampled frames inside the answer's span only
    (the others are never shown); `all_boxes` refines every frame's (diagnostics that score boxes on
    the true span's frames), the boxes inside the span the same either way (tube linking, when the
    model's config turns it on, follows the object through the answer's span in both).

    The answer is decoded as `loaded.span_decoding` says: "joint" (default) writes the answer the
    language model and the per-frame presence scores agree on best, among answers whose edges are
    sampled frames; "text" is the language model's free greedy text (the paper's reading, kept for
    comparison: the built-in model's text alone is less accurate, see its model card)."""
    return run_models(loaded, [prep], all_boxes)[0]


def run_models(loaded, preps: list[dict], all_boxes: bool = False) -> list[tuple]:
    """`run_model` for several clips of the same frame count with one prefill (the model's `ground_many`):
    the same results up to float rounding, for less compute per clip. Each clip's seconds are its share.
    Clips that do not fit in GPU memory together are grounded one at a time (with a note on stderr)."""
    import torch

    from .weights import cuda_oom_guard

    dev, model = loaded.device, loaded.model
    t0 = time.perf_counter()
    n_frames = len(preps[0]["sampled"].indices)
    with torch.inference_mode():
        frames: dict[int, object] = {}  # one tensor per clip, converted once: the pairs of one video share it
        for prep in preps:
            if id(prep["sampled"]) not in frames:
                frames[id(prep["sampled"])] = torch.from_numpy(prep["pixels"])[None].to(dev, dtype=model.dtype)
        clips = [{"input_ids": torch.tensor([prep["ids"]], device=dev),
                  "text_mask": torch.tensor([prep["text_mask"]], device=dev),
                  "pixel_values_videos": frames[id(prep["sampled"])],
                  "answer_candidates": _joint(loaded, prep) if loaded.span_decoding == "joint" else None,
                  "box_frames": _shown(loaded, prep)} for prep in preps]
        if len(clips) == 1:
            c = clips[0]
            with cuda_oom_guard(model.config, loaded.quantization, n_frames, dev, model.dtype.itemsize):
                out = [model.ground(c["input_ids"], torch.ones_like(c["input_ids"]), c["pixel_values_videos"],
                                    c["text_mask"], max_new_tokens=24, answer_candidates=c["answer_candidates"],
                                    box_frames=c["box_frames"], refine_all=all_boxes)]
        else:
            try:
                out = model.ground_many(clips, max_new_tokens=24, refine_all=all_boxes)
            except torch.cuda.OutOfMemoryError:
                out = None  # retried below, once the failed try's tensors are freed with its traceback
    if out is None:
        del clips
        torch.cuda.empty_cache()
        print(f"stg: note: {len(preps)} clips at once do not fit in GPU memory; grounding them one at a time "
              "(a smaller --batch-size avoids the retry)", file=sys.stderr)
        return [r for prep in preps for r in run_models(loaded, [prep], all_boxes)]
    share = (time.perf_counter() - t0) / len(preps)
    return [(loaded.processor.decode(tokens), boxes.float().cpu().numpy(), presence.float().cpu().numpy(), share)
            for tokens, boxes, presence in out]


def _joint(loaded, prep: dict):
    """Joint span decoding's candidate answers for a clip, given its presence scores."""
    return lambda presence: loaded.processor.span_candidates(prep["sampled"].times_s, presence)


def _shown(loaded, prep: dict):
    """Which of a clip's sampled frames the answer's span shows, given the answer's tokens."""
    def in_span(tokens):
        frames = answer_frames(loaded, prep, loaded.processor.decode(tokens))
        return [frames is not None and frames[0] <= f <= frames[1] for f in prep["sampled"].indices]
    return in_span


def answer_frames(loaded, prep: dict, text: str) -> tuple[int, int] | None:
    """The span the answer text names, as (first, last) video frame; None when it names none."""
    sampled = prep["sampled"]
    duration = sampled.info.duration_s
    parsed = loaded.processor.parse_answer(text, duration)
    if parsed is None:
        return None
    lo, hi = loaded.processor.snap_answer(parsed[0], parsed[1], sampled.times_s, duration)
    return _span_frames(lo, hi, sampled)


def finish(loaded, prep: dict, video: str | os.PathLike, text: str, boxes: np.ndarray, scores: np.ndarray,
           timing: dict, warnings: list[str]) -> GroundingResult:
    """Answer text + per-frame boxes -> the stg.grounding/v1 result."""
    sampled = prep["sampled"]
    info = sampled.info
    times = sampled.times_s
    span = track = None
    frames = answer_frames(loaded, prep, text)
    if frames is not None:
        a, b = frames
        px = loaded.processor.boxes_to_pixels(boxes, info.width, info.height)
        inside = [(int(f), float(t), px[i].tolist(), float(scores[i]))
                  for i, (f, t) in enumerate(zip(sampled.indices, times)) if a <= f <= b]
        track = build_track((a, b), inside, info.fps, info.width, info.height, frame_times=sampled.frame_times)
        if track:
            span = Span.from_frames(a, b, info.fps, frame_times=sampled.frame_times)
    if span is None:
        track = []
        # joint decoding's empty answer is the model saying "not there", not a malformed one
        if text.strip() or loaded.span_decoding != "joint":
            warnings.append(f"no span: the model's answer {text!r} is not a valid span for this clip")
    t = {"decode": round(timing.get("decode", 0.0), 4), "model": round(timing.get("model", 0.0), 4)}
    t["total"] = round(timing.get("total", t["decode"] + t["model"]), 4)
    video_meta = VideoMeta(path=str(video), fps=info.fps, width=info.width, height=info.height,
                           num_frames=info.num_frames, duration_s=info.duration_s, rotation=info.rotation,
                           time_source=sampled.time_source)
    model_meta = ModelMeta(name=loaded.name, sha256=loaded.sha256, quantization=loaded.quantization,
                           device=loaded.device, dtype=loaded.dtype)
    sampling = Sampling(num_frames=len(sampled.indices), frame_indices=[int(i) for i in sampled.indices],
                        times_s=[float(x) for x in times])
    res = GroundingResult(video=video_meta, query=prep["query"], model=model_meta, sampling=sampling,
                          span=span, track=track, timing_s=t, warnings=warnings)
    res.extra["answer"] = text
    res.extra["span_decoding"] = loaded.span_decoding
    return res


def ground(video: str | os.PathLike, query: str, model=None, frames: int | None = None,
           start_s: float | None = None, end_s: float | None = None, device: str = "auto",
           quant: str | None = None, allow_pickle: bool = False, span_decoding: str = "joint",
           dtype: str = "auto") -> GroundingResult:
    """Ground `query` in `video`: when the described object is visible and its box on every frame.

    `model` is a `load_model()` result, a registry name or a model directory (default: the
    built-in model). Warnings (unknown words, truncated file) are in `result.warnings`.
    `device`, `quant`, `dtype`, `allow_pickle` and `span_decoding` apply only when `model` is not already
    loaded: a `load_model()` result keeps the settings it was loaded with (see `run_model`).
    """
    from .weights import LoadedModel, load_model

    t0 = time.perf_counter()
    query = check_query(query)
    check_frames(frames)
    # Cheap mistakes first, before a model load; a loaded model's clip is opened once, by the decode.
    check_video_path(video, start_s, end_s, open_it=not isinstance(model, LoadedModel))
    loaded = model if isinstance(model, LoadedModel) else load_model(model, device=device, quant=quant,
                                                                     allow_pickle=allow_pickle, frames=frames,
                                                                     span_decoding=span_decoding, dtype=dtype)
    prep = prepare(loaded, video, query, frames, start_s, end_s)
    return ground_prepared(loaded, prep, video, t0)


def ground_prepared(loaded, prep: dict, video: str | os.PathLike, t0: float | None = None) -> GroundingResult:
    """The model half of `ground` on a clip `prepare` (or, on frames a batch worker decoded,
    `prepare_sampled`) made ready."""
    return ground_prepared_many(loaded, [prep], [video], t0)[0]


def ground_prepared_many(loaded, preps: list[dict], videos: list, t0: float | None = None) -> list[GroundingResult]:
    """`ground_prepared` for several clips (stg batch): those with the same number of sampled frames share
    one prefill (`run_models`); results in the order given."""
    groups: dict[int, list[int]] = {}
    for i, prep in enumerate(preps):
        groups.setdefault(len(prep["sampled"].indices), []).append(i)
    out: list = [None] * len(preps)
    for group in groups.values():
        for i, (text, boxes, scores, model_s) in zip(group, run_models(loaded, [preps[i] for i in group])):
            timing = {"decode": preps[i]["decode_s"], "model": model_s}
            if t0 is not None:
                timing["total"] = time.perf_counter() - t0
            out[i] = finish(loaded, preps[i], videos[i], text, boxes, scores, timing, _warnings(loaded, preps[i]))
    return out


def _warnings(loaded, prep: dict) -> list[str]:
    """What a clip's result warns about before the model runs: unknown words, the decode's warnings, a
    prompt longer than the model's positions."""
    warnings: list[str] = []
    unknown = unknown_words(prep["query"], loaded.training_vocabulary)
    if unknown:
        warnings.append(vocabulary_warning(loaded.name, unknown))
    warnings.extend(prep["sampled"].warnings)
    limit = getattr(loaded.model.config.text_config, "max_position_embeddings", None)
    if limit and len(prep["ids"]) > limit:
        per_frame = len(prep["ids"]) / len(prep["sampled"].indices)  # the sentence's share included: a safe bound
        warnings.append(f"the prompt has {len(prep['ids'])} tokens, more than the {limit} positions model "
                        f"'{loaded.name}' was built for; its answer is unreliable: use fewer --frames "
                        f"(at most about {max(1, int(limit / per_frame))} here)")
    return warnings
