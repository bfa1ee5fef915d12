"""LlamaIndex integration: :class:`LMInfiniteLLM` and helpers for answering over a whole document in one call.

LlamaIndex decides how much text goes into one LLM call from ``llm.metadata.context_window``. LM-Infinite has no
hard length limit (memory and time grow with the prompt, quality degrades gracefully), so the window reported here
is large and configurable instead of being capped at the model's training length; a query engine then packs a
whole book into a single prompt instead of hundreds of refine calls.

This module is a thin translation layer over :class:`~lminf_integrations.engine.Engine`; it is the only place
that imports ``llama_index``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import llama_index.core
from llama_index.core import Settings
from llama_index.core.base.llms.generic_utils import messages_to_prompt as generic_messages_to_prompt
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.indices.base import BaseIndex
from llama_index.core.indices.prompt_helper import ChatPromptHelper, PromptHelper
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.llm import default_completion_to_prompt
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import BaseQueryEngine
from llama_index.core.response_synthesizers import BaseSynthesizer, ResponseMode, get_response_synthesizer

from .config import CacheMode, LMInfiniteConfig
from .engine import Engine, GenerationSettings
from .settings import refuse_unknown
from .streaming import ProgressCallback, StreamResult, TokenStream, merge_stop

__all__ = ["DEFAULT_CONTEXT_WINDOW", "LMInfiniteLLM", "WholeDocumentSetup", "whole_document_setup"]

#: Tokens reported as the context window by default: about a 4-million-character book. Not a hard limit of
#: LM-Infinite (there is none); it only tells LlamaIndex how much to pack into one call.
DEFAULT_CONTEXT_WINDOW = 1_000_000

_CONFIG_FIELDS = ("n_global", "n_local", "distance_limit", "top_k", "top_k_from_layer", "cache", "chunk_size")
_LOAD_FIELDS = ("model_id", "dtype", "compile_decode")
_CALL_OVERRIDES = ("max_new_tokens", "temperature", "top_p", "seed", "stop")

# Chat-template roles for LlamaIndex roles that templates do not know.
_ROLE_ALIASES = {MessageRole.DEVELOPER: "system", MessageRole.CHATBOT: "assistant", MessageRole.MODEL: "assistant"}

_DEFAULT_CONFIG = LMInfiniteConfig()


class LMInfiniteLLM(CustomLLM):
    """A local Hugging Face causal LM with LM-Infinite attention, as a LlamaIndex LLM.

    Loads the model once per process per (model, dtype) (shared with the LangChain classes and the CLI), or
    wraps an existing :class:`~lminf_integrations.engine.Engine` passed as ``engine=``.

    Prompt formatting:

    * chat methods (and query engines, since ``is_chat_model`` is true) use the model's chat template unless a
      ``messages_to_prompt`` is given;
    * ``complete(prompt)`` sends the prompt as one user turn (after ``system_prompt``, if set) through the chat
      template unless a ``completion_to_prompt`` is given or ``chat_template_for_completions=False``;
      ``complete(prompt, formatted=True)`` sends the prompt verbatim.

    Per-call keyword arguments ``max_new_tokens``, ``temperature``, ``top_p`` and ``seed`` override the fields for
    that call; a per-call ``stop`` (a string or a list) adds to the ``stop`` field, as in the LangChain classes.

    Responses carry ``raw["usage"]`` (prompt/completion tokens) and ``stop_reason``; a stream ends with one chunk
    whose ``delta`` is ``""`` that carries them.
    """

    model_id: str | None = Field(default=None, description="Model to load: None (embedded default), hub id, path.")
    dtype: str | None = Field(default=None, description="'auto' (default), 'bf16', 'fp32' or 'fp16'.")
    compile_decode: bool = Field(
        default=False,
        description="Compile the decoding step, window cache: faster answers on CPU after a one-time compile "
        "(README: 'Decoding, eager vs compiled').",
    )
    n_global: int = Field(default=_DEFAULT_CONFIG.n_global, description="Leading tokens every query attends to.")
    n_local: int = Field(default=_DEFAULT_CONFIG.n_local, description="Local attention window.")
    distance_limit: int | None = Field(default=None, description="Distance used for global keys (None: n_local).")
    top_k: int = Field(default=_DEFAULT_CONFIG.top_k, description="Middle keys attended at generation (0: off).")
    top_k_from_layer: int = Field(default=_DEFAULT_CONFIG.top_k_from_layer, description="First top-k layer.")
    cache: CacheMode = Field(default=_DEFAULT_CONFIG.cache, description="'window' (constant memory) or 'full'.")
    chunk_size: int = Field(default=_DEFAULT_CONFIG.chunk_size, description="Prompt tokens per prefill forward.")
    max_new_tokens: int = Field(default=256, ge=1, description="Most tokens generated per call.")
    temperature: float = Field(default=0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (temperature > 0).")
    seed: int | None = Field(default=None, description="Sampling seed (temperature > 0).")
    stop: list[str] = Field(default_factory=list, description="Generation ends before any of these strings.")
    context_window: int = Field(
        default=DEFAULT_CONTEXT_WINDOW, ge=1, description="Tokens reported to LlamaIndex as the context window."
    )
    chat_template_for_completions: bool = Field(
        default=True, description="complete() wraps an unformatted prompt as a user turn of the chat template."
    )

    _engine: Engine = PrivateAttr()
    _on_progress: ProgressCallback | None = PrivateAttr(default=None)

    def __init__(
        self,
        *,
        engine: Engine | None = None,
        on_progress: ProgressCallback | None = None,
        **kwargs: Any,
    ) -> None:
        """Keyword arguments are the fields above plus LlamaIndex's (``system_prompt``, ``messages_to_prompt``...).

        Args:
            engine: an existing engine to use; then ``model_id``, ``dtype``, ``compile_decode`` and the LM-Infinite
                settings must not be given (they are read from the engine).
            on_progress: called as ``on_progress(done, total)`` while the prompt is encoded, in the consumer's
                thread (useful for long documents, whose encoding takes a while on a CPU).
        """
        refuse_unknown(kwargs, [*type(self).model_fields, "engine", "on_progress"], type(self).__name__)
        if isinstance(kwargs.get("model_id"), os.PathLike):
            kwargs["model_id"] = os.fspath(kwargs["model_id"])
        if engine is not None:
            clashing = sorted(set(kwargs) & {*_CONFIG_FIELDS, *_LOAD_FIELDS})
            if clashing:
                raise ValueError(f"pass either engine= or {', '.join(clashing)}, not both")
            # Mirror the engine's settings so the fields tell the truth.
            kwargs.update(engine.config.to_dict(), compile_decode=engine.compile_decode)
        super().__init__(**kwargs)
        self._engine = engine if engine is not None else self._load_engine()
        self._on_progress = on_progress

    def _load_engine(self) -> Engine:
        # LMInfiniteConfig validates the values; load_model shares one copy per (model, dtype) per process.
        config = LMInfiniteConfig(**{name: getattr(self, name) for name in _CONFIG_FIELDS})
        return Engine(self.model_id, config=config, dtype=self.dtype, compile_decode=self.compile_decode)

    @classmethod
    def class_name(cls) -> str:
        return "LMInfiniteLLM"

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self._engine.model_name,  # never empty: model_name() falls back to the class name
        )

    # ---- prompt formatting --------------------------------------------------------------------------------
    def _has_chat_template(self) -> bool:
        return bool(getattr(self._engine.tokenizer, "chat_template", None))

    def format_messages(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the model sees for ``messages``."""
        # LlamaIndex's validator replaces a missing messages_to_prompt with its generic one, so "the user gave
        # none" shows up as that exact function.
        custom = self.messages_to_prompt
        if custom is not None and (custom is not generic_messages_to_prompt or not self._has_chat_template()):
            return custom(messages)
        return self._engine.chat_prompt([_template_message(m) for m in messages])

    def format_completion(self, prompt: str, formatted: bool = False) -> str:
        """The prompt text the model sees for ``complete(prompt, formatted=formatted)``."""
        if formatted:
            return prompt
        custom = self.completion_to_prompt
        if custom is not None and custom is not default_completion_to_prompt:
            return custom(prompt)
        if self.chat_template_for_completions and self._has_chat_template():
            turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return self._engine.chat_prompt([*turns, {"role": "user", "content": prompt}])
        return f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt

    # ---- generation plumbing ------------------------------------------------------------------------------
    def _options(self, overrides: dict[str, Any]) -> _CallOptions:
        """Per-call settings, checked when the method is called (not at the first ``next()`` of a stream)."""
        unknown = sorted(set(overrides) - set(_CALL_OVERRIDES))
        if unknown:
            raise TypeError(f"unsupported keyword arguments {unknown}; per-call options are {list(_CALL_OVERRIDES)}")
        values = {name: overrides.get(name, getattr(self, name)) for name in _CALL_OVERRIDES if name != "stop"}
        return _CallOptions(GenerationSettings(**values), merge_stop(self.stop, overrides.get("stop")))

    def _start(self, prompt: str, options: _CallOptions) -> TokenStream:
        return self._engine.stream(prompt, options.settings, stop=options.stop, on_progress=self._on_progress)

    def _completions(self, prompt: str, options: _CallOptions) -> CompletionResponseGen:
        stream = self._start(prompt, options)
        with stream:  # closing stops generation if the consumer leaves early
            for delta in stream:
                yield CompletionResponse(text=stream.text, delta=delta)
        yield _final_completion(stream)

    async def _acompletions(self, prompt_fn: Callable[[], str], options: _CallOptions) -> CompletionResponseAsyncGen:
        # Formatting and tokenising a book-length prompt takes a noticeable time: keep it off the event loop.
        stream = await asyncio.to_thread(lambda: self._start(prompt_fn(), options))
        try:
            async for delta in stream:  # TokenStream waits for tokens in a worker thread
                yield CompletionResponse(text=stream.text, delta=delta)
        finally:
            await asyncio.to_thread(stream.close)
        yield _final_completion(stream)

    # ---- completion API -----------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return _last(self._completions(self.format_completion(prompt, formatted), self._options(kwargs)))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completions(self.format_completion(prompt, formatted), self._options(kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await _alast(
            self._acompletions(lambda: self.format_completion(prompt, formatted), self._options(kwargs))
        )

    # The callback decorators treat a coroutine function returning an async generator as a stream (events per
    # delta); an ``async def`` that itself yields would be mistaken for a plain call.
    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return self._acompletions(lambda: self.format_completion(prompt, formatted), self._options(kwargs))

    # ---- chat API (not via complete(): that would fire a second set of LLM events per call) -----------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat_response(_last(self._completions(self.format_messages(messages), self._options(kwargs))))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return (_chat_response(r) for r in self._completions(self.format_messages(messages), self._options(kwargs)))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return _chat_response(
            await _alast(self._acompletions(lambda: self.format_messages(messages), self._options(kwargs)))
        )

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _achat_responses(self._acompletions(lambda: self.format_messages(messages), self._options(kwargs)))


