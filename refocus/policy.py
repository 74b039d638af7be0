"""The frame-selection policy: a query-conditioned, autoregressive pointer over cached frame
embeddings (ReFoCUS's selector, made small: it reads CLIP features, not pixels).

* **Encoder** — each candidate frame becomes a token: its embedding projected, its
  question similarity (cosine) as an explicit feature, its normalised time (sinusoids), all
  modulated by the question (FiLM); a question token is prepended and a small transformer
  lets frames see each other and the question. The question can therefore change which
  frames score high.
* **Decoder** — a causal transformer over ``[start(question), chosen frames so far]`` with
  cross-attention to all frame tokens; its output at step t is the query ``q_t``. Sampling
  runs it one step at a time with cached keys and values (the frames' projected once per
  question), so a step costs a few small matrix products.
* **Pointer** — ``logits = scale · cos(q_t, k_f) / temperature`` over frame keys (a learned
  scale, as CLIP's logit scale, bounded so the distribution can sharpen but not blow up), with
  already chosen and padding frames masked (sampling without replacement).

``sample`` draws (or greedily takes) k frames step by step; ``log_probs`` recomputes the
log-probabilities and entropies of given picks in one teacher-forced, parallel pass — equal to
the sampler's own. Rows are independent: a batch mixes questions and their group samples.

The module is a Hugging Face Hub model through ``huggingface_hub.PyTorchModelHubMixin``:
``save_pretrained(folder, config=record, model_card_kwargs=...)`` writes ``config.json`` (the
record a refocus policy folder keeps: ``{"kind": "policy", "config": <PolicyConfig>,
"encoder", "candidates", "settings", "reward", ...}``), ``model.safetensors`` and a model card
(``README.md`` from :data:`POLICY_CARD`); ``push_to_hub`` uploads the same files;
``from_pretrained(id or folder)`` builds the policy from them (the cache and
``HF_HUB_OFFLINE`` respected). pipelines/hub.py fills the record and the card.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, hf_hub_download
from torch import nn

from refocus.settings import PolicyConfig  # the policy's shape, torch-free for the CLI
from stores.checkpoints import HUB_WEIGHTS  # the mixin's weights file
from stores.errors import UserError
from stores.safe_load import load_safetensors

__all__ = ["PolicyConfig", "FrameSelector", "POLICY_CARD", "HUB_WEIGHTS"]


# The model card of a policy (Jinja, rendered by huggingface_hub.ModelCard.from_template with
# the mixin's card data and the model_card_kwargs pipelines/hub.py computes).
POLICY_CARD = """---
{{ card_data }}
---

# {{ title }}

A query-conditioned frame-selection policy trained with
refocus (the ReFoCUS
method: a policy learns, from a video-LLM's or a reader's rewards, which frames of a video a
model should see for a multiple-choice question). It reads CLIP embeddings of a video's
candidate frames and of the question, and picks k frames in time order.

## Use

{{ usage }}

## Encoder (frames and questions are embedded with it)

{{ encoder }}

## Candidate frames (what the policy chooses among)

{{ candidates }}

## Training

{{ training }}

## Evaluation

{{ scores }}

## How it was made

