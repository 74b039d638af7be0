"""Training on several processes (torchrun), on CPU with gloo and 2 processes: the ranks split
each step's questions, average their gradients (the update equals one process's on the whole
batch) and keep identical weights; only rank 0 writes the run folder; a stopped distributed run
resumes to the same state as a straight one; the real `refocus train` command under torchrun.

Run as a script, this file is one torchrun process of the command-line test (see the end)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from refocus.settings import GRPOSettings, ReaderTrainSettings

WORLD = 2
SETTINGS = GRPOSettings(steps=4, questions_per_step=8, group=4, budgets=(2, 3), warmup=2)
# for the gradient oracle: no clipping, which would give a sum of the ranks' gradients the
# same direction as their mean
UNCLIPPED = replace(SETTINGS, grad_clip=1e9)
HIDDEN = 32
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


# ----------------------------------------------------------------------------- helpers

def write_toy_store(root: Path, videos: int = 24, frames: int = 10, dim: int = 16) -> Path:
    """A small feature store written straight from random features (no videos, no encoder),
    its manifest where `embed` would leave it; returns the feature folder."""
    from stores.features import FeatureWriter, Layout
    from stores.manifest import Question, Video
    from stores.shards import MANIFEST_FILE

    rng = np.random.default_rng(3)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    shards = root / "shards"
    shards.mkdir(parents=True)
    ids = [f"v{i}" for i in range(videos)]
    writer = FeatureWriter(root / "features", Layout(ids, [frames] * videos),
                           {"model": "toy", "dim": dim}, {"shards": str(shards)})
    writer.write_shard(0, slice(0, videos * frames), unit(rng.standard_normal((videos * frames,
                                                                               dim))),
                       np.tile(np.arange(frames) * 0.5, videos), slice(0, videos),
                       np.full(videos, frames * 0.5), {})
    questions = [Question(f"q{i}", ids[i], "which one?", ("a", "b", "c"), i % 3,
                          split="val" if i % 4 == 0 else "train") for i in range(videos)]
    asked = unit(rng.standard_normal((videos, dim)))
    writer.write_questions([q.qid for q in questions], np.arange(videos),
                           np.array([q.answer for q in questions]), asked, asked,
                           np.arange(0, 3 * videos + 1, 3),
                           unit(rng.standard_normal((3 * videos, dim))), digest="toy")
    rows = [Video(v, f"/videos/{v}.mp4").to_row() for v in ids] + [q.to_row() for q in questions]
    (shards / MANIFEST_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "features"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[Path, str]:
    """(feature folder, reward spec of a reader briefly trained on it)."""
    from pipelines.learn import train_reader_stage

    root = tmp_path_factory.mktemp("toy-store")
    store = write_toy_store(root)
    train_reader_stage(store, None, root / "reader", ReaderTrainSettings(steps=40, batch_size=32))
    return store, f"reader:{root / 'reader'}"


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def torchrun_env(rank: int, port: int) -> None:
    """What torchrun sets for each of its processes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))


def record_writes(under: Path) -> list[str]:
    """From now on, note every file this process writes, creates, renames or removes below
    ``under`` (through Python's audit events), in the list returned."""
    prefix = str(under)
    events = {"os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate"}
    seen: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else \
                bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event in events:  # (a rename: its target)
            path, writing = args[1 if event == "os.rename" else 0], True
        else:
            return
        if writing and isinstance(path, str | os.PathLike) and \
                os.fspath(path).startswith(prefix):
            seen.append(f"{event} {os.path.relpath(path, prefix)}")

    sys.addaudithook(hook)
    return seen


def weights(trainer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}


