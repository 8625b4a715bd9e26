"""SpaceVLLM configuration: LlavaOnevision's config plus the grounding parts.

The same class describes the full-size SpaceVLLM-7B (LLaVA-Video-7B-Qwen2 shapes) and the tiny
built-in model; only the numbers differ (see `tiny_config` and `spacevllm_7b_config`).
"""
from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig


@strict
class SpaceVLLMConfig(LlavaOnevisionConfig):
    r"""
    query_token_index: id of the spatio-temporal query token placed after each frame's visual tokens.
    decoder_hidden_size / decoder_layers / decoder_heads: the Query-Guided Space Decoder's size.
    text_condition_layers: layers in which visual tokens attend to the sentence before decoding.
    num_frames: frames sampled per clip by default.
    time_decimals: decimals of the timestamps written in the prompt and the answer.
    training_vocabulary: words seen in training queries; None means "open vocabulary" (no warning).
    box_l1_weight / box_giou_weight / presence_weight / lm_weight: training loss weights.
    point_weight: weight of a cross-entropy on the decoder's pointing scores towards the patch that
        holds the true box centre (in-span frames). A dense, direct signal for "which patch": the
        L1/GIoU gradient through a diffuse soft-argmax is weak, which made box training plateau.
    mid_presence_layer / mid_presence_weight: deep supervision of the language model. The query
        tokens' hidden states after this layer (0: off) go through the final norm and the presence
        head and get the presence BCE, so the frames' in-span state forms early enough for later
        layers to carry it into the written answer. Training only; no extra weights.
    point_window: at inference, the box centre is the soft-argmax of the pointing scores over the
        (2r+1) x (2r+1) patches around the best one, not over the whole grid: when two objects
        both score, the whole-grid average lands between them, on neither. -1: the whole grid.
        Training always uses the whole grid (every patch gets gradient). No extra weights.
    presence_bias: added to the per-frame presence logits at inference (not in training): a
        calibration chosen on held-out tuning clips, as a detector's threshold is. The spans come
        from these scores, and a model whose scores run low names spans that are too short.
    motion_features: each frame's patches also see how the same patches change from the previous
        to the next sampled frame (a 3x3 convolution over that difference), so the decoder can tell
        apart objects that differ only in motion (a twin moving left vs one staying still). The
        frame's own query still attends only to that frame's patches.
    attr_classes / attr_weight: dense auxiliary supervision of the decoder's patch features (before
        they see the sentence): per patch, a linear head predicts each attribute of the object there
        (class counts including "none", e.g. [5, 4, 6] for the shapes world's colour, shape and
        motion), with cross-entropy weighted by attr_weight. It teaches the small vision tower what
        the sentence can name. Training only; None / 0: off.
    box_refiner: a second look at the pixels around each box (modeling's BoxRefiner): None, off, or a
        dict of its settings (`crop`, `context`, `min_window`, `steps`, `channels`, `first_stride`,
        `jitters`; {} takes the defaults). The space decoder points at patches, which boxes small objects
        only roughly; the refiner fits the box to the object in a crop of the frame at the model's input
        size.
    temporal_presence: a small bidirectional transformer over the frames that corrects each frame's
        presence logit with the whole clip in view (modeling's TemporalPresence): None, off, or a dict
        of its settings (`layers`, `heads`, `track`: also read each frame's box and its motion; {} takes
        the defaults, without `track`).
    box_verifier: a check of candidate boxes against the sentence, on the pixels of the frame and its
        neighbours (modeling's BoxVerifier): None, off, or a dict of its settings (`crop`, `context`,
        `min_window`, `channels`, `first_stride`, `candidates`, `choose`, `presence`, `max_crops`,
        `attributes`; {} takes the defaults, which leave the boxes and presence as they were until
        `choose` / `presence` are set).
    link_weight / link_free: tube linking at inference (0: off). The frames whose boxes are shown
        get one object, followed through the clip: the patch each frame points at is chosen jointly
        over the frames (Viterbi), each frame's pointing log-probability summed, less `link_weight`
        for every patch beyond `link_free` that the object moves between consecutive sampled
        frames. Frame by frame, the decoder can box the target on one frame and a look-alike on
        the next; followed as one track, a frame whose evidence is torn goes with the track. A
        calibration like `presence_bias`, chosen on tuning clips; no extra weights.
    """

    model_type = "spacevllm"

    query_token_index: int = 151648
    decoder_hidden_size: int = 256
    decoder_layers: int = 2
    decoder_heads: int = 8
    text_condition_layers: int = 1
    num_frames: int = 32
    time_decimals: int = 1
    training_vocabulary: list | None = None
    box_l1_weight: float = 5.0
    box_giou_weight: float = 2.0
    presence_weight: float = 1.0
    lm_weight: float = 1.0
    point_weight: float = 0.0
    mid_presence_layer: int = 0
    mid_presence_weight: float = 0.0
    point_window: int = 1
    presence_bias: float = 0.0
    motion_features: bool = False
    attr_classes: list | None = None
    attr_weight: float = 0.0
    box_refiner: dict | None = None
    temporal_presence: dict | None = None
    box_verifier: dict | None = None
    link_weight: float = 0.0
    link_free: float = 1.0


def tiny_config(vocab_size: int, image_token_index: int, video_token_index: int, query_token_index: int,
                pad_token_id: int, eos_token_id: int, training_vocabulary: list[str],
                overrides: dict | None = None) -> SpaceVLLMConfig:
    """The built-in model's shapes: a few-layer SigLIP and Qwen2, small enough to train on a CPU.
    `overrides` may replace any field, with `vision_config` / `text_config` dicts merged in."""
    overrides = dict(overrides or {})
    vision = dict(model_type="siglip_vision_model", hidden_size=128, intermediate_size=384,
                  num_hidden_layers=3, num_attention_heads=4, image_size=128, patch_size=16,
                  vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=192, intermediate_size=512,
                num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                max_position_embeddings=4096, rope_theta=10000.0, tie_word_embeddings=True,
                pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)
    vision.update(overrides.pop("vision_config", {}))
    text.update(overrides.pop("text_config", {}))
    fields = dict(
        vision_config=vision, text_config=text, image_token_index=image_token_index,
        video_token_index=video_token_index, query_token_index=query_token_index,
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=True,
        decoder_hidden_size=128, decoder_layers=2, decoder_heads=4, num_frames=16, time_decimals=1,
        training_vocabulary=sorted(training_vocabulary), pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
    )
    fields.update(overrides)
    return SpaceVLLMConfig(**fields)


def spacevllm_7b_config(vocab_size: int = 152064, image_token_index: int = 151646,
                        video_token_index: int = 151647, query_token_index: int = 151648) -> SpaceVLLMConfig:
    """LLaVA-Video-7B-Qwen2 shapes: SigLIP so400m/14 at 384 px, 2x2 pooling, Qwen2-7B."""
    vision = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304,
                  num_hidden_layers=26, num_attention_heads=16, image_size=384, patch_size=14,
                  vision_use_head=False)
    text = dict(model_type="qwen2", vocab_size=vocab_size, hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                tie_word_embeddings=False, eos_token_id=151645, pad_token_id=151643)
    return SpaceVLLMConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_index,
        video_token_index=video_token_index, query_token_index=query_token_index,
        # LLaVA-NeXT deletes SigLIP's 27th layer and uses the last of the remaining 26: layer -1 here.
        vision_feature_layer=-1, vision_feature_select_strategy="full", tie_word_embeddings=False,
        decoder_hidden_size=512, decoder_layers=2, decoder_heads=8, num_frames=64, time_decimals=2,
        training_vocabulary=None,
    )
