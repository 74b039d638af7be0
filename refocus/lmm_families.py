"""The reference-LMM families refocus scores through its vision cache: one ``Family`` each, chosen
by the model config's ``model_type``. A family says how its processor is asked for frames, how
the vision output is cut into per-frame features, and how cached features are handed back to
the model's forward as ``mm_encoder_outputs`` — the one place to look (or to add a video
presentation) for a family.

The per-frame cut is the same for every family: the forward concatenates its vision output in
prompt order and scatters it onto the image-feature tokens, so the output, flattened to rows,
is split by each frame's count of those tokens (learned from the processor itself). That
covers a row per image (Qwen), a row per prompt (Idefics3 / SmolVLM) and a row per tile
(InternVL, Gemma3). Extra per-token outputs (Qwen3-VL's deepstack features, one per chosen
vision layer) ride along side by side in the same rows: a frame's ``tokens`` are
``[n_tokens, hidden × (1 + deepstack layers)]``, so a reference store keeps them unchanged.

**Presentation.** Each family declares how it is shown frames by default (``present``), as its
model card and lmms-eval feed it video: ``"video"`` — the model's native video input, through
the processor's ``videos=`` with the frames' real times — for Qwen2-VL, Qwen2.5-VL, Qwen3-VL and
LLaVA-OneVision; ``"images"`` — interleaved images, each after a "frame at 12.5 s" text marker,
a fallback — for the families refocus shows no native video (``video=None``). In video mode a
frame's features are its own: Qwen's vision tower attends within one temporal patch, and each
frame is repeated to fill its temporal patch (2 frames), so no two frames are merged; LLaVA-
OneVision pools each frame alone and ends the video with one learned newline row. Qwen3-VL's
video processor shares one pixel budget over the clip, so a frame's size would depend on how
many are shown: each frame gets the share it has in a 32-frame clip (``budget_frames``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stores.errors import UserError


@dataclass(frozen=True)
class Family:
    label: str  # as the README names it
    model_types: tuple[str, ...]  # config.model_type values
    concatenated: bool = False  # forward wants one [rows, hidden] tensor, not a tuple per frame
    deepstack: bool = False  # Qwen3-VL: per-layer deepstack features beside the main ones
    token_types: str | None = None  # the processor output the forward takes as token types
    # processor settings for frames (as the model card feeds video frames); see FAMILIES
    frame_kwargs: dict[str, Any] = field(default_factory=dict)
    present: str = "images"  # the default presentation: "video" or "images"
    video: str | None = None  # the native video input refocus uses ("qwen", "onevision")
    video_newline: bool = False  # the video's features end with one learned newline row
    # the video processor shares one pixel budget over the clip's frames (Qwen3-VL): each frame
    # gets the share it has in a clip of this many processor frames, whatever the clip's length
    budget_frames: int | None = None
    video_kwargs: dict[str, Any] = field(default_factory=dict)  # video processor settings

    def parts(self, config: Any) -> int:
        """How many hidden-size blocks sit side by side in a frame's cached tokens."""
        if not self.deepstack:
            return 1
        return 1 + len(config.vision_config.deepstack_visual_indexes)

    def per_frame(self, output: Any, counts: Sequence[int], where: str,
                  video: bool = False) -> list[torch.Tensor]:
        """The vision output (``get_image_features`` / ``get_video_features``, one video, with
        ``return_dict=True``) as one tensor per frame, ``counts[i]`` rows each."""
        drop = 1 if video and self.video_newline else 0  # the video's closing newline row
        blocks = [_rows(output.pooler_output)]
        blocks[0] = blocks[0][:blocks[0].shape[0] - drop]
        if self.deepstack:
            blocks += [_rows(layer) for layer in output.deepstack_features]
        if blocks[0].shape[0] != sum(counts):
            raise UserError(f"{where}: its vision output has {blocks[0].shape[0]} feature rows "
                            f"for {sum(counts)} image tokens; refocus cannot cut it per frame "
                            "(use the uncached path)")
        rows = torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]
        return list(rows.split(list(counts)))

    def encoder_outputs(self, frames: Sequence[torch.Tensor], parts: int) -> Any:
        """Cached per-frame tokens as the forward's ``mm_encoder_outputs["image"]``."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self.deepstack:
            from transformers.models.qwen3_vl.modeling_qwen3_vl import (
                BaseModelOutputWithDeepstackFeatures,
            )

            split = [f.chunk(parts, dim=-1) for f in frames]
            return BaseModelOutputWithDeepstackFeatures(
                pooler_output=tuple(s[0] for s in split),
                deepstack_features=[tuple(s[layer] for s in split)
                                    for layer in range(1, parts)])
        if self.concatenated:
            return BaseModelOutputWithPooling(pooler_output=torch.cat(list(frames)))
        return BaseModelOutputWithPooling(pooler_output=tuple(frames))

    def video_outputs(self, videos: Sequence[Sequence[torch.Tensor]], parts: int,
                      newline: torch.Tensor | None) -> Any:
        """Cached per-frame tokens, one video per item, as ``mm_encoder_outputs["video"]``:
        Qwen takes a tensor per video (deepstack beside it); LLaVA-OneVision one
        ``[1, rows, hidden]`` tensor, each video closed by its ``newline`` row."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if self.video_newline:
            rows = [torch.cat([*frames, newline[None]]) for frames in videos]  # type: ignore
            return BaseModelOutputWithPooling(pooler_output=torch.cat(rows)[None])
        return self.encoder_outputs([torch.cat(list(frames)) for frames in videos], parts)


