"""One thread for all of the package's model work: encoding, saved states and every generation, of every engine.

Why one thread: PyTorch's CPU builds run parallel work on OpenMP, and libgomp keeps a team of threads for every
thread that has started a parallel region, for as long as that thread lives. Once the teams together hold more
threads than there are cores, libgomp stops spinning between parallel regions: each team's threads sleep on a
futex and are woken for every region. A model's forward is thousands of small regions, so a process that encoded
a document in the caller's thread and then generated in another one ran markedly slower (README, "One thread for
the model"). Running everything here keeps one team.

Your own torch work in the same process (an embedding model beside a whole-document LLM, say) starts a team of its
own in whichever thread runs it; :func:`run` (or the :func:`on_model_thread` decorator) puts it on this thread
too.

Each job runs with the torch thread count (``torch.set_num_threads``) of the thread that queued it: that setting
belongs to each thread, and a running thread never sees a later change made in another.

``concurrent.futures.ThreadPoolExecutor(max_workers=1)`` would be the library answer, but the interpreter joins its
threads at exit: Ctrl-C during a long encode would then wait for the encode to finish. This thread is a daemon.
"""

from __future__ import annotations

import concurrent.futures
import functools
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

import torch

T = TypeVar("T")
P = ParamSpec("P")
ProgressCallback = Callable[[int, int], None]  # (done, total); streaming and the engine use this one

_jobs: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
_guard = threading.Lock()
_thread: threading.Thread | None = None
_unfinished = 0


class Cancelled(Exception):
    """Raised inside a job by its progress report once the caller has stopped waiting for it."""


def is_model_thread() -> bool:
    return threading.current_thread() is _thread


def busy() -> bool:
    """Whether a job is queued or running."""
    with _guard:
        return _unfinished > 0


def submit(job: Callable[[], T]) -> Future[T]:
    """Queue ``job`` on the model thread; from the model thread itself it runs at once (a job waiting for a job
    queued behind it would wait for ever)."""
    future: Future[T] = Future()
    if is_model_thread():
        _settle(future, job)
        return future
    # torch.set_num_threads sets the calling thread's OpenMP setting (and new threads'), never a running one's.
    job = _with_threads(job, torch.get_num_threads())
    global _thread, _unfinished
    with _guard:
        # A fork leaves the child without the thread: start another.
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_serve, name="lminf-model", daemon=True)
            _thread.start()
        _unfinished += 1
    _jobs.put((future, job))
    return future


def run(work: Callable[[ProgressCallback], T], on_progress: ProgressCallback | None = None) -> T:
    """``work(report)`` on the model thread, waited for. ``report(done, total)`` reaches ``on_progress`` in the
    calling thread, so callbacks never run in a foreign thread. If the wait ends early (Ctrl-C, or ``on_progress``
    raising), the job's next report raises :class:`Cancelled`, and the error is raised here once the job has
    stopped: a program that exits on Ctrl-C while torch still runs in this daemon thread is aborted by the C++
    runtime. A second Ctrl-C during that wait is raised at once."""
    if is_model_thread():
        return work(on_progress or _ignore)
    events: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
    stop = threading.Event()

    def report(done: int, total: int) -> None:
        if stop.is_set():
            raise Cancelled
        events.put((done, total))

    future = submit(lambda: work(report))
    future.add_done_callback(lambda _: events.put(None))
    try:
        while (event := events.get()) is not None:
            if on_progress is not None:
                on_progress(*event)
    except BaseException:
        stop.set()
        if not future.cancel():  # started: it stops at its next report
            concurrent.futures.wait([future])
        raise
    return future.result()


def on_model_thread(function: Callable[P, T]) -> Callable[P, T]:
    """Decorate a function so that every call runs on the model thread (waited for, errors raised in the caller)."""

    @functools.wraps(function)
    def on_it(*args: P.args, **kwargs: P.kwargs) -> T:
        return run(lambda _: function(*args, **kwargs))

    return on_it


def _with_threads(job: Callable[[], T], threads: int) -> Callable[[], T]:
    def with_threads() -> T:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return job()

    return with_threads


def _ignore(done: int, total: int) -> None:
    pass


def _serve() -> None:
    global _unfinished
    while True:
        future, job = _jobs.get()
        outcome = _outcome(job) if future.set_running_or_notify_cancel() else None
        # Not busy any more before anyone waiting on the future wakes.
        with _guard:
            _unfinished -= 1
        if outcome is not None:
            _deliver(future, outcome)


def _settle(future: Future[T], job: Callable[[], T]) -> None:
    _deliver(future, _outcome(job))


def _outcome(job: Callable[[], T]) -> tuple[bool, Any]:
    try:
        return True, job()
    except BaseException as error:  # noqa: BLE001 - every failure reaches whoever waits on the future
        return False, error


def _deliver(future: Future[T], outcome: tuple[bool, Any]) -> None:
    succeeded, value = outcome
    if succeeded:
        future.set_result(value)
    else:
        future.set_exception(value)
