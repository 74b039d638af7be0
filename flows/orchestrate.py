"""Prefect flows over the pipeline stages: what ``refocus flow …``, ``refocus serve`` and
``refocus ingest|embed|score --runner prefect|dask`` run.

Each flow is a stage of ``pipelines/`` called with a ``PrefectRunner`` (``flows/runners.py``):
the stage keeps the order of its steps, and its per-shard step becomes Prefect tasks. The
stores' done markers say what is finished, so a re-run (or a retry) skips finished shards and a
killed flow resumes where it stopped. A flow claims its output folder (stores/owned.py)
through the stage's own claim before it writes its records there (logs/, flow-runs/), so a
user's folder is refused with one line before anything is written.

    ingest_flow      ingest: the shards mapped over tasks (a shard task that still fails
                     after its retries is recorded; the other shards land)
    embed_flow       embed: each shard's features a task, written by the flow as they come
    preprocess_flow  ingest_flow → embed_flow under one data root (ROOT/shards,
                     ROOT/features): the flow to schedule
    precompute_flow  the reference model's vision features per shard (GPU, one task)
    margins_flow     the reference model's margins on frame subsets, one task per chunk
    train_flow       train the reader (when the reward is the reader) → train the policy
    evaluate_flow    the policy against the baselines
    score_flow       refocus score: ingest and embed mapped over tasks, then select

Tasks take only picklable plain values, so the same flow runs on local threads or on a
Dask cluster (``flows/runtime.py``).

Every flow but margins_flow takes typed parameters — names, numbers, lists and the stages'
settings dataclasses (IngestSettings, EmbedSettings, ScoreSettings, GRPOSettings, …), whose
fields a deployment gives as a mapping — and Prefect validates them: ``flow.to_deployment``
carries their JSON schema, and a run with a wrong-typed or unknown setting is refused before
it starts. What a run did is published as Prefect artifacts (``flows/artifacts.py``): its
summary, its failures, and each mapped step's progress.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_table
from flows.options import default_of
from flows.runners import PrefectRunner, with_runner  # noqa: F401  (with_runner: see runners)
from flows.runtime import Orchestration, flow_record, retry_options
from pipelines.decode import DecodeSettings
from pipelines.embed import EmbedSettings, claim_features, embed
from pipelines.encoder import SYNTH_ENCODER, load_encoder
from pipelines.ingest import IngestSettings, claim_ingest, ingest
from pipelines.runners import Step, split
from pipelines.settings import ScoreSettings
from refocus.settings import (
    GRPOSettings,
    MarginSettings,
    ReaderTrainSettings,
    ReferenceOptions,
    RunSettings,
)
from stores import importers
from stores.index import IndexSettings
from stores.manifest import Manifest
from stores.margins import chunk_name
from stores.owned import claim
from stores.shards import read_questions
from stores.urls import NetworkSettings

# Markers of the folders only a flow makes (the stages claim their own sub-folders).
PREPROCESS_KIND, TRAIN_FLOW_KIND = "preprocess", "train-flow"


def _logged(stage: str, out: str, unit: str) -> Any:
    """An ``on_start`` that logs what a stage has to do."""
    return lambda todo, done: get_run_logger().info("%s %s: %d %s to do, %d already done",
                                                    stage, out, todo, unit, done)


@flow(name="refocus-ingest")
def ingest_flow(inputs: list[str], out: str, settings: IngestSettings | None = None,
                retry_failed: bool = False,
                orchestration: Orchestration | None = None) -> dict[str, Any]:
    """Videos, folders or manifests → frame shards under ``out``."""
    o = orchestration or Orchestration()
    settings = settings or IngestSettings(workers=o.workers)
    manifest = importers.from_inputs(list(inputs), settings.network)
    claim_ingest(manifest, out, inputs)  # refused before the flow writes its records there
    with flow_record(out, "ingest", {"inputs": list(inputs), "out": out,
                                     "settings": settings.output_settings(),
                                     "orchestration": o.as_dict()}) as record:
        record.summary = _ingest(manifest, out, settings, retry_failed, PrefectRunner(
            o, record.tasks), inputs)
    return record.summary


def _ingest(manifest: Manifest, out: str, settings: IngestSettings, retry_failed: bool,
            runner: PrefectRunner, inputs: list[str]) -> dict[str, Any]:
    summary = ingest(manifest, out, settings, retry_failed=retry_failed, inputs=inputs,
                     on_start=_logged("ingest", out, "videos"), runner=runner).as_dict()
    get_run_logger().info("ingest %s: %d videos, %d frames, %d failures", out,
                          summary["videos"], summary["frames"], len(summary["failures"]))
    return summary


@flow(name="refocus-embed")
def embed_flow(shards: str, out: str, model: str = SYNTH_ENCODER, pretrained: str | None = None,
               questions: list[str] | None = None, settings: EmbedSettings | None = None,
               device: str | None = None,
               orchestration: Orchestration | None = None) -> dict[str, Any]:
    """Frame shards (+ questions) → the feature store and its FAISS index under ``out``."""
    o = orchestration or Orchestration()
    settings = settings or EmbedSettings()
    claim_features(shards, out)
    with flow_record(out, "embed", {"shards": shards, "out": out, "model": model,
                                    "pretrained": pretrained, "questions": questions,
                                    "orchestration": o.as_dict()}) as record:
        record.summary = _embed(shards, out, model, pretrained, questions, settings, device,
                                PrefectRunner(o, record.tasks))
    return record.summary


def _embed(shards: str, out: str, model: str, pretrained: str | None,
           questions: list[str] | None, settings: EmbedSettings, device: str | None,
           runner: PrefectRunner) -> dict[str, Any]:
    manifest = read_questions(questions, shards)
    summary = embed(shards, out, load_encoder(model, pretrained, device), settings, manifest,
                    on_start=_logged("embed", out, "frames"), runner=runner).as_dict()
    get_run_logger().info("embed %s: %d frames, %d questions", out, summary["frames"],
                          summary["questions"])
    return summary


@flow(name="refocus-preprocess")
def preprocess_flow(inputs: list[str], root: str,  # defaults: the settings dataclasses'
                    fps: float = default_of(DecodeSettings, "fps"),
                    max_frames: int = default_of(DecodeSettings, "max_frames"),
                    size: int = default_of(DecodeSettings, "size"),
                    shard_size: int = default_of(IngestSettings, "shard_size"),
                    model: str = SYNTH_ENCODER, pretrained: str | None = None,
                    batch_size: int = default_of(EmbedSettings, "batch_size"), index: bool = True,
                    retries: int = default_of(Orchestration, "retries"),
                    network: NetworkSettings | None = None) -> dict[str, Any]:
    """The flow to schedule: the videos under ``inputs`` → ROOT/shards → ROOT/features.
    Each run finishes what earlier runs left (finished shards are skipped) and picks up what
    the inputs gained: new videos in a watched folder or manifest become new shards, new
    feature rows and new index entries, and nothing earlier runs wrote is rewritten (a video
    gone from the inputs stays; other frame settings are refused). Plain parameters only, so a
    deployment can carry them (``network``: a mapping of ``NetworkSettings`` fields); the
    task runner comes from ``with_runner``."""
    o = Orchestration(retries=retries)
    settings = IngestSettings(decode=DecodeSettings(fps=fps or None, max_frames=max_frames or None,
                                                    size=size or None), shard_size=shard_size,
                              network=network or NetworkSettings())
    embed_settings = EmbedSettings(batch_size=batch_size, index=IndexSettings() if index else None)
    manifest = importers.from_inputs(list(inputs), settings.network)
    shards, features = str(Path(root) / "shards"), str(Path(root) / "features")
    claim(root, PREPROCESS_KIND, inputs=[*inputs, *(v.path for v in manifest.videos)],
          option="--root")
    with flow_record(root, "preprocess", {"inputs": list(inputs), "root": root, "fps": fps,
                                          "max_frames": max_frames, "size": size,
                                          "model": model}) as record:
        runner = PrefectRunner(o, record.tasks)
        record.summary = {
            "ingest": _ingest(manifest, shards, settings, False, runner, inputs),
            "embed": _embed(shards, features, model, pretrained, None, embed_settings, None,
                            runner)}
    return record.summary


@task(name="precompute-reference", cache_policy=NO_CACHE)
def _precompute_task(shards: str, out: str, model: str, device: str | None,
                     frames_per_pass: int) -> dict[str, Any]:
    from pipelines.reference import PrecomputeSettings, precompute_reference
    from pipelines.vlm import load_lmm

    scorer = load_lmm(model, device=device)
    return precompute_reference(shards, out, scorer, PrecomputeSettings(frames_per_pass))


@flow(name="refocus-precompute-reference")
def precompute_flow(shards: str, out: str, model: str, device: str | None = None,
                    frames_per_pass: int = 32, retries: int = 1) -> dict[str, Any]:
    """The reference model's vision features of every shard (resumes by shard)."""
    from pipelines.reference import claim_reference

    claim_reference(shards, out)
    with flow_record(out, "precompute-reference", {"shards": shards, "model": model}) as record:
        o = Orchestration(retries=retries)
        record.summary = _precompute_task.with_options(**retry_options(o))(
            shards, out, model, device, frames_per_pass)
    return record.summary


