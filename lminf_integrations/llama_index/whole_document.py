"""Answering over a whole document in as few LlamaIndex calls as fit: :func:`whole_document_setup`.

LlamaIndex decides how much text goes into one LLM call from ``llm.metadata.context_window``; with
:class:`~lminf_integrations.llama_index.LMInfiniteLLM` reporting a window far past the model's training length,
these components (the model's tokenizer, one node per document, no chunk overlap, prompt helpers sized from the
metadata) let a query engine send a whole book in one prompt instead of hundreds of refine calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import llama_index.core
from llama_index.core import Settings
from llama_index.core.indices.base import BaseIndex
from llama_index.core.indices.prompt_helper import ChatPromptHelper, PromptHelper
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.query_engine import BaseQueryEngine
from llama_index.core.response_synthesizers import BaseSynthesizer, ResponseMode, get_response_synthesizer

from .llms import LMInfiniteLLM

__all__ = ["WholeDocumentSetup", "whole_document_setup"]


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
        prompt helper with the global tokenizer and 10% chunk overlap). ``kwargs`` that
        ``get_response_synthesizer`` takes (``text_qa_template``, ``refine_template``, ``output_cls``...) go to the
        synthesizer, the rest to ``as_query_engine``, which ignores the synthesizer's once it is given one."""
        own = set(inspect.signature(get_response_synthesizer).parameters)
        synthesizer_kwargs = {name: value for name, value in kwargs.items() if name in own}
        rest = {name: value for name, value in kwargs.items() if name not in own}
        synthesizer = self.response_synthesizer(response_mode, streaming, **synthesizer_kwargs)
        return index.as_query_engine(llm=self.llm, response_synthesizer=synthesizer, **rest)

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
    tokenizer = llm.load().tokenize
    return WholeDocumentSetup(
        llm=llm,
        tokenizer=tokenizer,
        node_parser=SentenceSplitter(chunk_size=size, chunk_overlap=0, tokenizer=tokenizer),
        prompt_helper=PromptHelper.from_llm_metadata(meta, chunk_overlap_ratio=0.0, tokenizer=tokenizer),
        chat_prompt_helper=ChatPromptHelper.from_llm_metadata(meta, chunk_overlap_ratio=0.0, tokenizer=tokenizer),
    )
