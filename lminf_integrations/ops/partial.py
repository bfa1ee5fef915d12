"""Partial attentions and their exact merge: the building block of attentions that show a query several sets of keys.

A query's keys may be split into parts, each computed by one call of :func:`flash` (on a CPU, PyTorch's fused
flash kernel), which also returns the log-sum-exp of each query row; merging the parts by their log-sum-exps gives
exactly one softmax over all of the keys (LM-Infinite: band, global and top-k keys; Dual Chunk Attention: ordinary
and far keys).
"""

from __future__ import annotations

import torch

from . import flex
from .flex import Part  # a partial attention: output (B, H, Lq, D) in any memory layout, log-sum-exp

_cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

#: Use :func:`plain_attention` on the CPU too (tests set it, to check on a CPU the path other devices take).
PLAIN_ON_CPU = False
# Logits held at once by plain_attention (float32 elements): bounds its memory whatever the number of keys.
_BLOCK_ELEMENTS = 1 << 26


def additive_mask(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The ``attn_mask`` for :func:`flash` that shows a query only the keys where ``seen`` is true: 0 there, -inf
    elsewhere (added to the logits)."""
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))


def flash(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query (B, H, Lq, D)`` over ``keys``/``values (B, Hkv, Lk, D)`` → ``(out (B, H, Lq, D) with
    (B, Lq, H, D) memory, logsumexp (B, H, Lq) float32)``. The causal mask is top-left aligned; grouped-query
    attention is paired inside (keys never repeated); ``attn_mask`` (in the query's dtype) is added to the logits. A
    row that sees no key gets a zero output and a log-sum-exp of ``-inf``.

    On a CPU, PyTorch's fused flash kernel; elsewhere FlexAttention for several queries without an added mask
    (:func:`.flex.attention`), and :func:`plain_attention` (exact, unfused) for the rest."""
    if query.device.type == "cpu" and not PLAIN_ON_CPU:
        out, lse = _cpu_flash(query, keys, values, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[:2]
        if attn_mask is not None:  # the kernel gives a row that sees no key a log-sum-exp of 0: it must weigh nothing
            lse = lse.masked_fill(attn_mask.isneginf().all(-1), float("-inf"))
        return out, lse
    if dropout_p:
        raise ValueError("dropout is not supported here (inference only)")
    if attn_mask is None and query.shape[-2] > 1 and flex.applies(query.device):
        return flex.attention(query, keys, values, is_causal, scale if scale is not None else query.shape[-1] ** -0.5)
    return plain_attention(query, keys, values, is_causal, attn_mask, scale)


def plain_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    is_causal: bool = False,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`flash`'s contract in tensor operations on any device: float32 logits, a block of query rows at a time
    (so memory stays bounded), each group of query heads against its key head as a batched matrix product. A row
    that sees no key gets a zero output and a log-sum-exp of ``-inf`` (its part then weighs nothing in
    :func:`combine`)."""
    batch, heads, n_queries, dim = query.shape
    kv_heads, n_keys = keys.shape[1], keys.shape[2]
    groups = heads // kv_heads
    scale = scale if scale is not None else dim**-0.5
    out = torch.empty(batch, n_queries, heads, dim, dtype=query.dtype, device=query.device)
    lse = torch.empty(batch, heads, n_queries, dtype=torch.float32, device=query.device)
    k = keys.float().unsqueeze(2).transpose(-1, -2)  # (B, Hkv, 1, D, Lk): shared by the group's query heads
    v = values.float().unsqueeze(2)
    mask = None
    if attn_mask is not None:
        mask = attn_mask.expand(batch, heads, n_queries, n_keys).reshape(batch, kv_heads, groups, n_queries, n_keys)
    rows = max(1, _BLOCK_ELEMENTS // max(1, batch * heads * n_keys))
    for start in range(0, n_queries, rows):
        stop = min(n_queries, start + rows)
        q = query[:, :, start:stop].float().reshape(batch, kv_heads, groups, stop - start, dim)
        logits = torch.matmul(q, k).mul_(scale)  # (B, Hkv, g, rows, Lk)
        if mask is not None:
            logits.add_(mask[..., start:stop, :].float())
        if is_causal:
            rows_at = torch.arange(start, stop, device=query.device)[:, None]
            logits.masked_fill_(rows_at < torch.arange(n_keys, device=query.device)[None, :], float("-inf"))
        block_lse = torch.logsumexp(logits, dim=-1)
        finite = torch.where(torch.isfinite(block_lse), block_lse, torch.zeros_like(block_lse))
        block_out = torch.matmul(torch.exp(logits.sub_(finite.unsqueeze(-1))), v)  # (B, Hkv, g, rows, D)
        out[:, start:stop] = block_out.reshape(batch, heads, stop - start, dim).transpose(1, 2)
        lse[:, :, start:stop] = block_lse.reshape(batch, heads, stop - start)
    return out.transpose(1, 2), lse


def combine(parts: list[Part], scores: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """One softmax over every part's keys, exactly; returns ``(B, Lq, H, D)`` in ``dtype``, contiguous.

    ``parts`` are kernel outputs with their log-sum-exp; ``scores`` are explicit float32 logits ``(B, H, K, Lq)``
    (``-inf`` where hidden) over ``K`` shared values ``(B, H, K, D)``, whose weights go straight into the sum.
    Each part's output is read once; the first part must see a key in every row (the local band always does: its
    own key), so the joint log-sum-exp is finite.
    """
    first_out, lse = parts[0]
    if len(parts) == 1 and not scores:
        return first_out.transpose(1, 2).to(dtype).contiguous()
    for _, part_lse in parts[1:]:
        lse = torch.logaddexp(lse, part_lse)
    for logits, _ in scores:
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=-2))
    batch, heads, n_queries, head_dim = first_out.shape
    out: torch.Tensor | None = None
    for logits, values in scores:  # (B, H, K, Lq) → weights (B, H, Lq, K) @ values (B, H, K, D)
        weighted = torch.matmul(torch.exp(logits - lse.unsqueeze(-2)).transpose(-1, -2), values)
        out = weighted if out is None else out.add_(weighted)
    for part_out, part_lse in parts:
        weight = torch.exp(part_lse - lse).unsqueeze(-1)
        out = part_out * weight if out is None else out.addcmul_(part_out, weight)
    assert out is not None
    result = torch.empty(batch, n_queries, heads, head_dim, dtype=dtype, device=first_out.device)
    return result.copy_(out.transpose(1, 2))


