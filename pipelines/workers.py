"""Helpers for the worker processes of the stages (process pools, DataLoader workers)."""

from __future__ import annotations

import signal


def die_with_parent() -> None:
    """Ask Linux to kill this process when its parent dies (``kill -9`` included), so no
    orphan keeps reading or writing after the run that started it is gone."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def dataloader_worker_init(worker_id: int) -> None:
    die_with_parent()
