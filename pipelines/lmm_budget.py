"""A memory and token model of reference video-LLMs at real size, from their published configs.

Nothing is downloaded and no weights exist: each model is its real transformers class built on
the meta device from the config values its model card / ``config.json`` publishes (written out
below, with where each came from), so parameters and bf16 bytes are counted exactly. Tokens
per frame come from the real processor classes, built with the published preprocessing
settings and a small word-level tokenizer that carries the model's special tokens, run on blank
frames of the size refocus ingests (384 px short side): the placeholder tokens they emit are
counted, in both presentations —

* **images**: each frame a separate image (Qwen: one image = its frame doubled in time;
  InternVL: the frame tiled as its processor does; LLaVA-OneVision: anyres tiling for a lone
  image, the 729-token base view plus a newline for each of several);
* **video**: the frames as one video, as refocus shows it (Qwen: each frame repeated to fill
  the temporal patch of 2, so none is merged with another, Qwen3-VL adds a ``<t seconds>``
  stamp per frame; LLaVA-OneVision pools each frame to 14×14 = 196 tokens
  plus one newline per video; InternVL: 256 tokens per frame, no tiling, ``FrameN:`` markers).

Memory per subset of k frames, prompt length L tokens, in bf16 (2 B):

* K/V: ``layers × 2 × kv_heads × head_dim × L × 2 B`` — what a KV cache of the prompt holds;
  refocus scores with ``use_cache=False``, which keeps one layer's K/V at a time, so this is an
  upper bound of the forward's attention state;
* activations: ``L × (2 × hidden + 3 × intermediate) × 2 B`` — the largest live set inside one
  decoder layer (residual stream, normed input, the MLP's gate and up projections and their
  product); attention runs fused (SDPA), so no L × L score matrix is held; plus the prompt's
  input embeddings ``L × hidden × 2 B`` (the cached frame features are spliced into them).

A recommended batch (subsets per forward) for a GPU is
``floor((0.9 × capacity − weights − one video's cached features) / per-subset bytes)``.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PRESENTATIONS = ("images", "video")
SUBSET_SIZES = (8, 16, 32)
CANDIDATES = 512  # candidate frames per video cached by the reward (refocus ingests up to this)
FRAME_SIZE = (384, 683)  # (height, width): 384 px short side of a 16:9 video, as ingested
BYTES = 2  # bf16
USABLE = 0.9  # share of a GPU's memory left for tensors (CUDA context, allocator slack)
GIB = 1 << 30
# Capacity as torch.cuda reports it (total_memory) for the two memory classes of data-centre GPUs
GPUS = {"80 GB": 79.2 * GIB, "141 GB": 139.8 * GIB}
MAX_BATCH = 256  # a recommendation beyond this is capped (no gain from larger forwards)
QWEN_TEMPORAL_PATCH = 2  # frames per temporal patch in Qwen's vision towers
FPS = 2.0  # frame times given to the video processors (refocus samples 2 fps by default)
# A NExT-QA-style question with five options, as refocus.lmm phrases it, to count text tokens
EXAMPLE_PROMPT = (
    "Why did the boy pick up one present from the group of them and move to the sofa?\n"
    "A. share with the girl\nB. approach lady sitting there\nC. unwrap it\n"
    "D. playing with toy train\nE. gesture something\n"
    "Answer with the option's letter from the given choices directly."
)


# --------------------------------------------------------------------------- configs
# Qwen/Qwen2.5-VL-7B-Instruct config.json (model card; the same values are vendored in
# TensorRT-LLM's Qwen2.5-VL tests and ComfyUI's text encoder): text 28 layers of 3584, MLP 18944,
# 28 heads / 4 KV heads, vocab 152064, untied; vision 32 blocks of 1280 (MLP 3420, 16 heads),
# patch 14, merge 2, temporal patch 2, window 112, full attention at 7/15/23/31, out 3584.
def qwen2_5_vl_7b() -> Any:
    from transformers import Qwen2_5_VLConfig

    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
            max_position_embeddings=128000, rms_norm_eps=1e-6, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                             "mrope_section": [16, 24, 24]}),
        vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
            out_hidden_size=3584, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2,
            hidden_act="silu"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=False)


# Qwen/Qwen3-VL-8B-Instruct config.json (model card; vendored in TensorRT-LLM's Qwen3-VL tests):
# text 36 layers of 4096, MLP 12288, 32 heads / 8 KV heads, head_dim 128, vocab 151936, untied,
# interleaved M-RoPE [24, 20, 20], theta 5e6; vision 27 blocks of 1152 (MLP 4304, 16 heads),
# patch 16, merge 2, temporal patch 2, 2304 position embeddings, deepstack at blocks 8/16/24.
def qwen3_vl_8b() -> Any:
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(
            hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
            num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
            max_position_embeddings=262144, rms_norm_eps=1e-6, hidden_act="silu",
            rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                             "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        vision_config=dict(
            depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, in_channels=3,
            out_hidden_size=4096, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
            num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
            hidden_act="gelu_pytorch_tanh"),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
        vision_end_token_id=151653, tie_word_embeddings=False)


# OpenGVLab/InternVL3-2B-hf: transformers' convert_internvl_weights_to_hf.py builds it from
# OpenGVLab/InternVL3-2B (InternViT-300M-448px-V2_5 + Qwen2.5-1.5B, per the model card): text
# Qwen2 28 layers of 1536, MLP 8960, 12 heads / 2 KV heads, vocab 151674 (the InternVL
# tokenizer), untied (the model's top-level tie_word_embeddings false; the untied count is the
# published 2.09 B); vision 24 layers of 1024 (MLP 4096, 16 heads), 448 px, patch 14, layer
# scale, mean pooling; pixel shuffle 0.5 → 256 tokens per 448 px tile; image token 151667.
def internvl3_2b() -> Any:
    from transformers import InternVLConfig

    return InternVLConfig(
        text_config=dict(
            model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, vocab_size=151674,
            max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision_config=dict(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
            num_attention_heads=16, image_size=[448, 448], patch_size=[14, 14],
            use_qk_norm=False, attention_bias=True, layer_scale_init_value=0.1,
            norm_type="layer_norm", use_mean_pooling=True,
            use_absolute_position_embeddings=True),
        downsample_ratio=0.5, projector_hidden_act="gelu", image_token_id=151667,
        image_seq_length=256, tie_word_embeddings=False)


# llava-hf/llava-onevision-qwen2-7b-ov-hf: transformers' convert_llava_onevision_weights_to_hf.py
# (Qwen2-7B-Instruct text: 28 layers of 3584, MLP 18944, 28 heads / 4 KV heads; vocab 152064
# resized by 2 added tokens, padded to a multiple of 64 → 152128; untied) and SigLIP-so400m at
# 384 px with its last layer dropped (26 layers of 1152, MLP 4304, 16 heads, patch 14, no head);
# anyres_max_9 over the 36 grid pinpoints of LlavaOnevisionConfig's default; image newline.
def llava_onevision_7b() -> Any:
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        text_config=dict(
            model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
            num_attention_heads=28, num_key_value_heads=4, vocab_size=152128,
            max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False),
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=1152, image_size=384,
            intermediate_size=4304, num_attention_heads=16, num_hidden_layers=26, patch_size=14,
            vision_use_head=False),
        image_token_index=151646, video_token_index=151647, vision_aspect_ratio="anyres_max_9",
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        use_image_newline_parameter=True, tie_word_embeddings=False)


# --------------------------------------------------------------------------- processors
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
INTERNVL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
LLAVA_SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def word_tokenizer(specials: Sequence[str], extra: dict[str, str] | None = None) -> Any:
    """A word-level tokenizer with the model's special tokens: each special one token, each
    word, digit and punctuation mark one token (as Qwen's BPE splits digits and mostly keeps
    short English words whole). Exact for placeholders; an estimate for the prompt's text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|endoftext|>", *string.ascii_letters, *string.digits,
             *string.punctuation]  # answer letters are single tokens, as in real tokenizers
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=extra or {})
    fast.add_special_tokens({"additional_special_tokens": list(specials)})
    return fast


