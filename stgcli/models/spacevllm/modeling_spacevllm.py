"""SpaceVLLM: LlavaOnevision + spatio-temporal aware queries + a query-guided space decoder.

Vision and language run entirely through transformers' LlavaOnevisionForConditionalGeneration
(SigLIP tower, projector, 2x2 pooling, Qwen2). What is added here:

* one query token per sampled frame, right after that frame's visual tokens in `input_ids`
  (the processor lays them out; transformers fills the video placeholders in order);
* the Query-Guided Space Decoder: per frame, the query's last-layer hidden state attends to that
  frame's visual features (the projector output before pooling, so the decoder sees the full
  patch grid), which first attend to the sentence's hidden states. A head predicts a normalised
  (cx, cy, w, h) box and a presence logit (is the described object in this frame?).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.utils import ModelOutput

from .configuration_spacevllm import SpaceVLLMConfig


def _cache_kwarg() -> str:
    """The name transformers' models take the KV cache by: `cache` since 5.24, `past_key_values`
    before (5.24 still takes the old one but warns on every call, to stderr; 5.40 drops it)."""
    import inspect

    from transformers import Qwen2Model

    return "cache" if "cache" in inspect.signature(Qwen2Model.forward).parameters else "past_key_values"


_CACHE = _cache_kwarg()


def _cache_of(out):
    """The KV cache a transformers output returns, under either name (see _cache_kwarg)."""
    return getattr(out, "cache", None) if _CACHE == "cache" else out.past_key_values


# Token counts are padded to a multiple of this where padding changes no result (a batch's prompts, the
# answer candidates' prefix tree): in bfloat16 on a CPU oneDNN compiles and keeps kernels for each matrix
# shape it meets, and one shape per length made a batch's memory grow by some 50 MB over its first 100 clips.
_PAD_TO = 8


def _cache_rows(cache, rows: list[int], config, length: int | None = None):
    """A copy of rows `rows` of a batch's KV cache, of their first `length` positions (default all: a
    clip's own length cuts the padding after its prompt)."""
    from transformers import DynamicCache

    return DynamicCache([(layer.keys[rows][:, :, :length], layer.values[rows][:, :, :length])
                         for layer in cache.layers], config=config)


def _ask(answer_candidates, presence: torch.Tensor):
    """What a clip's answer is chosen among (see `ground`): None for free text (no `answer_candidates`, or
    none given), [] when the clip is scored absent (the empty answer, no language model needed), else
    (candidate token lists, their prior log-scores)."""
    if answer_candidates is None:
        return None
    candidates, prior = answer_candidates(presence.float().cpu())
    if candidates == [[]]:
        return []
    return (candidates, prior) if candidates else None


def _best(candidates: list[list[int]], prior, lm: torch.Tensor) -> list[int]:
    """The candidate whose language-model log-likelihood plus prior is highest."""
    return list(candidates[int((lm.float().cpu() + torch.as_tensor(prior, dtype=torch.float32)).argmax())])


def _prefix_tree(candidates: list[list[int]]) -> tuple[list, list, list, list, list, list]:
    """Candidate answers as a prefix tree, for scoring them in one pass: a token per distinct prefix
    (all but each candidate's last token: token j predicts token j + 1), with its depth and its parent's
    place (-1 at the root), parents first; and, per predicted token, its candidate (owner), the tree
    token whose output predicts it (node) and the token predicted (target)."""
    node_of: dict[tuple, int] = {}
    ids, pos, parent, owner, node, target = [], [], [], [], [], []
    for i, c in enumerate(candidates):
        for j in range(len(c) - 1):
            key = tuple(c[:j + 1])
            if key not in node_of:
                node_of[key] = len(ids)
                ids.append(c[j])
                pos.append(j)
                parent.append(node_of[key[:-1]] if j else -1)
            owner.append(i)
            node.append(node_of[key])
            target.append(c[j + 1])
    return ids, pos, parent, owner, node, target


@dataclass
class SpaceVLLMOutput(ModelOutput):
    """Training/forward output. `boxes` are normalised cxcywh per sampled frame (B, F, 4)."""

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    box_loss: torch.Tensor | None = None
    presence_loss: torch.Tensor | None = None
    point_loss: torch.Tensor | None = None
    refine_loss: torch.Tensor | None = None
    verify_loss: torch.Tensor | None = None
    attr_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    presence_logits: torch.Tensor | None = None
    point_logits: torch.Tensor | None = None


