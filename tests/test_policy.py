"""The selection policy: sampling without replacement, teacher-forced log-probabilities equal
to the sampler's, batching, and GRPO learning a question-dependent choice."""

import math

import numpy as np
import pytest
import torch
from toy import DIM, ToyReference, toy_corpus

from refocus.policy import FrameSelector, PolicyConfig
from refocus.rewards import RewardModel
from refocus.selectors import Learned
from refocus.settings import GRPOSettings
from refocus.trainer import GRPOTrainer


def random_batch(b=6, n=30, dim=DIM, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, 12:] = False
    valid[1, 3:] = False  # shorter than the budget
    return (torch.randn(b, dim, generator=g, dtype=dtype),
            torch.randn(b, dim, generator=g, dtype=dtype),
            torch.randn(b, n, dim, generator=g, dtype=dtype),
            torch.rand(b, n, generator=g, dtype=dtype).sort(dim=1).values, valid)


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return FrameSelector(PolicyConfig(dim=DIM)).double().eval()


def test_teacher_forced_log_probs_equal_the_samplers(policy):
    q, qt, f, t, valid = random_batch()
    ctx = policy.encode(q, qt, f, t, valid)
    for temperature in (1.0, 0.5):
        sample = policy.sample(ctx, 6, temperature=temperature,
                               generator=torch.Generator().manual_seed(3))
        log_probs, entropy = policy.log_probs(ctx, sample.picks, temperature=temperature)
        torch.testing.assert_close(log_probs, sample.log_probs, atol=1e-12, rtol=0)
        torch.testing.assert_close(entropy, sample.entropy, atol=1e-12, rtol=0)
    # in float32 too, to the precision of float32
    policy32 = policy.float()
    ctx32 = policy32.encode(q.float(), qt.float(), f.float(), t.float(), valid)
    sample = policy32.sample(ctx32, 6, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(policy32.log_probs(ctx32, sample.picks)[0], sample.log_probs,
                               atol=2e-5, rtol=0)


def oracle_log_probs(policy, ctx, picks: torch.Tensor, temperature: float,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(f_t | q, f_<t) and the step entropies by re-running the decoder on every prefix
    [start, f_0 … f_{t−1}] (no cache, no teacher-forced batch) and a softmax written out here
    over the frames that are real and not yet picked."""
    b, k = picks.shape
    keys = ctx.keys / ctx.keys.norm(dim=-1, keepdim=True)
    scale = min(math.exp(float(policy.log_scale)), policy.config.max_scale)
    log_probs = torch.zeros(b, k, dtype=torch.float64)
    entropy = torch.zeros(b, k, dtype=torch.float64)
    for row in range(b):
        real = [i for i in range(ctx.valid.shape[1]) if bool(ctx.valid[row, i])]
        for step in range(min(k, len(real))):  # a row out of frames: nothing (zeros)
            chosen = ctx.tokens[row, picks[row, :step]]  # [step, h]
            x = torch.cat([ctx.start[row:row + 1], policy.pick_in(chosen)])[None]
            for i, layer in enumerate(policy.decoder):
                x = layer(x, tuple(m[row:row + 1] for m in ctx.memory[i]),
                          ctx.valid[row:row + 1])
            query = policy.query(policy.decoder_norm(x))[0, -1]
            query = query / query.norm()
            taken = set(picks[row, :step].tolist())
            free = [i for i in real if i not in taken]
            logits = {i: scale * float(query @ keys[row, i]) / temperature for i in free}
            top = max(logits.values())
            log_z = top + math.log(sum(math.exp(v - top) for v in logits.values()))
            log_probs[row, step] = logits[int(picks[row, step])] - log_z
            entropy[row, step] = -sum(math.exp(v - log_z) * (v - log_z)
                                      for v in logits.values())
    return log_probs, entropy


def test_log_probs_equal_a_per_prefix_decoder_and_a_hand_written_softmax(policy):
    q, qt, f, t, valid = random_batch()
    with torch.no_grad():
        policy.log_scale.fill_(math.log(3.0))  # a flatter pointer: no probability underflows
        ctx = policy.encode(q, qt, f, t, valid)
        g = torch.Generator().manual_seed(5)
        picks = torch.zeros(len(q), 6, dtype=torch.long)  # any distinct real frames
        for row in range(len(q)):
            real = valid[row].nonzero().flatten()
            order = real[torch.randperm(len(real), generator=g)][:6]
            picks[row, :len(order)] = order
        for temperature in (1.0, 0.7):
            expected, expected_entropy = oracle_log_probs(policy, ctx, picks, temperature)
            log_probs, entropy = policy.log_probs(ctx, picks, temperature=temperature)
            torch.testing.assert_close(log_probs, expected, atol=1e-12, rtol=0)
            torch.testing.assert_close(entropy, expected_entropy, atol=1e-12, rtol=0)
            assert (log_probs[1, 3:] == 0).all()  # three real frames: three real steps


def test_picks_never_repeat_and_stay_on_real_frames(policy):
    q, qt, f, t, valid = random_batch()
    sample = policy.sample(policy.encode(q, qt, f, t, valid), 8,
                           generator=torch.Generator().manual_seed(0))
    for row in range(len(q)):
        real = [p for p, m in zip(sample.picks[row].tolist(), sample.mask[row].tolist(),
                                  strict=True) if m]
        assert len(real) == len(set(real)) == min(8, int(valid[row].sum()))
        assert all(valid[row, p] for p in real)
    assert sample.mask[1].tolist() == [True] * 3 + [False] * 5
    assert (sample.log_probs[1, 3:] == 0).all()


def step_probabilities(policy, ctx, prefix: torch.Tensor, step: int) -> torch.Tensor:
    """[B, N]: the probability ``log_probs`` gives each frame f as the pick at ``step`` after
    ``prefix[:, :step]`` — a teacher-forced row per (question, candidate frame)."""
    b, n = ctx.valid.shape
    picks = prefix[:, :step + 1].repeat_interleave(n, dim=0)
    picks[:, step] = torch.arange(n).repeat(b)
    return policy.log_probs(ctx.repeat(n), picks)[0][:, step].exp().view(b, n)


def test_each_steps_probabilities_sum_to_one_over_the_free_frames(policy):
    q, qt, f, t, valid = random_batch()
    ctx = policy.encode(q, qt, f, t, valid)
    sample = policy.sample(ctx, 5, generator=torch.Generator().manual_seed(2))
    rows = [r for r in range(len(q)) if int(valid[r].sum()) >= 5]  # rows with a choice left
    for step in range(5):
        probs = step_probabilities(policy, ctx, sample.picks, step)[rows]
        free = valid[rows].clone()
        for r, row in enumerate(rows):
            free[r, sample.picks[row, :step]] = False
        torch.testing.assert_close(probs.sum(1), torch.ones(len(rows), dtype=torch.float64),
                                   atol=1e-12, rtol=0)
        assert torch.all(probs[~free] == 0) and torch.all(probs[free] > 0)
        # the sampler's entropy is the entropy of that distribution
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(1)
        torch.testing.assert_close(sample.entropy[rows, step], entropy, atol=1e-10, rtol=0)


def test_selections_come_back_in_time_order(policy):
    q, qt, f, t, valid = random_batch()
    sample = policy.sample(policy.encode(q, qt, f, t, valid), 5,
                           generator=torch.Generator().manual_seed(1))
    picks, log_probs = sample.in_time_order(t)
    for row in range(2, len(q)):
        times = t[row, picks[row]]
        assert torch.all(times[1:] >= times[:-1])
        assert sorted(picks[row].tolist()) == sorted(sample.picks[row].tolist())
        assert torch.isclose(log_probs[row].sum(), sample.log_probs[row].sum())


def test_batched_greedy_equals_one_question_at_a_time(policy):
    q, qt, f, t, valid = random_batch()
    together = policy.sample(policy.encode(q, qt, f, t, valid), 5, greedy=True)
    for row in range(len(q)):
        alone = policy.sample(policy.encode(q[row:row + 1], qt[row:row + 1], f[row:row + 1],
                                            t[row:row + 1], valid[row:row + 1]), 5, greedy=True)
        assert alone.picks[0].tolist() == together.picks[row].tolist()
        torch.testing.assert_close(alone.log_probs[0], together.log_probs[row], atol=1e-10,
                                   rtol=0)


def test_group_repeat_keeps_rows_together(policy):
    q, qt, f, t, valid = random_batch(b=3)
    ctx = policy.encode(q, qt, f, t, valid)
    grouped = ctx.repeat(4)
    assert grouped.tokens.shape[0] == 12
    assert torch.equal(grouped.tokens[4:8], ctx.tokens[1:2].expand(4, -1, -1))


@pytest.fixture(scope="module")
def trained():
    """A policy trained by GRPO on the toy corpus (k = 1) for the asked marked frame, with its
    hit rate on the validation questions before training."""
    corpus, targets = toy_corpus(videos=48)
    settings = GRPOSettings(steps=150, questions_per_step=16, group=8, budgets=(1,), lr=1e-3,
                            warmup=10)
    trainer = GRPOTrainer(corpus, RewardModel(ToyReference(targets)), settings,
                          PolicyConfig(dim=DIM, hidden=64))
    before = asked_frame_probabilities(trainer.policy, corpus, targets)
    for _ in range(settings.steps):
        trainer.step()
    return trainer.policy, corpus, targets, before


def asked_frame_probabilities(policy, corpus, targets) -> np.ndarray:
    """[V, 2]: on each validation video, the first pick's probability of the A-marked frame
    when the question asks for A, and of the B-marked frame when it asks for B — the same
    frames, only the question differs (the toy's two question codes)."""
    val = corpus.rows("val")
    codes = {"a": 0, "b": 1}  # the toy's even videos ask for A, odd ones for B
    out = np.zeros((len(val), 2))
    policy.eval()
    with torch.no_grad():
        batch = corpus.frames_of(val)
        for kind, row in codes.items():  # question row 0 asks for A, row 1 for B
            q = corpus.question_embedding[row].expand(len(val), -1)
            qt = corpus.question_text[row].expand(len(val), -1)
            ctx = policy.encode(q, qt, batch.frames, batch.times, batch.valid)
            probs = step_probabilities(policy, ctx, torch.zeros(len(val), 1, dtype=torch.long),
                                       0)
            marked = [targets[v][0] if kind == "a" else targets[v][1] for v in val]
            out[:, row] = probs[torch.arange(len(val)), torch.tensor(marked)].numpy()
    return out


class QuestionBlind(FrameSelector):
    """The same network fed one fixed question whatever is asked: it cannot follow it."""

    def encode(self, question, question_text, frames, times, valid):
        return super().encode(torch.ones_like(question), torch.ones_like(question_text), frames,
                              times, valid)


def follows_the_question(probabilities: np.ndarray) -> bool:
    """Whether the asked frame is the likelier pick under both questions on most videos: a
    policy whose choice does not depend on the question gives the two frames one
    distribution, so p(A | asks A) + p(B | asks B) ≤ 1 and it fails on every video."""
    return bool(np.mean(probabilities.min(axis=1) > 0.5) >= 0.8)


@pytest.mark.slow
def test_the_question_changes_which_frame_is_picked(trained):
    policy, corpus, targets, before = trained
    after = asked_frame_probabilities(policy, corpus, targets)
    assert not follows_the_question(before)  # at random initialisation it does not
    assert follows_the_question(after), after
    blind = QuestionBlind(policy.config)
    blind.load_state_dict(policy.state_dict())
    assert not follows_the_question(asked_frame_probabilities(blind, corpus, targets))


@pytest.mark.slow
def test_grpo_learns_to_pick_the_frame_the_question_asks_for(trained):
    policy, corpus, targets, _ = trained
    val = corpus.rows("val")
    picks = Learned(policy).select(corpus, val, 1)
    hits = np.mean([p[0] == targets[q][0] for q, p in zip(val, picks, strict=True)])
    # two marked frames and 18 noise frames: chance of the asked one is 1/20
    assert hits >= 0.9, hits
