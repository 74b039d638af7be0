"""Tiny, random Hugging Face video-LLMs built from configs, with a tokenizer trained here:
the real model classes and processors at a size that runs in a test (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# A Qwen-style chat template; image parts become the processor's image placeholder, video
# parts its video placeholder (@VIDEO@: nothing for a family without one).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}@IMAGE@"
    "{% elif part['type'] == 'video' %}@VIDEO@"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SENTENCES = [
    "What colour was the circle? A. red B. green C. blue D. yellow E. purple",
    "Answer with the option's letter from the given choices directly.",
    "Which appeared first, the square or the triangle? A B C D E",
    "How many shapes appeared in the video? one two three four five",
    "A person opens a door and walks into the kitchen to cook dinner.",
] * 20


def build_tokenizer(specials: list[str], split_letters: bool = False, vocab_size: int = 320,
                    named: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on a few sentences, plus the model's special tokens.
    ``split_letters`` makes a tokenizer in which 'A' is not a single token; ``named`` special
    tokens become attributes (``tokenizer.boi_token``…) as some processors expect."""
    tok = Tokenizer(models.BPE())
    if split_letters:
        tok.normalizer = normalizers.Sequence(
            [normalizers.Replace(c, f"{c.lower()} {c.lower()}") for c in "ABCDE"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", extra_special_tokens=named or {})
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


WEIGHT_STD = 0.2  # weights redrawn at this scale: the frames move the logits visibly


def save(model_class: Any, config: Any, processor: Any, folder: Path, seed: int) -> Path:
    """Build the model with its matrices (ndim ≥ 2) redrawn at ``WEIGHT_STD`` (at the
    default init of 0.02 the frames barely move the logits, which would hide a cache bug;
    norms and biases keep their init), and save it with its processor."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                torch.nn.init.normal_(p, std=WEIGHT_STD)
    model.save_pretrained(folder)
    processor.chat_template = processor.chat_template.replace("@VIDEO@", "")
    processor.save_pretrained(folder)
    return folder


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def build_qwen2_vl(folder: Path, split_letters: bool = False, seed: int = 0,
                   max_positions: int = 2048) -> Path:
    """Qwen2-VL: 2 text layers of width 64, a 2-layer vision tower; 112 px frames → 16 tokens."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer(QWEN_SPECIALS, split_letters)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=max_positions,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**QWEN_VIDEO_SIZE),
                                 chat_template=QWEN_TEMPLATE)
    return save(Qwen2VLForConditionalGeneration, config, processor, folder, seed)


LLAVA_SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]


def build_llava_onevision(folder: Path, seed: int = 0) -> Path:
    """LLaVA-OneVision: a 2-layer SigLIP at 56 px (patch 14 → 16 tokens a frame) and a
    2-layer Qwen2 of width 64."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    tokenizer = build_tokenizer(LLAVA_SPECIALS)
    config = LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=[[56, 56], [56, 112], [112, 56], [112, 112]],
        vision_feature_layer=-1, vision_feature_select_strategy="full")
    images = LlavaOnevisionImageProcessor(
        size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=config.image_grid_pinpoints)
    template = CHAT_TEMPLATE.replace("@IMAGE@", "<image>").replace("@VIDEO@", "<video>")
    processor = LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(
                                            size={"height": 56, "width": 56}),
                                        chat_template=template, num_image_tokens=16,
                                        vision_feature_select_strategy="full")
    return save(LlavaOnevisionForConditionalGeneration, config, processor, folder, seed)


def _qwen_text(tokenizer: PreTrainedTokenizerFast, max_positions: int = 2048,
               **extra: Any) -> dict:
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=max_positions, **extra)


def _qwen_ids(tokenizer: PreTrainedTokenizerFast) -> dict:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"])


QWEN_TEMPLATE = CHAT_TEMPLATE.replace(
    "@IMAGE@", "<|vision_start|><|image_pad|><|vision_end|>").replace(
    "@VIDEO@", "<|vision_start|><|video_pad|><|vision_end|>")
QWEN_VIDEO_SIZE = dict(size={"shortest_edge": 56 * 56, "longest_edge": 112 * 112})


def build_qwen2_5_vl(folder: Path, seed: int = 0) -> Path:
    """Qwen2.5-VL: 2 text layers of width 64, a 2-layer windowed vision tower; 112 px → 16
    tokens a frame."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = build_tokenizer(QWEN_SPECIALS)
    config = Qwen2_5_VLConfig(
        text_config=_qwen_text(tokenizer, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]),
        **_qwen_ids(tokenizer), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(**QWEN_VIDEO_SIZE),
        chat_template=QWEN_TEMPLATE)
    return save(Qwen2_5_VLForConditionalGeneration, config, processor, folder, seed)


