"""The reader reference and the reward machinery."""

import math

import numpy as np
import pytest
import torch

from pipelines.learn import load_corpus, reader_report
from refocus.reader import Reader, ReaderConfig, margins, read, train_reader
from refocus.rewards import ReaderReference, RewardCache, RewardModel, reward, subset_key
from refocus.settings import ReaderTrainSettings


def test_margin_and_reward_follow_the_definition():
    logits = torch.tensor([[2.0, 0.5, 1.0, -math.inf], [0.0, 3.0, 1.0, 2.5]])
    answer = torch.tensor([0, 2])
    got = margins(logits, answer)
    assert got.tolist() == [1.0, -2.0]  # 2 − 1 and 1 − 3
    assert torch.allclose(reward(got), torch.tanh(got / 2))


def test_reader_answers_do_not_depend_on_the_order_of_the_options():
    torch.manual_seed(0)
    reader = Reader(ReaderConfig(dim=16, max_options=4)).eval()
    g = torch.Generator().manual_seed(1)
    q, qt = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    options, frames = torch.randn(3, 4, 16, generator=g), torch.randn(3, 5, 16, generator=g)
    times = torch.rand(3, 5, generator=g)
    option_valid = torch.ones(3, 4, dtype=torch.bool)
    option_valid[2, 3] = False
    frame_valid = torch.ones(3, 5, dtype=torch.bool)
    frame_valid[1, 2:] = False
    logits = reader(q, qt, options, option_valid, frames, times, frame_valid)
    order = torch.tensor([2, 0, 1, 3])
    permuted = reader(q, qt, options[:, order], option_valid[:, order], frames, times,
                      frame_valid)
    torch.testing.assert_close(permuted[:2], logits[:2, order], atol=1e-5, rtol=0)
    assert logits[2, 3] == -math.inf
    # padding frames change nothing
    frames2 = frames.clone()
    frames2[1, 2:] = 99.0
    again = reader(q, qt, options, option_valid, frames2, times, frame_valid)
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)


def test_the_cache_scores_each_subset_once_and_gives_the_same_margins(synth_store):
    corpus = load_corpus(synth_store / "features", None)
    torch.manual_seed(0)
    reader = Reader(ReaderConfig(dim=corpus.frame_embedding.shape[1],
                                 max_options=corpus.max_options)).eval()
    reference = ReaderReference(reader, "reader:test")
    plain, cached = RewardModel(reference), RewardModel(reference, RewardCache("reader:test"))
    questions = torch.tensor([0, 1, 2, 0])
    picks = torch.tensor([[3, 1, 7], [0, 2, 4], [5, 6, 9], [7, 3, 1]])  # rows 0 and 3: same set
    valid = torch.ones_like(picks, dtype=torch.bool)
    first = cached.margins(corpus, questions, picks, valid)
    assert cached.cache.misses == 3 and cached.cache.hits == 1
    torch.testing.assert_close(first, plain.margins(corpus, questions, picks, valid))
    again = cached.margins(corpus, questions, picks, valid)
    assert torch.equal(again, first) and cached.cache.hits == 5
    assert subset_key("q", picks[0], valid[0]) == ("q", (1, 3, 7))
    with pytest.raises(ValueError, match="cache is for"):
        RewardModel(reference, RewardCache("reader:other"))


@pytest.mark.slow
def test_a_trained_reader_needs_the_evidence(synth_store):
    corpus = load_corpus(synth_store / "features", None)
    reader = train_reader(corpus, ReaderTrainSettings(steps=800))
    report = reader_report(reader, corpus, "val", ks=(4,))
    assert report["questions"] >= 30
    # with the evidence it answers far better than from 4 random frames, and far above chance
    assert report["evidence"] >= report["random_4"] + 0.15, report
    assert report["evidence"] >= 0.6, report
    # the reader is what the reference uses
    q = torch.tensor(corpus.rows("val")[:8])
    ev = [[s[len(s) // 2] for s in corpus.evidence_frames(int(x)) if s] for x in q]
    k = max(len(e) for e in ev)
    picks = torch.tensor([e + [0] * (k - len(e)) for e in ev])
    valid = torch.tensor([[i < len(e) for i in range(k)] for e in ev])
    logits = ReaderReference(reader, "r").logits(corpus, q, picks, valid)
    assert torch.equal(logits, read(reader, corpus, q, picks, valid))
    assert np.isfinite(logits.max(1).values.numpy()).all()