_MARGIN_LOCK = threading.Lock()  # one chunk at a time per process: the model is shared


@functools.lru_cache(maxsize=1)
def _margin_reference(store: str, qa: tuple[str, ...] | None, spec: str,
                      options: Any) -> tuple[Any, Any]:
    """The corpus and the reference LMM, loaded once per worker process."""
    from pipelines.learn import load_corpus
    from pipelines.margins import load_reference
    from refocus.device import pick_device

    corpus = load_corpus(store, list(qa) if qa else None, pick_device(options.device))
    return corpus, load_reference(spec, corpus, store, options)


def _margins_item(out: str, store: str, qa: tuple[str, ...] | None, spec: str, settings: Any,
                  options: Any, item: tuple[int, list[str]], report: Any) -> dict[str, Any]:
    """One chunk of questions scored and written (at once when it is already done)."""
    from pipelines.margins import margins_chunk

    index, qids = item
    with _MARGIN_LOCK:
        corpus, ref = _margin_reference(store, qa, spec, options)
        return margins_chunk(out, index, qids, corpus, ref, settings)


@flow(name="refocus-precompute-margins")
def margins_flow(store: str, out: str, spec: str, settings: MarginSettings | None = None,
                 options: ReferenceOptions | None = None,
                 qa: list[str] | None = None, retries: int = 1) -> dict[str, Any]:
    """The reference LMM's margins on frame subsets, the chunks mapped over tasks (finished
    chunks are skipped; a failed chunk is recorded and the others land)."""
    from pipelines.margins import (
        claim_margins,
        finish_margins,
        margin_inputs,
        margins_job,
    )

    settings, options = settings or MarginSettings(), options or ReferenceOptions()
    inputs = margin_inputs(store, qa, spec, options)
    claim_margins(out, inputs)
    key = tuple(qa) if qa else None
    with flow_record(out, "precompute-margins", {"store": store, "spec": spec,
                                                 "settings": settings}) as record:
        corpus, ref = _margin_reference(store, key, spec, options)
        with margins_job(out, corpus, ref.id, settings, store, inputs) as job:
            step = Step("margins-chunk", functools.partial(
                _margins_item, str(job.owned.path), store, key, spec, settings, options),
                name=lambda item: chunk_name(item[0]),
                title=lambda item: f"margins {item[0]:06d}")
            runner = PrefectRunner(Orchestration(retries=retries), record.tasks)
            markers, failed = split(runner.map(step, [(i, job.chunks[i]) for i in job.todo]))
            record.summary = finish_margins(job, markers, [(f.name, f.error) for f in failed])
    return record.summary


