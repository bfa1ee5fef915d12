"""Token streams: generation on the model thread, text deltas to sync or async consumers, framework-free.

The generation (on :mod:`.model_thread`) only puts events on a queue; every callback runs in the consumer's thread
(or coroutine), so framework callback managers are never called from a foreign thread. Closing the stream
(``close()``, leaving a ``with`` block, ``break`` out of iteration, ``aclose()``) stops generation at the next token
and waits for it to end.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from concurrent.futures import wait
from contextlib import aclosing, closing
from dataclasses import dataclass
from typing import IO, Any

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.generation.streamers import BaseStreamer

from . import model_thread
from .model_thread import ProgressCallback


@dataclass
class Progress:
    """Prompt tokens encoded so far out of ``total``."""

    done: int
    total: int


@dataclass
class StreamResult:
    """Counts known when a stream ends."""

    input_tokens: int = 0
    output_tokens: int = 0
    stop_reason: str = "length"  # "length", "eos", "stop", "cancelled"
    text: str = ""
    # What the strategy chose, under its name (XL3M: ``{"xl3m": {"segments", "chosen", "query_tokens"}}``).
    details: dict[str, Any] | None = None

    def usage(self) -> dict[str, int]:
        """Token counts under the names both frameworks read (LangChain's ``UsageMetadata``, LlamaIndex's counter)."""
        total = self.input_tokens + self.output_tokens
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "total_tokens": total}


_END = object()


class DeltaStreamer(BaseStreamer):
    """A transformers streamer that turns generated token ids into text deltas, one per token.

    Text is decoded from all generated ids each time so multi-token characters come out whole; a delta is held
    back while it ends in an incomplete UTF-8 sequence (decoded as U+FFFD), and dropped if generation ends there.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, emit: Callable[[str], None]) -> None:
        self.tokenizer = tokenizer
        self.emit = emit
        self.token_ids: list[int] = []
        self.sent = 0
        self.prompt_skipped = False

    def put(self, value: Any) -> None:
        if not self.prompt_skipped:  # generate() first passes the prompt ids
            self.prompt_skipped = True
            return
        self.token_ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):
            return
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)

    def end(self) -> None:
        # Generation may stop (max_new_tokens) between the byte tokens of one character: end before it.
        text = str(self.tokenizer.decode(self.token_ids, skip_special_tokens=True)).rstrip("\ufffd")
        if len(text) > self.sent:
            self.emit(text[self.sent :])
            self.sent = len(text)