def qwen2_5_vl_processor() -> Any:
    # preprocessor_config.json: min_pixels 3136, max_pixels 12845056, patch 14, merge 2,
    # temporal patch 2 (the video processor takes the same settings)
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": 3136, "longest_edge": 12845056}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size), tokenizer=word_tokenizer(QWEN_SPECIALS))


def qwen3_vl_processor() -> Any:
    # preprocessor_config.json: size shortest 65536 / longest 16777216, patch 16, merge 2;
    # video_preprocessor_config.json: shortest 4096 / longest 25165824, patch 16, merge 2
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16,
            merge_size=2, temporal_patch_size=2),
        video_processor=Qwen3VLVideoProcessor(
            size={"shortest_edge": 4096, "longest_edge": 25165824}, patch_size=16,
            merge_size=2, temporal_patch_size=2),
        tokenizer=word_tokenizer(QWEN_SPECIALS))


def internvl3_processor() -> Any:
    # preprocessor_config.json: GotOcr2 at 448 px, crop_to_patches on, 1..12 tiles (+ a
    # thumbnail); video_preprocessor_config.json: 448 px, no tiling; 256 tokens per tile/frame
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    tokenizer = word_tokenizer(INTERNVL_SPECIALS, {
        "start_image_token": "<img>", "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1,
            max_patches=12, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
        video_processor=InternVLVideoProcessor(size={"height": 448, "width": 448}),
        tokenizer=tokenizer, image_seq_length=256)


def llava_onevision_processor() -> Any:
    # preprocessor_config.json: 384 px, anyres over the grid pinpoints; processor_config.json:
    # num_image_tokens 729, vision_feature_select_strategy "full", vision_aspect_ratio
    # anyres_max_9; the video processor resizes frames to 384 px (pooled 2× in the model)
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    pinpoints = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": 384, "width": 384}),
        tokenizer=word_tokenizer(LLAVA_SPECIALS), num_image_tokens=729,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")


@dataclass(frozen=True)
class ModelSpec:
    """One reference model: its config, class, processor and how a frame is written."""

    key: str
    hub_id: str
    config: Callable[[], Any]
    model_class: str  # a transformers class name
    processor: Callable[[], Any]
    image_slot: str  # text standing for one image in the prompt
    video_slot: str  # text standing for the whole video
    deepstack: int = 0  # extra per-frame feature maps the LM consumes (Qwen3-VL)


QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
MODELS: dict[str, ModelSpec] = {s.key: s for s in [
    ModelSpec("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", qwen2_5_vl_7b,
              "Qwen2_5_VLForConditionalGeneration", qwen2_5_vl_processor, QWEN_IMAGE, QWEN_VIDEO),
    ModelSpec("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", qwen3_vl_8b,
              "Qwen3VLForConditionalGeneration", qwen3_vl_processor, QWEN_IMAGE, QWEN_VIDEO,
              deepstack=3),
    ModelSpec("internvl3-2b", "OpenGVLab/InternVL3-2B-hf", internvl3_2b,
              "InternVLForConditionalGeneration", internvl3_processor, "<IMG_CONTEXT>\n",
              "<video>\n"),
    ModelSpec("llava-onevision-7b", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
              llava_onevision_7b, "LlavaOnevisionForConditionalGeneration",
              llava_onevision_processor, "<image>\n", "<video>\n"),
]}


# --------------------------------------------------------------------------- counting
@dataclass
class Parameters:
    total: int
    vision: int  # vision tower + projector
    language: int  # embeddings, decoder, head
    bytes: int  # bf16 weights


def meta_model(spec: ModelSpec, config: Any = None) -> Any:
    """The real model class on the meta device: shapes only, no memory, no weights."""
    import torch
    import transformers

    with torch.device("meta"):
        return getattr(transformers, spec.model_class)(config or spec.config())


def count_parameters(spec: ModelSpec) -> Parameters:
    model = meta_model(spec)
    language = model.model.language_model
    lm = sum(p.numel() for p in language.parameters())
    head = model.lm_head.weight
    if head is not language.get_input_embeddings().weight:
        lm += head.numel()
    total = sum(p.numel() for p in model.parameters())
    return Parameters(total, total - lm, lm, total * BYTES)


@dataclass(frozen=True)
class TextShape:
    layers: int
    hidden: int
    intermediate: int
    kv_heads: int
    head_dim: int
    context: int
    vision_out: int  # width of the features the vision side hands the LM


def text_shape(spec: ModelSpec, config: Any = None) -> TextShape:
    config = config or spec.config()
    text = config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return TextShape(text.num_hidden_layers, text.hidden_size, text.intermediate_size,
                     text.num_key_value_heads, head_dim, text.max_position_embeddings,
                     text.hidden_size)


def blank_frames(count: int, size: tuple[int, int]) -> list[np.ndarray]:
    """Distinct uniform frames (the token count depends on size only)."""
    return [np.full((*size, 3), i % 256, dtype=np.uint8) for i in range(count)]


def chat(text: str) -> str:
    return f"<|im_start|>user\n{text}{EXAMPLE_PROMPT}<|im_end|>\n<|im_start|>assistant\n"


def _video_metadata(frames: int) -> Any:
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=frames, fps=FPS, frames_indices=list(range(frames)),
                         height=None, width=None)


