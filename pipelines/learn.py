"""Learning stages as plain functions: train the reader, train the policy (GRPO, resumable),
evaluate selectors. Each reads the feature store and a QA manifest, runs the learning core
(``refocus/``) and writes its results (run folders through ``stores/runs.py``, model
folders through ``stores/checkpoints``, Markdown/CSV, PNG plots)."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipelines import plots, reporting
from pipelines.corpus import load_corpus, qa_paths
from pipelines.policies import load_policy, policy_reward
from refocus.data import Corpus
from refocus.device import pick_device
from refocus.evaluation import (
    ALL,
    IDEAL,
    IdealObserver,
    Judge,
    ModelJudge,
    Row,
    Statistics,
    ceiling_cap,
    evaluate,
    labels,
)
from refocus.policy import PolicyConfig
from refocus.reader import (
    AnyReader,
    ReaderConfig,
    accuracy,
    build_reader,
    default_config,
    train_reader,
)
from refocus.rewards import ReaderReference, Reference, RewardCache, RewardModel
from refocus.selectors import BASELINES, Learned, Selector, uniform_indices
from refocus.settings import (
    REFERENCE_BATCH,
    REFERENCE_CACHE_GB,
    GRPOSettings,
    ReaderTrainSettings,
    RunSettings,
)
from refocus.trainer import (
    DistEnv,
    GRPOTrainer,
    StepMetrics,
    process_group,
    rank_and_world,
)
from stores import checkpoints, runs
from stores.errors import UserError
from stores.features import FeatureStore
from stores.owned import Owned, claim
from stores.runs import RunFolder
from stores.shards import write_json_atomic


def check_splits(corpus: Corpus, store: str | os.PathLike[str],
                 qa: Sequence[str | os.PathLike[str]] | None, val_split: str | None = None,
                 ) -> None:
    """Refuse, in one line, questions unfit to learn from (see ``Corpus.split_problem``) and,
    with ``val_split``, a validation split without questions."""
    where = ", ".join(map(str, qa_paths(store, qa)))
    problem = corpus.split_problem()
    if problem:
        raise UserError(f"{where}: {problem}")
    if val_split is not None and not corpus.rows(val_split):
        raise UserError(f"{where}: no questions in the {val_split!r} split to choose the best "
                        "checkpoint on; add val questions, or pass --val-split train to choose "
                        "it on training questions")


def reward_inputs(spec: str) -> list[str]:
    """The local path a reward spec reads (a reader folder, a local LMM folder)."""
    target = spec.partition(":")[2]
    return [target] if target else []


# ----------------------------------------------------------------------------- the reader

def reader_report(reader: AnyReader, corpus: Corpus, split: str, ks: Sequence[int] = (4, 8, 16),
                  seed: int = 0) -> dict[str, float]:
    """Accuracy with all frames, with the evidence only (one frame per span), with k
    random and k uniformly spaced frames."""
    rows = corpus.rows(split)
    rng = np.random.default_rng(seed)
    n = lambda q: int(corpus.n_frames[corpus.video[q]])  # noqa: E731
    report = {
        "questions": len(rows),
        "all_frames": accuracy(reader, corpus, rows, lambda q: list(range(n(q)))),
        "evidence": accuracy(reader, corpus, [q for q in rows if corpus.evidence[q]],
                             lambda q: [s[len(s) // 2] for s in corpus.evidence_frames(q) if s]),
    }
    for k in ks:
        report[f"random_{k}"] = accuracy(
            reader, corpus, rows, lambda q, k=k: rng.choice(n(q), min(k, n(q)),
                                                            replace=False).tolist())
        report[f"uniform_{k}"] = accuracy(reader, corpus, rows,
                                          lambda q, k=k: uniform_indices(n(q), k))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()}


def reader_identity(store: str | os.PathLike[str], qa: Sequence[str] | None,
                    settings: ReaderTrainSettings, architecture: str) -> dict[str, Any]:
    """What a reader folder records of how its reader was trained (a re-run with the same
    keeps it)."""
    return {"settings": asdict(settings), "store": str(Path(store).resolve()),
            "qa": [str(Path(q).resolve()) for q in qa] if qa else None,
            "architecture": architecture}


def kept_report(owned: Owned, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The report of the reader already in ``owned`` when it was trained as ``identity``
    says (a reader saved before the architecture was recorded counts as ``hand``)."""
    if not ((owned.path / checkpoints.CONFIG).is_file() and
            (owned.path / checkpoints.WEIGHTS).is_file()):
        return None
    meta = json.loads((owned.path / checkpoints.CONFIG).read_text())
    meta.setdefault("architecture", "hand")
    if meta.get("kind") == "reader" and all(meta.get(k) == v for k, v in identity.items()):
        return meta["report"]
    return None


