"""``lminf_integrations.patch``: switch a model to a long-context attention and back.

``patch_model(model, LMInfiniteConfig(...))`` for Λ-attention (:mod:`.strategies.lm_infinite.patch`),
``patch_model(model, DCAConfig(...))`` for Dual Chunk Attention (:mod:`.strategies.dca.patch`); ``unpatch_model``
undoes either, and ``new_cache`` gives the cache of whichever is installed. Also the import path README and earlier
code use for ``cache_kwargs``.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .config import DCAConfig, LMInfiniteConfig
from .hf_compat import CACHE_ARGUMENT, cache_kwargs
from .strategies.dca.cache import DCACache
from .strategies.dca.patch import new_dca_cache, patch_dca
from .strategies.lm_infinite.cache import LambdaCache
from .strategies.lm_infinite.patch import (
    SUPPORTED_ARCHITECTURES,
    is_patched,
    lminf_config_of,
    unpatch_model,
)
from .strategies.lm_infinite.patch import new_cache as new_lambda_cache
from .strategies.lm_infinite.patch import patch_model as patch_lm_infinite


def patch_model(model: PreTrainedModel, config: LMInfiniteConfig | DCAConfig | None = None) -> PreTrainedModel:
    """Make ``model`` use the attention ``config`` describes (default ``LMInfiniteConfig()``); returns the model.

    Patching again replaces the settings (or the attention). The model still works with ``model(...)`` and
    ``model.generate(...)``; for Λ-attention pass ``cache=new_cache(model)`` for its bounded cache.
    """
    if isinstance(config, DCAConfig):
        return patch_dca(model, config)
    return patch_lm_infinite(model, config)


def new_cache(model: PreTrainedModel) -> LambdaCache | DCACache:
    """An empty cache for the attention ``model`` was patched with: the bounded :class:`LambdaCache` for
    Λ-attention, a :class:`DCACache` (every key, stored at its chunk offset) for Dual Chunk Attention."""
    if is_patched(model) and isinstance(model.lminf_config, DCAConfig):
        return new_dca_cache(model)
    if not is_patched(model):
        raise ValueError("the model is not patched; call patch_model(model, config) first")
    return new_lambda_cache(model)


__all__ = [
    "CACHE_ARGUMENT",
    "SUPPORTED_ARCHITECTURES",
    "cache_kwargs",
    "is_patched",
    "lminf_config_of",
    "new_cache",
    "patch_model",
    "unpatch_model",
]
