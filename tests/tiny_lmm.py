"""Tiny, random Hugging Face video-LLMs built from configs, with a tokenizer trained here:
the real model classes and processors at a size that runs in a test (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# A Qwen-style chat template; image parts become the processor's image placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}@IMAGE@"
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


def build_tokenizer(specials: list[str], split_letters: bool = False,
                    vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A small byte-level BPE trained on a few sentences, plus the model's special tokens.
    ``split_letters`` makes a tokenizer in which 'A' is not a single token."""
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
                                   pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


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
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)
    template = CHAT_TEMPLATE.replace("@IMAGE@", "<|vision_start|><|image_pad|><|vision_end|>")
    processor = Qwen2VLProcessor(image_processor=images, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(),
                                 chat_template=template)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


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
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    images = LlavaOnevisionImageProcessor(
        size={"height": 56, "width": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=config.image_grid_pinpoints)
    template = CHAT_TEMPLATE.replace("@IMAGE@", "<image>")
    processor = LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(),
                                        chat_template=template, num_image_tokens=16,
                                        vision_feature_select_strategy="full")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