@task(name="train-reader", cache_policy=NO_CACHE)
def _train_reader_task(store: str, out: str, settings: ReaderTrainSettings) -> dict[str, Any]:
    from pipelines.learn import train_reader_stage

    return train_reader_stage(store, None, out, settings)


@task(name="train-policy", cache_policy=NO_CACHE)
def _train_policy_task(store: str, reward: str, out: str, settings: GRPOSettings,
                       run: RunSettings) -> dict[str, Any]:
    from pipelines.learn import train_policy_stage

    return train_policy_stage(store, None, reward, out, settings, run)


@flow(name="refocus-train")
def train_flow(store: str, out: str, reward: str = "reader", grpo: GRPOSettings | None = None,
               reader: ReaderTrainSettings | None = None, run: RunSettings | None = None,
               retries: int = 1) -> dict[str, Any]:
    """From cached features: the reader reference (when ``reward`` is ``reader``, into
    OUT/reader) then the policy (OUT/policy). Both resume from their checkpoints."""
    o = Orchestration(retries=retries)
    claim(out, TRAIN_FLOW_KIND, inputs=[store])  # OUT/reader and OUT/policy: their stages'
    with flow_record(out, "train", {"store": store, "reward": reward}) as record:
        summary: dict[str, Any] = {}
        if reward == "reader":
            reader_dir = str(Path(out) / "reader")
            summary["reader"] = _train_reader_task.with_options(**retry_options(o))(
                store, reader_dir, reader or ReaderTrainSettings())
            reward = f"reader:{reader_dir}"
        summary["policy"] = _train_policy_task.with_options(**retry_options(o))(
            store, reward, str(Path(out) / "policy"), grpo or GRPOSettings(),
            run or RunSettings())
        record.summary = summary
    return summary