def save_reader(owned: Owned, reader: AnyReader, store: str | os.PathLike[str],
                identity: dict[str, Any], report: dict[str, Any]) -> None:
    checkpoints.save_model(owned.path, "reader", reader.config.as_dict(), reader.state_dict(),
                           **identity, report=report,
                           encoder_sha256=FeatureStore(store).encoder.get("weights_sha256"))


def train_reader_stage(store: str | os.PathLike[str], qa: Sequence[str] | None,
                       out: str | os.PathLike[str], settings: ReaderTrainSettings,
                       device: str | None = None,
                       log: Callable[[dict], None] | None = None,
                       architecture: str = "hand",
                       report_to: str = reporting.NO_REPORT) -> dict[str, Any]:
    """Train a reader into ``out`` (a reader folder refocus owns) and return its report; a
    reader already there, trained with the same settings on the same store and questions, is
    kept and its report returned. ``report_to`` also streams the log rows (pipelines/
    reporting.py)."""
    reporting.require(report_to)
    owned = claim(out, "reader", inputs=[store, *(qa or ())])
    identity = reader_identity(store, qa, settings, architecture)
    with owned.lock(), reporting.reporter(report_to, owned, identity) as reporter:
        log = reporting.teed(log, reporter)
        kept = kept_report(owned, identity)
        if kept is not None:
            return kept
        corpus = load_corpus(store, qa, pick_device(device))
        check_splits(corpus, store, qa)
        started = time.perf_counter()
        reader = train_reader(corpus, settings, default_config(corpus, architecture), log=log)
        seconds = time.perf_counter() - started
        split = "val" if corpus.rows("val") else "train"
        report = {"split": split, **reader_report(reader, corpus, split),
                  "train_seconds": round(seconds, 1)}
        save_reader(owned, reader, store, identity, report)
    return report


def load_reader(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                ) -> AnyReader:
    """A reader folder's reader, of the architecture its config names."""
    config, weights, _ = checkpoints.load_model(path, "reader")
    reader = build_reader(ReaderConfig(**config))
    reader.load_state_dict(weights)
    return reader.to(device).eval()


def reader_reference_id(path: str | os.PathLike[str]) -> str:
    """``reader:<weights digest>``, and for a distilled reader what it was distilled from
    (so runs and policies trained against it say so)."""
    from pipelines.encoder import file_sha256

    digest = file_sha256(Path(path) / checkpoints.WEIGHTS)[:16]
    _, _, meta = checkpoints.load_model(path, "reader")
    source = meta.get("distilled_from")
    return f"reader:{digest}" + (f" distilled from {source}" if source else "")


def reference(spec: str, corpus: Corpus, shards: str | None = None,
              reference_features: str | None = None, batch_size: int = 8,
              cache_gb: float = REFERENCE_CACHE_GB, present: str | None = None) -> Reference:
    """``reader:PATH`` (a trained reader folder) or ``lmm:MODEL`` (a Hugging Face video-LLM
    by hub id or path, shown its frames as ``present`` — video or images, default per family;
    frames from ``reference_features`` when given, else from ``shards``; at most ``cache_gb``
    of their features kept on its device)."""
    kind, _, target = spec.partition(":")
    if kind == "reader" and target:
        return ReaderReference(load_reader(target, corpus.device), reader_reference_id(target))
    if kind == "lmm" and target:
        from pipelines.vlm import load_lmm
        from refocus.lmm_reference import LMMReference, ShardFrames, StoreFrames
        from stores.reference import ReferenceStore

        scorer = load_lmm(target, batch_size=batch_size, present=present)
        if reference_features:
            return LMMReference(scorer, StoreFrames(ReferenceStore(reference_features), scorer,
                                                    cache_gb))
        if not shards:
            raise UserError(f"--reward {spec}: no frames to show it (no --reference-features and "
                            "the feature store names no shards folder)")
        return LMMReference(scorer, ShardFrames(shards, scorer, cache_gb))
    raise UserError(f"--reward {spec!r}: expected reader:PATH (a folder from refocus "
                    "train-reader) or lmm:MODEL (a Hugging Face video-LLM id or folder)")


