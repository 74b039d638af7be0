"""The corpus the learning stages and ``refocus score`` read: a feature store's arrays joined
with the questions of one or more manifests (by default the manifest that was ingested)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from refocus.data import Corpus
from stores.errors import UserError
from stores.features import FeatureStore
from stores.manifest import merge, read_manifest
from stores.shards import question_manifests


def qa_paths(store: str | os.PathLike[str],
             qa: Sequence[str | os.PathLike[str]] | None) -> list[Path]:
    """The manifests with the questions: those given, else the one that was ingested."""
    paths = question_manifests(qa, FeatureStore(store).ingest.get("shards"))
    if not paths:
        raise UserError(f"{store}: its ingest folder holds no question manifest; give the "
                        "questions with --qa MANIFEST")
    return paths


def load_corpus(store: str | os.PathLike[str], qa: Sequence[str | os.PathLike[str]] | None,
                device: str | torch.device = "cpu") -> Corpus:
    """The store's features joined with the manifest's questions (by default the manifest
    that was ingested)."""
    features_store = FeatureStore(store)
    paths = qa_paths(store, qa)
    manifests = [read_manifest(p) for p in paths]
    manifest = merge(manifests)
    corpus = Corpus(features_store.load(), manifest.questions, device)
    if not len(corpus):
        raise UserError(f"{store}: none of the {len(manifest.questions)} questions of "
                        f"{', '.join(map(str, paths))} is in the feature store; embed them "
                        "(refocus embed --questions ...)")
    return corpus
