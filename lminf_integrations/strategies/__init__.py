"""Long-context strategies, by the name ``strategy=`` takes (``EngineOptions.strategy``)."""

from __future__ import annotations

from ..config import STRATEGY_NAMES, DCAConfig, LMInfiniteConfig, XL3MConfig
from .base import DocumentCache, Plan, Strategy
from .dca import DCA
from .lm_infinite import LMInfinite
from .vanilla import Vanilla
from .xl3m import XL3M

__all__ = ["DCA", "XL3M", "DocumentCache", "LMInfinite", "Plan", "Strategy", "Vanilla", "make_strategy"]


def make_strategy(
    name: str, config: LMInfiniteConfig, xl3m: XL3MConfig | None = None, dca: DCAConfig | None = None
) -> Strategy:
    """The strategy called ``name`` (one of ``STRATEGY_NAMES``), with the settings it uses."""
    if name == "lm-infinite":
        return LMInfinite(config)
    if name == "xl3m":
        return XL3M(xl3m or XL3MConfig())
    if name == "dca":
        return DCA(dca or DCAConfig())
    if name == "vanilla":
        return Vanilla()
    raise ValueError(f"unknown strategy {name!r}; use one of {', '.join(STRATEGY_NAMES)}")
