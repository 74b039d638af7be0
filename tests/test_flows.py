"""Prefect flows end to end on a tiny synthetic corpus, under one Prefect test server: the
flows write exactly what the plain stages write, on local threads and on a 2-worker Dask
cluster; a killed flow resumes without redoing finished shards; transient task errors are
retried and bad input is not; refocus serve registers a cron deployment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import SynthChain, _live_members, kill_parent_and_wait_for_workers

from flows import orchestrate
from flows.cli import main
from flows.orchestrate import preprocess_flow, with_runner
from flows.runtime import Orchestration, is_transient
from pipelines import ingest as ingest_module
from pipelines.ingest import IngestSettings
from stores.errors import UserError

REFOCUS = str(Path(sys.executable).parent / "refocus")
VIDEOS = 8
SHARD_SIZE = 1  # a shard per video: many tasks, and room to kill a run between them
ARRAYS = ["frames/embedding", "frames/time", "frames/video", "videos/offsets",
          "videos/duration", "questions/embedding", "questions/answer", "options/embedding"]


# a shard per video; the plain stages' output is the flows' oracle
FLOW_CHAIN = SynthChain(videos=VIDEOS, seed=5, duration=(16.0, 18.0), shard_size=SHARD_SIZE,
                        ingest_workers=1, embed_workers=0, index=True)


@pytest.fixture(scope="module")
def corpus(synth_chain) -> Path:
    return synth_chain(FLOW_CHAIN) / "corpus" / "manifest.jsonl"


@pytest.fixture(scope="module")
def plain(synth_chain) -> Path:
    """The oracle: the plain stages, no Prefect."""
    return synth_chain(FLOW_CHAIN)


def _flow(corpus: Path, root: Path, o: Orchestration = Orchestration(workers=2)) -> dict:
    return with_runner(preprocess_flow, o)([str(corpus)], str(root), shard_size=SHARD_SIZE,
                                           retries=o.retries)


@pytest.fixture(scope="module")
def local(prefect_api, corpus, tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("local")
    return root, _flow(corpus, root)


def assert_same_stores(a: Path, b: Path) -> None:
    shards_a = sorted(p.name for p in (a / "shards").glob("shard-*.tar"))
    assert shards_a == sorted(p.name for p in (b / "shards").glob("shard-*.tar"))
    assert len(shards_a) == VIDEOS
    for name in shards_a:
        assert (a / "shards" / name).read_bytes() == (b / "shards" / name).read_bytes(), name
    za = zarr.open_group(a / "features" / "features.zarr", mode="r")
    zb = zarr.open_group(b / "features" / "features.zarr", mode="r")
    for key in ARRAYS:
        x, y = za[key][:], zb[key][:]
        if key.endswith("embedding"):
            # Model outputs: a different process or thread count may round a matmul
            # differently, which moves a rare float16 value by one step (2^-14 near 0.1).
            np.testing.assert_allclose(x.astype(np.float32), y.astype(np.float32), rtol=0,
                                       atol=2.0 ** -13, err_msg=key)
            assert np.mean(x == y) > 0.999, key
        else:
            np.testing.assert_array_equal(x, y, err_msg=key)
    assert list(za["questions/qid"][:]) == list(zb["questions/qid"][:])


def test_preprocess_flow_writes_what_the_plain_stages_write(local, plain):
    root, summary = local
    assert_same_stores(root, plain)
    assert summary["ingest"]["videos"] == VIDEOS and not summary["ingest"]["failures"]
    assert summary["embed"]["shards_written"] == VIDEOS
    assert summary["embed"]["index"]["frames"] == summary["embed"]["frames"]
    # the run record and the log live under the data root
    [record] = [json.loads(p.read_text()) for p in (root / "flow-runs").glob("*-preprocess.json")]
    assert record["status"] == "completed" and record["flow_run_id"]
    assert record["tasks"] == {f"shard-{i:06d}.tar": "Completed" for i in range(VIDEOS)}
    log = (root / "logs" / "preprocess.log").read_text()
    assert "ingest 000007" in log and "embed 000007" in log


def test_rerun_skips_every_finished_shard(prefect_api, local, corpus):
    root, _ = local
    again = _flow(corpus, root)
    assert again["ingest"]["shards_written"] == 0
    assert again["ingest"]["shards_skipped"] == VIDEOS
    assert again["embed"]["shards_written"] == 0


def test_dask_runner_with_two_workers_gives_the_same_stores(prefect_api, local, corpus,
                                                            tmp_path):
    summary = _flow(corpus, tmp_path, Orchestration(runner="dask", workers=2))
    assert summary["embed"]["shards_written"] == VIDEOS
    assert_same_stores(tmp_path, local[0])


def test_a_killed_flow_resumes_without_redoing_finished_shards(prefect_api, corpus, plain,
                                                               tmp_path):
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    cmd = [sys.executable, "-m", "flows.cli", "flow", "preprocess", str(corpus), "--root",
           str(tmp_path), "--shard-size", str(SHARD_SIZE), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    first = tmp_path / "shards" / "shard-000000.done.json"
    deadline = time.monotonic() + 120
    while not first.exists():
        assert proc.poll() is None, "the flow ended before it could be killed"
        assert time.monotonic() < deadline, "no shard finished in time"
        time.sleep(0.005)
    kill_parent_and_wait_for_workers(proc)
    done = sorted((tmp_path / "shards").glob("shard-*.done.json"))
    assert 1 <= len(done) < VIDEOS, "kill landed after the ingest finished"
    stamps = {p.name: p.stat().st_mtime_ns for p in done}
    tars = {p.name: (tmp_path / "shards" / p.name.replace(".done.json", ".tar")).stat()
            .st_mtime_ns for p in done}
    summary = _flow(corpus, tmp_path, Orchestration(workers=1))
    assert summary["ingest"]["shards_skipped"] == len(done)
    assert summary["ingest"]["shards_written"] == VIDEOS - len(done)
    for name, stamp in stamps.items():  # finished shards were not written again
        assert (tmp_path / "shards" / name).stat().st_mtime_ns == stamp
        tar = name.replace(".done.json", ".tar")
        assert (tmp_path / "shards" / tar).stat().st_mtime_ns == tars[name]
    assert_same_stores(tmp_path, plain)


def _children(parent: int) -> dict[int, str]:
    """Live child processes of ``parent``: pid → command line."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found[int(stat.parent.name)] = cmdline
    return found


