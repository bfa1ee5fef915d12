"""LlamaIndex LLM: :class:`LMInfiniteLLM`.

LlamaIndex decides how much text goes into one LLM call from ``llm.metadata.context_window``. LM-Infinite has no
hard length limit (memory and time grow with the prompt, quality degrades gracefully), so the window reported here
is large and configurable instead of being capped at the model's training length.

This module only translates: settings, loading, per-call options, progress, usage and the message rule come from
:mod:`lminf_integrations.adapter_base`, shared with LangChain.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import closing
from typing import Any

from llama_index.core.base.llms.generic_utils import (
    astream_completion_response_to_chat_response,
    completion_response_to_chat_response,
    stream_completion_response_to_chat_response,
)
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
)
from llama_index.core.bridge.pydantic import Field
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.llm import default_completion_to_prompt

from ..adapter_base import LMInfiniteFields, chat_turn, settings_docstring
from ..config import GenerationSettings
from ..streaming import TokenStream

__all__ = ["DEFAULT_CONTEXT_WINDOW", "LMInfiniteLLM"]

#: Tokens reported as the context window by default: about a 4-million-character book. Not a hard limit of
#: LM-Infinite (there is none); it only tells LlamaIndex how much to pack into one call.
DEFAULT_CONTEXT_WINDOW = 1_000_000


class LMInfiniteLLM(LMInfiniteFields, CustomLLM):
    context_window: int = Field(
        default=DEFAULT_CONTEXT_WINDOW, ge=1, description="Tokens reported to LlamaIndex as the context window."
    )
    chat_template_for_completions: bool = Field(
        default=True, description="complete() wraps an unformatted prompt as a user turn of the chat template."
    )

    @classmethod
    def class_name(cls) -> str:
        return "LMInfiniteLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.model_name,
        )

    # ---- prompt formatting --------------------------------------------------------------------------------
    def _has_chat_template(self) -> bool:
        return bool(getattr(self.load().tokenizer, "chat_template", None))

    def format_messages(self, messages: Sequence[ChatMessage]) -> str:
        """The prompt text the model sees for ``messages``."""
        # LlamaIndex's validator replaces a missing messages_to_prompt with its generic one, so "the user gave
        # none" shows up as that exact function.
        custom = self.messages_to_prompt
        if custom is not None and (custom is not generic_messages_to_prompt or not self._has_chat_template()):
            return custom(messages)
        return self.load().chat_prompt([_turn(message) for message in messages])

    def format_completion(self, prompt: str, formatted: bool = False) -> str:
        """The prompt text the model sees for ``complete(prompt, formatted=formatted)``."""
        if formatted:
            return prompt
        custom = self.completion_to_prompt
        if custom is not None and custom is not default_completion_to_prompt:
            return custom(prompt)
        if self.chat_template_for_completions and self._has_chat_template():
            turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            return self.load().chat_prompt([*turns, {"role": "user", "content": prompt}])
        return f"{self.system_prompt}\n\n{prompt}" if self.system_prompt else prompt

    # ---- generation plumbing: the call's settings are checked when the method is called, not at the first
    # ``next()`` of a stream -------------------------------------------------------------------------------------
    def _completions(self, prompt_for: Callable[[], str], settings: GenerationSettings) -> CompletionResponseGen:
        stream = self.start(self.load(), prompt_for(), settings)
        with closing(self.deltas(stream)) as deltas:  # closing stops generation if the consumer leaves early
            for delta in deltas:
                yield CompletionResponse(text=stream.text, delta=delta)
        yield self._final(stream)

    async def _acompletions(
        self, prompt_for: Callable[[], str], settings: GenerationSettings
    ) -> CompletionResponseAsyncGen:
        engine = await self.aload()
        # Formatting and tokenising a book-length prompt takes a noticeable time: keep it off the event loop.
        stream = await asyncio.to_thread(lambda: self.start(engine, prompt_for(), settings))
        deltas = self.adeltas(stream)
        try:
            async for delta in deltas:
                yield CompletionResponse(text=stream.text, delta=delta)
        finally:
            await deltas.aclose()
        yield self._final(stream)

    def _final(self, stream: TokenStream) -> CompletionResponse:
        """The closing chunk: no new text; the usage (which LlamaIndex's token counter reads), model and reason."""
        info = self.result_metadata(stream.result)
        usage = stream.result.usage() if stream.result is not None else {}
        return CompletionResponse(
            text=stream.text, delta="", raw={**info, "usage": usage}, additional_kwargs={**info, **usage}
        )

    # ---- completion API -----------------------------------------------------------------------------------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        settings = self.call_settings(kwargs)
        return _last(self._completions(lambda: self.format_completion(prompt, formatted), settings))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._completions(lambda: self.format_completion(prompt, formatted), self.call_settings(kwargs))

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        settings = self.call_settings(kwargs)
        return await _alast(self._acompletions(lambda: self.format_completion(prompt, formatted), settings))

    # The callback decorators treat a coroutine function returning an async generator as a stream (events per
    # delta); an ``async def`` that itself yields would be mistaken for a plain call.
    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return self._acompletions(lambda: self.format_completion(prompt, formatted), self.call_settings(kwargs))

    # ---- chat API (not via complete(): that would fire a second set of LLM events per call) -----------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        settings = self.call_settings(kwargs)
        return completion_response_to_chat_response(
            _last(self._completions(lambda: self.format_messages(messages), settings))
        )

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        responses = self._completions(lambda: self.format_messages(messages), self.call_settings(kwargs))
        return stream_completion_response_to_chat_response(responses)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        settings = self.call_settings(kwargs)
        responses = self._acompletions(lambda: self.format_messages(messages), settings)
        return completion_response_to_chat_response(await _alast(responses))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        responses = self._acompletions(lambda: self.format_messages(messages), self.call_settings(kwargs))
        return astream_completion_response_to_chat_response(responses)


LMInfiniteLLM.__doc__ = f"""A local Hugging Face causal LM with LM-Infinite attention, as a LlamaIndex LLM.

    The model loads at the first call, once per process per (model, dtype), shared with the LangChain classes and
    the CLI; or pass ``engine=Engine(...)`` (model, dtype, attention and decoding settings then come from it, and
    giving them too is an error). ``on_progress=lambda done, total: ...`` reports prompt encoding.

    Prompt formatting:

    * chat methods (and query engines, since ``is_chat_model`` is true) use the model's chat template unless a
      ``messages_to_prompt`` is given; tool messages, tool calls and non-text blocks raise ``ValueError``;
    * ``complete(prompt)`` sends the prompt as one user turn (after ``system_prompt``, if set) through the chat
      template unless a ``completion_to_prompt`` is given or ``chat_template_for_completions=False``;
      ``complete(prompt, formatted=True)`` sends the prompt verbatim.

    The generation settings may also be given per call; a call's ``stop`` (a string or a list) adds to the field's.
    Responses carry ``raw["usage"]`` (input/output/total tokens), ``raw["model_name"]`` and
    ``raw["finish_reason"]``; a stream ends with one chunk whose ``delta`` is ``""`` that carries them.

{settings_docstring()}
"""


def _turn(message: ChatMessage) -> dict[str, str]:
    blocks = [{"type": block.block_type, "text": getattr(block, "text", None)} for block in message.blocks]
    tool_calls = bool(message.additional_kwargs.get("tool_calls"))
    return chat_turn(message.role.value, blocks, "LMInfiniteLLM", tool_calls)


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
