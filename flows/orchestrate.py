"""Prefect flows over the pipeline stages: what ``refocus flow …`` and ``refocus serve`` run.

Each flow is the stage's own code from ``pipelines/`` with the per-shard step mapped over
Prefect tasks; the stores' done markers say what is finished, so a re-run (or a retry)
skips finished shards and a killed flow resumes where it stopped.

    ingest_flow      plan + folder lock → ingest_shard mapped over the unfinished shards
                     → summary and failures (a shard task that still fails after its
                     retries is recorded; the other shards land)
    embed_flow       plan + the one writer → embed_shard mapped over unfinished shards,
                     each result written by the flow as it completes → questions, index
    preprocess_flow  ingest_flow → embed_flow under one data root (ROOT/shards,
                     ROOT/features): the flow to schedule
    precompute_flow  the reference model's vision features per shard (GPU, one task)
    margins_flow     the reference model's margins on frame subsets, one task per chunk
    train_flow       train the reader (when the reward is the reader) → train the policy
    evaluate_flow    the policy against the baselines
    score_flow       ingest_flow → embed_flow → select and write selections (+ export)

Tasks take only picklable plain values, so the same flow runs on local threads or on a
Dask cluster (``flows/runtime.py``). Every flow claims its output folder (stores/owned.py)
through the stage's own claim before it writes its records there, so a user's folder is
refused with one line before anything is written.
"""

from __future__ import annotations

import functools
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from flows.options import default_of
from flows.runtime import Orchestration, flow_record, retry_options, task_runner
from pipelines.decode import DecodeSettings
from pipelines.embed import (
    EmbedPlan,
    EmbedSettings,
    ShardFeatures,
    ShardPlan,
    claim_features,
    compute_shards,
    embed_job,
    finish_embed,
)
from pipelines.encoder import SYNTH_ENCODER, Encoder, load_encoder
from pipelines.ingest import (
    IngestSettings,
    claim_ingest,
    finish_ingest,
    ingest_job,
    ingest_shard,
)
from stores import importers
from stores.index import IndexSettings
from stores.manifest import Manifest, Video
from stores.margins import chunk_name
from stores.owned import claim
from stores.shards import MANIFEST_FILE, read_questions, shard_name
from stores.urls import NetworkSettings

# Markers of the folders only a flow makes (the stages claim their own sub-folders).
PREPROCESS_KIND, TRAIN_FLOW_KIND = "preprocess", "train-flow"

# ----------------------------------------------------------------------------- tasks


@task(name="ingest-shard", cache_policy=NO_CACHE, task_run_name="ingest {shard_index:06d}")
def ingest_shard_task(shard_index: int, videos: list[Video], out: str,
                      settings: IngestSettings) -> dict[str, Any]:
    """One shard, one writer; returns its done marker (at once when it already has one)."""
    return ingest_shard(shard_index, videos, Path(out), settings, lambda event: None)


@functools.lru_cache(maxsize=2)
def _encoder(model: str, pretrained: str | None, device: str | None) -> Encoder:
    return load_encoder(model, pretrained, device)  # once per worker process


@task(name="embed-shard", cache_policy=NO_CACHE, task_run_name="embed {shard.index:06d}")
def embed_shard_task(shards_dir: str, embed_plan: EmbedPlan, shard: ShardPlan,
                     model: str, pretrained: str | None,
                     device: str | None) -> ShardFeatures:
    """One input shard's features, computed in the task and written by the flow."""
    encoder = _encoder(model, pretrained, device)
    # Dask workers are daemonic and may not start DataLoader processes; the tasks are the
    # parallelism here anyway.
    result: list[ShardFeatures] = []
    compute_shards(Path(shards_dir), embed_plan, [shard], encoder, 0, result.append)
    return result[0]


# ----------------------------------------------------------------------------- flows


