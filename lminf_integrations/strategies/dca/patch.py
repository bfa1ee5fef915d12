"""Switch a transformers causal LM to Dual Chunk Attention and back, through transformers' own extension points
(as :mod:`..lm_infinite.patch` does for Λ-attention; one model runs one of them at a time)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from ...config import DCAConfig
from ..lm_infinite.patch import _decoder, _padding_only_mask, install_attention
from ..lm_infinite.patch import unpatch_model as unpatch_model
from ..support import check_model
from .attention import ATTENTION_NAME, DCALayerSettings, dca_attention, discard_hand_over
from .cache import DCACache

DCA_LABEL = "Dual Chunk Attention"

AttentionInterface.register(ATTENTION_NAME, dca_attention)
AttentionMaskInterface.register(ATTENTION_NAME, _padding_only_mask)


def _no_pending_hand_over(module: torch.nn.Module, args: Any) -> None:
    """Forward pre-hook of a patched decoder: the forward starts with no cache hand-off pending."""
    discard_hand_over()


def patch_dca(model: PreTrainedModel, config: DCAConfig | None = None) -> PreTrainedModel:
    """Make ``model`` use Dual Chunk Attention with ``config`` (defaults scaled to its training length). Returns the
    model; :func:`unpatch_model` restores it exactly. Works with ``model(...)`` and transformers' own cache."""
    check_model(model, DCA_LABEL)
    config = config or DCAConfig()
    training_length = getattr(model.config, "max_position_embeddings", None)
    if training_length is None:
        raise ValueError(f"{type(model).__name__} does not say its training length (max_position_embeddings)")
    chunk, local = config.resolve(int(training_length))
    decoder = _decoder(model)
    inv_freq: torch.Tensor = decoder.rotary_emb.inv_freq  # type: ignore[union-attr, assignment]
    far = int(training_length) - 1
    settings = [DCALayerSettings(chunk, local, far, inv_freq, index) for index in range(len(decoder.layers))]  # type: ignore[arg-type]
    return install_attention(model, config, ATTENTION_NAME, settings, _no_pending_hand_over)


def new_dca_cache(model: PreTrainedModel) -> DCACache:
    """An empty :class:`DCACache` for a model patched by :func:`patch_dca`."""
    if not isinstance(getattr(model, "lminf_config", None), DCAConfig):
        raise ValueError("the model is not patched with Dual Chunk Attention; call patch_model(model, DCAConfig())")
    return DCACache([layer.self_attn.lminf_settings for layer in _decoder(model).layers])  # type: ignore[union-attr]
