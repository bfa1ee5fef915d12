"""Switch a transformers causal LM to Λ-attention and back, through transformers' own extension points.

The attention function is registered in ``AttentionInterface`` and selected with ``set_attn_implementation``;
the mask builder registered beside it returns no dense mask (the attention builds its own band), so nothing of
size n×n is ever materialised. Model code itself is untouched, which keeps the patch working across upgrades.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from ...config import LMInfiniteConfig
from ..support import SUPPORTED_ARCHITECTURES as SUPPORTED_ARCHITECTURES
from ..support import check_model
from .attention import ATTENTION_NAME, LayerSettings, discard_hand_over, lambda_attention
from .cache import LambdaCache


def _padding_only_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Return nothing for unpadded input; a padded 2D mask is passed on so the attention can refuse it."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    return attention_mask


AttentionInterface.register(ATTENTION_NAME, lambda_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _padding_only_mask)


def _decoder(model: PreTrainedModel) -> torch.nn.Module:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not hasattr(decoder, "layers") or not hasattr(decoder, "rotary_emb"):
        raise ValueError(f"cannot find decoder layers and rotary embedding in {type(model).__name__}")
    return decoder


def _no_pending_hand_over(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook of a patched decoder: the forward starts with no cache hand-off pending."""
    discard_hand_over()


def patch_model(model: PreTrainedModel, config: LMInfiniteConfig | None = None) -> PreTrainedModel:
    """Make ``model`` use Λ-attention with ``config`` (defaults: ``LMInfiniteConfig()``). Returns the model.

    Patching again replaces the settings. The model still works with ``model(...)`` and ``model.generate(...)``;
    pass ``cache=new_cache(model)`` (``past_key_values=`` before transformers 5.24) for the bounded cache
    (transformers' default cache also works, but keeps every key).
    """
    check_model(model, "LM-Infinite")
    config = config or LMInfiniteConfig()
    decoder = _decoder(model)
    config.check_against_model(getattr(model.config, "max_position_embeddings", None), model.config.num_hidden_layers)
    inv_freq: torch.Tensor = decoder.rotary_emb.inv_freq  # type: ignore[union-attr, assignment]
    settings = [LayerSettings(config, inv_freq, index) for index in range(len(decoder.layers))]  # type: ignore[arg-type]
    return install_attention(model, config, ATTENTION_NAME, settings, _no_pending_hand_over)


def install_attention(
    model: PreTrainedModel,
    config: Any,
    attention_name: str,
    layer_settings: Sequence[Any],
    pre_hook: Callable[[torch.nn.Module, Any], None],
) -> PreTrainedModel:
    """Switch ``model`` to the registered attention ``attention_name``, each layer's attention module given its
    settings (``lminf_settings``) and the decoder ``pre_hook``; the settings ``config`` kept as ``lminf_config``.

    A model running another of this package's attentions (another config class) is restored first, so that
    :func:`unpatch_model` always goes back to the model's own attention."""
    if is_patched(model) and type(model.lminf_config) is not type(config):
        unpatch_model(model)
    decoder = _decoder(model)
    for layer, settings in zip(decoder.layers, layer_settings, strict=True):  # type: ignore[arg-type]
        layer.self_attn.lminf_settings = settings
    if not is_patched(model):
        model.lminf_previous_attention = model.config._attn_implementation  # type: ignore[assignment]
        model.set_attn_implementation(attention_name)
        model.lminf_hook = decoder.register_forward_pre_hook(pre_hook)  # type: ignore[assignment]
    model.lminf_config = config  # type: ignore[assignment]
    return model


def unpatch_model(model: PreTrainedModel) -> PreTrainedModel:
    """Restore the attention implementation the model had before :func:`patch_model`."""
    if not is_patched(model):
        return model
    model.set_attn_implementation(model.lminf_previous_attention)  # type: ignore[arg-type]
    model.lminf_hook.remove()  # type: ignore[union-attr, operator]
    for layer in _decoder(model).layers:  # type: ignore[union-attr]
        del layer.self_attn.lminf_settings
    del model.lminf_previous_attention
    del model.lminf_hook
    del model.lminf_config
    return model


def is_patched(model: PreTrainedModel) -> bool:
    return hasattr(model, "lminf_config")


def lminf_config_of(model: PreTrainedModel) -> LMInfiniteConfig:
    if not is_patched(model) or not isinstance(model.lminf_config, LMInfiniteConfig):
        raise ValueError("the model is not patched with LM-Infinite; call patch_model(model, config) first")
    return model.lminf_config


def new_cache(model: PreTrainedModel) -> LambdaCache:
    """An empty :class:`LambdaCache` for a patched model."""
    lminf_config_of(model)
    return LambdaCache([layer.self_attn.lminf_settings for layer in _decoder(model).layers])  # type: ignore[union-attr]
