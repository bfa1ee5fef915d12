"""Long-context strategies, by the name ``strategy=`` takes (``EngineOptions.strategy``)."""

from __future__ import annotations

from ..config import STRATEGY_NAMES, LMInfiniteConfig
from .base import DocumentCache, Strategy
from .lm_infinite import LMInfinite
from .vanilla import Vanilla

__all__ = ["DocumentCache", "LMInfinite", "Strategy", "Vanilla", "make_strategy"]


def make_strategy(name: str, config: LMInfiniteConfig) -> Strategy:
    """The strategy called ``name`` (one of ``STRATEGY_NAMES``), with the attention settings it uses."""
    if name == "lm-infinite":
        return LMInfinite(config)
    if name == "vanilla":
        return Vanilla()
    raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGY_NAMES)}")
