"""The model thread: one thread for all model work (see the module's docstring for why)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lminf_integrations import model_thread
from lminf_integrations.engine import Engine, GenerationSettings
from lminf_integrations.streaming import ProgressCallback, StreamResult, TokenStream

Pair = tuple[PreTrainedModel, PreTrainedTokenizerBase]


def test_progress_reaches_the_caller_in_its_own_thread_and_results_come_back() -> None:
    caller = threading.get_ident()
    reports: list[tuple[int, int, int]] = []

    def work(report: ProgressCallback) -> int:
        for done in range(4):
            report(done, 3)
        return threading.get_ident()

    ran_on = model_thread.run(work, lambda done, total: reports.append((done, total, threading.get_ident())))
    assert ran_on != caller and ran_on == model_thread.run(lambda _: threading.get_ident())
    assert reports == [(done, 3, caller) for done in range(4)]


def test_errors_in_the_work_reach_the_caller() -> None:
    def work(report: ProgressCallback) -> None:
        raise ValueError("bad document")

    with pytest.raises(ValueError, match="bad document"):
        model_thread.run(work)
    assert model_thread.run(lambda _: 7) == 7  # the thread lives on


def test_a_caller_that_stops_waiting_stops_the_work_at_its_next_report() -> None:
    """A failing progress callback (or Ctrl-C) stops the job at its next report, and the error is raised once the
    job has stopped: model work still running when a program exits on Ctrl-C aborts the interpreter."""
    reached: list[int] = []
    finished = threading.Event()

    def work(report: ProgressCallback) -> None:
        try:
            for done in range(1000):
                report(done, 1000)
                reached.append(done)
                time.sleep(0.05)  # a chunk's work: the error comes in the middle of one
        finally:
            finished.set()

    def on_progress(done: int, total: int) -> None:
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model_thread.run(work, on_progress)
    assert finished.is_set()  # stopped before the error reached the caller
    assert len(reached) < 1000
    assert not _busy_after(10)


def test_work_started_from_the_model_thread_runs_at_once() -> None:
    """A job queueing a job and waiting for it would wait for ever: from the model thread, it runs inline."""

    def outer(report: ProgressCallback) -> tuple[int, int]:
        return threading.get_ident(), model_thread.run(lambda _: threading.get_ident())

    first, second = model_thread.run(outer)
    assert first == second


def test_a_stream_closed_while_queued_never_runs(tiny_llama_with_real_tokenizer: Pair) -> None:
    model, tokenizer = tiny_llama_with_real_tokenizer
    engine = Engine(model=model, tokenizer=tokenizer, reuse_prefixes=False)
    release, started = threading.Event(), threading.Event()

    def blocker(report: ProgressCallback) -> None:
        started.set()
        release.wait(10)

    block = model_thread.submit(lambda: blocker(lambda d, t: None))
    assert started.wait(10)
    queued = engine.stream("one two three", GenerationSettings(max_new_tokens=2))
    assert queued.running
    queued.close()
    # close() returns at once: it does not wait for the job ahead (a long encode, say) to reach the cancelled one
    assert not block.done() and not release.is_set()
    assert queued.result is not None and queued.result.stop_reason == "cancelled"
    assert queued.result.output_tokens == 0 and queued.text == ""
    release.set()
    block.result(10)
    assert not _busy_after(10)


def test_a_stream_made_on_the_model_thread_still_yields_everything() -> None:
    def work(emit: Callable[[str], None], report: ProgressCallback, cancelled: threading.Event) -> StreamResult:
        for word in ("a", "b"):
            emit(word)
        return StreamResult(0, 2, "length")

    assert model_thread.run(lambda _: "".join(TokenStream(work))) == "ab"


def _busy_after(seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while model_thread.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    return model_thread.busy()


def test_a_decorated_function_runs_on_the_model_thread_with_its_arguments() -> None:
    @model_thread.on_model_thread
    def where(a: int, b: int = 0) -> tuple[int, int]:
        if a < 0:
            raise ValueError("negative")
        return a + b, threading.get_ident()

    total, ident = where(2, b=3)
    assert total == 5 and ident == model_thread.run(lambda _: threading.get_ident()) != threading.get_ident()
    with pytest.raises(ValueError, match="negative"):
        where(-1)


def test_the_model_thread_follows_torch_set_num_threads() -> None:
    """``torch.set_num_threads`` sets the calling thread's OpenMP setting (and new threads'), not a running thread's:
    without passing it on, a thread count set after the first generation would never reach the model's work."""
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    model_thread.run(lambda _: None)  # the thread exists, its setting made
    try:
        torch.set_num_threads(other)
        assert model_thread.run(lambda _: torch.get_num_threads()) == other
        assert model_thread.submit(torch.get_num_threads).result() == other
    finally:
        torch.set_num_threads(before)
    assert model_thread.run(lambda _: torch.get_num_threads()) == before
