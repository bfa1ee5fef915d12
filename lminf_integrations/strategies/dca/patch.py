"""Switch a transformers causal LM to Dual Chunk Attention and back, through transformers' own extension points
(as :mod:`..lm_infinite.patch` does for Λ-attention; one model runs one of them at a time)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from ...config import DCAConfig
from ..lm_infinite.patch import _check_supported, _decoder, _padding_only_mask, is_patched
from ..lm_infinite.patch import unpatch_model as unpatch_model
from .attention import ATTENTION_NAME, DCALayerSettings, dca_attention, discard_hand_over

AttentionInterface.register(ATTENTION_NAME, dca_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _padding_only_mask)


def _no_pending_hand_over(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook of a patched decoder: the forward starts with no cache hand-off pending."""
    discard_hand_over()


def patch_dca(model: PreTrainedModel, config: DCAConfig | None = None) -> PreTrainedModel:
    """Make ``model`` use Dual Chunk Attention with ``config`` (defaults scaled to its training length). Returns the
    model; :func:`unpatch_model` restores it exactly. Works with ``model(...)`` and transformers' own cache."""
    _check_supported(model)
    config = config or DCAConfig()
    training_length = getattr(model.config, "max_position_embeddings", None)
    if training_length is None:
        raise ValueError(f"{type(model).__name__} does not say its training length (max_position_embeddings)")
    chunk, local = config.resolve(int(training_length))
    decoder = _decoder(model)
    if is_patched(model) and not isinstance(model.lminf_config, DCAConfig):
        unpatch_model(model)  # Λ-attention first undone: its settings and cache do not apply
    inv_freq: torch.Tensor = decoder.rotary_emb.inv_freq  # type: ignore[union-attr, assignment]
    for index, layer in enumerate(decoder.layers):  # type: ignore[union-attr, arg-type]
        layer.self_attn.lminf_settings = DCALayerSettings(chunk, local, int(training_length) - 1, inv_freq, index)
    if not is_patched(model):
        model.lminf_previous_attention = model.config._attn_implementation  # type: ignore[assignment]
        model.set_attn_implementation(ATTENTION_NAME)
        model.lminf_hook = decoder.register_forward_pre_hook(_no_pending_hand_over)  # type: ignore[assignment]
    model.lminf_config = config  # type: ignore[assignment]
    return model
