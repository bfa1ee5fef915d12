"""What a long-context strategy is to the engine: an attention for the model, a cache, and what that cache costs.

The engine, the adapters and the CLI know strategies only through :class:`Strategy` and the caches they make
(:class:`DocumentCache`), so a new strategy is a new subpackage registered in :mod:`lminf_integrations.strategies`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


class DocumentCache(Protocol):
    """A transformers ``Cache`` that can also be measured, copied and saved (what document states need)."""

    def nbytes(self) -> int: ...

    def clone(self) -> DocumentCache: ...

    def state_tensors(self) -> tuple[dict[str, torch.Tensor], list[dict[str, int | None]]]: ...

    def load_state_tensors(
        self, tensors: dict[str, torch.Tensor], layers: Sequence[Mapping[str, int | None]]
    ) -> None: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


@dataclass(frozen=True)
class Plan:
    """What a prompt-level strategy answers from instead of the prompt: other token ids, and what it chose
    (reported with the answer under the strategy's name); optionally a cache of ``ids[:prefix_length]`` already
    read, which the answer continues (a copy: the engine writes into it)."""

    ids: list[int]
    details: dict[str, Any]
    prefix_cache: DocumentCache | None = None
    prefix_length: int = 0


class Strategy(ABC):
    """How the engine runs a model over a prompt longer than it was trained on."""

    name: ClassVar[str]
    #: Whether a document state is a prefix encoded with :meth:`new_cache` that later prompts continue; ``False``
    #: for a strategy that reads documents its own way (:meth:`read_document`; XL3M: in segments).
    continues_states: ClassVar[bool] = True

    def check(self, model: PreTrainedModel) -> None:  # noqa: B027 - an optional hook: nothing to check by default
        """Refuse settings this model cannot run (``ValueError``); called once when an engine is built."""

    @abstractmethod
    def prepare(self, model: PreTrainedModel) -> None:
        """Make ``model`` run this strategy's attention (called, under the model's lock, before each use: engines
        with other strategies may share the model)."""

    @abstractmethod
    def new_cache(self, model: PreTrainedModel) -> DocumentCache:
        """An empty cache for a prepared ``model``."""

    @abstractmethod
    def cache_bytes(self, model: PreTrainedModel, n_tokens: int) -> int:
        """Bytes the cache takes after ``n_tokens`` tokens (checked against free memory before encoding)."""

    def memory_hint(self) -> str:
        """What to change when the cache would not fit (completes "use ..., a smaller document, ...")."""
        return "strategy='lm-infinite' with cache_mode='window'"

    def set_prompt_length(self, cache: DocumentCache, prompt_length: int) -> None:  # noqa: B027 - optional hook
        """Told before encoding and before generation how long the prompt is (tokens of the prompt, not answer)."""

    def allow_compiled_steps(self, cache: DocumentCache, allowed: bool) -> bool:
        """Allow compiled decoding steps on ``cache`` (or not); whether it supports them at all."""
        return False

    def new_document_cache(self, model: PreTrainedModel) -> DocumentCache:
        """An empty cache of the kind :meth:`read_document` returns (a saved state is loaded into it)."""
        return self.new_cache(model)

    def read_document(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        report: Callable[[int, int], None],
    ) -> DocumentCache:
        """A document's state, for a strategy that does not continue prefixes (``continues_states`` false)."""
        raise NotImplementedError(f"strategy {self.name!r} encodes prefixes with new_cache()")

    def plan(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        max_new_tokens: int,
        report: Callable[[int, int], None],
        question_tokens: int | None = None,
        state: DocumentCache | None = None,
        scored_tokens: int | None = None,
        stop: threading.Event | None = None,
    ) -> Plan | None:
        """Another prompt to answer from (XL3M: the chosen segments and the question), or ``None``: this one.

        ``question_tokens``: how many tokens before the chat template's closing part are the question, when the
        caller knows (the command line does), and ``scored_tokens`` how many of those are the question itself (not
        an instruction before it). ``state``: what :meth:`read_document` returned for a prefix of ``ids``, for a
        strategy that does not continue prefixes. ``stop``: set once the caller no longer wants the answer (a
        closed stream); a strategy that plans at length raises :class:`~lminf_integrations.model_thread.Cancelled`
        at its next step then."""
        return None

    def settings(self) -> dict[str, Any]:
        """This strategy's own settings by name (the fields an adapter wrapping the engine reports)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What a saved state must match to be used with this strategy (its name and settings)."""
        return {"strategy": self.name}


def kv_bytes_per_token(model: PreTrainedModel) -> int:
    """Bytes of keys and values one token takes in one layer."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize
