"""refocus-synth-vlm: a small LLaVA trained here to answer the synthetic world's questions.

* **Vision** — the bundled open_clip encoder (``refocus-synth``) converted weight for weight
  into a transformers ``CLIPVisionModel`` (frozen): 64 px frames, patch 8 → 64 patch tokens plus
  the class token, all 65 kept (``vision_feature_select_strategy="full"``); the processor is a
  ``CLIPImageProcessor`` that prepares pixels as the encoder does (bicubic resize of the short
  side to 64, centre crop, OpenAI CLIP mean/std).
* **Language** — a small Qwen2 over a word-level tokenizer of the synthetic world's
  vocabulary (every option letter one token), with a chat template that renders what
  ``refocus.lmm.LMMScorer.chat`` sends: a "frame at 12.5 s: " marker and an ``<image>`` per
  frame, then the question, its lettered options and the instruction.
* **Training** (``train_vlm``, ``refocus train-vlm``) — its own synthetic corpus (another seed
  than the demo's), ingested with the default settings so the frames are the shard JPEGs the
  reward path reads; the frozen tower runs once over every candidate frame and the projector
  and language model train from that cache. Stage 1 (``align_projector``): the projector
  alone puts each frame's class token on the word embeddings of what the frame shows (and
  every patch token on one fixed word's), so frames read like words. Then text-only
  "Pick X." examples (letters link to options); then questions, each frame shown as its
  class token alone (short sequences, fast steps), and at last as every token, as the
  scorer sends it: evidence frames in time order first, then random and evenly spaced
  subsets mixed in (the answer stays the true one: without the evidence the model should
  be unsure). Most questions are drawn anew from the video's synthetic plan
  (``fresh_question``), so 180 videos teach more than their few manifest questions.
  Resumable (a checkpoint in the output folder), with ``metrics.jsonl``, ``training.png``,
  ``report.json`` and ``README.md``; the model lands in ``DIR/model`` (``save_pretrained``)
  and is measured on the validation split through ``LMMScorer`` itself.
* **Name** — ``lmm:refocus-synth-vlm`` resolves to the bundled asset folder
  (``resolve_lmm`` / ``load_lmm``), which then loads exactly as any hub model does.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.encoder import ASSETS, SYNTH_ENCODER, Encoder, load_encoder
from pipelines.vlm_settings import TextSettings, VLMSettings
from stores.errors import UserError

VLM_NAME = "refocus-synth-vlm"
VLM_ASSET = ASSETS / VLM_NAME
VLM_KIND = "vlm"  # the marker of a train-vlm output folder (stores/owned.py)
MODEL_DIR = "model"

IMAGE_TOKEN = "<image>"
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN]
UNKNOWN = "[UNK]"
# What LMMScorer.chat sends, rendered: an <image> per image part, text parts as they are.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Word-level pieces: a digit, a word, a punctuation mark (whitespace dropped).
PIECES = r"\d|\w+|[^\w\s]"
WARMUP_QUESTION = "Pick {}."  # text-only examples: the letter of the named option


def resolve_lmm(spec: str) -> str:
    """The model folder or hub id an ``lmm:`` target names: the bundled VLM's name is its
    asset folder; anything else is unchanged."""
    return str(VLM_ASSET) if spec == VLM_NAME else spec


def load_lmm(spec: str, **kwargs: Any) -> Any:
    """``LMMScorer.load`` of ``spec`` (through ``resolve_lmm``), keeping the name given."""
    from refocus.lmm import LMMScorer

    scorer = LMMScorer.load(resolve_lmm(spec), **kwargs)
    scorer.name = spec
    return scorer


# ----------------------------------------------------------------------------- the model

def vocabulary_texts() -> list[str]:
    """Every text the model is shown: the synthetic world's questions and options, the
    scorer's prompt and markers, the warm-up prompts, the chat roles."""
    from pipelines.synth import COLOURS, SHAPES, _count_word
    from refocus.lmm import INSTRUCTION, LETTERS, MARKER

    names = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    words = [*COLOURS, *SHAPES, *names, *(_count_word(n) for n in range(8))]
    texts = [f"What colour was the {s}?" for s in SHAPES]
    texts += [f"What shape was the {c} one?" for c in COLOURS]
    texts += ["Which shape appeared first?", "Which shape appeared last?"]
    texts += [f"How many {c} shapes appeared?" for c in COLOURS]
    texts += [f"How many {s}s appeared?" for s in SHAPES]
    texts += [f"What appeared right after the {n}?" for n in names]
    texts += [WARMUP_QUESTION.format(w) for w in words]
    texts += [INSTRUCTION, " ".join(LETTERS), " ".join(f"{x}." for x in LETTERS)]
    texts += [MARKER.format(t / 10) for t in range(100)]
    texts += ["user", "assistant", "system", *words]
    return texts