def store_shards(store: str | os.PathLike[str]) -> str | None:
    """The ingest folder a feature store was embedded from."""
    from stores.features import FeatureStore

    return FeatureStore(store).ingest.get("shards")


# ----------------------------------------------------------------------------- the policy

TRAIN_VALIDATION_CAP = 256  # questions, when the best checkpoint is chosen on training ones


def store_record(store: str | os.PathLike[str]) -> dict[str, Any]:
    """What scoring with a policy needs from the store it was trained on, kept in the policy's
    own folder: the encoder's identity and the candidate-frame (ingest) settings."""
    features = FeatureStore(store)
    return {"encoder": features.encoder, "candidates": features.ingest.get("settings")}


def rank_device(env: DistEnv, device: str | None = None) -> torch.device:
    """The device of this process: ``pick_device``'s, except that each ``torchrun`` process on
    a GPU machine takes its own GPU, cuda:LOCAL_RANK."""
    chosen = pick_device(device)
    if env.distributed and chosen.type == "cuda" and chosen.index is None:
        return torch.device("cuda", env.local_rank)
    return chosen


def train_policy_stage(store: str | os.PathLike[str], qa: Sequence[str] | None,
                       reward_spec: str, out: str | os.PathLike[str], settings: GRPOSettings,
                       run: RunSettings = RunSettings(),
                       on_start: Callable[[int, int], None] | None = None,
                       on_step: Callable[[StepMetrics], None] | None = None,
                       stop_after: int | None = None) -> dict[str, Any]:
    """Train (or resume) a run in ``out``; ``stop_after`` ends early after that many steps
    of this call (for tests and time-boxed runs).

    ``out`` is a run folder (``stores.runs.RunFolder``: made here, or one refocus made
    before: a folder of the user's is refused), held locked for the whole run (a second run
    on it is refused). A finished run ends with ``complete.json``, written after every other
    output; re-running a finished run re-creates from its checkpoint any final output that
    is missing.

    Under ``torchrun`` (WORLD_SIZE > 1) every process calls this with the same arguments: it
    joins the process group (NCCL on CUDA, each rank on cuda:LOCAL_RANK; else gloo) and the
    trainer splits each step's questions over the ranks and averages their gradients. Every
    rank reads the run folder (to resume); only rank 0 claims, locks and writes to it —
    run.json, metrics, checkpoints, the policies, training.png, summary.json — and
    validates; the others return a summary without validation."""
    reporting.require(run.report_to)
    if run.surrogate is None and settings.lmm_every != 1:
        raise UserError(f"--lmm-every {settings.lmm_every} needs --surrogate SPEC: the model "
                        "that scores the other steps (e.g. --surrogate reader:runs/reader)")
    env = DistEnv.from_environ()
    device = rank_device(env, run.device)
    inputs = [store, *(qa or ()), run.reference_features, *reward_inputs(reward_spec),
              *reward_inputs(run.surrogate or "")]
    config = {"store": str(Path(store).resolve()), "qa": qa, "reward": reward_spec,
              "settings": settings.as_dict(), "run": asdict(run)}
    with process_group(env, device), _run_folder(Path(out), inputs) as folder, \
            reporting.reporter(run.report_to, folder.owned, config) as reporter:
        return _train_policy(store, qa, reward_spec, folder, settings, run, device,
                             on_start, on_step, stop_after, reporter)