@dataclass(frozen=True)
class _CallOptions:
    settings: GenerationSettings
    stop: list[str]


def _template_message(message: ChatMessage) -> dict[str, str]:
    role = _ROLE_ALIASES.get(message.role, message.role.value)
    return {"role": role, "content": message.content or ""}


def _final_completion(stream: TokenStream) -> CompletionResponse:
    """The closing chunk: no new text, but the token counts LlamaIndex's token counter looks for."""
    result = stream.result or StreamResult(stop_reason="cancelled", text=stream.text)
    usage = {"prompt_tokens": result.input_tokens, "completion_tokens": result.output_tokens}
    return CompletionResponse(
        text=stream.text,
        delta="",
        raw={"usage": usage, "stop_reason": result.stop_reason},
        additional_kwargs={**usage, "stop_reason": result.stop_reason},
    )


def _chat_response(response: CompletionResponse) -> ChatResponse:
    return ChatResponse(
        message=ChatMessage(role=MessageRole.ASSISTANT, content=response.text),
        delta=response.delta,
        raw=response.raw,
        additional_kwargs=response.additional_kwargs,
    )


async def _achat_responses(completions: CompletionResponseAsyncGen) -> ChatResponseAsyncGen:
    async for response in completions:
        yield _chat_response(response)


def _last(responses: Iterator[CompletionResponse]) -> CompletionResponse:
    """A non-streaming response: the stream's closing chunk, which holds the whole text."""
    last = None
    for last in responses:  # noqa: B007 - only the final chunk matters
        pass
    assert last is not None
    return last.model_copy(update={"delta": None})


