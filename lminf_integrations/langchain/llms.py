"""LangChain text completion: :class:`LMInfiniteLLM`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, closing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from ..streaming import TokenStream
from .base import MODEL_CONFIG, LangChainBase, class_docstring


class LMInfiniteLLM(LangChainBase, LLM):
    model_config = MODEL_CONFIG

    @property
    def _llm_type(self) -> str:
        return "lminf-llm"

    def _call(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join(chunk.text for chunk in self._stream(prompt, stop, run_manager, **kwargs))

    async def _acall(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> str:
        return "".join([chunk.text async for chunk in self._astream(prompt, stop, run_manager, **kwargs)])

    def _generate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        # LLM's own _generate keeps only _call's text: the stream's closing chunk (finish reason, usage) would be lost.
        chunks = [list(self._stream(prompt, stop, run_manager, **kwargs)) for prompt in prompts]
        return LLMResult(generations=[[_generation(answer)] for answer in chunks])

    async def _agenerate(
        self,
        prompts: list[str],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> LLMResult:
        generations = []
        for prompt in prompts:
            answer = [chunk async for chunk in self._astream(prompt, stop, run_manager, **kwargs)]
            generations.append([_generation(answer)])
        return LLMResult(generations=generations)

    def _stream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[GenerationChunk]:
        stream = self._open(self.load(), prompt, stop, kwargs)
        with closing(self._texts(stream, run_manager)) as deltas:
            for delta in deltas:
                chunk = GenerationChunk(text=delta)
                # BaseLLM.stream does not report tokens itself: this is the one on_llm_new_token per chunk.
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        last = self._last_chunk(stream)
        if run_manager is not None:
            run_manager.on_llm_new_token("", chunk=last)
        yield last

    async def _astream(
        self,
        prompt: str,
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[GenerationChunk]:
        engine = await self.aload()
        stream = await asyncio.to_thread(self._open, engine, prompt, stop, kwargs)
        async with aclosing(self._atexts(stream, run_manager)) as deltas:
            async for delta in deltas:
                chunk = GenerationChunk(text=delta)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        last = self._last_chunk(stream)
        if run_manager is not None:
            await run_manager.on_llm_new_token("", chunk=last)
        yield last

    def _last_chunk(self, stream: TokenStream) -> GenerationChunk:
        """The closing chunk: no text; the finish reason, model name and usage (also what an empty answer needs:
        ``LLM.stream`` wants at least one chunk)."""
        info = self.result_metadata(stream.result)
        if stream.result is not None:
            info["usage"] = stream.result.usage()
        return GenerationChunk(text="", generation_info=info)


def _generation(chunks: list[GenerationChunk]) -> Generation:
    """One answer's chunks as one generation: the text, and the closing chunk's ``generation_info``."""
    return Generation(text="".join(chunk.text for chunk in chunks), generation_info=chunks[-1].generation_info)


LMInfiniteLLM.__doc__ = class_docstring(
    "Text completion with a local Hugging Face model and LM-Infinite attention (whole documents in one prompt).",
    "The prompt is continued as plain text (no chat template); the output never includes the prompt. A stream "
    'ends with an empty chunk whose `generation_info` holds `finish_reason` (`"eos"`, `"length"`, `"stop"`), '
    "`model_name` and `usage` (input/output/total tokens).",
    "LMInfiniteLLM",
    'prompt = f"{document}\\n\\nThe narrator is"',
    "chunk",
)
