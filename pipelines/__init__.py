"""Stage logic as plain functions: synthesise a corpus, decode and ingest videos into frame
shards, embed them into a feature store, precompute reference features and LMM margins, train
the reader and the policy, evaluate, and score new corpora. Usable and testable without
Prefect."""

from typing import Any

__all__ = ["select_frames", "SelectedFrames"]


def __getattr__(name: str) -> Any:
    """``pipelines.select_frames`` (pipelines/api.py), imported on first use so that importing
    a stage does not load the policy's libraries."""
    if name in __all__:
        from pipelines import api

        return getattr(api, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
