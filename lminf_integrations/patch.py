"""``lminf_integrations.patch``: switch a model to a long-context attention and back.

``patch_model(model, LMInfiniteConfig(...))`` for Λ-attention (:mod:`.strategies.lm_infinite.patch`),
``patch_model(model, DCAConfig(...))`` for Dual Chunk Attention (:mod:`.strategies.dca.patch`); ``unpatch_model``
undoes either. Also the import path README and earlier code use for ``new_cache`` and ``cache_kwargs``.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from .config import DCAConfig, LMInfiniteConfig
from .hf_compat import CACHE_ARGUMENT, cache_kwargs
from .strategies.dca.patch import patch_dca
from .strategies.lm_infinite.patch import (
    SUPPORTED_ARCHITECTURES,
    is_patched,
    lminf_config_of,
    new_cache,
    unpatch_model,
)
from .strategies.lm_infinite.patch import patch_model as patch_lm_infinite


def patch_model(model: PreTrainedModel, config: LMInfiniteConfig | DCAConfig | None = None) -> PreTrainedModel:
    """Make ``model`` use the attention ``config`` describes (default ``LMInfiniteConfig()``); returns the model.

    Patching again replaces the settings (or the attention). The model still works with ``model(...)`` and
    ``model.generate(...)``; for Λ-attention pass ``cache=new_cache(model)`` for its bounded cache.
    """
    if isinstance(config, DCAConfig):
        return patch_dca(model, config)
    return patch_lm_infinite(model, config)


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