def _states(futures: list[Any], names: list[str]) -> tuple[list[Any], list[tuple[str, str]],
                                                           dict[str, str]]:
    """Results of finished tasks, (name, error) of failed ones, and every task's state."""
    results, failed, states = [], [], {}
    for name, future in zip(names, futures, strict=True):
        value = future.result(raise_on_failure=False)
        states[name] = future.state.name
        if isinstance(value, BaseException):
            failed.append((name, f"{type(value).__name__}: {value}".splitlines()[0]))
        else:
            results.append(value)
    return results, failed, states


@flow(name="refocus-ingest", validate_parameters=False)
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
        summary = _ingest(manifest, out, settings, retry_failed, o, record)
        record.summary = summary
    return summary


def _ingest(manifest: Manifest, out: str, settings: IngestSettings, retry_failed: bool,
            o: Orchestration, record: Any) -> dict[str, Any]:
    log = get_run_logger()
    with ingest_job(manifest, out, settings, retry_failed) as job:
        log.info("ingest %s: %d shards to write, %d videos already done", out, len(job.todo),
                 job.videos_done)
        shard = ingest_shard_task.with_options(**retry_options(o))
        futures = shard.map([i for i, _ in job.todo], [v for _, v in job.todo],
                            unmapped(str(job.out)), unmapped(job.settings))
        written, crashes, states = _states(list(futures),
                                           [shard_name(i) for i, _ in job.todo])
        record.tasks.update(states)
        summary = finish_ingest(job, written, crashes).as_dict()
    log.info("ingest %s: %d videos, %d frames, %d failures", out, summary["videos"],
             summary["frames"], len(summary["failures"]))
    return summary


@flow(name="refocus-embed", validate_parameters=False)
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
        summary = _embed(shards, out, model, pretrained, questions, settings, device, o, record)
        record.summary = summary
    return summary


def _embed(shards: str, out: str, model: str, pretrained: str | None,
           questions: list[str] | None, settings: EmbedSettings, device: str | None,
           o: Orchestration, record: Any) -> dict[str, Any]:
    log = get_run_logger()
    encoder = _encoder(model, pretrained, device)
    manifest = read_questions(questions, shards)
    started = time.perf_counter()
    with embed_job(shards, out, encoder.identity, settings.batch_size) as job:
        log.info("embed %s: %d of %d input shards to do", out, len(job.todo),
                 len(job.plan.shards))
        shard = embed_shard_task.with_options(**retry_options(o))
        futures = list(shard.map(unmapped(str(job.shards_dir)), unmapped(job.plan), job.todo,
                                 unmapped(model), unmapped(pretrained), unmapped(device)))
        written = []
        for future in as_completed(futures):  # one writer: this flow, as results come in
            features = future.result(raise_on_failure=False)
            if isinstance(features, ShardFeatures):  # else the task failed: recorded below
                job.write(features)
                written.append(features.plan)
        _, _, record.tasks = _states(futures, [shard_name(s.index) for s in job.todo])
        timings = {"tasks": time.perf_counter() - started}
        summary = finish_embed(job, encoder, settings, manifest, written, timings).as_dict()
    log.info("embed %s: %d frames, %d questions", out, summary["frames"], summary["questions"])
    return summary