{{ command }}
"""


@dataclass
class Context:
    """A batch's encoded frames, computed once and shared by every decoding step."""

    tokens: torch.Tensor  # [B, N, h] frame tokens (memory for the decoder)
    keys: torch.Tensor  # [B, N, h] pointer keys
    start: torch.Tensor  # [B, h] the decoder's first input
    valid: torch.Tensor  # [B, N] bool: real (not padding) frames
    memory: list[tuple[torch.Tensor, torch.Tensor]]  # per decoder layer: cross-attention K, V

    def repeat(self, times: int) -> Context:
        """Each row ``times`` times in a row (for the samples of a group)."""
        r = lambda t: t.repeat_interleave(times, dim=0)  # noqa: E731
        return Context(r(self.tokens), r(self.keys), r(self.start), r(self.valid),
                       [(r(k), r(v)) for k, v in self.memory])


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, T, h] → [B, heads, T, h/heads]
    b, t, h = x.shape
    return x.view(b, t, heads, h // heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:  # [B, heads, T, d] → [B, T, heads·d]
    b, _, t, _ = x.shape
    return x.transpose(1, 2).reshape(b, t, -1)


def _key_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """An attention mask that hides padding keys, or None when there is none (faster)."""
    return None if bool(valid.all()) else valid[:, None, None, :]


class EncoderLayer(nn.Module):
    """Pre-norm self-attention and MLP over the question and frame tokens."""

    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv = nn.Linear(h, 3 * h)
        self.out = nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = (_heads(t, self.heads) for t in self.qkv(self.norm1(x)).chunk(3, dim=-1))
        x = x + self.out(_merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
        return x + self.mlp(self.norm2(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer (causal self-attention, cross-attention to the frames, MLP)
    that can run over a whole sequence or one step at a time: the frames' keys and values
    are projected once per context, and past steps' keys and values are kept in a cache."""

    def __init__(self, h: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(h), nn.LayerNorm(h), nn.LayerNorm(h)
        self.self_qkv = nn.Linear(h, 3 * h)
        self.self_out = nn.Linear(h, h)
        self.cross_q = nn.Linear(h, h)
        self.cross_kv = nn.Linear(h, 2 * h)
        self.cross_out = nn.Linear(h, h)
        self.mlp = nn.Sequential(nn.Linear(h, 4 * h), nn.GELU(), nn.Linear(4 * h, h))

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        return _heads(x, self.heads)

    def memory(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.cross_kv(tokens).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
                valid: torch.Tensor, cache: list[torch.Tensor] | None = None) -> torch.Tensor:
        """x [B, T, h]. Without a cache: T steps at once, causally. With one (a list holding
        past keys and values, empty at first): x is the next step(s), appended to it."""
        q, k, v = (self._split(t) for t in self.self_qkv(self.norm1(x)).chunk(3, dim=-1))
        if cache is not None:
            if cache:
                k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
            causal = x.shape[1] > 1
        else:
            causal = True
        x = x + self.self_out(_merge(F.scaled_dot_product_attention(q, k, v,
                                                                     is_causal=causal)))
        q = self._split(self.cross_q(self.norm2(x)))
        x = x + self.cross_out(_merge(F.scaled_dot_product_attention(
            q, memory[0], memory[1], attn_mask=_key_mask(valid))))
        return x + self.mlp(self.norm3(x))


@dataclass
class Selection:
    picks: torch.Tensor  # [B, k] frame indices in the order chosen
    log_probs: torch.Tensor  # [B, k] log π(f_t | q, f_<t); 0 where not a real pick
    entropy: torch.Tensor  # [B, k] entropy of each step's distribution
    mask: torch.Tensor  # [B, k] bool: a real pick (False once a row ran out of frames)

    def in_time_order(self, times: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Picks sorted by their timestamps, and the sorted log-probabilities."""
        t = times.gather(1, self.picks).masked_fill(~self.mask, math.inf)
        order = t.argsort(dim=1)
        return self.picks.gather(1, order), self.log_probs.gather(1, order)


def time_features(times: torch.Tensor, n: int) -> torch.Tensor:
    """Sinusoids of a time in [0, 1] at n/2 frequencies: [..., n]."""
    freqs = torch.pi * (2.0 ** torch.arange(n // 2, device=times.device, dtype=times.dtype))
    angles = times[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FrameSelector(nn.Module, PyTorchModelHubMixin, library_name="refocus",
                    license="apache-2.0", model_card_template=POLICY_CARD,
                    tags=["refocus", "frame-selection", "video-question-answering"]):
    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = c = config
        h = c.hidden
        self.frame_in = nn.Linear(c.dim + 2 + c.time_features, h)
        self.question_in = nn.Linear(2 * c.dim, h)
        self.film = nn.Linear(2 * c.dim, 2 * h)
        self.encoder = nn.ModuleList(EncoderLayer(h, c.heads) for _ in range(c.layers))
        self.encoder_norm = nn.LayerNorm(h)
        self.decoder = nn.ModuleList(DecoderLayer(h, c.heads) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(h)
        self.start = nn.Linear(2 * h, h)
        self.pick_in = nn.Linear(h, h)
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.log_scale = nn.Parameter(torch.tensor(math.log(c.initial_scale)))

    # ------------------------------------------------------------------ the hub
    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: str | None,
                         cache_dir: str | Path | None, force_download: bool,
                         local_files_only: bool, token: str | bool | None,
                         map_location: str | torch.device = "cpu",
                         config: PolicyConfig | dict[str, Any] | None = None,
                         ) -> FrameSelector:
        """The mixin's loading step: ``config`` is config.json's ``config`` (a refocus
        record) or the whole file (a bare ``save_pretrained``); the weights are read from
        safetensors only, strictly (every tensor present, no stranger), in one-line errors."""
        if config is None:
            raise UserError(f"{model_id}: no config.json; not a refocus policy")
        try:
            shape = config if isinstance(config, PolicyConfig) else PolicyConfig(**{
                f.name: config[f.name] for f in fields(PolicyConfig) if f.name in config})
        except TypeError as e:
            raise UserError(f"{model_id}: config.json is not a refocus policy's ({e})") from None
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, HUB_WEIGHTS)
        else:
            weights = hf_hub_download(model_id, HUB_WEIGHTS, revision=revision,
                                      cache_dir=cache_dir, force_download=force_download,
                                      local_files_only=local_files_only, token=token)
        policy = cls(shape)
        tensors = load_safetensors(weights, "the policy's weights are damaged; download or "
                                   "export it again")
        try:
            policy.load_state_dict(tensors)
        except RuntimeError as e:
            first = str(e).splitlines()[1:2] or [str(e)]
            raise UserError(f"{weights}: not this policy's weights ({first[0].strip()})"
                            ) from None
        return policy.to(map_location).eval()

    # ------------------------------------------------------------------ encoding
    def encode(self, question: torch.Tensor, question_text: torch.Tensor, frames: torch.Tensor,
               times: torch.Tensor, valid: torch.Tensor) -> Context:
        """question [B, d] (with its options) and question_text [B, d] (alone), frames
        [B, N, d], times [B, N] in [0, 1], valid [B, N] bool."""
        dtype = self.frame_in.weight.dtype
        q = torch.cat([F.normalize(question.to(dtype), dim=-1),
                       F.normalize(question_text.to(dtype), dim=-1)], dim=-1)  # [B, 2d]
        f = F.normalize(frames.to(dtype), dim=-1)
        similarity = torch.einsum("bnd,bkd->bnk", f, q.view(q.shape[0], 2, -1))  # [B, N, 2]
        x = self.frame_in(torch.cat(
            [f, similarity, time_features(times.to(dtype), self.config.time_features)], dim=-1))
        gamma, beta = self.film(q).chunk(2, dim=-1)
        x = x * (1 + gamma[:, None]) + beta[:, None]
        q_token = self.question_in(q)[:, None]
        mask = _key_mask(torch.cat([torch.ones_like(valid[:, :1]), valid], dim=1))
        encoded = torch.cat([q_token, x], dim=1)
        for layer in self.encoder:
            encoded = layer(encoded, mask)
        encoded = self.encoder_norm(encoded)
        tokens = encoded[:, 1:]
        weights = valid.to(dtype) / valid.to(dtype).sum(1, keepdim=True).clamp_min(1)
        pooled = (tokens * weights[..., None]).sum(1)
        start = self.start(torch.cat([encoded[:, 0], pooled], dim=-1))
        memory = [layer.memory(tokens) for layer in self.decoder]
        return Context(tokens, self.key(tokens), start, valid, memory)

    # ------------------------------------------------------------------ decoding
    def _inputs(self, ctx: Context, picks: torch.Tensor) -> torch.Tensor:
        """Decoder inputs for chosen frames [B, T] → [B, T, h]."""
        chosen = ctx.tokens.gather(1, picks[..., None].expand(-1, -1, ctx.tokens.shape[-1]))
        return self.pick_in(chosen)

    def _decode(self, ctx: Context, x: torch.Tensor,
                caches: list[list[torch.Tensor]] | None = None) -> torch.Tensor:
        for i, layer in enumerate(self.decoder):
            x = layer(x, ctx.memory[i], ctx.valid, None if caches is None else caches[i])
        return self.query(self.decoder_norm(x))

    def _queries(self, ctx: Context, picks: torch.Tensor) -> torch.Tensor:
        """Decoder queries for steps 0..len(picks): inputs [start, picks...], causal."""
        inputs = torch.cat([ctx.start[:, None], self._inputs(ctx, picks)], dim=1)
        return self._decode(ctx, inputs)

    def _logits(self, ctx: Context, queries: torch.Tensor, temperature: float) -> torch.Tensor:
        """Pointer logits [B, T, N] before masking chosen frames."""
        cosine = F.normalize(queries, dim=-1) @ F.normalize(ctx.keys, dim=-1).transpose(1, 2)
        scale = self.log_scale.exp().clamp(max=self.config.max_scale)
        logits = scale * cosine / temperature
        return logits.masked_fill(~ctx.valid[:, None], -math.inf)

    @staticmethod
    def _distribution(logits: torch.Tensor, taken: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities with taken frames masked, and which rows still have a choice.
        A row with nothing left gets a dummy certain choice of frame 0 (masked out later)."""
        logits = logits.masked_fill(taken, -math.inf)
        alive = torch.isfinite(logits).any(dim=-1)
        dummy = torch.full_like(logits, -math.inf)
        dummy[..., 0] = 0.0
        logits = torch.where(alive[..., None], logits, dummy)
        return logits.log_softmax(dim=-1), alive

    @staticmethod
    def _entropy(log_p: torch.Tensor) -> torch.Tensor:
        p = log_p.exp()
        return -(p * log_p.masked_fill(p == 0, 0.0)).sum(-1)

    def sample(self, ctx: Context, k: int, greedy: bool = False, temperature: float = 1.0,
               generator: torch.Generator | None = None, with_entropy: bool = True,
               ) -> Selection:
        """Choose k frames per row, one at a time, without replacement. (The step loop keeps
        its masks incrementally; ``log_probs`` computes the same quantities all at once.)"""
        b, n = ctx.valid.shape
        blocked = ~ctx.valid  # padding, then also every frame already chosen
        remaining = ctx.valid.sum(dim=1)
        keys = F.normalize(ctx.keys, dim=-1).transpose(1, 2)  # [B, h, N]
        scale = self.log_scale.exp().clamp(max=self.config.max_scale) / temperature
        dummy = torch.full((n,), -math.inf, dtype=keys.dtype, device=keys.device)
        dummy[0] = 0.0
        picks, log_probs, entropies, masks = [], [], [], []
        caches: list[list[torch.Tensor]] = [[] for _ in self.decoder]
        step_input = ctx.start[:, None]
        for _ in range(k):
            query = F.normalize(self._decode(ctx, step_input, caches), dim=-1)  # [B, 1, h]
            logits = (scale * (query @ keys)).squeeze(1).masked_fill(blocked, -math.inf)
            alive = remaining > 0
            if not bool(alive.all()):  # a row out of frames: a certain dummy pick, masked
                logits = torch.where(alive[:, None], logits, dummy)
            log_p = logits.log_softmax(dim=-1)
            if greedy:
                choice = log_p.argmax(dim=-1)
            else:
                choice = torch.multinomial(log_p.exp(), 1, generator=generator).squeeze(-1)
            log_probs.append(log_p.gather(1, choice[:, None]).squeeze(-1) * alive)
            if with_entropy:
                entropies.append(self._entropy(log_p) * alive)
            masks.append(alive)
            picks.append(choice)
            blocked = blocked.scatter(1, choice[:, None], True)
            remaining = remaining - alive.long()
            step_input = self._inputs(ctx, choice[:, None])
        zeros = torch.zeros(b, k, device=keys.device)
        return Selection(torch.stack(picks, 1), torch.stack(log_probs, 1),
                         torch.stack(entropies, 1) if with_entropy else zeros,
                         torch.stack(masks, 1))

    def log_probs(self, ctx: Context, picks: torch.Tensor, temperature: float = 1.0,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced log π and entropy of given picks [B, k], all steps at once."""
        b, k = picks.shape
        n = ctx.valid.shape[1]
        queries = self._queries(ctx, picks[:, :-1])  # [B, k, h]
        before = F.one_hot(picks, n).bool()  # [B, k, N]
        taken = torch.cumsum(before.int(), dim=1).bool()
        taken = torch.cat([torch.zeros_like(taken[:, :1]), taken[:, :-1]], dim=1)
        log_p, alive = self._distribution(self._logits(ctx, queries, temperature), taken)
        chosen = log_p.gather(2, picks[..., None]).squeeze(-1)
        return chosen * alive, self._entropy(log_p) * alive
