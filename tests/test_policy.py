"""The selection policy: sampling without replacement, teacher-forced log-probabilities equal
to the sampler's, batching, and GRPO learning a question-dependent choice."""

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
    # the probabilities of a step sum to one over the frames still free
    assert torch.all(sample.log_probs <= 0)


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


def test_the_question_changes_which_frames_score_high(policy):
    q, qt, f, t, valid = random_batch(b=2)
    f[1], t[1], valid[1] = f[0], t[0], valid[0]  # same video, two questions
    ctx = policy.encode(q, qt, f, t, valid)
    first = policy.sample(ctx, 1, greedy=True)
    logits = policy._logits(ctx, policy._queries(ctx, first.picks[:, :0]), 1.0)
    assert not torch.allclose(logits[0, 0, :12], logits[1, 0, :12])


def test_grpo_learns_to_pick_the_frame_the_question_asks_for():
    corpus, targets = toy_corpus(videos=48)
    reference = ToyReference(targets)
    settings = GRPOSettings(steps=150, questions_per_step=16, group=8, budgets=(1,), lr=1e-3,
                            warmup=10)
    trainer = GRPOTrainer(corpus, RewardModel(reference), settings,
                          PolicyConfig(dim=DIM, hidden=64))
    val = corpus.rows("val")

    def hit_rate() -> float:
        picks = Learned(trainer.policy).select(corpus, val, 1)
        return float(np.mean([p[0] == targets[q][0] for q, p in zip(val, picks, strict=True)]))

    before = hit_rate()
    for _ in range(settings.steps):
        trainer.step()
    after = hit_rate()
    # two marked frames and 18 noise frames: chance of the asked one is 1/20
    assert before < 0.6 and after >= 0.9, (before, after)