def gradients(trainer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The gradients of the last update, as the optimizer used them (averaged, clipped)."""
    return {k: p.grad.detach().clone() for k, p in trainer.policy.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- the trainer

def _trainer_rank(rank: int, port: int, store: str, reward: str, out: str) -> None:
    """One rank: a first step in its two halves (rollout, averaged update), then two more."""
    from pipelines.learn import load_corpus, reference
    from refocus.policy import PolicyConfig
    from refocus.rewards import RewardModel
    from refocus.trainer import GRPOTrainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    corpus = load_corpus(store, None)
    trainer = GRPOTrainer(corpus, RewardModel(reference(reward, corpus)), UNCLIPPED,
                          PolicyConfig(dim=corpus.frame_embedding.shape[1], hidden=HIDDEN))
    saved = {f"start.{k}": v for k, v in weights(trainer).items()}
    rollout = trainer.rollout()
    trainer.update(rollout)
    saved.update({f"first.{k}": v for k, v in weights(trainer).items()})
    saved.update({f"grad.{k}": v for k, v in gradients(trainer).items()})
    for _ in range(2):
        trainer.step()
    saved.update({f"last.{k}": v for k, v in weights(trainer).items()})
    saved.update(budget=torch.tensor(rollout.budget), questions=rollout.questions,
                 picks=rollout.picks, mask=rollout.mask, rewards=rollout.rewards,
                 advantage=rollout.advantage)
    save_file({k: v.contiguous() for k, v in saved.items()}, Path(out) / f"rank{rank}.safetensors")
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_split_the_batch_average_gradients_and_keep_identical_weights(toy_run, tmp_path):
    from pipelines.learn import load_corpus, reference
    from refocus.policy import PolicyConfig
    from refocus.rewards import RewardModel
    from refocus.trainer import GRPOTrainer, Rollout

    store, reward = toy_run
    port = free_ports(1)[0]
    mp.spawn(_trainer_rank, args=(port, str(store), reward, str(tmp_path)), nprocs=WORLD)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(WORLD)]
    part = lambda saved, prefix: {k[len(prefix):]: v for k, v in saved.items()  # noqa: E731
                                  if k.startswith(prefix)}
    corpus = load_corpus(store, None)

    def single() -> GRPOTrainer:  # the same run in one process
        return GRPOTrainer(corpus, RewardModel(reference(reward, corpus)), UNCLIPPED,
                           PolicyConfig(dim=corpus.frame_embedding.shape[1], hidden=HIDDEN))

    # the same initial weights everywhere; identical weights after every step
    for stage in ("start", "first", "last"):
        assert_same(part(ranks[0], f"{stage}."), part(ranks[1], f"{stage}."))
    assert_same(part(ranks[0], "start."), weights(single()))
    assert any(not torch.equal(v, ranks[0][f"start.{k}"])
               for k, v in part(ranks[0], "last.").items())

    # one global batch of questions_per_step, rank r holding questions[r::2]
    whole = single().rollout()
    assert [int(r["budget"]) for r in ranks] == [whole.budget] * WORLD
    for r, saved in enumerate(ranks):
        assert saved["questions"].tolist() == whole.questions[r::WORLD].tolist()
        assert len(saved["picks"]) == SETTINGS.questions_per_step // WORLD * SETTINGS.group
    assert not torch.equal(ranks[0]["picks"], ranks[1]["picks"])

    # the oracle: one process updating on the union of the ranks' rollouts (the mean over all
    # rows equals the mean of the ranks' means, their shares being equal). Compared: the
    # gradient each rank stepped with (AdamW's g/(|g|+eps) would blow float noise up where a
    # gradient is zero in exact arithmetic, e.g. attention's key bias).
    fields = ("questions", "picks", "mask", "rewards", "advantage")
    oracle = single()
    oracle.update(Rollout(whole.budget, *(torch.cat([r[f] for r in ranks]) for f in fields)))
    averaged = part(ranks[0], "grad.")
    for key, value in gradients(oracle).items():
        torch.testing.assert_close(averaged[key], value, rtol=1e-4, atol=1e-7, msg=key)
    # ... which tells the average from one rank's own gradient
    alone = single()
    alone.update(Rollout(whole.budget, *(ranks[0][f] for f in fields)))
    assert max(float((averaged[k] - g).abs().max()) for k, g in gradients(alone).items()) > 1e-3


# ----------------------------------------------------------------------------- the stage

def _stage_rank(rank: int, ports: list[int], store: str, reward: str, root: str) -> None:
    """One torchrun-like process: the stage joins the process group itself from the
    environment (a new one per call, on its own port). A straight run, then a run stopped
    after 2 steps and resumed."""
    from pipelines.learn import RunSettings, train_policy_stage

    torch.set_num_threads(1)
    writes = record_writes(Path(root))
    run = RunSettings(eval_every=2, checkpoint_every=2, hidden=HIDDEN)
    calls = [("straight", None), ("resumed", 2), ("resumed", None)]
    summaries = []
    for (folder, stop_after), port in zip(calls, ports, strict=True):
        torchrun_env(rank, port)
        summaries.append(train_policy_stage(store, None, reward, Path(root) / folder, SETTINGS,
                                            run, stop_after=stop_after))
    steps = [(s["steps"], s["finished"]) for s in summaries]
    record = {"writes": writes, "steps": steps}
    (Path(root) / f"record-rank{rank}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_rank_0_alone_writes_and_a_stopped_run_resumes_exactly(toy_run, tmp_path):
    from pipelines.learn import load_policy

    store, reward = toy_run
    ports = free_ports(3)
    mp.spawn(_stage_rank, args=(ports, str(store), reward, str(tmp_path)), nprocs=WORLD)
    records = [json.loads((tmp_path / f"record-rank{r}.json").read_text()) for r in range(WORLD)]
    for record in records:
        assert record["steps"] == [[4, True], [2, False], [4, True]]
    assert records[1]["writes"] == []  # the other rank reads the run folders, never writes
    written = {w.split(" ", 1)[1] for w in records[0]["writes"]}
    for run in ("straight", "resumed"):
        assert {f"{run}/run.json", f"{run}/metrics.jsonl", f"{run}/summary.json",
                f"{run}/training.png", f"{run}/checkpoint"} <= written
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = load_file(straight / "checkpoint" / "state.safetensors")
    b = load_file(resumed / "checkpoint" / "state.safetensors")
    assert "generator.rank1" in a and not torch.equal(a["generator"], a["generator.rank1"])
    assert_same(a, b)  # weights, optimizer, both ranks' generators, best weights
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]  # written once
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4]
    strip = lambda path: [{k: v for k, v in json.loads(line).items()  # noqa: E731
                           if not k.endswith("seconds") and k != "cache_hits"}
                          for line in path.read_text().splitlines()]
    assert strip(straight / "metrics.jsonl") == strip(resumed / "metrics.jsonl")
    assert_same(load_policy(straight).state_dict(), load_policy(resumed).state_dict())


# ----------------------------------------------------------------------------- the command

@pytest.mark.slow
def test_the_train_command_under_torchrun(toy_run, tmp_path):
    """`torchrun --nproc-per-node 2 -m flows.cli train ...`, each process run through this
    file (below) so that it notes what it writes."""
    store, reward = toy_run
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(WORLD), __file__, str(tmp_path), str(run),
               "train", "--store", str(store), "--reward", reward, "--out", str(run),
               "--steps", "4", "--questions-per-step", "8", "--group", "4", "--budgets", "2,3",
               "--eval-every", "2", "--checkpoint-every", "2", "--hidden", str(HIDDEN)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("best validation at step") == 1  # rank 0 alone reports
    writes = [json.loads((tmp_path / f"writes-rank{r}.json").read_text()) for r in range(WORLD)]
    assert writes[1] == []
    assert {"run.json", "metrics.jsonl", "summary.json", "training.png"} <= {
        w.split(" ", 1)[1] for w in writes[0]}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    state = load_file(run / "checkpoint" / "state.safetensors")
    assert {"generator", "generator.rank1"} <= state.keys()
    assert json.loads((run / "summary.json").read_text())["finished"]
    assert (run / "weights.safetensors").is_file()  # the best policy


if __name__ == "__main__":  # one process of test_the_train_command_under_torchrun
    record, run_dir, argv = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    noted = record_writes(run_dir)
    from flows.cli import main

    code = main(argv)
    (record / f"writes-rank{os.environ['RANK']}.json").write_text(json.dumps(noted))
    sys.exit(code)