class SpaceDecoder(nn.Module):
    """Query-Guided Space Decoder, built from torch's own transformer decoder layers.

    The box is found by pointing, not by free regression: after the query has attended to the
    (sentence-conditioned) patches, a last dot-product attention over the patch grid gives a
    soft-argmax centre, refined by a regressed offset of at most one patch, while width and
    height are regressed from the query and the pointed-at features. DETR-style free regression
    converges far too slowly for a model trained in an hour on a CPU; pointing turns "where" into
    a choice among patches, which trains fast. The same match scores tell whether the described
    object is in the frame at all, and feed the presence score.
    """

    def __init__(self, config: SpaceVLLMConfig):
        super().__init__()
        d_llm = config.text_config.hidden_size
        d = config.decoder_hidden_size
        grid = config.vision_config.image_size // config.vision_config.patch_size
        self.grid = grid
        # the share of the input the patches cover: 1 for 128/16, 378/384 for SigLIP/14 at 384 px
        self.cover = grid * config.vision_config.patch_size / config.vision_config.image_size
        self.window = config.point_window
        self.visual_proj = nn.Linear(d_llm, d)
        self.text_proj = nn.Linear(d_llm, d)
        self.query_proj = nn.Linear(d_llm, d)
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, d))

        def layer() -> nn.TransformerDecoderLayer:
            return nn.TransformerDecoderLayer(d, config.decoder_heads, dim_feedforward=4 * d, dropout=0.0,
                                              activation="gelu", batch_first=True, norm_first=True)

        self.text_condition = nn.ModuleList([layer() for _ in range(config.text_condition_layers)])
        self.query_layers = nn.ModuleList([layer() for _ in range(config.decoder_layers)])
        self.norm = nn.LayerNorm(d)
        self.point_q = nn.Linear(d, d)
        self.point_k = nn.Linear(d, d)
        self.box_head = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, 4))
        # Presence: the LLM query's own hidden state (it sees the motion across frames) plus the
        # best patch match of the decoder (it sees colour and shape in this frame).
        self.presence_head = nn.Sequential(nn.Linear(d_llm, d), nn.GELU(), nn.Linear(d, 1))
        self.match_scale = nn.Linear(1, 1)
        if config.motion_features:
            self.motion_in = nn.Linear(2 * d_llm, d)
            self.motion_conv = nn.Conv2d(d, d, 3, padding=1)
        if config.attr_classes:
            self.attr_head = nn.Linear(d, sum(config.attr_classes))
        if config.box_refiner is not None:
            self.refiner = BoxRefiner(config.box_refiner)
        if config.temporal_presence is not None:
            self.temporal = TemporalPresence(d_llm, d, config.temporal_presence)
        if config.box_verifier is not None:
            self.verifier = BoxVerifier(d_llm, config.box_verifier)

    def forward(self, query_h: torch.Tensor, visual: torch.Tensor, text_h: torch.Tensor,
                text_pad_mask: torch.Tensor | None, change: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """query_h (N, D), visual (N, P, D), text_h (N, L, D), change (N, P, D) (next minus previous
        frame's patches; with `motion_features`) -> boxes (N, 4) normalised cxcywh, presence logits
        (N,), pointing logits over the patch grid (N, P), patch features before the sentence (N, P, d),
        the decoder's query state (N, d)."""
        v = self.visual_proj(visual) + self.pos_embed.to(visual.dtype)
        if change is not None:
            m = F.gelu(self.motion_in(torch.cat([change, visual], -1)))
            m = self.motion_conv(m.transpose(1, 2).reshape(len(m), -1, self.grid, self.grid))
            v = v + m.flatten(2).transpose(1, 2)
        patch_features = v
        t = self.text_proj(text_h)
        for blk in self.text_condition:
            v = blk(v, t, memory_key_padding_mask=text_pad_mask)
        q = self.query_proj(query_h).unsqueeze(1)
        for blk in self.query_layers:
            q = blk(q, v)
        q = self.norm(q[:, 0])
        logits = torch.einsum("nd,npd->np", self.point_q(q), self.point_k(v)) / math.sqrt(q.shape[-1])
        attn = logits.softmax(-1)
        centre_attn = attn if self.training or self.window < 0 else _local_softmax(logits, self.grid, self.window)
        centre = centre_attn @ _patch_centres(self.grid, attn.device, attn.dtype, self.cover)
        pointed = torch.einsum("np,npd->nd", attn, v)
        out = self.box_head(torch.cat([q, pointed], -1))
        cxcy = (centre + torch.tanh(out[:, :2]) * self.cover / self.grid).clamp(0, 1)
        wh = out[:, 2:].sigmoid()
        presence = self.presence_head(query_h).squeeze(-1) + self.match_scale(
            logits.max(-1, keepdim=True).values).squeeze(-1)
        return torch.cat([cxcy, wh], -1), presence, logits, patch_features, q

    def relink(self, boxes: torch.Tensor, logits: torch.Tensor, weight: float, free: float,
               centre_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Boxes (T, 4) cxcywh of consecutive shown frames, their pointing scores (T, P) -> the boxes
        of one object followed through them (`link_track`). A frame whose linked patch lies outside
        the window its centre was taken from (`point_window`) is re-centred there by the same local
        soft-argmax, without the regressed offset, which was the other object's; its size stays
        (a box refiner then fits it). `centre_logits`: the pointing scores that soft-argmax reads
        when `logits` are others (a box verifier's adjusted ones); default `logits`."""
        radius = self.window if self.window >= 0 else 1
        path = link_track(logits, self.grid, weight, free)
        moved = _grid_distance(path, logits.argmax(-1), self.grid) > radius
        if not bool(moved.any()):
            return boxes
        centre_logits = logits if centre_logits is None else centre_logits
        attn = _local_softmax(centre_logits[moved].float(), self.grid, radius, path[moved, None])
        boxes = boxes.clone()
        boxes[moved, :2] = (attn @ _patch_centres(self.grid, attn.device, attn.dtype, self.cover)).to(boxes.dtype)
        return boxes


def _check_settings(part: str, spec: dict, known: tuple) -> None:
    """An optional part's settings (a config.json written by hand may misspell one)."""
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise ValueError(f"{part}: unknown setting {unknown[0]!r}; known: {', '.join(known)}")


class TemporalPresence(nn.Module):
    """Presence with the whole clip in view (config `temporal_presence`, an addition to the paper's
    model): the query tokens attend causally, so frame i's presence score sees frames 0..i only,
    and which of two look-alikes the sentence means, or whether the target has left, is often clear
    only from later frames. A small bidirectional transformer over the frames reads each frame's
    query state, the decoder's query state, its best patch match and its presence logit, and adds a
    correction to that logit. With the setting `track`, it also reads the decoder's box in each frame
    and how its centre moves between neighbouring frames: the trajectory of what the decoder points at,
    which says whether it moves as the sentence says (two look-alikes differ only in that). Added to a
    trained model (`stg train`'s init_from), its output layer starts at zero, so it changes nothing
    until trained."""

    SETTINGS = ("layers", "heads", "track")
    N_TRACK = 6  # the box (cx, cy, w, h) and its centre's motion (next minus previous frame)
    N_FREQ = 8  # sin / cos of the frame's relative position at 8 frequencies

    def __init__(self, d_llm: int, d: int, spec: dict):
        super().__init__()
        _check_settings("temporal_presence", spec, self.SETTINGS)
        self.track = bool(spec.get("track", False))
        n_in = d_llm + d + 2 + 2 * self.N_FREQ + (self.N_TRACK if self.track else 0)
        self.inp = nn.Sequential(nn.LayerNorm(n_in), nn.Linear(n_in, d))
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(d, int(spec.get("heads", 4)), 4 * d, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(int(spec.get("layers", 2)))])
        self.out = nn.Linear(d, 1)

    def forward(self, query_h: torch.Tensor, q: torch.Tensor, match: torch.Tensor, presence: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """(B, F, D), (B, F, d), (B, F), (B, F), boxes (B, F, 4) cxcywh (read with `track`) ->
        corrected presence logits (B, F)."""
        b, f = presence.shape
        rel = torch.linspace(0, 1, f, device=presence.device, dtype=q.dtype)
        freq = torch.arange(1, self.N_FREQ + 1, device=presence.device, dtype=q.dtype) * math.pi
        pos = torch.cat([torch.sin(rel[:, None] * freq), torch.cos(rel[:, None] * freq)], -1).expand(b, f, -1)
        parts = [query_h.to(q.dtype), q, match[..., None].to(q.dtype), presence[..., None].to(q.dtype), pos]
        if self.track:
            # detached: presence must not pull the boxes towards wherever its own loss is easiest
            box = boxes.detach().to(q.dtype)
            # the motion in tenths of the frame, the scale of the other inputs after the norm
            parts += [box, 10 * _temporal_change(box[..., None, :2])[..., 0, :]]
        x = self.inp(torch.cat(parts, -1))
        for layer in self.layers:
            x = layer(x)
        return presence + self.out(x).squeeze(-1).to(presence.dtype)


class _WindowLook(nn.Module):
    """What the box refiner and the box verifier share: a look at the model input through a window
    `context` times a box (at least `min_window` of the frame), resampled to `crop` x `crop`, and a
    small CNN (3x3 convolutions, the first at stride `first_stride` (default 1) and the rest at 2,
    GroupNorm, GELU). A first stride of 2 makes every layer's map a quarter the size: a quarter of the
    compute."""

    def __init__(self, part: str, spec: dict, known: tuple):
        super().__init__()
        _check_settings(part, spec, known)
        self.crop = int(spec.get("crop", 32))
        self.context = float(spec.get("context", 2.5))
        self.min_window = float(spec.get("min_window", 0.08))
        self.first_stride = int(spec.get("first_stride", 1))

    def trunk(self, chans: list[int]) -> tuple[nn.Sequential, int]:
        """The CNN for channel counts `chans` and the side of its output map."""
        layers: list[nn.Module] = []
        side = self.crop
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            stride = self.first_stride if i == 0 else 2
            layers += [nn.Conv2d(a, b, 3, stride=stride, padding=1), nn.GroupNorm(8, b), nn.GELU()]
            side = (side - 1) // stride + 1  # 3x3, padding 1
        return nn.Sequential(*layers), side

    def windows(self, boxes: torch.Tensor) -> torch.Tensor:
        """(N, 4) cxcywh -> the (N, 4) cxcywh windows it looks through."""
        wh = (boxes[:, 2:] * self.context).clamp(self.min_window, 1.0)
        return torch.cat([boxes[:, :2], wh], -1)


class BoxRefiner(_WindowLook):
    """A second look at the pixels around each box (config `box_refiner`, an addition to the paper's
    decoder): the space decoder points at 16-pixel patches, and an object a few pixels across is
    then boxed only roughly even when the right one is found. This crops the frame's model input
    around the box (a window `context` times the box, resampled to `crop` x `crop`), and a small
    CNN regresses the object's tight box in that window. Applied `steps` times at inference, each
    window centred on the last box. It sees no sentence: which object stays the decoder's choice;
    this only makes the box fit it.
    """

    SETTINGS = ("crop", "context", "min_window", "steps", "channels", "jitters", "first_stride")

    def __init__(self, spec: dict):
        super().__init__("box_refiner", spec, self.SETTINGS)
        self.jitters = int(spec.get("jitters", 2))
        self.steps = int(spec.get("steps", 2))
        chans = [3, *spec.get("channels", (32, 64, 96, 128))]
        self.features, side = self.trunk(chans)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, 256), nn.GELU(), nn.Linear(256, 4))

    def crops(self, pixels: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) frames, (N, 4) cxcywh windows -> (N, 3, crop, crop) (see crop_windows)."""
        return crop_windows(pixels, windows, self.crop)

    def forward(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """pixels (N, 3, S, S), boxes (N, 4) normalised cxcywh -> refined boxes (N, 4)."""
        win = self.windows(boxes.detach())
        out = self.head(self.features(self.crops(pixels, win))).to(win.dtype)
        cxcy = win[:, :2] + torch.tanh(out[:, :2]) * win[:, 2:] / 2
        wh = out[:, 2:].sigmoid() * win[:, 2:]
        return torch.cat([cxcy, wh], -1)

    def refine(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """`steps` passes, each window centred on the last pass's box."""
        for _ in range(self.steps):
            boxes = self(pixels, boxes)
        return boxes


def _window_grid(windows: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 4) normalised cxcywh windows -> (N, size, size, 2) float32, grid_sample's sampling points."""
    theta = torch.zeros(len(windows), 2, 3, dtype=torch.float32, device=windows.device)
    theta[:, 0, 0], theta[:, 1, 1] = windows[:, 2], windows[:, 3]
    theta[:, 0, 2], theta[:, 1, 2] = windows[:, 0] * 2 - 1, windows[:, 1] * 2 - 1
    return F.affine_grid(theta, [len(windows), 1, size, size], align_corners=False)


def crop_windows(pixels: torch.Tensor, windows: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, S, S) frames, (N, 4) normalised cxcywh windows -> (N, C, size, size), bilinear (the
    edge pixels repeat outside the frame)."""
    return _grid_sample(pixels.float(), _window_grid(windows, size)).to(pixels.dtype)


def _grid_sample(pixels: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling, border padding; callers sample in float32 whatever the model's dtype: in bfloat16
    on a CPU PyTorch's grid_sample runs 2-3x slower than converting to float32 and back (no vectorised
    kernel), and the windows' sample points keep their precision."""
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)


