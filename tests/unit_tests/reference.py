"""An independent, deliberately naive Λ-attention: dense n×n logits written straight from the semantics.

It shares no code with the package. RoPE is undone and re-applied in complex form (each (x_k, x_{k+d/2}) pair is
one complex number, a rotation by angle θ is a multiplication by e^{iθ}), and every query–key logit is computed
with its *effective* distance: i - j inside the window, ``distance_limit`` for global and top-k middle keys.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

REFERENCE_NAME = "lminf_reference"
# Queries at positions >= this use top-k middle attention (set by the tests; None: last query of the call).
TOP_K_FROM_POSITION: list[int | None] = [None]


def _complex(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.complex(x[..., :half].double(), x[..., half:].double())


def reference_attention(
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
    cfg, inv_freq, layer = settings.config, settings.inv_freq.to(query.device, torch.float64), settings.layer_idx
    n_keys, n_q = key.shape[-2], query.shape[-2]
    rep = query.shape[1] // key.shape[1]
    k = key.repeat_interleave(rep, dim=1)
    v = value.repeat_interleave(rep, dim=1).double()
    q_pos = torch.arange(n_keys - n_q, n_keys, dtype=torch.float64, device=query.device)
    k_pos = torch.arange(n_keys, dtype=torch.float64, device=query.device)
    # Back to position 0: multiply by e^{-i p f}.
    zq = _complex(query) * torch.exp(-1j * q_pos[:, None] * inv_freq[None, :])
    zk = _complex(k) * torch.exp(-1j * k_pos[:, None] * inv_freq[None, :])
    dist = q_pos[:, None] - k_pos[None, :]  # (n_q, n_keys)
    limit = cfg.distance_limit if cfg.distance_limit is not None else cfg.n_local
    local = (dist >= 0) & (dist < cfg.n_local)
    is_global = (dist >= cfg.n_local) & (k_pos[None, :] < cfg.n_global)
    middle = (dist >= cfg.n_local) & (k_pos[None, :] >= cfg.n_global)
    # q_p · k_j at relative distance e = Re Σ_f zq conj(zk) e^{+i e f}  (key behind the query by e). The effective
    # distance e is p - j inside the window and the limit L outside it. e^{i(p-j)f} = e^{ipf} conj(e^{ijf}), so each
    # case is one dense product, and every pair takes the one its distance calls for. (One einsum over a (q, k, f)
    # phase tensor says the same, but builds an n_q × n_keys × F complex tensor per head: minutes on a real model.)
    def turn(positions: torch.Tensor) -> torch.Tensor:  # e^{i p f}, one row per position
        return torch.exp(1j * positions[:, None] * inv_freq)

    at_true = torch.einsum("bhqf,bhkf->bhqk", zq * turn(q_pos), (zk * turn(k_pos)).conj()).real
    limit_turn = turn(torch.tensor([float(limit)], device=query.device))
    at_limit = torch.einsum("bhqf,bhkf->bhqk", zq * limit_turn, zk.conj()).real
    logits = torch.where(local, at_true, at_limit) * (scaling or query.shape[-1] ** -0.5)
    allowed = (local | is_global).expand_as(logits).clone()
    if cfg.top_k > 0 and layer >= cfg.top_k_from_layer:
        start = TOP_K_FROM_POSITION[0] if TOP_K_FROM_POSITION[0] is not None else n_keys - 1
        for qi in range(n_q):
            if q_pos[qi] < start:
                continue
            candidates = middle[qi].nonzero().flatten()
            if len(candidates) == 0:
                continue
            scores = logits[:, :, qi, candidates]
            top = scores.topk(min(cfg.top_k, len(candidates)), dim=-1).indices
            for b in range(logits.shape[0]):
                for h in range(logits.shape[1]):
                    allowed[b, h, qi, candidates[top[b, h]]] = True
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = torch.softmax(logits, dim=-1) @ v
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


AttentionInterface.register(REFERENCE_NAME, reference_attention)
AttentionMaskInterface.register(REFERENCE_NAME, lambda *args, **kwargs: None)
