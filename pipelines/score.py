"""``refocus score``: a trained policy picks k frames per question of a new corpus.

inputs (videos, folders, manifests with questions) → ingest into ``OUT/shards`` with the
candidate settings the policy was trained on → embed with the policy's encoder into
``OUT/features`` (both skip what is already done) → the policy decodes greedily, a batch of
questions at a time → ``OUT/selections.{jsonl,parquet,json}`` (stores/selections.py), and on
request the chosen frames themselves: a JPEG folder per question, or WebDataset shards with
one sample per question. Questions whose video failed to land are reported, not fatal.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from pipelines.corpus import load_corpus
from pipelines.decode import DecodeSettings
from pipelines.embed import embed
from pipelines.encoder import encoder_spec, load_encoder
from pipelines.ingest import IngestSettings, ingest
from pipelines.policies import TrainedPolicy, find_policy, load_policy, policy_record
from pipelines.runners import LocalRunner, Runner
from pipelines.settings import ScoreSettings
from refocus.device import pick_device
from refocus.selectors import Learned
from stores import shards as shard_files
from stores.errors import UserError
from stores.features import same_encoder
from stores.manifest import Manifest
from stores.owned import Owned, claim
from stores.selections import (
    FrameSelection,
    SelectionsMeta,
    export_keys,
    write_selections,
)
from stores.shards import ShardSet

SHARDS, FEATURES = "shards", "features"  # under the output folder


def trained_k(policy: TrainedPolicy, k: int | None) -> int:
    """The budget to score with: ``k`` when given, else the largest budget the policy was
    trained (and validated) on."""
    if k is not None:
        return k
    if not policy.budgets:
        raise UserError(f"{policy.path}: records no training budgets (its config.json and "
                        "run.json name no settings); give the frames per question with --k")
    return max(policy.budgets)


def with_trained_k(settings: ScoreSettings, policy: TrainedPolicy) -> ScoreSettings:
    return replace(settings, k=trained_k(policy, settings.k))


def ingest_settings(policy: TrainedPolicy, workers: int) -> IngestSettings:
    """Candidates as the policy saw them in training (fps, cap, size, JPEG quality), as its
    folder records them."""
    trained = policy_record(policy.path).get("candidates")
    if not trained and policy.store is not None:  # an older policy: its training store's
        trained = policy.store.ingest.get("settings")
    if not trained:
        raise UserError(f"{policy.path}: records no candidate-frame settings (fps, frame cap, "
                        "size) and its training store is not found (run.json); put the store "
                        "back where run.json names it, or retrain with this refocus version")
    decode_fields = {f.name: trained[f.name] for f in fields(DecodeSettings)
                     if f.name in trained and f.name != "threads"}
    return IngestSettings(decode=DecodeSettings(**decode_fields),
                          jpeg_quality=trained.get("jpeg_quality", 90),
                          shard_size=trained.get("shard_size", 16), workers=workers)


def encoder_args(policy: TrainedPolicy, settings: ScoreSettings) -> tuple[str, str | None]:
    """(model, pretrained) for ``load_encoder``: the encoder the policy was trained with, as
    its folder records it; ``--model/--pretrained`` that name another encoder are refused."""
    recorded = policy_record(policy.path).get("encoder") or (
        policy.store.encoder if policy.store is not None else None)
    if not recorded:
        if settings.model:
            return settings.model, settings.pretrained
        raise UserError(f"{policy.path}: records no encoder and its training store is not "
                        "found (run.json); name its encoder with --model/--pretrained")
    wanted = encoder_spec(recorded)
    if not settings.model and not settings.pretrained:
        return wanted
    given = (settings.model or wanted[0], settings.pretrained)
    if given == wanted or same_encoder(load_encoder(*given, "cpu").identity, recorded):
        return given
    raise UserError(f"--model {given[0]} --pretrained {given[1]}: not the encoder the policy "
                    f"{policy.path} was trained with ({wanted[0]} with weights {wanted[1]}, "
                    f"sha256 {str(recorded.get('weights_sha256'))[:12]}); leave the options out "
                    "or give that encoder")


def select(features: str | os.PathLike[str], manifest_paths: list[Path], policy_path: Path,
           k: int, device: str | None = None, batch_size: int = 64,
           sources: dict[str, str] | None = None) -> list[FrameSelection]:
    """The policy's k picks for every question in the store, in time order."""
    sources = sources or {}
    corpus = load_corpus(features, [str(p) for p in manifest_paths], pick_device(device))
    policy = load_policy(policy_path, corpus.device)
    if policy.config.dim != corpus.frame_embedding.shape[1]:
        raise UserError(f"{policy_path}: the policy expects {policy.config.dim}-d features, "
                        f"the store has {corpus.frame_embedding.shape[1]}-d; embed with the "
                        "policy's encoder")
    questions = corpus.rows()
    scored = Learned(policy, batch_size=batch_size).select_scored(corpus, questions, k)
    rows = []
    for q, (picks, probs) in zip(questions, scored, strict=True):
        video = int(corpus.video[q])
        start = int(corpus.offsets[video])
        times = corpus.frame_time[start:start + int(corpus.n_frames[video])].tolist()
        rows.append(FrameSelection(
            qid=corpus.qids[q], video_id=corpus.video_ids[video], question=corpus.text[q],
            options=corpus.options_text[q], k=k, frame_indices=[int(p) for p in picks],
            timestamps=[float(times[p]) for p in picks],
            probabilities=[round(float(p), 6) for p in probs],
            source=sources.get(corpus.video_ids[video], "")))
    return rows