class BoxVerifier(_WindowLook):
    """A check of each candidate box against the sentence (config `box_verifier`, an addition to the
    paper's decoder). The space decoder reads 16-pixel patches that the vision tower has pooled
    with their surroundings; on the shapes world it tells colours apart but hardly shapes, so a
    red square in view makes it say "the red circle is here" (70% of such frames of a tuning set
    while the circle is absent) and box the square on a third of the frames where both are. This
    looks at the pixels: the window around a box (`context` times it, resampled to `crop` x
    `crop`) in the frame and in its two neighbouring sampled frames, so it also sees which way
    the object moves, through a small CNN, and scores whether what it holds is what the sentence
    (the language model's last states and input embeddings of its words, averaged) describes.

    At inference the pipeline asks it about the `candidates` best-pointed places of every frame:
    the pointing scores of each place gain `choose` times the log-probability it gives them, so a
    better-matching object can win the box, and each frame's presence logit gains `presence` times
    that of the place chosen, so a frame where no place matches is scored absent. Both are
    calibrations chosen on tuning clips, as `presence_bias` is. Trained from true boxes (jittered
    like the refiner's): the target's in its span are positives, every other object's and the
    target's empty place outside its span negatives, at most `max_crops` of them a step. Left to that
    loss alone it learns colour (one look) and not shape or motion, as the decoder did; `attributes`
    (class counts, "none" included, e.g. [5, 4, 6] for the shapes world's colour, shape and motion)
    adds a head that names each object crop's attributes, training only: a CNN taught shapes that
    way tells them apart within a few hundred steps."""

    SETTINGS = ("crop", "context", "min_window", "channels", "candidates", "choose", "presence", "max_crops",
                "attributes", "first_stride")

    def __init__(self, d_llm: int, spec: dict):
        super().__init__("box_verifier", spec, self.SETTINGS)
        self.candidates = int(spec.get("candidates", 3))
        self.choose = float(spec.get("choose", 0.0))
        self.presence = float(spec.get("presence", 0.0))
        self.max_crops = int(spec.get("max_crops", 192))
        chans = [9, *spec.get("channels", (24, 48, 64, 96))]  # three frames' RGB
        self.features, side = self.trunk(chans)
        d = 128
        self.visual = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1] * side * side, d), nn.GELU())
        self.text = nn.Sequential(nn.LayerNorm(2 * d_llm), nn.Linear(2 * d_llm, d))
        self.head = nn.Sequential(nn.Linear(3 * d, d), nn.GELU(), nn.Linear(d, 1))
        self.attributes = [int(k) for k in spec.get("attributes") or ()]
        if self.attributes:
            self.attr_head = nn.Linear(d, sum(self.attributes))

    def forward(self, pixels: torch.Tensor, clip: torch.Tensor, frame: torch.Tensor, boxes: torch.Tensor,
                sentence: torch.Tensor) -> torch.Tensor:
        """pixels (B, F, 3, S, S); clip, frame (N,) where each box is; boxes (N, 4) normalised cxcywh;
        sentence (N, 2 D) (the model's `_verifier_sentence`) -> (N,) logits that the box holds the
        described object."""
        return self.match(self.embed(pixels, clip, frame, boxes), sentence)

    def embed(self, pixels: torch.Tensor, clip: torch.Tensor, frame: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """What the windows hold (see forward): (N, d)."""
        win = self.windows(boxes.detach())
        last = pixels.shape[1] - 1
        views = [crop_windows(pixels[clip, (frame + k).clamp(0, last)], win, self.crop) for k in (-1, 0, 1)]
        return self.visual(self.features(torch.cat(views, 1)))

    def embed_places(self, frames: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One clip's frames (F, 3, S, S) and K places on each (F, K, 4) cxcywh -> (F * K, d), what
        `embed` gives for them, frame-major. Inference asks about every place of every frame: each
        frame is sampled through all its windows at once, where `embed` would first gather a copy of
        the frame for each window (three views of 48 places: 28 MB of copies a clip)."""
        f, k = boxes.shape[:2]
        grid = _window_grid(self.windows(boxes.detach().reshape(-1, 4)), self.crop)
        grid = grid.view(f, k * self.crop, self.crop, 2)  # each frame's windows stacked down the rows
        dtype, frames = frames.dtype, frames.float()  # sampled in float32 (see _grid_sample)
        here = _grid_sample(frames, grid)
        # Frame t - 1 through frame t's windows is frames[:-1] through grid[1:]: the grids move, not the
        # frames (a gathered copy of the frames cost more than the sampling); the first and last frames
        # have no neighbour on one side and take their own view (the index clamped, as in `embed`).
        before = torch.cat([here[:1], _grid_sample(frames[:-1], grid[1:])]) if f > 1 else here
        after = torch.cat([_grid_sample(frames[1:], grid[:-1]), here[-1:]]) if f > 1 else here
        views = [v.view(f, -1, k, self.crop, self.crop).transpose(1, 2).flatten(0, 1) for v in (before, here, after)]
        return self.visual(self.features(torch.cat(views, 1).to(dtype)))

    def match(self, v: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
        """Windows' embeddings (N, d), sentences (N, 2 D) -> (N,) match logits."""
        t = self.text(sentence.to(v.dtype))
        return self.head(torch.cat([v, t, v * t], -1)).squeeze(-1)


def _masked_mean(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) bool -> (B, D), the mean over the kept positions (zero where none is)."""
    k = keep.to(x.dtype)[..., None]
    return (x * k).sum(1) / k.sum(1).clamp(min=1)


def _peaks(logits: torch.Tensor, grid: int, k: int, radius: int) -> torch.Tensor:
    """(F, P) pointing scores -> (F, k) patches: the best, then the best outside `radius` of those
    taken (one object, about a patch or two across, leaves a few high patches)."""
    idx = torch.arange(grid * grid, device=logits.device)
    x = logits.float().clone()
    out = []
    for _ in range(k):
        best = x.argmax(-1)
        out.append(best)
        x = x.masked_fill(_grid_distance(idx[None], best[:, None], grid) <= radius, float("-inf"))
    return torch.stack(out, -1)


def jitter_boxes(gt_xyxy: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rough boxes around true ones (normalised xyxy -> cxcywh), as the space decoder's can be:
    the centre off by about a quarter of the size (a fifth of them by up to 0.6), the size off by a
    factor of about e^0.3. What the box refiner learns to correct."""
    n = len(gt_xyxy)
    cx, cy = (gt_xyxy[:, 0] + gt_xyxy[:, 2]) / 2, (gt_xyxy[:, 1] + gt_xyxy[:, 3]) / 2
    wh = (gt_xyxy[:, 2:] - gt_xyxy[:, :2]).clamp(min=1e-3)

    def rand(*shape):
        return torch.rand(*shape, generator=generator).to(gt_xyxy)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(gt_xyxy)

    off = randn(n, 2) * 0.25
    wide = rand(n, 1) < 0.2
    off = torch.where(wide, (rand(n, 2) * 2 - 1) * 0.6, off)
    centre = torch.stack([cx, cy], -1) + off * wh
    size = wh * torch.exp(randn(n, 2) * 0.3)
    return torch.cat([centre.clamp(0, 1), size.clamp(1e-3, 1)], -1)


def _temporal_change(patches: torch.Tensor) -> torch.Tensor:
    """(B, F, P, D) -> each frame's next minus previous frame's patches (the edge frames use
    themselves in place of the missing neighbour)."""
    prev = torch.cat([patches[:, :1], patches[:, :-1]], 1)
    nxt = torch.cat([patches[:, 1:], patches[:, -1:]], 1)
    return nxt - prev


def _patch_centres(grid: int, device, dtype, cover: float = 1.0) -> torch.Tensor:
    """Normalised (x, y) centres of the patch grid, row-major like the vision tower's tokens;
    `cover` is the share of the input the grid spans (patches that do not tile it leave a margin).
    Computed, not a buffer: a non-persistent buffer is not restored by from_pretrained's
    meta-device loading."""
    ys, xs = torch.meshgrid(torch.arange(grid, device=device), torch.arange(grid, device=device), indexing="ij")
    return torch.stack([(xs.flatten() + 0.5) / grid, (ys.flatten() + 0.5) / grid], -1).mul(cover).to(dtype)


def _grid_distance(a: torch.Tensor, b: torch.Tensor, grid: int) -> torch.Tensor:
    """Chebyshev distance, in patches, between row-major patch indices `a` and `b` (broadcast)."""
    return torch.maximum((a // grid - b // grid).abs(), (a % grid - b % grid).abs())


def _local_softmax(logits: torch.Tensor, grid: int, radius: int, best: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax of (N, grid*grid) row-major patch scores restricted to the (2r+1)^2 patches around
    each row's best patch (or the (N, 1) patches `best` names): a soft-argmax over it stays on one
    object (local soft-argmax)."""
    best = logits.argmax(-1, keepdim=True) if best is None else best
    near = _grid_distance(torch.arange(grid * grid, device=logits.device), best, grid) <= radius
    return logits.masked_fill(~near, float("-inf")).softmax(-1)


def link_track(logits: torch.Tensor, grid: int, weight: float, free: float) -> torch.Tensor:
    """Tube linking: (T, grid*grid) pointing scores of consecutive frames -> (T,) the patch each
    frame's object sits on, chosen jointly (Viterbi): the pointing log-probabilities summed, less
    `weight` per patch (Chebyshev distance) beyond `free` that the object moves from one frame to
    the next. Written out: 16 frames of 64 (or 729) patches is a few small max-plus products, and
    no dependency offers Viterbi over torch tensors."""
    logp = torch.log_softmax(logits.float(), -1)
    idx = torch.arange(grid * grid)
    dist = _grid_distance(idx[:, None], idx[None], grid).float()
    move = (-weight * (dist - free).clamp(min=0)).to(logp.device)  # (from, to)
    score, back = logp[0], []
    for t in range(1, len(logp)):
        best, arg = (score[:, None] + move).max(0)
        back.append(arg)
        score = best + logp[t]
    path = [int(score.argmax())]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return torch.tensor(path[::-1], device=logits.device)


def _centre_patch(xyxy: torch.Tensor, grid: int, cover: float = 1.0) -> torch.Tensor:
    """Row-major index of the patch holding each normalised xyxy box's centre (`cover` as in
    _patch_centres)."""
    cx = ((xyxy[:, 0] + xyxy[:, 2]) / 2 / cover * grid).long().clamp(0, grid - 1)
    cy = ((xyxy[:, 1] + xyxy[:, 3]) / 2 / cover * grid).long().clamp(0, grid - 1)
    return cy * grid + cx


def _cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def generalized_box_iou_loss(pred_xyxy: torch.Tensor, gt_xyxy: torch.Tensor) -> torch.Tensor:
    """1 - GIoU, elementwise (torchvision has it, but no CPU torchvision wheel exists for our torch)."""
    x1 = torch.max(pred_xyxy[:, 0], gt_xyxy[:, 0]); y1 = torch.max(pred_xyxy[:, 1], gt_xyxy[:, 1])
    x2 = torch.min(pred_xyxy[:, 2], gt_xyxy[:, 2]); y2 = torch.min(pred_xyxy[:, 3], gt_xyxy[:, 3])
    inter = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    area_p = (pred_xyxy[:, 2] - pred_xyxy[:, 0]).clamp(min=0) * (pred_xyxy[:, 3] - pred_xyxy[:, 1]).clamp(min=0)
    area_g = (gt_xyxy[:, 2] - gt_xyxy[:, 0]) * (gt_xyxy[:, 3] - gt_xyxy[:, 1])
    union = area_p + area_g - inter
    iou = inter / union.clamp(min=1e-7)
    cx1 = torch.min(pred_xyxy[:, 0], gt_xyxy[:, 0]); cy1 = torch.min(pred_xyxy[:, 1], gt_xyxy[:, 1])
    cx2 = torch.max(pred_xyxy[:, 2], gt_xyxy[:, 2]); cy2 = torch.max(pred_xyxy[:, 3], gt_xyxy[:, 3])
    hull = ((cx2 - cx1) * (cy2 - cy1)).clamp(min=1e-7)
    return 1 - (iou - (hull - union) / hull)


class SpaceVLLMForConditionalGeneration(LlavaOnevisionForConditionalGeneration):
    """LlavaOnevision with per-frame query tokens and a space decoder. Weight names stay those of
    LlavaOnevision (`model.vision_tower.*`, `model.language_model.*`, `lm_head`) plus `space_decoder.*`."""

    config_class = SpaceVLLMConfig
    config: SpaceVLLMConfig

    def __init__(self, config: SpaceVLLMConfig):
        super().__init__(config)
        self.space_decoder = SpaceDecoder(config)
        self.post_init()

    # -- vision --------------------------------------------------------------------------------
    def encode_video(self, pixel_values_videos: torch.Tensor):
        """Run the vision tower once; return transformers' video features (pooled, for the LLM) and
        the un-pooled projected patch features of every frame (B, F, P, D) for the space decoder."""
        b, f = pixel_values_videos.shape[:2]
        # transformers projects every patch and then pools; keep the projected patches on the
        # way past instead of running the projector a second time. Only this thread's: the model
        # may be running other clips in other threads at the same time (a library caller's threads).
        seen, me = [], threading.get_ident()

        def keep(_module, _inputs, out):
            if threading.get_ident() == me:
                seen.append(out)

        hook = self.model.multi_modal_projector.register_forward_hook(keep)
        try:
            out = self.model.get_video_features(pixel_values_videos, return_dict=True)
        finally:
            hook.remove()
        patches = seen[-1]
        return out, patches.view(b, f, patches.shape[1], patches.shape[2])

    # -- forward -------------------------------------------------------------------------------
    def ground_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       pixel_values_videos: torch.Tensor, text_mask: torch.Tensor,
                       labels: torch.Tensor | None = None, gt_boxes: torch.Tensor | None = None,
                       gt_in_span: torch.Tensor | None = None, decode_mask: torch.Tensor | None = None,
                       patch_labels: torch.Tensor | None = None, obj_boxes: torch.Tensor | None = None,
                       obj_visible: torch.Tensor | None = None, obj_target: torch.Tensor | None = None,
                       obj_attrs: torch.Tensor | None = None, use_cache: bool = False, box_losses: bool = True,
                       video_rows: torch.Tensor | None = None):
        """One pass over prompt (+ answer when training).

        input_ids/attention_mask (B, L); pixel_values_videos (B, F, 3, S, S); text_mask (B, L) marks the
        sentence's tokens; labels (B, L) with -100 outside the answer; gt_boxes (B, F, 4) normalised
        xyxy; gt_in_span (B, F) bool; decode_mask (B, F) bool: in-span frames that carry a box loss
        (default all); patch_labels (B, F, P, A) attribute classes per patch (`attr_classes`);
        obj_boxes (B, F, M, 4) normalised xyxy, obj_visible (B, F, M), obj_target (B, M) and obj_attrs
        (B, M, A) classes: every object of the clip, for a box verifier's loss (without them it has none);
        box_losses=False leaves out the box and refiner losses (a leg that trains presence alone).
        `video_rows` (B,) (inference): pixel_values_videos holds each distinct clip once and row i of the
        prompts reads clip video_rows[i] (several queries about one video run the vision tower once).
        Returns (SpaceVLLMOutput with boxes (B, F, 4) cxcywh and presence logits
        (B, F), past_key_values or None, last hidden states).
        """
        video_out, patches = self.encode_video(pixel_values_videos)
        if video_rows is not None:  # the language model reads only the pooled features (pooler_output)
            video_out = replace(video_out, pooler_output=video_out.pooler_output[video_rows])
            patches = patches[video_rows]
        mid = self.config.mid_presence_layer if labels is not None else 0
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         mm_encoder_outputs={"video": video_out}, use_cache=use_cache,
                         output_hidden_states=bool(mid))
        hidden = out.last_hidden_state
        b, f = patches.shape[:2]
        qmask = input_ids == self.config.query_token_index
        query_h = hidden[qmask].view(b, f, -1)
        text_h, text_pad = self._sentence_states(hidden, text_mask)
        change = _temporal_change(patches).flatten(0, 1) if self.config.motion_features else None
        boxes, presence, point_logits, patch_feats, dec_q = self.space_decoder(
            query_h.reshape(b * f, -1), patches.flatten(0, 1), text_h.repeat_interleave(f, 0),
            text_pad.repeat_interleave(f, 0), change)
        boxes, presence = boxes.view(b, f, 4), presence.view(b, f)
        if self.config.temporal_presence is not None:
            match = point_logits.max(-1).values.view(b, f)
            presence = self.space_decoder.temporal(query_h, dec_q.view(b, f, -1), match, presence, boxes)
        if decode_mask is None:
            decode_mask = torch.ones(b, f, dtype=torch.bool, device=hidden.device)

        result = SpaceVLLMOutput(boxes=boxes, presence_logits=presence, point_logits=point_logits.view(b, f, -1))
        if labels is not None:
            # Logits only where an answer token is predicted: the vocabulary projection over the whole
            # (mostly visual) sequence would dominate the step time for nothing.
            shift_labels = labels[:, 1:]
            sel = shift_labels != -100
            logits = self.lm_head(hidden[:, :-1][sel])
            lm_loss = F.cross_entropy(logits.float(), shift_labels[sel])
            pres_loss = F.binary_cross_entropy_with_logits(presence.float(), gt_in_span.float())
            box_sel = gt_in_span & decode_mask & box_losses
            if box_sel.any():
                pb = _cxcywh_to_xyxy(boxes[box_sel].float())
                gb = gt_boxes[box_sel].float()
                box_loss = self._box_loss(pb, gb)
            else:
                box_loss = boxes.sum() * 0.0
            result.lm_loss, result.box_loss, result.presence_loss = lm_loss, box_loss, pres_loss
            result.loss = (self.config.lm_weight * lm_loss + box_loss
                           + self.config.presence_weight * pres_loss)
            if self.config.point_weight and box_sel.any():
                target = _centre_patch(gt_boxes[box_sel].float(), self.space_decoder.grid, self.space_decoder.cover)
                result.point_loss = F.cross_entropy(point_logits.view(b, f, -1)[box_sel].float(), target)
                result.loss = result.loss + self.config.point_weight * result.point_loss
            if self.config.attr_weight and patch_labels is not None:
                result.attr_loss = self._attr_loss(patch_feats, patch_labels.flatten(0, 1))
                result.loss = result.loss + self.config.attr_weight * result.attr_loss
            if self.config.box_refiner is not None and box_losses and gt_in_span.any():
                result.refine_loss = self.refiner_loss(pixel_values_videos, gt_boxes, gt_in_span)
                result.loss = result.loss + result.refine_loss
            if self.config.box_verifier is not None and box_losses and obj_boxes is not None:
                result.verify_loss = self.verifier_loss(pixel_values_videos,
                                                        self._verifier_sentence(input_ids, hidden, text_mask),
                                                        obj_boxes, obj_visible, obj_target, gt_boxes, gt_in_span,
                                                        obj_attrs)
                result.loss = result.loss + result.verify_loss
            if mid:
                # hidden_states[0] is the embedding output, so index `mid` is the output of layer `mid`.
                mid_h = self.model.language_model.norm(out.hidden_states[mid][qmask])
                mid_logits = self.space_decoder.presence_head(mid_h).view(b, f)
                mid_loss = F.binary_cross_entropy_with_logits(mid_logits.float(), gt_in_span.float())
                result.loss = result.loss + self.config.mid_presence_weight * mid_loss
        return result, (_cache_of(out) if use_cache else None), hidden

    def refiner_loss(self, pixel_values_videos: torch.Tensor, gt_boxes: torch.Tensor, gt_in_span: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """The box refiner's loss (the space decoder's L1 + GIoU) on the frames inside the true span,
        each seen through `jitters` rough boxes drawn around the true one (jitter_boxes). Needs no
        language model: a training leg that teaches the refiner alone runs this only."""
        refiner = self.space_decoder.refiner
        sel = gt_in_span.flatten()
        pix = pixel_values_videos.flatten(0, 1)[sel].repeat(refiner.jitters, 1, 1, 1)
        gt = gt_boxes.flatten(0, 1)[sel].float().repeat(refiner.jitters, 1)
        pb = _cxcywh_to_xyxy(refiner(pix, jitter_boxes(gt, generator).to(pix.dtype)).float())
        return self._box_loss(pb, gt)

    def verifier_loss(self, pixel_values_videos: torch.Tensor, sentence: torch.Tensor, obj_boxes: torch.Tensor,
                      obj_visible: torch.Tensor, obj_target: torch.Tensor, gt_boxes: torch.Tensor,
                      gt_in_span: torch.Tensor, obj_attrs: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """The box verifier's BCE: the target in its span is what the sentence describes; every other
        visible object (look-alikes included) and the target's empty place outside its span are not.
        Each box is jittered as the space decoder's boxes err; at most `max_crops` crops a step. With
        the verifier's `attributes` and `obj_attrs` (B, M, A), plus the mean cross-entropy of naming
        each object crop's attributes."""
        verifier = self.space_decoder.verifier
        b_obj, f_obj, m_obj = torch.nonzero(obj_visible, as_tuple=True)
        b_out, f_out = torch.nonzero(~gt_in_span, as_tuple=True)
        clip = torch.cat([b_obj, b_out])
        frame = torch.cat([f_obj, f_out])
        xyxy = torch.cat([obj_boxes[b_obj, f_obj, m_obj], gt_boxes[b_out, f_out]]).float()
        label = torch.cat([obj_target[b_obj, m_obj], torch.zeros_like(b_out, dtype=torch.bool)]).float()
        attrs = None
        if verifier.attributes and obj_attrs is not None:  # the empty places name nothing (-100: ignored)
            attrs = torch.cat([obj_attrs[b_obj, m_obj], obj_attrs.new_full((len(b_out), obj_attrs.shape[-1]), -100)])
        if len(label) > verifier.max_crops:
            # The target and the objects of its colour first (what it must tell apart), then the rest at random.
            hard = obj_target[b_obj, m_obj]
            if obj_attrs is not None:  # one target per clip: its row of attributes, per clip
                hard = obj_attrs[b_obj, m_obj, 0] == obj_attrs[obj_target][b_obj, 0]
            hard = torch.cat([hard, torch.zeros_like(b_out, dtype=torch.bool)])
            order = torch.rand(len(label), generator=generator).to(label.device) + hard.float()
            keep = order.topk(verifier.max_crops).indices
            clip, frame, xyxy, label = clip[keep], frame[keep], xyxy[keep], label[keep]
            attrs = attrs[keep] if attrs is not None else None
        boxes = jitter_boxes(xyxy, generator).to(pixel_values_videos.dtype)
        v = verifier.embed(pixel_values_videos, clip, frame, boxes)
        loss = F.binary_cross_entropy_with_logits(verifier.match(v, sentence[clip]).float(), label)
        if attrs is not None:
            logits, start, losses = verifier.attr_head(v).float(), 0, []
            for a, k in enumerate(verifier.attributes):
                if (attrs[:, a] >= 0).any():
                    losses.append(F.cross_entropy(logits[:, start:start + k], attrs[:, a], ignore_index=-100))
                start += k
            loss = loss + torch.stack(losses).mean() if losses else loss
        return loss

    def _box_loss(self, pred_xyxy: torch.Tensor, gt_xyxy: torch.Tensor) -> torch.Tensor:
        """The boxes' loss, the space decoder's and the refiner's: weighted L1 + GIoU on xyxy."""
        return (self.config.box_l1_weight * F.l1_loss(pred_xyxy, gt_xyxy)
                + self.config.box_giou_weight * generalized_box_iou_loss(pred_xyxy, gt_xyxy).mean())

    def _attr_loss(self, patch_feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over attributes of the patch-wise cross-entropy; "none" (class 0) weighs 0.1, as
        most patches are background and objects cover only one or a few."""
        logits = self.space_decoder.attr_head(patch_feats).float().flatten(0, 1)
        labels = labels.flatten(0, 1)
        losses, start = [], 0
        for a, k in enumerate(self.config.attr_classes):
            weight = torch.ones(k, device=logits.device)
            weight[0] = 0.1
            losses.append(F.cross_entropy(logits[:, start:start + k], labels[:, a], weight=weight))
            start += k
        return torch.stack(losses).mean()

    def _verifier_sentence(self, input_ids: torch.Tensor, hidden: torch.Tensor,
                           text_mask: torch.Tensor) -> torch.Tensor:
        """What the box verifier reads of the sentence (B, 2D): the mean of its words' last hidden states
        and of their input embeddings. The embeddings name each word plainly; the last layer's states,
        shaped to predict the next token, carry its identity less directly."""
        words = self.model.language_model.embed_tokens(input_ids)
        return torch.cat([_masked_mean(hidden, text_mask), _masked_mean(words.to(hidden.dtype), text_mask)], -1)

    def verifier_loss_alone(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, text_mask: torch.Tensor,
                            pixel_values_videos: torch.Tensor, gt_boxes: torch.Tensor, gt_in_span: torch.Tensor,
                            obj_boxes: torch.Tensor, obj_visible: torch.Tensor, obj_target: torch.Tensor,
                            obj_attrs: torch.Tensor | None = None, **_unused) -> torch.Tensor:
        """The box verifier's loss without the rest of the model (a leg that trains it alone): the
        prompt puts the sentence before the frames and the language model attends causally, so the
        sentence's states come from the text before the first frame alone, without the vision tower
        and at a fraction of the cost."""
        n = int(text_mask.long().cumsum(1).argmax(1).max()) + 1  # through the longest sentence's last word
        with torch.no_grad():
            hidden = self.model.language_model(input_ids=input_ids[:, :n], attention_mask=attention_mask[:, :n],
                                               use_cache=False).last_hidden_state
            sentence = self._verifier_sentence(input_ids[:, :n], hidden, text_mask[:, :n])
        return self.verifier_loss(pixel_values_videos, sentence, obj_boxes, obj_visible, obj_target, gt_boxes,
                                  gt_in_span, obj_attrs)

    @staticmethod
    def _sentence_states(hidden: torch.Tensor, text_mask: torch.Tensor):
        """Gather each sample's sentence hidden states into a padded (B, Lmax, D) block + pad mask."""
        lens = text_mask.sum(1)
        lmax = max(int(lens.max()), 1)
        out = hidden.new_zeros(hidden.shape[0], lmax, hidden.shape[-1])
        pad = torch.ones(hidden.shape[0], lmax, dtype=torch.bool, device=hidden.device)
        for i in range(hidden.shape[0]):
            n = int(lens[i])
            if n:
                out[i, :n] = hidden[i][text_mask[i]]
                pad[i, :n] = False
            else:
                pad[i, 0] = False  # attend to a zero vector rather than to nothing (NaN)
        return out, pad

    @torch.no_grad()
    def ground(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
               text_mask: torch.Tensor, max_new_tokens: int = 16, eos_token_id: int | None = None,
               answer_candidates=None, box_frames=None, refine_all: bool = False):
        """Inference for one clip (batch 1): answer tokens + per-frame boxes and presence.

        The boxes for all sampled frames come from the same prefill; the pipeline keeps those inside
        the span the answer names. `box_frames` (a callable: answer tokens -> (F,) bools; None: all)
        marks the frames whose boxes are shown: tube linking (`link_weight`) follows one object
        through those, and a box refiner refines those only (`refine_all`: every frame's, for
        diagnostics; the shown boxes stay the same), as the refiner is a fifth of a clip's compute
        on a CPU and a box outside the span is never shown.

        Without `answer_candidates` the answer is free greedy text. Greedy decoding is written out
        (a dozen steps) because the prefill's hidden states are needed for the decoder and
        `generate()` would run the prefill a second time.

        With `answer_candidates`, a callable (presence (F,)) -> (list of answer token-id lists,
        prior log-scores (K,)), decoding is constrained to those answers: each gets the language
        model's log-likelihood plus its prior, and the best one is returned (all K are scored in one
        pass over the cached prompt, see `answer_log_likelihood`).
        """
        res, past, hidden = self.ground_forward(input_ids, attention_mask, pixel_values_videos, text_mask,
                                                use_cache=True)
        point, presence, boxes = self._scored(input_ids, pixel_values_videos, text_mask, res, hidden)
        tokens = self._answer(res, past, hidden, attention_mask, presence, max_new_tokens, eos_token_id,
                              answer_candidates)
        boxes = self._shown_boxes(tokens, boxes, point, res, pixel_values_videos, box_frames, refine_all)
        return tokens, boxes, presence

    @torch.no_grad()
    def ground_many(self, clips: list[dict], max_new_tokens: int = 16, eos_token_id: int | None = None,
                    refine_all: bool = False) -> list[tuple]:
        """`ground` for several clips with one prefill: what `ground` returns for each, in order.

        Each clip is a dict of `input_ids` (1, L), `pixel_values_videos` (1, F, 3, S, S), `text_mask`
        (1, L) and optionally `answer_candidates` and `box_frames` (see `ground`); all with the same F and S.
        The prompts are padded on the right, so every real token sees exactly what it sees alone (causal
        attention never reaches the padding after it) at the same position; what the pads compute is never
        read. The prefill is the larger half of a clip's compute, and a batch runs it more efficiently
        (bfloat16 on a CPU: a quarter less per clip at 4). The verifier, tube linking and the refiner then
        run clip by clip as in `ground`; constrained answers are scored for all clips in one pass over the
        batch's cache, each clip on its own rows and length (`answer_log_likelihoods`), free-text ones on
        each clip's cache cut to its length. Results equal `ground`'s up to float rounding (the matrix
        products see other shapes)."""
        if len({c["pixel_values_videos"].shape for c in clips}) > 1:
            raise ValueError("ground_many: the clips must have the same number of frames, of the same size")
        lens = [int(c["input_ids"].shape[1]) for c in clips]
        longest = -(-max(lens) // _PAD_TO) * _PAD_TO  # a few lengths, not one per batch
        ids = clips[0]["input_ids"].new_full((len(clips), longest), self.config.pad_token_id or 0)
        # No padding mask: causal attention never reaches from a real token to the pads after it, and
        # without a mask attention runs as plain causal (a quarter faster on a CPU than with one).
        mask = torch.ones_like(ids)
        tmask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        for i, (c, n) in enumerate(zip(clips, lens)):
            ids[i, :n], tmask[i, :n] = c["input_ids"][0], c["text_mask"][0]
        # Queries about the same frames (one video, several queries: the same tensor) share one pass of
        # the vision tower.
        distinct: list[torch.Tensor] = []
        video_rows = []
        for c in clips:
            same = [j for j, t in enumerate(distinct) if t is c["pixel_values_videos"]]
            if not same:
                distinct.append(c["pixel_values_videos"])
            video_rows.append(same[0] if same else len(distinct) - 1)
        rows_t = torch.tensor(video_rows, device=ids.device) if len(distinct) < len(clips) else None
        res, past, hidden = self.ground_forward(ids, mask, torch.cat(distinct), tmask, use_cache=True,
                                                video_rows=rows_t)
        pixels = [distinct[r] for r in video_rows]  # each clip's (1, F, 3, S, S), no copies
        rows = [SpaceVLLMOutput(boxes=res.boxes[i:i + 1], presence_logits=res.presence_logits[i:i + 1],
                                point_logits=res.point_logits[i:i + 1]) for i in range(len(clips))]
        scored = [self._scored(ids[i:i + 1, :n], pixels[i], tmask[i:i + 1, :n], rows[i], hidden[i:i + 1, :n])
                  for i, n in enumerate(lens)]
        # The answers: constrained ones scored for all clips in one pass over the batch's cache (see
        # answer_log_likelihoods), free text clip by clip on each clip's own cache.
        asked = [_ask(c.get("answer_candidates"), presence) for c, (_, presence, _) in zip(clips, scored)]
        tokens: list = [[] if a == [] else None for a in asked]
        order = [i for i, a in enumerate(asked) if a]  # those with candidates to score
        if order:
            last = hidden[order, [lens[i] - 1 for i in order]]
            lms = self.answer_log_likelihoods(past, [lens[i] for i in order], last, [asked[i][0] for i in order],
                                              rows=order)
            for i, lm in zip(order, lms):
                tokens[i] = _best(*asked[i], lm)
        for i, n in enumerate(lens):
            if tokens[i] is None:
                tokens[i] = self._answer(rows[i], _cache_rows(past, [i], self.config.text_config, n),
                                         hidden[i:i + 1, :n], mask[i:i + 1, :n], scored[i][1], max_new_tokens,
                                         eos_token_id, None)
        return [(tokens[i], self._shown_boxes(tokens[i], boxes, point, rows[i], pixels[i], c.get("box_frames"),
                                              refine_all), presence)
                for i, (c, (point, presence, boxes)) in enumerate(zip(clips, scored))]

    def _scored(self, input_ids, pixel_values_videos, text_mask, res, hidden):
        """One clip's (batch 1) pointing scores, presence (probabilities) and boxes after its prefill, the box
        verifier's say included (see `ground`)."""
        presence, boxes, point = res.presence_logits[0], res.boxes[0].clone(), res.point_logits[0]
        verifier = getattr(self.space_decoder, "verifier", None)
        if verifier is not None and (verifier.choose or verifier.presence):
            sentence = self._verifier_sentence(input_ids, hidden, text_mask)
            point, presence, boxes = self._verify(pixel_values_videos, sentence, point, presence, boxes)
        return point, torch.sigmoid(presence + self.config.presence_bias), boxes

    def _shown_boxes(self, tokens, boxes, point, res, pixel_values_videos, box_frames, refine_all):
        """One clip's boxes once its answer is known: tube linking through the frames the answer shows,
        then the refiner (see `ground`)."""
        shown = torch.ones(len(boxes), dtype=torch.bool) if box_frames is None else torch.as_tensor(
            box_frames(tokens), dtype=torch.bool)
        shown = shown.to(boxes.device)
        if self.config.link_weight > 0 and bool(shown.any()):
            boxes[shown] = self.space_decoder.relink(boxes[shown], point[shown], self.config.link_weight,
                                                     self.config.link_free, res.point_logits[0][shown])
        refine = torch.ones_like(shown) if refine_all else shown
        if self.config.box_refiner is not None and bool(refine.any()):
            boxes[refine] = self.space_decoder.refiner.refine(pixel_values_videos[0][refine], boxes[refine])
        return boxes

    def _verify(self, pixels: torch.Tensor, sentence: torch.Tensor, point: torch.Tensor, presence: torch.Tensor,
                boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The box verifier's say (see BoxVerifier), for one clip: pixels (1, F, 3, S, S), sentence
        (1, 2 D), pointing scores (F, P), presence logits (F,), boxes (F, 4) -> the pointing scores with
        each place's verdict (a log-probability) added `choose` times, the presence logits with the
        chosen place's added `presence` times, and the boxes, re-centred (size kept) on frames where
        another place wins."""
        dec = self.space_decoder
        ver, grid = dec.verifier, dec.grid
        radius = dec.window if dec.window >= 0 else 1
        f = len(point)
        peaks = _peaks(point, grid, ver.candidates, radius)  # (F, K), the decoder's own best first
        k = peaks.shape[1]
        centres = _patch_centres(grid, point.device, torch.float32, dec.cover)
        cand = boxes[:, None].repeat(1, k, 1)  # the decoder's box, and its size at the other places
        if k > 1:
            attn = _local_softmax(point.float().repeat_interleave(k - 1, 0), grid, radius, peaks[:, 1:].reshape(-1, 1))
            cand[:, 1:, :2] = (attn @ centres).view(f, k - 1, 2).to(cand.dtype)
        verdict = F.logsigmoid(ver.match(ver.embed_places(pixels[0], cand), sentence.expand(f * k, -1))
                               .float()).view(f, k)
        # Each patch takes the verdict of the candidate it lies near (the best-pointed one where two
        # are near), a patch near none the frame's worst: an unasked place is no better than a refused one.
        patches = torch.arange(grid * grid, device=point.device)
        near = _grid_distance(patches[None, None], peaks[..., None], grid) <= radius
        penalty = verdict.min(-1, keepdim=True).values.expand(f, grid * grid)
        for j in reversed(range(k)):
            penalty = torch.where(near[:, j], verdict[:, j:j + 1], penalty)
        # Less the frame's best verdict: the places it trusts most keep their scores exactly (a constant
        # per frame changes neither the frame's choice nor tube linking's, which normalises each frame).
        adjusted = point.float() + ver.choose * (penalty - penalty.max(-1, keepdim=True).values)
        best = adjusted.argmax(-1)
        moved = _grid_distance(best, point.argmax(-1), grid) > radius
        if bool(moved.any()):
            attn = _local_softmax(point[moved].float(), grid, radius, best[moved, None])
            boxes[moved, :2] = (attn @ centres).to(boxes.dtype)
        presence = presence + ver.presence * penalty.gather(-1, best[:, None])[:, 0].to(presence.dtype)
        return adjusted, presence, boxes

    def _answer(self, res, past, hidden, attention_mask, presence, max_new_tokens, eos_token_id,
                answer_candidates) -> list[int]:
        """The answer's tokens (see `ground`)."""
        asked = _ask(answer_candidates, presence)
        if asked == []:
            return []
        if asked:
            return _best(*asked, self.answer_log_likelihood(past, attention_mask, hidden[:, -1], asked[0]))
        eos = eos_token_id if eos_token_id is not None else self.config.text_config.eos_token_id
        next_tok = self.lm_head(hidden[:, -1]).argmax(-1)
        tokens = []
        mask = attention_mask
        for _ in range(max_new_tokens):
            tokens.append(int(next_tok))
            if eos is not None and int(next_tok) == eos:
                break
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            step = self.model.language_model(input_ids=next_tok.view(1, 1), attention_mask=mask,
                                             use_cache=True, **{_CACHE: past})
            past = _cache_of(step)
            next_tok = self.lm_head(step.last_hidden_state[:, -1]).argmax(-1)
        return tokens

    @torch.no_grad()
    def answer_log_likelihood(self, past, attention_mask: torch.Tensor, last_hidden: torch.Tensor,
                              candidates: list[list[int]]) -> torch.Tensor:
        """Sum of log-probabilities of each candidate answer after the prompt whose cache is `past`
        (batch 1; `last_hidden` (1, D) is the prompt's last hidden state). `past` is left as it was.
        See `answer_log_likelihoods`, which does this for several clips at once."""
        return self.answer_log_likelihoods(past, [attention_mask.shape[1]], last_hidden, [candidates])[0]

    @torch.no_grad()
    def answer_log_likelihoods(self, past, prompt_lens: list[int], last_hidden: torch.Tensor,
                               candidates: list[list[list[int]]], rows: list[int] | None = None) -> list[torch.Tensor]:
        """`answer_log_likelihood` for several clips in one pass: clip i's prompt is row `rows[i]` of the
        cache `past` (default: row i), its first `prompt_lens[i]` positions (the rest is padding, which
        nothing attends to); `last_hidden` (B, D) their prompts' last hidden states. `past` is left as it was.

        Each clip's candidates are scored as a prefix tree: the candidates share their first tokens ("from
        1 . 2 to ..." with two ends share five), so each distinct prefix is one token, attending to its
        clip's prompt and to its own earlier tokens only (a 4D mask; its position is its depth after the
        prompt), and its output scores every candidate that continues it. Each candidate gets exactly what
        teacher forcing it alone would give, from about half the tokens for the joint decoder's 8 answers.
        The prompt's cache is never copied for the candidates: batching K candidates the usual way would
        repeat it K times (~6 GB for a 64-frame 7B prompt), and on CPU the copies cost more than the
        scoring."""
        dev = last_hidden.device
        first = torch.log_softmax(self.lm_head(last_hidden).float(), -1)
        totals = [first[i, torch.tensor([c[0] for c in cands], device=dev)] for i, cands in enumerate(candidates)]
        trees = [_prefix_tree(cands) for cands in candidates]
        n = max(len(t[0]) for t in trees)
        if n == 0:
            return totals
        n += -n % _PAD_TO  # filler tokens, seen by none: a few lengths, not one per clip
        b, cached = len(candidates), past.get_seq_length()
        ids = torch.full((b, n), self.config.pad_token_id or 0, dtype=torch.long)
        pos = torch.zeros((b, n), dtype=torch.long)
        sees = torch.zeros((b, n, cached + n), dtype=torch.bool)
        sees[:, torch.arange(n), cached + torch.arange(n)] = True  # each token itself (all a filler sees of the rest)
        for i, (tree_ids, tree_pos, parent, _, _, _) in enumerate(trees):
            m = len(tree_ids)
            ids[i, :m], pos[i, :m] = torch.tensor(tree_ids, dtype=torch.long), torch.tensor(tree_pos, dtype=torch.long)
            sees[i, :, :prompt_lens[i]] = True  # the clip's prompt, not the padding after it
            for k, up in enumerate(parent):  # and a tree token its ancestors (parents come first)
                if up >= 0:
                    sees[i, k, cached:cached + m] |= sees[i, up, cached:cached + m]
        dtype = self.model.language_model.embed_tokens.weight.dtype
        dtype = dtype if dtype.is_floating_point else torch.float16  # quantized embeddings
        mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min).to(dev)
        rows = list(range(b)) if rows is None else list(rows)
        # A batch's prefill cache holds other rows too: the clips asked get a cache of their rows (a copy
        # of a few hundred kB), the batch's own is left alone.
        whole = rows == list(range(len(past.layers[0].keys)))
        cache = past if whole else _cache_rows(past, rows, self.config.text_config)
        out = self.model.language_model(input_ids=ids.to(dev), attention_mask=mask[:, None],
                                        position_ids=(torch.tensor(prompt_lens)[:, None] + pos).to(dev), use_cache=True,
                                        **{_CACHE: cache})
        if cache is past:
            past.crop(-n)  # back to the prompt alone
        logp = torch.log_softmax(self.lm_head(out.last_hidden_state).float(), -1)
        for i, (_, _, _, owner, node, target) in enumerate(trees):
            if owner:
                tok = logp[i, torch.tensor(node, device=dev), torch.tensor(target, device=dev)]
                totals[i] = totals[i].index_add(0, torch.tensor(owner, device=dev), tok)
        return totals
