"""Ordinary causal attention, fast when new tokens continue a cache on a CPU (XL3M's answers).

An XL3M answer prompt continues the first chosen segment's keys and values, so its tokens are read as a chunk
over a cache. transformers' SDPA path then hands PyTorch a dense mask, which on a CPU leaves the fused flash
kernel for the unfused one. Here the same attention is two fused calls merged exactly by their log-sum-exps
(:mod:`.partial`): the chunk over the cached keys (every one visible) and over its own keys (causal, where the
kernel's top-left alignment is the right one). Anything else (a batch, padding, a sliding window shorter than the
keys: any mask that is not plain causal; another device) goes to transformers' SDPA unchanged, so the results are
the model's own either way.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .partial import combine, flash

CACHED_CAUSAL = "lminf_cached_causal"


def _plain_causal(mask: torch.Tensor | None, n_queries: int, n_keys: int) -> bool:
    """Whether ``mask`` (boolean, True where seen) lets each of the last ``n_queries`` positions see every key up to
    itself and nothing else, for one sequence; ``None`` is what transformers passes when it is."""
    if mask is None:
        return True
    if mask.dtype != torch.bool or mask.shape[0] != 1 or mask.shape[-1] != n_keys:
        return False
    expected = torch.ones(n_queries, n_keys, dtype=torch.bool, device=mask.device).tril(n_keys - n_queries)
    return bool(torch.equal(mask.reshape(-1, n_queries, n_keys)[0], expected))


def cached_causal_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention of ``query (1, H, Lq, D)``, the last ``Lq`` positions, over ``key``/``value``; as
    transformers' SDPA attention, with the fused CPU kernel for a chunk over a cache."""
    n_queries, n_keys = query.shape[2], key.shape[2]
    if (
        query.device.type != "cpu"
        or query.shape[0] != 1
        or dropout
        or not _plain_causal(attention_mask, n_queries, n_keys)
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )  # type: ignore[return-value]
    past = n_keys - n_queries
    if past == 0 or n_queries == 1:  # a square causal block, or one query that sees every key
        out, _ = flash(query, key, value, is_causal=n_queries > 1, scale=scaling)
        return out.transpose(1, 2), None
    cached = flash(query, key[:, :, :past], value[:, :, :past], scale=scaling)
    own = flash(query, key[:, :, past:], value[:, :, past:], is_causal=True, scale=scaling)
    return combine([own, cached], [], query.dtype), None


AttentionInterface.register(CACHED_CAUSAL, cached_causal_attention)
AttentionMaskInterface.register(CACHED_CAUSAL, sdpa_mask)


def use(model: PreTrainedModel) -> None:
    """Give ``model`` this attention (remembering what it had); the caller holds the model's lock."""
    if model.config._attn_implementation != CACHED_CAUSAL:
        model.lminf_xl3m_previous_attention = model.config._attn_implementation  # type: ignore[assignment]
        model.set_attn_implementation(CACHED_CAUSAL)


def release(model: PreTrainedModel) -> None:
    """Give ``model`` back the attention it had before :func:`use` (nothing if it does not have this one)."""
    if model.config._attn_implementation == CACHED_CAUSAL:
        model.set_attn_implementation(getattr(model, "lminf_xl3m_previous_attention", None) or "sdpa")
