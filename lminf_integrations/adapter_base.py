"""What the LangChain and LlamaIndex classes share: their settings fields, the ``engine=`` rule, loading, one call's
settings and stream, progress, usage, and the rule for chat messages.

Framework-free (pydantic only, which both frameworks build on): each adapter mixes :class:`LMInfiniteFields` into
its framework's base class and only translates its framework's types to and from these.

The ``engine=`` rule: an :class:`~lminf_integrations.engine.Engine` carries its loaded model and the settings it
was built with (model, dtype, attention, compiled decoding), so giving any of those alongside ``engine=`` is an
error naming them; the fields then report the engine's own values. Generation and display settings may be given
with it as with any instance.
"""

from __future__ import annotations

import asyncio
import os
import threading
import typing
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Sequence
from contextlib import aclosing, closing
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, model_validator

from .config import GenerationSettings, LMInfiniteConfig
from .engine import Engine
from .models import DEFAULT_MODEL_NAME
from .settings import (
    BY_NAME,
    ENGINE_GROUPS,
    GROUPS,
    SETTINGS,
    Resolved,
    canonical,
    describe,
    for_call,
    in_groups,
    resolve,
)
from .streaming import Progress, ProgressCallback, StreamResult, TerminalProgress, TokenStream


class _Config(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, protected_namespaces=())


# One pydantic field per declared setting: name, type, default and description all come from the declaration.
_DeclaredFields: Any = create_model(  # type: ignore[call-overload] # made at run time: type checkers see Any
    "_DeclaredFields",
    __base__=_Config,
    **{s.name: (s.annotation, Field(default=s.default, description=s.help)) for s in SETTINGS},
)


def _takes_bool(annotation: Any) -> bool:
    return annotation is bool or bool in typing.get_args(annotation)


class LMInfiniteFields(_DeclaredFields):  # type: ignore[misc]
    """The declared settings as fields, plus ``engine=`` and ``on_progress=``, and the calls both adapters make."""

    engine: Engine | None = Field(default=None, exclude=True)
    """An already-built engine to use (see the module docstring for what may be given with it)."""
    on_progress: ProgressCallback | None = Field(default=None, exclude=True)
    """Called as ``on_progress(done, total)`` while a prompt is encoded, in the caller's thread."""

    _loaded: Engine | None = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    #: Names a framework's generic code passes to every model and that mean nothing here (accepted, dropped).
    _ignored_names: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _canonical_names(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = {name: value for name, value in values.items() if name not in cls._ignored_names}
        values = canonical(values, cls.model_fields, cls.__name__)
        for name, value in values.items():
            if isinstance(value, bool) and name in BY_NAME and not _takes_bool(BY_NAME[name].annotation):
                # pydantic would take True as 1 (n_local=True: a one-token window, silently)
                annotation = BY_NAME[name].annotation
                kind = annotation.__name__ if isinstance(annotation, type) else str(annotation)
                raise ValueError(f"{name}={value!r}: {name} takes {kind}, not a bool")
        if isinstance(values.get("stop"), str):  # one stop string, as a call takes it
            values["stop"] = (values["stop"],)
        if isinstance(values.get("model_id"), os.PathLike):
            values["model_id"] = os.fspath(values["model_id"])
        return values

    @model_validator(mode="after")
    def _check_settings(self) -> Any:
        if self.engine is not None:
            fixed = sorted(
                name for name in self.model_fields_set if getattr(BY_NAME.get(name), "group", "") in ENGINE_GROUPS
            )
            if fixed:
                raise ValueError(
                    f"pass either engine= or {', '.join(fixed)}, not both: an engine is built with its model and "
                    f"settings; build one with them instead: Engine.from_settings(resolve({{'{fixed[0]}': ...}})) "
                    "(resolve from lminf_integrations.settings)"
                )
            values = {**asdict(self.engine.options), **self.engine.strategy.settings()}
            for name, value in values.items():
                self.__dict__[name] = value  # report the engine's own values, not the defaults
        self.lminf_settings  # noqa: B018 - bad values fail at construction, not at the first call
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        """A setting assigned after construction is checked as at construction; one the engine fixes (model,
        strategy, attention...) is refused once the engine is built: it would not change the engine, only what the
        field (and traces, and cache keys) report."""
        setting = BY_NAME.get(name)
        if setting is None:
            super().__setattr__(name, value)
            return
        if setting.group in ENGINE_GROUPS and (self.engine is not None or self._loaded is not None):
            raise ValueError(
                f"{name} is fixed once the engine is built (it holds the loaded, prepared model); make a new "
                f"{type(self).__name__}({name}=...) instead"
            )
        previous = getattr(self, name)
        super().__setattr__(name, value)
        try:
            self.lminf_settings  # noqa: B018 - the same checks as at construction
        except ValueError:
            super().__setattr__(name, previous)
            raise

    # ---- settings ----------------------------------------------------------------------------------------------
    @property
    def lminf_settings(self) -> Resolved:
        """Every declared setting of this instance, validated into the engine's dataclasses."""
        values = {setting.name: getattr(self, setting.name) for setting in SETTINGS}
        return resolve(values, refuse_switched_off=self.engine is None)  # an engine's own settings are as built

    @property
    def lminf_config(self) -> LMInfiniteConfig:
        """The LM-Infinite attention settings."""
        return self.lminf_settings.config

    def lminf_params(self) -> dict[str, Any]:
        """The model's name and every setting but ``progress``, for tracing and identifying parameters."""
        values = {s.name: getattr(self, s.name) for s in SETTINGS if s.group != "display"}
        return {"model_name": self.model_name, **values, "stop": list(self.stop)}

    # ---- the engine --------------------------------------------------------------------------------------------
    def load(self) -> Engine:
        """The engine, loading the model now if needed (otherwise the first call does).

        Instances naming the same model and dtype share one loaded copy.
        """
        if self.engine is not None:
            return self.engine
        with self._load_lock:
            if self._loaded is None:
                self._loaded = Engine.from_settings(self.lminf_settings)
            return self._loaded

    async def aload(self) -> Engine:
        """:meth:`load` without blocking the event loop (loading takes seconds)."""
        loaded = self.engine or self._loaded
        return loaded if loaded is not None else await asyncio.to_thread(self.load)

    @property
    def model_name(self) -> str:
        """The model's display name, known without loading it."""
        loaded = self.engine or self._loaded
        if loaded is not None:
            return loaded.model_name
        if self.model_id is None:
            return DEFAULT_MODEL_NAME
        return Path(self.model_id).name if self.model_id.endswith(".gguf") else str(self.model_id)

    # ---- one call ----------------------------------------------------------------------------------------------
    def call_settings(self, overrides: dict[str, Any], strict: bool = True) -> GenerationSettings:
        """This instance's generation settings with a call's keyword arguments applied (see :func:`for_call`)."""
        return for_call(self.lminf_settings.generation, overrides, type(self).__name__, strict)

    def start(self, engine: Engine, prompt: str, settings: GenerationSettings) -> TokenStream:
        """Start generating; tokens are produced on the model thread until the stream is read or closed."""
        return engine.stream(prompt, settings, on_progress=self.on_progress)

    def deltas(self, stream: TokenStream, sink: Callable[[Progress], None] | None = None) -> Generator[str, None, None]:
        """The stream's text deltas; progress goes to the terminal bar and ``sink``. Closing stops generation."""
        bar = TerminalProgress(enabled=self.progress)
        try:
            with closing(stream.events()) as events:
                for item in events:
                    if isinstance(item, Progress):
                        self._report(bar, item)
                        if sink is not None:
                            sink(item)
                    else:
                        yield item
        finally:
            bar.close()
            stream.close()

    async def adeltas(
        self, stream: TokenStream, sink: Callable[[Progress], Awaitable[None]] | None = None
    ) -> AsyncGenerator[str, None]:
        """Async :meth:`deltas`: waiting for the next token never blocks the event loop."""
        bar = TerminalProgress(enabled=self.progress)
        try:
            async with aclosing(stream.aevents()) as events:
                async for item in events:
                    if isinstance(item, Progress):
                        self._report(bar, item)
                        if sink is not None:
                            await sink(item)
                    else:
                        yield item
        finally:
            bar.close()
            await asyncio.to_thread(stream.close)

    def _report(self, bar: TerminalProgress, progress: Progress) -> None:
        """Progress to the terminal bar and ``on_progress`` (``events()`` yields it instead of calling it)."""
        bar(progress.done, progress.total)
        if self.on_progress is not None:
            self.on_progress(progress.done, progress.total)

    def result_metadata(self, result: StreamResult | None) -> dict[str, Any]:
        """What both frameworks report about a finished answer besides its usage."""
        reason = result.stop_reason if result is not None else "cancelled"
        details = (result.details if result is not None else None) or {}
        return {"model_name": self.model_name, "finish_reason": reason, **details}


# ---- chat messages: one rule for both frameworks -----------------------------------------------------------------
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
    "chatbot": "assistant",
    "model": "assistant",
}