def build_qwen3_vl(folder: Path, seed: int = 0) -> Path:
    """Qwen3-VL: patch 16, deepstack features from both vision layers; 128 px → 16 tokens."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = build_tokenizer(QWEN_SPECIALS)
    config = Qwen3VLConfig(
        text_config=_qwen_text(tokenizer, head_dim=16, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
            "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        **_qwen_ids(tokenizer), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, min_pixels=64 * 64,
                                              max_pixels=128 * 128),
        tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(
            patch_size=16, size={"shortest_edge": 64 * 64 * 64, "longest_edge": 128 * 128 * 64}),
        chat_template=QWEN_TEMPLATE)
    return save(Qwen3VLForConditionalGeneration, config, processor, folder, seed)


def _qwen2_text(tokenizer: PreTrainedTokenizerFast) -> dict:
    return dict(model_type="qwen2", **_qwen_text(tokenizer))


def build_llava(folder: Path, seed: int = 0) -> Path:
    """LLaVA: a 2-layer CLIP at 56 px (patch 14 → 16 tokens, the class token dropped)."""
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer(LLAVA_SPECIALS)
    config = LlavaConfig(
        text_config=_qwen2_text(tokenizer),
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=56,
                           patch_size=14, projection_dim=32),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1, vision_feature_select_strategy="default")
    images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56,
                                                                       "width": 56})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1,  # CLIP's class token
                               chat_template=CHAT_TEMPLATE.replace("@IMAGE@", "<image>"))
    return save(LlavaForConditionalGeneration, config, processor, folder, seed)


INTERNVL_NAMED = {"start_image_token": "<img>", "end_image_token": "</img>",
                  "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


def build_internvl(folder: Path, seed: int = 0) -> Path:
    """InternVL (InternVL3 as transformers ports it): a 2-layer InternViT at 56 px tiles
    (patch 14, pixel shuffle 0.5 → 4 tokens a tile); the processor tiles each frame."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = build_tokenizer(["<|im_start|>", "<|im_end|>"], named=INTERNVL_NAMED)
    config = InternVLConfig(
        text_config=_qwen2_text(tokenizer),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=[56, 56], patch_size=[14, 14]),
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4)
    images = GotOcr2ImageProcessor(size={"height": 56, "width": 56}, max_patches=4)
    processor = InternVLProcessor(
        image_processor=images, tokenizer=tokenizer, image_seq_length=4,
        video_processor=InternVLVideoProcessor(size={"height": 56, "width": 56}),
        chat_template=CHAT_TEMPLATE.replace("@IMAGE@", "<IMG_CONTEXT>\n"))
    return save(InternVLForConditionalGeneration, config, processor, folder, seed)


IDEFICS_SPECIALS = ["<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
                    "<global-img>", "<end_of_utterance>"]


def _idefics_config(config_class: Any, tokenizer: PreTrainedTokenizerFast) -> Any:
    return config_class(
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=56, patch_size=14),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2,
        pad_token_id=tokenizer.pad_token_id)


def build_idefics3(folder: Path, seed: int = 0) -> Path:
    """Idefics3: a 2-layer SigLIP at 56 px tiles (patch 14, pixel shuffle 2 → 4 tokens a
    tile); the processor splits each frame into tiles plus a global view."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tokenizer = build_tokenizer(IDEFICS_SPECIALS)
    images = Idefics3ImageProcessor(size={"longest_edge": 112},
                                    max_image_size={"longest_edge": 56})
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE.replace("@IMAGE@", "<image>"))
    return save(Idefics3ForConditionalGeneration, _idefics_config(Idefics3Config, tokenizer),
                processor, folder, seed)


def build_smolvlm(folder: Path, seed: int = 0) -> Path:
    """SmolVLM: as Idefics3 (its processor needs ``num2words``)."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tokenizer = build_tokenizer(IDEFICS_SPECIALS)
    images = SmolVLMImageProcessor(size={"longest_edge": 112},
                                   max_image_size={"longest_edge": 56})
    processor = SmolVLMProcessor(
        image_processor=images, tokenizer=tokenizer, image_seq_len=4,
        video_processor=SmolVLMVideoProcessor(size={"longest_edge": 56},
                                              max_image_size={"longest_edge": 56}),
        chat_template=CHAT_TEMPLATE.replace("@IMAGE@", "<image>"))
    return save(SmolVLMForConditionalGeneration, _idefics_config(SmolVLMConfig, tokenizer),
                processor, folder, seed)


GEMMA_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
               "image_token": "<image_soft_token>"}


def build_gemma3(folder: Path, seed: int = 0) -> Path:
    """Gemma3: a 2-layer SigLIP at 56 px (patch 14 → 16 tokens), bidirectional attention
    over each image's tokens (token_type_ids)."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessor,
        Gemma3Processor,
    )

    tokenizer = build_tokenizer(["<|im_start|>", "<|im_end|>"], named=GEMMA_NAMED)
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                         layer_types=["sliding_attention", "full_attention"],
                         max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=32,
                           intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14),
        mm_tokens_per_image=16,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"))
    images = Gemma3ImageProcessor(size={"height": 56, "width": 56})
    processor = Gemma3Processor(image_processor=images, tokenizer=tokenizer,
                                image_seq_length=16,
                                chat_template=CHAT_TEMPLATE.replace("@IMAGE@",
                                                                    "<start_of_image>"))
    return save(Gemma3ForConditionalGeneration, config, processor, folder, seed)


BUILDERS = {"qwen2_vl": build_qwen2_vl, "qwen2_5_vl": build_qwen2_5_vl,
            "qwen3_vl": build_qwen3_vl, "llava_onevision": build_llava_onevision,
            "llava": build_llava, "internvl": build_internvl, "idefics3": build_idefics3,
            "smolvlm": build_smolvlm, "gemma3": build_gemma3}
