"""Differences between the transformers versions this package supports, in one place."""

from __future__ import annotations

import inspect
from typing import Any

from transformers import LlamaModel

# transformers 5.24 renamed the models' ``past_key_values`` argument to ``cache`` (the old name warns until 6.0).
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` for a model's forward or ``generate``, under this transformers version's name."""
    return {CACHE_ARGUMENT: cache}
