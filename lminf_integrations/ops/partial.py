"""Partial attentions and their exact merge: the building block of attentions that show a query several sets of keys.

A query's keys may be split into parts, each computed by one call of PyTorch's fused CPU flash kernel, which also
returns the log-sum-exp of each query row; merging the parts by their log-sum-exps gives exactly one softmax over
all of the keys (LM-Infinite: band, global and top-k keys; Dual Chunk Attention: ordinary and far keys).
"""

from __future__ import annotations

import torch

#: ``flash(query, keys, values, dropout, is_causal, attn_mask=None, scale=None)`` → ``(out, logsumexp)``; the
#: causal mask is top-left aligned; grouped-query attention is paired inside the kernel (keys never repeated).
flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


# A partial attention: its output (B, H, Lq, D), in any memory layout, and its log-sum-exp (B, H, Lq).
Part = tuple[torch.Tensor, torch.Tensor]


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