def build_tokenizer() -> Any:
    """A word-level tokenizer over ``vocabulary_texts`` (digits one by one, punctuation
    apart), plus the chat template's special tokens; every option letter is one token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="removed", invert=True)
    trainer = trainers.WordLevelTrainer(special_tokens=[*SPECIALS, UNKNOWN])
    tok.train_from_iterator(vocabulary_texts(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=UNKNOWN)
    fast.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return fast


def vision_config(encoder: Encoder) -> dict[str, Any]:
    """The CLIPVisionConfig of the open_clip encoder's ViT (refused when it is not one
    transformers' CLIP can hold)."""
    vision = encoder.identity["config"]["vision_cfg"]
    width, patch, size = int(vision["width"]), int(vision["patch_size"]), int(vision["image_size"])
    heads = width // int(vision.get("head_width", 64))
    visual = encoder.model.visual
    if getattr(visual, "global_average_pool", False) or getattr(visual, "attn_pool", None):
        raise UserError(f"{encoder.identity['model']}: its ViT pools otherwise than by the "
                        "class token; not convertible to CLIP")
    return dict(model_type="clip_vision_model", hidden_size=width,
                intermediate_size=int(width * float(vision.get("mlp_ratio", 4.0))),
                num_hidden_layers=int(vision["layers"]), num_attention_heads=heads,
                image_size=size, patch_size=patch, hidden_act="gelu", layer_norm_eps=1e-5,
                projection_dim=int(encoder.identity["dim"]))


