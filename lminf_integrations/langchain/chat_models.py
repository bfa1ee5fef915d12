"""LangChain chat: :class:`ChatLMInfinite`, and LangChain messages as chat-template turns."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import aclosing, closing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.chat_models import agenerate_from_stream, generate_from_stream
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    HumanMessageChunk,
    SystemMessage,
    SystemMessageChunk,
    UsageMetadata,
)
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from ..adapter_base import chat_turn
from ..engine import Engine
from ..streaming import TokenStream
from .base import MODEL_CONFIG, LangChainBase, class_docstring

_ROLES = {SystemMessage: "system", HumanMessage: "user", AIMessage: "assistant"}
_ROLES.update({SystemMessageChunk: "system", HumanMessageChunk: "user", AIMessageChunk: "assistant"})


def messages_to_chat(messages: Sequence[BaseMessage], owner: str = "ChatLMInfinite") -> list[dict[str, str]]:
    """LangChain messages as ``[{"role": ..., "content": ...}]`` for a chat template (rules: ``chat_turn``).

    Raises:
        ValueError: for tool/function messages, AI messages with tool calls, or non-text content.
    """
    turns = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(type(message), message.type)
        tool_calls = isinstance(message, AIMessage) and bool(message.tool_calls)
        turns.append(chat_turn(role, message.content, owner, tool_calls, f"a {type(message).__name__}"))
    return turns


class ChatLMInfinite(LangChainBase, BaseChatModel):
    model_config = MODEL_CONFIG

    streaming: bool = False
    """Whether ``invoke`` streams internally (token callbacks fire as tokens arrive)."""

    @property
    def _llm_type(self) -> str:
        return "lminf-chat"

    def get_num_tokens_from_messages(self, messages: list[BaseMessage], tools: Sequence[Any] | None = None) -> int:
        """Tokens of the whole templated prompt, including the template's markup and the assistant header."""
        if tools:
            raise ValueError("ChatLMInfinite has no tool calling, so it cannot count tokens for tools")
        engine = self.load()
        return engine.count_tokens(engine.chat_prompt(messages_to_chat(messages)))

    def _open_chat(
        self, engine: Engine, messages: list[BaseMessage], stop: list[str] | None, kwargs: Any
    ) -> TokenStream:
        return self._open(engine, engine.chat_prompt(messages_to_chat(messages)), stop, kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))

    # No on_llm_new_token in the streams: BaseChatModel.stream (and invoke when streaming) sends one per chunk.
    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        stream = self._open_chat(self.load(), messages, stop, kwargs)
        with closing(self._texts(stream, run_manager)) as deltas:
            for delta in deltas:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        yield self._last_chunk(stream)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        engine = await self.aload()
        stream = await asyncio.to_thread(self._open_chat, engine, messages, stop, kwargs)
        async with aclosing(self._atexts(stream, run_manager)) as deltas:
            async for delta in deltas:
                yield ChatGenerationChunk(message=AIMessageChunk(content=delta))
        yield self._last_chunk(stream)

    def _last_chunk(self, stream: TokenStream) -> ChatGenerationChunk:
        """The closing chunk: no text, the usage counts and metadata (sent once, so merging counts them once)."""
        assert stream.result is not None, "the stream ended without a result"
        message = AIMessageChunk(
            content="",
            chunk_position="last",
            usage_metadata=UsageMetadata(**stream.result.usage()),  # type: ignore[typeddict-item]
            response_metadata=self.result_metadata(stream.result),
        )
        return ChatGenerationChunk(message=message)


ChatLMInfinite.__doc__ = class_docstring(
    "Chat with a local Hugging Face model and LM-Infinite attention (whole documents in one prompt).",
    "Messages are rendered with the model's own chat template. System, human and AI messages are supported, in any "
    "order the template accepts; tool, function and multimodal messages raise `ValueError` (a text-only local "
    "model without tool calling). Results carry `usage_metadata` (input/output/total tokens) and "
    '`response_metadata["model_name"]` and `["finish_reason"]` (`"eos"`, `"length"` or `"stop"`).',
    "ChatLMInfinite",
    'messages = [("system", "Answer from the document only."), ("human", f"{document}\\n\\nWho is it?")]',
    "chunk.content",
)
