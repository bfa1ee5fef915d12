"""``lminf_integrations.patch``, the import path README and earlier code use: the LM-Infinite patch
(:mod:`lminf_integrations.strategies.lm_infinite.patch`) and ``cache_kwargs`` (:mod:`lminf_integrations.hf_compat`)."""

from .hf_compat import CACHE_ARGUMENT, cache_kwargs
from .strategies.lm_infinite.patch import (
    SUPPORTED_ARCHITECTURES,
    is_patched,
    lminf_config_of,
    new_cache,
    patch_model,
    unpatch_model,
)

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