@pytest.mark.slow
def test_a_killed_flow_leaves_no_prefect_server_behind(corpus, tmp_path):
    """``refocus flow preprocess`` without PREFECT_API_URL runs Prefect's temporary API
    server; kill -9 of the flow's process takes that server with it."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    cmd = [REFOCUS, "flow", "preprocess", str(corpus), "--root", str(tmp_path),
           "--shard-size", str(SHARD_SIZE), "--workers", "1", "--no-index"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        running = tmp_path / "logs" / "preprocess.log"  # the flow's body has started
        deadline = time.monotonic() + 120
        while not running.exists():
            assert proc.poll() is None, "the flow ended before it could be killed"
            assert time.monotonic() < deadline, "the flow did not start in time"
            time.sleep(0.05)
        servers = [pid for pid, cmdline in _children(proc.pid).items() if "uvicorn" in cmdline]
        assert len(servers) == 1, _children(proc.pid)  # the temporary server is running
        kill_parent_and_wait_for_workers(proc, timeout=20)  # the server included
    finally:  # whatever outlived the flow (the server, on the old code)
        for pid in _live_members(proc.pid):
            os.kill(pid, signal.SIGKILL)


def test_transient_errors_are_retried_and_bad_input_is_not(prefect_api, corpus, plain,
                                                           tmp_path, monkeypatch):
    calls: dict[int, int] = {}
    real = ingest_module.ingest_shard

    def flaky(index, videos, out, settings, report):
        calls[index] = calls.get(index, 0) + 1
        if index == 1 and calls[index] == 1:
            raise OSError("disk hiccup")  # transient: retried, then lands
        if index == 2:
            raise UserError("shard 2: bad input")  # not transient: fails at once
        return real(index, videos, out, settings, report)

    monkeypatch.setattr(ingest_module, "ingest_shard", flaky)  # the step of every runner
    o = Orchestration(workers=2, retries=3, retry_delay=0)
    summary = with_runner(orchestrate.ingest_flow, o)(
        [str(corpus)], str(tmp_path / "shards"), IngestSettings(shard_size=SHARD_SIZE),
        orchestration=o)
    assert calls[1] == 2 and calls[2] == 1
    assert all(calls[i] == 1 for i in calls if i not in (1, 2))
    assert [(f["kind"], f["where"]) for f in summary["failures"]] == [
        ("shard", "shard-000002.tar")]
    assert "bad input" in summary["failures"][0]["error"]
    assert summary["shards_written"] == VIDEOS - 1  # everything else landed
    for i in (0, 1, 3):
        name = f"shard-{i:06d}.tar"
        assert (tmp_path / "shards" / name).read_bytes() == (plain / "shards" / name).read_bytes()
    [record] = [json.loads(p.read_text())
                for p in (tmp_path / "shards" / "flow-runs").glob("*-ingest.json")]
    assert record["tasks"]["shard-000001.tar"] == "Completed"
    assert record["tasks"]["shard-000002.tar"] == "Failed"


def test_which_errors_count_as_transient():
    assert is_transient(OSError("no space left")) and is_transient(TimeoutError())
    assert is_transient(ConnectionResetError())
    for error in (UserError("bad id"), FileNotFoundError("x.mp4"), ValueError("bad"),
                  PermissionError("denied"), KeyError("qid")):
        assert not is_transient(error), error


def test_serve_registers_a_cron_deployment(prefect_api, corpus, tmp_path, capsys):
    from prefect.client.orchestration import get_client

    code = main(["serve", str(corpus), "--root", str(tmp_path), "--cron", "15 3 * * *",
                 "--name", "nightly", "--register-only"])
    assert code == 0
    with get_client(sync_client=True) as client:
        d = client.read_deployment_by_name("refocus-preprocess/nightly")
    assert [s.schedule.cron for s in d.schedules] == ["15 3 * * *"]
    assert d.parameters["root"] == str(tmp_path.resolve())
    assert d.parameters["inputs"] == [str(corpus.resolve())]
    assert main(["serve", str(corpus), "--root", str(tmp_path), "--cron", "every day",
                 "--register-only"]) == 2
    assert "not a valid schedule" in capsys.readouterr().err


def test_train_and_evaluate_flows_match_the_plain_stages(prefect_api, synth_store, tmp_path):
    from safetensors.torch import load_file

    from flows.orchestrate import evaluate_flow, train_flow
    from pipelines.learn import RunSettings, evaluate_stage, train_policy_stage, train_reader_stage
    from refocus.settings import GRPOSettings, ReaderTrainSettings

    store = str(synth_store / "features")
    reader = ReaderTrainSettings(steps=20, batch_size=32)
    grpo = GRPOSettings(steps=3, questions_per_step=8, group=4)
    run = RunSettings(eval_every=3, checkpoint_every=3)
    summary = train_flow(store, str(tmp_path / "flow"), "reader", grpo, reader, run)
    # the oracle: the same stages called directly
    train_reader_stage(store, None, tmp_path / "plain" / "reader", reader)
    plain = train_policy_stage(store, None, f"reader:{tmp_path / 'plain' / 'reader'}",
                               tmp_path / "plain" / "policy", grpo, run)
    assert summary["policy"]["steps"] == plain["steps"] == 3
    for part in ("reader/weights.safetensors", "policy/weights.safetensors"):
        a, b = load_file(tmp_path / "flow" / part), load_file(tmp_path / "plain" / part)
        assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), part
    reward = f"reader:{tmp_path / 'flow' / 'reader'}"
    policy = str(tmp_path / "flow" / "policy")
    rows = evaluate_flow(store, reward, [policy], str(tmp_path / "eval"), "test", [4],
                         judges=["ideal"])
    direct = evaluate_stage(store, None, "test", [4], reward, [policy], judges=["ideal"])
    assert [(r["method"], r["category"], r["judge"], r["accuracy"]) for r in rows] == [
        (r.method, r.category, r.judge, r.accuracy) for r in direct]
    assert {r["judge"] for r in rows} == {"reader", "ideal"}
    assert (tmp_path / "eval" / "eval.md").exists()
    records = sorted(p.name for p in (tmp_path / "flow" / "flow-runs").glob("*.json"))
    assert len(records) == 1 and records[0].endswith("-train.json")
