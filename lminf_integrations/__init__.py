"""LM-Infinite for Hugging Face transformers, with LangChain and LlamaIndex integrations.

The names below are imported on first use: ``import lminf_integrations`` (and the ``lminf`` command's start) does
not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import DCAConfig, LMInfiniteConfig
    from .models import load_model
    from .patch import new_cache, patch_model
    from .strategies.lm_infinite.cache import LambdaCache
    from .strategies.lm_infinite.patch import SUPPORTED_ARCHITECTURES, is_patched, unpatch_model

_HOMES = {
    "SUPPORTED_ARCHITECTURES": "strategies.lm_infinite.patch",
    "DCAConfig": "config",
    "LMInfiniteConfig": "config",
    "LambdaCache": "strategies.lm_infinite.cache",
    "is_patched": "strategies.lm_infinite.patch",
    "load_model": "models",
    "new_cache": "patch",
    "patch_model": "patch",
    "unpatch_model": "strategies.lm_infinite.patch",
}

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "DCAConfig",
    "LMInfiniteConfig",
    "LambdaCache",
    "is_patched",
    "load_model",
    "new_cache",
    "patch_model",
    "unpatch_model",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
