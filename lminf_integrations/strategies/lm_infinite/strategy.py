"""``strategy="lm-infinite"``: Λ-shaped attention (:mod:`.attention`) over a bounded cache (:mod:`.cache`)."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel

from ...config import LMInfiniteConfig
from ..base import DocumentCache, Strategy, kv_bytes_per_token
from ..support import check_model
from .cache import LambdaCache
from .patch import new_cache, patch_model


class LMInfinite(Strategy):
    name = "lm-infinite"

    def __init__(self, config: LMInfiniteConfig) -> None:
        self.config = config

    def check(self, model: PreTrainedModel) -> None:
        check_model(model, "LM-Infinite")
        self.config.check_against_model(
            getattr(model.config, "max_position_embeddings", None), model.config.num_hidden_layers
        )

    def prepare(self, model: PreTrainedModel) -> None:
        if getattr(model, "lminf_config", None) is not self.config:
            patch_model(model, self.config)

    def new_cache(self, model: PreTrainedModel) -> LambdaCache:
        return new_cache(model)

    def cache_bytes(self, model: PreTrainedModel, n_tokens: int) -> int:
        """Window mode keeps ``n_global + n_local`` keys per layer whatever ``n_tokens``; full mode keeps every key
        (and, in top-k layers, the middle keys rotated to position 0 once more)."""
        cfg, per_token = self.config, kv_bytes_per_token(model)
        layers = model.config.num_hidden_layers
        if cfg.cache_mode == "window":
            return layers * per_token * (cfg.n_local + cfg.n_global)
        middle_layers = max(0, layers - cfg.top_k_from_layer) if cfg.top_k > 0 else 0
        return (layers * per_token + middle_layers * per_token // 2) * (n_tokens + cfg.n_global)

    def memory_hint(self) -> str:
        return "cache_mode='window'" if self.config.cache_mode == "full" else "a machine with more memory"

    def set_prompt_length(self, cache: DocumentCache, prompt_length: int) -> None:
        assert isinstance(cache, LambdaCache)
        cache.set_prompt_length(prompt_length)

    def allow_compiled_steps(self, cache: DocumentCache, allowed: bool) -> bool:
        assert isinstance(cache, LambdaCache)
        cache.allow_compiled_steps(allowed)
        return True

    def settings(self) -> dict[str, Any]:
        return self.config.to_dict()

    def identity(self) -> dict[str, Any]:
        return {"strategy": self.name, "config": self.config.to_dict()}
