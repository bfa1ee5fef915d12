"""LM-Infinite for Hugging Face transformers, with LangChain and LlamaIndex integrations."""

from .cache import LambdaCache
from .config import LMInfiniteConfig
from .patch import SUPPORTED_ARCHITECTURES, is_patched, new_cache, patch_model, unpatch_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "LMInfiniteConfig",
    "LambdaCache",
    "is_patched",
    "new_cache",
    "patch_model",
    "unpatch_model",
]
