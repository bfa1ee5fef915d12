"""Where a LangChain call's encoding progress goes, and how a call's token streams are stopped when it ends.

Progress becomes a ``lminf_progress`` custom event on the run's callbacks (visible to callback handlers and to
``astream_events`` as ``on_custom_event``). Run managers have no custom-event method, and ``BaseChatModel.stream``
calls ``_stream`` without its run manager, so a *call scope* (a context variable set for one ``stream`` call)
carries the run's handlers, and the token streams the call started so that closing the call stops them at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.utils.uuid import uuid7

from ..streaming import Progress, TokenStream

PROGRESS_EVENT = "lminf_progress"
"""Name of the custom callback event sent while the prompt is encoded; data: ``{"done", "total", "model_name"}``."""

T = TypeVar("T")


@dataclass
class ProgressEvents:
    """``lminf_progress`` events to these handlers, tagged with the model run's id so that tracers and
    ``astream_events`` attach them to that run."""

    handlers: list[BaseCallbackHandler]
    run_id: UUID
    tags: list[str]
    metadata: dict[str, Any]
    model_name: str = ""

    @classmethod
    def for_run(
        cls, run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None, model_name: str
    ) -> ProgressEvents | None:
        """The run's own target, else the current call scope's (``BaseChatModel.stream`` keeps its manager)."""
        if run_manager is None:
            scope = _call_scope.get()
            target = scope.progress if scope is not None and scope.open else None
        else:
            target = cls(run_manager.handlers, run_manager.run_id, run_manager.tags, run_manager.metadata)
        if target is not None:
            target.model_name = model_name
        return target

    def _data(self, progress: Progress) -> dict[str, Any]:
        return {"done": progress.done, "total": progress.total, "model_name": self.model_name}

    def send(self, progress: Progress) -> None:
        if self.handlers:
            manager = CallbackManager(handlers=self.handlers, tags=self.tags, metadata=self.metadata)
            manager.on_custom_event(PROGRESS_EVENT, self._data(progress), run_id=self.run_id)

    async def asend(self, progress: Progress) -> None:
        if self.handlers:
            manager = AsyncCallbackManager(handlers=self.handlers, tags=self.tags, metadata=self.metadata)
            await manager.on_custom_event(PROGRESS_EVENT, self._data(progress), run_id=self.run_id)


@dataclass
class CallScope:
    """One ``stream``/``astream`` call: where its progress goes, and the token streams it started.

    LangChain's ``astream`` iterates ``_astream`` without closing it, so when a consumer closes the outer stream
    early the inner generator would only be finalised later by the event loop; closing the scope's streams on
    exit stops generation at once instead.
    """

    progress: ProgressEvents | None = None
    streams: list[TokenStream] = field(default_factory=list)
    open: bool = True  # a closed scope left current (interleaved generators) must not collect later streams

    def close(self) -> None:
        self.open = False
        for stream in self.streams:
            stream.close()

    async def aclose(self) -> None:
        self.open = False
        for stream in self.streams:
            stream.cancelled.set()  # at once, so the worker stops even while we wait for a thread below
            await asyncio.to_thread(stream.close)


_call_scope: ContextVar[CallScope | None] = ContextVar("lminf_call_scope", default=None)


def track(stream: TokenStream) -> TokenStream:
    """Register ``stream`` with the current call scope, if any, so that ending the call stops it."""
    scope = _call_scope.get()
    if scope is not None and scope.open:
        scope.streams.append(stream)
    return stream


def _scope_for(model: Any, config: RunnableConfig | None) -> tuple[RunnableConfig, CallScope]:
    """The config with a run id fixed in advance, and a call scope whose progress goes to that run (the base class
    makes its run manager with this run id and the same callbacks, but keeps it to itself)."""
    config = ensure_config(config)
    run_id = config.get("run_id") or uuid7()
    config["run_id"] = run_id
    manager = CallbackManager.configure(
        config.get("callbacks"),
        model.callbacks,
        model.verbose,
        config.get("tags"),
        model.tags,
        config.get("metadata"),
        model.metadata,
    )
    return config, CallScope(ProgressEvents(manager.handlers, run_id, manager.tags, manager.metadata))


def scoped(
    model: Any, chunks_for: Callable[[RunnableConfig], Iterator[T]], config: RunnableConfig | None
) -> Iterator[T]:
    config, scope = _scope_for(model, config)
    token = _call_scope.set(scope)
    try:
        yield from chunks_for(config)
    finally:
        _leave(token)
        scope.close()


async def ascoped(
    model: Any, chunks_for: Callable[[RunnableConfig], AsyncIterator[T]], config: RunnableConfig | None
) -> AsyncIterator[T]:
    config, scope = _scope_for(model, config)
    token = _call_scope.set(scope)
    try:
        chunks = cast("AsyncGenerator[T, None]", chunks_for(config))
        async with aclosing(chunks):
            async for chunk in chunks:
                yield chunk
    finally:
        _leave(token)
        await scope.aclose()


def _leave(token: Any) -> None:
    try:
        _call_scope.reset(token)
    except ValueError:  # a generator closed from another context (say garbage-collected elsewhere): nothing to undo
        pass