@task(name="evaluate", cache_policy=NO_CACHE)
def _evaluate_task(store: str, split: str, ks: list[int], reward: str | None,
                   policies: list[str], out: str, judges: list[str]) -> list[dict[str, Any]]:
    from dataclasses import asdict

    from pipelines.learn import evaluate_stage

    return [asdict(r) for r in evaluate_stage(store, None, split, ks, reward, policies,
                                              out=out, judges=judges)]


@flow(name="refocus-evaluate")
def evaluate_flow(store: str, reward: str | None, policies: list[str], out: str,
                  split: str = "test", ks: list[int] | None = None,
                  judges: list[str] | None = None) -> list[dict[str, Any]]:
    """The policies against the baselines, judged by ``reward`` and every one of ``judges``
    (``ideal``, reader:PATH, lmm:MODEL): eval.md, eval.csv, eval.json and eval.png under
    ``out``."""
    from stores.owned import claim

    claim(out, "eval", inputs=[store, *policies])  # before the flow's logs land in it
    with flow_record(out, "evaluate", {"store": store, "reward": reward, "judges": judges,
                                       "policies": policies, "split": split}) as record:
        rows = _evaluate_task(store, split, list(ks or (4, 8, 16)), reward, list(policies), out,
                              list(judges or ()))
        record.summary = {"rows": len(rows)}
        publish_table("evaluate", "accuracy", rows, f"refocus evaluate → {out}: accuracy per "
                      "method, budget and judge")
    return rows


@flow(name="refocus-score")
def score_flow(inputs: list[str], policy: str, out: str, settings: ScoreSettings | None = None,
               orchestration: Orchestration | None = None) -> dict[str, Any]:
    """refocus score: a new corpus → shards and features under ``out`` (mapped over shards,
    skipping what is done) → the policy's selections (+ exported frames)."""
    from pipelines.score import (
        check_questions,
        claim_score,
        find_policy,
        score,
        with_trained_k,
    )

    o = orchestration or Orchestration()
    settings = replace(settings or ScoreSettings(), ingest_workers=o.workers)
    manifest = importers.from_inputs(list(inputs), settings.network)
    check_questions(manifest)
    claim_score(manifest, policy, out, inputs)
    k = with_trained_k(settings, find_policy(policy)).k  # (recorded; a missing k stops here)
    with flow_record(out, "score", {"inputs": list(inputs), "policy": policy, "k": k,
                                    "export": settings.export,
                                    "orchestration": o.as_dict()}) as record:
        record.summary = score(manifest, policy, out, settings, inputs=inputs,
                               runner=PrefectRunner(o, record.tasks))
    return record.summary
