"""The run-folder format (stores/runs.py) and the one resolution of a policy path
(pipelines/policies.py): the trainer's state is the whole checkpoint and resumes exactly
through a run folder, a checkpoint composed the way earlier versions composed it still
resumes, a run folder is flat (it is its best policy's model folder) while the earlier
``RUN/policy/`` layout still loads, and ``refocus score`` does not import the learning stages.
Toy data only (tests/toy.py): no videos, no encoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from toy import DIM, ToyReference, toy_corpus

from pipelines.policies import find_policy, load_policy, policy_reward
from refocus.policy import FrameSelector, PolicyConfig
from refocus.rewards import RewardCache, RewardModel
from refocus.settings import GRPOSettings
from refocus.trainer import GRPOTrainer
from stores import checkpoints
from stores.errors import UserError
from stores.runs import RunFolder, find_policy_folder, same_run

REPO = Path(__file__).resolve().parents[1]
SETTINGS = GRPOSettings(steps=6, questions_per_step=8, group=3, budgets=(2, 3), warmup=1)
TINY = PolicyConfig(dim=DIM, hidden=16)


def trainer(state: checkpoints.Checkpoint | None = None) -> GRPOTrainer:
    corpus, targets = toy_corpus(videos=24, frames=10)
    reward = RewardModel(ToyReference(targets), RewardCache(ToyReference.id))
    return GRPOTrainer(corpus, reward, SETTINGS, TINY, state=state)


def clone(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key].cpu(), b[key].cpu()), key


def test_the_trainers_state_is_the_whole_checkpoint(tmp_path):
    straight = trainer()
    straight.step()
    straight.step()
    assert straight.keep_if_best({"accuracy@2": 0.5, "accuracy@3": 0.7})
    at_step_2 = clone(straight.policy)  # the oracle: the weights when they were the best
    straight.step()
    assert not straight.keep_if_best({"accuracy@2": 0.6, "accuracy@3": 0.5})  # 0.55 < 0.6
    cache = dict(straight.reward_model.cache.margins)
    assert cache  # the toy reference was asked, and its answers kept
    run = RunFolder.claim(tmp_path / "run")
    run.save_checkpoint(straight.state())
    resumed = trainer(RunFolder.open(tmp_path / "run").checkpoint())
    assert resumed.best == {"score": pytest.approx(0.6), "step": 2,
                            "validation": {"accuracy@2": 0.5, "accuracy@3": 0.7}}
    assert_same(resumed.best_weights, at_step_2)
    assert resumed.reward_model.cache.margins == cache
    later = [straight.step().loss for _ in range(2)]
    assert [resumed.step().loss for _ in range(2)] == later
    assert_same(clone(resumed.policy), clone(straight.policy))


def test_a_checkpoint_composed_the_earlier_way_still_resumes(tmp_path):
    """Earlier versions saved the trainer's (tensors, meta), with the best policy's tensors
    (``best.*``), its record (``meta["best"]``) and the reward cache added beside them."""
    first = trainer()
    first.step()
    state = first.state()
    tensors = {k: v for k, v in state.tensors.items() if not k.startswith("best.")}
    meta = {k: v for k, v in state.meta.items() if k != "best"}
    torch.manual_seed(3)
    best = FrameSelector(TINY).state_dict()  # not any weights the trainer holds
    tensors.update({f"best.{k}": v for k, v in best.items()})
    meta["best"] = {"score": 0.25, "step": 1, "validation": {"accuracy@2": 0.25}}
    cache = [(("q1", (0, 3)), 0.5), (("q2", (1, 2)), -1.0)]
    owned = RunFolder.claim(tmp_path / "run").owned
    checkpoints.save_checkpoint(owned, tensors, meta, cache)  # as pipelines/learn.py did
    resumed = trainer(RunFolder.open(tmp_path / "run").checkpoint())
    assert resumed.step_count == 1 and resumed.best == meta["best"]
    assert_same(resumed.best_weights, best)
    assert resumed.reward_model.cache.margins == dict(cache)
    assert_same(clone(resumed.policy), clone(first.policy))


def test_a_run_folder_is_its_best_policy_and_the_earlier_layout_still_loads(tmp_path):
    torch.manual_seed(0)
    best, last = FrameSelector(TINY).state_dict(), FrameSelector(TINY).state_dict()
    record = {"settings": {"budgets": [2, 4]}, "reward": "toy"}
    flat = RunFolder.claim(tmp_path / "flat")
    flat.write_identity({"store": str(tmp_path / "nowhere"), "reward": "toy"})
    flat.write_policy(TINY.as_dict(), best, **record)
    flat.write_policy(TINY.as_dict(), last, last=True, **record)
    assert (tmp_path / "flat" / "config.json").is_file()
    assert not (tmp_path / "flat" / "policy").exists()  # no policy/policy nesting
    assert set(flat.missing_outputs()) == {"training.png", "summary.json", "complete.json"}
    # the earlier layout: the best policy in RUN/policy/, written as a model folder of its own
    old = RunFolder.claim(tmp_path / "old")
    old.write_identity({"store": str(tmp_path / "nowhere"), "reward": "toy-old"})
    checkpoints.save_model(tmp_path / "old" / "policy", "policy", TINY.as_dict(), best)
    for run in ("flat", "old"):
        for given, weights in ((run, best), (f"{run}/policy", best)):
            found = find_policy_folder(tmp_path / given)
            assert found is not None and found.run is not None, given
            assert_same(load_policy(tmp_path / given).state_dict(), weights)
    assert_same(load_policy(tmp_path / "flat" / "policy-last").state_dict(), last)
    assert find_policy(tmp_path / "flat").budgets == (2, 4)
    assert find_policy(tmp_path / "old").budgets == ()  # its policy and run record none
    assert policy_reward(tmp_path / "old" / "policy") == "toy-old"  # from the run's run.json
    assert policy_reward(tmp_path / "flat" / "policy-last") == "toy"
    # finishing an old-layout run again writes the flat layout and drops the old folder
    old.write_policy(TINY.as_dict(), last, **record)
    assert not (tmp_path / "old" / "policy").exists()
    assert_same(load_policy(tmp_path / "old").state_dict(), last)
    assert_same(load_policy(tmp_path / "old" / "policy").state_dict(), last)


def test_paths_without_a_policy_are_refused_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    RunFolder.claim(tmp_path / "unfinished").write_identity({"store": "s"})
    for given, message in (("missing", "no such policy"), ("empty", "holds no refocus policy"),
                           ("unfinished", "holds no refocus policy")):
        with pytest.raises(UserError, match=message) as caught:
            find_policy(tmp_path / given)
        assert "\n" not in str(caught.value) and str(tmp_path / given) in str(caught.value)
    (tmp_path / "unfinished" / "run.json").write_text("{not json")
    with pytest.raises(UserError, match="damaged"):
        RunFolder.open(tmp_path / "unfinished").identity()


def test_same_run_counts_a_setting_added_later_as_its_default():
    now = {"store": "/s", "settings": {"lr": 0.1, "new": 3}}
    assert same_run({"store": "/s", "settings": {"lr": 0.1}}, now, {"lr": 0.2, "new": 3})
    assert not same_run({"store": "/s", "settings": {"lr": 0.1}}, now, {"lr": 0.2, "new": 4})
    assert not same_run({"store": "/t", "settings": {"lr": 0.1, "new": 3}}, now, {})


@pytest.mark.slow
def test_score_does_not_import_the_learning_stages():
    code = ("import sys, pipelines.score, flows.commands.score; "
            "print(sorted(m for m in sys.modules if m == 'pipelines.learn'))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=True)
    assert json.loads(done.stdout.replace("'", '"')) == []
