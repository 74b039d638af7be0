"""Learning stages as plain functions: train the reader, train the policy (GRPO, resumable),
evaluate selectors. Each reads the feature store and a QA manifest, runs the learning core
(``refocus/``) and writes its results (``stores/checkpoints``, Markdown/CSV, PNG plots)."""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipelines import plots
from refocus.data import Corpus
from refocus.evaluation import Row, evaluate
from refocus.policy import FrameSelector, PolicyConfig
from refocus.reader import Reader, ReaderConfig, accuracy, train_reader
from refocus.rewards import ReaderReference, Reference, RewardCache, RewardModel
from refocus.selectors import BASELINES, Learned, Selector, uniform_indices
from refocus.settings import GRPOSettings, ReaderTrainSettings
from refocus.trainer import (
    DistEnv,
    GRPOTrainer,
    StepMetrics,
    process_group,
    rank_and_world,
)
from stores import checkpoints
from stores.errors import UserError
from stores.features import FeatureStore
from stores.manifest import merge, read_manifest
from stores.shards import MANIFEST_FILE, write_json_atomic


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_corpus(store: str | os.PathLike[str], qa: Sequence[str | os.PathLike[str]] | None,
                device: str | torch.device = "cpu") -> Corpus:
    """The store's features joined with the manifest's questions (by default the manifest
    that was ingested)."""
    features_store = FeatureStore(store)
    paths = [Path(p) for p in qa] if qa else [
        Path(features_store.ingest.get("shards", "")) / MANIFEST_FILE]
    manifests = [read_manifest(p) for p in paths]
    manifest = merge(manifests)
    corpus = Corpus(features_store.load(), manifest.questions, device)
    if not len(corpus):
        raise UserError(f"{store}: none of the {len(manifest.questions)} questions of "
                        f"{', '.join(map(str, paths))} is in the feature store; embed them "
                        "(refocus embed --questions ...)")
    return corpus


# ----------------------------------------------------------------------------- the reader