@flow(name="refocus-preprocess", validate_parameters=False)
def preprocess_flow(inputs: list[str], root: str,  # defaults: the settings dataclasses'
                    fps: float = default_of(DecodeSettings, "fps"),
                    max_frames: int = default_of(DecodeSettings, "max_frames"),
                    size: int = default_of(DecodeSettings, "size"),
                    shard_size: int = default_of(IngestSettings, "shard_size"),
                    model: str = SYNTH_ENCODER, pretrained: str | None = None,
                    batch_size: int = default_of(EmbedSettings, "batch_size"), index: bool = True,
                    retries: int = default_of(Orchestration, "retries"),
                    network: dict[str, Any] | None = None) -> dict[str, Any]:
    """The flow to schedule: the videos under ``inputs`` → ROOT/shards → ROOT/features.
    Each run finishes what earlier runs left (finished shards are skipped) and picks up what
    the inputs gained: new videos in a watched folder or manifest become new shards, new
    feature rows and new index entries, and nothing earlier runs wrote is rewritten (a video
    gone from the inputs stays; other frame settings are refused). Plain parameters only, so a
    deployment can carry them (``network``: ``NetworkSettings`` fields); the task runner comes
    from ``with_runner``."""
    o = Orchestration(retries=retries)
    settings = IngestSettings(decode=DecodeSettings(fps=fps or None, max_frames=max_frames or None,
                                                    size=size or None), shard_size=shard_size,
                              network=NetworkSettings(**(network or {})))
    embed_settings = EmbedSettings(batch_size=batch_size, index=IndexSettings() if index else None)
    manifest = importers.from_inputs(list(inputs), settings.network)
    shards, features = str(Path(root) / "shards"), str(Path(root) / "features")
    claim(root, PREPROCESS_KIND, inputs=[*inputs, *(v.path for v in manifest.videos)],
          option="--root")
    with flow_record(root, "preprocess", {"inputs": list(inputs), "root": root, "fps": fps,
                                          "max_frames": max_frames, "size": size,
                                          "model": model}) as record:
        record.summary = {
            "ingest": _ingest(manifest, shards, settings, False, o, record),
            "embed": _embed(shards, features, model, pretrained, None, embed_settings, None, o,
                            record)}
    return record.summary


def with_runner(flow_obj: Any, o: Orchestration) -> Any:
    """The flow with its mapped tasks on ``o``'s runner (local threads or Dask)."""
    return flow_obj.with_options(task_runner=task_runner(o))


@task(name="precompute-reference", cache_policy=NO_CACHE)
def _precompute_task(shards: str, out: str, model: str, device: str | None,
                     frames_per_pass: int) -> dict[str, Any]:
    from pipelines.reference import PrecomputeSettings, precompute_reference
    from pipelines.vlm import load_lmm

    scorer = load_lmm(model, device=device)
    return precompute_reference(shards, out, scorer, PrecomputeSettings(frames_per_pass))


@flow(name="refocus-precompute-reference", validate_parameters=False)
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


@task(name="margins-chunk", cache_policy=NO_CACHE, task_run_name="margins {index:06d}")
def margins_chunk_task(out: str, index: int, qids: list[str], store: str,
                       qa: tuple[str, ...] | None, spec: str, settings: Any,
                       options: Any) -> dict[str, Any]:
    """One chunk of questions scored and written (at once when it is already done)."""
    from pipelines.margins import margins_chunk

    with _MARGIN_LOCK:
        corpus, ref = _margin_reference(store, qa, spec, options)
        return margins_chunk(out, index, qids, corpus, ref, settings)


@flow(name="refocus-precompute-margins", validate_parameters=False)
def margins_flow(store: str, out: str, spec: str, settings: Any = None, options: Any = None,
                 qa: list[str] | None = None, retries: int = 1) -> dict[str, Any]:
    """The reference LMM's margins on frame subsets, the chunks mapped over tasks (finished
    chunks are skipped; a failed chunk is recorded and the others land)."""
    from pipelines.margins import (
        ReferenceOptions,
        claim_margins,
        finish_margins,
        margin_inputs,
        margins_job,
    )
    from refocus.settings import MarginSettings

    settings, options = settings or MarginSettings(), options or ReferenceOptions()
    inputs = margin_inputs(store, qa, spec, options)
    claim_margins(out, inputs)
    key = tuple(qa) if qa else None
    with flow_record(out, "precompute-margins", {"store": store, "spec": spec,
                                                 "settings": settings}) as record:
        corpus, ref = _margin_reference(store, key, spec, options)
        with margins_job(out, corpus, ref.id, settings, store, inputs) as job:
            chunk = margins_chunk_task.with_options(**retry_options(Orchestration(
                retries=retries)))
            futures = chunk.map(unmapped(str(job.owned.path)), job.todo,
                                [job.chunks[i] for i in job.todo], unmapped(store),
                                unmapped(key), unmapped(spec), unmapped(settings),
                                unmapped(options))
            markers, failed, record.tasks = _states(list(futures),
                                                    [chunk_name(i) for i in job.todo])
            record.summary = finish_margins(job, markers, failed)
    return record.summary