def convert_tower(visual: torch.nn.Module, layers: int) -> dict[str, torch.Tensor]:
    """open_clip ViT weights as a ``CLIPVisionModelWithProjection`` state dict (keys under
    ``vision_model.`` plus ``visual_projection.weight``)."""
    src = {k: v.detach().float().clone() for k, v in visual.state_dict().items()}
    out = {
        "embeddings.patch_embedding.weight": src["conv1.weight"],
        "embeddings.class_embedding": src["class_embedding"],
        "embeddings.position_embedding.weight": src["positional_embedding"],
        "pre_layrnorm.weight": src["ln_pre.weight"], "pre_layrnorm.bias": src["ln_pre.bias"],
        "post_layernorm.weight": src["ln_post.weight"],
        "post_layernorm.bias": src["ln_post.bias"],
    }
    for i in range(layers):
        a, b = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        q, k, v = src[a + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = src[a + "attn.in_proj_bias"].chunk(3)
        for name, w, bias in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
            out[f"{b}self_attn.{name}_proj.weight"] = w
            out[f"{b}self_attn.{name}_proj.bias"] = bias
        pairs = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                 "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
        for hf, oc in pairs.items():
            out[f"{b}{hf}.weight"] = src[f"{a}{oc}.weight"]
            out[f"{b}{hf}.bias"] = src[f"{a}{oc}.bias"]
    state = {f"vision_model.{k}": v for k, v in out.items()}
    state["visual_projection.weight"] = src["proj"].t().contiguous()
    return state


def clip_tower(encoder: Encoder) -> Any:
    """The encoder's ViT as a transformers ``CLIPVisionModelWithProjection``."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(**vision_config(encoder))
    tower = CLIPVisionModelWithProjection(config).eval()
    missing, unexpected = tower.load_state_dict(
        convert_tower(encoder.model.visual, config.num_hidden_layers), strict=False)
    if unexpected or [m for m in missing if "position_ids" not in m]:
        raise UserError(f"{encoder.identity['model']}: conversion left {missing or unexpected}")
    return tower


def image_processor(encoder: Encoder) -> Any:
    """A CLIP image processor that prepares pixels as the encoder's own preprocessing does
    (bicubic resize of the short side, centre crop, rescale, mean/std; transformers' default
    backend, as ``AutoProcessor`` loads it: within one grey level of open_clip's PIL resize)."""
    from transformers import CLIPImageProcessor

    pre = encoder.identity["preprocess"]
    height, width = pre["size"] if isinstance(pre["size"], list) else (pre["size"],) * 2
    if pre.get("interpolation", "bicubic") != "bicubic" or pre.get("resize_mode",
                                                                    "shortest") != "shortest":
        raise UserError(f"{encoder.identity['model']}: preprocessing {pre} is not CLIP's")
    return CLIPImageProcessor(size={"shortest_edge": int(height)},
                                 crop_size={"height": int(height), "width": int(width)},
                                 image_mean=list(pre["mean"]), image_std=list(pre["std"]),
                                 resample=3, do_convert_rgb=True)


def build_model(text: TextSettings = TextSettings(), seed: int = 0,
                encoder: Encoder | None = None) -> tuple[Any, Any]:
    """(LlavaForConditionalGeneration, LlavaProcessor): the converted frozen tower, a fresh
    projector and Qwen2 language model, the word-level tokenizer and chat template."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    encoder = encoder or load_encoder(SYNTH_ENCODER, device="cpu")
    tokenizer = build_tokenizer()
    vision = vision_config(encoder)
    config = LlavaConfig(
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=text.hidden,
                         intermediate_size=text.intermediate, num_hidden_layers=text.layers,
                         num_attention_heads=text.heads, num_key_value_heads=text.heads,
                         max_position_embeddings=text.max_positions, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, text.init_std)
    tower = clip_tower(encoder)
    own = model.model.vision_tower
    prefix = "" if "embeddings.class_embedding" in own.state_dict() else "vision_model."
    own.load_state_dict({prefix + k[len("vision_model."):]: v
                         for k, v in tower.state_dict().items() if k.startswith("vision_model.")})
    model.model.vision_tower.requires_grad_(False)
    processor = LlavaProcessor(image_processor=image_processor(encoder), tokenizer=tokenizer,
                               patch_size=vision["patch_size"],
                               vision_feature_select_strategy="full",
                               num_additional_image_tokens=1,  # CLIP's class token
                               chat_template=CHAT_TEMPLATE)
    return model, processor


# ----------------------------------------------------------------------------- training data

@dataclass
class Example:
    question: str
    options: list[str]
    answer: int
    kind: str
    video: int  # index into the vision cache
    spans: list[list[int]]  # per evidence span, the local frames inside it
    # the video's events, (name, local frames showing it): single-frame grounding examples
    events: list[tuple[str, list[int]]] = field(default_factory=list)
    # the video's synthetic plan (``pipelines.synth.Event``s, in order) and its frame rate:
    # fresh questions of the world's own kinds are drawn from it (``fresh_question``)
    plan: tuple[Any, ...] = ()
    fps: int = 0


@dataclass
class VisionCache:
    """The frozen tower's output (last layer, all tokens) for every candidate frame."""

    features: list[torch.Tensor]  # per video [frames, tokens, width] float16
    times: list[list[float]]
    sizes: list[tuple[int, int]]  # (height, width) of each video's frames
    ids: list[str]


@torch.no_grad()
def tower_features(model: Any, processor: Any, images: Sequence[np.ndarray]) -> torch.Tensor:
    """[frames, tokens, width]: what LLaVA's ``get_image_features`` feeds its projector."""
    pixels = processor.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
    out = model.model.vision_tower(pixels.to(model.dtype), output_hidden_states=True)
    return out.hidden_states[model.config.vision_feature_layer]


def build_vision_cache(shards_dir: Path, model: Any, processor: Any, path: Path,
                       say: Callable[[str], None]) -> VisionCache:
    """Run the tower once over every frame of the shards (or read the cache file)."""
    from safetensors.torch import load_file, save_file

    from refocus.lmm_reference import decode_jpeg
    from stores.shards import ShardSet

    shards = ShardSet(shards_dir)
    if path.is_file():
        data = load_file(path)
        ids = json.loads(data.pop("__ids__").numpy().tobytes().decode())
        return VisionCache([data[f"f{i}"] for i in range(len(ids))],
                           [data[f"t{i}"].tolist() for i in range(len(ids))],
                           [tuple(data[f"s{i}"].tolist()) for i in range(len(ids))], ids)
    lookup = shards.lookup()
    ids = sorted(lookup)
    features, times, sizes = [], [], []
    started = time.perf_counter()
    for n, video_id in enumerate(ids):
        sample = shards.read(video_id, lookup[video_id])
        images = [decode_jpeg(f, f"{video_id} frame {i}") for i, f in enumerate(sample.frames)]
        features.append(tower_features(model, processor, images).to(torch.float16))
        times.append([float(t) for t in sample.meta["timestamps"]])
        sizes.append((int(images[0].shape[0]), int(images[0].shape[1])))
        if (n + 1) % 20 == 0 or n + 1 == len(ids):
            say(f"  vision: {n + 1}/{len(ids)} videos ({time.perf_counter() - started:.0f} s)")
    tensors = {f"f{i}": f.contiguous() for i, f in enumerate(features)}
    tensors.update({f"t{i}": torch.tensor(t, dtype=torch.float64) for i, t in enumerate(times)})
    tensors.update({f"s{i}": torch.tensor(z) for i, z in enumerate(sizes)})
    tensors["__ids__"] = torch.frombuffer(bytearray(json.dumps(ids).encode()), dtype=torch.uint8)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp)
    os.replace(tmp, path)
    return VisionCache(features, times, sizes, ids)  # type: ignore[arg-type]


def examples_of(manifest_path: Path, cache: VisionCache) -> dict[str, list[Example]]:
    """The manifest's questions per split, their evidence spans as local frames."""
    from stores.manifest import read_manifest

    index = {v: i for i, v in enumerate(cache.ids)}
    manifest = read_manifest(manifest_path)
    videos = {index[v.id]: v.meta or {} for v in manifest.videos if v.id in index}
    events = {i: [(f"{e['colour']} {e['shape']}", frames_in(cache.times[i], *e["span"]))
                  for e in meta.get("events", [])] for i, meta in videos.items()}
    plans = {i: plan_of(meta) for i, meta in videos.items()}
    out: dict[str, list[Example]] = {}
    for q in manifest.questions:
        if q.video_id not in index:
            continue  # a video that failed to ingest
        v = index[q.video_id]
        spans = [frames_in(cache.times[v], a, b) for a, b in q.evidence]
        out.setdefault(q.split or "train", []).append(Example(
            q.question, list(q.options), q.answer, q.category or "", v, spans,
            events.get(v, []), plans[v], int(videos[v].get("fps", 0))))
    return out


def plan_of(meta: dict[str, Any]) -> tuple[Any, ...]:
    """The synthetic events of a video's manifest row (empty for another corpus)."""
    from pipelines.synth import Event

    keys = ("colour", "shape", "first", "frames", "x", "y", "size")
    return tuple(Event(**{k: e[k] for k in keys}) for e in meta.get("events", [])
                 if all(k in e for k in keys))


def fresh_question(ex: Example, times: Sequence[float], rng: np.random.Generator,
                   ) -> Example | None:
    """A question of the world's own kinds about ``ex``'s video, drawn anew (options and
    their order too) by the synthetic world's generator, with its evidence as local frames:
    a training video then teaches far more than its few manifest questions (None: the video
    has no synthetic plan or supports no question)."""
    from pipelines.synth import candidate_questions

    if not ex.plan or not ex.fps:
        return None
    candidates = candidate_questions(rng, ex.plan)
    if not candidates:
        return None
    kinds = sorted({q.kind for q in candidates})
    kind = kinds[int(rng.integers(len(kinds)))]
    mine = [q for q in candidates if q.kind == kind]
    q = mine[int(rng.integers(len(mine)))]
    spans = [frames_in(times, *e.span(ex.fps)) for e in q.evidence]
    return Example(q.question, list(q.options), q.answer, q.kind, ex.video, spans, ex.events,
                   ex.plan, ex.fps)


def frames_in(times: Sequence[float], start: float, end: float) -> list[int]:
    """The local frames whose time lies in [start, end]."""
    t = np.asarray(times)
    return np.flatnonzero((t >= start - 1e-6) & (t <= end + 1e-6)).tolist()


GROUND_QUESTION = "Which shape appeared first?"  # asked of one frame showing one event


def ground_example(ex: Example, rng: np.random.Generator) -> tuple[Example, list[int]] | None:
    """One frame of one of the video's events and the question naming what it shows among
    4 names: every such example says something about the frame (None: no event shown)."""
    from pipelines.synth import COLOURS, SHAPES

    shown = [(name, frames) for name, frames in ex.events if frames]
    if not shown:
        return None
    name, frames = shown[int(rng.integers(len(shown)))]
    others = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" != name]
    options = [name, *(str(o) for o in rng.choice(others, size=3, replace=False))]
    options = [options[i] for i in rng.permutation(len(options))]
    return (Example(GROUND_QUESTION, options, options.index(name), "ground", ex.video,
                    [frames]), [int(rng.choice(frames))])


# ----------------------------------------------------------------------------- subsets

def evidence_frames(ex: Example, rng: np.random.Generator | None = None) -> list[int]:
    """One frame per evidence span (the middle one; ``rng``: a random one, sometimes two)."""
    picks: set[int] = set()
    for span in ex.spans:
        if not span:
            continue
        if rng is None:
            picks.add(span[len(span) // 2])
        else:
            n = 2 if rng.random() < 0.2 and len(span) > 1 else 1
            picks.update(int(x) for x in rng.choice(span, size=n, replace=False))
    return sorted(picks)


def uniform_frames(n: int, k: int, phase: float = 0.5) -> list[int]:
    if k >= n:
        return list(range(n))
    return sorted({min(n - 1, int((i + phase) * n / k)) for i in range(k)})


def random_frames(n: int, k: int, rng: np.random.Generator,
                  keep: Sequence[int] = ()) -> list[int]:
    """``keep`` plus random other frames, ``k`` in all, sorted."""
    rest = np.setdiff1d(np.arange(n), np.asarray(keep, dtype=int))
    extra = max(0, min(k - len(keep), len(rest)))
    return sorted({*keep, *(int(x) for x in rng.choice(rest, size=extra, replace=False))})


def pick_example(ex: Example, rng: np.random.Generator) -> Example:
    """A text-only example: "Pick X." with the question's options, X one of them."""
    target = int(rng.integers(len(ex.options)))
    return Example(WARMUP_QUESTION.format(ex.options[target]), ex.options, target, "pick",
                   ex.video, [])


def draw(ex: Example, times: Sequence[float], progress: float, s: VLMSettings,
         rng: np.random.Generator) -> tuple[Example, list[int]]:
    """One training example at ``progress`` (0..1) of the steps after the text-only ones:
    (example, local frames)."""
    if progress < 0 or rng.random() < s.pick_share:
        return pick_example(ex, rng), []
    share = s.ground_share * max(0.2, 1 - progress / s.ground_until)
    if rng.random() < share:
        ground = ground_example(ex, rng)
        if ground is not None:
            return ground
    if rng.random() < s.fresh_share:
        ex = fresh_question(ex, times, rng) or ex
    evidence = evidence_frames(ex, rng)
    roll = rng.random() if progress >= s.evidence_until else 0.0
    if evidence and roll < 0.4:
        return ex, evidence
    frames = len(times)
    k = int(rng.integers(1, s.max_frames + 1))
    if evidence and roll < 0.65:
        return ex, random_frames(frames, max(k, len(evidence)), rng, evidence)
    if rng.random() < 0.5:
        return ex, uniform_frames(frames, k, float(rng.random()))
    return ex, random_frames(frames, k, rng)


# ----------------------------------------------------------------------------- batches

class Batcher:
    """Token ids of (example, frames) pairs, assembled by the scorer's own prompt and
    per-frame snippet (so training sees exactly what scoring sends), and the frames'
    cached tower features. ``class_only``: each frame as its class token alone (a short
    sequence; training's second stage), else as the scorer sends it (every token)."""

    def __init__(self, scorer: Any, cache: VisionCache) -> None:
        self.scorer, self.cache = scorer, cache
        self.class_only = False

    def ids(self, ex: Example, frames: list[int]) -> list[int]:
        times = [self.cache.times[ex.video][i] for i in frames]
        raw = self.scorer._prompt_ids(ex.question, ex.options, times)
        if self.class_only:
            return raw  # one image token per frame
        multi = self.scorer.as_multi(len(frames))
        snippet = self.scorer._snippet(self.cache.sizes[ex.video], multi)
        return self.scorer._expand(raw, [snippet.ids] * len(frames))

    def logits(self, model: Any, batch: Sequence[tuple[Example, list[int]]]) -> torch.Tensor:
        """[B, vocab] logits at the last position."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        rows = [self.ids(ex, frames) for ex, frames in batch]
        self.scorer._prompts.clear()
        width = max(len(r) for r in rows)
        pad = self.scorer.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        stacked = [self.cache.features[ex.video][frames][:, :1 if self.class_only else None]
                   for ex, frames in batch if frames]
        if stacked:
            tower = torch.cat(stacked).float()
            projected = model.model.multi_modal_projector(tower)
            inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(
                pooler_output=(projected.reshape(-1, projected.shape[-1]),))}
        return model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1]

    def answers(self, batch: Sequence[tuple[Example, list[int]]]) -> torch.Tensor:
        return torch.tensor([self.scorer.letters[ex.answer][0] for ex, _ in batch])

    def option_logits(self, logits: torch.Tensor, batch: Sequence[tuple[Example, list[int]]],
                      ) -> list[torch.Tensor]:
        return [torch.stack([torch.logsumexp(row[ids], 0)
                             for ids in self.scorer.letters[:len(ex.options)]])
                for row, (ex, _) in zip(logits, batch, strict=True)]


# ----------------------------------------------------------------------------- training

def batch_at(step: int, train: list[Example], cache: VisionCache, s: VLMSettings,
             ) -> list[tuple[Example, list[int]]]:
    """The examples of ``step``: drawn from (seed, step) alone, so a resumed run draws what
    an uninterrupted one would."""
    rng = np.random.default_rng([s.seed, step])
    progress = (step - s.pick_steps) / max(1, s.steps - s.pick_steps)  # < 0: text only
    chosen = rng.choice(len(train), size=min(s.batch_size, len(train)), replace=False)
    return [draw(train[i], cache.times[train[i].video], progress, s, rng) for i in chosen]


def accumulate(model: Any, batcher: Batcher, batch: list[tuple[Example, list[int]]],
               micro_batch: int) -> float:
    """Backward the batch's mean answer loss in micro-batches of similar length (less
    padding); returns the loss."""
    ordered = sorted(batch, key=lambda pair: len(pair[1]))
    text = sum(not frames for _, frames in ordered)  # text-only examples: one short chunk
    chunks = [ordered[:text]] if text else []
    chunks += [ordered[i:i + micro_batch] for i in range(text, len(ordered), micro_batch)]
    total = 0.0
    for chunk in chunks:
        loss = torch.nn.functional.cross_entropy(batcher.logits(model, chunk).float(),
                                                 batcher.answers(chunk), reduction="sum")
        (loss / len(ordered)).backward()
        total += float(loss.detach())
    return total / len(ordered)


def learning_rate(step: int, s: VLMSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    done = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


EVAL_MODES = ("evidence", "uniform4", "evidence+random8")


def eval_subsets(ex: Example, frames: int, seed: int) -> dict[str, list[int]]:
    """The frames each measured setting shows: one per evidence span (its middle frame),
    4 evenly spaced, and the evidence plus random frames up to 8 (fixed by ``seed``)."""
    evidence = evidence_frames(ex)
    rng = np.random.default_rng(seed)
    return {"evidence": evidence, "uniform4": uniform_frames(frames, 4),
            "evidence+random8": random_frames(frames, max(8, len(evidence)), rng, evidence)}


@torch.no_grad()
def quick_accuracy(model: Any, batcher: Batcher, val: list[Example], cache: VisionCache,
                   batch_size: int = 32) -> dict[str, float]:
    """Validation accuracy per setting, from the cached tower features (training's path)."""
    out = {}
    for mode in EVAL_MODES:
        pairs = [(ex, eval_subsets(ex, len(cache.times[ex.video]), i)[mode])
                 for i, ex in enumerate(val)]
        pairs = [(ex, f) for ex, f in pairs if f]
        right = 0
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            scores = batcher.option_logits(batcher.logits(model, chunk), chunk)
            right += sum(int(sc.argmax()) == ex.answer for sc, (ex, _)
                         in zip(scores, chunk, strict=True))
        out[mode] = right / max(1, len(pairs))
    return out


@torch.no_grad()
def standardise_projector(model: Any, cache: VisionCache, frames: int = 4096) -> None:
    """Fold the tower features' per-dimension mean and std (over up to ``frames`` cached
    frames, all tokens) into the projector's first layer: it then starts from standardised
    inputs (more than half of a token's norm is a constant offset) while the model stays a
    plain LLaVA (the projector has no normalisation of its own)."""
    every = max(1, sum(len(f) for f in cache.features) // frames)
    picked = torch.cat([f.reshape(-1, f.shape[-2], f.shape[-1]) for f in cache.features])[::every]
    rows = picked.reshape(-1, picked.shape[-1]).float()
    mean, std = rows.mean(0), rows.std(0).clamp_min(1e-3)
    first = model.model.multi_modal_projector.linear_1
    weight = first.weight / std
    first.bias -= weight @ mean
    first.weight.copy_(weight)


ALIGN_BLANK = "frame"  # the word an empty frame's class token and every patch token go to


def alignment_data(model: Any, tokenizer: Any, examples: Sequence[Example],
                   cache: VisionCache) -> tuple[list[tuple[int, int]], torch.Tensor, list[str]]:
    """Every frame of the examples' videos, (video, frame), with the word embeddings its
    class token should land on: colour + shape of the event it shows, else ``ALIGN_BLANK``'s
    (the rows of ``[frames, width]``), and the name of each frame's content."""
    table = model.get_input_embeddings().weight.detach()

    def vector(words: Sequence[str]) -> torch.Tensor:
        ids = tokenizer.convert_tokens_to_ids(list(words))
        return table[ids].sum(0)

    shows: dict[int, dict[int, str]] = {}
    for ex in examples:
        shows.setdefault(ex.video, {}).update((f, name) for name, fs in ex.events for f in fs)
    frames, targets, names = [], [], []
    for video in sorted(shows):
        for f in range(len(cache.times[video])):
            name = shows[video].get(f, ALIGN_BLANK)
            frames.append((video, f))
            targets.append(vector(name.split()))
            names.append(name)
    return frames, torch.stack(targets), names


def align_projector(model: Any, tokenizer: Any, train: Sequence[Example],
                    val: Sequence[Example], cache: VisionCache, s: VLMSettings,
                    say: Callable[[str], None]) -> dict[str, float]:
    """LLaVA's stage 1 as a regression, before any question: the projector alone learns to
    put each frame's class token on the word embeddings of what the frame shows and every
    patch token on ``ALIGN_BLANK``'s, so the language model starts from frames that read
    like words. Returns the share of held-out frames whose projected class token is nearest
    to its own content's target."""
    projector = model.model.multi_modal_projector
    frames, targets, _ = alignment_data(model, tokenizer, train, cache)
    table = model.get_input_embeddings().weight.detach()
    patch = table[tokenizer.convert_tokens_to_ids(ALIGN_BLANK)]
    optimizer = torch.optim.Adam(list(projector.parameters()), lr=s.lr)
    rng = np.random.default_rng([s.seed, 1])
    for _ in range(s.align_steps):
        pick = rng.choice(len(frames), size=min(s.align_frames, len(frames)), replace=False)
        tokens = torch.stack([cache.features[frames[i][0]][frames[i][1]] for i in pick]).float()
        out = projector(tokens)
        loss = ((out[:, 0] - targets[pick]) ** 2).sum(-1).mean() + (
            (out[:, 1:] - patch) ** 2).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return {"align_loss": round(float(loss.detach()), 4),
            "align_val": alignment_accuracy(model, tokenizer, val, cache)}


@torch.no_grad()
def alignment_accuracy(model: Any, tokenizer: Any, examples: Sequence[Example],
                       cache: VisionCache) -> float:
    """The share of the examples' frames whose projected class token is nearest (euclidean)
    to its own content's target among every content's."""
    frames, targets, names = alignment_data(model, tokenizer, examples, cache)
    if not frames:
        return float("nan")
    table = dict(zip(names, targets, strict=True))
    labels = sorted(table)
    centres = torch.stack([table[n] for n in labels])
    tokens = torch.stack([cache.features[v][f][0] for v, f in frames]).float()
    out = model.model.multi_modal_projector(tokens)
    nearest = torch.cdist(out, centres).argmin(1).tolist()
    return round(float(np.mean([labels[i] == n for i, n in zip(nearest, names, strict=True)])), 4)


def trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_state(owned: Any, model: Any, optimizer: torch.optim.Optimizer, step: int,
               seconds: float) -> None:
    from stores.checkpoints import save_checkpoint

    params = trainable(model)
    names = {id(p): n for n, p in params.items()}
    tensors = {f"model/{n}": p.data for n, p in params.items()}
    for p, state in optimizer.state.items():  # per parameter: one unused by a step lags
        name = names[id(p)]
        tensors[f"m/{name}"], tensors[f"v/{name}"] = state["exp_avg"], state["exp_avg_sq"]
        tensors[f"s/{name}"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    save_checkpoint(owned, tensors, {"step": step, "seconds": seconds})


def load_state(out: Path, model: Any, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
    """(next step, seconds trained) of the folder's checkpoint, loaded into the model and
    optimizer; (0, 0) when there is none."""
    from stores.checkpoints import load_checkpoint

    checkpoint = load_checkpoint(out)
    if checkpoint is None:
        return 0, 0.0
    params = trainable(model)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(checkpoint.tensors[f"model/{n}"])
    for n, p in params.items():
        if f"m/{n}" in checkpoint.tensors:
            optimizer.state[p] = {
                "step": checkpoint.tensors[f"s/{n}"].reshape(()).clone(),
                "exp_avg": checkpoint.tensors[f"m/{n}"].clone(),
                "exp_avg_sq": checkpoint.tensors[f"v/{n}"].clone()}
    return int(checkpoint.meta["step"]), float(checkpoint.meta["seconds"])


def prepare(out: Path, s: VLMSettings, say: Callable[[str], None]) -> tuple[Path, Path]:
    """The training corpus (synth, seed ``s.seed``) and its shards, made or resumed."""
    from pipelines.ingest import IngestSettings, ingest
    from pipelines.synth import SynthSettings, generate
    from stores.manifest import read_manifest

    corpus, shards = out / "corpus", out / "shards"
    if not (corpus / "manifest.jsonl").is_file():
        say(f"synth: {s.videos} videos, seed {s.seed} …")
        length = {"duration": s.duration} if s.duration else {}
        generate(corpus, SynthSettings(videos=s.videos, seed=s.seed, workers=s.workers,
                                       **length))
    say("ingest (default settings: the frames the reward path reads) …")
    ingest(read_manifest(corpus / "manifest.jsonl"), shards, IngestSettings(workers=s.workers))
    return corpus / "manifest.jsonl", shards


def train_vlm(out: str | os.PathLike[str], s: VLMSettings = VLMSettings(),
              say: Callable[[str], None] = print, command: str = "") -> dict[str, Any]:
    """Make (or resume) the training corpus, train, save ``out/model`` and measure it on the
    validation split through ``LMMScorer``; returns the report."""
    from stores.owned import claim

    owned = claim(out, VLM_KIND)
    with owned.lock():
        torch.set_num_threads(s.threads)
        return _train_vlm(owned, s, say, command)


def _train_vlm(owned: Any, s: VLMSettings, say: Callable[[str], None],
               command: str) -> dict[str, Any]:
    from refocus.lmm import LMMScorer
    from stores.checkpoints import MetricsLog

    out: Path = owned.path
    started = time.perf_counter()
    manifest, shards = prepare(out, s, say)
    model, processor = build_model(s.text, s.seed)
    say("vision tower over every candidate frame (once) …")
    cache = build_vision_cache(shards, model, processor, out / "vision.safetensors", say)
    split = examples_of(manifest, cache)
    train, val = split.get("train", []), split.get("val", [])[:s.eval_questions]
    if not train or not val:
        raise UserError(f"{out}: the corpus has no train or no val questions; use more "
                        "--videos")
    prep_seconds = time.perf_counter() - started
    standardise_projector(model, cache)  # a resumed run then loads its trained weights
    scorer = LMMScorer(model, processor, VLM_NAME)
    batcher = Batcher(scorer, cache)
    params = trainable(model)
    optimizer = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=s.weight_decay)
    step, seconds = load_state(out, model, optimizer)
    log = MetricsLog(out / "metrics.jsonl")
    log.truncate_after(step)
    if step == 0 and s.align_steps:  # a resumed run has it in its checkpoint
        aligned = align_projector(model, processor.tokenizer, train, val, cache, s, say)
        log.append({"kind": "align", "step": 0, **aligned})
        say(f"stage 1 (projector onto word embeddings): {aligned}")
    if step:
        say(f"resumed at step {step} ({seconds:.0f} s trained)")
    say(f"training: {len(train)} train questions, {sum(p.numel() for p in params.values())} "
        f"trainable parameters, {s.steps} steps")
    clock = time.perf_counter() - seconds
    while step < s.steps and time.perf_counter() - clock < s.minutes * 60:
        batch = batch_at(step, train, cache, s)
        batcher.class_only = step < s.pick_steps + s.class_steps
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, s)
        optimizer.zero_grad(set_to_none=True)
        loss = accumulate(model, batcher, batch, s.micro_batch)
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        step += 1
        elapsed = time.perf_counter() - clock
        log.append({"kind": "train", "step": step, "loss": round(loss, 4),
                    "seconds": round(elapsed, 1)})
        if step % s.eval_every == 0 or step == s.steps:
            accuracy = quick_accuracy(model, batcher, val, cache)
            log.append({"kind": "val", "step": step, **accuracy,
                        "frame_tokens": "class" if batcher.class_only else "all"})
            say(f"step {step}/{s.steps}  loss {loss:.3f}  "
                + "  ".join(f"{k} {v:.3f}" for k, v in accuracy.items())
                + f"  ({elapsed:.0f} s, {step / max(elapsed, 1e-9):.2f} steps/s"
                + (", class tokens only)" if batcher.class_only else ")"))
        if step % s.checkpoint_every == 0:
            save_state(owned, model, optimizer, step, elapsed)
    seconds = time.perf_counter() - clock
    save_state(owned, model, optimizer, step, seconds)
    return finish(owned, model, processor, shards, manifest, s, step, seconds, prep_seconds,
                  command, say)


# ----------------------------------------------------------------------------- measuring

def measure(model_dir: str | os.PathLike[str], shards_dir: Path, manifest: Path,
            split: str | None = "val", limit: int | None = None) -> dict[str, Any]:
    """Accuracy per setting (``EVAL_MODES``) and per question kind on ``split`` (None: all
    questions), through
    ``LMMScorer`` itself: the saved model and processor, the chat template, the vision cache
    (``vision`` over the shard frames, then ``logits_from_vision``) and the letter logits."""
    from refocus.lmm import Item, LMMScorer
    from refocus.lmm_reference import decode_jpeg
    from stores.manifest import read_manifest
    from stores.shards import ShardSet

    scorer = LMMScorer.load(str(model_dir), device="cpu")
    shards = ShardSet(shards_dir)
    lookup = shards.lookup()
    questions = [q for q in read_manifest(manifest).questions
                 if split in (None, q.split) and q.video_id in lookup][:limit]
    right: dict[str, dict[str, list[int]]] = {m: {} for m in EVAL_MODES}
    for video_id in dict.fromkeys(q.video_id for q in questions):
        sample = shards.read(video_id, lookup[video_id])
        times = np.asarray([float(t) for t in sample.meta["timestamps"]])
        mine = [(i, q) for i, q in enumerate(questions) if q.video_id == video_id]
        subsets = {}
        for i, q in mine:
            spans = [np.flatnonzero((times >= a - 1e-6) & (times <= b + 1e-6)).tolist()
                     for a, b in q.evidence]
            ex = Example(q.question, list(q.options), q.answer, q.category or "", 0, spans)
            subsets[i] = eval_subsets(ex, len(times), i)
        needed = sorted({f for sub in subsets.values() for frames in sub.values()
                         for f in frames})
        vision = dict(zip(needed, scorer.vision(
            [decode_jpeg(sample.frames[f], f"{video_id} frame {f}") for f in needed]),
            strict=True))
        for mode in EVAL_MODES:
            items = [(q, Item(q.question, q.options, [vision[f] for f in subsets[i][mode]],
                              times[subsets[i][mode]].tolist()))
                     for i, q in mine if subsets[i][mode]]
            if not items:
                continue
            logits = scorer.logits_from_vision([it for _, it in items])
            for (q, _), row in zip(items, logits, strict=True):
                right[mode].setdefault(q.category or "", []).append(
                    int(int(row.argmax()) == q.answer))
    return {mode: {"accuracy": _mean([x for xs in kinds.values() for x in xs]),
                   "questions": sum(len(xs) for xs in kinds.values()),
                   "by_kind": {k: _mean(xs) for k, xs in sorted(kinds.items())}}
            for mode, kinds in right.items()}


def _mean(values: Sequence[int]) -> float:
    return round(float(np.mean(values)), 4) if len(values) else float("nan")


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def finish(owned: Any, model: Any, processor: Any, shards: Path, manifest: Path, s: VLMSettings,
           steps: int, seconds: float, prep_seconds: float, command: str,
           say: Callable[[str], None]) -> dict[str, Any]:
    """Save ``out/model`` (model + processor + meta.json), measure it, write report.json,
    README.md and training.png."""
    from stores.checkpoints import MetricsLog

    out: Path = owned.path
    folder = out / MODEL_DIR
    tmp = out / (MODEL_DIR + ".tmp")
    owned.remove(tmp.name)  # a killed run's half-written model (only names refocus makes)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    say("measuring on the validation split through LMMScorer …")
    held_out = measure(tmp, shards, manifest)
    report = {
        "name": VLM_NAME, "steps": steps, "seconds": round(seconds, 1),
        "prepare_seconds": round(prep_seconds, 1), "threads": s.threads,
        "settings": s.as_dict(), "validation": held_out,
        "trained_with": command or "refocus train-vlm", "bytes": folder_bytes(tmp),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in trainable(model).values()),
    }
    (tmp / "meta.json").write_text(json.dumps(report, indent=1))
    owned.remove(MODEL_DIR)
    os.replace(tmp, folder)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    (out / "README.md").write_text(readme(report))
    plot(list(MetricsLog(out / "metrics.jsonl").rows()), out / "training.png")
    for mode, row in held_out.items():
        say(f"  {mode:<18} {row['accuracy']:.3f} ({row['questions']} questions)")
    return report


def readme(report: dict[str, Any]) -> str:
    lines = [f"# {VLM_NAME}", "",
             f"Trained with `{report['trained_with']}`: {report['steps']} steps, "
             f"{report['seconds']:.0f} s on {report['threads']} threads (corpus, shards and "
             f"vision cache: {report['prepare_seconds']:.0f} s); {report['bytes'] / 1e6:.1f} MB.",
             "", "Validation accuracy through `LMMScorer` (letter logits, cached vision):", "",
             "| frames | accuracy | questions |", "|---|---|---|"]
    for mode, row in report["validation"].items():
        lines.append(f"| {mode} | {row['accuracy']:.3f} | {row['questions']} |")
    lines += ["", "Per kind:", "", "| frames | " + " | ".join(
        next(iter(report["validation"].values()))["by_kind"]) + " |"]
    lines.append("|---" * (1 + len(next(iter(report["validation"].values()))["by_kind"])) + "|")
    for mode, row in report["validation"].items():
        lines.append(f"| {mode} | " + " | ".join(f"{v:.2f}" for v in row["by_kind"].values())
                     + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """Training loss per step; validation accuracy per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    losses = [r["loss"] for r in train]
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if losses else []
    axes[0].plot([r["step"] for r in train], losses, alpha=0.3, color="tab:blue")
    axes[0].plot([r["step"] for r in train][window - 1:], smooth, color="tab:blue")
    axes[0].set(title="training loss (answer letter)", xlabel="step", ylabel="cross-entropy")
    for mode in EVAL_MODES:
        axes[1].plot([r["step"] for r in val], [r.get(mode) for r in val], marker="o",
                     markersize=3, label=mode)
    axes[1].axhline(0.25, color="gray", lw=0.8, ls=":", label="chance (4 options)")
    axes[1].set(title="validation accuracy", xlabel="step", ylim=(0, 1))
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
