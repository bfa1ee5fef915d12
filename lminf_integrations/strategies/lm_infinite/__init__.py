"""LM-Infinite (Han et al., NAACL 2024): Λ-shaped attention with a distance limit, over a bounded cache."""

from .strategy import LMInfinite

__all__ = ["LMInfinite"]
