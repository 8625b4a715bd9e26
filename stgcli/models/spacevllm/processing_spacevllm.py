"""SpaceVLLM processor: frames + sentence -> model inputs, answer text -> span, boxes -> pixels.

Written by hand rather than on transformers' LlavaOnevisionProcessor because that processor's
video path needs torchvision, which has no CPU wheel for the torch we pin, and because the
prompt here interleaves timestamps, visual placeholders and query tokens per frame:

    <prefix> <sentence> <intro> [t_0 <video>*T <query>] ... [t_{F-1} <video>*T <query>] <video> <suffix>

(the last <video> is LlavaOnevision's image_newline feature, which transformers appends after
the frames). Frames are resized to the vision tower's square input without padding; boxes map
back by scaling x by width and y by height, which inverts that resize exactly.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

PROCESSOR_FILE = "processor_config.json"


@dataclass
class ProcessorSettings:
    image_size: int = 160
    patch_size: int = 16
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    time_decimals: int = 1
    video_token: str = "<video>"
    query_token: str = "<stq>"
    prefix: str = "find :"
    intro: str = ""
    suffix: str = "answer :"
    answer_template: str = "from {start} to {end} seconds"
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_frame(self) -> int:
        g = math.ceil(self.image_size // self.patch_size / 2)
        return g * g


_ANSWER_NUM = r"([0-9]+(?:\.[0-9]+)?)"  # ASCII digits only: \d would take "١.٠" too


def _join_numbers(text: str) -> str:
    """'1 . 2' -> '1.2', '1 0' -> '10', runs of spaces -> one."""
    norm = re.sub(r"\s*\.\s*(?=[0-9])", ".", text.strip())
    norm = re.sub(r"(?<=[0-9]) (?=[0-9.])", "", norm)
    return re.sub(r"\s+", " ", norm)


class SpaceVLLMProcessor:
    """Turns (frames, times, sentence) into tensors and the model's answer back into a span."""

    def __init__(self, tokenizer, settings: ProcessorSettings):
        self.tokenizer = tokenizer
        self.settings = settings
        self.video_token_id = tokenizer.convert_tokens_to_ids(settings.video_token)
        self.query_token_id = tokenizer.convert_tokens_to_ids(settings.query_token)
        pattern = re.escape(settings.answer_template)
        pattern = pattern.replace(r"\{start\}", _ANSWER_NUM).replace(r"\{end\}", _ANSWER_NUM)
        self._answer_re = re.compile(pattern)

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / PROCESSOR_FILE).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "SpaceVLLMProcessor":
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        path = directory / PROCESSOR_FILE
        try:
            settings = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: cannot read it ({e})") from None
        known = {f.name for f in fields(ProcessorSettings)}
        if not isinstance(settings, dict):
            raise ValueError(f"{path}: must be a JSON object of processor settings")
        settings = dict(settings)
        # keys a newer stg wrote go to `extra` (forward compatible), as the field is meant for
        settings["extra"] = {**(settings.get("extra") or {}), **{k: settings.pop(k) for k in set(settings) - known}}
        for k in ("image_mean", "image_std"):
            if k in settings:
                settings[k] = tuple(settings[k])
        tok = PreTrainedTokenizerFast.from_pretrained(str(directory))
        return cls(tok, ProcessorSettings(**settings))

    # -- frames --------------------------------------------------------------------------------
    def preprocess_frames(self, frames: np.ndarray) -> np.ndarray:
        """(F, H, W, 3) uint8 RGB -> (F, 3, S, S) float32 normalised. Resizes only if needed."""
        import cv2

        s = self.settings.image_size
        if frames.shape[1:3] != (s, s):
            frames = np.stack([cv2.resize(f, (s, s), interpolation=cv2.INTER_AREA) for f in frames])
        # Normalised through a 256-entry table per channel: the same float32 arithmetic as
        # (x / 255 - mean) / std on every pixel, done once per possible value (6x faster), looked
        # up by OpenCV a plane at a time (2.5x faster than numpy's fancy indexing: this runs in
        # stg batch's one serial process).
        mean = np.asarray(self.settings.image_mean, np.float32)
        std = np.asarray(self.settings.image_std, np.float32)
        lut = np.ascontiguousarray(((np.arange(256, dtype=np.float32)[:, None] * np.float32(1.0 / 255.0)
                                     - mean) / std).T)  # (3, 256): row c is channel c's table
        n, h, w, channels = frames.shape
        out = np.empty((n, channels, h, w), np.float32)
        for c in range(channels if n else 0):  # OpenCV refuses an empty image
            plane = np.ascontiguousarray(frames[..., c]).reshape(n * h, w)
            out[:, c] = cv2.LUT(plane, lut[c:c + 1]).reshape(n, h, w)
        return out

    # -- text ----------------------------------------------------------------------------------
    def format_time(self, t: float) -> str:
        return f"{t:.{self.settings.time_decimals}f}"

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def encode_prompt(self, query: str, times_s) -> tuple[list[int], list[bool]]:
        """Token ids of the prompt and a mask marking the sentence's tokens (for the space decoder)."""
        s = self.settings
        ids = self._ids(s.prefix)
        sent = self._ids(query)
        text_mask = [False] * len(ids) + [True] * len(sent)
        ids = ids + sent
        ids += self._ids(s.intro)
        block = [self.video_token_id] * s.tokens_per_frame + [self.query_token_id]
        for t in times_s:
            ids += self._ids(self.format_time(float(t))) + block
        ids += [self.video_token_id]
        ids += self._ids(s.suffix)
        text_mask += [False] * (len(ids) - len(text_mask))
        return ids, text_mask

    def encode_answer(self, start_s: float, end_s: float) -> list[int]:
        text = self.settings.answer_template.format(start=self.format_time(start_s), end=self.format_time(end_s))
        eos = self.tokenizer.eos_token_id
        return self._ids(text) + ([eos] if eos is not None else [])

    def span_candidates(self, times_s, presence, k: int = 8) -> tuple[list[list[int]], np.ndarray]:
        """The `k` answers (first, last sampled frame) most likely under the per-frame presence
        scores, as answer token ids, with their presence log-likelihood as a prior.

        A span (i, j) says frames i..j show the object and the others do not; with independent
        per-frame scores p its log-likelihood is sum(log p) inside + sum(log(1 - p)) outside, which
        prefix sums give for all F^2 / 2 spans at once. Answers that format to the same text (frames
        closer together than the printed precision) are kept once, with their best prior.

        When "in no frame" (sum(log(1 - p))) is likelier than every span, the object is absent and
        the only answer is the empty one, `[[]]`: the result's span is null ("not there").
        """
        p = np.clip(np.asarray(presence, dtype=np.float64), 1e-4, 1 - 1e-4)
        cin = np.concatenate([[0.0], np.cumsum(np.log(p))])
        cout = np.concatenate([[0.0], np.cumsum(np.log1p(-p))])
        i, j = np.triu_indices(len(p))
        score = cout[-1] - (cout[j + 1] - cout[i]) + (cin[j + 1] - cin[i])
        if len(score) == 0 or cout[-1] > score.max():
            return [[]], np.asarray([cout[-1]], dtype=np.float64)
        ids, prior, seen = [], [], set()
        for n in np.argsort(-score, kind="stable"):
            text = (self.format_time(float(times_s[i[n]])), self.format_time(float(times_s[j[n]])))
            if text in seen:
                continue
            seen.add(text)
            ids.append(self.encode_answer(float(text[0]), float(text[1])))
            prior.append(score[n])
            if len(ids) == k:
                break
        return ids, np.asarray(prior, dtype=np.float64)

    def decode(self, ids: list[int]) -> str:
        """Answer text as a person writes it: a word tokenizer spells numbers one digit per token
        ("from 1 . 2 to 4 . 8 seconds"), so digits and points are joined again."""
        return _join_numbers(self.tokenizer.decode(ids, skip_special_tokens=True))

    def parse_answer(self, text: str, duration_s: float) -> tuple[float, float] | None:
        """Strict: the whole answer must match the template; start <= end, both inside the clip
        (a little slack for rounding). Anything else is no span, never an exception."""
        m = self._answer_re.fullmatch(_join_numbers(text))
        if not m:
            return None
        try:
            start, end = float(m.group(1)), float(m.group(2))
        except ValueError:
            return None
        slack = 10 ** -self.settings.time_decimals
        if not (0 <= start <= end <= duration_s + slack):
            return None
        return start, min(end, duration_s)

    # -- span and boxes ------------------------------------------------------------------------
    @staticmethod
    def snap_span(start_s: float, end_s: float, times_s, duration_s: float) -> tuple[float, float]:
        """The model names the first and last sampled frames where the object is seen. The true
        boundary lies between that frame and its outside neighbour; the midpoint halves the expected
        error. Returns the span in seconds."""
        times = np.asarray(times_s, dtype=np.float64)
        i = int(np.abs(times - start_s).argmin())
        j = int(np.abs(times - end_s).argmin())
        return SpaceVLLMProcessor._frames_span(min(i, j), max(i, j), times, duration_s)

    def snap_answer(self, start_s: float, end_s: float, times_s, duration_s: float) -> tuple[float, float]:
        """snap_span for an answer the model wrote. Above 10 sampled frames a second (at one
        decimal), several frames print as the same time and the answer names all of them: the
        span runs from the first frame printed as its start to the last printed as its end (the
        nearest frame would drop the others)."""
        printed = [self.format_time(float(t)) for t in times_s]
        a, b = self.format_time(start_s), self.format_time(end_s)
        if a in printed and b in printed:
            i, j = printed.index(a), len(printed) - 1 - printed[::-1].index(b)
            if i <= j:
                return self._frames_span(i, j, np.asarray(times_s, dtype=np.float64), duration_s)
        return self.snap_span(start_s, end_s, times_s, duration_s)

    @staticmethod
    def _frames_span(i: int, j: int, times: np.ndarray, duration_s: float) -> tuple[float, float]:
        lo = 0.0 if i == 0 else (times[i - 1] + times[i]) / 2
        hi = duration_s if j == len(times) - 1 else (times[j] + times[j + 1]) / 2
        return float(lo), float(hi)

    @staticmethod
    def boxes_to_pixels(cxcywh: np.ndarray, width: int, height: int) -> np.ndarray:
        """Normalised (cx, cy, w, h) on the square model input -> xyxy pixels of the original frame."""
        b = np.asarray(cxcywh, dtype=np.float64).reshape(-1, 4)
        x1 = (b[:, 0] - b[:, 2] / 2) * width
        x2 = (b[:, 0] + b[:, 2] / 2) * width
        y1 = (b[:, 1] - b[:, 3] / 2) * height
        y2 = (b[:, 1] + b[:, 3] / 2) * height
        return np.stack([x1, y1, x2, y2], 1)


SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>", "<image>", "<video>", "<stq>"]
PROMPT_WORDS = ["find", "answer", "from", "to", "seconds", ":", ".", *"0123456789"]


def build_word_tokenizer(words: list[str]):
    """A word-level tokenizer for a closed-vocabulary model (the built-in shapes model).

    Digits are single tokens so any timestamp can be written; any other word outside `words`
    becomes <unk> (the pipeline warns about such words before the model sees them).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in [*PROMPT_WORDS, *sorted(set(words))]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(), pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                   additional_special_tokens=["<image>", "<video>", "<stq>"])