class StopTrimmer:
    """Cuts a delta stream at the first stop string, holding back only text that could start one."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.pending = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Text safe to emit now; sets ``stopped`` once a stop string is seen (the stop text is dropped)."""
        if self.stopped:
            return ""
        self.pending += delta
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        if self.hold == 0:
            out, self.pending = self.pending, ""
            return out
        cut = len(self.pending)
        # Keep back the longest tail that is a prefix of some stop string.
        for size in range(min(self.hold, len(self.pending)), 0, -1):
            tail = self.pending[-size:]
            if any(s.startswith(tail) for s in self.stop):
                cut = len(self.pending) - size
                break
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class TokenStream:
    """Text deltas of one generation running on the model thread (queued behind any generation before it).

    ``work(emit_delta, report_progress, cancelled)`` does the generation and returns a :class:`StreamResult`.
    Iterate for deltas (sync or ``async for``); ``on_progress`` is called from the consumer side.
    """

    def __init__(
        self,
        work: Callable[[Callable[[str], None], ProgressCallback, threading.Event], StreamResult],
        stop: Sequence[str] = (),
        on_progress: ProgressCallback | None = None,
    ) -> None:
        self._events: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()
        self._trimmer = StopTrimmer(stop)
        self._on_progress = on_progress
        self.result: StreamResult | None = None
        self._text: list[str] = []
        self._finished = False
        # Set by an async consumer: the worker wakes it through its event loop, no thread parked per token.
        self._wakeup: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        self._job = model_thread.submit(lambda: self._run(work))

    def _run(self, work: Callable[..., StreamResult]) -> None:
        try:
            result = work(self._push_delta, self._push_progress, self.cancelled)
            self._put(("end", result))
        except BaseException as error:  # noqa: BLE001 - every failure must reach the consumer
            self._put(("error", error))

    def _put(self, event: tuple[str, Any]) -> None:
        self._events.put(event)
        wakeup = self._wakeup
        if wakeup is not None:
            loop, ready = wakeup
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:  # the consumer's loop is closed: nobody is waiting any more
                pass

    def _push_delta(self, text: str) -> None:
        if text:
            self._put(("delta", text))

    def _push_progress(self, done: int, total: int) -> None:
        self._put(("progress", Progress(done, total)))

    async def _next_event(self) -> tuple[str, Any]:
        """The next queued event, awaited on the event loop (the worker sets ``ready`` after each put)."""
        if self._wakeup is None:
            self._wakeup = (asyncio.get_running_loop(), asyncio.Event())
        ready = self._wakeup[1]
        while True:
            ready.clear()
            try:
                return self._events.get_nowait()
            except queue.Empty:
                await ready.wait()

    def _take(self, event: tuple[str, Any]) -> str | Progress | object | None:
        """Turn one queued event into text to yield, a :class:`Progress`, ``_END``, or None."""
        kind, payload = event
        if kind == "delta":
            out = self._trimmer.feed(payload)
            if self._trimmer.stopped:
                self.cancelled.set()
            return out or None
        if kind == "progress":
            return payload
        if kind == "error":
            self._finished = True
            wait([self._job])
            raise payload
        self.result = payload
        if self._trimmer.stopped:
            self.result.stop_reason = "stop"
        self._finished = True
        wait([self._job])
        return _END

    def __iter__(self) -> Iterator[str]:
        # closing(): leaving this generator early must close events() at once, which stops the worker.
        with closing(self.events()) as items:
            for item in items:
                if isinstance(item, Progress):
                    if self._on_progress is not None:
                        self._on_progress(item.done, item.total)
                else:
                    yield item

    async def __aiter__(self) -> AsyncIterator[str]:
        async with aclosing(self.aevents()) as items:
            async for item in items:
                if isinstance(item, Progress):
                    if self._on_progress is not None:
                        self._on_progress(item.done, item.total)
                else:
                    yield item

    def events(self) -> Generator[str | Progress, None, None]:
        """Text deltas and :class:`Progress` reports, in order, for adapters that forward progress themselves.

        ``on_progress`` is not called for the reports yielded here. Closing the iterator stops generation.
        """
        try:
            while not self._finished:
                item = self._take(self._events.get())
                if item is _END:
                    break
                if item is not None:
                    yield self._record(item)  # type: ignore[arg-type]
            tail = self._trimmer.flush()
            if tail:
                yield self._record(tail)
            if self.result is not None:
                self.result.text = self.text  # what the consumer got: special tokens and stop text excluded
        finally:
            self.close()

    async def aevents(self) -> AsyncGenerator[str | Progress, None]:
        """Async :meth:`events`: waits on the event loop, which the worker wakes; the loop is never blocked."""
        try:
            while not self._finished:
                item = self._take(await self._next_event())
                if item is _END:
                    break
                if item is not None:
                    yield self._record(item)  # type: ignore[arg-type]
            tail = self._trimmer.flush()
            if tail:
                yield self._record(tail)
            if self.result is not None:
                self.result.text = self.text  # what the consumer got: special tokens and stop text excluded
        finally:
            # Waiting for the generation to stop can take one token step; do it off the event loop.
            await asyncio.to_thread(self.close)

    def _record(self, item: str | Progress) -> str | Progress:
        if isinstance(item, str):
            self._text.append(item)
        return item

    @property
    def text(self) -> str:
        """Everything yielded so far."""
        return "".join(self._text)

    def close(self) -> None:
        """Stop generation (if still running) and wait for it to end, or drop it at once if it is still queued;
        ``result`` is then set even when the consumer left before the end (counts, stop reason and the strategy's
        details are kept)."""
        self.cancelled.set()
        if self._job.cancel():  # still queued behind another generation: it never starts
            self._events.put(("end", StreamResult(stop_reason="cancelled")))
        else:
            # Only a started job is waited for. A cancelled one counts as done for `wait` only once the model thread
            # dequeues it, after whatever runs ahead of it (a long encode): waiting would block until then.
            wait([self._job])
        self._finished = True
        while self.result is None:
            try:
                kind, payload = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "end":
                self.result = payload

    @property
    def running(self) -> bool:
        return not self._job.done()

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


class TerminalProgress:
    """A :data:`ProgressCallback` drawing a tqdm bar for prompt encoding, only when the output is a terminal.

    Logs, pipes and notebooks' captured stderr get no control characters. Prompts under ``min_tokens`` get no bar
    either: they encode in a moment and a bar would only flicker. The bar disappears when encoding ends, so the
    answer streamed after it starts on a clean line.
    """

    def __init__(
        self,
        enabled: bool | None = None,
        min_tokens: int = 2048,
        desc: str = "encoding prompt",
        file: IO[str] | None = None,
    ) -> None:
        self.file = file if file is not None else sys.stderr
        self.enabled = _is_terminal(self.file) if enabled is None else enabled
        self.min_tokens = min_tokens
        self.desc = desc
        self._bar: tqdm[Any] | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total < self.min_tokens:
            return
        if self._bar is None:
            self._bar = tqdm(total=total, desc=self.desc, unit="tok", file=self.file, leave=False, dynamic_ncols=True)
        if self._bar.total != total:  # a reporter may refine its total (say, counting a last token late)
            self._bar.total = total
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