async def _alast(responses: AsyncIterator[CompletionResponse]) -> CompletionResponse:
    last = None
    async for last in responses:  # noqa: B007 - only the final chunk matters
        pass
    assert last is not None
    return last.model_copy(update={"delta": None})


# ---- whole-document answering -------------------------------------------------------------------------------
@dataclass(frozen=True)
class WholeDocumentSetup:
    """LlamaIndex components that send a whole document to :class:`LMInfiniteLLM` in as few calls as fit.

    Pass them explicitly (nothing global changes)::

        setup = whole_document_setup(llm)
        index = SummaryIndex.from_documents(docs, transformations=setup.transformations)
        engine = setup.query_engine(index, streaming=True)

    or, for code that only reads LlamaIndex's global ``Settings``, use ``with setup.as_global_settings(): ...``.
    """

    llm: LMInfiniteLLM
    tokenizer: Callable[[str], list[int]]
    node_parser: SentenceSplitter
    prompt_helper: PromptHelper
    chat_prompt_helper: ChatPromptHelper

    @property
    def transformations(self) -> list[SentenceSplitter]:
        """For ``SummaryIndex.from_documents(..., transformations=...)``."""
        return [self.node_parser]

    def response_synthesizer(
        self, response_mode: ResponseMode | str = ResponseMode.COMPACT, streaming: bool = False, **kwargs: Any
    ) -> BaseSynthesizer:
        return get_response_synthesizer(
            llm=self.llm,
            prompt_helper=self.prompt_helper,
            chat_prompt_helper=self.chat_prompt_helper,
            response_mode=ResponseMode(response_mode),
            streaming=streaming,
            **kwargs,
        )

    def query_engine(
        self,
        index: BaseIndex[Any],
        response_mode: ResponseMode | str = ResponseMode.COMPACT,
        streaming: bool = False,
        **kwargs: Any,
    ) -> BaseQueryEngine:
        """``index.as_query_engine`` with this LLM and prompt helper (``as_query_engine`` alone would build a
        prompt helper with the global tokenizer and 10% chunk overlap)."""
        synthesizer = self.response_synthesizer(response_mode, streaming)
        return index.as_query_engine(llm=self.llm, response_synthesizer=synthesizer, **kwargs)

    @contextmanager
    def as_global_settings(self) -> Iterator[None]:
        """Install llm, tokenizer, node parser and prompt helpers into ``Settings``; restored on exit.

        Restoring reads ``Settings``' private attributes: the public getters would build defaults (e.g. an OpenAI
        LLM) as a side effect.
        """
        names = ("_llm", "_node_parser", "_transformations", "_prompt_helper", "_chat_prompt_helper")
        saved = {name: getattr(Settings, name) for name in names}
        saved_tokenizer = llama_index.core.global_tokenizer
        try:
            Settings.llm = self.llm
            Settings.tokenizer = self.tokenizer
            Settings.node_parser = self.node_parser
            Settings.transformations = self.transformations  # type: ignore[assignment]
            Settings.prompt_helper = self.prompt_helper
            Settings.chat_prompt_helper = self.chat_prompt_helper
            yield
        finally:
            for name, value in saved.items():
                setattr(Settings, name, value)
            llama_index.core.global_tokenizer = saved_tokenizer


