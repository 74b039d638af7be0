"""What a flow shows in Prefect: its summary, failures and per-shard progress as artifacts,
read back through the Prefect client from the session's test server; and every stage's flow
as a deployment whose parameter schema Prefect checks (a wrong-typed parameter is refused)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import make_video
from prefect.exceptions import ParameterTypeError
from prefect.utilities.schema_tools import ValidationError, validate

from flows import orchestrate
from flows.orchestrate import preprocess_flow, with_runner
from flows.runtime import Orchestration

GOOD = ("alpha", "beta")


@pytest.fixture(scope="module")
def published(prefect_api, tmp_path_factory) -> tuple[Path, dict, dict[str, list[Any]]]:
    """One preprocess run on two tiny videos and one that is not a video; returns the data
    root, the summary and the run's artifacts by type, as the Prefect API holds them."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    folder = tmp_path_factory.mktemp("artifact-corpus")
    for name in GOOD:
        make_video(folder / f"{name}.mp4", frames=20, fps=10)
    (folder / "broken.mp4").write_text("meeting notes, not a video\n")
    root = tmp_path_factory.mktemp("artifact-root")
    summary = with_runner(preprocess_flow, Orchestration(workers=2))(
        [str(folder)], str(root), fps=2.0, size=32, shard_size=1, index=False)
    [record] = [json.loads(p.read_text()) for p in (root / "flow-runs").glob("*.json")]
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[record["flow_run_id"]])))
    by_type: dict[str, list[Any]] = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    return root, summary, by_type


def _table(artifact: Any) -> list[dict[str, Any]]:
    data = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    if isinstance(data, dict):  # columns → rows
        return [dict(zip(data, row, strict=True)) for row in zip(*data.values(), strict=True)]
    return data


def test_failures_artifact_names_the_bad_video(published):
    root, summary, artifacts = published
    [table] = artifacts["table"]
    assert table.key == "refocus-preprocess-failures"
    rows = _table(table)
    assert [(r["stage"], r["kind"], r["video_id"]) for r in rows] == [
        ("ingest", "video", "broken")]
    assert rows[0]["where"].endswith("broken.mp4") and rows[0]["error"]
    # the same failure as the run's own files say
    [failure] = [json.loads(line) for line in
                 (root / "shards" / "failures.jsonl").read_text().splitlines()]
    assert failure["video_id"] == "broken" and failure["error"] == rows[0]["error"]


def test_summary_artifact_says_what_landed(published):
    _, summary, artifacts = published
    [markdown] = artifacts["markdown"]
    assert markdown.key == "refocus-preprocess-summary"
    assert "**1 failure**" in markdown.data
    lines = set(markdown.data.splitlines())
    assert f"| ingest.videos | {len(GOOD)} |" in lines
    assert f"| embed.frames | {summary['embed']['frames']} |" in lines
    assert summary["embed"]["frames"] > 0


def test_progress_artifacts_end_at_100_and_videos_reach_the_log(published):
    root, _, artifacts = published
    progress = {a.key: a for a in artifacts["progress"]}
    assert set(progress) == {"refocus-ingest-shard-progress", "refocus-embed-shard-progress"}
    assert all(float(a.data) == 100.0 for a in progress.values())
    assert "3 of 3 finished" in progress["refocus-ingest-shard-progress"].description
    log = (root / "logs" / "preprocess.log").read_text()
    for name in GOOD:  # the per-video events the tasks used to drop
        assert f"video {name}: " in log and " frames" in log
    assert "video broken failed: " in log


FLOWS = {  # each stage's flow: parameters a deployment may carry, and a wrong-typed one
    "ingest": (orchestrate.ingest_flow,
               {"inputs": ["videos/"], "out": "shards/",
                "settings": {"shard_size": 4, "decode": {"fps": 2.0}}},
               {"settings": {"shard_size": "many"}}),
    "embed": (orchestrate.embed_flow,
              {"shards": "shards/", "out": "features/", "settings": {"batch_size": 8}},
              {"settings": {"batch_size": [8]}}),
    "preprocess": (orchestrate.preprocess_flow,
                   {"inputs": ["videos/"], "root": "data/", "fps": 1.0,
                    "network": {"timeout": 5.0}},
                   {"network": {"timeout": "soon"}}),
    "train": (orchestrate.train_flow,
              {"store": "features/", "out": "runs/", "grpo": {"steps": 3, "budgets": [4, 8]},
               "reader": {"steps": 20}, "run": {"eval_every": 3}},
              {"grpo": {"steps": "three"}}),
    "evaluate": (orchestrate.evaluate_flow,
                 {"store": "features/", "reward": "reader:runs/reader",
                  "policies": ["runs/policy"], "out": "eval/", "ks": [4, 8]},
                 {"ks": "4,8"}),
    "precompute-margins": (orchestrate.margins_flow,
                           {"store": "features/", "out": "margins/", "spec": "lmm:some/model",
                            "settings": {"subsets_per_question": 4, "budgets": [4, 8]},
                            "options": {"reference_batch": 2}},
                           {"options": {"reference_batch": "two"}}),
    "score": (orchestrate.score_flow,
              {"inputs": ["new.jsonl"], "policy": "runs/policy", "out": "scored/",
               "settings": {"k": 8, "export": "jpeg"}},
              {"settings": {"k": "eight"}}),
}


@pytest.mark.parametrize("stage", list(FLOWS))
def test_every_stage_is_a_deployment_that_refuses_wrong_types(prefect_api, stage):
    flow, good, bad = FLOWS[stage]
    deployment = flow.to_deployment(name=f"check-{stage}", parameters=good)
    schema = deployment._parameter_openapi_schema.model_dump()
    assert set(good) <= set(schema["properties"]), schema["properties"]
    validate(good, schema, raise_on_error=True, preprocess=True, ignore_required=False)
    wrong = {**good, **bad}
    with pytest.raises(ValidationError):  # what the server checks for a deployment's run
        validate(wrong, schema, raise_on_error=True, preprocess=True)
    flow.validate_parameters(good)  # what the flow run itself checks
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters(wrong)
    with pytest.raises(ParameterTypeError):  # an unknown setting is refused too
        flow.validate_parameters({**good, **{k: {"no_such_setting": 1} for k in bad}})
    with pytest.raises(ParameterTypeError):  # a run is refused before the flow's body runs
        flow(**wrong)