def chat_turn(
    role: str, content: str | Sequence[Any], owner: str, tool_calls: bool = False, what: str = ""
) -> dict[str, str]:
    """One message as ``{"role", "content"}`` for a chat template.

    ``content`` is text or a list of blocks: strings or ``{"type": ..., "text": ...}`` dicts; ``what`` names the
    message in errors (``"a ToolMessage"``).

    Raises:
        ValueError: for roles other than system/user/assistant (and their aliases), assistant messages carrying
            tool calls, and content blocks that are not text: the model reads text only and calls no tools, and
            dropping such content silently would answer a question the user did not ask.
    """
    if role not in _ROLES:
        raise ValueError(
            f"{owner} cannot send {what or 'a message'} with role {role!r} to the model: only system, user and "
            "assistant messages are "
            "supported (this local model has no tool or function calling)"
        )
    if tool_calls:
        raise ValueError(f"{owner} has no tool calling: assistant messages with tool calls cannot be sent")
    if isinstance(content, str):
        return {"role": _ROLES[role], "content": content}
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text") or ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"{owner} reads text only; cannot send a {kind!r} content block to the model")
    return {"role": _ROLES[role], "content": "".join(parts)}


def settings_docstring(groups: Sequence[str] = GROUPS) -> str:
    """The settings sections shared by every adapter class docstring, rendered from the declaration."""
    titles = {
        "model": "model",
        "strategy": "strategy",
        "encoding": "encoding (every strategy)",
        "attention": "LM-Infinite attention (strategy='lm-infinite')",
        "xl3m": "XL3M segment selection (strategy='xl3m')",
        "dca": "Dual Chunk Attention (strategy='dca')",
        "decoding": "decoding",
        "generation": "generation (also per call)",
        "display": "display",
    }
    sections = [f"    Key init args — {titles[group]}:\n{describe([group])}" for group in groups if in_groups(group)]
    return "\n\n".join(sections)