JPEG_FRAMES = ("???_*s.jpg", "*.tmp", "selection.json")  # what a question's export folder
# holds (stores.owned.MADE_NAMES); cleared before it is written again
EXPORT_SHARDS = ("shard-??????.tar", "shard-??????.done.json")


def _remove_stale_shards(out: Owned, count: int) -> None:
    """Delete WebDataset export shards (and their markers) numbered ``count`` and above,
    left by an earlier export of more questions."""
    made = [p.name for pattern in EXPORT_SHARDS for p in out.path.glob(pattern)]
    out.remove(*sorted(name for name in made if int(name[6:12]) >= count))


def export_frames(rows: list[FrameSelection], shards_dir: Path, out: Path, kind: str,
                  shard_size: int = 256) -> int:
    """Copy the chosen JPEGs out of the frame shards (no re-encoding); returns frames.

    Each question's frames go under its export key (``stores.selections.export_keys``): a
    JPEG folder, cleared of earlier frames first, or a WebDataset sample; WebDataset shards
    of an earlier, larger export are removed."""
    keys = export_keys(rows)
    owned = claim(out, f"frames-{kind}", inputs=[shards_dir])
    source = ShardSet(shards_dir)
    lookup = source.lookup()
    written = 0
    last: tuple[str, list[bytes]] = ("", [])  # rows come grouped by video: read each once

    def chosen(row: FrameSelection) -> list[bytes]:
        nonlocal last
        if last[0] != row.video_id:
            last = (row.video_id, source.read(row.video_id, lookup[row.video_id]).frames)
        return [last[1][i] for i in row.frame_indices]

    if kind == "jpeg":
        for row in rows:
            folder = owned.path / keys[row.qid]
            folder.mkdir(exist_ok=True)
            for pattern in JPEG_FRAMES:  # a folder named by its export key: made here
                owned.remove_stale(pattern, under=keys[row.qid])
            for rank, (jpeg, t) in enumerate(zip(chosen(row), row.timestamps, strict=True)):
                path = folder / f"{rank:03d}_{t:010.3f}s.jpg"
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_bytes(jpeg)
                os.replace(tmp, path)
                written += 1
            shard_files.write_json_atomic(folder / "selection.json", row.__dict__)
    elif kind == "webdataset":
        starts = range(0, len(rows), shard_size)
        _remove_stale_shards(owned, len(starts))
        for index, start in enumerate(starts):
            writer = shard_files.ShardTarWriter(owned.path, index)
            try:
                for row in rows[start:start + shard_size]:
                    jpegs = chosen(row)
                    writer.add(keys[row.qid], dict(row.__dict__), jpegs)
                    written += len(jpegs)
                writer.commit({"questions": len(writer.samples)})
            except BaseException:
                writer.abort()
                raise
    return written


SCORE_KIND = "score"  # the marker of a score folder (stores/owned.py)