def _rows(features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-image, per-prompt or per-tile features flattened to [rows, hidden], in order."""
    if isinstance(features, torch.Tensor):
        return features.reshape(-1, features.shape[-1])
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in features])


QWEN_TYPES = "mm_token_type_ids"  # Qwen's rope positions read which tokens are an image's
# a frame's size never depends on the clip's length (the per-frame cap shares a budget)
QWEN_VIDEO = {"cap_pixels_per_frame": False}
FAMILIES = (
    # Qwen's model cards and lmms-eval feed video through the video processor: Qwen2-VL without
    # times, Qwen2.5-VL with its time step (second_per_grid_ts), Qwen3-VL with "<t seconds>"
    Family("Qwen2-VL", ("qwen2_vl",), token_types=QWEN_TYPES, present="video", video="qwen",
           video_kwargs=QWEN_VIDEO),
    Family("Qwen2.5-VL", ("qwen2_5_vl",), token_types=QWEN_TYPES, present="video",
           video="qwen", video_kwargs=QWEN_VIDEO),
    Family("Qwen3-VL", ("qwen3_vl",), deepstack=True, token_types=QWEN_TYPES, present="video",
           video="qwen", budget_frames=64, video_kwargs=QWEN_VIDEO),  # 32 frames, twice each
    # lmms-eval's llava_onevision reads video as video: each frame pooled 2×2 (196 tokens at
    # 384 px, against 729 an image), no times
    Family("LLaVA-OneVision", ("llava_onevision",), present="video", video="onevision",
           video_newline=True),
    Family("LLaVA", ("llava",)),
    # one 448 px tile a frame, as the InternVL3 model card reads video (load_video max_num=1)
    # and as transformers' InternVL video processor does; tiling (crop_to_patches) would cost
    # up to 13× the tokens a frame
    Family("InternVL", ("internvl",), concatenated=True,
           frame_kwargs={"crop_to_patches": False}),
    # SmolVLM's video processor does not split frames into tiles; neither do we
    Family("SmolVLM", ("smolvlm",), frame_kwargs={"do_image_splitting": False}),
    # Idefics3 has no video recipe: its frames are split into tiles as its images are
    Family("Idefics3", ("idefics3",)),
    # image tokens attend to each other both ways, read from token_type_ids
    Family("Gemma3", ("gemma3",), concatenated=True, token_types="token_type_ids"),
)
BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED = ", ".join(f.label for f in FAMILIES)


def family_of(config: Any, name: str) -> Family:
    """The model's family, or one line naming its class and the supported families."""
    model_type = getattr(config, "model_type", None)
    family = BY_MODEL_TYPE.get(model_type or "")
    if family is None:
        classes = getattr(config, "architectures", None) or [type(config).__name__]
        raise UserError(f"{name}: {classes[0]} (model_type {model_type!r}) is not a reference "
                        f"family refocus can score; supported: {SUPPORTED}")
    return family
