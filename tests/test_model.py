"""SpaceVLLM model code: layout of inputs, forward/backward, inference, save/load, full-size shapes."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch

from stgcli.models.spacevllm import SpaceVLLMConfig, SpaceVLLMForConditionalGeneration, SpaceVLLMProcessor
from stgcli.models.spacevllm.configuration_spacevllm import spacevllm_7b_config
from stgcli.models.spacevllm.processing_spacevllm import ProcessorSettings
from stgcli.train import TrainConfig, make_batch, new_tiny_model

SMALL = {"vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
         "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 1},
         "decoder_hidden_size": 32, "decoder_heads": 2, "decoder_layers": 1}


def small_cfg(**kw) -> TrainConfig:
    base = dict(batch_size=2, num_frames=6, min_frames=4, max_frames=6, steps=4, data_workers=0,
                native_fraction=0.5, model=SMALL, checkpoint_every=2, log_every=1, warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return new_tiny_model(small_cfg(), seed=0)


def prompt_inputs(proc, step: int):
    """The first clip of training batch `step`, prompt only: (input_ids, attention_mask, pixels,
    text_mask) for `model.ground`, and the prompt length."""
    batch = make_batch(small_cfg(), proc, step=step)
    n_prompt = int((batch["labels"][0] == -100).sum())  # prompt tokens lead, answer follows
    ids = batch["input_ids"][:1, :n_prompt]
    return (ids, torch.ones_like(ids), batch["pixel_values_videos"][:1], batch["text_mask"][:1, :n_prompt]), n_prompt


def test_prompt_interleaves_frames_and_queries(small):
    _, proc = small
    times = [0.0, 0.5, 1.0]
    ids, text_mask = proc.encode_prompt("the red circle", times)
    t = proc.settings.tokens_per_frame
    assert t == 4  # 64 px / 16 = 4x4 patches, pooled 2x2 -> 2x2
    q_pos = [i for i, x in enumerate(ids) if x == proc.query_token_id]
    assert len(q_pos) == len(times)
    for p in q_pos:  # each query follows exactly T visual placeholders
        assert ids[p - t:p] == [proc.video_token_id] * t
    # one extra placeholder for LlavaOnevision's image_newline, after the last frame
    assert ids.count(proc.video_token_id) == len(times) * t + 1
    sentence = [tok for tok, m in zip(ids, text_mask) if m]
    assert proc.tokenizer.decode(sentence) == "the red circle"


def test_encode_video_patches_are_the_projected_selected_layer(small):
    """The space decoder's patches are the projector's output on the configured vision layer
    (caught on transformers' own pass), one row per frame."""
    model, proc = small
    model.eval()
    (_, _, pix, _), _ = prompt_inputs(proc, step=0)
    with torch.no_grad():
        out, patches = model.encode_video(pix)
        hs = model.model.vision_tower(pix.flatten(0, 1), output_hidden_states=True).hidden_states
        want = model.model.multi_modal_projector(hs[model.config.vision_feature_layer])
    assert patches.shape == (1, pix.shape[1]) + want.shape[1:]
    torch.testing.assert_close(patches[0], want)
    assert out.pooler_output.shape[0] == 1


def test_encode_video_in_concurrent_threads_keeps_each_clips_patches(small):
    """Two threads encoding different clips at once must each get their own patches back."""
    from concurrent.futures import ThreadPoolExecutor

    model, proc = small
    model.eval()
    clips = [prompt_inputs(proc, step=s)[0][2] for s in range(4)]
    with torch.no_grad():
        want = [model.encode_video(c)[1] for c in clips]

        def run(i):
            return [model.encode_video(clips[i])[1] for _ in range(10)]

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(run, range(4)))
    for i in range(4):
        for g in got[i]:
            torch.testing.assert_close(g, want[i])


def test_forward_backward_and_losses(small):
    model, proc = small
    batch = make_batch(small_cfg(), proc, step=0)
    model.train()
    out, _, _ = model.ground_forward(**batch)
    for name in ("loss", "lm_loss", "box_loss", "presence_loss"):
        assert torch.isfinite(getattr(out, name)), name
    out.loss.backward()
    assert model.space_decoder.box_head[0].weight.grad is not None
    patch = next(p for n, p in model.named_parameters() if n.endswith("patch_embedding.weight"))
    assert patch.grad is not None and bool(patch.grad.abs().sum() > 0)
    b, f = batch["gt_in_span"].shape
    assert out.boxes.shape == (b, f, 4) and out.presence_logits.shape == (b, f)
    model.zero_grad()


def test_ground_inference_and_roundtrip(small, tmp_path):
    model, proc = small
    model.eval()
    args, _ = prompt_inputs(proc, step=1)
    tokens, boxes, presence = model.ground(*args, max_new_tokens=5)
    assert 1 <= len(tokens) <= 5
    assert boxes.shape == (args[2].shape[1], 4) and bool(((boxes >= 0) & (boxes <= 1)).all())
    assert bool(((presence >= 0) & (presence <= 1)).all())

    model.save_pretrained(tmp_path, safe_serialization=True)
    proc.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin"))
    model2 = SpaceVLLMForConditionalGeneration.from_pretrained(tmp_path, use_safetensors=True).eval()
    proc2 = SpaceVLLMProcessor.from_pretrained(tmp_path)
    assert proc2.encode_prompt("the red circle", [0.0, 1.0]) == proc.encode_prompt("the red circle", [0.0, 1.0])
    tokens2, boxes2, presence2 = model2.ground(*args, max_new_tokens=5)
    assert tokens2 == tokens
    torch.testing.assert_close(boxes2, boxes)
    torch.testing.assert_close(presence2, presence)
    assert isinstance(model2.config, SpaceVLLMConfig) and model2.config.training_vocabulary


def test_full_size_config_has_llava_video_7b_shapes():
    cfg = spacevllm_7b_config()
    with torch.device("meta"):
        model = SpaceVLLMForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 7.5e9 < n < 8.5e9  # Qwen2-7B (7.6B) + SigLIP so400m (0.4B) + projector + decoder
    vc = cfg.vision_config
    assert (vc.image_size, vc.patch_size, vc.hidden_size, vc.num_hidden_layers) == (384, 14, 1152, 26)
    assert cfg.text_config.hidden_size == 3584 and cfg.text_config.num_hidden_layers == 28
    # 27x27 patches pooled 2x2 (ceil) -> 14x14 tokens per frame reach the LLM
    pooled = model.model.apply_pooling(torch.zeros(1, 27 * 27, 4))
    assert pooled.shape[1] == 14 * 14 == ProcessorSettings(image_size=384, patch_size=14).tokens_per_frame
    assert model.space_decoder.visual_proj.in_features == 3584