def claim_score(manifest: Manifest, policy_path: str | os.PathLike[str],
                out: str | os.PathLike[str],
                inputs: Iterable[str | os.PathLike[str]] = ()) -> Owned:
    """``out`` as a score folder: created, or one a score made; never a user's folder, nor
    the policy, the videos or the given ``inputs`` (or a folder holding them)."""
    return claim(out, SCORE_KIND,
                 inputs=[policy_path, *inputs, *(v.path for v in manifest.videos)])


def score(manifest: Manifest, policy_path: str | os.PathLike[str], out: str | os.PathLike[str],
          settings: ScoreSettings = ScoreSettings(),
          say: Callable[[str], None] = lambda line: None,
          inputs: Iterable[str | os.PathLike[str]] = (),
          runner: Runner | None = None) -> dict[str, Any]:
    """Ingest, embed and select for ``manifest``'s questions; returns the summary.
    ``out`` is claimed first (``claim_score``); its shards/ and features/ by ingest and embed,
    whose shards ``runner`` maps (default: ``LocalRunner``)."""
    check_questions(manifest)
    with claim_score(manifest, policy_path, out, inputs).lock():
        return _score(manifest, policy_path, Path(out), settings, say, runner or LocalRunner())


def _score(manifest: Manifest, policy_path: str | os.PathLike[str], root: Path,
           settings: ScoreSettings, say: Callable[[str], None],
           runner: Runner) -> dict[str, Any]:
    started = time.perf_counter()
    policy = find_policy(policy_path)
    settings = with_trained_k(settings, policy)  # before the slow part: a missing k stops here
    seconds: dict[str, float] = {}
    tick = time.perf_counter()
    say("ingest …")
    ingested = ingest(manifest, root / SHARDS, replace(
        ingest_settings(policy, settings.ingest_workers), network=settings.network),
        runner=runner)
    seconds["ingest"] = time.perf_counter() - tick
    tick = time.perf_counter()
    say("embed …")
    embedded = embed(root / SHARDS, root / FEATURES,
                     load_encoder(*encoder_args(policy, settings), settings.device),
                     settings.embed, questions=manifest, runner=runner)
    seconds["embed"] = time.perf_counter() - tick
    tick = time.perf_counter()
    say("select …")
    rows, meta = _select(manifest, policy, root, settings)
    files = write_selections(root, rows, meta)
    seconds["select"] = time.perf_counter() - tick
    exported = 0
    if settings.export != "none":
        tick = time.perf_counter()
        say(f"export {settings.export} …")
        exported = export_frames(rows, root / SHARDS, root / f"frames-{settings.export}",
                                 settings.export, settings.export_shard_size)
        seconds["export"] = time.perf_counter() - tick
    failures = [str(f) for f in ingested.failures] + list(embedded.failures)
    summary = {
        "out": str(root), "policy": meta.policy, "k": meta.k,
        "videos": len({r.video_id for r in rows}), "questions": len(rows),
        "frames_exported": exported,
        "selections": {name: str(path) for name, path in files.items()},
        "failures": failures,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    shard_files.write_jsonl(root / "failures.jsonl", [{"error": f} for f in failures])
    shard_files.write_json_atomic(root / "summary.json", summary)
    return summary


def check_questions(manifest: Manifest) -> None:
    if not manifest.questions:
        raise UserError("no questions to score: give a manifest with question rows "
                        "(refocus import … converts benchmark annotation files)")


def _select(manifest: Manifest, policy: TrainedPolicy, root: Path,
            settings: ScoreSettings) -> tuple[list[FrameSelection], SelectionsMeta]:
    """The policy's picks over the embedded corpus, and what the selections record."""
    shards_dir, features_dir = root / SHARDS, root / FEATURES
    k = trained_k(policy, settings.k)
    rows = select(features_dir, [shards_dir / shard_files.MANIFEST_FILE], policy.path,
                  k, settings.device, settings.questions_per_batch,
                  sources={v.id: v.path for v in manifest.videos})
    meta = SelectionsMeta(policy=str(policy.path.resolve()), k=k,
                          shards=str(shards_dir.resolve()),
                          features=str(features_dir.resolve()))
    return rows, meta