def whole_document_setup(llm: LMInfiniteLLM, chunk_size: int | None = None) -> WholeDocumentSetup:
    """Components for answering over whole documents with ``llm``.

    * token counting with the model's own tokenizer (LlamaIndex's global default counts GPT tokens);
    * a node parser whose chunks are as large as the context window allows (default: context window minus
      ``max_new_tokens``), so a document up to that size stays one node;
    * no chunk overlap anywhere, so no text is sent twice;
    * prompt helpers sized from ``llm.metadata``, so compact mode packs everything that fits into one call.
    """
    meta = llm.metadata
    size = chunk_size if chunk_size is not None else meta.context_window - meta.num_output
    if size < 1:
        raise ValueError(
            f"chunk_size must be >= 1 (context window {meta.context_window}, num_output {meta.num_output})"
        )
    tokenizer = llm.engine.tokenize
    return WholeDocumentSetup(
        llm=llm,
        tokenizer=tokenizer,
        node_parser=SentenceSplitter(chunk_size=size, chunk_overlap=0, tokenizer=tokenizer),
        prompt_helper=PromptHelper.from_llm_metadata(meta, chunk_overlap_ratio=0.0, tokenizer=tokenizer),
        chat_prompt_helper=ChatPromptHelper.from_llm_metadata(meta, chunk_overlap_ratio=0.0, tokenizer=tokenizer),
    )
