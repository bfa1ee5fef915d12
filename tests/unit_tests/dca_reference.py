"""An independent, deliberately naive Dual Chunk Attention: dense n×n logits written from the paper's position maps.

It shares no code with the package (only the complex-number helper of the Λ reference). RoPE is undone and
re-applied in complex form, and every query–key logit is computed at the distance ``P_q - P_k`` of An et al.
(2024), Sec. 3: the key at its offset in its chunk; the query at its offset (same chunk), at ``s + offset`` for
its first ``w`` offsets and ``c - 1`` after (previous chunk), at ``c - 1`` (older chunks).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from tests.unit_tests.reference import _complex  # RoPE pairs as complex numbers: the Λ reference's helper

DCA_REFERENCE_NAME = "lminf_dca_reference"


def dca_reference_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    settings = module.lminf_settings
    s, w, c = settings.chunk, settings.local, settings.far + 1
    inv_freq = settings.inv_freq.to(query.device, torch.float64)
    n_keys, n_q = key.shape[-2], query.shape[-2]
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1).double()
    q_pos = torch.arange(n_keys - n_q, n_keys, device=query.device)
    k_pos = torch.arange(n_keys, device=query.device)
    zq = _complex(query) * torch.exp(-1j * q_pos.double()[:, None] * inv_freq[None, :])
    zk = _complex(k) * torch.exp(-1j * k_pos.double()[:, None] * inv_freq[None, :])
    q_chunk, q_offset = (q_pos // s)[:, None], (q_pos % s)[:, None]
    k_chunk, k_offset = (k_pos // s)[None, :], (k_pos % s)[None, :]
    far = torch.full((n_q, n_keys), c - 1, device=query.device)
    successive = torch.where(q_offset < w, s + q_offset, far)
    p_query = torch.where(q_chunk == k_chunk, q_offset, torch.where(q_chunk == k_chunk + 1, successive, far))
    distance = (p_query - k_offset).double()
    assert int(distance[k_pos[None, :] <= q_pos[:, None]].max()) < c  # never past the training length
    phase = torch.exp(1j * distance[..., None] * inv_freq)
    logits = torch.einsum("bhqf,bhkf,qkf->bhqk", zq, zk.conj(), phase).real * (scaling or query.shape[-1] ** -0.5)
    logits = logits.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(DCA_REFERENCE_NAME, dca_reference_attention)
AttentionMaskInterface.register(DCA_REFERENCE_NAME, lambda *args, **kwargs: None)
