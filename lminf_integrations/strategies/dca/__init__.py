"""Dual Chunk Attention (An et al., ICML 2024): every key seen, no distance past the training length."""

from .attention import dca_attention
from .patch import patch_dca
from .strategy import DCA

__all__ = ["DCA", "dca_attention", "patch_dca"]
