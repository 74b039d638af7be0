"""Runners: where a stage's per-item step runs (img2dataset's distributor idea).

A stage (ingest, embed, score) owns the order of its steps once. The part that fans out —
one shard, one chunk — it hands to a runner as a ``Step``; the runner maps it over the items
and hands back, as each finishes, a ``Done(name, value)`` or a ``Failed(name, error)`` (one
line): an item that fails is data, and the others still land.

* ``LocalRunner`` (here): what the plain commands do. A step with ``many`` runs all items
  at once in this process (embed: one DataLoader over every shard); otherwise the items run in
  a spawn process pool of ``step.processes`` workers that die with this process, their
  progress events sent back through a queue (ingest), or in this process when one worker
  (or one item) is enough.
* ``PrefectRunner`` (``flows/runners.py``, the only layer that may import Prefect): each item
  a Prefect task of the running flow, on threads or on a Dask cluster, with retries.

``step.run`` goes to other processes, so it is a module-level function or a
``functools.partial`` of one over picklable values.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from queue import Empty
from typing import Any, Generic, Protocol, TypeVar

from pipelines.workers import die_with_parent

I = TypeVar("I")  # noqa: E741  (an item)
T = TypeVar("T")
Report = Callable[[Any], None]  # a progress event (a finished video, a number of frames)


def ignore(event: Any) -> None:
    """The report of a run nobody watches."""


def one_line(error: BaseException) -> str:
    """An error as the one line a summary records: its type and the first line of its text."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


@dataclass(frozen=True)
class Done(Generic[T]):
    """An item that finished, with what its step returned."""

    name: str
    value: T


@dataclass(frozen=True)
class Failed:
    """An item whose step raised: its name and the error, one line."""

    name: str
    error: str

    def __str__(self) -> str:
        return f"{self.name}: {self.error}"


@dataclass(frozen=True)
class Step(Generic[I, T]):
    """What a stage hands a runner: the step of one item and how items are called."""

    kind: str  # what the step is (a Prefect task's name: ingest-shard)
    run: Callable[[I, Report], T]  # one item, in any process (picklable)
    name: Callable[[I], str]  # an item's name in results, failures and task states
    title: Callable[[I], str]  # an item's run name (a Prefect task run: ingest 000003)
    processes: int = 1  # how many worker processes the local runner may use
    # all items at once in this process, yielding (item, value) as each finishes: the local
    # runner's choice when given (an exception in it stops the run)
    many: Callable[[list[I], Report], Iterator[tuple[I, T]]] | None = None


class Runner(Protocol):
    def map(self, step: Step[I, T], items: Sequence[I],
            report: Report = ignore) -> Iterator[Done[T] | Failed]:
        """Run ``step`` over ``items``, yielding each outcome as it comes."""
        ...


def split(outcomes: Iterable[Done[T] | Failed]) -> tuple[list[T], list[Failed]]:
    """The values of the items that finished, and the failures."""
    values: list[T] = []
    failed: list[Failed] = []
    for outcome in outcomes:
        if isinstance(outcome, Failed):
            failed.append(outcome)
        else:
            values.append(outcome.value)
    return values, failed


class LocalRunner:
    """This process, or a spawn process pool whose workers die with it (module notes)."""

    def map(self, step: Step[I, T], items: Sequence[I],
            report: Report = ignore) -> Iterator[Done[T] | Failed]:
        if step.many is not None:
            for item, value in step.many(list(items), report):
                yield Done(step.name(item), value)
        elif step.processes <= 1 or len(items) <= 1:
            for item in items:
                yield _run_here(step, item, report)
        else:
            yield from _run_pool(step, items, report)


def _run_here(step: Step[I, T], item: I, report: Report) -> Done[T] | Failed:
    try:
        return Done(step.name(item), step.run(item, report))
    except Exception as e:  # recorded; the other items go on
        return Failed(step.name(item), one_line(e))


# ----------------------------------------------------------------------------- the pool

_events: Any = None  # the worker's queue back to the parent, set by _init_worker


def _init_worker(events: Any, parent: int) -> None:
    global _events
    _events = events
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what an interrupt does
    die_with_parent(parent)


def _in_worker(run: Callable[[Any, Report], Any], item: Any) -> Any:
    return run(item, _events.put)


def _run_pool(step: Step[I, T], items: Sequence[I],
              report: Report) -> Iterator[Done[T] | Failed]:
    """The items in worker processes, their progress events drained into ``report``."""
    context = mp.get_context("spawn")
    events = context.Queue()
    workers = min(step.processes, len(items))
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                             initargs=(events, os.getpid())) as pool:
        futures: dict[Future, I] = {pool.submit(_in_worker, step.run, item): item
                                    for item in items}
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
                _drain(events, report)
                for future in finished:
                    yield _outcome(step.name(futures[future]), future)
        except BaseException:  # Ctrl-C (or the caller stopped): unfinished items are redone
            for process in list(getattr(pool, "_processes", {}).values()):  # on a re-run
                process.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            _drain(events, report)


def _outcome(name: str, future: Future) -> Done[Any] | Failed:
    try:
        return Done(name, future.result())
    except BrokenProcessPool as e:
        return Failed(name, f"worker died ({e})")
    except Exception as e:  # recorded; the other items go on
        return Failed(name, one_line(e))


def _drain(events: Any, report: Report) -> None:
    while True:
        try:
            report(events.get_nowait())
        except Empty:
            return