@pytest.mark.parametrize("text,expected", [
    ("from 2 . 3 to 6 . 4 seconds", (2.3, 6.4)),
    ("from 2.3 to 6.4 seconds", (2.3, 6.4)),
    ("from 0 . 0 to 1 0 . 0 seconds", (0.0, 10.0)),
    ("from 6.4 to 2.3 seconds", None),          # reversed
    ("from 2.3 to 99.0 seconds", None),         # past the end of the clip
    ("from 2.3 to seconds", None),              # truncated
    ("from 2 . 3 to 6 . 4 seconds extra", None),
    ("", None),
    ("<unk> <unk>", None),
    ("from \u0661.\u0660 to 2.0 seconds", None),  # Arabic-Indic digits: not the template's
])
def test_parse_answer_is_strict(small, text, expected):
    _, proc = small
    assert proc.parse_answer(text, duration_s=10.0) == (pytest.approx(expected) if expected else None)


def test_decoded_answers_read_as_written(small):
    """The word tokenizer spells numbers digit by digit; the answer results carry reads "1.2"."""
    _, proc = small
    assert proc.decode(proc.encode_answer(1.2, 10.8)[:-1]) == "from 1.2 to 10.8 seconds"


def test_the_7b_prompt_does_not_teach_an_answer_the_parser_refuses():
    from stgcli.convert import PROMPT_7B

    asked = PROMPT_7B["suffix"].split("from A to B seconds", 1)[1]
    assert not asked.startswith(".")  # a model copying "seconds." would never parse


def test_snap_span_extends_halfway_to_outside_neighbours():
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    assert SpaceVLLMProcessor.snap_span(1.0, 3.0, times, 4.5) == (0.5, 3.5)
    assert SpaceVLLMProcessor.snap_span(0.0, 4.0, times, 4.5) == (0.0, 4.5)   # clip ends stay ends
    assert SpaceVLLMProcessor.snap_span(1.1, 2.9, times, 4.5) == (0.5, 3.5)   # snapped to sampled frames


def test_an_answer_names_every_frame_printed_as_its_times():
    """20 sampled frames a second print two to a time at one decimal ("0.1" is 0.05, 0.10 and
    0.15): "from 0.1 to 0.2" covers the first frame printed 0.1 to the last printed 0.2, not
    the nearest frames to 0.1 and 0.2, which dropped a frame at each end."""
    from stgcli.models.spacevllm.processing_spacevllm import build_word_tokenizer

    proc = SpaceVLLMProcessor(build_word_tokenizer(["red"]), ProcessorSettings())
    times = np.arange(20) / 20
    assert [proc.format_time(t) for t in times[:6]] == ["0.0", "0.1", "0.1", "0.1", "0.2", "0.2"]
    lo, hi = proc.snap_answer(0.1, 0.2, times, 1.0)
    assert (lo, hi) == pytest.approx((0.025, 0.275))
    assert SpaceVLLMProcessor.snap_span(0.1, 0.2, times, 1.0) == pytest.approx((0.075, 0.225))
    # an answer between printed times (free text) snaps to the nearest frames, as before
    assert proc.snap_answer(1.1, 2.9, [0.0, 1.0, 2.0, 3.0, 4.0], 4.5) == (0.5, 3.5)


@pytest.mark.parametrize("size", [32, 48])
def test_preprocess_frames_normalises_exactly(size):
    """The table lookup gives the per-pixel formula's float32 values bit for bit (SigLIP's and
    CLIP's statistics), channels first, resizing only frames that are not already square."""
    from dataclasses import replace

    from stgcli.models.spacevllm.processing_spacevllm import build_word_tokenizer

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    proc = SpaceVLLMProcessor(build_word_tokenizer(["red"]),
                              replace(ProcessorSettings(), image_size=32, image_mean=mean, image_std=std))
    frames = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    square = frames if size == 32 else np.stack([cv2.resize(f, (32, 32), interpolation=cv2.INTER_AREA)
                                                 for f in frames])
    expected = ((square.astype(np.float32) * (1.0 / 255.0) - np.asarray(mean, np.float32))
                / np.asarray(std, np.float32)).transpose(0, 3, 1, 2)
    out = proc.preprocess_frames(frames)
    assert out.dtype == np.float32 and out.shape == (3, 3, 32, 32) and out.flags.c_contiguous
    assert np.array_equal(out, expected)


def test_boxes_map_back_through_the_resize():
    # a box at pixels (64, 36)-(128, 108) in a 640x360 frame, seen in the square model input
    w, h = 640, 360
    cxcywh = np.array([[96 / w, 72 / h, 64 / w, 72 / h]])
    np.testing.assert_allclose(SpaceVLLMProcessor.boxes_to_pixels(cxcywh, w, h), [[64, 36, 128, 108]])


def test_span_candidates_rank_spans_by_presence_likelihood(small):
    _, proc = small
    times = [0.0, 0.5, 1.0, 1.5, 2.0]
    presence = np.array([0.1, 0.9, 0.8, 0.3, 0.05])
    ids, prior = proc.span_candidates(times, presence, k=3)
    texts = [proc.decode(c) for c in ids]
    assert len(ids) == 3 and list(prior) == sorted(prior, reverse=True)

    def loglik(i, j):  # computed directly, frame by frame
        return sum(np.log(p) if i <= n <= j else np.log(1 - p) for n, p in enumerate(presence))

    assert proc.parse_answer(texts[0], 2.0) == (0.5, 1.0)  # frames 1..2: the likeliest span
    assert prior[0] == pytest.approx(loglik(1, 2))
    spans = [proc.parse_answer(t, 2.0) for t in texts]
    expected = sorted(((i, j) for i in range(5) for j in range(i, 5)), key=lambda s: -loglik(*s))[:3]
    assert spans == [(times[i], times[j]) for i, j in expected]
    # every candidate is a complete answer: template words, then <eos>
    assert all(c[-1] == proc.tokenizer.eos_token_id for c in ids)


def test_span_candidates_answer_nothing_when_no_frame_shows_the_object(small):
    """"In no frame" likelier than every span -> the one empty answer (span: null); otherwise spans."""
    _, proc = small
    times = [0.0, 0.5, 1.0, 1.5]
    ids, prior = proc.span_candidates(times, np.array([0.02, 0.05, 0.01, 0.03]))
    assert ids == [[]] and prior[0] == pytest.approx(np.log([0.98, 0.95, 0.99, 0.97]).sum())
    ids, prior = proc.span_candidates(times, np.array([0.02, 0.6, 0.01, 0.03]))  # one frame says yes
    assert ids and all(ids) and proc.parse_answer(proc.decode(ids[0]), 1.5) == (0.5, 0.5)


def test_span_candidates_write_each_answer_once(small):
    _, proc = small
    times = [0.0, 0.04, 0.08, 1.0]  # 0.04 prints as "0.0" at one decimal: two frames, one text
    ids, prior = proc.span_candidates(times, np.array([0.9, 0.9, 0.2, 0.2]), k=100)
    texts = [proc.decode(c) for c in ids]
    assert len(texts) == len(set(texts)) < 10  # 10 spans, fewer distinct answers
    assert len(prior) == len(ids)