def reader_report(reader: Reader, corpus: Corpus, split: str, ks: Sequence[int] = (4, 8, 16),
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


def train_reader_stage(store: str | os.PathLike[str], qa: Sequence[str] | None,
                       out: str | os.PathLike[str], settings: ReaderTrainSettings,
                       device: str | None = None,
                       log: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Train a reader into ``out`` and return its report; a reader already there, trained with
    the same settings on the same store and questions, is kept and its report returned."""
    identity = {"settings": asdict(settings), "store": str(Path(store).resolve()),
                "qa": [str(Path(q).resolve()) for q in qa] if qa else None}
    if (Path(out) / checkpoints.CONFIG).is_file() and (Path(out) / checkpoints.WEIGHTS).is_file():
        meta = json.loads((Path(out) / checkpoints.CONFIG).read_text())
        if meta.get("kind") == "reader" and all(meta.get(k) == v for k, v in identity.items()):
            return meta["report"]
    corpus = load_corpus(store, qa, pick_device(device))
    started = time.perf_counter()
    reader = train_reader(corpus, settings, log=log)
    seconds = time.perf_counter() - started
    split = "val" if corpus.rows("val") else "train"
    report = {"split": split, **reader_report(reader, corpus, split),
              "train_seconds": round(seconds, 1)}
    checkpoints.save_model(out, "reader", reader.config.as_dict(), reader.state_dict(),
                           **identity, report=report,
                           encoder_sha256=FeatureStore(store).encoder.get("weights_sha256"))
    return report


def load_reader(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> Reader:
    config, weights, _ = checkpoints.load_model(path, "reader")
    reader = Reader(ReaderConfig(**config))
    reader.load_state_dict(weights)
    return reader.to(device).eval()


def reference(spec: str, corpus: Corpus, shards: str | None = None,
              reference_features: str | None = None, batch_size: int = 8) -> Reference:
    """``reader:PATH`` (a trained reader folder) or ``lmm:MODEL`` (a Hugging Face video-LLM
    by hub id or path; frames from ``reference_features`` when given, else from ``shards``)."""
    kind, _, target = spec.partition(":")
    if kind == "reader" and target:
        from pipelines.encoder import file_sha256

        reader = load_reader(target, corpus.device)
        digest = file_sha256(Path(target) / checkpoints.WEIGHTS)[:16]
        return ReaderReference(reader, f"reader:{digest}")
    if kind == "lmm" and target:
        from refocus.lmm import LMMScorer
        from refocus.lmm_reference import LMMReference, ShardFrames, StoreFrames
        from stores.reference import ReferenceStore

        scorer = LMMScorer.load(target, batch_size=batch_size)
        if reference_features:
            return LMMReference(scorer, StoreFrames(ReferenceStore(reference_features), scorer))
        if not shards:
            raise UserError(f"--reward {spec}: no frames to show it (no --reference-features and "
                            "the feature store names no shards folder)")
        return LMMReference(scorer, ShardFrames(shards, scorer))
    raise UserError(f"--reward {spec!r}: expected reader:PATH (a folder from refocus "
                    "train-reader) or lmm:MODEL (a Hugging Face video-LLM id or folder)")


def store_shards(store: str | os.PathLike[str]) -> str | None:
    """The ingest folder a feature store was embedded from."""
    from stores.features import FeatureStore

    return FeatureStore(store).ingest.get("shards")


# ----------------------------------------------------------------------------- the policy

@dataclass(frozen=True)
class RunSettings:
    """What a training run does besides the GRPO settings themselves."""

    eval_every: int = 50
    checkpoint_every: int = 100
    hidden: int = 64
    layers: int = 2
    device: str | None = None
    reference_features: str | None = None  # a precompute-reference folder (lmm rewards)
    reference_batch: int = 8  # (question, subset) pairs per LMM forward


def load_policy(path: str | os.PathLike[str], device: str | torch.device = "cpu",
                ) -> FrameSelector:
    """A policy from a model folder, or the best policy of a training run folder."""
    folder = Path(path)
    if (folder / "policy" / checkpoints.CONFIG).exists():
        folder = folder / "policy"
    config, weights, _ = checkpoints.load_model(folder, "policy")
    policy = FrameSelector(PolicyConfig(**config))
    policy.load_state_dict(weights)
    return policy.to(device).eval()


def _score(validation: dict[str, float]) -> float:
    values = [v for k, v in validation.items() if k.startswith("accuracy@")]
    return float(np.mean(values)) if values else 0.0


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

    Under ``torchrun`` (WORLD_SIZE > 1) every process calls this with the same arguments: it
    joins the process group (NCCL on CUDA, each rank on cuda:LOCAL_RANK; else gloo) and the
    trainer splits each step's questions over the ranks and averages their gradients. Every
    rank reads the run folder (to resume); only rank 0 writes to it — run.json, metrics,
    checkpoints, policy folders, training.png, summary.json — and validates; the others return
    a summary without validation."""
    env = DistEnv.from_environ()
    device = rank_device(env, run.device)
    with process_group(env, device):
        return _train_policy(store, qa, reward_spec, Path(out), settings, run, device, on_start,
                             on_step, stop_after)


def _train_policy(store: str | os.PathLike[str], qa: Sequence[str] | None, reward_spec: str,
                  out_dir: Path, settings: GRPOSettings, run: RunSettings, device: torch.device,
                  on_start: Callable[[int, int], None] | None,
                  on_step: Callable[[StepMetrics], None] | None,
                  stop_after: int | None) -> dict[str, Any]:
    rank, world = rank_and_world()
    main = rank == 0  # the one writer
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus(store, qa, device)
    ref = reference(reward_spec, corpus, store_shards(store), run.reference_features,
                    run.reference_batch)
    identity = {"store": str(Path(store).resolve()), "qa": [str(Path(p).resolve()) for p in qa]
                if qa else None, "reward": ref.id, "settings": settings.as_dict(),
                "run": {k: v for k, v in asdict(run).items()
                        if k not in ("device", "reference_batch")}}
    saved = checkpoints.load_checkpoint(out_dir)
    run_file = out_dir / "run.json"
    if run_file.exists() and saved is not None:
        before = json.loads(run_file.read_text())
        if before != json.loads(json.dumps(identity)):
            raise UserError(f"{out_dir}: holds a run with other settings, store or reward "
                            "(run.json); resume with the same options or choose another --out")
    if main:
        write_json_atomic(run_file, identity)
    cache = RewardCache(ref.id, saved[2] if saved else ())  # per rank; rank 0's is saved
    reward_model = RewardModel(ref, cache)
    policy_config = PolicyConfig(dim=corpus.frame_embedding.shape[1], hidden=run.hidden,
                                 layers=run.layers)
    trainer = GRPOTrainer(corpus, reward_model, settings, policy_config)
    metrics = checkpoints.MetricsLog(out_dir / "metrics.jsonl") if main else None
    best = {"score": -1.0, "step": 0, "validation": {}}
    best_weights = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    if saved is not None:
        tensors, meta, _ = saved
        trainer.load_state(tensors, meta)
        best = meta["best"]
        best_weights = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
        if main:
            metrics.truncate_after(trainer.step_count)
    elif main:
        metrics.path.unlink(missing_ok=True)
    val_rows = corpus.rows("val") or corpus.rows("train")[:256]
    budgets = tuple(sorted(set(settings.budgets)))
    if on_start is not None:
        on_start(settings.steps, trainer.step_count)
    started = time.perf_counter()
    steps_this_call = 0
    timings = dict.fromkeys(("sample", "reward", "update", "validate", "checkpoint"), 0.0)

    def checkpoint() -> None:
        tensors, meta = trainer.state()  # on every rank: it gathers their generators
        if not main:
            return
        tensors.update({f"best.{k}": v for k, v in best_weights.items()})
        meta["best"] = best
        checkpoints.save_checkpoint(out_dir, tensors, meta, cache.items())

    while trainer.step_count < settings.steps:
        m = trainer.step()
        steps_this_call += 1
        for stage in ("sample", "reward", "update"):
            timings[stage] += getattr(m, f"{stage}_seconds")
        tick = time.perf_counter()
        rows = [{"kind": "train", **{k: v for k, v in asdict(m).items() if k != "extra"}}]
        last = trainer.step_count == settings.steps
        if main and (trainer.step_count % run.eval_every == 0 or last):
            validation = trainer.validate(val_rows, budgets)  # no collective: rank 0 alone
            rows.append({"kind": "val", "step": trainer.step_count, **validation})
            if _score(validation) > best["score"]:
                best = {"score": _score(validation), "step": trainer.step_count,
                        "validation": validation}
                best_weights = {k: v.detach().clone()
                                for k, v in trainer.policy.state_dict().items()}
        if main:
            for row in rows:
                metrics.append(row)
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
    summary = {
        "steps": trainer.step_count, "finished": finished,
        "seconds_this_call": round(time.perf_counter() - started, 1),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "best": best, "filter": trainer.filter_stats, "reward": ref.id,
        "cache": {"entries": len(cache), "hits": cache.hits, "misses": cache.misses},
    }
    if main and finished and (steps_this_call or not (out_dir / "policy").exists()):
        checkpoints.save_model(out_dir / "policy", "policy", policy_config.as_dict(),
                               best_weights, chosen="best validation", best=best,
                               settings=settings.as_dict(), reward=ref.id)
        checkpoints.save_model(out_dir / "policy-last", "policy", policy_config.as_dict(),
                               trainer.policy.state_dict(), chosen="last step",
                               settings=settings.as_dict(), reward=ref.id)
        plots.training_curves(list(metrics.rows()), out_dir / "training.png")
    if main:
        write_json_atomic(out_dir / "summary.json", summary)
    if world > 1:  # no rank leaves (and re-reads the run) before rank 0 has written it
        dist.barrier()
    return summary


# ----------------------------------------------------------------------------- evaluation

def evaluate_stage(store: str | os.PathLike[str], qa: Sequence[str] | None, split: str,
                   ks: Sequence[int], reward_spec: str, policies: Sequence[str] = (),
                   methods: Sequence[str] = tuple(BASELINES), out: str | os.PathLike[str] | None
                   = None, device: str | None = None,
                   reference_features: str | None = None) -> list[Row]:
    corpus = load_corpus(store, qa, pick_device(device))
    rows = corpus.rows(split)
    if not rows:
        raise UserError(f"no questions in split {split!r} (splits: "
                        f"{', '.join(sorted(set(corpus.split)))})")
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise UserError(f"unknown method(s) {', '.join(unknown)}; "
                        f"choose from {', '.join(BASELINES)}")
    selectors: list[Selector] = [BASELINES[m]() for m in methods]
    for path, name in zip(policies, _policy_names(policies), strict=True):
        selectors.append(Learned(load_policy(path, corpus.device), name=name))
    reward_model = RewardModel(reference(reward_spec, corpus, store_shards(store),
                                         reference_features))
    table = evaluate(corpus, rows, selectors, tuple(ks), reward_model)
    if out is not None:
        write_evaluation(table, Path(out), split)
    return table


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


def write_evaluation(table: list[Row], out: Path, split: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "eval.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Row)])
        writer.writeheader()
        for row in table:
            writer.writerow(row.as_dict())
    (out / "eval.md").write_text(markdown_table(table, split))
    plots.evaluation_chart(table, out / "eval.png")


def markdown_table(table: list[Row], split: str) -> str:
    """Accuracy (evidence recall) per method and budget, all questions, then per kind."""
    ks = sorted({r.k for r in table})
    methods = list(dict.fromkeys(r.method for r in table))
    categories = list(dict.fromkeys(r.category for r in table))
    index = {(r.method, r.k, r.category): r for r in table}
    lines = []
    for category in categories:
        n = next(r.questions for r in table if r.category == category)
        lines.append(f"### {category} ({split}, {n} questions): accuracy % (evidence recall %)")
        lines.append("")
        lines.append("| method | " + " | ".join(f"k={k}" for k in ks) + " |")
        lines.append("|---|" + "---:|" * len(ks))
        for method in methods:
            cells = []
            for k in ks:
                r = index.get((method, k, category))
                if r is None:
                    cells.append("")
                    continue
                recall = f" ({100 * r.evidence_recall:.1f})" if r.evidence_recall is not None \
                    else ""
                cells.append(f"{100 * r.accuracy:.1f}{recall}")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)
