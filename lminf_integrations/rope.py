"""Rotary-embedding arithmetic used to move queries and keys to other positions.

RoPE rotates each (x_k, x_{k+d/2}) pair of a head vector by ``position * inv_freq[k]``. Rotations compose, so a
vector already rotated to position ``p`` is moved to ``p + delta`` by rotating it by ``delta``; this lets the
attention work on the states the model already rotated, whatever rope scaling produced ``inv_freq``.
"""

from __future__ import annotations

import torch


def rotation(delta: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape ``(*delta.shape, head_dim)`` for rotating by ``delta`` positions."""
    angles = delta.to(torch.float32)[..., None] * inv_freq.to(device=delta.device, dtype=torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (..., seq, head_dim)`` by tables broadcastable to it (the same formula the models use)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def shift_positions(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move states ``x (batch, heads, seq, head_dim)`` by ``delta (seq,)`` positions, computed in float32."""
    cos, sin = rotation(delta, inv_freq, torch.float32)
    return rotate(x.float(), cos, sin).to(x.dtype)