def test_answer_log_likelihood_matches_a_full_forward(small):
    """Scoring candidates as a prefix tree on the cached prompt, one token per distinct prefix, equals
    teacher forcing each one."""
    model, proc = small
    model.eval()
    (ids, _, pix, tmask), n_prompt = prompt_inputs(proc, step=2)
    cands = [proc.encode_answer(0.0, 1.5), proc.encode_answer(12.5, 13.0), proc.encode_answer(2.0, 2.0),
             proc.encode_answer(0.0, 1.5)[:1], proc.encode_answer(0.0, 2.5)]
    assert len({len(c) for c in cands}) > 2  # blocks of different lengths, one of a single token
    from stgcli.models.spacevllm.modeling_spacevllm import _PAD_TO

    prefixes = {tuple(c[:j + 1]) for c in cands for j in range(len(c) - 1)}
    assert len(prefixes) < sum(len(c) - 1 for c in cands)  # shared first tokens ("from 0 . 0 to")
    fed = []
    hook = model.model.language_model.embed_tokens.register_forward_hook(lambda _m, inp, _o: fed.append(inp[0].shape))
    with torch.no_grad():
        _, past, hidden = model.ground_forward(ids, torch.ones_like(ids), pix, tmask, use_cache=True)
        fed.clear()
        got = model.answer_log_likelihood(past, torch.ones_like(ids), hidden[:, -1], cands)
        hook.remove()
        # one pass, a token per distinct prefix (and filler up to a multiple of _PAD_TO, seen by none)
        assert fed == [(1, len(prefixes) + -len(prefixes) % _PAD_TO)] and len(prefixes) % _PAD_TO
        assert past.get_seq_length() == n_prompt  # the prompt's cache is left as it was
        again = model.answer_log_likelihood(past, torch.ones_like(ids), hidden[:, -1], cands[::-1])
        torch.testing.assert_close(again.flip(0), got, atol=1e-4, rtol=1e-4)  # order-free
        alone = [model.answer_log_likelihood(past, torch.ones_like(ids), hidden[:, -1], [c]) for c in cands]
        torch.testing.assert_close(torch.cat(alone), got, atol=1e-4, rtol=1e-4)  # no leak between blocks
        for c, g in zip(cands, got):
            full = torch.cat([ids, torch.tensor([c])], 1)
            _, _, h = model.ground_forward(full, torch.ones_like(full), pix,
                                           torch.cat([tmask, torch.zeros(1, len(c), dtype=torch.bool)], 1))
            logp = torch.log_softmax(model.lm_head(h[0, n_prompt - 1:-1]).float(), -1)
            want = logp[torch.arange(len(c)), torch.tensor(c)].sum()
            assert float(g) == pytest.approx(float(want), abs=1e-3)


def test_constrained_ground_returns_the_best_scored_candidate(small):
    model, proc = small
    model.eval()
    args, _ = prompt_inputs(proc, step=1)
    cands = [proc.encode_answer(0.0, 1.0), proc.encode_answer(0.5, 1.5), proc.encode_answer(1.0, 2.0)]
    seen = []

    def pick(favourite):
        def candidates(presence):
            seen.append(presence)
            prior = np.full(len(cands), -1e6)
            prior[favourite] = 0.0
            return cands, prior
        return candidates

    for fav in range(3):  # a prior that dwarfs any LM score decides
        tokens, boxes, presence = model.ground(*args, answer_candidates=pick(fav))
        assert tokens == cands[fav]
    torch.testing.assert_close(seen[0], presence)  # the candidates see this clip's presence scores
    # with an even prior the language model's likelihood decides
    with torch.no_grad():
        _, past, hidden = model.ground_forward(*args, use_cache=True)
        lm = model.answer_log_likelihood(past, args[1], hidden[:, -1], cands)
    tokens, _, _ = model.ground(*args, answer_candidates=lambda p: (cands, np.zeros(3)))
    assert tokens == cands[int(lm.argmax())]