@dataclass
class Prompt:
    tokens: int  # the whole prompt
    vision: int  # placeholder tokens filled by vision features
    text: int  # the prompt without any frame


def prompt_tokens(spec: ModelSpec, processor: Any, present: str, frames: int,
                  size: tuple[int, int]) -> Prompt:
    """Run the real processor on ``frames`` blank frames and count its output tokens."""
    tok = processor.tokenizer
    text_only = len(tok(chat(""))["input_ids"])
    pixels = blank_frames(frames, size)
    if present == "images":  # with the processor settings refocus gives frames (its Family)
        family = _family(spec)
        out = processor(text=[chat(spec.image_slot * frames)], images=[pixels],
                        return_tensors="pt", **family.frame_kwargs)
        slot = processor.image_token
    else:
        kwargs: dict[str, Any] = {}
        if spec.key.startswith("qwen"):  # as refocus shows a video to Qwen (refocus/lmm.py):
            # each frame twice, filling one temporal patch, so no two frames are merged
            pixels = [p for p in pixels for _ in range(QWEN_TEMPORAL_PATCH)]
        if "Qwen3VL" in type(processor).__name__ or "Qwen2_5" in type(processor).__name__:
            kwargs = {"video_metadata": [_video_metadata(len(pixels))],
                      "do_sample_frames": False}
        out = processor(text=[chat(spec.video_slot)], videos=[np.stack(pixels)],
                        return_tensors="pt", **kwargs)
        slot = getattr(processor, "video_token", None) or processor.image_token
    ids = out["input_ids"][0].numpy()
    slot_id = tok.convert_tokens_to_ids(slot)
    if spec.key.startswith("internvl"):  # InternVL's video frames use the image token
        slot_id = tok.convert_tokens_to_ids(processor.image_token)
    return Prompt(int(len(ids)), int((ids == slot_id).sum()), text_only)


