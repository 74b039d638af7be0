"""Helpers for the worker processes of the stages (process pools, DataLoader workers)."""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable


def die_with_parent(parent: int | None = None) -> None:
    """Ask Linux to kill this process when its parent dies (``kill -9`` included), so no
    orphan keeps reading or writing after the run that started it is gone. A worker that starts
    slowly (spawn imports for seconds) may find its parent ``parent`` already dead: the signal
    would never come, so it leaves at once."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def _dataloader_worker_init(parent: int, worker_id: int) -> None:
    die_with_parent(parent)


def dataloader_worker_init() -> Callable[[int], None]:
    """A ``worker_init_fn`` for DataLoaders made in this process."""
    return functools.partial(_dataloader_worker_init, os.getpid())