@contextmanager
def _run_folder(out: Path, inputs: Sequence[Any]) -> Iterator[RunFolder]:
    """Rank 0 claims and locks the run folder for the block (the other ranks open it to
    read); a refusal on rank 0 is raised on every rank, so that none waits for the others
    forever."""
    rank, world = rank_and_world()
    with ExitStack() as stack:
        folder, problem = RunFolder.open(out), None
        if rank == 0:
            try:
                folder = RunFolder.claim(out, inputs)
                stack.enter_context(folder.lock())
            except UserError as e:
                problem = str(e)
        if world > 1:
            box = [problem]
            dist.broadcast_object_list(box, src=0)
            problem = box[0]
        if problem:
            raise UserError(problem)
        yield folder


def run_identity(store: str | os.PathLike[str], qa: Sequence[str] | None,
                 trained_against: dict[str, Any], settings: GRPOSettings,
                 run: RunSettings) -> dict[str, Any]:
    """What a run folder's run.json records: a resume must match it."""
    return {"store": str(Path(store).resolve()),
            "qa": [str(Path(p).resolve()) for p in qa] if qa else None,
            **trained_against, "settings": settings.as_dict(),
            "run": {k: v for k, v in asdict(run).items() if k not in (
                "device", "reference_batch", "reference_cache_gb", "surrogate",
                "report_to")}}


