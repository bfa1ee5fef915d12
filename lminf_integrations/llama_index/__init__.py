"""LlamaIndex integration: :class:`LMInfiniteLLM` (:mod:`.llms`), and :func:`whole_document_setup`
(:mod:`.whole_document`) for answering over a whole document in one call. The only package that imports
``llama_index``."""

from .llms import DEFAULT_CONTEXT_WINDOW, LMInfiniteLLM
from .whole_document import WholeDocumentSetup, whole_document_setup

__all__ = ["DEFAULT_CONTEXT_WINDOW", "LMInfiniteLLM", "WholeDocumentSetup", "whole_document_setup"]
