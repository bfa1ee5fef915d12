"""What a long-context strategy is to the engine: an attention for the model, a cache, and what that cache costs.

The engine, the adapters and the CLI know strategies only through :class:`Strategy` and the caches they make
(:class:`DocumentCache`), so a new strategy is a new subpackage registered in :mod:`lminf_integrations.strategies`.
"""

from __future__ import annotations

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
    (reported with the answer under the strategy's name)."""

    ids: list[int]
    details: dict[str, Any]


class Strategy(ABC):
    """How the engine runs a model over a prompt longer than it was trained on."""

    name: ClassVar[str]
    #: Whether a prefix encoded with :meth:`new_cache` is a document state that later prompts can continue (XL3M
    #: keeps its segments itself instead).
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

    def plan(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        ids: list[int],
        max_new_tokens: int,
        report: Callable[[int, int], None],
        question_tokens: int | None = None,
    ) -> Plan | None:
        """Another prompt to answer from (XL3M: the chosen segments and the question), or ``None``: this one.

        ``question_tokens``: how many tokens before the chat template's closing part are the question, when the
        caller knows (the command line does)."""
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
