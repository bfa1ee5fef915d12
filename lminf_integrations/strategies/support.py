"""Which models the strategies run: the architectures whose attention they replace, and RoPE that stays fixed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

# All of these apply RoPE with the rotate-half formula before calling the attention function, and call it through
# transformers' AttentionInterface (which the strategies register their attention in).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE types whose frequencies transformers recomputes from the input's length during a forward. A patched
# attention rotates keys again with the frequencies it read when patched, so the two would disagree.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def rope_types(config: PretrainedConfig) -> set[str]:
    """The RoPE types ``config`` declares (one per attention type where a model has several)."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    groups = [parameters] if not all(isinstance(v, Mapping) for v in parameters.values()) else parameters.values()
    return {str(group.get("rope_type") or group.get("type") or "default") for group in groups}


def check_model(model: PreTrainedModel, strategy: str, fixed_rope: bool = True) -> None:
    """Refuse (``ValueError``) a model ``strategy`` cannot run: another architecture, or (``fixed_rope``) RoPE
    that changes with the input's length."""
    config: Any = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"{strategy} does not support model_type {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    changing = sorted(rope_types(config) & set(LENGTH_DEPENDENT_ROPE)) if fixed_rope else []
    if changing:
        raise ValueError(
            f"{strategy} does not support rope_type {changing[0]!r}: its frequencies change with the input's length "
            "(set rope_parameters to a fixed type such as 'linear', 'yarn' or 'llama3' in the model's config, or "
            "use strategy='xl3m', which reads the document in segments within the training length)"
        )