def _train_policy(store: str | os.PathLike[str], qa: Sequence[str] | None, reward_spec: str,
                  folder: RunFolder, settings: GRPOSettings, run: RunSettings,
                  device: torch.device, on_start: Callable[[int, int], None] | None,
                  on_step: Callable[[StepMetrics], None] | None,
                  stop_after: int | None, reporter: reporting.Reporter) -> dict[str, Any]:
    rank, world = rank_and_world()
    main = folder.owned is not None  # the one writer (rank 0)
    corpus = load_corpus(store, qa, device)
    check_splits(corpus, store, qa, run.val_split)
    ref = reference(reward_spec, corpus, store_shards(store), run.reference_features,
                    run.reference_batch, run.reference_cache_gb, run.present)
    surrogate = _surrogate(run.surrogate, corpus, store)
    trained_against = {"reward": ref.id, **({"surrogate": surrogate.id,
                                             "lmm_every": settings.lmm_every}
                                            if surrogate else {})}
    identity = run_identity(store, qa, trained_against, settings, run)
    saved = folder.checkpoint()
    before = folder.identity()
    if before is not None and saved is not None and not same_run(before, identity):
        raise UserError(f"{folder.path}: holds a run with other settings, store or reward "
                        "(run.json); resume with the same options or choose another --out")
    if main:
        folder.write_identity(identity)
    cache = RewardCache(ref.id)  # per rank; rank 0's is saved (filled from the checkpoint)
    reward_model = RewardModel(ref, cache)
    policy_config = PolicyConfig(dim=corpus.frame_embedding.shape[1], hidden=run.hidden,
                                 layers=run.layers)
    trainer = GRPOTrainer(corpus, reward_model, settings, policy_config, surrogate,
                          state=saved)
    metrics = folder.metrics() if main else None
    standing_on = saved.copy if saved is not None else checkpoints.CHECKPOINT
    if main and saved is not None:
        metrics.truncate_after(trainer.step_count)
    elif main:
        folder.clear_metrics()
    val_rows = corpus.rows(run.val_split)
    if run.val_split == "train":
        val_rows = val_rows[:TRAIN_VALIDATION_CAP]
    budgets = tuple(sorted(set(settings.budgets)))
    if on_start is not None:
        on_start(settings.steps, trainer.step_count)
    started = time.perf_counter()
    steps_this_call = 0
    timings = dict.fromkeys(("sample", "reward", "update", "validate", "checkpoint"), 0.0)

    def checkpoint() -> None:
        nonlocal standing_on
        state = trainer.state()  # on every rank: it gathers their generators
        if main:
            folder.save_checkpoint(state, standing_on)
            standing_on = checkpoints.CHECKPOINT

    while trainer.step_count < settings.steps:
        m = trainer.step()
        steps_this_call += 1
        for stage in ("sample", "reward", "update"):
            timings[stage] += getattr(m, f"{stage}_seconds")
        tick = time.perf_counter()
        rows = [{"kind": "train", **{k: v for k, v in asdict(m).items() if k != "extra"}}]
        last = trainer.step_count == settings.steps
        if main and (trainer.step_count % run.eval_every == 0 or last):
            judged = reward_model.judge_counts.copy()
            validation = trainer.validate(val_rows, budgets)  # no collective: rank 0 alone
            judged = reward_model.judge_counts.minus(judged)
            rows.append({"kind": "val", "step": trainer.step_count, **validation,
                         "reward_subsets": judged.subsets, "reward_forwards": judged.forwards,
                         "reward_seconds": judged.seconds})
            trainer.keep_if_best(validation)
        if main:
            for row in rows:
                metrics.append(row)
                reporter.add(row)
        timings["validate"] += time.perf_counter() - tick
        if on_step is not None:
            on_step(m)
        tick = time.perf_counter()
        stopping = stop_after is not None and steps_this_call >= stop_after
        if trainer.step_count % run.checkpoint_every == 0 or last or stopping:
            checkpoint()
        timings["checkpoint"] += time.perf_counter() - tick
        if stopping:
            break
    finished = trainer.step_count >= settings.steps
    best = trainer.best
    summary = {
        "steps": trainer.step_count, "finished": finished,
        "seconds_this_call": round(time.perf_counter() - started, 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "best": best, "filter": trainer.filter_stats, "reward": ref.id,
        "cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses},
        "checkpoint_skipped": saved.skipped if saved else [],
        **({"surrogate": surrogate.id, "lmm_every": settings.lmm_every} if surrogate else {}),
        "reward_calls": reward_calls(list(metrics.rows())) if metrics else {},
    }
    if main and finished and (steps_this_call or folder.missing_outputs()):
        folder.uncomplete()  # until every final output below is in place again
        record = {"settings": settings.as_dict(), **trained_against, **store_record(store)}
        folder.write_policy(policy_config.as_dict(), trainer.best_weights,
                            chosen="best validation", best=best, **record)
        folder.write_policy(policy_config.as_dict(), trainer.policy.state_dict(), last=True,
                            chosen="last step", **record)
        plots.training_curves(list(metrics.rows()), folder.path / runs.CURVES,
                              best=best["step"] or None)
    if main:
        folder.write_summary(summary)
    if main and finished and not folder.is_complete():
        folder.write_complete(trainer.step_count, best)
    if world > 1:  # no rank leaves (and re-reads the run) before rank 0 has written it
        dist.barrier()
    return summary


def same_run(before: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Whether a run folder's ``run.json`` (``before``) names this run; a GRPO setting added
    to refocus since that run was written counts as its default there."""
    return runs.same_run(before, identity, GRPOSettings().as_dict())


def _surrogate(spec: str | None, corpus: Corpus, store: str | os.PathLike[str],
               ) -> RewardModel | None:
    """The surrogate's reward model (no cache: it is cheap, and its margins are not the
    truth the reward model's cache keeps)."""
    if spec is None:
        return None
    try:
        return RewardModel(reference(spec, corpus, store_shards(store)))
    except UserError as e:
        raise UserError(str(e).replace("--reward", "--surrogate", 1)) from None


TRAIN_COUNTS = ("reward_subsets", "reward_forwards", "surrogate_subsets", "cache_hits",
                "reward_seconds")


def reward_calls(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the reward model (and the surrogate) were asked over the whole run, summed from
    the run's metrics rows (one per step, one per validation; so a resumed run counts what
    an uninterrupted one would): on training steps, in validation, and in all."""
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r for r in rows if r.get("kind") == "val"]
    total = lambda part, key: sum(r.get(key, 0) for r in part)  # noqa: E731
    out: dict[str, Any] = {
        "train": {key: round(total(train, key), 3) if key.endswith("seconds")
                  else total(train, key) for key in TRAIN_COUNTS},
        "validation": {key: round(total(val, key), 3) if key.endswith("seconds")
                       else total(val, key)
                       for key in ("reward_subsets", "reward_forwards", "reward_seconds")},
    }
    out["train"]["steps_on_reward"] = sum(r.get("reward_from", "reward") == "reward"
                                          for r in train)
    out["train"]["steps_on_surrogate"] = len(train) - out["train"]["steps_on_reward"]
    for key in ("reward_subsets", "reward_forwards"):
        out[key] = out["train"][key] + out["validation"][key]
    return out


# ----------------------------------------------------------------------------- evaluation

JUDGE_FORMS = ("ideal (the ideal observer: no model), reader:PATH (a refocus train-reader "
               "folder) or lmm:MODEL (a Hugging Face video-LLM id or folder)")
IDEAL_RULE = ("right exactly when the chosen frames hit every evidence span, else a uniform "
              "guess among the options (expected accuracy)")


def judge_specs(reward_spec: str | None, judges: Sequence[str] = ()) -> list[str]:
    """The judges of an evaluation, in order and once each: the ``--reward`` reference (the
    one judge of earlier versions), then every ``--judge``; each checked for its form."""
    named = [("--reward", reward_spec)] if reward_spec else []
    named += [("--judge", spec) for spec in judges]
    if not named:
        raise UserError(f"eval: no judge; pass --judge SPEC (one or more of {JUDGE_FORMS})")
    for option, spec in named:
        kind, _, target = spec.partition(":")
        if spec != IDEAL and not (kind in ("reader", "lmm") and target):
            raise UserError(f"{option} {spec!r}: expected {JUDGE_FORMS}")
    return list(dict.fromkeys(spec for _, spec in named))


def evaluate_stage(store: str | os.PathLike[str], qa: Sequence[str] | None, split: str,
                   ks: Sequence[int], reward_spec: str | None, policies: Sequence[str] = (),
                   methods: Sequence[str] = tuple(BASELINES), out: str | os.PathLike[str] | None
                   = None, device: str | None = None,
                   reference_features: str | None = None,
                   reference_cache_gb: float = REFERENCE_CACHE_GB,
                   present: str | None = None, judges: Sequence[str] = (),
                   reference_batch: int = REFERENCE_BATCH, statistics: Statistics = Statistics(),
                   ) -> list[Row]:
    """Every selector at every budget on ``split``, scored by every judge (``reward_spec``,
    kept for earlier callers, is the first; ``judges``: more specs, ``ideal`` among them);
    with ``out`` (an evaluation folder refocus owns, locked while written), eval.csv,
    eval.md, eval.json and eval.png there. Rows: one per method, k, kind and judge
    (``refocus.evaluation.accuracy_by_judge`` reads them as data), each with its bootstrap
    interval, seeds and all-frames ceiling as ``statistics`` says."""
    specs = judge_specs(reward_spec, judges)
    if out is None:
        return _evaluate(store, qa, split, ks, specs, policies, methods, device,
                         reference_features, reference_cache_gb, present, reference_batch,
                         statistics)[0]
    owned = claim(out, "eval", inputs=[store, *(qa or ()), *policies, reference_features,
                                      *(p for spec in specs for p in reward_inputs(spec))])
    with owned.lock():
        table, about = _evaluate(store, qa, split, ks, specs, policies, methods, device,
                                 reference_features, reference_cache_gb, present,
                                 reference_batch, statistics)
        write_evaluation(table, owned.path, split, about)
    return table


def _evaluate(store: str | os.PathLike[str], qa: Sequence[str] | None, split: str,
              ks: Sequence[int], specs: Sequence[str], policies: Sequence[str],
              methods: Sequence[str], device: str | None,
              reference_features: str | None, reference_cache_gb: float,
              present: str | None = None, reference_batch: int = REFERENCE_BATCH,
              statistics: Statistics = Statistics(),
              ) -> tuple[list[Row], dict[str, Any]]:
    """The table and what it was made with (judges and policies, by label and full id)."""
    corpus = load_corpus(store, qa, pick_device(device))
    rows = corpus.rows(split)
    if not rows:
        raise UserError(f"no questions in split {split!r} (splits: "
                        f"{', '.join(sorted(set(corpus.split)))})")
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; "
                        f"choose from {', '.join(BASELINES)}")
    if IDEAL in specs and not any(IdealObserver.can_judge(corpus, q) for q in rows):
        raise UserError(f"--judge ideal: none of the {len(rows)} {split!r} questions has an "
                        "evidence span holding a candidate frame, which the ideal observer "
                        "needs; judge with reader:PATH or lmm:MODEL")
    selectors: list[Selector] = [BASELINES[m]() for m in methods]
    rewards: dict[str, str] = {}
    learned = []
    for path, name in zip(policies, _policy_names(policies), strict=True):
        selectors.append(Learned(load_policy(path, corpus.device), name=name))
        reward = policy_reward(path)
        if reward:
            rewards[name] = reward
        learned.append({"method": name, "path": str(Path(path).resolve()), "reward": reward})
    judges: list[Judge] = [
        IdealObserver() if spec == IDEAL else ModelJudge(reference(
            spec, corpus, store_shards(store), reference_features, reference_batch,
            cache_gb=reference_cache_gb, present=present))
        for spec in specs]
    table = evaluate(corpus, rows, selectors, tuple(ks), judges, rewards=rewards,
                     statistics=statistics)
    names = labels([*(j.id for j in judges), *rewards.values()])
    about = {
        "judges": [{"label": names[j.id], "id": j.id, "spec": spec,
                    "rule": IDEAL_RULE if spec == IDEAL else "the option with the highest "
                    "logit of the model shown the chosen frames",
                    "ceiling": ceiling_note(j.id, statistics.ceiling_frames)}
                   for spec, j in zip(specs, judges, strict=True)],
        "statistics": statistics.as_dict(),
        "policies": [{**p, "rewards_by": names.get(p["reward"] or "")} for p in learned],
    }
    return table, about


def ceiling_note(judge_id: str, lmm_frames: int) -> str:
    """How a judge's all-frames ceiling was measured, in words."""
    cap = ceiling_cap(judge_id, lmm_frames)
    if judge_id.startswith("lmm:") and not cap:
        return "not measured (--ceiling-frames 0)"
    return (f"every candidate frame, at most {cap} (spread uniformly)" if cap
            else "every candidate frame")


def _policy_names(paths: Sequence[str]) -> list[str]:
    """'refocus' for one policy; otherwise the shortest distinct path endings."""
    if len(paths) <= 1:
        return ["refocus"][:len(paths)]
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return [f"refocus:{n}" for n in names]
    return [f"refocus:{i}" for i in range(len(paths))]


def write_evaluation(table: list[Row], out: Path, split: str,
                     about: dict[str, Any] | None = None) -> None:
    """eval.csv (one row per method, k, kind and judge), eval.md (per kind: a column per
    judge), eval.json (the rows with the judges' and policies' full identities), eval.png."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for row in table:
            writer.writerow(row.as_dict())
    (out / "eval.md").write_text(markdown_table(table, split, about))
    write_json_atomic(out / "eval.json", {"split": split, **(about or {}),
                                          "rows": [r.as_dict() for r in table]})
    plots.evaluation_chart(table, out / "eval.png")


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def accuracy_cell(row: Row | None) -> str:
    """``54.2 [51.6, 56.8]`` (accuracy % and its bootstrap interval), then ``sd 1.1`` (the
    standard deviation across seeds, when several) and `` *`` when self-judged."""
    if row is None:
        return "–"
    cell = _percent(row.accuracy)
    if row.ci_low is not None and row.ci_high is not None:
        cell += f" [{_percent(row.ci_low)}, {_percent(row.ci_high)}]"
    if row.seed_std is not None:
        cell += f" sd {_percent(row.seed_std)}"
    return cell + (" *" if row.self_judged else "")


def ceiling_cell(row: Row | None) -> str:
    """``71.2 (512 frames)``: the judge's all-frames accuracy % and the frames it was shown on
    average."""
    if row is None or row.ceiling is None:
        return "–"
    frames = "" if row.ceiling_frames is None else \
        f" ({row.ceiling_frames:.1f}".removesuffix(".0") + " frames)"
    return _percent(row.ceiling) + frames


def _statistics_notes(table: list[Row], about: dict[str, Any] | None) -> list[str]:
    """What the intervals, the seeds and the ceiling row mean."""
    stats = (about or {}).get("statistics", {})
    lines = []
    if any(r.ci_low is not None for r in table):
        level = round(100 * stats.get("level", 0.95))
        lines.append(f"[a, b]: the {level} % percentile bootstrap interval over the questions "
                     f"({stats.get('resamples', 'several')} resamples, fixed seed).")
    seeded = list(dict.fromkeys(r.method for r in table if r.seeds > 1))
    if seeded:
        seeds = stats.get("seeds")
        which = f"seeds {', '.join(map(str, seeds))}" if seeds else "several seeds"
        lines.append(f"{', '.join(seeded)}: the mean over {which}; sd: the standard deviation "
                     "of its accuracy across them (the interval resamples the questions' "
                     "seed-averaged scores).")
    if any(r.ceiling is not None for r in table):
        lines.append("all frames (ceiling): the judge's accuracy on the same questions when "
                     "shown every candidate frame (an LMM judge: at most "
                     f"{stats.get('ceiling_frames', 'a few')}, spread uniformly, fewer when "
                     "its context holds fewer), with the frames it was shown on average.")
    return lines + [""] if lines else []


def markdown_table(table: list[Row], split: str, about: dict[str, Any] | None = None) -> str:
    """Per question kind (all first): a row per budget and method with its rewards' model,
    a column of accuracy per judge (with its bootstrap interval and spread across seeds; a
    self-judged cell marked *) and the evidence recall; a chance row and the all-frames
    ceiling per judge; with ``about``, the judges' and policies' full identities."""
    ks = sorted({r.k for r in table})
    methods = list(dict.fromkeys(r.method for r in table))
    judges = list(dict.fromkeys(r.judge for r in table))
    categories = list(dict.fromkeys(r.category for r in table))
    index = {(r.method, r.k, r.category, r.judge): r for r in table}
    lines = []
    for category in categories:
        mine = [r for r in table if r.category == category]
        n = mine[0].questions
        lines += [f"### {category} ({split}, {n} questions): accuracy % [95 % interval] by "
                  "judge (evidence recall %)", "",
                  "| method | rewards by | k | "
                  + " | ".join(f"acc[judge={j}]" for j in judges) + " | evidence recall |",
                  "|---|---|---:|" + "---:|" * (len(judges) + 1)]
        for k in ks:
            for method in methods:
                cells = [index.get((method, k, category, j)) for j in judges]
                present = [c for c in cells if c is not None]
                if not present:
                    continue
                accuracy = [accuracy_cell(c) for c in cells]
                lines.append(f"| {method} | {present[0].rewards_by or '–'} | {k} | "
                             + " | ".join(accuracy)
                             + f" | {_percent(present[0].evidence_recall)} |")
        chance = {r.judge: r.chance for r in mine}
        lines.append("| chance | – | | " + " | ".join(_percent(chance.get(j)) for j in judges)
                     + " | |")
        ceiling = {r.judge: r for r in mine if r.ceiling is not None}
        if ceiling:
            lines.append("| all frames (ceiling) | – | | "
                         + " | ".join(ceiling_cell(ceiling.get(j)) for j in judges) + " | |")
        lines.append("")
        if any(r.self_judged for r in mine):
            lines += ["\\* self-judged: this judge is the model that gave the policy its "
                      "rewards.", ""]
        judged = {r.judge: r.judged for r in mine}
        for j in judges:
            if judged.get(j, n) < n:
                lines += [f"{j} scores {judged[j]} of the {n} questions (those with an "
                          "evidence span holding a candidate frame).", ""]
    unseen = next((r.spans_without_frames for r in table if r.category == ALL), 0)
    if unseen:
        lines.append(f"Note: {unseen} evidence span(s) of these questions hold no candidate "
                     "frame (no selector can hit them); they are left out of evidence recall.")
        lines.append("")
    lines += _statistics_notes(table, about)
    if about and about.get("judges"):
        lines += ["Judges:"] + [f"- {j['label']} = `{j['id']}` ({j['rule']}; ceiling: "
                                f"{j.get('ceiling', 'not measured')})"
                                for j in about.get("judges", [])]
        lines += [f"- rewards of {p['method']}: `{p['reward'] or 'not recorded'}`"
                  for p in about.get("policies", [])]
        lines.append("")
    return "\n".join(lines)