@task(name="train-reader", cache_policy=NO_CACHE)
def _train_reader_task(store: str, out: str, settings: Any) -> dict[str, Any]:
    from pipelines.learn import train_reader_stage

    return train_reader_stage(store, None, out, settings)


@task(name="train-policy", cache_policy=NO_CACHE)
def _train_policy_task(store: str, reward: str, out: str, settings: Any,
                       run: Any) -> dict[str, Any]:
    from pipelines.learn import train_policy_stage

    return train_policy_stage(store, None, reward, out, settings, run)


@flow(name="refocus-train", validate_parameters=False)
def train_flow(store: str, out: str, reward: str = "reader", grpo: Any = None,
               reader: Any = None, run: Any = None, retries: int = 1) -> dict[str, Any]:
    """From cached features: the reader reference (when ``reward`` is ``reader``, into
    OUT/reader) then the policy (OUT/policy). Both resume from their checkpoints."""
    from pipelines.learn import RunSettings
    from refocus.settings import GRPOSettings, ReaderTrainSettings

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


@flow(name="refocus-evaluate", validate_parameters=False)
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
    return rows


@task(name="select-and-write", cache_policy=NO_CACHE)
def _select_task(manifest: Manifest, policy_path: str, root: str, settings: Any,
                 failures: list[str], seconds: dict[str, float],
                 started: float) -> dict[str, Any]:
    from pipelines.score import find_policy, select_and_write

    return select_and_write(manifest, find_policy(policy_path), Path(root), settings, failures,
                            seconds, started)


@flow(name="refocus-score", validate_parameters=False)
def score_flow(inputs: list[str], policy: str, out: str, settings: Any = None,
               orchestration: Orchestration | None = None) -> dict[str, Any]:
    """A new corpus → shards and features under ``out`` (mapped over shards, skipping what is
    done) → the policy's selections (+ exported frames)."""
    from pipelines.score import (
        FEATURES,
        SHARDS,
        ScoreSettings,
        check_questions,
        claim_score,
        encoder_args,
        find_policy,
        ingest_settings,
        with_trained_k,
    )

    o = orchestration or Orchestration()
    settings = settings or ScoreSettings()
    started = time.perf_counter()
    manifest = importers.from_inputs(list(inputs), settings.network)
    check_questions(manifest)
    claim_score(manifest, policy, out, inputs)
    trained = find_policy(policy)
    settings = with_trained_k(settings, trained)  # --k, else the largest trained budget
    root = Path(out)
    with flow_record(out, "score", {"inputs": list(inputs), "policy": policy, "k": settings.k,
                                    "export": settings.export,
                                    "orchestration": o.as_dict()}) as record:
        tick = time.perf_counter()
        ingested = _ingest(manifest, str(root / SHARDS),
                           replace(ingest_settings(trained, o.workers), network=settings.network),
                           False, o, record)
        seconds = {"ingest": time.perf_counter() - tick}
        tick = time.perf_counter()
        model, pretrained = encoder_args(trained, settings)
        embedded = _embed(str(root / SHARDS), str(root / FEATURES), model, pretrained,
                          [str(root / SHARDS / MANIFEST_FILE)],
                          EmbedSettings(batch_size=settings.embed.batch_size, index=None),
                          settings.device, o, record)
        seconds["embed"] = time.perf_counter() - tick
        failures = [f"{f['where']}: {f['error']}" for f in ingested["failures"]]  # as str(Failure)
        failures += embedded["failures"]
        summary = _select_task(manifest, policy, out, settings, failures, seconds, started)
        record.summary = summary
    return summary