# --------------------------------------------------------------------------- memory
def kv_bytes(shape: TextShape, tokens: int) -> int:
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * tokens * BYTES


def activation_bytes(shape: TextShape, tokens: int) -> int:
    """Largest live set in one decoder layer plus the prompt's input embeddings."""
    return tokens * (2 * shape.hidden + 3 * shape.intermediate) * BYTES \
        + tokens * shape.hidden * BYTES


FORMULAS = ("K/V = layers × 2 × kv_heads × head_dim × tokens × 2 B; activations = tokens × "
            "(3 × hidden + 3 × intermediate) × 2 B; batch = (0.9 × GPU − weights − one video's "
            "cache) / (K/V + activations)")


def recommended_batch(capacity: float, weights: int, video_cache: int, per_subset: int) -> int:
    room = USABLE * capacity - weights - video_cache
    return max(0, min(MAX_BATCH, math.floor(room / per_subset)))


@dataclass
class SubsetRow:
    k: int
    prompt_tokens: int
    vision_tokens: int
    kv_bytes: int
    activation_bytes: int
    fits_context: bool
    batch: dict[str, int] = field(default_factory=dict)


@dataclass
class PresentationRow:
    present: str
    tokens_per_frame: float  # vision tokens per frame
    tokens_per_video: float  # vision tokens once per video (LLaVA-OV: its newline)
    prompt_tokens_per_frame: float  # all tokens a frame adds (markers, stamps included)
    lone_image_tokens: int | None  # a single frame alone (LLaVA-OV anyres differs)
    max_frames: int  # the most frames whose prompt fits the model's context
    feature_bytes_per_frame: int
    video_cache_bytes: int  # CANDIDATES frames' features
    subsets: list[SubsetRow]


