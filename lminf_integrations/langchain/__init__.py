"""LangChain integration: :class:`LMInfiniteLLM` (text completion) and :class:`ChatLMInfinite` (chat).

Both run a local Hugging Face model with LM-Infinite attention through :class:`~lminf_integrations.engine.Engine`,
so a whole document fits in one prompt. This package is the only one that imports LangChain, and it only
translates: settings, loading, per-call options, progress and usage come from
:mod:`lminf_integrations.adapter_base`, shared with the LlamaIndex class.

* text deltas become ``GenerationChunk``/``ChatGenerationChunk`` objects;
* encoding progress becomes ``lminf_progress`` custom events on the run (:mod:`.callbacks`);
* the async methods iterate the stream with ``async for``: tokens are produced on the model thread and awaited
  without blocking the event loop.
"""

from .callbacks import PROGRESS_EVENT
from .chat_models import ChatLMInfinite, messages_to_chat
from .llms import LMInfiniteLLM

__all__ = ["PROGRESS_EVENT", "ChatLMInfinite", "LMInfiniteLLM", "messages_to_chat"]
