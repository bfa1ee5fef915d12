"""LM-Infinite for Hugging Face transformers, with LangChain and LlamaIndex integrations."""

from .cache import LambdaCache
from .config import LMInfiniteConfig
from .models import load_model
from .patch import SUPPORTED_ARCHITECTURES, is_patched, new_cache, patch_model, unpatch_model

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "LMInfiniteConfig",
    "LambdaCache",
    "is_patched",
    "load_model",
    "new_cache",
    "patch_model",
    "unpatch_model",
]