@dataclass
class ModelBudget:
    key: str
    hub_id: str
    parameters: Parameters
    shape: TextShape
    frame_size: tuple[int, int]
    presentations: list[PresentationRow]
    notes: list[str]


def slope(prompts: dict[int, Prompt], what: str) -> tuple[float, float]:
    """(tokens per frame, tokens regardless of frames) of a count over the subset sizes:
    the line through the smallest and largest k (through the origin, for vision tokens, when
    there is one k)."""
    low, high = min(prompts), max(prompts)
    y = {k: getattr(p, what) for k, p in prompts.items()}
    if low == high:
        base = prompts[low].text if what == "tokens" else 0
        return (y[high] - base) / high, base
    per = (y[high] - y[low]) / (high - low)
    return per, y[high] - per * high


def feature_bytes(spec: ModelSpec, shape: TextShape, tokens: float) -> int:
    """Bytes of the vision features (after the projector) for ``tokens`` placeholders, with
    the deepstack maps Qwen3-VL adds at three LM layers."""
    return int(round(tokens * shape.vision_out * BYTES * (1 + spec.deepstack)))


def budget(spec: ModelSpec, size: tuple[int, int] = FRAME_SIZE,
           subset_sizes: Sequence[int] = SUBSET_SIZES, candidates: int = CANDIDATES,
           gpus: dict[str, float] | None = None) -> ModelBudget:
    gpus = GPUS if gpus is None else gpus
    config = spec.config()
    params = count_parameters(spec)
    shape = text_shape(spec, config)
    processor = spec.processor()
    rows = []
    for present in PRESENTATIONS:
        prompts = {k: prompt_tokens(spec, processor, present, k, size) for k in subset_sizes}
        per_frame, per_video = slope(prompts, "vision")
        per_frame_all, fixed = slope(prompts, "tokens")
        room = shape.context - fixed
        max_frames = int(room // per_frame_all) if per_frame_all else 0
        lone = prompt_tokens(spec, processor, present, 1, size).vision \
            if present == "images" else None
        frame_bytes = feature_bytes(spec, shape, per_frame)
        cache = frame_bytes * candidates
        subsets = []
        for k, p in prompts.items():
            kv, act = kv_bytes(shape, p.tokens), activation_bytes(shape, p.tokens)
            batch = {name: recommended_batch(cap, params.bytes, cache, kv + act)
                     for name, cap in gpus.items()}
            subsets.append(SubsetRow(k, p.tokens, p.vision, kv, act, p.tokens <= shape.context,
                                     batch))
        rows.append(PresentationRow(present, per_frame, per_video, per_frame_all, lone,
                                    max_frames, frame_bytes, cache, subsets))
    return ModelBudget(spec.key, spec.hub_id, params, shape, size, rows, notes(spec))


def _family(spec: ModelSpec) -> Any:
    """How refocus shows this model frames (imported here: ``--help`` stays torch-free)."""
    from refocus.lmm_families import family_of

    return family_of(spec.config(), spec.key)


def notes(spec: ModelSpec) -> list[str]:
    out = []
    if spec.key.startswith("qwen"):
        out.append("video: refocus repeats each frame to fill the temporal patch of 2, so no "
                   "two frames are merged and each is cached on its own (an image's tokens)")
    if spec.deepstack:
        out.append(f"features include {spec.deepstack} deepstack maps per token "
                   "(the LM adds them at its first layers)")
    if spec.key.startswith("llava"):
        out.append("images: a lone frame is tiled (anyres); each of several is 729 + 1 tokens")
    if spec.key.startswith("internvl"):
        out.append("images: one 448 px tile a frame (crop_to_patches off, as refocus gives "
                   "frames), 256 tokens; its default tiling would cost 3 tiles for 16:9")
    if _family(spec).video is None:
        out.append("video: the model's own video input, for comparison; refocus refuses "
                   "--present video for this family and shows frames as images")
    return out


def all_budgets(keys: Sequence[str] | None = None, size: tuple[int, int] = FRAME_SIZE,
                ) -> list[ModelBudget]:
    return [budget(MODELS[k], size) for k in (keys or list(MODELS))]


def as_json(budgets: Sequence[ModelBudget]) -> list[dict[str, Any]]:
    return [asdict(b) for b in budgets]


# --------------------------------------------------------------------------- tables
def gb(n: float) -> str:
    return f"{n / 1e9:.2f}" if n < 10e9 else f"{n / 1e9:.1f}"


TABLE_COLUMNS = ("model", "params (bf16 GB)", "frames as", "tokens/frame", "feature MB/frame",
                 "max k in context", "cache GB/video", "k", "prompt tokens", "K/V GB",
                 "activations GB",
                 *[f"batch @ {g}" for g in GPUS])


def table_rows(budgets: Sequence[ModelBudget]) -> list[list[str]]:
    rows = []
    for b in budgets:
        for p in b.presentations:
            per_frame = f"{p.tokens_per_frame:g}" + (
                f" + {p.tokens_per_video:g}" if round(p.tokens_per_video) else "")
            if p.lone_image_tokens is not None and p.lone_image_tokens != p.tokens_per_frame:
                per_frame += f" (alone: {p.lone_image_tokens})"
            for i, s in enumerate(p.subsets):
                first = i == 0
                batches = [str(s.batch[g]) if s.fits_context else "over context" for g in GPUS]
                rows.append([
                    b.key if first and p.present == PRESENTATIONS[0] else "",
                    f"{b.parameters.total / 1e9:.2f} B ({gb(b.parameters.bytes)})"
                    if first and p.present == PRESENTATIONS[0] else "",
                    p.present if first else "", per_frame if first else "",
                    f"{p.feature_bytes_per_frame / 1e6:.2f}" if first else "",
                    str(p.max_frames) if first else "",
                    gb(p.video_cache_bytes) if first else "",
                    str(s.k), str(s.prompt_tokens), gb(s.kv_bytes), gb(s.activation_bytes),
                    *batches])
    return rows


def markdown(budgets: Sequence[ModelBudget]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join("---" if i < 3 else "---:" for i in range(len(TABLE_COLUMNS))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(budgets)]
    return "\n".join(lines)
