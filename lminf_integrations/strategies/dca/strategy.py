"""``strategy="dca"``: Dual Chunk Attention (:mod:`.attention`) over a cache of every key (:mod:`.cache`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from ...config import DCAConfig
from ..base import Strategy, kv_bytes_per_token
from ..support import check_model
from .cache import DCACache
from .patch import DCA_LABEL, new_dca_cache, patch_dca


class DCA(Strategy):
    name = "dca"

    def __init__(self, config: DCAConfig) -> None:
        self.config = config

    def check(self, model: PreTrainedModel) -> None:
        check_model(model, DCA_LABEL)
        training_length = getattr(model.config, "max_position_embeddings", None)
        if training_length is None:
            raise ValueError(f"{type(model).__name__} does not say its training length (max_position_embeddings)")
        self.config.resolve(int(training_length))

    def prepare(self, model: PreTrainedModel) -> None:
        if getattr(model, "lminf_config", None) is not self.config:
            patch_dca(model, self.config)

    def new_cache(self, model: PreTrainedModel) -> DCACache:
        """An empty cache for the prepared ``model`` (keys at their chunk offsets)."""
        return new_dca_cache(model)

    def cache_bytes(self, model: PreTrainedModel, n_tokens: int) -> int:
        """Every key and value, as the model's own cache keeps them (inherent to DCA: every key stays visible)."""
        return model.config.num_hidden_layers * kv_bytes_per_token(model) * n_tokens

    def memory_hint(self) -> str:
        return "strategy='lm-infinite' with cache_mode='window' (constant memory)"

    def settings(self) -> dict[str, Any]:
        return self.config.settings()

    def identity(self) -> dict[str, Any]:
        return {"strategy": self.name, "dca": self.config.settings()}