def test_local_softmax_keeps_the_window_around_the_best_patch():
    from stgcli.models.spacevllm.modeling_spacevllm import _local_softmax, _patch_centres

    grid = 6
    logits = torch.full((1, grid * grid), -2.0)
    logits[0, 1 * grid + 1] = 5.0   # object A at (1, 1)
    logits[0, 4 * grid + 4] = 4.9   # object B at (4, 4), nearly as likely
    logits[0, 1 * grid + 2] = 3.0   # A's right neighbour
    local = _local_softmax(logits, grid, 1)
    keep = torch.zeros(grid * grid, dtype=torch.bool)
    for y in range(0, 3):
        for x in range(0, 3):
            keep[y * grid + x] = True
    assert torch.all(local[0, ~keep] == 0) and float(local.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(local[0, keep], logits[0, keep].softmax(-1))
    centres = _patch_centres(grid, "cpu", torch.float32)
    on_a = (local @ centres)[0]
    between = (logits.softmax(-1) @ centres)[0]
    a, b = centres[1 * grid + 1], centres[4 * grid + 4]
    assert torch.dist(on_a, a) < 0.5 / grid  # on A (pulled a little towards its neighbour)
    assert torch.dist(between, a) > 1 / grid and torch.dist(between, b) > 1 / grid  # on neither


def _two_objects(grid: int, a_path, b_path, a_score, b_score) -> torch.Tensor:
    """Pointing logits of frames with two look-alike objects at the given (x, y) patches."""
    logits = torch.full((len(a_path), grid * grid), -3.0)
    for t, ((ax, ay), (bx, by)) in enumerate(zip(a_path, b_path)):
        logits[t, ay * grid + ax] = a_score[t]
        logits[t, by * grid + bx] = b_score[t]
    return logits


def test_link_track_follows_one_object_through_a_frame_it_loses():
    """Object A drifts right along row 1, its look-alike B sits still at (6, 6). Frame by frame the
    argmax jumps to B on frame 3 (B scores a little higher there); linked, the track stays on A,
    whose evidence over the clip is stronger than one frame's small lead. With no weight on moving
    it is the argmax; when B wins clearly and for long, the track goes to B."""
    from stgcli.models.spacevllm.modeling_spacevllm import link_track

    grid = 8
    a = [(1, 1), (2, 1), (2, 1), (3, 1), (3, 1), (4, 1)]
    b = [(6, 6)] * 6
    logits = _two_objects(grid, a, b, [4.0, 4.0, 4.0, 3.0, 4.0, 4.0], [3.0, 3.0, 3.0, 3.6, 3.0, 3.0])
    idx = [y * grid + x for x, y in a]
    assert logits.argmax(-1).tolist()[3] == 6 * grid + 6
    assert link_track(logits, grid, 0.5, 1.0).tolist() == idx
    assert link_track(logits, grid, 0.0, 1.0).tolist() == logits.argmax(-1).tolist()
    # B clearly ahead from frame 2 on: the track moves to B once, and stays
    late = _two_objects(grid, a, b, [4.0, 4.0, 1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 5.0, 5.0, 5.0, 5.0])
    assert link_track(late, grid, 0.5, 1.0).tolist() == idx[:2] + [6 * grid + 6] * 4
    # moves within `free` patches cost nothing: a lone frame still follows its own best patch
    assert link_track(logits[:1], grid, 0.5, 1.0).tolist() == idx[:1]


def test_relink_recentres_only_frames_the_track_takes_elsewhere(small):
    """A frame the linked track keeps on its best patch keeps the decoder's box exactly; a frame
    it moves to the other object is re-centred there (the local soft-argmax around the track's
    patch), its size unchanged."""
    from stgcli.models.spacevllm.modeling_spacevllm import _local_softmax, _patch_centres

    model, _ = small
    dec = model.space_decoder
    grid = dec.grid
    assert grid == 4 and dec.window == 1
    a = [(0, 0), (0, 1), (1, 1), (1, 0)]
    b = [(3, 3)] * 4
    logits = _two_objects(grid, a, b, [4.0, 4.0, 3.0, 4.0], [3.0, 3.0, 3.5, 3.0])
    boxes = torch.tensor([[0.3, 0.3, 0.1, 0.2], [0.3, 0.4, 0.1, 0.2], [0.8, 0.8, 0.15, 0.25], [0.4, 0.5, 0.1, 0.2]])
    out = dec.relink(boxes, logits, 0.5, 1.0)
    torch.testing.assert_close(out[[0, 1, 3]], boxes[[0, 1, 3]])
    x, y = a[2]
    want = _local_softmax(logits[2:3], grid, dec.window, torch.tensor([[y * grid + x]])) @ _patch_centres(
        grid, "cpu", torch.float32, dec.cover)
    torch.testing.assert_close(out[2, :2], want[0])
    torch.testing.assert_close(out[2, 2:], boxes[2, 2:])
    torch.testing.assert_close(dec.relink(boxes, logits, 0.0, 1.0), boxes)


def test_ground_links_the_shown_frames_when_the_config_says_so(small, monkeypatch):
    """`link_weight` > 0: ground() follows one object through the frames `box_frames` marks, with
    the pointing scores of the same forward; the other frames keep the decoder's boxes; 0 (the
    default): no linking."""
    model, proc = small
    model.eval()
    args, _ = prompt_inputs(proc, step=1)
    with torch.no_grad():
        res = model.ground_forward(*args)[0]
        n = res.boxes.shape[1]
        shown = torch.zeros(n, dtype=torch.bool)
        shown[1:n - 1] = True
        _, plain, _ = model.ground(*args, max_new_tokens=3, box_frames=lambda _t: shown.tolist())
        torch.testing.assert_close(plain, res.boxes[0])
        monkeypatch.setattr(model.config, "link_weight", 0.5)
        _, linked, _ = model.ground(*args, max_new_tokens=3, box_frames=lambda _t: shown.tolist())
    want = model.space_decoder.relink(res.boxes[0][shown], res.point_logits[0][shown], 0.5, model.config.link_free)
    torch.testing.assert_close(linked[shown], want)
    torch.testing.assert_close(linked[~shown], res.boxes[0][~shown])
    assert res.point_logits.shape == (1, n, model.space_decoder.grid ** 2)


def test_point_window_applies_at_inference_only(small):
    """Training averages over the whole grid (every patch gets gradient); inference keeps the
    window around the best patch, and -1 restores the whole grid."""
    model, proc = small
    args, _ = prompt_inputs(proc, step=3)
    dec = model.space_decoder
    assert model.config.point_window == dec.window == 1
    with torch.no_grad():
        model.train()
        trained = model.ground_forward(*args)[0].boxes
        model.eval()
        local = model.ground_forward(*args)[0].boxes
        dec.window = -1
        try:
            whole = model.ground_forward(*args)[0].boxes
        finally:
            dec.window = 1
    torch.testing.assert_close(whole, trained)  # no dropout: only the window differs
    assert not torch.allclose(local[..., :2], whole[..., :2])  # centres move
    torch.testing.assert_close(local[..., 2:], whole[..., 2:])  # sizes do not


def test_presence_bias_shifts_inference_scores_and_lengthens_spans(small):
    """`presence_bias` is added to the presence logits in `ground` (the scores spans are chosen
    from), not in `ground_forward` (training); a higher bias never shortens the likeliest span."""
    model, proc = small
    args, _ = prompt_inputs(proc, step=2)
    model.eval()
    assert model.config.presence_bias == 0.0
    with torch.no_grad():
        logits = model.ground_forward(*args)[0].presence_logits[0]
        _, _, p0 = model.ground(*args)
        model.config.presence_bias = 2.0
        try:
            _, _, p2 = model.ground(*args)
            torch.testing.assert_close(model.ground_forward(*args)[0].presence_logits[0], logits)
        finally:
            model.config.presence_bias = 0.0
    torch.testing.assert_close(p0, torch.sigmoid(logits))
    torch.testing.assert_close(p2, torch.sigmoid(logits + 2.0))
    times = np.arange(len(p0)) * 0.5

    def best_len(p):
        ids, _ = proc.span_candidates(times, p.numpy(), k=1)
        if ids == [[]]:  # "in no frame": shorter than any span
            return -1.0
        start, end = proc.parse_answer(proc.decode(ids[0]), times[-1] + 0.5)
        return end - start

    assert best_len(p2) >= best_len(p0)
    assert best_len(torch.full_like(p0, 0.9)) == times[-1]  # everything likely: the whole clip


def test_patch_geometry_when_patches_do_not_tile_the_input():
    """SigLIP/14 at 384 px: 27 patches cover 378 px. Patch k's centre is pixel 14k + 7, and the
    pixel a box centre sits on picks its patch (both were scaled as if 27 patches spanned 384)."""
    from stgcli.models.spacevllm.modeling_spacevllm import _centre_patch, _patch_centres

    cover = 27 * 14 / 384
    centres = _patch_centres(27, "cpu", torch.float64, cover) * 384
    assert centres[:27, 0].tolist() == pytest.approx([14 * k + 7 for k in range(27)])
    for px, k in ((5.0, 0), (370.0, 26), (377.9, 26), (383.0, 26), (14.2, 1)):
        box = torch.tensor([[px - 3, px - 3, px + 3, px + 3]], dtype=torch.float64) / 384
        assert _centre_patch(box, 27, cover).item() == k * 27 + k
    tiny = _patch_centres(8, "cpu", torch.float64)  # 128 / 16: the grid tiles the input exactly
    assert tiny[:8, 0].tolist() == pytest.approx([(k + 0.5) / 8 for k in range(8)])


def test_centre_patch_indexes_the_grid_row_major():
    from stgcli.models.spacevllm.modeling_spacevllm import _centre_patch

    boxes = torch.tensor([[0.0, 0.0, 0.2, 0.2],     # centre (0.1, 0.1): row 0, col 0
                          [0.6, 0.1, 1.0, 0.3],     # centre (0.8, 0.2): row 0, col 3
                          [0.2, 0.6, 0.4, 1.0],     # centre (0.3, 0.8): row 3, col 1
                          [0.9, 0.9, 1.0, 1.0]])    # centre on the far edge: last patch
    assert _centre_patch(boxes, 4).tolist() == [0, 3, 13, 15]


def test_training_aids_add_their_losses():
    """point_weight / mid_presence_layer (off by default) add a pointing cross-entropy and a
    mid-layer presence BCE to the loss; with both off the loss is the three base terms."""
    aids = dict(SMALL, text_config={**SMALL["text_config"], "num_hidden_layers": 2},
                point_weight=1.0, mid_presence_layer=1, mid_presence_weight=0.5)
    cfg = small_cfg(model=aids)
    torch.manual_seed(0)
    model, proc = new_tiny_model(cfg, seed=0)
    model.train()
    batch = make_batch(cfg, proc, step=0)
    out, _, _ = model.ground_forward(**batch)
    base = out.lm_loss + out.box_loss + out.presence_loss
    grid = model.space_decoder.grid
    assert 0 < out.point_loss.item() < 2 * np.log(grid * grid)  # a cross-entropy over the patch grid
    mid = (out.loss - base - out.point_loss).item()
    assert 0 < mid < 0.5 * 5  # 0.5 x a BCE over presence
    out.loss.backward()
    assert model.space_decoder.point_q.weight.grad is not None

    model.config.point_weight, model.config.mid_presence_layer = 0.0, 0
    out, _, _ = model.ground_forward(**batch)
    assert out.point_loss is None
    torch.testing.assert_close(out.loss, out.lm_loss + out.box_loss + out.presence_loss)


REFINER = {"crop": 16, "channels": [8, 16], "context": 2.0, "min_window": 0.1}


def test_box_refiner_looks_through_a_window_around_the_box():
    """The refiner's window is `context` times the box (at least `min_window`), centred on it, and
    its crop samples the frame exactly there; its output lies inside that window."""
    from stgcli.models.spacevllm.modeling_spacevllm import BoxRefiner

    ref = BoxRefiner(REFINER)
    s = 64
    ramp = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # each pixel holds its centre's x (ch 0) and y (ch 1)
    pix = torch.stack([ramp.expand(s, s), ramp[:, None].expand(s, s), torch.zeros(s, s)])[None].repeat(2, 1, 1, 1)
    boxes = torch.tensor([[0.3, 0.6, 0.1, 0.2], [0.5, 0.5, 0.01, 0.01]])
    win = ref.windows(boxes)
    torch.testing.assert_close(win, torch.tensor([[0.3, 0.6, 0.2, 0.4], [0.5, 0.5, 0.1, 0.1]]))
    crops = ref.crops(pix, win)
    assert crops.shape == (2, 3, 16, 16)
    for n in range(2):
        cx, cy, w, h = win[n].tolist()
        want_x = cx - w / 2 + (torch.arange(16) + 0.5) * w / 16
        want_y = cy - h / 2 + (torch.arange(16) + 0.5) * h / 16
        torch.testing.assert_close(crops[n, 0, 5], want_x, atol=1e-5, rtol=0)
        torch.testing.assert_close(crops[n, 1, :, 5], want_y, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unknown setting 'crops'"):
        BoxRefiner({"crops": 3})
    torch.manual_seed(0)
    out = ref(pix, boxes)
    assert bool((out[:, :2] - win[:, :2]).abs().le(win[:, 2:] / 2).all())
    assert bool((out[:, 2:] > 0).all() and (out[:, 2:] <= win[:, 2:]).all())
    with torch.no_grad():  # a head that says "no change": the window's centre, half its size
        ref.head[-1].weight.zero_()
        ref.head[-1].bias.zero_()
    torch.testing.assert_close(ref(pix, boxes), torch.cat([win[:, :2], win[:, 2:] / 2], -1))


def test_jittered_boxes_are_rough_but_near_the_true_ones():
    from stgcli.models.spacevllm.modeling_spacevllm import _cxcywh_to_xyxy, generalized_box_iou_loss, jitter_boxes

    gt = torch.tensor([[0.2, 0.3, 0.3, 0.5], [0.5, 0.5, 0.6, 0.55]]).repeat(500, 1)
    a = jitter_boxes(gt, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, jitter_boxes(gt, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, jitter_boxes(gt, torch.Generator().manual_seed(2)))
    giou = 1 - generalized_box_iou_loss(_cxcywh_to_xyxy(a), gt)
    assert 0.1 < giou.mean().item() < 0.7  # rough
    centre_in = ((a[:, 0] > gt[:, 0]) & (a[:, 0] < gt[:, 2]) & (a[:, 1] > gt[:, 1]) & (a[:, 1] < gt[:, 3]))
    assert centre_in.float().mean().item() > 0.6  # mostly on the object
    ratio = a[:, 2] / (gt[:, 2] - gt[:, 0])
    assert 0.5 < ratio.median().item() < 2.0 and ratio.std().item() > 0.1


def test_box_refiner_in_the_model_refines_inference_boxes_and_trains_beside_the_rest(small, tmp_path):
    """With `box_refiner`, `ground` returns the refiner's boxes (`steps` passes over the decoder's),
    for the frames `box_frames` marks (all without it); training keeps the decoder's boxes for its
    own loss and adds the refiner's loss; the part is saved and loaded with the model."""
    cfg = small_cfg(model=dict(SMALL, box_refiner=REFINER))
    torch.manual_seed(0)
    model, proc = new_tiny_model(cfg, seed=0)
    assert model.space_decoder.refiner.steps == 2
    args, _ = prompt_inputs(proc, step=1)
    model.eval()
    with torch.no_grad():
        tokens, refined, _ = model.ground(*args, max_new_tokens=5)
        rough = model.ground_forward(*args)[0].boxes[0]
        ref = model.space_decoder.refiner
        want = ref(args[2][0], ref(args[2][0], rough))
        seen = []

        def two_frames(answer):
            seen.append(answer)
            return [i in (0, 2) for i in range(len(rough))]

        tokens2, some, _ = model.ground(*args, max_new_tokens=5, box_frames=two_frames)
    torch.testing.assert_close(refined, want)
    assert not torch.allclose(refined, rough)
    assert seen == [tokens] and tokens2 == tokens  # told the answer; the answer does not depend on it
    torch.testing.assert_close(some[[0, 2]], want[[0, 2]])
    torch.testing.assert_close(some[[1, 3, 4, 5]], rough[[1, 3, 4, 5]])

    model.train()
    batch = make_batch(cfg, proc, step=0)
    out, _, _ = model.ground_forward(**batch)
    torch.testing.assert_close(out.loss, out.lm_loss + out.box_loss + out.presence_loss + out.refine_loss)
    assert 0 < out.refine_loss.item() < 5 * 2 + 2 * 2  # L1 on [0, 1] coordinates x5 + (1 - GIoU) x2
    out.loss.backward()
    assert model.space_decoder.refiner.features[0].weight.grad.abs().sum() > 0
    model.zero_grad()

    model.eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    back = SpaceVLLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert back.config.box_refiner == REFINER
    with torch.no_grad():
        torch.testing.assert_close(back.ground(*args, max_new_tokens=5)[1], refined)


def test_temporal_presence_starts_as_the_model_it_is_added_to_and_sees_the_whole_clip(small, tmp_path):
    """`temporal_presence` corrects each frame's presence logit from all frames (bidirectional).
    Added to a trained model (init_from), its output layer starts at zero, so it changes nothing;
    once it is not zero, a change in the last frame moves the first frame's presence (the query
    tokens alone are causal)."""
    from stgcli.models.spacevllm.modeling_spacevllm import TemporalPresence
    from stgcli.train import init_weights

    base, proc = small
    base.save_pretrained(tmp_path, safe_serialization=True)
    cfg = small_cfg(model=dict(SMALL, temporal_presence={"layers": 1, "heads": 2}))
    model, _ = new_tiny_model(cfg, seed=1)
    init_weights(model, tmp_path)
    model.eval(), base.eval()
    args, _ = prompt_inputs(proc, step=1)
    with torch.no_grad():
        torch.testing.assert_close(model.ground_forward(*args)[0].presence_logits,
                                   base.ground_forward(*args)[0].presence_logits)
    tp = model.space_decoder.temporal
    torch.nn.init.normal_(tp.out.weight)
    b, f, d_llm, d = 1, 6, 32, 32
    query_h, q = torch.randn(b, f, d_llm), torch.randn(b, f, d)
    match, presence = torch.randn(b, f), torch.randn(b, f)
    with torch.no_grad():
        a = tp(query_h, q, match, presence)
        q2 = q.clone()
        q2[0, -1] += 3.0
        c = tp(query_h, q2, match, presence)
    assert a.shape == (b, f) and abs(a[0, 0] - c[0, 0]).item() > 1e-4
    with pytest.raises(ValueError, match="unknown setting 'layer'"):
        TemporalPresence(8, 8, {"layer": 1})


def test_temporal_presence_track_reads_the_box_and_its_motion_without_moving_the_boxes(small):
    """With `track`, the temporal presence head also reads each frame's box and its centre's motion
    (next minus previous frame): moving one frame's box changes presence (on every frame, the head
    being bidirectional), and no gradient from presence reaches the boxes. Without it, boxes are
    ignored.
    The whole model runs with it, ground() included."""
    from stgcli.models.spacevllm.modeling_spacevllm import TemporalPresence

    torch.manual_seed(0)
    b, f, d_llm, d = 1, 6, 32, 32
    query_h, q = torch.randn(b, f, d_llm), torch.randn(b, f, d)
    match, presence = torch.randn(b, f), torch.randn(b, f)
    boxes = torch.rand(b, f, 4, requires_grad=True)
    moved = boxes.detach().clone()
    moved[0, 3, :2] += 0.2
    tp = TemporalPresence(d_llm, d, {"layers": 1, "heads": 2, "track": True})
    torch.nn.init.normal_(tp.out.weight)
    out = tp(query_h, q, match, presence, boxes)
    with torch.no_grad():
        shifted = tp(query_h, q, match, presence, moved)
    assert ((shifted - out).abs() > 1e-5).all()
    out.sum().backward()
    assert boxes.grad is None
    plain = TemporalPresence(d_llm, d, {"layers": 1, "heads": 2})
    with torch.no_grad():
        torch.testing.assert_close(plain(query_h, q, match, presence, boxes), plain(query_h, q, match, presence, moved))

    _, proc = small
    cfg = small_cfg(model=dict(SMALL, temporal_presence={"layers": 1, "heads": 2, "track": True}))
    model, _ = new_tiny_model(cfg, seed=1)
    model.train()
    batch = make_batch(cfg, proc, step=0)
    res, _, _ = model.ground_forward(**batch)
    res.loss.backward()
    assert model.space_decoder.temporal.inp[1].weight.grad.abs().sum() > 0
    model.eval()
    args, _ = prompt_inputs(proc, step=1)
    with torch.no_grad():
        tokens, boxes_out, pres = model.ground(*args, max_new_tokens=5)
    assert boxes_out.shape == (pres.shape[0], 4)


VERIFIER = {"crop": 16, "channels": [8, 16], "candidates": 2}


def test_box_verifier_reads_the_window_in_its_frame_and_the_neighbouring_frames():
    """The verifier's verdict on a box depends on the pixels inside the window around it, in its
    frame and the two neighbouring sampled frames (how the object moves), and on the sentence; not
    on pixels outside the window, nor on farther frames."""
    from stgcli.models.spacevllm.modeling_spacevllm import BoxVerifier

    torch.manual_seed(0)
    ver = BoxVerifier(32, VERIFIER).eval()
    pixels = torch.randn(1, 6, 3, 64, 64)
    box = torch.tensor([[0.3, 0.3, 0.1, 0.1]])  # window 0.25 wide: x and y in [0.175, 0.425]
    sentence = torch.randn(1, 64)  # the model's _verifier_sentence: twice the language model's width

    def verdict(pix, sent=sentence):
        with torch.no_grad():
            return ver(pix, torch.tensor([0]), torch.tensor([2]), box, sent)

    base = verdict(pixels)
    assert base.shape == (1,)
    for frame, (y, x), changes in [(2, (20, 20), True), (1, (20, 20), True), (3, (20, 20), True),
                                   (2, (55, 55), False), (5, (20, 20), False), (0, (20, 20), False)]:
        pix = pixels.clone()
        pix[0, frame, :, y - 2:y + 2, x - 2:x + 2] += 3.0
        assert (abs(verdict(pix) - base).item() > 1e-5) == changes, (frame, y, x)
    assert abs(verdict(pixels, torch.randn(1, 64)) - base).item() > 1e-5
    # inference's way, every place of every frame at once, gives what asking about each does
    places = torch.rand(6, 3, 4) * 0.5 + 0.1
    frame = torch.arange(6).repeat_interleave(3)
    with torch.no_grad():
        one_by_one = ver.embed(pixels, torch.zeros_like(frame), frame, places.view(-1, 4))
        torch.testing.assert_close(ver.embed_places(pixels[0], places), one_by_one)
        single = ver.embed(pixels[:, :1], torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), places[0])
        torch.testing.assert_close(ver.embed_places(pixels[0, :1], places[:1]), single)  # a clip of one frame
    with pytest.raises(ValueError, match="unknown setting 'candidate'"):
        BoxVerifier(8, {"candidate": 2})


@pytest.mark.parametrize("part", ["verifier", "refiner"])
def test_a_first_stride_of_2_quarters_every_map_of_the_window_cnn(part):
    """`first_stride` 2: the first convolution halves the crop's side, so each layer's map is a quarter the
    size (and so its compute); the head reads the smaller last map. The default (1) is the shipped trunk."""
    from stgcli.models.spacevllm.modeling_spacevllm import BoxRefiner, BoxVerifier

    def make(**kw):
        torch.manual_seed(0)
        spec = {"crop": 16, "channels": [8, 16, 16]} | kw
        return BoxVerifier(32, spec) if part == "verifier" else BoxRefiner(spec)

    plain, fast = make(), make(first_stride=2)
    x = torch.randn(3, 9 if part == "verifier" else 3, 16, 16)
    maps = [m for m in (plain.features, fast.features)]
    with torch.no_grad():
        sides = [[t.shape[-1] for t in _conv_outputs(f, x)] for f in maps]
    assert sides == [[16, 8, 4], [8, 4, 2]]
    head = plain.visual[1] if part == "verifier" else plain.head[1]
    head_fast = fast.visual[1] if part == "verifier" else fast.head[1]
    assert (head.in_features, head_fast.in_features) == (16 * 4 * 4, 16 * 2 * 2)
    with torch.no_grad():
        if part == "verifier":
            out = fast(x[None, :, :3].repeat(1, 1, 1, 4, 4), torch.zeros(3, dtype=torch.long), torch.arange(3),
                       torch.full((3, 4), 0.3), torch.randn(3, 64))
        else:
            out = fast(x.repeat(1, 1, 4, 4), torch.full((3, 4), 0.3))
    assert out.shape[0] == 3 and bool(torch.isfinite(out).all())


def _conv_outputs(features: torch.nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    outs = []
    for layer in features:
        x = layer(x)
        if isinstance(layer, torch.nn.Conv2d):
            outs.append(x)
    return outs


def test_box_verifier_learns_the_target_against_every_other_object_and_its_empty_place(small, tmp_path):
    """Training crops: the target on its span's frames is the positive; every other visible object
    and the target's place on the frames outside its span are negatives; at most `max_crops` a step,
    the target and the objects of its colour first. Its loss joins the model's and trains the
    verifier, with `attributes` also naming each object crop's colour, shape and motion; the loss of
    a leg that trains it alone, which reads the sentence from the text before the frames, is the
    same. The part is saved and loaded with the model."""
    _, proc = small
    cfg = small_cfg(model=dict(SMALL, box_verifier=dict(VERIFIER, max_crops=1000, attributes=[5, 4, 6])))
    torch.manual_seed(0)
    model, _ = new_tiny_model(cfg, seed=0)
    batch = make_batch(cfg, proc, step=0)
    vis, tgt, span = batch["obj_visible"], batch["obj_target"], batch["gt_in_span"]
    assert (tgt.sum(1) == 1).all()
    torch.testing.assert_close(vis[tgt[:, None, :].expand_as(vis)].view(span.shape), span)
    seen = []
    ver = model.space_decoder.verifier
    embed = ver.embed

    def spy(pixels, clip, frame, boxes):
        seen.append((clip.clone(), frame.clone()))
        return embed(pixels, clip, frame, boxes)

    ver.embed = spy
    model.train()
    out = model.ground_forward(**batch)[0]
    assert len(seen[0][0]) == int(vis.sum() + (~span).sum())
    torch.testing.assert_close(out.loss, out.lm_loss + out.box_loss + out.presence_loss + out.verify_loss)
    out.loss.backward()
    assert ver.features[0].weight.grad.abs().sum() > 0 and ver.attr_head.weight.grad.abs().sum() > 0
    model.zero_grad()
    model.eval()
    sentences = []
    loss_of = model.verifier_loss
    model.verifier_loss = lambda pixels, sentence, *a: sentences.append(sentence) or loss_of(pixels, sentence, *a)
    with torch.no_grad():
        full = model.ground_forward(**batch)[0].verify_loss
        alone = model.verifier_loss_alone(**batch)
    del model.verifier_loss
    torch.testing.assert_close(sentences[1], sentences[0], rtol=1e-4, atol=1e-5)  # read from the text alone
    assert alone.item() > 0 and full.item() > 0
    g = torch.Generator().manual_seed(3)

    ver.max_crops = 3  # the target's crops and those of objects of its colour are kept first
    seen.clear()
    with torch.no_grad():
        model.verifier_loss(batch["pixel_values_videos"], torch.zeros(len(span), 64), batch["obj_boxes"], vis, tgt,
                            batch["gt_boxes"], span, batch["obj_attrs"], g)
    clip, frame = seen[0]
    b_obj, f_obj, m_obj = torch.nonzero(vis, as_tuple=True)
    colour = batch["obj_attrs"][..., 0]
    target_colour = colour[tgt]
    hard = {(int(b), int(f)) for b, f, m in zip(b_obj, f_obj, m_obj) if colour[b, m] == target_colour[b]}
    assert len(clip) == 3 and len(hard) >= 3 and all((int(b), int(f)) in hard for b, f in zip(clip, frame))

    ver.max_crops = 1000
    logits = torch.zeros(int(vis.sum() + (~span).sum()))
    ver.match = lambda v, sentence: logits  # every verdict even: the BCE is log 2, plus the attributes' CE
    with torch.no_grad():
        got = model.verifier_loss(batch["pixel_values_videos"], torch.zeros(len(span), 64), batch["obj_boxes"], vis,
                                  tgt, batch["gt_boxes"], span)
    torch.testing.assert_close(got, torch.tensor(math.log(2)))
    del ver.embed, ver.match

    model.eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    back = SpaceVLLMForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert back.config.box_verifier == dict(VERIFIER, max_crops=1000, attributes=[5, 4, 6])
    torch.testing.assert_close(back.space_decoder.verifier.head[-1].weight, ver.head[-1].weight)


def test_ground_with_a_box_verifier_moves_presence_and_boxes_only_as_far_as_its_weights_say(small):
    """`choose` and `presence` 0 (the defaults): the verifier is not asked and ground() is the model's
    without it. `presence` w: every frame's presence logit gains w times the log-probability the
    verifier gives the place chosen. `choose`: a place the verifier prefers wins the box over the
    decoder's best-pointed one, re-centred there with its size kept."""
    from stgcli.models.spacevllm.modeling_spacevllm import _local_softmax, _patch_centres, _peaks

    _, proc = small
    cfg = small_cfg(model=dict(SMALL, box_verifier=VERIFIER))
    torch.manual_seed(0)
    model, _ = new_tiny_model(cfg, seed=0)
    model.eval()
    ver, dec = model.space_decoder.verifier, model.space_decoder
    args, _ = prompt_inputs(proc, step=1)
    asked = []

    def places(frames, boxes):  # what ver is asked about, passed on as the "embedding"
        asked.append(boxes.clone())
        return boxes.reshape(-1, 4)

    ver.embed_places = places
    with torch.no_grad():
        res = model.ground_forward(*args)[0]
        tokens, boxes, presence = model.ground(*args, max_new_tokens=4)
        assert not asked
        torch.testing.assert_close(boxes, res.boxes[0])
        torch.testing.assert_close(presence, torch.sigmoid(res.presence_logits[0] + model.config.presence_bias))

        ver.match = lambda v, sentence: torch.full((len(v),), -3.0)
        ver.presence = 0.5
        _, boxes2, presence2 = model.ground(*args, max_new_tokens=4)
        want = torch.sigmoid(res.presence_logits[0] + model.config.presence_bias
                             + 0.5 * torch.nn.functional.logsigmoid(torch.tensor(-3.0)))
        torch.testing.assert_close(presence2, want)
        torch.testing.assert_close(boxes2, res.boxes[0])  # the same verdict everywhere moves no box

        ver.presence, ver.choose = 0.0, 20.0
        asked.clear()
        ver.match = lambda v, sentence: (v[:, 0] > 0.5).float() * 10 - 5  # places in the right half match
        _, boxes3, presence3 = model.ground(*args, max_new_tokens=4)
    torch.testing.assert_close(presence3, presence)
    cand = asked[0].view(-1, 2, 4)
    point = res.point_logits[0]
    peaks = _peaks(point, dec.grid, 2, dec.window)
    assert torch.equal(peaks[:, 0], point.argmax(-1))
    torch.testing.assert_close(cand[:, 0], res.boxes[0])
    for f in range(len(cand)):
        own_right, other_right = bool(cand[f, 0, 0] > 0.5), bool(cand[f, 1, 0] > 0.5)
        if own_right or not other_right:
            torch.testing.assert_close(boxes3[f], res.boxes[0][f])
        else:  # the other place wins: re-centred there, the decoder's size kept
            c = _local_softmax(point[f:f + 1].float(), dec.grid, dec.window, peaks[f:f + 1, 1:]) @ _patch_centres(
                dec.grid, "cpu", torch.float32, dec.cover)
            torch.testing.assert_close(boxes3[f, :2], c[0])
            torch.testing.assert_close(boxes3[f, 2:], res.boxes[0][f, 2:])
    assert any(bool(cand[f, 1, 0] > 0.5) and not bool(cand[f, 0, 0] > 0.5) for f in range(len(cand))), \
        "the test clip should have a frame where the verifier overrules the decoder"


@pytest.mark.parametrize("constrained", [False, True])
def test_ground_many_gives_what_ground_gives_clip_by_clip(small, constrained):
    """Several clips with one prefill (prompts of different lengths, padded on the right): each clip's
    answer, boxes and presence are those `ground` gives it alone, with every optional part on (box
    verifier, refiner, temporal presence, tube linking), free text or constrained answers alike."""
    _, proc = small
    cfg = small_cfg(model=dict(SMALL, box_verifier=dict(VERIFIER, choose=5.0, presence=1.0), box_refiner=REFINER,
                               temporal_presence={"track": True}, link_weight=0.5))
    torch.manual_seed(0)
    model, _ = new_tiny_model(cfg, seed=0)
    model.eval()
    clips = []
    for step, query in enumerate(["the red circle", "the blue square that moves left", "green"]):
        pixels = make_batch(small_cfg(min_frames=6), proc, step=step)["pixel_values_videos"][:1]
        ids, text_mask = proc.encode_prompt(query, [0.5 * i for i in range(pixels.shape[1])])
        shown = [bool(i % 2 == step % 2) for i in range(pixels.shape[1])]
        cands = ([proc.encode_answer(0.0, 1.0 + step), proc.encode_answer(0.5, 2.0)], np.array([0.0, -0.5]))
        if step == 1:  # "not there": the empty answer, and the other two scored without this clip's row
            cands = ([[]], np.array([0.0]))
        clips.append({"input_ids": torch.tensor([ids]), "text_mask": torch.tensor([text_mask]),
                      "pixel_values_videos": pixels, "box_frames": lambda _tokens, s=shown: s,
                      "answer_candidates": (lambda _presence, c=cands: c) if constrained else None})
    assert len({c["input_ids"].shape[1] for c in clips}) == 3
    with torch.no_grad():
        alone = [model.ground(c["input_ids"], torch.ones_like(c["input_ids"]), c["pixel_values_videos"],
                              c["text_mask"], max_new_tokens=4, answer_candidates=c["answer_candidates"],
                              box_frames=c["box_frames"]) for c in clips]
        together = model.ground_many(clips, max_new_tokens=4)
    assert len(together) == 3
    assert (alone[1][0] == []) == constrained
    for (tokens, boxes, presence), (tokens2, boxes2, presence2) in zip(alone, together):
        assert tokens2 == tokens
        torch.testing.assert_close(boxes2, boxes)
        torch.testing.assert_close(presence2, presence)
    with pytest.raises(ValueError, match="the same number of frames"):
        model.ground_many([clips[0], dict(clips[1], pixel_values_videos=clips[1]["pixel_values_videos"][:, :4])])


def test_ground_many_runs_the_vision_tower_once_for_queries_about_the_same_frames(small):
    """Two queries about one clip (the same frames tensor, as stg batch passes a video's pairs) and one
    about another: the vision tower sees two clips' frames, and each query gets what `ground` gives it."""
    _, proc = small
    torch.manual_seed(0)
    model, _ = new_tiny_model(small_cfg(model=dict(SMALL, box_refiner=REFINER)), seed=0)
    model.eval()
    one = make_batch(small_cfg(min_frames=6), proc, step=0)["pixel_values_videos"][:1]
    other = make_batch(small_cfg(min_frames=6), proc, step=1)["pixel_values_videos"][:1]
    clips = []
    for query, pixels in [("the red circle", one), ("the blue square that moves left", other), ("green", one)]:
        ids, text_mask = proc.encode_prompt(query, [0.5 * i for i in range(6)])
        clips.append({"input_ids": torch.tensor([ids]), "text_mask": torch.tensor([text_mask]),
                      "pixel_values_videos": pixels})
    seen = []
    hook = model.model.vision_tower.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].shape[0]))
    with torch.no_grad():
        together = model.ground_many(clips, max_new_tokens=4)
        seen_together = list(seen)
        alone = [model.ground(c["input_ids"], torch.ones_like(c["input_ids"]), c["pixel_values_videos"],
                              c["text_mask"], max_new_tokens=4) for c in clips]
    hook.remove()
    assert seen_together == [2 * 6]  # two clips of 6 frames, once
    for (tokens, boxes, presence), (tokens2, boxes2, presence2) in zip(alone, together):
        assert tokens2 == tokens
        torch.testing.assert_close(boxes2, boxes)
        torch.testing.assert_close(presence2, presence)
