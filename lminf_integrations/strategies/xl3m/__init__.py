"""XL3M segment selection (Wang et al., 2024): the model picks the segments of a long prompt that answer it."""

from .strategy import XL3M

__all__ = ["XL3M"]
